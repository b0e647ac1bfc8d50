#!/usr/bin/env python3
"""PyTorch CPU forward baseline: prefill and KV-cached greedy decode of an HF LLaMA
(LlamaForCausalLM) or llava-hf (LlavaForConditionalGeneration) directory, with transformers.

    pytorch_forward.py --model DIR [--threads N] [--dtype f32|bf16] [--prompt-len 128]
                       [--decode 32] [--runs 5] [--image] [--seed 0]

Per run: one forward over the prompt (use_cache=True) = prefill, then --decode steps of one token
each through the KV cache (greedy argmax) = decode. One warm-up run first, then the medians over
--runs of the prefill time and of the mean per-token decode time. Inputs are deterministic: BOS +
seeded random ids in [3, V) (V = the text vocabulary; for LLaVA ids stop below image_token_index).
With --image (LLaVA only) the prompt holds image_seq_length image-token ids right after BOS and
the prefill gets seeded N(0, 1) pixel_values of the vision tower's size.

Runs with the fixtures venv: fixtures/gen/.venv/bin/python bench/pytorch_forward.py ...
stdout is one JSON line:
{"impl": "pytorch", "model", "params", "threads", "dtype", "prompt_len", "prefill_ms",
 "decode_ms_per_token", "tokens_per_s", ...extra fields}; tokens_per_s = decode tokens per second.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration  # noqa: E402

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
transformers.utils.logging.disable_progress_bar()


def load(model_dir, dtype):
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    if cfg.get("model_type") == "llava":
        model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model.eval(), cfg.get("model_type")


def make_inputs(model, arch, prompt_len, image, seed, dtype):
    """input_ids [1, prompt_len] and, with image, pixel_values [1, 3, S, S]."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    text = cfg.get_text_config(decoder=True)
    hi = text.vocab_size
    if arch == "llava":
        hi = min(hi, cfg.image_token_index)
    ids = torch.randint(3, hi, (1, prompt_len), generator=gen, dtype=torch.int64)
    bos = text.bos_token_id if text.bos_token_id is not None else 1
    ids[0, 0] = bos
    extra = {}
    if image:
        if arch != "llava":
            raise SystemExit("pytorch_forward: --image needs a llava-hf model")
        vc = cfg.vision_config
        n_img = cfg.image_seq_length
        grid = (vc.image_size // vc.patch_size) ** 2
        expect = grid if cfg.vision_feature_select_strategy == "default" else grid + 1
        if n_img != expect:
            raise SystemExit(f"pytorch_forward: image_seq_length {n_img} != {expect} image features")
        if prompt_len < n_img + 2:
            raise SystemExit(f"pytorch_forward: --prompt-len must be >= {n_img + 2} with --image")
        ids[0, 1 : 1 + n_img] = cfg.image_token_index
        pixels = torch.randn((1, vc.num_channels, vc.image_size, vc.image_size), generator=gen)
        extra["pixel_values"] = pixels.to(dtype)
    return ids, extra


@torch.inference_mode()
def one_run(model, ids, extra, decode):
    """(prefill seconds, [decode step seconds]) for one prompt; a fresh KV cache each run."""
    t0 = time.perf_counter()
    # Last-position logits only, as transformers' generate() asks for (and as shardsmith's
    # prefill computes): the head over every position would be 20 % more work on the 134M model.
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **extra)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    prefill = time.perf_counter() - t0
    past = out.past_key_values
    steps = []
    for _ in range(decode):
        t0 = time.perf_counter()
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        steps.append(time.perf_counter() - t0)
    return prefill, steps


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF LLaMA or llava-hf directory")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="f32")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32, help="decode steps (tokens) per run")
    ap.add_argument("--runs", type=int, default=5, help="timed runs after one warm-up")
    ap.add_argument("--image", action="store_true", help="LLaVA: image tokens + pixel_values in the prompt")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.prompt_len < 1 or args.decode < 1 or args.runs < 1 or args.threads < 1:
        ap.error("--prompt-len, --decode, --runs and --threads must be >= 1")

    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    t0 = time.perf_counter()
    model, arch = load(args.model, dtype)
    load_s = time.perf_counter() - t0
    ids, extra = make_inputs(model, arch, args.prompt_len, args.image, args.seed, dtype)

    one_run(model, ids, extra, args.decode)  # warm-up
    prefill, decode = [], []
    for _ in range(args.runs):
        p, steps = one_run(model, ids, extra, args.decode)
        prefill.append(p * 1e3)
        if steps:
            decode.append(sum(steps) * 1e3 / len(steps))
    prefill_ms = statistics.median(prefill)
    # No decode steps (--decode 0): null decode fields, as shardsmith prints them.
    decode_ms = statistics.median(decode) if decode else None
    print(
        json.dumps(
            {
                "impl": "pytorch",
                "model": args.model,
                "params": sum(p.numel() for p in model.parameters()),
                "threads": args.threads,
                "dtype": args.dtype,
                "prompt_len": args.prompt_len,
                "prefill_ms": round(prefill_ms, 3),
                "decode_ms_per_token": None if decode_ms is None else round(decode_ms, 3),
                "tokens_per_s": None if decode_ms is None else round(1e3 / decode_ms, 2),
                "prefill_tokens_per_s": round(args.prompt_len * 1e3 / prefill_ms, 1),
                "decode_tokens": args.decode,
                "runs": args.runs,
                "arch": arch,
                "image": args.image,
                "load_s": round(load_s, 3),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
