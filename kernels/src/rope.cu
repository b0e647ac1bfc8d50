// Rotary position embedding on the two halves of each head (transformers' rotate_half).
//
// Shapes: x, y [N, T, D] row-major contiguous (N = B·H heads), cos/sin [T, D/2] (rows past T
//         unused). The backward is this kernel with −sin (the rotation's transpose).
// Launch: 1-D grid-stride over N·T·D/2 (one thread per rotated pair), block 256,
//         grid min(ceil(N·T·D/2 / 256), 65535·…) chosen by the caller.
// Numerics: (a, b) → (a·c − b·s, b·c + a·s) in f32 with every product and sum rounded on its
//           own (__fmul_rn / __fadd_rn, no FMA contraction), rounded to T once: bit-identical
//           to the CPU reference (ops::Rope::cpu_fwd).
// Supported (T, C): (f32, f32), (bf16, bf16), (bf16, f32).
#include "common.cuh"

template <typename T, typename C>
__device__ void rope(const T *__restrict__ x, const C *__restrict__ cos, const C *__restrict__ sin,
                     T *__restrict__ y, long long pairs, int t, int d) {
    const int half = d / 2;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < pairs;
         idx += (long long)gridDim.x * blockDim.x) {
        const int i = (int)(idx % half);
        const long long row = idx / half;  // index into [N·T]
        const int p = (int)(row % t);
        const float a = to_f32(x[row * d + i]), b = to_f32(x[row * d + i + half]);
        const float c = to_f32(cos[p * half + i]), s = to_f32(sin[p * half + i]);
        y[row * d + i] = from_f32<T>(__fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s)));
        y[row * d + i + half] = from_f32<T>(__fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s)));
    }
}

#define ROPE(TY, CY, NAME)                                                                            \
    extern "C" __global__ void rope_##NAME(const TY *x, const CY *cos, const CY *sin, TY *y,           \
                                           long long pairs, int t, int d) {                           \
        rope<TY, CY>(x, cos, sin, y, pairs, t, d);                                                    \
    }
ROPE(float, float, f32_f32)
ROPE(bf16, bf16, bf16_bf16)
ROPE(bf16, float, bf16_f32)
