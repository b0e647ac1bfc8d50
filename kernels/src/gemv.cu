// Products of a few rows with a linear layer's weight, y = x · wᵀ: decode's GEMMs.
//
// At batch 1 every projection is a matrix-vector product: one pass over the weight, two FLOPs
// per element loaded, so its time is the weight's bytes over the memory bandwidth. cuBLAS's
// M = 1 GEMMs moved a 7B model's 13.5 GB per token at ~1.8 TB/s on an H100 (BENCHMARKS.md,
// issue 7 part 3), half of HBM. This kernel streams the weight with 16-byte loads that bypass
// L1 (ld.global.nc.L1::no_allocate), several in flight per lane, and keeps x in L1.
//
// Shapes: x [M, K] rows `ldx` elements apart; w [N, K] rows `ldw` apart (row-major, the layout
//         of a linear's weight [out, in]); y [M, N] contiguous. 1 ≤ M ≤ 8 (the template
//         argument), K a multiple of 8, ldx and ldw multiples of 8, x and w 16-byte aligned
//         (the launcher, ops::cuda::gemv, checks the shapes, strides and element offsets and
//         leaves other products to cuBLAS; the base pointers are candle's allocations, 256-byte
//         aligned).
// Epilogues (decode's element-wise ops after a projection, saving their launches):
//   gemv_T_mM           y = x·wᵀ
//   gemv_add_T_mM       y = x·wᵀ + r, r [M, N] contiguous (the residual add after o_proj and
//                       down_proj): the product is rounded to T before the add, as the composed
//                       add sees it, so the result is the composed one bit for bit.
//   gemv_swiglu_T_mM    w [2N, K] = gate rows then up rows (the fused gate/up weight);
//                       y = silu(g)·u with g = x·w[n]ᵀ, u = x·w[N + n]ᵀ each rounded to T first,
//                       exactly swiglu.cu's formula: the composed GEMV + SwiGLU bit for bit.
//   gemv_add_norm_T_mM  gemv_add, then ny [M, N] = RMSNorm(y) · nw (the next RMSNorm, saving its
//                       launch): every block counts itself done on `counts` (one u32, zero before
//                       and left zero after), and the last one normalises y's rows, exactly as
//                       rmsnorm.cu's 16-byte path does with `vb` = ops::cuda's rms_block(N)
//                       threads (its 128 threads take the vb virtual ones' sums in turn, then the
//                       same trees: bit for bit), reading y past L1 (other blocks wrote it).
//                       N % 8 == 0, vb a multiple of 32 with ⌈N/8 / vb⌉ ≤ 2, nw and ny 16-byte
//                       aligned (the graph decode step's own buffers; ops::decode_graph checks).
// Launch: grid ⌈N / (4·C)⌉ with C = gemv_cols(M) ∈ {1, 2, 4} output columns per warp, block 128
//         (4 warps), no shared memory: warp i of block b computes columns (4b + i)·C .. + C for
//         all M rows. Lane l reads the 8-element chunks l, l + 32, l + 64, … of those columns'
//         rows of w (and rows N + n for SwiGLU), 128 bytes in flight per lane.
// Numerics: f32 accumulation with fmaf, each lane over its chunks in order, then a xor-shuffle
//           tree over the warp; one rounding to T. cuBLAS (the reference: ops::matmul on the
//           CPU) also accumulates bf16 products in f32, in another order.
// Supported T: f32, bf16.
#include "common.cuh"

constexpr int GEMV_WARPS = 4;

enum GemvEpilogue { GEMV_PLAIN = 0, GEMV_ADD = 1, GEMV_SWIGLU = 2, GEMV_ADD_NORM = 3 };

// Eight elements of T as f32, loaded past L1 (written by other blocks of this launch).
template <typename T> __device__ __forceinline__ void load8_cg(const T *p, float v[8]) {
    Chunk8<T> c;
#pragma unroll
    for (int i = 0; i < (int)(sizeof(T) / 2); ++i) c.u[i] = __ldcg(reinterpret_cast<const uint4 *>(p) + i);
    unpack8(c, v);
}

