#!/usr/bin/env python3
"""Compare a .nemo written by another converter (shardsmith) with the independent PyTorch
reference conversion of the same HF checkpoint (nemo_reference.py, the code behind
bench/pytorch_convert.py), rank by rank.

    nemo_reference_check.py HF_DIR OUR.nemo --tp N --pp M [--layout mcore|legacy]
                            [--dtype bf16|f16|f32] [--tokenizer PATH] [--inv-freq-ulps K]

HF_DIR   the HF LLaMA directory OUR.nemo was converted from (config.json, safetensors or .bin,
         tokenizer.model unless --tokenizer is given).
OUR.nemo the archive to check (plain tar, or gzip tar).
--dtype  the dtype OUR.nemo was converted to (default: the HF checkpoint's own dtype).
--inv-freq-ulps  accept the legacy rotary_pos_emb.inv_freq buffer within K units in the last place
         of NeMo's formula (default 0: bit-identical). NeMo computes it as
         1.0 / (base ** (torch.arange(0, d, 2).float() / d)) in fp32; torch's vectorised CPU pow is
         not correctly rounded, so an fp32 buffer computed in f64 and rounded (shardsmith) differs
         by 1 ulp in some elements (7B: 19 of 64). In bf16/fp16 the two agree. The OK line says
         how many buffers were accepted this way.

Checks (every failure is listed):
  * archive members: exactly ./model_config.yaml, the weights members tp x pp calls for
    (formats.md §1.3), one ./<32 hex>_tokenizer.model artifact whose bytes equal the HF
    tokenizer.model, and their directories; besides them (NeMo ignores members its config does
    not name) shardsmith keeps the HF tokenizer.json and tokenizer_config.json for converting
    back, as ./hf_tokenizer.json and ./hf_tokenizer_config.json: present exactly when HF_DIR has
    the file, with its bytes;
  * model_config.yaml: the fields that decide how NeMo loads the weights (tp, pp, mcore_gpt,
    transformer_engine, shapes, vocab divisor, precision, rope, tokenizer reference);
  * each rank file, loaded with torch.load(weights_only=True): same tensor names as the reference
    (keys ending in `_extra_state` ignored on both sides), same dtype and shape, bit-identical
    bytes. A mismatch names the rank member, the tensor, and what differs (count of differing
    elements, first differing index, max |diff|, max ULP distance, differing row ranges).

Prints one line "OK ..." or "FAIL ..." followed by the problem lines (at most 60); exit 0 when
everything matches, 1 otherwise, 2 for bad usage.
"""

import argparse
import io
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import yaml  # noqa: E402

import nemo_reference as ref  # noqa: E402

MAX_LINES = 60


