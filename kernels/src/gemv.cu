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
//   gemv_norm_T_mM, gemv_norm_swiglu_T_mM (M ≤ 2)
//                       gemv / gemv_swiglu of RMSNorm(x)·nw (the RMSNorm before the product,
//                       saving its launch): each block first normalises x's M rows into shared
//                       memory exactly as rmsnorm.cu's 16-byte path does with `vb` =
//                       ops::cuda's rms_block(K) threads (its 128 threads take the vb virtual
//                       ones' sums in turn, then the same trees: bit for bit), its first weights
//                       already in flight, so the product is the composed RMSNorm + GEMV's bit for
//                       bit. K % 8 == 0, vb a multiple of 32 with ⌈K/8 / vb⌉ ≤ 2 and vb ≤ 256,
//                       nw [K] 16-byte aligned; dynamic shared memory M·K·sizeof(T).
// Launch: grid ⌈N / (4·C)⌉ with C = gemv_cols(M) ∈ {1, 2, 4} output columns per warp, block 128
//         (4 warps), no shared memory but gemv_norm's rows: warp i of block b computes columns
//         (4b + i)·C .. + C for all M rows. Lane l reads the 8-element chunks l, l + 32, l + 64, … of those columns'
//         rows of w (and rows N + n for SwiGLU), 128 bytes in flight per lane.
// Numerics: f32 accumulation with fmaf, each lane over its chunks in order, then a xor-shuffle
//           tree over the warp; one rounding to T. cuBLAS (the reference: ops::matmul on the
//           CPU) also accumulates bf16 products in f32, in another order.
// Supported T: f32, bf16.
#include "common.cuh"

constexpr int GEMV_WARPS = 4;

enum GemvEpilogue { GEMV_PLAIN = 0, GEMV_ADD = 1, GEMV_SWIGLU = 2 };

// The RMSNorm prologue of gemv_norm: x's M rows normalised with weight nw into xs [M, k] as
// rmsnorm_fwd_wide computes them with vb threads. Virtual thread v (warp v / 32) sums its chunks
// (c·vb + v)·8, c = 0, 1, in order; real warp i takes virtual warps i, i + GEMV_WARPS, … (at
// most GEMV_NORM_VW of them: vb ≤ 32·GEMV_WARPS·GEMV_NORM_VW); block_sum's second tree follows.
// Each lane loads all its chunks of a row (and of nw) before it sums any, and normalises those
// same chunks. Every thread of the block takes part (a barrier a row, and one at the end).
constexpr int GEMV_NORM_VW = 2;  // H ≤ 4096 (LLaMA-7B); 4 reached 8192 but held 128 registers
template <typename T, int M>
__device__ void gemv_rms_prologue(const T *__restrict__ x, long long ldx, const T *__restrict__ nw,
                                  T *__restrict__ xs, int k, float eps, int vb) {
    __shared__ float part[M][32];  // the virtual warps' sums, by row
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nvw = vb / 32;
    const int ch = (k / 8 + vb - 1) / vb;
    // Chunk c of this lane's virtual warp t: its element offset, or −1 past the row.
    auto at = [&](int t, int c) {
        const int vw = warp + GEMV_WARPS * t, i = (c * vb + 32 * vw + lane) * 8;
        return vw < nvw && c < ch && i < k ? i : -1;
    };
#pragma unroll
    for (int m = 0; m < M; ++m) {
        const T *xr = x + m * ldx;
        Chunk8<T> xc[GEMV_NORM_VW][2], wc[GEMV_NORM_VW][2];
#pragma unroll
        for (int t = 0; t < GEMV_NORM_VW; ++t)
#pragma unroll
            for (int c = 0; c < 2; ++c)
                if (at(t, c) >= 0) {
                    xc[t][c] = load_chunk(xr + at(t, c));
                    wc[t][c] = load_chunk(nw + at(t, c));
                }
#pragma unroll
        for (int t = 0; t < GEMV_NORM_VW; ++t) {
            if (warp + GEMV_WARPS * t >= nvw) break;  // the same for the whole warp
            float ss = 0.f;
#pragma unroll
            for (int c = 0; c < 2; ++c)
                if (at(t, c) >= 0) {
                    float xv[8];
                    unpack8(xc[t][c], xv);
#pragma unroll
                    for (int j = 0; j < 8; ++j) ss = fmaf(xv[j], xv[j], ss);
                }
            ss = warp_sum(ss);
            if (lane == 0) part[m][warp + GEMV_WARPS * t] = ss;
        }
        __syncthreads();
        const float total = warp_sum(lane < nvw ? part[m][lane] : 0.f);  // every warp: the same value
        const float r = 1.0f / sqrtf(total / (float)k + eps);
#pragma unroll
        for (int t = 0; t < GEMV_NORM_VW; ++t)
#pragma unroll
            for (int c = 0; c < 2; ++c)
                if (at(t, c) >= 0) {
                    float xv[8], wv[8], o[8];
                    unpack8(xc[t][c], xv);
                    unpack8(wc[t][c], wv);
#pragma unroll
                    for (int j = 0; j < 8; ++j) o[j] = wv[j] * to_f32(from_f32<T>(xv[j] * r));
                    store8(xs + m * k + at(t, c), o);
                }
    }
    __syncthreads();
}

