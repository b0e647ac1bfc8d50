#!/usr/bin/env python3
"""PyTorch CPU training-step baseline for `shardsmith bench train-step`: one optimizer step of a
llava-hf LlavaForConditionalGeneration with transformers + torch.optim.AdamW.

    pytorch_train_step.py --model DIR [--stage 1|2|lora] [--batch 4] [--seq 64] [--runs 5]
                          [--threads N] [--dtype f32|bf16] [--checkpointing]

What trains is set as in fixtures/gen/make_train_reference.py: stage 1 = the projector, stage 2 =
projector + language model + lm_head, lora = projector + rank-8 adapters (alpha 16, hand-written
like PEFT: y += (alpha/r) x A^T B^T) on every linear of the decoder layers — the adapters
`shardsmith bench train-step --stage lora` trains. The vision tower is frozen.

One step = zero_grad, forward, loss (mean next-token cross-entropy over labelled tokens, logits in
f32), backward, clip_grad_norm_(1.0), AdamW step (torch defaults, lr 1e-5). Parameters and AdamW
state are f32; with --dtype bf16 the forward and backward run under torch.autocast("cpu",
bfloat16) — f32 master weights with bf16 compute, as shardsmith's trainer does.

The batch is built like the Rust side (ids need not be identical, only shapes and work): per
sequence BOS, image_seq_length image tokens, then seeded ids in [3, 256); labels = ids on the text
after the image, -100 elsewhere; seeded pixel_values uniform in [-1, 1).

One warm-up step, then the median of --runs timed steps. stdout is one JSON line:
{"impl": "pytorch", "bench": "train_step", "model", "stage", "params_trainable", "threads",
 "dtype", "batch", "seq", "step_ms", ...}. Run with fixtures/gen/.venv/bin/python.
"""

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import LlavaForConditionalGeneration  # noqa: E402

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
LORA_R, LORA_ALPHA = 8, 16.0
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
transformers.utils.logging.disable_progress_bar()


class LoraLinear(torch.nn.Module):
    def __init__(self, base, gen):
        super().__init__()
        self.base = base
        bound = 1.0 / math.sqrt(base.in_features)
        self.lora_A = torch.nn.Parameter((torch.rand((LORA_R, base.in_features), generator=gen) * 2 - 1) * bound)
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, LORA_R))
        self.scale = LORA_ALPHA / LORA_R

    def forward(self, x):
        return self.base(x) + self.scale * (x @ self.lora_A.t()) @ self.lora_B.t()


def prepare(model, stage, seed):
    """Set requires_grad for the stage (adding LoRA adapters); returns the trainable parameters."""
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.model.multi_modal_projector.parameters():
        p.requires_grad_(True)
    if stage == "2":
        for p in model.model.language_model.parameters():
            p.requires_grad_(True)
        for p in model.lm_head.parameters():
            p.requires_grad_(True)
    if stage == "lora":
        gen = torch.Generator().manual_seed(seed)
        for layer in model.model.language_model.layers:
            for t in LORA_TARGETS:
                parent = layer.self_attn if hasattr(layer.self_attn, t) else layer.mlp
                setattr(parent, t, LoraLinear(getattr(parent, t), gen))
    return [p for p in model.parameters() if p.requires_grad]


def make_batch(cfg, batch, seq, seed):
    vc = cfg.vision_config
    n_img = cfg.image_seq_length
    grid = (vc.image_size // vc.patch_size) ** 2
    expect = grid if cfg.vision_feature_select_strategy == "default" else grid + 1
    if n_img != expect:
        raise SystemExit(f"pytorch_train_step: image_seq_length {n_img} != {expect} image features")
    text_from = 1 + n_img
    if seq < text_from + 2:
        raise SystemExit(f"pytorch_train_step: --seq must be >= {text_from + 2} (BOS + {n_img} image tokens + 2)")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (batch, seq), generator=gen, dtype=torch.int64)
    bos = cfg.get_text_config(decoder=True).bos_token_id
    ids[:, 0] = 1 if bos is None else bos
    ids[:, 1:text_from] = cfg.image_token_index
    labels = ids.clone()
    labels[:, :text_from] = -100
    pixels = torch.rand((batch, vc.num_channels, vc.image_size, vc.image_size), generator=gen) * 2 - 1
    return ids, labels, pixels


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="llava-hf directory")
    ap.add_argument("--stage", choices=["1", "2", "lora"], default="2")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5, help="timed steps after one warm-up")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="f32")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing of the decoder layers")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if min(args.batch, args.seq, args.runs, args.threads) < 1:
        ap.error("--batch, --seq, --runs and --threads must be >= 1")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32)
    load_s = time.perf_counter() - t0
    params = prepare(model, args.stage, args.seed)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, labels, pixels = make_batch(model.config, args.batch, args.seq, args.seed)
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16) if args.dtype == "bf16" else contextlib.nullcontext()
    )

    def step():
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast:
            logits = model(input_ids=ids, pixel_values=pixels, use_cache=False).logits
        logits = logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        loss.backward()
        t1 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        # (whole step, forward + backward, clipping, optimizer) milliseconds.
        return [(t3 - t) * 1e3, (t1 - t) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3]

    step()  # warm-up (also allocates the AdamW state)
    times = [step() for _ in range(args.runs)]
    phase = lambda i: round(statistics.median(t[i] for t in times), 3)
    print(
        json.dumps(
            {
                "impl": "pytorch",
                "bench": "train_step",
                "model": args.model,
                "stage": args.stage,
                "params_trainable": sum(p.numel() for p in params),
                "threads": args.threads,
                "dtype": args.dtype,
                "batch": args.batch,
                "seq": args.seq,
                "checkpointing": args.checkpointing,
                "runs": args.runs,
                "step_ms": phase(0),
                "forward_backward_ms": phase(1),
                "clip_ms": phase(2),
                "optimizer_ms": phase(3),
                "load_s": round(load_s, 3),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
