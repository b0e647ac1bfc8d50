#!/usr/bin/env python3
"""Check a .nemo whose weights are a Megatron-core distributed checkpoint (formats.md §1.6; zarr
or torch_dist backend, from its metadata.json) against the independent PyTorch reference
conversion of the same HF checkpoint.

    nemo_dist_check.py HF_DIR OUR.nemo --tp N [--dtype bf16|f16|f32]

The expected global arrays are built the way Megatron-core's sharded state dict defines them,
from nemo_reference.py's TP-1 tensors (QKV interleaved per query group, fc1 = [gate; up], the
vocabulary padded for tp): layers stacked on a leading axis, `model.`-prefixed keys without a
layer index. The chunking must be Megatron's for a tp-N save: one chunk per layer x TP fragment
on the TP axis (fc1 in 2N fragments).

zarr: read without zarr or NeMo: `.zarray` JSON decides dtype, shape and chunks, each chunk file
is raw C-order bytes at its grid position; checks every `.zarray` field, every chunk file present
with its exact size and nothing else, and one `_extra_state/shard_<l>_<L>.pt` per Transformer
Engine module and layer that torch.load(weights_only=True) reads as None.

torch_dist: loaded by torch.distributed.checkpoint itself (`dcp.load`, no process group) into
tensors of the expected global shapes and `BytesIO`s; checks `.metadata`'s dtype, global shape
and chunk list per array, exactly the expected keys, and that each `_extra_state/shard_<l>_<L>`
object loads as `[None]` (Megatron's torch_dist strategy saves a ShardedObject as
`torch.save([obj])` and unwraps the one-element list after DCP's `torch.load`).

Both: model_config.yaml's tensor_model_parallel_size, metadata.json (the CheckpointingConfig),
common.pt (torch.load -> {}), bit-identical values.

Prints "OK ..." or "FAIL ..." plus the problems; exit 0 when everything matches, 1 otherwise.
"""

import argparse
import io
import itertools
import json
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import yaml  # noqa: E402

import nemo_reference as ref  # noqa: E402

# dcp.load without a process group says it assumes one process: that is the intent here.
warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")

ZARR_DTYPES = {"<f4": torch.float32, "<f2": torch.float16, "bfloat16": torch.bfloat16}
# Transformer Engine modules with extra state: the four linears, and core attention under both
# names TE has used (1.6-1.7: core_attention.fused_attention, from 1.8: core_attention).
TE_MODULES = [
    "model.decoder.layers.self_attention.linear_qkv",
    "model.decoder.layers.self_attention.linear_proj",
    "model.decoder.layers.mlp.linear_fc1",
    "model.decoder.layers.mlp.linear_fc2",
    "model.decoder.layers.self_attention.core_attention",
    "model.decoder.layers.self_attention.core_attention.fused_attention",
]


def expected_arrays(full, hp):
    """key -> (global tensor, TP axis or None, fragments on it)."""
    stack = lambda role: torch.stack([full[(role, l)] for l in range(hp.L)])  # noqa: E731
    p = "model.decoder.layers."
    return {
        "model.embedding.word_embeddings.weight": (full[("embedding", None)], 0, 1),
        p + "self_attention.linear_qkv.layer_norm_weight": (stack("input_norm"), None, 1),
        p + "self_attention.linear_qkv.weight": (stack("qkv"), 1, 1),
        p + "self_attention.linear_proj.weight": (stack("proj"), 2, 1),
        p + "mlp.linear_fc1.layer_norm_weight": (stack("post_norm"), None, 1),
        p + "mlp.linear_fc1.weight": (stack("fc1"), 1, 2),
        p + "mlp.linear_fc2.weight": (stack("fc2"), 2, 1),
        "model.decoder.final_layernorm.weight": (full[("final_norm", None)], None, 1),
        "model.output_layer.weight": (full[("output", None)], 0, 1),
    }


