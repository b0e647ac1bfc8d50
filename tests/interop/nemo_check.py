#!/usr/bin/env python3
"""Check a .nemo archive the way NeMo 1.x opens it, with Python's tarfile, yaml and torch.

    nemo_check.py NEMO EXPECTED

NEMO      a .nemo file: a tar archive, plain or gzip-compressed (both are tried, plain first).
EXPECTED  either a directory or one .safetensors file.
  Directory: one safetensors file per weights member of the archive, named after the member path
  without the leading "./", with "/" replaced by "__" and ".ckpt" by ".safetensors":
      ./model_weights.ckpt                             -> model_weights.safetensors
      ./mp_rank_01/model_weights.ckpt                  -> mp_rank_01__model_weights.safetensors
      ./tp_rank_00_pp_rank_001/model_weights.ckpt      -> tp_rank_00_pp_rank_001__model_weights.safetensors
  plus, optionally, model_config.json: a JSON object that must be a subset of model_config.yaml
  (every key present with an equal value; nested objects compared the same way).
  Single file: allowed when the archive has exactly one weights member (tp = pp = 1).

Checks, each failure listed:
  * every member name is "." or starts with "./", has no ".." part, and is a file or directory;
    no duplicates;
  * ./model_config.yaml exists and yaml.safe_load gives a mapping; every "nemo:<name>" string
    in it names a member of the archive;
  * the weights members are exactly those that tensor_model_parallel_size and
    pipeline_model_parallel_size call for (formats.md §1.3); a distributed checkpoint
    (./model_weights/) is reported as unsupported;
  * each weights member, read from the archive in memory with
    torch.load(weights_only=True, map_location="cpu"), is a flat str -> tensor mapping whose
    "*._extra_state" values are None, and whose tensors match the expected file exactly
    (same names apart from _extra_state, dtype, shape, bytes).

Prints one summary line ("OK ..." or "FAIL ..." plus up to 30 problem lines) and exits 0 when
everything matches, 1 otherwise (2 for bad usage).
"""

import argparse
import io
import json
import sys
import tarfile
from pathlib import Path, PurePosixPath

import torch
import yaml
from safetensors import safe_open

WEIGHTS = "model_weights.ckpt"


def open_tar(path):
    """NeMo writes plain tar ('w:'); NeMo < 1.7 wrote tar.gz."""
    for mode, kind in (("r:", "tar"), ("r:gz", "tar.gz")):
        try:
            return tarfile.open(path, mode), kind
        except tarfile.ReadError:
            continue
    raise tarfile.ReadError(f"{path} is neither a tar nor a gzip-compressed tar")


def weight_members(tp, pp):
    """formats.md §1.3: which model_weights.ckpt files tp x pp calls for (names without './')."""
    if tp * pp == 1:
        return [WEIGHTS]
    if pp == 1:
        return [f"mp_rank_{t:02d}/{WEIGHTS}" for t in range(tp)]
    return [f"tp_rank_{t:02d}_pp_rank_{p:03d}/{WEIGHTS}" for p in range(pp) for t in range(tp)]


def expected_name(member):
    return member.replace("/", "__").removesuffix(".ckpt") + ".safetensors"


