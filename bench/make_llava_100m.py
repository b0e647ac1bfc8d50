#!/usr/bin/env python3
"""Write a seeded llava-hf checkpoint for the train-step benchmarks (bench/train.sh): config.json,
generation_config.json and f32 safetensors via save_pretrained; no tokenizer or processor.

    make_llava_100m.py --out DIR [--seed 0]

Language model: the ~100M LLaMA of bench/make_llama_100m.py (hidden 768, 12 layers, 12 heads,
ffn 2048, untied lm_head, rope_theta 10000) with llava-1.5's vocabulary layout: vocab 32064,
image_token_index 32000, pad 32001. Vision tower: the small CLIP of fixtures/clip-vision (image
32, patch 8, hidden 48, 2 layers, 4 heads, ffn 96, quick_gelu) → 16 image tokens
(vision_feature_layer -2, "default" strategy drops CLS). Projector: mlp2x_gelu (48 → 768 → 768).
134.9M parameters, about 540 MB.

Weights as fixtures/gen/make_fixtures.py's reinit_ draws them (matrices N(0, 1/fan_in), norm
scales 1 + N(0, 0.1²), biases N(0, 0.1²), token and class embeddings N(0, 1), position
embeddings N(0, 0.5²)), from one seeded torch.Generator in named_parameters() order.
Deterministic: the same arguments give the same bytes.
"""

import argparse
import sys
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, GenerationConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN, PAD_TOKEN, VOCAB = 32000, 32001, 32064


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    text = LlamaConfig(
        vocab_size=VOCAB, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=PAD_TOKEN,
    )
    vision = CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=96, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=32,
        num_channels=3,
    )
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
        projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-2,
        image_seq_length=(32 // 8) ** 2, pad_token_id=PAD_TOKEN, tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    model = model.to_empty(device="cpu").float()

    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif p.ndim == 1 and "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif "embed_tokens" in name or "class_embedding" in name:
                p.copy_(noise)
            elif "position_embedding" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)
        # Buffers (CLIP's position_ids, rotary inv_freq) were left uninitialised by to_empty.
        vm = model.model.vision_tower.vision_model.embeddings
        vm.position_ids.copy_(torch.arange(vm.num_positions).unsqueeze(0))
        rotary = model.model.language_model.rotary_emb
        inv_freq, _ = rotary.rope_init_fn(rotary.config, "cpu")
        rotary.inv_freq.copy_(inv_freq)
        rotary.original_inv_freq = rotary.inv_freq

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.config.dtype = "float32"
    model.save_pretrained(out, safe_serialization=True, max_shard_size="2GB")
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=PAD_TOKEN).save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"make_llava_100m: {out}: {n} parameters ({n / 1e6:.1f}M), f32", file=sys.stderr)


if __name__ == "__main__":
    main()
