// RMSNorm over the last dimension, forward and backward (transformers' LlamaRMSNorm).
//
// Shapes: x, g, y, dx [R, H] row-major contiguous (R = all leading dims); w [H] in x's dtype;
//         dw [H] f32, zero-filled by the caller, accumulated with atomics; skip [R, H] or null:
//         the gradient arriving around the norm by the residual connection, added to dx.
// Launch: fwd  grid (R), block B = ⌈H/16⌉ rounded up to a multiple of 32, at most 1024 (two
//              16-byte chunks a thread), no dynamic smem.
//         bwd  grid (min(R, ~2·SMs)), block B as above but at most 512 (its __launch_bounds__:
//              the 16-byte path holds four arrays of chunks), dynamic smem 4·H bytes (the one-element
//              path's dw partial sums; the caller opts in above 48 KiB); each block strides
//              over rows.
// Paths: with H a multiple of 8, every pointer 16-byte aligned and H ≤ 2·8·B (the backward:
//        H ≤ 8192 at its 512 threads), each thread keeps its part of a row in registers —
//        chunk c ∈ {0, 1} of 8 consecutive elements at (c·B + thread)·8, moved by 16-byte
//        accesses — so x (and g, w, skip) are read once (the backward keeps w and its dw partial
//        sums in registers across rows too); otherwise one element at a time, x read twice.
//        gemv.cu's gemv_rms_prologue (gemv_norm_*) replays the forward's 16-byte path bit for bit
//        (the graph decode step's folded norms): change the two together (the emulator's
//        test_gemv_norm compares them).
// Numerics (reference: cpu_fwd of ops::RmsNorm and its composed backward):
//   fwd  r = 1 / sqrt(Σx²/H + eps) in f32 (each thread's elements in order, then the block's
//        tree; the two paths group the terms differently), y = round_T(w · round_T(x · r)):
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
        ss = fmaf(v, v, ss);
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

// The first element of this thread's chunk c on the 16-byte path.
__device__ __forceinline__ int wide_at(int c) { return (c * (int)blockDim.x + (int)threadIdx.x) * 8; }

// The 16-byte path (see Paths): CH chunks of 8 per thread.
template <typename T, int CH>
__device__ void rmsnorm_fwd_wide(const T *__restrict__ x, const T *__restrict__ w, T *__restrict__ y, int h,
                                 float eps) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const T *xr = x + row * h;
    T *yr = y + row * h;
    float v[CH][8], wv[CH][8];
    float ss = 0.f;
#pragma unroll
    for (int c = 0; c < CH; ++c) {
        const int i = wide_at(c);
        if (i < h) {
            load8(xr + i, v[c]);
            load8(w + i, wv[c]);
#pragma unroll
            for (int j = 0; j < 8; ++j) ss = fmaf(v[c][j], v[c][j], ss);
        }
    }
    ss = block_sum(ss, scratch);
    const float r = 1.0f / sqrtf(ss / (float)h + eps);
#pragma unroll
    for (int c = 0; c < CH; ++c) {
        const int i = wide_at(c);
        if (i < h) {
            float o[8];
#pragma unroll
            for (int j = 0; j < 8; ++j) o[j] = wv[c][j] * to_f32(from_f32<T>(v[c][j] * r));
            store8(yr + i, o);
        }
    }
}

