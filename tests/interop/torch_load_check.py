#!/usr/bin/env python3
"""Check that PyTorch itself reads a checkpoint as expected.

    torch_load_check.py CKPT EXPECTED.safetensors

CKPT is loaded with torch.load(CKPT, weights_only=True, map_location="cpu") -- never with the
full unpickler, so a malicious file fails here instead of running code.

EXPECTED holds one contiguous tensor per tensor in CKPT, named by its path in the loaded object
with nested dict keys joined by "/" (a flat state dict's names are just its keys; Lightning's
{"state_dict": {"w": ...}} gives "state_dict/w"). Compared per tensor: name, dtype, shape and the
exact bytes (views and non-contiguous tensors compare by their values).

Non-tensor values: if EXPECTED's metadata has "non_tensors" (a JSON object, as written by
fixtures/gen/make_fixtures.py), the loaded non-tensor leaves must equal it exactly. Without it,
the only non-tensor values allowed are None under keys ending in "_extra_state". Either way a key
ending in "_extra_state" must hold None.

Prints one summary line ("OK ..." or "FAIL ..." plus up to 20 problem lines) and exits 0 when
everything matches, 1 otherwise (2 for bad usage).
"""

import argparse
import json
import sys

import torch
from safetensors import safe_open


def flatten(obj, prefix=""):
    flat = {}
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            flat.update(flatten(v, name + "/"))
        else:
            flat[name] = v
    return flat


def as_bytes(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def jsonable(v):
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    return v


def compare_tensors(got, expected_path):
    """Returns (problems, expected tensor count, total bytes, expected non-tensors or None)."""
    problems = []
    total = 0
    with safe_open(expected_path, "pt") as f:
        meta = f.metadata() or {}
        names = list(f.keys())
        for name in names:
            want = f.get_tensor(name)
            if name not in got:
                problems.append(f"missing tensor {name!r}")
                continue
            have = got[name]
            if not isinstance(have, torch.Tensor):
                problems.append(f"{name!r}: expected a tensor, got {type(have).__name__}")
                continue
            if have.dtype != want.dtype:
                problems.append(f"{name!r}: dtype {have.dtype}, expected {want.dtype}")
            elif tuple(have.shape) != tuple(want.shape):
                problems.append(f"{name!r}: shape {list(have.shape)}, expected {list(want.shape)}")
            elif not torch.equal(as_bytes(have), as_bytes(want)):
                diff = (as_bytes(have) != as_bytes(want)).nonzero()
                problems.append(f"{name!r}: bytes differ ({diff.numel()} of {want.nbytes}, first at byte {diff[0].item()})")
            total += want.nbytes
    non_tensors = json.loads(meta["non_tensors"]) if "non_tensors" in meta else None
    return problems, names, total, non_tensors


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("expected", help="safetensors file with the expected tensors")
    args = ap.parse_args()

    try:
        obj = torch.load(args.ckpt, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any refusal is a failed check
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        # torch's refusal is a paragraph; the line naming the offending GLOBAL is the useful one.
        first = next((ln for ln in lines if "GLOBAL" in ln), lines[0] if lines else "")
        print(f"FAIL {args.ckpt}: torch.load(weights_only=True) refused it: {type(e).__name__}: {first}")
        return 1
    if not isinstance(obj, dict):
        print(f"FAIL {args.ckpt}: top-level object is {type(obj).__name__}, expected a dict")
        return 1

    flat = flatten(obj)
    problems, names, total, non_tensors = compare_tensors(flat, args.expected)
    extra_tensors = sorted(k for k, v in flat.items() if isinstance(v, torch.Tensor) and k not in set(names))
    problems += [f"unexpected tensor {k!r}" for k in extra_tensors]

    others = {k: v for k, v in flat.items() if not isinstance(v, torch.Tensor)}
    for k, v in others.items():
        if k.endswith("_extra_state") and v is not None:
            problems.append(f"{k!r}: _extra_state is {type(v).__name__}, expected None")
    if non_tensors is not None:
        got = {k: jsonable(v) for k, v in others.items()}
        for k in sorted(set(got) | set(non_tensors)):
            if got.get(k, "<absent>") != non_tensors.get(k, "<absent>"):
                problems.append(f"non-tensor {k!r}: {got.get(k, '<absent>')!r}, expected {non_tensors.get(k, '<absent>')!r}")
    else:
        for k, v in others.items():
            if not (k.endswith("_extra_state") and v is None):
                problems.append(f"unexpected non-tensor {k!r} = {v!r}")

    n_extra = sum(k.endswith("_extra_state") for k in others)
    if problems:
        print(f"FAIL {args.ckpt}: {len(problems)} problem(s) against {args.expected}")
        for p in problems[:20]:
            print(f"  {p}")
        return 1
    print(
        f"OK {args.ckpt}: {len(names)} tensors ({total} bytes) identical to {args.expected}; "
        f"{len(others)} non-tensor values ({n_extra} _extra_state None)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
