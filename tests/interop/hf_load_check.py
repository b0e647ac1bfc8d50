#!/usr/bin/env python3
"""Check that HF transformers loads a model directory and reproduces golden outputs.

    hf_load_check.py HF_DIR GOLDEN [--atol 1e-5]

HF_DIR  a HuggingFace model directory (config.json + safetensors or pytorch_model*.bin, sharded
        or not), loaded offline in float32 on the CPU.
GOLDEN  a golden.safetensors file, or a directory holding golden/golden.safetensors or
        golden.safetensors (as in fixtures/<model>/golden/).

model_type "llama" (AutoModelForCausalLM): for every input_ids_<i> in GOLDEN, model(input_ids)
.logits must be within ATOL (max abs) of logits_<i>.
model_type "clip_vision_model" (CLIPVisionModel): last_hidden_state on pixel_values, and
hidden_states_<k> when present, within ATOL.
Any missing, unexpected or shape-mismatched weight reported by from_pretrained is a failure
(transformers would otherwise fill missing weights randomly and carry on).

Prints one summary line ("OK ..." or "FAIL ...") and exits 0 / 1 (2 for bad usage).
"""

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, CLIPVisionModel  # noqa: E402

transformers.logging.set_verbosity_error()
torch.set_num_threads(1)

# Buffers some older checkpoints carry and transformers ignores; not a problem if unexpected.
IGNORABLE_UNEXPECTED = ("rotary_emb.inv_freq", "position_ids")


def golden_path(arg):
    p = Path(arg)
    for cand in (p, p / "golden" / "golden.safetensors", p / "golden.safetensors"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"no golden safetensors at {arg}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("hf_dir")
    ap.add_argument("golden")
    ap.add_argument("--atol", type=float, default=1e-5)
    args = ap.parse_args()

    golden = load_file(str(golden_path(args.golden)))
    model_type = json.loads((Path(args.hf_dir) / "config.json").read_text()).get("model_type")
    cls = CLIPVisionModel if model_type == "clip_vision_model" else AutoModelForCausalLM
    try:
        model, info = cls.from_pretrained(
            args.hf_dir, dtype=torch.float32, local_files_only=True, output_loading_info=True
        )
    except Exception as e:  # noqa: BLE001 - any refusal is a failed check
        print(f"FAIL {args.hf_dir}: from_pretrained failed: {type(e).__name__}: {str(e).strip()[:400]}")
        return 1
    model.eval()

    problems = []
    for key in info.get("missing_keys", []):
        problems.append(f"missing weight {key!r} (would be randomly initialised)")
    for key in info.get("unexpected_keys", []):
        if not key.endswith(IGNORABLE_UNEXPECTED):
            problems.append(f"unexpected weight {key!r}")
    for item in info.get("mismatched_keys", []):
        problems.append(f"shape mismatch {item!r}")

    worst, compared = 0.0, []

    def compare(name, have):
        nonlocal worst
        want = golden[name]
        if tuple(have.shape) != tuple(want.shape):
            problems.append(f"{name}: shape {list(have.shape)}, expected {list(want.shape)}")
            return
        diff = (have.float() - want.float()).abs().max().item() if want.numel() else 0.0
        worst = max(worst, diff)
        compared.append(name)
        if not diff <= args.atol:  # also catches NaN
            problems.append(f"{name}: max abs diff {diff:.3g} > {args.atol:g}")

    try:
        with torch.no_grad():
            if cls is CLIPVisionModel:
                out = model(pixel_values=golden["pixel_values"], output_hidden_states=True)
                compare("last_hidden_state", out.last_hidden_state)
                for k, h in enumerate(out.hidden_states):
                    if f"hidden_states_{k}" in golden:
                        compare(f"hidden_states_{k}", h)
            else:
                i = 0
                while f"input_ids_{i}" in golden:
                    compare(f"logits_{i}", model(golden[f"input_ids_{i}"]).logits)
                    i += 1
    except Exception as e:  # noqa: BLE001 - e.g. golden ids outside this model's vocabulary
        problems.append(f"forward failed: {type(e).__name__}: {str(e).strip()[:300]}")
    if not compared and not problems:
        problems.append("golden file has nothing this checker knows how to compare")

    if problems:
        print(f"FAIL {args.hf_dir}: {len(problems)} problem(s) against {args.golden}")
        for p in problems[:30]:
            print(f"  {p}")
        return 1
    print(f"OK {args.hf_dir}: {model_type}, {len(compared)} outputs within {args.atol:g} of golden (max abs diff {worst:.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