// One step of a lane: the chunks c0, c0 + 32, …, c0 + 32·(U − 1) of each of the R weight rows
// `wr`, all loads issued (gemv_load) before the first product (gemv_fma). FULL: every one of
// them exists (no bounds checks).
template <typename T, int U, int R, bool FULL>
__device__ __forceinline__ void gemv_load(const T *const wr[R], int c0, int chunks, Chunk8<T> wc[R][U]) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int c = c0 + 32 * u;
#pragma unroll
        for (int q = 0; q < R; ++q)
            if (FULL || c < chunks) wc[q][u] = load_chunk_stream(wr[q] + 8 * c);
    }
}

template <typename T, int M, int U, int R, bool FULL>
__device__ __forceinline__ void gemv_fma(const T *__restrict__ x, long long ldx, int c0, int chunks,
                                         const Chunk8<T> wc[R][U], float acc[R][M]) {
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

template <typename T, int M, int U, int R, bool FULL>
__device__ __forceinline__ void gemv_step(const T *__restrict__ x, long long ldx, const T *const wr[R], int c0,
                                          int chunks, float acc[R][M]) {
    Chunk8<T> wc[R][U];
    gemv_load<T, U, R, FULL>(wr, c0, chunks, wc);
    gemv_fma<T, M, U, R, FULL>(x, ldx, c0, chunks, wc, acc);
}

// Output columns per warp for M rows: each x chunk loaded from L1 feeds C weight rows, so at
// M = 8 the x traffic per weight byte stays 2× (not 8×) and L1 keeps up with HBM. The launcher
// (ops::cuda::gemv) sizes the grid with the same function.
__host__ __device__ constexpr int gemv_cols(int m) { return m <= 2 ? 1 : m <= 4 ? 2 : 4; }

// The RMSNorm before a gemv_norm product: its weight, eps and virtual block size.
template <typename T> struct GemvRms {
    const T *nw;
    float eps;
    int vb;
};

template <typename T, int M, int MODE, bool NORM = false>
__device__ void gemv(const T *__restrict__ x, long long ldx, const T *__restrict__ w, long long ldw,
                     const T *__restrict__ r, T *__restrict__ y, int n, int k, GemvRms<T> norm = {}) {
    constexpr int C = gemv_cols(M);                 // output columns per warp
    constexpr int R = MODE == GEMV_SWIGLU ? 2 : 1;  // weight rows per output column
    constexpr int NR = R * C;                       // weight rows per warp: q·C + j
    // 128 bytes of weights in flight per lane whatever T, R and C.
    constexpr int U = (sizeof(T) == 2 ? 8 : 4) / NR > 0 ? (sizeof(T) == 2 ? 8 : 4) / NR : 1;
    const int lane = threadIdx.x & 31;
    const int col0 = (blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5)) * C;
    // A warp past N has nothing to compute (as a whole: no shuffle below is left half-done); with
    // the norm it still takes part in the block's prologue.
    if (!NORM && col0 >= n) return;
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
    if constexpr (NORM) {
        // The first step's weights in flight (they do not depend on the norm), then the
        // prologue; the product reads the normalised rows from shared memory.
        DYN_SMEM(smem);
        T *xs = reinterpret_cast<T *>(smem);
        Chunk8<T> wc[NR][U];
        const bool full = c0 + 32 * (U - 1) < chunks;
        if (full) {
            gemv_load<T, U, NR, true>(wr, c0, chunks, wc);
        } else {
            gemv_load<T, U, NR, false>(wr, c0, chunks, wc);
        }
        gemv_rms_prologue<T, M>(x, ldx, norm.nw, xs, k, norm.eps, norm.vb);
        if (col0 >= n) return;
        x = xs;
        ldx = k;
        if (full) {
            gemv_fma<T, M, U, NR, true>(x, ldx, c0, chunks, wc, acc);
        } else {
            gemv_fma<T, M, U, NR, false>(x, ldx, c0, chunks, wc, acc);
        }
        c0 += 32 * U;
    }
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
                } else if (MODE == GEMV_ADD) {
                    y[o] = from_f32<T>(to_f32(from_f32<T>(acc[j][m])) + to_f32(r[o]));
                } else {
                    const float g = to_f32(from_f32<T>(acc[j][m])), u = to_f32(from_f32<T>(acc[C + j][m]));
                    y[o] = from_f32<T>(g / (1.0f + expf(-g)) * u);
                }
            }
        }
    }
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

#define GEMV_NORM(TY, NAME, M)                                                                            \
    extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS)                                         \
        gemv_norm_##NAME##_m##M(const TY *x, long long ldx, const TY *w, long long ldw, TY *y, int n, int k, \
                                const TY *nw, float eps, int vb) {                                        \
        gemv<TY, M, GEMV_PLAIN, true>(x, ldx, w, ldw, nullptr, y, n, k, GemvRms<TY>{nw, eps, vb});       \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS)                                         \
        gemv_norm_swiglu_##NAME##_m##M(const TY *x, long long ldx, const TY *w, long long ldw, TY *y, int n, \
                                       int k, const TY *nw, float eps, int vb) {                          \
        gemv<TY, M, GEMV_SWIGLU, true>(x, ldx, w, ldw, nullptr, y, n, k, GemvRms<TY>{nw, eps, vb});      \
    }
GEMV_NORM(float, f32, 1)
GEMV_NORM(float, f32, 2)
GEMV_NORM(bf16, bf16, 1)
GEMV_NORM(bf16, bf16, 2)
