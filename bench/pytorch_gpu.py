"""PyTorch baselines for bench/gpu.sh: the same work as `shardsmith bench gpu-layer | gemm |
attention | decode | neva-step`, same shapes, same FLOP counts, same JSON line shape
("impl": "pytorch...").

Random weights are made on the device (std 0.02; norm weights ones, biases zeros), nothing is
read from disk or downloaded. Models are written out here in plain PyTorch (no transformers):
LLaMA decoder layers (RMSNorm in f32, rotate-half rope, SDPA causal attention, SwiGLU), CLIP
ViT (pre-LN, quick-GELU) and the mlp2x_gelu projector.

    python3 bench/pytorch_gpu.py gpu-layer|gemm|attention|decode|neva-step [flags]
    python3 bench/pytorch_gpu.py all --tiny     # CPU smoke test of every bench at toy sizes

Timing: wall clock around each call with the device synchronised; median of --runs after
--warmup untimed runs (ours does the same).
"""
import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev, runs, warmup):
    for _ in range(warmup):
        fn()
    sync(dev)
    ts = []
    for _ in range(max(runs, 1)):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def emit(**kv):
    print(json.dumps(kv), flush=True)


# --------------------------------------------------------------------------------------------
# LLaMA
# --------------------------------------------------------------------------------------------


def rms_norm(x, w, eps=1e-5):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope_tables(n, d, dev, dtype, theta=10000.0):
    inv = 1.0 / theta ** (torch.arange(0, d, 2, device=dev, dtype=torch.float32) / d)
    ang = torch.arange(n, device=dev, dtype=torch.float32)[:, None] * inv[None]
    return ang.cos().to(dtype), ang.sin().to(dtype)  # [n, d/2]


def rope(x, cos, sin):  # x [B, H, T, D], cos/sin [T, D/2]
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


class Layer:
    """One LLaMA decoder layer's weights (nn.Linear layout [out, in])."""

    def __init__(self, s, dev, dtype, grad):
        h, d = s.hidden, s.hidden // s.heads

        def w(o, i):
            return (torch.randn(o, i, device=dev, dtype=dtype) * 0.02).requires_grad_(grad)

        self.heads, self.kv, self.d = s.heads, s.kv_heads, d
        self.q, self.k, self.v = w(s.heads * d, h), w(s.kv_heads * d, h), w(s.kv_heads * d, h)
        self.o = w(h, s.heads * d)
        self.gate, self.up, self.down = w(s.ffn, h), w(s.ffn, h), w(h, s.ffn)
        self.n1 = torch.ones(h, device=dev, dtype=dtype).requires_grad_(grad)
        self.n2 = torch.ones(h, device=dev, dtype=dtype).requires_grad_(grad)

    def qkv(self, x, cos, sin):
        b, t, _ = x.shape
        y = rms_norm(x, self.n1)
        q = F.linear(y, self.q).view(b, t, self.heads, self.d).transpose(1, 2)
        k = F.linear(y, self.k).view(b, t, self.kv, self.d).transpose(1, 2)
        v = F.linear(y, self.v).view(b, t, self.kv, self.d).transpose(1, 2)
        return rope(q, cos, sin), rope(k, cos, sin), v

    def rest(self, x, a):
        b, t, _ = x.shape
        x = x + F.linear(a.transpose(1, 2).reshape(b, t, -1), self.o)
        y = rms_norm(x, self.n2)
        return x + F.linear(F.silu(F.linear(y, self.gate)) * F.linear(y, self.up), self.down)

    def forward(self, x, cos, sin):
        q, k, v = self.qkv(x, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv != self.heads)
        return self.rest(x, a)


def linear_flops_per_token(s):
    d = s.hidden // s.heads
    return 2 * (s.hidden * (2 * s.heads + 2 * s.kv_heads) * d + 3 * s.hidden * s.ffn)


