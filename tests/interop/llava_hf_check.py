#!/usr/bin/env python3
"""Check that transformers loads a llava-hf directory and reproduces llava-tiny's golden outputs.

    llava_hf_check.py HF_DIR GOLDEN [--atol 1e-5] [--vocab-cols N] [--template NAME]
                      [--generated JSON ... --image IMG]

HF_DIR  a llava-hf model directory (LlavaForConditionalGeneration), loaded offline in float32
        on the CPU.
GOLDEN  fixtures/llava-tiny/golden/golden.safetensors, or a directory holding golden/golden.safetensors.

Checks, each a failure when it does not hold:
* from_pretrained reports no missing, unexpected or shape-mismatched weight;
* get_image_features(pixel_values_pad) is within ATOL of image_features;
* for each prompt (input_ids_0, input_ids_1 with pixel_values_pad; input_ids_text without),
  the logits are within ATOL of logits_* (only the first N vocabulary columns with
  --vocab-cols N, for a model whose extra rows were re-initialised);
* the processor loads: its tokenizer maps <image> to config.image_token_index, and a prompt with
  <image> expands to image_seq_length image tokens;
* with --template vicuna_v1 or llama_2, apply_chat_template renders LLaVA's prompt string;
* with --generated (each a --json output of `shardsmith generate HF_DIR ... --image IMG --aspect
  square`; repeatable), the processor's ids for its rendered prompt and that image are its prompt_ids, and
  greedy model.generate continues with its new_ids.

Prints one summary line ("OK ..." or "FAIL ...") and exits 0 / 1.
"""

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoProcessor, LlavaForConditionalGeneration  # noqa: E402

transformers.logging.set_verbosity_error()
torch.set_num_threads(1)

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
EXPECTED_PROMPT = {
    "vicuna_v1": f"{SYSTEM} USER: <image>\nWhat is this? ASSISTANT:",
    "llama_2": f"[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\n<image>\nWhat is this? [/INST]",
}


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
    ap.add_argument("--vocab-cols", type=int, default=None)
    ap.add_argument("--template", default=None)
    ap.add_argument("--generated", action="append", default=[])
    ap.add_argument("--image", default=None)
    args = ap.parse_args()
    if args.generated and not args.image:
        ap.error("--generated needs --image")

    golden = load_file(str(golden_path(args.golden)))
    try:
        model, info = LlavaForConditionalGeneration.from_pretrained(
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
        problems.append(f"unexpected weight {key!r}")
    for item in info.get("mismatched_keys", []):
        problems.append(f"shape mismatch {item!r}")

    worst, compared = 0.0, []

    def compare(name, have, want):
        nonlocal worst
        if tuple(have.shape) != tuple(want.shape):
            problems.append(f"{name}: shape {list(have.shape)}, expected {list(want.shape)}")
            return
        diff = (have.float() - want.float()).abs().max().item() if want.numel() else 0.0
        worst = max(worst, diff)
        compared.append(name)
        if not diff <= args.atol:  # also catches NaN
            problems.append(f"{name}: max abs diff {diff:.3g} > {args.atol:g}")

    cols = slice(None) if args.vocab_cols is None else slice(0, args.vocab_cols)
    pixels = golden["pixel_values_pad"]
    try:
        with torch.no_grad():
            feats = model.get_image_features(pixel_values=pixels)
            feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
            compare("image_features", feats.reshape(golden["image_features"].shape), golden["image_features"])
            for name in ("0", "1", "text"):
                extra = {} if name == "text" else {"pixel_values": pixels}
                logits = model(golden[f"input_ids_{name}"], **extra).logits
                compare(f"logits_{name}", logits[..., cols], golden[f"logits_{name}"][..., cols])
    except Exception as e:  # noqa: BLE001
        problems.append(f"forward failed: {type(e).__name__}: {str(e).strip()[:300]}")

    try:
        processor = AutoProcessor.from_pretrained(args.hf_dir, local_files_only=True)
        image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
        if image_id != model.config.image_token_index:
            problems.append(f"tokenizer maps <image> to {image_id}, config says {model.config.image_token_index}")
        image = Image.new("RGB", (24, 40), (120, 60, 30))
        ids = processor(text="<image>\nhello", images=image, return_tensors="pt")["input_ids"][0]
        n = int((ids == model.config.image_token_index).sum())
        if n != model.config.image_seq_length:
            problems.append(f"processor expands <image> to {n} tokens, expected {model.config.image_seq_length}")
        if args.template:
            conv = [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
            ]
            text = processor.apply_chat_template(conv, add_generation_prompt=True)
            if text != EXPECTED_PROMPT[args.template]:
                problems.append(f"chat template renders {text!r}, expected {EXPECTED_PROMPT[args.template]!r}")
        for generated in args.generated:
            ours = json.loads(Path(generated).read_text())
            inputs = processor(text=ours["prompt"], images=Image.open(args.image).convert("RGB"), return_tensors="pt")
            prompt = inputs["input_ids"][0].tolist()
            if prompt != ours["prompt_ids"]:
                problems.append(f"prompt ids: transformers {prompt}, shardsmith {ours['prompt_ids']}")
            else:
                with torch.no_grad():
                    out = model.generate(**inputs, max_new_tokens=len(ours["new_ids"]), do_sample=False)
                new = out[0, len(prompt) :].tolist()
                if new != ours["new_ids"]:
                    problems.append(f"greedy new ids: transformers {new}, shardsmith {ours['new_ids']}")
                compared.append("generate")
    except Exception as e:  # noqa: BLE001
        problems.append(f"processor failed: {type(e).__name__}: {str(e).strip()[:300]}")

    if problems:
        print(f"FAIL {args.hf_dir}: {len(problems)} problem(s) against {args.golden}")
        for p in problems[:30]:
            print(f"  {p}")
        return 1
    print(f"OK {args.hf_dir}: llava, {len(compared)} outputs within {args.atol:g} of golden (max abs diff {worst:.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
