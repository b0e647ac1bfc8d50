// Shared helpers for shardsmith's kernels: dtype conversion, warp/block reductions, and the
// bf16 tensor-core MMA (mma.sync.m16n8k16) with its fragment layout written down.
//
// Every kernel file is compiled on its own by build.rs (one PTX module per .cu). With
// SHARDSMITH_EMU defined, the same sources build as host C++ against kernels/emu/emu.h, a
// thread-per-CUDA-thread emulator used to check indexing and reductions without a GPU.
#pragma once

#ifdef SHARDSMITH_EMU
#include "../emu/emu.h"
#else
#include <cuda_bf16.h>
#include <stdint.h>
#define SHARDSMITH_DEVICE 1
#define DYN_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
// Round to nearest even, as half::bf16::from_f32 on the CPU.
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) { return __float2bfloat16(x); }

// Eight consecutive elements as f32, moved with 16-byte (bf16) or 2×16-byte (f32) accesses; the
// pointer must be 16-byte aligned (see aligned16).
__device__ __forceinline__ void load8(const float *p, float v[8]) {
    const float4 a = reinterpret_cast<const float4 *>(p)[0], b = reinterpret_cast<const float4 *>(p)[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ __forceinline__ void load8(const bf16 *p, float v[8]) {
    const uint4 u = *reinterpret_cast<const uint4 *>(p);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        v[2 * i] = __uint_as_float(w[i] << 16);
        v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
__device__ __forceinline__ void store8(float *p, const float v[8]) {
    reinterpret_cast<float4 *>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4 *>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
// Two floats as a bf16 pair (lo in the low half), each rounded to nearest even: one
// cvt.rn.bf16x2.f32 on the device.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
#ifdef SHARDSMITH_EMU
    return (uint32_t)__bfloat16_as_ushort(__float2bfloat16(lo)) |
           ((uint32_t)__bfloat16_as_ushort(__float2bfloat16(hi)) << 16);
#else
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x = lo: the low half
    return *reinterpret_cast<const uint32_t *>(&v);
#endif
}
__device__ __forceinline__ void store8(bf16 *p, const float v[8]) {
    *reinterpret_cast<uint4 *>(p) =
        make_uint4(pack_bf16(v[0], v[1]), pack_bf16(v[2], v[3]), pack_bf16(v[4], v[5]), pack_bf16(v[6], v[7]));
}
__device__ __forceinline__ bool aligned16(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Eight elements of T as raw 16-byte words, loaded streaming (read once: no L1 allocation, so
// L1 keeps what is read again, as a GEMV's x), and unpacked when used: a kernel that issues
// several loads before it needs any keeps them raw, or the compiler waits on each to convert it.
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

// Eight elements of T as raw words, loaded as any other (kept in L1).
template <typename T> __device__ __forceinline__ Chunk8<T> load_chunk(const T *p) {
    Chunk8<T> c;
#pragma unroll
    for (int i = 0; i < (int)(sizeof(T) / 2); ++i) c.u[i] = reinterpret_cast<const uint4 *>(p)[i];
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

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over a 1-D block (blockDim.x a multiple of 32, at most 1024); every thread must call it,
// every thread gets the total. `scratch` is 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float *scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float t = lane < nw ? scratch[lane] : 0.f;
        t = warp_sum(t);
        if (lane == 0) scratch[0] = t;
    }
    __syncthreads();
    return scratch[0];
}

__device__ __forceinline__ float block_max(float v, float *scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float t = lane < nw ? scratch[lane] : -INFINITY;
        t = warp_max(t);
        if (lane == 0) scratch[0] = t;
    }
    __syncthreads();
    return scratch[0];
}

// ---------------------------------------------------------------------------------------------
// Warp-level 16×8×16 tile product, C[16×8] += A[16×16] · B[16×8], fp32 accumulate.
//
// Fragment layout of mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 (PTX ISA, "Matrix
// fragments for mma.m16n8k16"), lane = 4·g + t (g = lane/4 ∈ [0,8), t = lane%4):
//   A regs a0..a3, each two bf16 (low half = lower column):
//     a0 = A[g][2t..2t+1]   a1 = A[g+8][2t..2t+1]   a2 = A[g][2t+8..]   a3 = A[g+8][2t+8..]
//   B regs b0, b1 (low half = lower k):  b0 = B[2t..2t+1][g]   b1 = B[2t+8..2t+9][g]
//   C/D: c0,c1 = C[g][2t], C[g][2t+1];  c2,c3 = C[g+8][2t], C[g+8][2t+1]
// Operands are read through accessors: `a(r, k)` = A[r][k] and `bt(n, k)` = B[k][n] (B
// transposed, so both pair along their second index). Row-major accessors load the pair as one
// 32-bit word; transposed ones make two 16-bit loads. For f32 operands the same accumulator
// layout is computed with scalar FMAs (each lane reads its rows/columns directly), so the
// kernels around the product are shared between the bf16 (tensor-core) and f32 paths.
// ---------------------------------------------------------------------------------------------

// Element (r, c) at p[r·ld + c].
template <typename T> struct RowMajor {
    const T *p;
    int ld;
    __device__ __forceinline__ RowMajor(const T *p_, int ld_) : p(p_), ld(ld_) {}
    __device__ __forceinline__ float get(int r, int c) const { return to_f32(p[r * ld + c]); }
    // Elements (r, c) and (r, c+1) as a bf16 pair; c even, ld even, p 4-byte aligned.
    __device__ __forceinline__ uint32_t pair(int r, int c) const {
        return *reinterpret_cast<const uint32_t *>(p + r * ld + c);
    }
    __device__ __forceinline__ RowMajor at(int r, int c) const { return RowMajor(p + r * ld + c, ld); }
};

// Element (r, c) at p[c·ld + r] (a transposed view of a row-major buffer).
template <typename T> struct ColMajor {
    const T *p;
    int ld;
    __device__ __forceinline__ ColMajor(const T *p_, int ld_) : p(p_), ld(ld_) {}
    __device__ __forceinline__ float get(int r, int c) const { return to_f32(p[c * ld + r]); }
    __device__ __forceinline__ uint32_t pair(int r, int c) const {
        const uint16_t *q = reinterpret_cast<const uint16_t *>(p);
        return (uint32_t)q[c * ld + r] | ((uint32_t)q[(c + 1) * ld + r] << 16);
    }
    __device__ __forceinline__ ColMajor at(int r, int c) const { return ColMajor(p + c * ld + r, ld); }
};

__device__ __forceinline__ void mma_bf16_16816(float c[4], const uint32_t a[4], const uint32_t b[2]) {
#ifdef SHARDSMITH_EMU
    emu::mma_bf16_16816(c, a, b);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// C += A · B for one 16×8 output tile, k = 16. `a` is positioned at A's tile origin, `bt` at
// Bᵀ's (n, k) origin. T = bf16 uses the tensor cores; T = float uses scalar FMAs.
template <typename T, typename AA, typename BB>
__device__ __forceinline__ void mma_tile(float c[4], const AA &a, const BB &bt) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    if constexpr (sizeof(T) == 2) {
        uint32_t ar[4], br[2];
        ar[0] = a.pair(g, 2 * t);
        ar[1] = a.pair(g + 8, 2 * t);
        ar[2] = a.pair(g, 2 * t + 8);
        ar[3] = a.pair(g + 8, 2 * t + 8);
        br[0] = bt.pair(g, 2 * t);
        br[1] = bt.pair(g, 2 * t + 8);
        mma_bf16_16816(c, ar, br);
    } else {
#pragma unroll 4  // the f32 path is for parity, not speed: keep its code small
        for (int k = 0; k < 16; ++k) {
            const float a0 = a.get(g, k), a1 = a.get(g + 8, k);
            const float b0 = bt.get(2 * t, k), b1 = bt.get(2 * t + 1, k);
            c[0] = fmaf(a0, b0, c[0]);
            c[1] = fmaf(a0, b1, c[1]);
            c[2] = fmaf(a1, b0, c[2]);
            c[3] = fmaf(a1, b1, c[3]);
        }
    }
}

// C += A · B where A [16×16] is held in registers in the accumulator layout of two adjacent
// 16×8 tiles (a0 = columns 0..7, a1 = columns 8..15) — what a previous mma_tile left, like
// FlashAttention's P. For bf16 the C layout of the pair is exactly the A-fragment layout
// (a0 = {a0[0], a0[1]}, a1 = {a0[2], a0[3]}, a2 = {a1[0], a1[1]}, a3 = {a1[2], a1[3]}), rounded
// to bf16; for f32 each lane gathers its rows with shuffles (column k = 8h + 2t' + e of row g
// sits in lane 4g + t', tile h, element e; row g+8 in element e + 2).
template <typename T, typename BB>
__device__ __forceinline__ void mma_tile_areg(float c[4], const float a0[4], const float a1[4], const BB &bt) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    if constexpr (sizeof(T) == 2) {
        const uint32_t ar[4] = {pack_bf16(a0[0], a0[1]), pack_bf16(a0[2], a0[3]), pack_bf16(a1[0], a1[1]),
                                pack_bf16(a1[2], a1[3])};
        const uint32_t br[2] = {bt.pair(g, 2 * t), bt.pair(g, 2 * t + 8)};
        mma_bf16_16816(c, ar, br);
    } else {
#pragma unroll
        for (int k = 0; k < 16; ++k) {
            const float *a = k < 8 ? a0 : a1;
            const int src = 4 * g + ((k & 7) >> 1), e = k & 1;
            const float lo = __shfl_sync(0xffffffffu, a[e], src), hi = __shfl_sync(0xffffffffu, a[e + 2], src);
            const float b0 = bt.get(2 * t, k), b1 = bt.get(2 * t + 1, k);
            c[0] = fmaf(lo, b0, c[0]);
            c[1] = fmaf(lo, b1, c[1]);
            c[2] = fmaf(hi, b0, c[2]);
            c[3] = fmaf(hi, b1, c[3]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// ldmatrix, cp.async and ex2 (sm_80+), used by the bf16 attention kernels. In the emulator
// (emu.h) ldmatrix is emulated from its PTX fragment semantics and cp.async copies are deferred
// until the cp.async.wait_group that covers them (so a read before the wait sees stale data).
//
// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16: lanes 8m..8m+7 give the row addresses
// (16 bytes each, 16-byte aligned) of 8×8 matrix m; register m of lane l = 4g + t holds row g,
// columns 2t, 2t+1 of matrix m (low half = lower column); with .trans, rows 2t, 2t+1 of
// column g (i.e. the same positions of the transposed matrix).
// ---------------------------------------------------------------------------------------------
#ifdef SHARDSMITH_DEVICE
__device__ __forceinline__ uint32_t smem_u32(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }
#endif

__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void *p) {
#ifdef SHARDSMITH_EMU
    emu::ldmatrix(r, 4, false, p);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void *p) {
#ifdef SHARDSMITH_EMU
    emu::ldmatrix(r, 4, true, p);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
#endif
}

// The A fragment of a 16×16 operand (rows as an accumulator's, 16 columns) from two adjacent
// 16×8 accumulator tiles, rounded to bf16: how P and dS feed the next product in registers.
__device__ __forceinline__ void acc_to_a(uint32_t a[4], const float lo[4], const float hi[4]) {
    a[0] = pack_bf16(lo[0], lo[1]);
    a[1] = pack_bf16(lo[2], lo[3]);
    a[2] = pack_bf16(hi[0], hi[1]);
    a[3] = pack_bf16(hi[2], hi[3]);
}

// A launch with less dynamic shared memory than the tiles need (or, for the kernels that pass
// it, another block size than they are written for) would corrupt memory silently.
__device__ __forceinline__ void require_smem(unsigned need, unsigned threads = 0) {
#ifndef SHARDSMITH_EMU
    unsigned have;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(have));
    if (have < need || (threads && blockDim.x != threads)) __trap();
#else
    if (threads && blockDim.x != threads) throw "emu: wrong block size";
#endif
}

// The (tile, head, batch) a block of an attention grid (tiles, heads, batch) works on, read from
// its linear index with the tile slowest. The block scheduler starts blocks in linear order (x
// fastest), and the causal kernels number their tiles heaviest first, so the whole grid now
// runs longest-first: every head's and sequence's tile 0 starts before any tile 1. Taken
// straight from blockIdx, the order was longest-first only within a head, the last heads'
// heaviest tiles started last, and the GPU ended on a tail of them (with 2048 blocks over 132
// SMs, up to one heaviest tile, ~1/8 of a causal B2 H32 S4096 pass). A bijection of the grid:
// launches are unchanged, each block does what some block did before.
// For timing the two orders against each other: the host sets attn_head_major to 1 in the
// attention modules (ops::cuda, SHARDSMITH_ATTN_ORDER=head), and then blockIdx's own order is
// kept.
struct GridTile {
    int tile, head, batch;
};
__constant__ int attn_head_major;
__device__ __forceinline__ GridTile heaviest_first() {
    if (attn_head_major) return {(int)blockIdx.x, (int)blockIdx.y, (int)blockIdx.z};
    const unsigned hb = gridDim.y * gridDim.z;
    const unsigned linear = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const unsigned rest = linear % hb;
    return {(int)(linear / hb), (int)(rest % gridDim.y), (int)(rest / gridDim.y)};
}

// 16 bytes global → shared, asynchronously (L2 only: .cg); `valid` false zero-fills the 16 bytes
// without reading `src` (src-size 0). Both addresses 16-byte aligned.
__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool valid) {
#ifdef SHARDSMITH_EMU
    emu::cp_async(dst, src, 16, valid ? 16 : 0);
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
                 "r"(valid ? 16 : 0)
                 : "memory");
#endif
}
// 4 bytes global → shared, asynchronously (.ca); `valid` false zero-fills them without reading
// `src`. Both addresses 4-byte aligned.
__device__ __forceinline__ void cp_async4(void *dst, const void *src, bool valid) {
#ifdef SHARDSMITH_EMU
    emu::cp_async(dst, src, 4, valid ? 4 : 0);
#else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
                 "r"(valid ? 4 : 0)
                 : "memory");
#endif
}

// For the attention backward kernels: lse and Δ of queries q0 .. q0 + N of one head (loff: the
// head's offset into [B, Hq, T]) into shared memory by 4-byte cp.async, in the caller's next
// commit group, so that no thread stalls on the loads before the barrier that follows (plain
// loads and stores held every step for a global load's latency); NTH threads share the work.
// lse as it is (the caller scales it by log2 e where it reads it: the same rounding), both zero
// past T. A query row past T then gets P = 2^(0 − 0) = 1 rather than 0, which changes nothing
// because its Q and dO rows are zero-filled by the tile loads: its dP, hence dS, is 0, and P·dO
// adds zeros. Threads 0 .. NTH of the block call it.
template <int N, int NTH>
__device__ __forceinline__ void stage_lse_delta_async(float *sl, float *sd, const float *__restrict__ lse,
                                                      const float *__restrict__ delta, size_t loff, int q0, int t) {
    for (int i = threadIdx.x; i < 2 * N; i += NTH) {
        const int r = i % N;
        const bool ok = q0 + r < t;
        cp_async4(i < N ? sl + r : sd + r, (i < N ? lse : delta) + loff + (ok ? q0 + r : 0), ok);
    }
}

__device__ __forceinline__ void cp_async_commit() {
#ifdef SHARDSMITH_EMU
    emu::cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
// Wait until at most N of this thread's committed groups are pending (then __syncthreads to see
// the other threads' copies).
template <int N> __device__ __forceinline__ void cp_async_wait() {
#ifdef SHARDSMITH_EMU
    emu::cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// 2^x with the hardware approximation (ex2.approx.ftz: ~2 ulp, -inf → +0), as FlashAttention
// uses for the softmax.
__device__ __forceinline__ float fast_exp2(float x) {
#ifdef SHARDSMITH_EMU
    return exp2f(x);
#else
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
#endif
}

// dst[0] += a, dst[1] += b in global memory (dst 8-byte aligned): one vector reduction
// (red.global.add.v2.f32, sm_90 and later), else two f32 atomics. Nothing is returned, so the
// adds are fire-and-forget reductions either way.
__device__ __forceinline__ void atomic_add2(float *dst, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(dst), "f"(a), "f"(b) : "memory");
#else
    atomicAdd(dst, a);
    atomicAdd(dst + 1, b);
#endif
}
