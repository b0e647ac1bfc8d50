// Softmax over the last dimension.
//
// Shapes: x, y [R, N] row-major contiguous.
// Launch: grid (R), block B = min(256, N rounded up to 32); three passes over the row (max,
//         Σexp, write), all from global memory (rows stay in L1/L2).
// Numerics: max and Σ exp(x − max) in f32 (tree-order sum), y = round_T(exp(x − max) / Σ).
//           Reference: ops::Softmax::cpu_fwd (sequential f32 sum); expf here vs Rust's exp.
// Supported T: f32, bf16.
#include "common.cuh"

template <typename T> __device__ void softmax(const T *__restrict__ x, T *__restrict__ y, int n) {
    __shared__ float scratch[32];
    const T *xr = x + (size_t)blockIdx.x * n;
    T *yr = y + (size_t)blockIdx.x * n;
    float m = -INFINITY;
    for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, to_f32(xr[i]));
    m = block_max(m, scratch);
    float s = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += expf(to_f32(xr[i]) - m);
    s = block_sum(s, scratch);
    for (int i = threadIdx.x; i < n; i += blockDim.x) yr[i] = from_f32<T>(expf(to_f32(xr[i]) - m) / s);
}

extern "C" __global__ void softmax_f32(const float *x, float *y, int n) { softmax<float>(x, y, n); }
extern "C" __global__ void softmax_bf16(const bf16 *x, bf16 *y, int n) { softmax<bf16>(x, y, n); }