template <typename T, int CH>
__device__ void rmsnorm_bwd_wide(const T *__restrict__ x, const T *__restrict__ w, const T *__restrict__ g,
                                 const T *__restrict__ skip, T *__restrict__ dx, float *__restrict__ dw, int rows,
                                 int h, float eps) {
    __shared__ float scratch[32];
    float wv[CH][8], acc[CH][8];
#pragma unroll
    for (int c = 0; c < CH; ++c) {
        const int i = wide_at(c);
        if (i < h) load8(w + i, wv[c]);
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[c][j] = 0.f;
    }
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const T *xr = x + (size_t)row * h, *gr = g + (size_t)row * h;
        const T *sr = skip ? skip + (size_t)row * h : nullptr;
        T *dxr = dx + (size_t)row * h;
        float xv[CH][8], gv[CH][8];
        float ss = 0.f, gwx = 0.f;
#pragma unroll
        for (int c = 0; c < CH; ++c) {
            const int i = wide_at(c);
            if (i < h) {
                load8(xr + i, xv[c]);
                load8(gr + i, gv[c]);
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    ss += xv[c][j] * xv[c][j];
                    gwx += gv[c][j] * wv[c][j] * xv[c][j];
                }
            }
        }
        ss = block_sum(ss, scratch);
        gwx = block_sum(gwx, scratch);
        const float r = 1.0f / sqrtf(ss / (float)h + eps);
        const float dot = gwx * r / (float)h;
#pragma unroll
        for (int c = 0; c < CH; ++c) {
            const int i = wide_at(c);
            if (i < h) {
                float o[8], sk[8];
                if (sr) load8(sr + i, sk);
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    const float n = xv[c][j] * r;
                    const float d = to_f32(from_f32<T>((gv[c][j] * wv[c][j] - n * dot) * r));
                    o[j] = sr ? sk[j] + d : d;
                    acc[c][j] += gv[c][j] * n;
                }
                store8(dxr + i, o);
            }
        }
    }
#pragma unroll
    for (int c = 0; c < CH; ++c) {
        const int i = wide_at(c);
        if (i < h) {
#pragma unroll
            for (int j = 0; j < 8; ++j) atomicAdd(dw + i + j, acc[c][j]);
        }
    }
}

// Chunks of 8 a thread takes on the 16-byte path for rows of h (1 or 2), or 0: the one-element
// path. (Two at most: the backward holds four arrays of them, and more registers a thread would
// leave fewer blocks an SM.)
__device__ __forceinline__ int rms_chunks(bool aligned, int h) {
    if (!aligned || h % 8 != 0) return 0;
    const int c = (h / 8 + (int)blockDim.x - 1) / (int)blockDim.x;
    return c <= 2 ? c : 0;
}

template <typename T>
__device__ void rmsnorm_fwd_any(const T *x, const T *w, T *y, int h, float eps) {
    switch (rms_chunks(aligned16(x) && aligned16(w) && aligned16(y), h)) {
    case 1: rmsnorm_fwd_wide<T, 1>(x, w, y, h, eps); break;
    case 2: rmsnorm_fwd_wide<T, 2>(x, w, y, h, eps); break;
    default: rmsnorm_fwd<T>(x, w, y, h, eps);
    }
}

template <typename T>
__device__ void rmsnorm_bwd_any(const T *x, const T *w, const T *g, const T *skip, T *dx, float *dw, int rows, int h,
                                float eps) {
    const bool aligned = aligned16(x) && aligned16(w) && aligned16(g) && aligned16(skip) && aligned16(dx);
    switch (rms_chunks(aligned, h)) {
    case 1: rmsnorm_bwd_wide<T, 1>(x, w, g, skip, dx, dw, rows, h, eps); break;
    case 2: rmsnorm_bwd_wide<T, 2>(x, w, g, skip, dx, dw, rows, h, eps); break;
    default: rmsnorm_bwd<T>(x, w, g, skip, dx, dw, rows, h, eps);
    }
}

#define RMSNORM(TY, NAME)                                                                             \
    extern "C" __global__ void rmsnorm_fwd_##NAME(const TY *x, const TY *w, TY *y, int h, float eps) { \
        rmsnorm_fwd_any<TY>(x, w, y, h, eps);                                                         \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(512) rmsnorm_bwd_##NAME(const TY *x, const TY *w, const TY *g, const TY *skip, \
                                                  TY *dx, float *dw, int rows, int h, float eps) {    \
        rmsnorm_bwd_any<TY>(x, w, g, skip, dx, dw, rows, h, eps);                                     \
    }
RMSNORM(float, f32)
RMSNORM(bf16, bf16)