def as_bytes(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


def load_torch(data):
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def parse_cli():
    """HF_DIR OUR.nemo --tp N [--dtype]: this script's arguments, and megatron_dist_load.py's."""
    ap = argparse.ArgumentParser()
    ap.add_argument("hf_dir")
    ap.add_argument("nemo")
    ap.add_argument("--tp", type=int, required=True)
    ap.add_argument("--dtype", choices=sorted(ref.DTYPES))
    return ap.parse_args()


def main():
    a = parse_cli()
    problems = []

    hp, full, dtype = ref.prepare_hf2nemo(a.hf_dir, a.tp, 1, "mcore", a.dtype)
    with tarfile.open(a.nemo, "r:") as tar:
        files = {ref._strip(m.name): tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}

    cfg = yaml.safe_load(files.get("model_config.yaml", b"{}"))
    if cfg.get("tensor_model_parallel_size") != a.tp:
        problems.append(f"model_config.yaml: tensor_model_parallel_size {cfg.get('tensor_model_parallel_size')}, expected {a.tp}")
    w = {k[len("model_weights/"):]: v for k, v in files.items() if k.startswith("model_weights/")}
    if any(k == "model_weights.ckpt" or k.endswith("/model_weights.ckpt") for k in files):
        problems.append("per-rank model_weights.ckpt members next to model_weights/")
    backend = (json.loads(w.get("metadata.json", b"{}")) or {}).get("sharded_backend")
    want_meta = {"sharded_backend": backend, "sharded_backend_version": 1, "common_backend": "torch", "common_backend_version": 1}
    if backend not in ("zarr", "torch_dist") or json.loads(w.pop("metadata.json")) != want_meta:
        problems.append(f"metadata.json is not a zarr or torch_dist CheckpointingConfig")
    common = w.pop("common.pt", None)
    if common is None or load_torch(common) != {}:
        problems.append("common.pt missing or not torch.save({})")

    arrays = expected_arrays(full, hp)
    if backend == "torch_dist":
        check_torch_dist(w, arrays, hp, a.tp, dtype, problems)
    else:
        check_zarr(w, arrays, hp, a.tp, dtype, problems)
    finish(problems, f"OK {backend} tp={a.tp}: {len(arrays)} arrays bit-identical, {len(TE_MODULES) * hp.L} extra-state objects None")


def finish(problems, ok_line):
    """Prints "FAIL n problem(s)" and the first 60, exit 1; or `ok_line`. This script's ending,
    and megatron_dist_load.py's."""
    if problems:
        print(f"FAIL {len(problems)} problem(s)")
        for p in problems[:60]:
            print("  " + p)
        sys.exit(1)
    print(ok_line)


def chunk_shape(key, t, axis, per_rank, tp):
    chunks = list(t.shape)
    if key.startswith("model.decoder.layers."):
        chunks[0] = 1
    if axis is not None:
        chunks[axis] //= tp * per_rank
    return chunks


def object_keys(hp):
    return [f"{m}._extra_state/shard_{l}_{hp.L}" for m in TE_MODULES for l in range(hp.L)]


def check_torch_dist(w, arrays, hp, tp, dtype, problems):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    with tempfile.TemporaryDirectory() as tmp:
        for name, data in w.items():
            (Path(tmp) / name).write_bytes(data)
        reader = FileSystemReader(tmp)
        meta = reader.read_metadata()
        want_keys = set(arrays) | set(object_keys(hp))
        got_keys = set(meta.state_dict_metadata)
        for k in sorted(want_keys - got_keys):
            problems.append(f".metadata: missing {k}")
        for k in sorted(got_keys - want_keys):
            problems.append(f".metadata: unexpected {k}")
        for key, (t, axis, per_rank) in arrays.items():
            m = meta.state_dict_metadata.get(key)
            if m is None:
                continue
            if m.properties.dtype != dtype or list(m.size) != list(t.shape):
                problems.append(f"{key}: .metadata says {m.properties.dtype} {list(m.size)}, expected {dtype} {list(t.shape)}")
            chunks = chunk_shape(key, t, axis, per_rank, tp)
            grid = [s // c for s, c in zip(t.shape, chunks)]
            want = [[i * c for i, c in zip(idx, chunks)] for idx in itertools.product(*[range(g) for g in grid])]
            got = [list(c.offsets) for c in m.chunks]
            if got != want or any(list(c.sizes) != chunks for c in m.chunks):
                problems.append(f"{key}: chunks {[(list(c.offsets), list(c.sizes)) for c in m.chunks][:4]}…, expected offsets {want[:4]}… of {chunks}")
        state = {key: torch.full(t.shape, float("nan"), dtype=dtype) for key, (t, _, _) in arrays.items()}
        state.update({k: io.BytesIO() for k in object_keys(hp)})
        dcp.load(state, storage_reader=reader, no_dist=True)
        for key, (t, _, _) in arrays.items():
            if not torch.equal(as_bytes(state[key]), as_bytes(t)):
                problems.append(f"{key}: values differ after dcp.load")
        for k in object_keys(hp):
            if state[k] != [None]:
                problems.append(f"{k}: dcp.load gave {state[k]!r}, expected [None]")
        extra = sorted(set(w) - {".metadata", "__0_0.distcp"})
        for name in extra:
            problems.append(f"unexpected member model_weights/{name}")


def check_zarr(w, arrays, hp, tp, dtype, problems):
    for module in TE_MODULES:
        for l in range(hp.L):
            name = f"{module}._extra_state/shard_{l}_{hp.L}.pt"
            data = w.pop(name, None)
            if data is None:
                problems.append(f"missing {name}")
            elif load_torch(data) is not None:
                problems.append(f"{name}: not None")

    for key, (t, axis, per_rank) in arrays.items():
        zraw = w.pop(f"{key}/.zarray", None)
        if zraw is None:
            problems.append(f"missing array {key}")
            continue
        z = json.loads(zraw)
        shape, chunks = list(t.shape), chunk_shape(key, t, axis, per_rank, tp)
        fields = {"shape": shape, "chunks": chunks, "dtype": {v: k for k, v in ZARR_DTYPES.items()}[dtype],
                  "compressor": None, "fill_value": None, "filters": None, "order": "C", "zarr_format": 2}
        for f, v in fields.items():
            if z.get(f) != v:
                problems.append(f"{key}/.zarray: {f} {z.get(f)!r}, expected {v!r}")
        if any(z.get(f) != v for f, v in fields.items()):
            continue
        got = torch.empty(shape, dtype=dtype)
        size = 1
        for c in chunks:
            size *= c
        size *= t.element_size()
        for idx in itertools.product(*[range(s // c) for s, c in zip(shape, chunks)]):
            name = f"{key}/{'.'.join(map(str, idx))}"
            data = w.pop(name, None)
            if data is None or len(data) != size:
                problems.append(f"{name}: {'missing' if data is None else f'{len(data)} bytes, expected {size}'}")
                continue
            view = got
            for d, (i, c) in enumerate(zip(idx, chunks)):
                view = view.narrow(d, i * c, c)
            view.copy_(torch.frombuffer(bytearray(data), dtype=dtype).reshape(chunks))
        if not torch.equal(as_bytes(got), as_bytes(t)):
            diff = (got.float() - t.float()).abs()
            problems.append(f"{key}: values differ ({int((diff > 0).sum())} elements, max |diff| {diff.max().item():.3g})")
    for extra in sorted(w):
        problems.append(f"unexpected member model_weights/{extra}")


if __name__ == "__main__":
    main()
