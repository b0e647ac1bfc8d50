// Attention forward (causal, and unmasked for CLIP) on Hopper's warpgroup MMA: the
// FlashAttention-3 core (wgmma for both products, P kept in registers as the A operand of P·V)
// without its warp specialisation and TMA: K/V tiles come in by cp.async, double-buffered, as in
// flash_attn.cu's mma.sync kernels, which stay the path on other GPUs and for the backward.
// Needs sm_90a (kernels/build.rs compiles for it when CUDA_COMPUTE_CAP is 90); elsewhere this
// file compiles to nothing and the launcher keeps the mma.sync forward.
//
// Shapes as flash_attn.cu: q, o [B, Hq, T, D] and k, v [B, Hk, T, D] bf16, row-major contiguous
// (16-byte aligned; the launcher checks), Hq % Hk == 0; lse [B, Hq, T] f32; D ∈ {64, 128}.
// Geometry: grid (⌈T/128⌉, Hq, B), 256 threads = 2 warpgroups × 64 query rows; block i takes
// query tile ⌈T/128⌉−1−i (longest first). 64-key tiles from 0 up to the diagonal (causal) or T:
//   S = Q Kᵀ   D/16 × wgmma.m64n64k16, Q and K from shared memory (K-major both);
//   O += P V   4 × wgmma.m64nDk16, P from registers (S's accumulators rounded to bf16, the
//              same packing as flash_fwd_tc), V from shared memory (MN-major: .trans).
// A warpgroup skips the tiles wholly past its last row and masks the ones crossing its diagonal.
// Shared memory: every [rows][D] tile in wgmma's no-swizzle canonical layout (wgmma.cuh): core
// matrix (r/8, c/8) of 8 rows × 8 columns at byte ((r/8)·(D/8) + c/8)·128, row r%8 at +16·(r%8).
// Read as K-major (Q, K) it has LBO 128 and SBO D/8·128; read as MN-major (V, whose rows are
// the contraction) LBO D/8·128 and SBO 128. cp.async writes 16-byte chunks with the 8 rows of a
// core matrix on consecutive threads (conflict-free; each global row read in 64-byte runs).
// Smem wg_fwd_smem_bytes: Q [128], K [2][64], V [2][64] rows of D bf16 (96 KB at D = 128, 48 KB
// at 64); registers allow two blocks an SM at D = 64, one at D = 128.
// Numerics as flash_fwd_tc: f32 accumulation, base-2 online softmax with the scale folded in,
// P rounded to bf16 before P·V, l summed from the unrounded P, lse in natural units.
#include "wgmma.cuh"

#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

constexpr int WG_BM = 128, WG_BN = 64, WG_THREADS = 256;

template <int D> __host__ __device__ constexpr int wg_fwd_smem_bytes() { return (WG_BM + 4 * WG_BN) * D * 2; }

#if SHARDSMITH_WGMMA
// Rows [r0, r0 + N) of a row-major [t, D] bf16 matrix into dst in the canonical layout (zeros
// past row t), by cp.async (the caller commits and waits). Chunk i: row (i/8/(D/8))·8 + i%8,
// column chunk (i/8) % (D/8).
template <int D, int N> __device__ __forceinline__ void wg_tile_load(bf16 *dst, const bf16 *__restrict__ src, int r0, int t) {
    constexpr int C = D / 8;
#pragma unroll
    for (int i = threadIdx.x; i < N * C; i += WG_THREADS) {
        const int r8 = i % 8, c = (i / 8) % C, rg = i / 8 / C, r = 8 * rg + r8;
        const bool ok = r0 + r < t;
        cp_async16(dst + (rg * C + c) * 64 + r8 * 8, src + (size_t)(ok ? r0 + r : 0) * D + 8 * c, ok);
    }
}