// gemv_add_norm's last block: ny [M, n] = RMSNorm(y [M, n]) · nw as rmsnorm_fwd_wide computes it
// with vb threads. Virtual thread v (warp v / 32) sums its chunks (c·vb + v)·8, c = 0, 1, in
// order; real warp i takes virtual warps i, i + GEMV_WARPS, …; block_sum's second tree follows.
template <typename T, int M>
__device__ void gemv_norm_rows(const T *y, const T *__restrict__ nw, T *__restrict__ ny, int n, float eps, int vb) {
    __shared__ float part[32];  // the virtual warps' sums
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nvw = vb / 32;
    const int ch = (n / 8 + vb - 1) / vb;
    for (int m = 0; m < M; ++m) {
        const T *yr = y + (long long)m * n;
#pragma unroll 2
        for (int vw = warp; vw < nvw; vw += GEMV_WARPS) {
            const int v = 32 * vw + lane;
            float ss = 0.f;
            for (int c = 0; c < ch; ++c) {
                const int i = (c * vb + v) * 8;
                if (i < n) {
                    float xv[8];
                    load8_cg(yr + i, xv);
#pragma unroll
                    for (int j = 0; j < 8; ++j) ss = fmaf(xv[j], xv[j], ss);
                }
            }
            ss = warp_sum(ss);
            if (lane == 0) part[vw] = ss;
        }
        __syncthreads();
        const float total = warp_sum(lane < nvw ? part[lane] : 0.f);  // every warp: the same value
        const float r = 1.0f / sqrtf(total / (float)n + eps);
#pragma unroll 4
        for (int i = 8 * (int)threadIdx.x; i < n; i += 8 * (int)blockDim.x) {
            float xv[8], wv[8], o[8];
            load8_cg(yr + i, xv);
            load8(nw + i, wv);
#pragma unroll
            for (int j = 0; j < 8; ++j) o[j] = wv[j] * to_f32(from_f32<T>(xv[j] * r));
            store8(ny + (long long)m * n + i, o);
        }
        __syncthreads();  // `part` is the next row's
    }
}

// One step of a lane: the chunks c0, c0 + 32, …, c0 + 32·(U − 1) of each of the R weight rows
// `wr`, all loads issued before the first product. FULL: every one of them exists (no bounds
// checks).
template <typename T, int M, int U, int R, bool FULL>
__device__ __forceinline__ void gemv_step(const T *__restrict__ x, long long ldx, const T *const wr[R], int c0,
                                          int chunks, float acc[R][M]) {
    Chunk8<T> wc[R][U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int c = c0 + 32 * u;
#pragma unroll
        for (int q = 0; q < R; ++q)
            if (FULL || c < chunks) wc[q][u] = load_chunk_stream(wr[q] + 8 * c);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int c = c0 + 32 * u;
        if (!FULL && c >= chunks) break;
        float wv[R][8];
#pragma unroll
        for (int q = 0; q < R; ++q) unpack8(wc[q][u], wv[q]);
#pragma unroll
        for (int m = 0; m < M; ++m) {
            float xv[8];
            load8(x + m * ldx + 8 * c, xv);
#pragma unroll
            for (int q = 0; q < R; ++q)
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[q][m] = fmaf(wv[q][j], xv[j], acc[q][m]);
        }
    }
}

// Output columns per warp for M rows: each x chunk loaded from L1 feeds C weight rows, so at
// M = 8 the x traffic per weight byte stays 2× (not 8×) and L1 keeps up with HBM. The launcher
// (ops::cuda::gemv) sizes the grid with the same function.
__host__ __device__ constexpr int gemv_cols(int m) { return m <= 2 ? 1 : m <= 4 ? 2 : 4; }

// The next RMSNorm of gemv_add_norm: its weight, output, eps, virtual block size and count.
template <typename T> struct GemvNorm {
    const T *nw;
    T *ny;
    float eps;
    int vb;
    unsigned *counts;
};

// The end of every warp of a gemv_add_norm block (whether or not it had columns): the block
// counts itself done once its stores are visible, and the last block of the launch normalises.
template <typename T, int M> __device__ void gemv_norm_tail(const T *y, int n, const GemvNorm<T> &norm) {
    // The block's y reaches thread 0 by the barrier; its fences order it device-wide before the
    // count, and the other blocks' y (counted before) before the norm's reads.
    __shared__ bool last;
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        last = atomicAdd(norm.counts, 1u) == gridDim.x - 1;
        __threadfence();
    }
    __syncthreads();
    if (!last) return;
    gemv_norm_rows<T, M>(y, norm.nw, norm.ny, n, norm.eps, norm.vb);
    if (threadIdx.x == 0) *norm.counts = 0;  // for the next launch (stream-ordered)
}

