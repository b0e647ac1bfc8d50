// SwiGLU activation y = silu(gate) · up, fused, forward and backward.
//
// Shapes: gate, up, y, dy [N] (any shape, contiguous, flattened); the backward writes
//         dgd [2N]: d gate in [0, N), d up in [N, 2N).
// Launch: 1-D grid-stride over ⌈N/8⌉ threads' worth (8 elements per thread with 16-byte accesses
//         when every pointer is 16-byte aligned, else one), block 256, grid chosen by the caller.
// Numerics: in f32, σ = 1 / (1 + exp(−g)), silu = g·σ; y = round_T(silu · u) (one rounding,
//           where candle's unfused silu(g)·u rounds twice in bf16);
//           d up = dy·silu, d gate = dy·u·σ·(1 + g·(1 − σ)). Reference: ops::SwiGlu::cpu_fwd and
//           ops::SwiGluBwd::cpu_fwd (same formulas in Rust f32).
// Supported T: f32, bf16.
#include "common.cuh"

template <typename T>
__device__ void swiglu_fwd(const T *__restrict__ gate, const T *__restrict__ up, T *__restrict__ y,
                           long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    long long done = 0;
    if (aligned16(gate) && aligned16(up) && aligned16(y)) {
        for (long long i = tid; i < n / 8; i += stride) {
            float g[8], u[8], o[8];
            load8(gate + 8 * i, g);
            load8(up + 8 * i, u);
#pragma unroll
            for (int j = 0; j < 8; ++j) o[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
            store8(y + 8 * i, o);
        }
        done = n / 8 * 8;
    }
    for (long long i = done + tid; i < n; i += stride) {
        const float g = to_f32(gate[i]);
        const float silu = g / (1.0f + expf(-g));
        y[i] = from_f32<T>(silu * to_f32(up[i]));
    }
}

__device__ __forceinline__ void swiglu_grad(float g, float u, float d, float &dg, float &du) {
    const float sig = 1.0f / (1.0f + expf(-g));
    dg = d * u * (sig * (1.0f + g * (1.0f - sig)));
    du = d * (g * sig);
}

template <typename T>
__device__ void swiglu_bwd(const T *__restrict__ gate, const T *__restrict__ up, const T *__restrict__ dy,
                           T *__restrict__ dgd, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    long long done = 0;
    if (aligned16(gate) && aligned16(up) && aligned16(dy) && aligned16(dgd) && aligned16(dgd + n)) {
        for (long long i = tid; i < n / 8; i += stride) {
            float g[8], u[8], d[8], dg[8], du[8];
            load8(gate + 8 * i, g);
            load8(up + 8 * i, u);
            load8(dy + 8 * i, d);
#pragma unroll
            for (int j = 0; j < 8; ++j) swiglu_grad(g[j], u[j], d[j], dg[j], du[j]);
            store8(dgd + 8 * i, dg);
            store8(dgd + n + 8 * i, du);
        }
        done = n / 8 * 8;
    }
    for (long long i = done + tid; i < n; i += stride) {
        float dg, du;
        swiglu_grad(to_f32(gate[i]), to_f32(up[i]), to_f32(dy[i]), dg, du);
        dgd[i] = from_f32<T>(dg);
        dgd[n + i] = from_f32<T>(du);
    }
}

#define SWIGLU(TY, NAME)                                                                              \
    extern "C" __global__ void swiglu_fwd_##NAME(const TY *gate, const TY *up, TY *y, long long n) {   \
        swiglu_fwd<TY>(gate, up, y, n);                                                               \
    }                                                                                                 \
    extern "C" __global__ void swiglu_bwd_##NAME(const TY *gate, const TY *up, const TY *dy, TY *dgd,  \
                                                 long long n) {                                       \
        swiglu_bwd<TY>(gate, up, dy, dgd, n);                                                         \
    }
SWIGLU(float, f32)
SWIGLU(bf16, bf16)