template <int D, bool CAUSAL>
__device__ void flash_fwd_wg(const bf16 *__restrict__ q, const bf16 *__restrict__ k, const bf16 *__restrict__ v,
                             bf16 *__restrict__ o, float *__restrict__ lse, int hq, int hk, int t, float scale) {
    static_assert(D == 64 || D == 128, "wgmma forward: D 64 or 128");
    constexpr int KS = D / 16, TILE = WG_BN * D;  // elements of a K or V tile
    constexpr uint32_t KMAJ_LBO = 128, KMAJ_SBO = D / 8 * 128;  // Q, K
    constexpr uint32_t MN_LBO = D / 8 * 128, MN_SBO = 128;       // V
#ifndef SHARDSMITH_EMU
    {
        unsigned have;
        asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(have));
        if (have < (unsigned)wg_fwd_smem_bytes<D>() || blockDim.x != WG_THREADS) __trap();
    }
#endif
    DYN_SMEM(smem);
    bf16 *sQ = reinterpret_cast<bf16 *>(smem);  // [128 rows]
    bf16 *sK = sQ + WG_BM * D;                    // [2][64 rows]
    bf16 *sV = sK + 2 * TILE;                     // [2][64 rows]

    const int nq = (t + WG_BM - 1) / WG_BM;
    const int q0 = (nq - 1 - (int)blockIdx.x) * WG_BM;
    const int hkv = blockIdx.y / (hq / hk);
    const bf16 *qh = q + ((size_t)blockIdx.z * hq + blockIdx.y) * t * D;
    const bf16 *kh = k + ((size_t)blockIdx.z * hk + hkv) * t * D;
    const bf16 *vh = v + ((size_t)blockIdx.z * hk + hkv) * t * D;
    const int wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x & 31;
    const int g = lane >> 2, tq = lane & 3;
    const int wq0 = q0 + 64 * wg;        // this warpgroup's first query
    const int rq0 = wq0 + 16 * warp;     // this warp's first query (rows rq0 + g, rq0 + g + 8)
    const int ntiles = ((CAUSAL ? min(q0 + WG_BM, t) : t) + WG_BN - 1) / WG_BN;

    wg_tile_load<D, WG_BM>(sQ, qh, q0, t);
    wg_tile_load<D, WG_BN>(sK, kh, 0, t);
    wg_tile_load<D, WG_BN>(sV, vh, 0, t);
    cp_async_commit();

    float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.f, 0.f};
    float acc[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[j][i] = 0.f;
    const float sl2 = scale * LOG2E;
    // This warpgroup's 64 rows of Q: 8-row groups 8·wg .. as the A descriptor's start.
    const bf16 *wQ = sQ + 64 * wg * D;

    for (int j = 0; j < ntiles; ++j) {
        const int k0 = j * WG_BN;
        if (j + 1 < ntiles) {
            const int nb = (j + 1) & 1;
            wg_tile_load<D, WG_BN>(sK + nb * TILE, kh, k0 + WG_BN, t);
            wg_tile_load<D, WG_BN>(sV + nb * TILE, vh, k0 + WG_BN, t);
        }
        cp_async_commit();  // possibly empty: keeps the wait count uniform
        cp_async_wait<1>();
        wgmma_fence_smem();  // this thread's cp.async data → visible to wgmma (async proxy)
        __syncthreads();
        // Every key of the tile lies past this warpgroup's rows (causal), warpgroup-uniform.
        if (!CAUSAL || k0 <= wq0 + 63) {
            const bf16 *cK = sK + (j & 1) * TILE, *cV = sV + (j & 1) * TILE;
            float s[WG_BN / 8][4];
            wgmma_fence();
#pragma unroll
            for (int ks = 0; ks < KS; ++ks)  // 16 columns of D = 2 core matrices along K
                wgmma_ss_m64n64k16(s, wgmma_desc(wQ + ks * 2 * 64, KMAJ_LBO, KMAJ_SBO),
                                   wgmma_desc(cK + ks * 2 * 64, KMAJ_LBO, KMAJ_SBO), ks > 0);
            wgmma_commit();
            wgmma_wait<0>();
            if (CAUSAL ? k0 + WG_BN - 1 > rq0 : k0 + WG_BN > t) {  // crosses the diagonal / the end
#pragma unroll
                for (int nt = 0; nt < WG_BN / 8; ++nt)
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        const int query = rq0 + g + 8 * (i >> 1), key = k0 + 8 * nt + 2 * tq + (i & 1);
                        if (CAUSAL ? key > query : key >= t) s[nt][i] = -INFINITY;
                    }
            }
            float mb[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float mx = m_r[r];
#pragma unroll
                for (int nt = 0; nt < WG_BN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                // finite once a row has seen key 0 (tile 0 is never skipped): a row whose keys
                // in this tile all lie past it keeps its max (−∞ − m is −∞, p = 0)
                const float alpha = fast_exp2((m_r[r] - mx) * sl2);
                m_r[r] = mx;
                mb[r] = mx * sl2;
                l_r[r] *= alpha;
#pragma unroll
                for (int nt = 0; nt < D / 8; ++nt) acc[nt][2 * r] *= alpha, acc[nt][2 * r + 1] *= alpha;
            }
#pragma unroll
            for (int nt = 0; nt < WG_BN / 8; ++nt)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const float p = fast_exp2(fmaf(s[nt][i], sl2, -mb[i >> 1]));
                    l_r[i >> 1] += p;
                    s[nt][i] = p;
                }
            wgmma_fence();  // acc was rescaled by ordinary instructions
#pragma unroll
            for (int kk = 0; kk < WG_BN / 16; ++kk) {  // 16 keys = 2 core matrices along K
                uint32_t a[4];
                a[0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
                a[1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
                a[2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
                a[3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
                const uint64_t dv = wgmma_desc(cV + kk * 2 * D / 8 * 64, MN_LBO, MN_SBO);
                if constexpr (D == 128)
                    wgmma_rs_m64n128k16_tb(acc, a, dv, 1);
                else
                    wgmma_rs_m64n64k16_tb(acc, a, dv, 1);
            }
            wgmma_commit();
            wgmma_wait<0>();
        }
        __syncthreads();  // the next iteration's loads overwrite this tile's buffer
    }

    const size_t hoff = ((size_t)blockIdx.z * hq + blockIdx.y) * t;
    bf16 *oh = o + hoff * D;
    float *lh = lse + hoff;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = l_r[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const int query = rq0 + g + 8 * r;
        if (query >= t) continue;
        const float inv = 1.0f / l;
#pragma unroll
        for (int nt = 0; nt < D / 8; ++nt)
            *reinterpret_cast<uint32_t *>(oh + (size_t)query * D + 8 * nt + 2 * tq) =
                pack_bf16(acc[nt][2 * r] * inv, acc[nt][2 * r + 1] * inv);
        if (tq == 0) lh[query] = (m_r[r] * sl2 + log2f(l)) * LN2;
    }
}

// D = 128 needs more than the 128 registers of two blocks an SM (O alone is 64 a thread): one.
#define FLASH_WG(D, BLOCKS_PER_SM)                                                                    \
    extern "C" __global__ void __launch_bounds__(WG_THREADS, BLOCKS_PER_SM)                           \
        flash_fwd_wg_bf16_d##D(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *o, float *lse, int hq, \
                               int hk, int t, float scale) {                                          \
        flash_fwd_wg<D, true>(q, k, v, o, lse, hq, hk, t, scale);                                     \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(WG_THREADS, BLOCKS_PER_SM)                           \
        flash_fwd_full_wg_bf16_d##D(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *o, float *lse,  \
                                    int hq, int hk, int t, float scale) {                             \
        flash_fwd_wg<D, false>(q, k, v, o, lse, hq, hk, t, scale);                                    \
    }
FLASH_WG(64, 2)
FLASH_WG(128, 1)
#endif  // SHARDSMITH_WGMMA
