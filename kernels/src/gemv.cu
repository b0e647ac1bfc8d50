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
//         (the launcher, ops::cuda::gemv, checks all of it and leaves other shapes to cuBLAS).
// Launch: grid ⌈N / 4⌉, block 128 (4 warps), no shared memory: warp i of block b computes
//         output column n = 4b + i for all M rows. Lane l reads the 8-element chunks
//         l, l + 32, l + 64, … of w's row n, U chunks (U·16 bytes) in flight per lane.
// Numerics: f32 accumulation with fmaf, each lane over its chunks in order, then a xor-shuffle
//           tree over the warp; one rounding to T. cuBLAS (the reference: ops::matmul on the
//           CPU) also accumulates bf16 products in f32, in another order.
// Supported T: f32, bf16.
#include "common.cuh"

constexpr int GEMV_WARPS = 4;

// Eight elements of T as raw 16-byte words, loaded streaming (read once: no L1 allocation, so
// L1 keeps x for the other warps of the SM).
template <typename T> struct Chunk8 {
    uint4 u[sizeof(T) / 2];
};

__device__ __forceinline__ uint4 ld_stream16(const void *p) {
#ifdef SHARDSMITH_EMU
    return *reinterpret_cast<const uint4 *>(p);
#else
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
    return r;
#endif
}

template <typename T> __device__ __forceinline__ Chunk8<T> load_chunk_stream(const T *p) {
    Chunk8<T> c;
#pragma unroll
    for (int i = 0; i < (int)(sizeof(T) / 2); ++i) c.u[i] = ld_stream16(reinterpret_cast<const uint4 *>(p) + i);
    return c;
}

// The chunk's eight values as f32.
__device__ __forceinline__ void unpack8(const Chunk8<bf16> &c, float v[8]) {
    const uint32_t w[4] = {c.u[0].x, c.u[0].y, c.u[0].z, c.u[0].w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        v[2 * i] = __uint_as_float(w[i] << 16);
        v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
__device__ __forceinline__ void unpack8(const Chunk8<float> &c, float v[8]) {
    const uint32_t w[8] = {c.u[0].x, c.u[0].y, c.u[0].z, c.u[0].w, c.u[1].x, c.u[1].y, c.u[1].z, c.u[1].w};
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = __uint_as_float(w[i]);
}

// One step of a lane: the chunks c0, c0 + 32, …, c0 + 32·(U − 1) of w's row `wr`, all loads
// issued before the first product. FULL: every one of them exists (no bounds checks).
template <typename T, int M, int U, bool FULL>
__device__ __forceinline__ void gemv_step(const T *__restrict__ x, long long ldx, const T *__restrict__ wr,
                                          int c0, int chunks, float acc[M]) {
    Chunk8<T> wc[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int c = c0 + 32 * u;
        if (FULL || c < chunks) wc[u] = load_chunk_stream(wr + 8 * c);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int c = c0 + 32 * u;
        if (!FULL && c >= chunks) break;
        float wv[8];
        unpack8(wc[u], wv);
#pragma unroll
        for (int m = 0; m < M; ++m) {
            float xv[8];
            load8(x + m * ldx + 8 * c, xv);
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[m] = fmaf(wv[j], xv[j], acc[m]);
        }
    }
}

template <typename T, int M>
__device__ void gemv(const T *__restrict__ x, long long ldx, const T *__restrict__ w, long long ldw,
                     T *__restrict__ y, int n, int k) {
    // 128 bytes of the weight in flight per lane whatever T.
    constexpr int U = sizeof(T) == 2 ? 8 : 4;
    const int lane = threadIdx.x & 31;
    const int col = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (col >= n) return;  // the whole warp: no shuffles below are left half-done
    const T *wr = w + (long long)col * ldw;
    const int chunks = k / 8;
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = 0.f;
    int c0 = lane;
    for (; c0 + 32 * (U - 1) < chunks; c0 += 32 * U) gemv_step<T, M, U, true>(x, ldx, wr, c0, chunks, acc);
    if (c0 < chunks) gemv_step<T, M, U, false>(x, ldx, wr, c0, chunks, acc);  // the rest, in one step
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = warp_sum(acc[m]);
    if (lane == 0) {
#pragma unroll
        for (int m = 0; m < M; ++m) y[(long long)m * n + col] = from_f32<T>(acc[m]);
    }
}

#define GEMV(TY, NAME, M)                                                                              \
    extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS)                                      \
        gemv_##NAME##_m##M(const TY *x, long long ldx, const TY *w, long long ldw, TY *y, int n, int k) { \
        gemv<TY, M>(x, ldx, w, ldw, y, n, k);                                                          \
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
