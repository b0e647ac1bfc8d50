// RMSNorm over the last dimension, forward and backward (transformers' LlamaRMSNorm).
//
// Shapes: x, g, y, dx [R, H] row-major contiguous (R = all leading dims); w [H] in x's dtype;
//         dw [H] f32, zero-filled by the caller, accumulated with atomics; skip [R, H] or null:
//         the gradient arriving around the norm by the residual connection, added to dx.
// Launch: fwd  grid (R), block B = min(256, H rounded up to 32), no dynamic smem.
//         bwd  grid (min(R, ~2·SMs)), block B as above, dynamic smem 4·H bytes (the block's
//              dw partial sums; the caller opts in above 48 KiB); each block strides over rows.
// Numerics (reference: cpu_fwd of ops::RmsNorm and its composed backward):
//   fwd  r = 1 / sqrt(Σx²/H + eps) in f32 (tree-order sum), y = round_T(w · round_T(x · r)):
//        the normalised value is rounded to T before the scale, like transformers.
//   bwd  in f32, straight through that rounding: n = x·r, dot = Σ(g·w·n)/H,
//        dx = (g·w − n·dot)·r rounded to T, dw = Σ_rows g·n in f32; with skip,
//        dx = round_T(skip + dx) (the separate add's arithmetic: a sum in f32, rounded once).
// Supported T: f32, bf16.
#include "common.cuh"

template <typename T>
__device__ void rmsnorm_fwd(const T *__restrict__ x, const T *__restrict__ w, T *__restrict__ y, int h,
                            float eps) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const T *xr = x + row * h;
    T *yr = y + row * h;
    float ss = 0.f;
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        const float v = to_f32(xr[i]);
        ss = fmaf(v, v, ss);  // spelled out: gemv.cu's normalising prologue repeats this sum
    }
    ss = block_sum(ss, scratch);
    const float r = 1.0f / sqrtf(ss / (float)h + eps);
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        const float n = to_f32(from_f32<T>(to_f32(xr[i]) * r));
        yr[i] = from_f32<T>(to_f32(w[i]) * n);
    }
}

template <typename T>
__device__ void rmsnorm_bwd(const T *__restrict__ x, const T *__restrict__ w, const T *__restrict__ g,
                            const T *__restrict__ skip, T *__restrict__ dx, float *__restrict__ dw, int rows,
                            int h, float eps) {
    __shared__ float scratch[32];
    DYN_SMEM(smem);
    float *dw_part = reinterpret_cast<float *>(smem);  // [H]
    for (int i = threadIdx.x; i < h; i += blockDim.x) dw_part[i] = 0.f;
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const T *xr = x + (size_t)row * h;
        const T *gr = g + (size_t)row * h;
        T *dxr = dx + (size_t)row * h;
        const T *sr = skip ? skip + (size_t)row * h : nullptr;
        float ss = 0.f, gwx = 0.f;
        for (int i = threadIdx.x; i < h; i += blockDim.x) {
            const float xv = to_f32(xr[i]);
            ss += xv * xv;
            gwx += to_f32(gr[i]) * to_f32(w[i]) * xv;
        }
        ss = block_sum(ss, scratch);
        gwx = block_sum(gwx, scratch);
        const float r = 1.0f / sqrtf(ss / (float)h + eps);
        const float dot = gwx * r / (float)h;
        for (int i = threadIdx.x; i < h; i += blockDim.x) {
            const float n = to_f32(xr[i]) * r, gv = to_f32(gr[i]);
            const T d = from_f32<T>((gv * to_f32(w[i]) - n * dot) * r);
            dxr[i] = sr ? from_f32<T>(to_f32(sr[i]) + to_f32(d)) : d;
            dw_part[i] += gv * n;  // column i is only ever touched by this thread
        }
    }
    for (int i = threadIdx.x; i < h; i += blockDim.x) atomicAdd(dw + i, dw_part[i]);
}

#define RMSNORM(TY, NAME)                                                                             \
    extern "C" __global__ void rmsnorm_fwd_##NAME(const TY *x, const TY *w, TY *y, int h, float eps) { \
        rmsnorm_fwd<TY>(x, w, y, h, eps);                                                             \
    }                                                                                                 \
    extern "C" __global__ void rmsnorm_bwd_##NAME(const TY *x, const TY *w, const TY *g, const TY *skip, \
                                                  TY *dx, float *dw, int rows, int h, float eps) {    \
        rmsnorm_bwd<TY>(x, w, g, skip, dx, dw, rows, h, eps);                                         \
    }
RMSNORM(float, f32)
RMSNORM(bf16, bf16)