def bench_gpu_layer(a, dev, dtype):
    layers = [Layer(a, dev, dtype, True) for _ in range(a.layers)]
    cos, sin = rope_tables(a.seq, a.hidden // a.heads, dev, dtype)
    x = torch.randn(a.batch, a.seq, a.hidden, device=dev, dtype=dtype, requires_grad=True)
    ones = torch.ones(a.batch, a.seq, a.hidden, device=dev, dtype=dtype)
    params = [p for l in layers for p in vars(l).values() if torch.is_tensor(p)] + [x]

    def step():
        y = x
        for l in layers:
            y = l.forward(y, cos, sin)
        y.backward(ones)
        for p in params:
            p.grad = None

    def step_ckpt():
        from torch.utils.checkpoint import checkpoint

        y = x
        for l in layers:
            y = checkpoint(l.forward, y, cos, sin, use_reentrant=False)
        y.backward(ones)
        for p in params:
            p.grad = None

    tokens = a.batch * a.seq
    attn = 4 * a.batch * a.heads * a.seq * a.seq * (a.hidden // a.heads) / 2
    flops = 3 * a.layers * (tokens * linear_flops_per_token(a) + attn)
    for impl, fn in [("pytorch", step), ("pytorch_ckpt", step_ckpt)]:
        secs = timed(fn, dev, a.runs, a.warmup)
        emit(impl=impl, bench="gpu_layer", device=dev.type, dtype=a.dtype,
             layers=a.layers, hidden=a.hidden, batch=a.batch, seq=a.seq,
             step_ms=secs * 1e3, tflops=flops / secs / 1e12)


def bench_gemm(a, dev, dtype):
    """The products of a layer's training step (as `shardsmith bench gemm`): per projection the
    forward x·Wᵀ, the input gradient dy·W and the weight gradient dyᵀ·x in f32 (torch.mm
    with out_dtype where this PyTorch has it, else the bf16 product widened, as autograd into f32
    master weights would see it); then square products."""
    d = a.hidden // a.heads
    projections = [("qkv", a.hidden, (a.heads + 2 * a.kv_heads) * d), ("o", a.heads * d, a.hidden),
                   ("gate_up", a.hidden, 2 * a.ffn), ("down", a.ffn, a.hidden)]
    rn = lambda *shape: torch.randn(*shape, device=dev, dtype=dtype)  # noqa: E731

    def out(name, op, m, n, k, secs, **extra):
        emit(impl="pytorch", bench="gemm", device=dev.type, dtype=a.dtype, name=name, op=op, m=m, n=n, k=k,
             ms=secs * 1e3, tflops=2.0 * m * n * k / secs / 1e12, **extra)

    # torch.mm(out_dtype=float32) from bf16 operands exists in recent PyTorch on CUDA only: asked
    # once, and the answer goes into every weight-gradient line ("f32_out").
    f32_out = False
    if dtype != torch.float32 and dev.type == "cuda":
        probe = torch.ones(2, 2, device=dev, dtype=dtype)
        try:
            torch.mm(probe, probe, out_dtype=torch.float32)
            f32_out = True
        except (TypeError, RuntimeError, NotImplementedError) as e:
            print(f"bench gemm: torch.mm(out_dtype=float32) unavailable here ({e}); weight gradients "
                  "are the bf16 product widened", file=sys.stderr)

    def wide(x, y):
        return torch.mm(x, y, out_dtype=torch.float32) if f32_out else torch.mm(x, y).float()

    r = a.rows
    for name, fan_in, fan_out in projections:
        x, w, dy = rn(r, fan_in), rn(fan_out, fan_in), rn(r, fan_out)
        out(name, "x·Wᵀ", r, fan_out, fan_in, timed(lambda: torch.mm(x, w.t()), dev, a.runs, a.warmup))
        out(name, "dy·W", r, fan_in, fan_out, timed(lambda: torch.mm(dy, w), dev, a.runs, a.warmup))
        out(name, "dyᵀ·x (f32)", fan_out, fan_in, r, timed(lambda: wide(dy.t(), x), dev, a.runs, a.warmup),
            f32_out=f32_out)
    for n in a.square:
        x, y = rn(n, n), rn(n, n)
        out("square", "a·b", n, n, n, timed(lambda: torch.mm(x, y), dev, a.runs, a.warmup))


def bench_attention(a, dev, dtype):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    d = a.head_dim
    q = torch.randn(a.batch, a.heads, a.seq, d, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(a.batch, a.kv_heads, a.seq, d, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(a.batch, a.kv_heads, a.seq, d, device=dev, dtype=dtype, requires_grad=True)
    g = torch.randn(a.batch, a.heads, a.seq, d, device=dev, dtype=dtype)
    gqa = a.kv_heads != a.heads
    flops = 4 * a.batch * a.heads * a.seq * a.seq * d / 2
    backends = [("pytorch", None)]
    if dev.type == "cuda":
        backends += [("pytorch_flash", SDPBackend.FLASH_ATTENTION), ("pytorch_cudnn", SDPBackend.CUDNN_ATTENTION)]
    for impl, be in backends:
        def fwd():
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

        def fwd_bwd():
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            torch.autograd.grad(o, (q, k, v), g)

        try:
            if be is None:
                tf, tfb = timed(fwd, dev, a.runs, a.warmup), timed(fwd_bwd, dev, a.runs, a.warmup)
            else:
                with sdpa_kernel(be):
                    tf, tfb = timed(fwd, dev, a.runs, a.warmup), timed(fwd_bwd, dev, a.runs, a.warmup)
        except RuntimeError as e:  # a backend that does not take these shapes
            print(f"# {impl}: {str(e).splitlines()[0]}", file=sys.stderr)
            continue
        emit(impl=impl, bench="attention", device=dev.type, dtype=a.dtype,
             batch=a.batch, heads=a.heads, kv_heads=a.kv_heads, seq=a.seq, head_dim=d,
             fwd_ms=tf * 1e3, fwd_bwd_ms=tfb * 1e3,
             tflops_fwd=flops / tf / 1e12, tflops_fwd_bwd=3.5 * flops / tfb / 1e12)


class Llama:
    """A synthetic LLaMA for decoding, with a static KV cache [B, G, Smax, D] per layer."""

    def __init__(self, s, dev, dtype):
        self.s, self.dev, self.dtype = s, dev, dtype
        self.layers = [Layer(s, dev, dtype, False) for _ in range(s.layers)]
        self.embed = torch.randn(s.vocab, s.hidden, device=dev, dtype=dtype) * 0.02
        self.head = torch.randn(s.vocab, s.hidden, device=dev, dtype=dtype) * 0.02
        self.norm = torch.ones(s.hidden, device=dev, dtype=dtype)

    def alloc(self, b, smax):
        d = self.s.hidden // self.s.heads
        shape = (b, self.s.kv_heads, smax, d)
        self.kc = [torch.zeros(shape, device=self.dev, dtype=self.dtype) for _ in self.layers]
        self.vc = [torch.zeros(shape, device=self.dev, dtype=self.dtype) for _ in self.layers]
        self.cos, self.sin = rope_tables(smax, d, self.dev, self.dtype)
        self.smax = smax

    @torch.no_grad()
    def prefill(self, ids):  # [B, T] -> next ids [B, 1]
        t = ids.shape[1]
        x = self.embed[ids]
        cos, sin = self.cos[:t], self.sin[:t]
        for i, l in enumerate(self.layers):
            q, k, v = l.qkv(x, cos, sin)
            self.kc[i][:, :, :t] = k
            self.vc[i][:, :, :t] = v
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=l.kv != l.heads)
            x = l.rest(x, a)
        return F.linear(rms_norm(x[:, -1:], self.norm), self.head).argmax(-1)

    @torch.no_grad()
    def step(self, ids, pos):
        """Eager decode step at python int `pos`: attends over the cache's first pos + 1 rows."""
        x = self.embed[ids]
        cos, sin = self.cos[pos : pos + 1], self.sin[pos : pos + 1]
        for i, l in enumerate(self.layers):
            q, k, v = l.qkv(x, cos, sin)
            self.kc[i][:, :, pos : pos + 1] = k
            self.vc[i][:, :, pos : pos + 1] = v
            a = F.scaled_dot_product_attention(q, self.kc[i][:, :, : pos + 1], self.vc[i][:, :, : pos + 1],
                                               enable_gqa=l.kv != l.heads)
            x = l.rest(x, a)
        return F.linear(rms_norm(x, self.norm), self.head).argmax(-1)

    @torch.no_grad()
    def step_static(self, ids, pos):
        """The same step with `pos` a device tensor [1] (capturable in a CUDA graph): writes with
        index_copy_, attends over the whole cache under a mask of the filled positions."""
        x = self.embed[ids]
        cos, sin = self.cos.index_select(0, pos), self.sin.index_select(0, pos)
        mask = (torch.arange(self.smax, device=self.dev) <= pos)[None, None, None, :]
        for i, l in enumerate(self.layers):
            q, k, v = l.qkv(x, cos, sin)
            self.kc[i].index_copy_(2, pos, k)
            self.vc[i].index_copy_(2, pos, v)
            a = F.scaled_dot_product_attention(q, self.kc[i], self.vc[i], attn_mask=mask,
                                               enable_gqa=l.kv != l.heads)
            x = l.rest(x, a)
        return F.linear(rms_norm(x, self.norm), self.head).argmax(-1)


def bench_decode(a, dev, dtype):
    m = Llama(a, dev, dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    for b in a.batch:
        ids = torch.randint(3, a.vocab, (b, a.prompt_len), generator=g).to(dev)
        m.alloc(b, a.prompt_len + a.steps + 1)

        def eager(steps):
            t0 = time.perf_counter()
            nxt = m.prefill(ids).tolist()
            pre = time.perf_counter() - t0
            t1 = time.perf_counter()
            for i in range(steps):
                # Back to the host every step, as ours (and any sampler on the host) does.
                nxt = m.step(torch.tensor(nxt, device=dev), a.prompt_len + i).tolist()
            return pre, time.perf_counter() - t1

        variants = [("pytorch", eager)]
        if dev.type == "cuda" and not a.no_graphs:
            static_ids = torch.zeros(b, 1, dtype=torch.long, device=dev)
            static_pos = torch.zeros(1, dtype=torch.long, device=dev)
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    m.step_static(static_ids, static_pos)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = m.step_static(static_ids, static_pos)

            def graphed(steps):
                t0 = time.perf_counter()
                nxt = m.prefill(ids)
                sync(dev)
                pre = time.perf_counter() - t0
                t1 = time.perf_counter()
                for i in range(steps):
                    static_ids.copy_(nxt)
                    static_pos.fill_(a.prompt_len + i)
                    graph.replay()
                    nxt = static_out
                    nxt.tolist()  # the same per-token host read as the eager loop
                return pre, time.perf_counter() - t1

            variants.append(("pytorch_cudagraph", graphed))
        for impl, run in variants:
            for _ in range(a.warmup):
                run(min(a.steps, 8))
            res = [run(a.steps) for _ in range(max(a.runs, 1))]
            pre = statistics.median(r[0] for r in res)
            dec = statistics.median(r[1] for r in res)
            emit(impl=impl, bench="decode", device=dev.type, dtype=a.dtype,
                 layers=a.layers, hidden=a.hidden, batch=b, prompt_len=a.prompt_len, steps=a.steps,
                 prefill_ms=pre * 1e3, ms_per_step=dec / a.steps * 1e3, tokens_per_s=b * a.steps / dec)


# --------------------------------------------------------------------------------------------
# NeVA stage 1
# --------------------------------------------------------------------------------------------


class Clip:
    """CLIP ViT (pre-LN, quick-GELU), frozen; returns layer -2's hidden states without CLS."""

    def __init__(self, a, dev, dtype):
        c = a.vision_hidden

        def w(*shape):
            return torch.randn(*shape, device=dev, dtype=dtype) * 0.02

        def ones():
            return torch.ones(c, device=dev, dtype=dtype)

        def zeros(n=c):
            return torch.zeros(n, device=dev, dtype=dtype)

        self.a, self.patch = a, a.patch
        self.conv = w(c, 3, a.patch, a.patch)
        self.cls = w(c)
        n = (a.image_size // a.patch) ** 2 + 1
        self.pos = w(n, c)
        self.pre = (ones(), zeros())
        self.layers = [
            dict(ln1=(ones(), zeros()), ln2=(ones(), zeros()),
                 qkv=(w(3 * c, c), zeros(3 * c)), o=(w(c, c), zeros()),
                 fc1=(w(a.vision_intermediate, c), zeros(a.vision_intermediate)), fc2=(w(c, a.vision_intermediate), zeros()))
            for _ in range(a.vision_layers)
        ]

    @torch.no_grad()
    def features(self, px):
        a = self.a
        x = F.conv2d(px.to(self.conv.dtype), self.conv, stride=self.patch).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], 1, -1), x], 1) + self.pos
        c = x.shape[-1]
        x = F.layer_norm(x, (c,), *self.pre)
        # hidden_states[-2]: the output of all but the last layer.
        for l in self.layers[: len(self.layers) - 1]:
            y = F.layer_norm(x, (c,), *l["ln1"])
            b, t, _ = y.shape
            q, k, v = F.linear(y, *l["qkv"]).view(b, t, 3, a.vision_heads, -1).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, c)
            x = x + F.linear(y, *l["o"])
            y = F.linear(F.layer_norm(x, (c,), *l["ln2"]), *l["fc1"])
            x = x + F.linear(y * torch.sigmoid(1.702 * y), *l["fc2"])
        return x[:, 1:]


