// f32 ⇄ bf16 casts, 8 elements a thread with 16-byte accesses and a thread per 8 elements: a
// training step on CUDA casts every f32 master weight to its bf16 compute copy (a 7B layer's 202M
// weights: 1.2 GB of traffic a layer, every step). candle's cast does 4 (f32 → bf16, stored one
// by one) or 8 a thread but launches a thread per element, so most of its blocks start only to
// exit.
//
// Shapes: x, y [N] contiguous. Launch: 1-D grid-stride over ⌈N/8⌉ threads' worth, block 256;
//         the 16-byte path when x and y are 16-byte aligned (then elements past N/8·8 one a
//         thread), else one element a thread throughout.
// Numerics: bf16 → f32 exact; f32 → bf16 rounded to nearest even (NaN stays NaN), as candle's
//           __float2bfloat16 and half::bf16::from_f32 round. Reference: ops::cast (candle's cast
//           on the CPU side of the parity test).
// Supported: cast_f32_bf16, cast_bf16_f32.
#include "common.cuh"

template <typename A, typename B> __device__ void cast(const A *__restrict__ x, B *__restrict__ y, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    long long done = 0;
    if (aligned16(x) && aligned16(y)) {
        for (long long i = tid; i < n / 8; i += stride) {
            float v[8];
            load8(x + 8 * i, v);
            store8(y + 8 * i, v);
        }
        done = n / 8 * 8;
    }
    for (long long i = done + tid; i < n; i += stride) y[i] = from_f32<B>(to_f32(x[i]));
}

extern "C" __global__ void cast_f32_bf16(const float *x, bf16 *y, long long n) { cast<float, bf16>(x, y, n); }
extern "C" __global__ void cast_bf16_f32(const bf16 *x, float *y, long long n) { cast<bf16, float>(x, y, n); }
