"""PyTorch baselines for `bench/gpu_kernels.sh`: the same ops and shapes as the `bench_kernels`
test of tests/cuda_parity.rs, timed the same way (wall clock around each call, device
synchronised, median of 20 after 3 warm-up runs), printed as `bench | torch ... | ms | rate` rows.
"""
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

dev = "cuda"
bf = torch.bfloat16
torch.manual_seed(0)


def median_ms(fn, warm=3, iters=20):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def row(op, shape, ms, rate):
    print(f"bench | torch {op} | {shape} | {ms:.3f} | {rate}", flush=True)


print(f"torch {torch.__version__}, cuda {torch.version.cuda}, {torch.cuda.get_device_name()}", flush=True)

b, h, t, d = 2, 32, 2048, 128
q, k, v = (torch.randn(b, h, t, d, device=dev, dtype=bf, requires_grad=True) for _ in range(3))
probe = torch.randn(b, h, t, d, device=dev, dtype=bf)
flops = 4 * b * h * t * t * d / 2
for name, backend in [("default", None), ("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)]:
    ctx = sdpa_kernel(backend) if backend is not None else torch.enable_grad()
    try:
        with ctx:
            fwd = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))

            def step():
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                (o * probe).sum().backward()

            fb = median_ms(step)
    except RuntimeError as e:  # a backend this build or card lacks
        print(f"bench | torch sdpa {name} | unavailable: {str(e).splitlines()[0]}", flush=True)
        continue
    shape = f"B{b} H{h} T{t} D{d} causal bf16"
    row(f"sdpa[{name}] fwd", shape, fwd, f"{flops / fwd / 1e9:.1f} TFLOP/s")
    row(f"sdpa[{name}] fwd+bwd", shape, fb, f"{3.5 * flops / fb / 1e9:.1f} TFLOP/s")
del q, k, v, probe

x = torch.randn(4096, 4096, device=dev, dtype=bf, requires_grad=True)
w = torch.randn(4096, device=dev, dtype=bf, requires_grad=True)
probe = torch.randn(4096, 4096, device=dev, dtype=bf)


def rms(x, w, eps=1e-5):  # transformers' LlamaRMSNorm, eager
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


ms = median_ms(lambda: rms(x, w), iters=50)
row("rms_norm (eager) fwd", "[4096, 4096] bf16", ms, f"{2 * 4096 * 4096 * 2 / ms / 1e6:.0f} GB/s")
ms = median_ms(lambda: (rms(x, w) * probe).sum().backward(), iters=50)
row("rms_norm (eager) fwd+bwd (+probe·sum)", "[4096, 4096] bf16", ms, "-")
del x, w, probe

g = torch.randn(4096, 11008, device=dev, dtype=bf, requires_grad=True)
u = torch.randn(4096, 11008, device=dev, dtype=bf, requires_grad=True)
probe = torch.randn(4096, 11008, device=dev, dtype=bf)
ms = median_ms(lambda: F.silu(g) * u, iters=50)
row("silu(g)*u (eager) fwd", "[4096, 11008] bf16", ms, f"{3 * 4096 * 11008 * 2 / ms / 1e6:.0f} GB/s")
ms = median_ms(lambda: ((F.silu(g) * u) * probe).sum().backward(), iters=50)
row("silu(g)*u (eager) fwd+bwd (+probe·sum)", "[4096, 11008] bf16", ms, "-")
del g, u, probe

logits = (4 * torch.randn(4096, 32000, device=dev, dtype=bf)).requires_grad_(True)
targets = (torch.arange(4096, device=dev) * 7919) % 32000
ms = median_ms(lambda: F.cross_entropy(logits.float(), targets), iters=50)
row("cross_entropy(logits.float()) fwd", "[4096, 32000] bf16", ms, "-")
ms = median_ms(lambda: F.cross_entropy(logits.float(), targets).backward(), iters=50)
row("cross_entropy(logits.float()) fwd+bwd", "[4096, 32000] bf16", ms, "-")
