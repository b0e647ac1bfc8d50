#!/usr/bin/env python3
"""Write a seeded LLaMA HF checkpoint for the forward benchmarks (bench/pytorch_forward.py and the
Rust side): config.json, generation_config.json and one f32 model.safetensors; no tokenizer.

    make_llama_100m.py --out DIR [--hidden 768] [--layers 12] [--heads 12] [--kv-heads 12]
                       [--ffn 2048] [--vocab 32000] [--seed 0]

Defaults: hidden 768, 12 layers, 12 heads, ffn 2048, vocab 32000, untied lm_head, rope_theta
10000 → 134.1M parameters (109.5M of them outside lm_head; about 537 MB in f32). Weights as
fixtures/gen/make_fixtures.py's reinit_ draws them (matrices N(0, 1/fan_in), norm scales
1 + N(0, 0.1²), embeddings N(0, 1)), from one seeded torch.Generator in the model's
named_parameters() order; the model is built on the meta device, so nothing else is allocated.
Deterministic: the same arguments give the same bytes.
"""

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --heads (multi-head attention)")
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads, max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, dtype="float32",
    )
    with torch.device("meta"):
        shapes = [(n, tuple(p.shape)) for n, p in LlamaForCausalLM(cfg).named_parameters()]

    gen = torch.Generator().manual_seed(args.seed)
    tensors = {}
    for name, shape in shapes:
        t = torch.randn(shape, generator=gen, dtype=torch.float32)
        if len(shape) == 1 and "norm" in name:
            t = 1.0 + 0.1 * t
        elif "embed_tokens" not in name:
            t /= shape[1] ** 0.5  # fan_in of a [out, in] linear weight
        tensors[name] = t

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(out)
    GenerationConfig.from_model_config(cfg).save_pretrained(out)
    n = sum(t.numel() for t in tensors.values())
    print(f"make_llama_100m: {out}: {len(tensors)} tensors, {n} parameters ({n / 1e6:.1f}M), f32", file=sys.stderr)


if __name__ == "__main__":
    main()
