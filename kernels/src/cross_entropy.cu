// Softmax cross-entropy over the vocabulary, loss and d loss / d logits in one kernel.
//
// Shapes: logits [N, V] row-major contiguous, targets [N] i64 (ignore_index rows are skipped),
//         loss [N] f32, dlogits [N, V] in the logits' dtype (softmax − one-hot), scaled by
//         d loss_i in the backward by cross_entropy_bwd (below).
// Launch: grid (N), block B = min(1024, V rounded up to 32); two passes over the row: an online
//         (max, Σexp) per thread merged across the block, then the write of dlogits.
// Numerics: f32 throughout; lse = max + log Σ exp(x − max); loss_i = lse − x[target];
//           dlogits = round_T(exp(x − lse) − [j = target]). Ignored rows: loss 0, dlogits 0.
//           A target outside [0, V) that is not ignore_index gives loss NaN (the CPU reference
//           rejects it with an error). Reference: ops::CrossEntropy::cpu_fwd.
// Supported T: f32, bf16.
#include "common.cuh"

template <typename T>
__device__ void cross_entropy(const T *__restrict__ logits, const long long *__restrict__ targets,
                              float *__restrict__ loss, T *__restrict__ dlogits, int v,
                              long long ignore_index) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const T *xr = logits + row * v;
    T *dr = dlogits + row * v;
    const long long tgt = targets[row];
    if (tgt == ignore_index) {
        for (int j = threadIdx.x; j < v; j += blockDim.x) dr[j] = from_f32<T>(0.f);
        if (threadIdx.x == 0) loss[row] = 0.f;
        return;  // uniform across the block: no barrier is skipped by only some threads
    }
    float m = -INFINITY, s = 0.f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        const float x = to_f32(xr[j]);
        if (x > m) {
            s = s * expf(m - x) + 1.f;
            m = x;
        } else if (m != -INFINITY) {  // a −inf logit next to a −inf max adds nothing
            s += expf(x - m);
        }
    }
    const float bm = block_max(m, scratch);
    s = m == -INFINITY ? 0.f : s * expf(m - bm);
    s = block_sum(s, scratch);
    const float lse = bm + logf(s);
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        const float p = expf(to_f32(xr[j]) - lse);
        dr[j] = from_f32<T>(j == tgt ? p - 1.f : p);
    }
    if (threadIdx.x == 0) loss[row] = (tgt >= 0 && tgt < v) ? lse - to_f32(xr[tgt]) : NAN;
}

// Backward: dx[r, j] = round_T(dlogits[r, j] · dloss[r]), the f32 product rounded once (as the
// CPU path's to_dtype(f32) · g → to_dtype(T)). 1-D grid-stride over N·V, 8 elements per thread
// (16-byte accesses) when V % 8 = 0 and both buffers are 16-byte aligned, block 256.
template <typename T>
__device__ void cross_entropy_bwd(const T *__restrict__ dlogits, const float *__restrict__ dloss, T *__restrict__ dx,
                                  long long n, int v) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (v % 8 == 0 && aligned16(dlogits) && aligned16(dx)) {
        for (long long i = tid; i < n / 8; i += stride) {
            float d[8];
            load8(dlogits + 8 * i, d);
            const float s = dloss[8 * i / v];
#pragma unroll
            for (int j = 0; j < 8; ++j) d[j] *= s;
            store8(dx + 8 * i, d);
        }
    } else {
        for (long long i = tid; i < n; i += stride) dx[i] = from_f32<T>(to_f32(dlogits[i]) * dloss[i / v]);
    }
}

#define CE(TY, NAME)                                                                                  \
    extern "C" __global__ void cross_entropy_##NAME(const TY *logits, const long long *targets,        \
                                                    float *loss, TY *dlogits, int v,                  \
                                                    long long ignore_index) {                         \
        cross_entropy<TY>(logits, targets, loss, dlogits, v, ignore_index);                           \
    }                                                                                                 \
    extern "C" __global__ void cross_entropy_bwd_##NAME(const TY *dlogits, const float *dloss, TY *dx,  \
                                                        long long n, int v) {                         \
        cross_entropy_bwd<TY>(dlogits, dloss, dx, n, v);                                              \
    }
CE(float, f32)
CE(bf16, bf16)