def nemo_refs(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from nemo_refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from nemo_refs(v)
    elif isinstance(node, str) and node.startswith("nemo:"):
        yield node[len("nemo:") :]


def subset_problems(want, have, path="model_config"):
    if isinstance(want, dict):
        if not isinstance(have, dict):
            return [f"{path}: expected a mapping, got {have!r}"]
        out = []
        for k, v in want.items():
            if k not in have:
                out.append(f"{path}.{k}: missing")
            else:
                out += subset_problems(v, have[k], f"{path}.{k}")
        return out
    return [] if want == have else [f"{path}: {have!r}, expected {want!r}"]


def as_bytes(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def check_state_dict(member, sd, expected_path, problems):
    """Returns the number of tensors compared."""
    if not isinstance(sd, dict):
        problems.append(f"{member}: top-level object is {type(sd).__name__}, expected a dict")
        return 0
    tensors = {}
    for k, v in sd.items():
        if not isinstance(k, str):
            problems.append(f"{member}: non-string key {k!r}")
        elif k.endswith("_extra_state"):
            if v is not None:
                problems.append(f"{member}: {k!r} is {type(v).__name__}, expected None")
        elif isinstance(v, torch.Tensor):
            tensors[k] = v
        else:
            problems.append(f"{member}: {k!r} is {type(v).__name__}, expected a tensor (flat state dict)")
    with safe_open(expected_path, "pt") as f:
        names = list(f.keys())
        for name in names:
            want = f.get_tensor(name)
            have = tensors.get(name)
            if have is None:
                problems.append(f"{member}: missing tensor {name!r}")
            elif have.dtype != want.dtype:
                problems.append(f"{member}: {name!r} dtype {have.dtype}, expected {want.dtype}")
            elif tuple(have.shape) != tuple(want.shape):
                problems.append(f"{member}: {name!r} shape {list(have.shape)}, expected {list(want.shape)}")
            elif not torch.equal(as_bytes(have), as_bytes(want)):
                problems.append(f"{member}: {name!r} bytes differ")
    for extra in sorted(set(tensors) - set(names)):
        problems.append(f"{member}: unexpected tensor {extra!r}")
    return len(names)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("nemo")
    ap.add_argument("expected", help="directory of <member>.safetensors files, or one .safetensors")
    args = ap.parse_args()
    expected = Path(args.expected)
    problems = []

    try:
        tar, kind = open_tar(args.nemo)
    except (OSError, tarfile.TarError) as e:
        print(f"FAIL {args.nemo}: cannot open: {e}")
        return 1
    with tar:
        members = tar.getmembers()
        by_name = {}
        for m in members:
            name = m.name
            if name != "." and not name.startswith("./"):
                problems.append(f"member {name!r} does not start with './'")
            if name.startswith("/") or ".." in PurePosixPath(name).parts:
                problems.append(f"member {name!r} escapes the archive")
            if not (m.isfile() or m.isdir()):
                problems.append(f"member {name!r} is neither a file nor a directory")
            norm = name[2:] if name.startswith("./") else name
            if norm in by_name:
                problems.append(f"duplicate member {name!r}")
            by_name[norm] = m

        cfg = None
        if "model_config.yaml" not in by_name:
            problems.append("no ./model_config.yaml")
        else:
            try:
                cfg = yaml.safe_load(tar.extractfile(by_name["model_config.yaml"]).read())
            except yaml.YAMLError as e:
                problems.append(f"model_config.yaml does not parse: {e}")
            if cfg is not None and not isinstance(cfg, dict):
                problems.append(f"model_config.yaml is a {type(cfg).__name__}, expected a mapping")
                cfg = None
        if cfg is not None:
            for ref in nemo_refs(cfg):
                if ref not in by_name:
                    problems.append(f"model_config.yaml refers to nemo:{ref}, which is not in the archive")
            cfg_json = expected / "model_config.json" if expected.is_dir() else None
            if cfg_json is not None and cfg_json.exists():
                problems += subset_problems(json.loads(cfg_json.read_text()), cfg)

        tp = int((cfg or {}).get("tensor_model_parallel_size", 1) or 1)
        pp = int((cfg or {}).get("pipeline_model_parallel_size", 1) or 1)
        present = sorted(n for n in by_name if n.endswith(WEIGHTS) and by_name[n].isfile())
        if "model_weights" in by_name and by_name["model_weights"].isdir():
            problems.append("distributed checkpoint (./model_weights/): not supported by this checker")
            present = []
        else:
            wanted = weight_members(tp, pp)
            for w in sorted(set(wanted) - set(present)):
                problems.append(f"tp={tp} pp={pp} needs ./{w}, which is missing")
            for w in sorted(set(present) - set(wanted)):
                problems.append(f"./{w} does not belong to a tp={tp} pp={pp} layout")

        if expected.is_dir():
            files = {w: expected / expected_name(w) for w in present}
            listed = {p.name for p in expected.glob("*.safetensors")}
            for stray in sorted(listed - {p.name for p in files.values()}):
                problems.append(f"expected file {stray} has no weights member in the archive")
        elif len(present) == 1:
            files = {present[0]: expected}
        else:
            files = {}
            problems.append(f"EXPECTED is one file but the archive has {len(present)} weights members")

        n_tensors = 0
        for member, exp in files.items():
            if not exp.exists():
                problems.append(f"no expected file {exp} for ./{member}")
                continue
            data = tar.extractfile(by_name[member]).read()
            try:
                sd = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
            except Exception as e:  # noqa: BLE001 - any refusal is a failed check
                lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
                msg = next((ln for ln in lines if "GLOBAL" in ln), lines[0] if lines else "")
                problems.append(f"./{member}: torch.load(weights_only=True) failed: {type(e).__name__}: {msg}")
                continue
            n_tensors += check_state_dict(member, sd, exp, problems)

    if problems:
        print(f"FAIL {args.nemo}: {len(problems)} problem(s)")
        for p in problems[:30]:
            print(f"  {p}")
        return 1
    print(
        f"OK {args.nemo}: {kind}, {len(members)} members, tp={tp} pp={pp}, "
        f"{len(files)} weights file(s), {n_tensors} tensors identical to {args.expected}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
