// Softmax over the last dimension of scale·x (scale 1: plain softmax; decode's attention passes
// 1/√D, which saves a separate scaling pass over the scores).
//
// Shapes: x, y [R, N] row-major contiguous.
// Launch: grid (R), block B = min(256, N rounded up to 32); three passes over the row (max,
//         Σexp, write), all from global memory (rows stay in L1/L2).
// Numerics: v = scale·x in f32; max and Σ exp(v − max) in f32 (tree-order sum),
//           y = round_T(exp(v − max) / Σ).
//           Reference: ops::Softmax::cpu_fwd (sequential f32 sum); expf here vs Rust's exp.
// Supported T: f32, bf16.
#include "common.cuh"

template <typename T> __device__ void softmax(const T *__restrict__ x, T *__restrict__ y, int n, float scale) {
    __shared__ float scratch[32];
    const T *xr = x + (size_t)blockIdx.x * n;
    T *yr = y + (size_t)blockIdx.x * n;
    float m = -INFINITY;
    for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, scale * to_f32(xr[i]));
    m = block_max(m, scratch);
    float s = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += expf(scale * to_f32(xr[i]) - m);
    s = block_sum(s, scratch);
    for (int i = threadIdx.x; i < n; i += blockDim.x) yr[i] = from_f32<T>(expf(scale * to_f32(xr[i]) - m) / s);
}

extern "C" __global__ void softmax_f32(const float *x, float *y, int n, float scale) { softmax<float>(x, y, n, scale); }
extern "C" __global__ void softmax_bf16(const bf16 *x, bf16 *y, int n, float scale) { softmax<bf16>(x, y, n, scale); }
