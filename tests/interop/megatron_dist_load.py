#!/usr/bin/env python3
"""Load a .nemo whose weights are a torch_dist distributed checkpoint with Megatron-core's own
loader (`megatron.core.dist_checkpointing.load`), the way a NeMo job restores it, and compare
every tensor with the independent PyTorch reference conversion of the same HF checkpoint.

    megatron_dist_load.py HF_DIR OUR.nemo --tp N [--dtype bf16|f16|f32]

The sharded state dict is the one Megatron-core's GPTModel with the Transformer Engine layer
spec builds on a single rank (tensor- and pipeline-parallel size 1, whatever tp the checkpoint
was saved at: a distributed checkpoint is read at any parallelism): per layer, each weight a
ShardedTensor with the layer axis prepended (`sharded_offsets ((0, layer, L),)`), the
`_extra_state` of every TE module a ShardedObject at (layer,) of (L,), the embedding and output
layer with `allow_shape_mismatch`. So this checks what nemo_dist_check.py cannot: that
Megatron's planner and validation accept our `.metadata`, chunks and ShardedObjects, and
assemble per-layer tensors from them.

Which Megatron-core: torch_dist checkpoints with the venv's (fixtures/gen/requirements-interop.txt,
0.16), zarr ones with the 0.5.0 NeMo 1.23 shipped, from <venv>/megatron-zarr
(requirements-megatron-zarr.txt; 0.16 has no zarr strategy); SHARDSMITH_MEGATRON, a directory
holding `megatron/`, overrides both. Exits 2 ("SKIP ...") when it cannot be imported, 0 with
"SKIP ..." for zarr where setup_venv.sh left <venv>/megatron-zarr/UNAVAILABLE (no wheels of
megatron-core 0.5.0 for this Python). Needs only
torch (CPU) beside it: torch.distributed runs on gloo in one process.
Prints lines of Megatron's own, then "OK ..." or "FAIL ..." last; exit 0 when everything
matches, 1 otherwise.
"""

import json
import os
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import nemo_reference as ref  # noqa: E402
from nemo_dist_check import TE_MODULES, expected_arrays, finish, parse_cli  # noqa: E402

LAYERED = "model.decoder.layers."


def import_megatron(backend):
    where = os.environ.get("SHARDSMITH_MEGATRON")
    if not where and backend == "zarr":
        where = str(Path(sys.prefix) / "megatron-zarr")
        marker = Path(where) / "UNAVAILABLE"
        if marker.exists():  # setup_venv.sh found no wheels for this Python
            print(f"SKIP megatron-core 0.5.0 (zarr) unavailable: {marker.read_text().strip()}")
            sys.exit(0)
    if where:
        sys.path.insert(0, where)
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    try:
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    except ImportError as e:
        print(f"SKIP megatron-core not importable ({e}); set SHARDSMITH_MEGATRON")
        sys.exit(2)
    return dist_checkpointing, ShardedTensor, ShardedObject


def version():
    from megatron.core.package_info import __version__

    return __version__


def sharded_state_dict(arrays, L, ShardedTensor, ShardedObject, extra_state=True):
    """state-dict name -> ShardedTensor / ShardedObject, as GPTModel.sharded_state_dict builds it
    (without the `_extra_state` objects when not `extra_state`: NeVA filters them out). A key
    outside the decoder layers is one replicated tensor."""
    sd = {}
    for key, (t, _, _) in arrays.items():
        empty = lambda shape: torch.full(shape, float("nan"), dtype=t.dtype)  # noqa: E731
        if key.startswith(LAYERED):
            for l in range(L):
                name = f"{LAYERED}{l}.{key[len(LAYERED):]}"
                sd[name] = ShardedTensor.from_rank_offsets(key, empty(t.shape[1:]), (0, l, L), replica_id=0, prepend_axis_num=1)
        else:
            vocab = key in ("model.embedding.word_embeddings.weight", "model.output_layer.weight")
            sd[key] = ShardedTensor.from_rank_offsets(key, empty(t.shape), replica_id=0, allow_shape_mismatch=vocab)
    for module in TE_MODULES if extra_state else []:
        for l in range(L):
            name = f"{LAYERED}{l}.{module[len(LAYERED):]}._extra_state"
            sd[name] = ShardedObject(f"{module}._extra_state", None, (L,), (l,), replica_id=0)
    return sd


def load(nemo, sharded, problems):
    """Megatron's load of `nemo`'s model_weights/ for the sharded state dict `sharded(ShardedTensor,
    ShardedObject)`, its common state checked to be {}. Returns (loaded dict, backend)."""
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(nemo, "r:") as tar:
            for m in tar.getmembers():
                name = ref._strip(m.name)
                if m.isfile() and name.startswith("model_weights/"):
                    dest = Path(tmp) / name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(tar.extractfile(m).read())
        ckpt = Path(tmp) / "model_weights"
        backend = json.loads((ckpt / "metadata.json").read_text()).get("sharded_backend")
        dist_checkpointing, ShardedTensor, ShardedObject = import_megatron(backend)
        # One process: an in-memory store, so no port is bound (tests run side by side).
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
        try:
            common = dist_checkpointing.load_common_state_dict(str(ckpt))
            if common != {}:
                problems.append(f"common.pt: Megatron read {common!r}, expected {{}}")
            return dist_checkpointing.load(sharded(ShardedTensor, ShardedObject), str(ckpt)), backend
        finally:
            torch.distributed.destroy_process_group()


def compare(arrays, loaded, L, problems):
    """Every expected array against what Megatron loaded (per layer for the decoder's), bit for bit."""
    for key, (t, _, _) in arrays.items():
        if key.startswith(LAYERED):
            got = [loaded.get(f"{LAYERED}{l}.{key[len(LAYERED):]}") for l in range(L)]
            if any(g is None for g in got):
                problems.append(f"{key}: Megatron returned no tensor for some layer")
                continue
            got = torch.stack(got)
        else:
            got = loaded.get(key)
            if got is None:
                problems.append(f"{key}: Megatron returned nothing")
                continue
        if got.dtype != t.dtype or got.shape != t.shape or not torch.equal(got.view(-1).view(torch.uint8), t.contiguous().view(-1).view(torch.uint8)):
            problems.append(f"{key}: Megatron loaded {got.dtype} {list(got.shape)}, not the reference's {t.dtype} {list(t.shape)} bit for bit")


def main():
    a = parse_cli()
    hp, full, _ = ref.prepare_hf2nemo(a.hf_dir, a.tp, 1, "mcore", a.dtype)
    arrays = expected_arrays(full, hp)
    problems = []
    loaded, backend = load(a.nemo, lambda st, so: sharded_state_dict(arrays, hp.L, st, so), problems)
    compare(arrays, loaded, hp.L, problems)
    objects = [k for k in loaded if k.endswith("._extra_state")]
    if len(objects) != len(TE_MODULES) * hp.L or any(loaded[k] is not None for k in objects):
        problems.append(f"_extra_state: {len(objects)} objects loaded, expected {len(TE_MODULES) * hp.L} all None")
    finish(problems, f"OK megatron-core {version()} dist_checkpointing.load of {backend}, tp={a.tp} checkpoint read at tp=1: {len(arrays)} arrays over {hp.L} layers bit-identical, {len(objects)} extra-state objects None")

if __name__ == "__main__":
    main()
