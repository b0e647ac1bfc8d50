#!/usr/bin/env python3
"""Self-test of the interop checkers: each must accept the committed fixtures (and .nemo files
built here the way NeMo builds them) and reject broken variants.

    fixtures/gen/.venv/bin/python tests/interop/selftest.py

Ends with the line "N passed, M failed"; exit status 0 only when nothing failed.
"""

import io
import subprocess
import sys
import tarfile
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
FIX = ROOT / "fixtures"
TORCH_FILES = ["all_dtypes.pt", "shared_storage.pt", "nested.ckpt", "extra_state.ckpt", "parameters.pt", "legacy.pt"]

results = []


def run(name, script, args, want_rc, must_not_contain=None):
    proc = subprocess.run(
        [sys.executable, str(HERE / script), *map(str, args)], capture_output=True, text=True, timeout=300
    )
    out = (proc.stdout + proc.stderr).strip()
    ok = proc.returncode == want_rc and (must_not_contain is None or must_not_contain not in out)
    results.append(ok)
    first = out.splitlines()[0] if out else ""
    print(f"{'pass' if ok else 'FAIL'}  {name}: rc={proc.returncode} (want {want_rc})  {first[:150]}")
    if not ok:
        print("      " + out.replace("\n", "\n      "))


def make_nemo(path, cfg, weights, compress=False, flat_names=False, extra_files=None):
    """weights: {member path without './': state dict}. Built like NeMo's
    _make_nemo_file_from_folder: a temp dir added with arcname '.'."""
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "model_config.yaml").write_text(yaml.safe_dump(cfg))
        for member, sd in weights.items():
            (d / member).parent.mkdir(parents=True, exist_ok=True)
            torch.save(sd, d / member)
        for name, data in (extra_files or {}).items():
            (d / name).write_bytes(data)
        with tarfile.open(path, "w:gz" if compress else "w:") as tar:
            if flat_names:
                for p in sorted(d.rglob("*")):
                    tar.add(p, arcname=p.relative_to(d).as_posix(), recursive=False)
            else:
                tar.add(d, arcname=".")