template <typename T, int M, int MODE>
__device__ void gemv(const T *__restrict__ x, long long ldx, const T *__restrict__ w, long long ldw,
                     const T *__restrict__ r, T *__restrict__ y, int n, int k, GemvNorm<T> norm = {}) {
    constexpr int C = gemv_cols(M);                 // output columns per warp
    constexpr int R = MODE == GEMV_SWIGLU ? 2 : 1;  // weight rows per output column
    constexpr int NR = R * C;                       // weight rows per warp: q·C + j
    // 128 bytes of weights in flight per lane whatever T, R and C.
    constexpr int U = (sizeof(T) == 2 ? 8 : 4) / NR > 0 ? (sizeof(T) == 2 ? 8 : 4) / NR : 1;
    const int lane = threadIdx.x & 31;
    const int col0 = (blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5)) * C;
    // A warp past N has nothing to compute (as a whole: no shuffle below is left half-done); with
    // the norm it still takes part in the block's count.
    if (col0 >= n) {
        if constexpr (MODE == GEMV_ADD_NORM) gemv_norm_tail<T, M>(y, n, norm);
        return;
    }
    const T *wr[NR];
#pragma unroll
    for (int q = 0; q < R; ++q)
#pragma unroll
        for (int j = 0; j < C; ++j)  // columns past N read the last one again (never stored)
            wr[q * C + j] = w + (long long)(min(col0 + j, n - 1) + q * n) * ldw;
    const int chunks = k / 8;
    float acc[NR][M];
#pragma unroll
    for (int q = 0; q < NR; ++q)
#pragma unroll
        for (int m = 0; m < M; ++m) acc[q][m] = 0.f;
    int c0 = lane;
    for (; c0 + 32 * (U - 1) < chunks; c0 += 32 * U) gemv_step<T, M, U, NR, true>(x, ldx, wr, c0, chunks, acc);
    if (c0 < chunks) gemv_step<T, M, U, NR, false>(x, ldx, wr, c0, chunks, acc);  // the rest, in one step
#pragma unroll
    for (int q = 0; q < NR; ++q)
#pragma unroll
        for (int m = 0; m < M; ++m) acc[q][m] = warp_sum(acc[q][m]);
    if (lane == 0) {
#pragma unroll
        for (int j = 0; j < C; ++j) {
            if (col0 + j >= n) break;
#pragma unroll
            for (int m = 0; m < M; ++m) {
                const long long o = (long long)m * n + col0 + j;
                if (MODE == GEMV_PLAIN) {
                    y[o] = from_f32<T>(acc[j][m]);
                } else if (MODE == GEMV_ADD || MODE == GEMV_ADD_NORM) {
                    y[o] = from_f32<T>(to_f32(from_f32<T>(acc[j][m])) + to_f32(r[o]));
                } else {
                    const float g = to_f32(from_f32<T>(acc[j][m])), u = to_f32(from_f32<T>(acc[C + j][m]));
                    y[o] = from_f32<T>(g / (1.0f + expf(-g)) * u);
                }
            }
        }
    }
    if constexpr (MODE == GEMV_ADD_NORM) gemv_norm_tail<T, M>(y, n, norm);
}

#define GEMV(TY, NAME, M)                                                                                 \
    extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS)                                         \
        gemv_##NAME##_m##M(const TY *x, long long ldx, const TY *w, long long ldw, TY *y, int n, int k) {    \
        gemv<TY, M, GEMV_PLAIN>(x, ldx, w, ldw, nullptr, y, n, k);                                        \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS)                                         \
        gemv_add_##NAME##_m##M(const TY *x, long long ldx, const TY *w, long long ldw, const TY *r, TY *y, \
                               int n, int k) {                                                            \
        gemv<TY, M, GEMV_ADD>(x, ldx, w, ldw, r, y, n, k);                                                \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS)                                         \
        gemv_swiglu_##NAME##_m##M(const TY *x, long long ldx, const TY *w, long long ldw, TY *y, int n,    \
                                  int k) {                                                                \
        gemv<TY, M, GEMV_SWIGLU>(x, ldx, w, ldw, nullptr, y, n, k);                                       \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS)                                         \
        gemv_add_norm_##NAME##_m##M(const TY *x, long long ldx, const TY *w, long long ldw, const TY *r,   \
                                    TY *y, int n, int k, const TY *nw, TY *ny, float eps, int vb,          \
                                    unsigned *counts) {                                                   \
        gemv<TY, M, GEMV_ADD_NORM>(x, ldx, w, ldw, r, y, n, k, GemvNorm<TY>{nw, ny, eps, vb, counts});   \
    }
#define GEMV_ALL_M(TY, NAME) \
    GEMV(TY, NAME, 1)        \
    GEMV(TY, NAME, 2)        \
    GEMV(TY, NAME, 3)        \
    GEMV(TY, NAME, 4)        \
    GEMV(TY, NAME, 5)        \
    GEMV(TY, NAME, 6)        \
    GEMV(TY, NAME, 7)        \
    GEMV(TY, NAME, 8)
GEMV_ALL_M(float, f32)
GEMV_ALL_M(bf16, bf16)