def as_bytes(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def ranges(idx, limit=6):
    """[3,4,5,9] -> '3..5, 9'."""
    out, start, prev = [], None, None
    for i in idx:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            out.append((start, prev))
            start = prev = i
    if start is not None:
        out.append((start, prev))
    text = ", ".join(f"{a}" if a == b else f"{a}..{b}" for a, b in out[:limit])
    return text + (f", … ({len(out)} ranges)" if len(out) > limit else "")


def ulp_distance(a, b):
    """Max distance in units in the last place between two float tensors of one dtype."""
    if a.dtype == torch.float32:
        ia, ib = a.contiguous().view(torch.int32).long(), b.contiguous().view(torch.int32).long()
    elif a.dtype in (torch.float16, torch.bfloat16):
        ia, ib = a.contiguous().view(torch.int16).long(), b.contiguous().view(torch.int16).long()
    elif a.dtype == torch.float64:
        ia, ib = a.contiguous().view(torch.int64), b.contiguous().view(torch.int64)
    else:
        return None
    # map sign-magnitude to a monotonic integer line
    bits = a.element_size() * 8
    top = 1 << (bits - 1)
    ma = torch.where(ia < 0, -(ia + top), ia)
    mb = torch.where(ib < 0, -(ib + top), ib)
    return int((ma - mb).abs().max()) if ma.numel() else 0


def describe_diff(have, want):
    """Both same dtype/shape, bytes differ: say how."""
    hb = as_bytes(have).reshape(have.numel(), have.element_size()) if have.numel() else None
    wb = as_bytes(want).reshape(want.numel(), want.element_size()) if want.numel() else None
    diff = (hb != wb).any(dim=1)
    n = int(diff.sum())
    first = int(diff.nonzero()[0, 0])
    idx = []
    rem = first
    for s in reversed(have.shape):
        idx.append(rem % s)
        rem //= s
    idx = tuple(reversed(idx))
    parts = [f"{n}/{have.numel()} elements differ, first at {idx}"]
    if have.is_floating_point():
        h64, w64 = have.double().reshape(-1), want.double().reshape(-1)
        d = (h64[diff] - w64[diff]).abs()
        d = d[~torch.isnan(d)]
        if d.numel():
            parts.append(f"max |diff| {float(d.max()):.6g}")
        parts.append(f"got {float(h64[first]):.9g}, expected {float(w64[first]):.9g}")
        u = ulp_distance(have, want)
        if u is not None:
            parts.append(f"max {u} ulp")
    if have.dim() == 2:
        rows = diff.reshape(have.shape[0], have.shape[1]).any(dim=1).nonzero().flatten().tolist()
        parts.append(f"rows {ranges(rows)} of {have.shape[0]}")
    return "; ".join(parts)


def compare_rank(member, have_sd, want_sd, problems, inv_freq_ulps, tolerated):
    """Returns the number of tensors compared identical; tensors accepted only thanks to
    --inv-freq-ulps are appended to `tolerated` instead."""
    if not isinstance(have_sd, dict):
        problems.append(f"{member}: top-level object is {type(have_sd).__name__}, expected a dict")
        return 0
    have = {k: v for k, v in have_sd.items() if not (isinstance(k, str) and k.endswith("_extra_state"))}
    want = {k: v for k, v in want_sd.items() if not k.endswith("_extra_state")}
    for k in sorted(set(want) - set(have), key=str):
        problems.append(f"{member}: missing tensor {k} {tuple(want[k].shape)}")
    for k in sorted(set(have) - set(want), key=str):
        v = have[k]
        what = f"{tuple(v.shape)} {v.dtype}" if isinstance(v, torch.Tensor) else type(v).__name__
        problems.append(f"{member}: unexpected key {k!r} ({what})")
    same = 0
    for k in [k for k in want if k in have]:
        h, w = have[k], want[k]
        if not isinstance(h, torch.Tensor):
            problems.append(f"{member}: {k} is {type(h).__name__}, expected a tensor")
            continue
        if h.dtype != w.dtype:
            problems.append(f"{member}: {k} dtype {h.dtype}, expected {w.dtype}")
            continue
        if tuple(h.shape) != tuple(w.shape):
            problems.append(f"{member}: {k} shape {tuple(h.shape)}, expected {tuple(w.shape)}")
            continue
        if torch.equal(as_bytes(h), as_bytes(w)):
            same += 1
            continue
        if k == ref.LEGACY_INV_FREQ and inv_freq_ulps > 0 and (ulp_distance(h, w) or 0) <= inv_freq_ulps:
            tolerated.append(f"{member}: {k} within {ulp_distance(h, w)} ulp")
            continue
        problems.append(f"{member}: {k} {tuple(w.shape)} {str(w.dtype).removeprefix('torch.')}: {describe_diff(h, w)}")
    return same


def check_yaml(y, hp, tp, pp, layout, dtype, artifact, problems):
    if not isinstance(y, dict):
        problems.append(f"model_config.yaml: not a mapping ({type(y).__name__})")
        return
    if "model" in y and isinstance(y["model"], dict):
        y = y["model"]
    mcore = layout == "mcore"
    want = {
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "mcore_gpt": mcore,
        "transformer_engine": mcore,
        "num_layers": hp.L,
        "hidden_size": hp.H,
        "ffn_hidden_size": hp.F,
        "num_attention_heads": hp.nh,
        "make_vocab_size_divisible_by": ref.divisible_by(hp.V),
        "activation": "fast-swiglu",
        "normalization": "rmsnorm",
        "position_embedding_type": "rope",
        "bias": False,
        "share_embeddings_and_output_weights": False,
    }
    for k, v in want.items():
        if k not in y:
            problems.append(f"model_config.yaml: {k} missing, expected {v!r}")
        elif y[k] != v or type(y[k]) is not type(v):
            problems.append(f"model_config.yaml: {k} = {y[k]!r}, expected {v!r}")
    ng = y.get("num_query_groups")
    if (ng if ng is not None else hp.nh) != hp.ng:
        problems.append(f"model_config.yaml: num_query_groups = {ng!r}, expected {hp.ng}")
    kv = y.get("kv_channels")
    if (kv if kv is not None else hp.H // hp.nh) != hp.d:
        problems.append(f"model_config.yaml: kv_channels = {kv!r}, expected {hp.d} (or null when H/nh)")
    if ref.dtype_of_precision(y.get("precision", 32)) != dtype:
        problems.append(f"model_config.yaml: precision = {y.get('precision')!r}, expected one meaning {dtype}")
    for k, v in (("layernorm_epsilon", hp.eps), ("rotary_base", hp.theta)):
        got = y.get(k, 10000.0 if k == "rotary_base" else None)
        if not isinstance(got, (int, float)) or isinstance(got, bool) or not math.isclose(got, v, rel_tol=1e-9):
            problems.append(f"model_config.yaml: {k} = {got!r}, expected {v!r}")
    f = y.get("seq_len_interpolation_factor")
    if (f is None) != (hp.rope_factor is None) or (f is not None and not math.isclose(float(f), hp.rope_factor)):
        problems.append(f"model_config.yaml: seq_len_interpolation_factor = {f!r}, expected {hp.rope_factor!r}")
    for k in ("encoder_seq_length", "max_position_embeddings"):
        if y.get(k) != hp.max_pos:
            problems.append(f"model_config.yaml: {k} = {y.get(k)!r}, expected {hp.max_pos}")
    tok = (y.get("tokenizer") or {}) if isinstance(y.get("tokenizer"), dict) else {}
    if tok.get("library") != "sentencepiece":
        problems.append(f"model_config.yaml: tokenizer.library = {tok.get('library')!r}, expected 'sentencepiece'")
    if artifact is not None and tok.get("model") != f"nemo:{artifact}":
        problems.append(f"model_config.yaml: tokenizer.model = {tok.get('model')!r}, expected 'nemo:{artifact}'")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("hf_dir")
    ap.add_argument("nemo")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--layout", choices=["mcore", "legacy"], default="mcore")
    ap.add_argument("--dtype", choices=sorted(ref.DTYPES))
    ap.add_argument("--tokenizer")
    ap.add_argument("--inv-freq-ulps", type=int, default=0)
    a = ap.parse_args()

    label = f"{a.nemo} (tp={a.tp} pp={a.pp} {a.layout})"
    try:
        hp, full, dtype = ref.prepare_hf2nemo(a.hf_dir, a.tp, a.pp, a.layout, a.dtype)
    except (ref.ConvertError, OSError, KeyError) as e:
        print(f"FAIL {label}: reference conversion failed: {e}")
        return 1
    tok_path = Path(a.tokenizer) if a.tokenizer else Path(a.hf_dir) / "tokenizer.model"
    tok_bytes = tok_path.read_bytes() if tok_path.exists() else None

    problems = []
    try:
        tar = ref.open_tar(a.nemo)
    except (ref.ConvertError, OSError) as e:
        print(f"FAIL {label}: {e}")
        return 1
    with tar:
        members = {}
        for m in tar.getmembers():
            if m.name in members:
                problems.append(f"duplicate member {m.name!r}")
            members[m.name] = m
            if m.name != "." and not m.name.startswith("./"):
                problems.append(f"member {m.name!r} does not start with './' (NeMo tars a directory as '.')")
        by_name = {ref._strip(n): m for n, m in members.items()}
        files = {n for n, m in by_name.items() if m.isfile()}
        weights = [ref._strip(ref.member_name(t, p, a.tp, a.pp)) for p in range(a.pp) for t in range(a.tp)]
        artifacts = sorted(n for n in files if ref.ARTIFACT_RE.match(n))
        # The HF tokenizer files shardsmith keeps for converting back.
        kept = {
            f"hf_{name}": Path(a.hf_dir) / name
            for name in ("tokenizer.json", "tokenizer_config.json")
            if (Path(a.hf_dir) / name).is_file()
        }
        expected = set(weights) | {"model_config.yaml"} | set(artifacts) | set(kept)
        for n in sorted(set(weights) | {"model_config.yaml"} | set(kept)):
            if n not in files:
                problems.append(f"missing member ./{n}")
        for n, source in sorted(kept.items()):
            if n in files and tar.extractfile(by_name[n]).read() != source.read_bytes():
                problems.append(f"./{n}: bytes differ from {source}")
        for n in sorted(files - expected):
            problems.append(f"unexpected member ./{n}")
        for n, m in sorted(by_name.items()):
            if not (m.isfile() or m.isdir()):
                problems.append(f"member ./{n} is neither a file nor a directory")
        artifact = None
        if len(artifacts) != 1:
            problems.append(f"expected one <32hex>_tokenizer.model artifact, found {artifacts or 'none'}")
        else:
            artifact = artifacts[0]
            if tok_bytes is not None and tar.extractfile(by_name[artifact]).read() != tok_bytes:
                problems.append(f"./{artifact}: bytes differ from {tok_path}")
        if "model_config.yaml" in files:
            try:
                y = yaml.safe_load(tar.extractfile(by_name["model_config.yaml"]).read())
                check_yaml(y, hp, a.tp, a.pp, a.layout, dtype, artifact, problems)
            except yaml.YAMLError as e:
                problems.append(f"model_config.yaml: not valid YAML: {e}")

        compared, tolerated = 0, []
        for (t, p), member, want in ref.rank_state_dicts(full, hp, a.layout, a.tp, a.pp, dtype):
            name = ref._strip(member)
            if name not in files:
                continue
            try:
                have = torch.load(io.BytesIO(tar.extractfile(by_name[name]).read()), map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any load failure is a finding
                problems.append(f"{member}: torch.load(weights_only=True) failed: {type(e).__name__}: {e}")
                continue
            compared += compare_rank(member, have, want, problems, a.inv_freq_ulps, tolerated)
            del have, want

    if problems:
        print(f"FAIL {label}: {len(problems)} problem(s); {compared} tensors identical")
        for line in problems[:MAX_LINES]:
            print(f"  {line}")
        if len(problems) > MAX_LINES:
            print(f"  … {len(problems) - MAX_LINES} more")
        return 1
    extra = f"; {len(tolerated)} inv_freq buffer(s) within {a.inv_freq_ulps} ulp, not bit-identical" if tolerated else ""
    print(f"OK {label}: {len(weights)} rank file(s), {compared} tensors bit-identical to the PyTorch reference, dtype {str(dtype).removeprefix('torch.')}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