def nemo_cases(tmp):
    base = torch.load(FIX / "torch" / "extra_state.ckpt", weights_only=True)
    tensors = OrderedDict((k, v) for k, v in base.items() if not k.endswith("_extra_state"))

    def shard(rank, world):
        out = OrderedDict()
        for k, v in base.items():
            out[k] = None if v is None else v.chunk(world, dim=0)[rank].clone()
        return out

    def expected_for(sd):
        return {k: v.contiguous() for k, v in sd.items() if v is not None}

    tok = {"0123456789abcdef0123456789abcdef_tokenizer.model": b"not a real sentencepiece model"}
    cfg1 = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "precision": "bf16",
            "tokenizer": {"library": "sentencepiece", "model": "nemo:0123456789abcdef0123456789abcdef_tokenizer.model"}}

    # tp=1 pp=1, plain tar, single expected file and expected directory with a config subset.
    make_nemo(tmp / "tp1.nemo", cfg1, {"model_weights.ckpt": base}, extra_files=tok)
    save_file(expected_for(base), str(tmp / "tp1.safetensors"))
    (tmp / "tp1_dir").mkdir()
    save_file(expected_for(base), str(tmp / "tp1_dir" / "model_weights.safetensors"))
    (tmp / "tp1_dir" / "model_config.json").write_text('{"precision": "bf16", "tokenizer": {"library": "sentencepiece"}}')
    run("nemo tp1 plain, one expected file", "nemo_check.py", [tmp / "tp1.nemo", tmp / "tp1.safetensors"], 0)
    run("nemo tp1 plain, expected dir + config", "nemo_check.py", [tmp / "tp1.nemo", tmp / "tp1_dir"], 0)
    make_nemo(tmp / "tp1.tar.gz.nemo", cfg1, {"model_weights.ckpt": base}, compress=True, extra_files=tok)
    run("nemo tp1 gzip", "nemo_check.py", [tmp / "tp1.tar.gz.nemo", tmp / "tp1.safetensors"], 0)

    # tp=2 pp=1 (mp_rank_XX) and tp=2 pp=2 (tp_rank_XX_pp_rank_YYY).
    cfg2 = dict(cfg1, tensor_model_parallel_size=2)
    make_nemo(tmp / "tp2.nemo", cfg2, {f"mp_rank_{r:02d}/model_weights.ckpt": shard(r, 2) for r in range(2)}, extra_files=tok)
    (tmp / "tp2_dir").mkdir()
    for r in range(2):
        save_file(expected_for(shard(r, 2)), str(tmp / "tp2_dir" / f"mp_rank_{r:02d}__model_weights.safetensors"))
    run("nemo tp2", "nemo_check.py", [tmp / "tp2.nemo", tmp / "tp2_dir"], 0)
    cfg22 = dict(cfg2, pipeline_model_parallel_size=2)
    w22 = {f"tp_rank_{t:02d}_pp_rank_{p:03d}/model_weights.ckpt": shard(2 * p + t, 4) for p in range(2) for t in range(2)}
    make_nemo(tmp / "tp2pp2.nemo", cfg22, w22, extra_files=tok)
    (tmp / "tp2pp2_dir").mkdir()
    for member, sd in w22.items():
        save_file(expected_for(sd), str(tmp / "tp2pp2_dir" / (member.replace("/", "__")[: -len(".ckpt")] + ".safetensors")))
    run("nemo tp2 pp2", "nemo_check.py", [tmp / "tp2pp2.nemo", tmp / "tp2pp2_dir"], 0)

    # Rejections.
    bad = expected_for(base)
    name = next(iter(tensors))
    bad[name] = bad[name].clone()
    bad[name].view(-1)[0] += 1
    save_file(bad, str(tmp / "tp1_bad.safetensors"))
    run("nemo rejects changed tensor", "nemo_check.py", [tmp / "tp1.nemo", tmp / "tp1_bad.safetensors"], 1)
    make_nemo(tmp / "flat.nemo", cfg1, {"model_weights.ckpt": base}, flat_names=True, extra_files=tok)
    run("nemo rejects names without ./", "nemo_check.py", [tmp / "flat.nemo", tmp / "tp1.safetensors"], 1)
    make_nemo(tmp / "wrong_layout.nemo", cfg2, {"model_weights.ckpt": base}, extra_files=tok)
    run("nemo rejects tp=2 yaml with tp=1 files", "nemo_check.py", [tmp / "wrong_layout.nemo", tmp / "tp1.safetensors"], 1)
    make_nemo(tmp / "no_artifact.nemo", cfg1, {"model_weights.ckpt": base})
    run("nemo rejects missing nemo: artifact", "nemo_check.py", [tmp / "no_artifact.nemo", tmp / "tp1.safetensors"], 1)
    te = OrderedDict(base)
    te[next(k for k in base if k.endswith("_extra_state"))] = io.BytesIO(b"te state")
    make_nemo(tmp / "bytesio.nemo", cfg1, {"model_weights.ckpt": te}, extra_files=tok)
    run("nemo rejects BytesIO _extra_state", "nemo_check.py", [tmp / "bytesio.nemo", tmp / "tp1.safetensors"], 1)
    (tmp / "tp1_badcfg").mkdir()
    save_file(expected_for(base), str(tmp / "tp1_badcfg" / "model_weights.safetensors"))
    (tmp / "tp1_badcfg" / "model_config.json").write_text('{"precision": 16}')
    run("nemo rejects config mismatch", "nemo_check.py", [tmp / "tp1.nemo", tmp / "tp1_badcfg"], 1)
    run("nemo rejects expected files of another layout", "nemo_check.py", [tmp / "tp2.nemo", tmp / "tp1_dir"], 1)


def main():
    for f in TORCH_FILES:
        stem = f.rsplit(".", 1)[0]
        run(f"torch {f}", "torch_load_check.py", [FIX / "torch" / f, FIX / "torch" / f"{stem}.expected.safetensors"], 0)
    run("torch refuses evil.pt without running it", "torch_load_check.py",
        [FIX / "torch" / "evil.pt", FIX / "torch" / "legacy.expected.safetensors"], 1,
        must_not_contain="shardsmith-evil-fixture-was-executed")
    run("torch rejects wrong expectation", "torch_load_check.py",
        [FIX / "torch" / "legacy.pt", FIX / "torch" / "shared_storage.expected.safetensors"], 1)

    for d in ["llama-mha", "llama-gqa", "clip-vision"]:
        run(f"hf {d}", "hf_load_check.py", [FIX / d, FIX / d], 0)
    run("hf llama-gqa-bin vs llama-gqa golden", "hf_load_check.py", [FIX / "llama-gqa-bin", FIX / "llama-gqa"], 0)
    run("hf rejects another model's golden", "hf_load_check.py", [FIX / "llama-gqa", FIX / "llama-mha"], 1)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # A one-ulp change in one weight must be caught.
        d = tmp / "llama-mha-tampered"
        d.mkdir()
        for p in (FIX / "llama-mha").glob("*.json"):
            (d / p.name).write_bytes(p.read_bytes())
        w = load_file(str(FIX / "llama-mha" / "model.safetensors"))
        w["model.norm.weight"] = w["model.norm.weight"] * 1.01
        save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
        run("hf rejects changed weight", "hf_load_check.py", [d, FIX / "llama-mha"], 1)
        del w["lm_head.weight"]
        save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
        run("hf rejects missing weight", "hf_load_check.py", [d, FIX / "llama-mha"], 1)
        nemo_cases(tmp)

    passed, failed = results.count(True), results.count(False)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
