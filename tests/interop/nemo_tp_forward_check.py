#!/usr/bin/env python3
"""Semantic check of a LLaMA .nemo (any converter, any tp/pp, mcore or legacy, non-distributed):
run a simulated Megatron tensor-parallel forward pass directly on the rank files and compare the
logits with HF transformers on the source checkpoint.

    nemo_tp_forward_check.py HF_DIR ANY.nemo [--tokens 1,5,17,...]

Independent of nemo_reference.py's conversion code (only its name tables and member names are
shared): each rank uses its local weights the way Megatron's layers do — vocab-parallel embedding
(rank t owns rows [t*Vp/tp, (t+1)*Vp/tp)), column-parallel fused QKV viewed as
[groups/tp, (hpg+2)*d] and split hpg*d | d | d (formats.md §3.4), row-parallel linear_proj / fc2
summed over ranks, local GLU fc1 = silu(first half) * second half (§3.5), column-parallel output
layer gathered over ranks and trimmed to the tokenizer vocabulary; pipeline stages in order with
stage-local layer indices (§4.4). Everything runs in fp32; the HF reference runs in fp32 on its weights rounded to the .nemo's
dtype, so a bf16/fp16 .nemo is held to the same tolerance.

Passes when max |logits - HF logits| <= 1e-4 * max |HF logit| (targets.md). Also reports whether
the padded vocabulary rows of the output layer are zero (informational: their content is
unspecified, §4.2). Prints "OK ..." or "FAIL ..."; exit 0/1.
"""

import argparse
import io
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import yaml  # noqa: E402

import nemo_reference as ref  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("hf_dir")
    ap.add_argument("nemo")
    ap.add_argument("--tokens", default="1,5,17,42,99,3,200,7,0,2,11,64")
    a = ap.parse_args()

    from transformers import LlamaForCausalLM

    cfg = json.load(open(Path(a.hf_dir) / "config.json"))
    hp = ref.HParams.from_hf(cfg)
    with ref.open_tar(a.nemo) as tar:
        y = yaml.safe_load(tar.extractfile("./model_config.yaml").read())
        y = y.get("model", y) if isinstance(y.get("model"), dict) else y
        layout = "mcore" if y.get("mcore_gpt") else "legacy"
        tp, pp = y.get("tensor_model_parallel_size", 1), y.get("pipeline_model_parallel_size", 1)
        R, dtypes = {}, set()
        for p in range(pp):
            for t in range(tp):
                try:
                    f = tar.extractfile(ref.member_name(t, p, tp, pp))
                except KeyError:
                    print(f"FAIL {a.nemo}: no member {ref.member_name(t, p, tp, pp)} (tp={tp} pp={pp} in the yaml)")
                    return 1
                sd = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
                dtypes |= {v.dtype for k, v in sd.items() if isinstance(v, torch.Tensor) and not k.endswith("inv_freq")}
                R[(t, p)] = {k: v.float() for k, v in sd.items() if isinstance(v, torch.Tensor)}
    label = f"{a.nemo} (tp={tp} pp={pp} {layout})"
    if len(dtypes) != 1:
        print(f"FAIL {label}: weights in several dtypes {sorted(map(str, dtypes))}")
        return 1
    (dtype,) = dtypes
    ids = torch.tensor([int(x) for x in a.tokens.split(",")])
    ids = ids[ids < hp.V]
    T = ids.numel()
    per = hp.L // pp
    hpg = hp.nh // hp.ng

    def w(role, t, p, i=None):
        return R[(t, p)][ref.nemo_name(role, layout, i)]

    def rms(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + hp.eps) * g

    inv = 1.0 / (hp.theta ** (torch.arange(0, hp.d, 2, dtype=torch.float64) / hp.d))
    pos = torch.arange(T, dtype=torch.float64) / (hp.rope_factor or 1.0)
    ang = torch.outer(pos, inv)
    ang = torch.cat([ang, ang], -1)
    cos, sin = ang.cos().float(), ang.sin().float()

    def rope(x):  # rotate-half, same as HF (§3.6)
        x1, x2 = x.chunk(2, -1)
        return x * cos + torch.cat([-x2, x1], -1) * sin

    x = torch.zeros(T, hp.H)
    for t in range(tp):  # vocab-parallel embedding: each rank adds its rows
        e = w("embedding", t, 0)
        lo = t * e.shape[0]
        m = (ids >= lo) & (ids < lo + e.shape[0])
        x[m] += e[ids[m] - lo]
    ngl = hp.ng // tp
    for l in range(hp.L):
        p, i = l // per, l % per
        h = rms(x, w("input_norm", 0, p, i))
        out = torch.zeros(T, hp.H)
        for t in range(tp):
            qkv = (h @ w("qkv", t, p, i).T).view(T, ngl, (hpg + 2) * hp.d)
            q, k, v = qkv.split([hpg * hp.d, hp.d, hp.d], -1)
            q = rope(q.reshape(T, ngl * hpg, hp.d).transpose(0, 1))
            k = rope(k.transpose(0, 1)).repeat_interleave(hpg, 0)
            v = v.transpose(0, 1).repeat_interleave(hpg, 0)
            att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            out += att.transpose(0, 1).reshape(T, -1) @ w("proj", t, p, i).T
        x = x + out
        h = rms(x, w("post_norm", 0, p, i))
        out = torch.zeros(T, hp.H)
        for t in range(tp):
            g, u = (h @ w("fc1", t, p, i).T).chunk(2, -1)
            out += (torch.nn.functional.silu(g) * u) @ w("fc2", t, p, i).T
        x = x + out
    x = rms(x, w("final_norm", 0, pp - 1))
    outs = [w("output", t, pp - 1) for t in range(tp)]
    logits = torch.cat([x @ o.T for o in outs], -1)[:, : hp.V]
    pad_zero = bool(torch.cat(outs)[hp.V :].eq(0).all())

    # reference: HF transformers in fp32 on the source weights rounded to the .nemo's dtype
    model = LlamaForCausalLM.from_pretrained(a.hf_dir, torch_dtype=torch.float32).eval()
    model = model.to(dtype).float()
    with torch.no_grad():
        want = model(ids[None]).logits[0]
    diff = (logits - want).abs().max().item()
    scale = want.abs().max().item()
    ok = diff <= 1e-4 * scale
    print(
        f"{'OK' if ok else 'FAIL'} {label}: max |logit diff| {diff:.3g} = {diff / scale:.2e} x max |logit| "
        f"(limit 1e-4), {T} tokens, weights {str(dtype).removeprefix('torch.')}; padded output rows {'all zero' if pad_zero else 'NOT all zero'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