def bench_neva_step(a, dev, dtype):
    llm = Llama(a, dev, dtype)
    clip = Clip(a, dev, dtype)
    proj = [torch.nn.Linear(a.vision_hidden, a.hidden, device=dev), torch.nn.Linear(a.hidden, a.hidden, device=dev)]
    for p in proj:  # f32 masters, as ours
        torch.nn.init.normal_(p.weight, std=0.02)
        torch.nn.init.zeros_(p.bias)
    params = [p for l in proj for p in l.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    n = (a.image_size // a.patch) ** 2
    image_token = a.vocab - 1
    g = torch.Generator(device="cpu").manual_seed(0)
    text = torch.randint(3, 256, (a.batch, a.seq - 1 - n), generator=g)
    ids = torch.cat([torch.ones(a.batch, 1, dtype=torch.long), torch.full((a.batch, n), image_token), text], 1).to(dev)
    labels = ids.clone()
    labels[:, : 1 + n] = -100
    px = (torch.rand(a.batch, 3, a.image_size, a.image_size, device=dev) * 2 - 1)
    cos, sin = rope_tables(a.seq, a.hidden // a.heads, dev, dtype)
    loss_box = [0.0]

    def step():
        feats = clip.features(px)
        f = proj[1](F.gelu(proj[0](feats.float()))).to(dtype)  # [B, N, H]
        x = llm.embed[ids]
        x = torch.cat([x[:, :1], f, x[:, 1 + n :]], 1)
        for l in llm.layers:
            x = l.forward(x, cos, sin)
        logits = F.linear(rms_norm(x, llm.norm), llm.head).float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, a.vocab), labels[:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_box[0] = loss.item()

    secs = timed(step, dev, a.runs, a.warmup)
    emit(impl="pytorch", bench="neva_step", device=dev.type, dtype=a.dtype, stage="1",
         llm_layers=a.layers, vision_layers=a.vision_layers, batch=a.batch, seq=a.seq, checkpointing=False,
         loss=loss_box[0], step_ms=secs * 1e3, tokens_per_s=a.batch * a.seq / secs)


# --------------------------------------------------------------------------------------------


def add_llama(p, layers):
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--ffn", type=int, default=11008)
    p.add_argument("--vocab", type=int, default=32000)


def add_common(p):
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)


def parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("gpu-layer")
    add_llama(p, 4), add_common(p)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=4096)
    p = sub.add_parser("gemm")
    add_llama(p, 1), add_common(p)
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--square", type=lambda s: [int(x) for x in s.split(",") if x], default=[4096, 8192])
    p = sub.add_parser("attention")
    add_common(p)
    for k, v in [("batch", 2), ("heads", 32), ("kv-heads", 32), ("seq", 4096), ("head-dim", 128)]:
        p.add_argument(f"--{k}", type=int, default=v)
    p = sub.add_parser("decode")
    add_llama(p, 32), add_common(p)
    p.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--no-graphs", action="store_true")
    p = sub.add_parser("neva-step")
    add_llama(p, 32), add_common(p)
    for k, v in [("vision-layers", 24), ("vision-hidden", 1024), ("vision-heads", 16),
                 ("vision-intermediate", 4096), ("image-size", 336), ("patch", 14), ("batch", 4), ("seq", 640)]:
        p.add_argument(f"--{k}", type=int, default=v)
    p = sub.add_parser("all", help="every bench at toy sizes on the CPU (--tiny): a smoke test")
    p.add_argument("--tiny", action="store_true", required=True)
    return ap


TINY_LLAMA = ["--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--ffn", "172", "--vocab", "300"]
TINY_COMMON = ["--device", "cpu", "--dtype", "f32", "--runs", "2"]
TINY = {
    "gpu-layer": TINY_LLAMA + TINY_COMMON + ["--batch", "2", "--seq", "16"],
    "gemm": TINY_LLAMA + TINY_COMMON + ["--rows", "32", "--square", "48"],
    "attention": TINY_COMMON + ["--batch", "1", "--heads", "4", "--kv-heads", "2", "--seq", "16", "--head-dim", "16"],
    "decode": TINY_LLAMA + TINY_COMMON + ["--batch", "1,3", "--prompt-len", "5", "--steps", "4"],
    "neva-step": TINY_LLAMA + TINY_COMMON + ["--vision-layers", "2", "--vision-hidden", "32", "--vision-heads", "2",
                                             "--vision-intermediate", "64", "--image-size", "28", "--patch", "14",
                                             "--batch", "2", "--seq", "12"],
}

RUN = {"gpu-layer": bench_gpu_layer, "gemm": bench_gemm, "attention": bench_attention, "decode": bench_decode, "neva-step": bench_neva_step}


def main(argv):
    a = parser().parse_args(argv)
    if a.cmd == "all":
        for cmd, flags in TINY.items():
            main([cmd] + flags)
        return
    torch.manual_seed(0)
    dev = torch.device(a.device)
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[a.dtype]
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    RUN[a.cmd](a, dev, dtype)


if __name__ == "__main__":
    main(sys.argv[1:])
