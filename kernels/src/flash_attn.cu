// Causal self-attention (and a non-causal bf16 forward) in the FlashAttention-2 style: tiled, online softmax, no T×T matrix in
// memory; forward, and backward by recomputation from the saved log-sum-exp. Two families:
// bf16 runs the tensor-core kernels (`*_tc`, second half of this file: ldmatrix, cp.async double
// buffering, 128-row query tiles); f32 runs the scalar-FMA kernels of the first half (a parity
// path: same algorithm, simple code).
//
// Shapes (row-major contiguous): q, o, do, dq [B, Hq, T, D]; k, v, dk, dv [B, Hk, T, D] with
//   Hq % Hk == 0 (GQA: query head h reads K/V head h / (Hq/Hk), the group's heads consecutive,
//   as in models::llama); lse, delta [B, Hq, T] f32; dq_acc [B, Hq, T, D] f32, zero-filled (f32).
//   Queries and keys are the same T positions (training); query i sees keys j ≤ i.
//   D ∈ {32, 64, 96, 128}; T ≥ 1 any (partial tiles are masked / zero-filled).
// bf16 kernels (geometry and shared memory in detail above each kernel):
//   flash_fwd_bf16_dD       grid (⌈T/128⌉, Hq, B), block 128 (4 warps × 32 query rows), 2 blocks
//                           an SM; smem (128 + 4·64)·(D+8)·2 bytes.
//   flash_fwd_full_bf16_dD  the same without the causal mask (every query sees all T keys; forward
//                           only): the CLIP vision tower's attention.
//   flash_bwd_pre_bf16_dD   grid (⌈B·Hq·T/4⌉), block 128, one warp per row: delta = Σ_d dO·O.
//   flash_bwd_dq_bf16_dD    grid (⌈T/128⌉, Hq, B), block 128 (4 warps × 32 query rows); writes dq
//                           (bf16) directly; smem (2·128 + 4·32)·(D+8)·2 bytes.
//   flash_bwd_dkdv_bf16_dD  grid (⌈T/128⌉, Hk, B), block 256 (8 warps × 16 keys); writes dk, dv;
//                           smem (2·128 + 4·32)·(D+8)·2 + 4·32·4 bytes.
//   No atomics: dQ is recomputed per query tile (S and dP again: 7 tile products instead of 5)
//   rather than accumulated from the key-tile blocks.
//   flash_bwd_dkdv64_bf16_dD  the same grid and outputs in 64-query steps, Pᵀ and dSᵀ staged in
//                           shared memory (fewer shared reads per MMA); smem kv64_tc_smem_bytes.
//   flash_bwd_dkdvdq_bf16_dD  dkdv64 that also adds dS·K into dq_acc (f32, zero-filled) with
//                           atomics: 5 tile products, no dQ kernel. The launcher picks one of
//                           dq + dkdv, dq + dkdv64, dkdvdq, or flash_wg.cu's wgmma backward
//                           (ops::attention::FlashBackward).
// Block order (every kernel here and in flash_wg.cu): a block reads its (tile, head, batch) from
//   its linear index, tile slowest (common.cuh's heaviest_first), so "block i" below means the
//   i-th tile of every head, and the heaviest tiles of all heads start first.
// f32 kernels (4 warps = 128 threads per block; PAD = 16 bytes of T per shared row against bank
//   conflicts; LD = D + PAD; global tiles move in 16-byte chunks when 16-byte aligned):
//   flash_fwd_f32_dD  grid (⌈T/64⌉, Hq, B); block i handles query tile ⌈T/64⌉−1−i (longest first),
//               16 query rows per warp, 64-key tiles. P stays in registers (the S accumulators
//               are the A operand of P·V). Dynamic smem (64·LD·2 + D·(64+PAD))·sizeof(T):
//               Q, K and Vᵀ tiles.
//   flash_bwd_pre_f32_dD  as the bf16 one.
//   flash_bwd_f32_dD  grid (⌈T/64⌉, Hk, B); block = one 64-key tile of one K/V head, 16 keys per
//               warp; loops over the group's query heads and the 32-query tiles at or after the
//               key tile; Sᵀ, dPᵀ (hence Pᵀ, dSᵀ) live in registers and feed dV += Pᵀ dO and
//               dK += dSᵀ Q directly; dK, dV accumulate in registers (summed over the group: no
//               atomics); dS goes through shared memory for dQ += dS K, added to dq_acc (= dq)
//               with f32 atomics. Dynamic smem (2·64·LD + D·(64+PAD) + 2·32·LD + 2·D·(32+PAD)
//               + 32·(64+PAD))·sizeof(T) + 2·32·4: K, Kᵀ, V, Q, Qᵀ, dO, dOᵀ, dS tiles, lse and
//               delta of the query tile (transposed copies so every B operand is row-major).
// Numerics: bf16 operands on the tensor cores (mma.sync m16n8k16) with f32 accumulation, or f32
//   operands with scalar f32 FMAs (mma_tile, common.cuh). Softmax statistics in f32, base 2 with
//   the scale folded in (s·scale·log2 e; the bf16 kernels use ex2.approx); lse is stored in
//   natural units of the scaled scores. P (and dS) are rounded to T before they multiply V (dO,
//   Q, K), as FlashAttention does; the row sum l uses the unrounded P. dS carries the softmax
//   scale. Reference: ops::attention's CPU forward (materialised softmax(QKᵀ·scale)V in f32) and
//   candle autograd through it.
#include "common.cuh"

#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

constexpr int NW = 4;     // warps per block
constexpr int BR = 64;    // forward: query rows per block
constexpr int BC = 64;    // keys per tile (forward and backward)
constexpr int BQ = 32;    // backward: query rows per inner step

template <typename T> __host__ __device__ constexpr int pad_of() { return 16 / (int)sizeof(T); }

// Shared-memory bytes of each kernel (the launcher computes the same; require_smem checks).
template <typename T, int D> __host__ __device__ constexpr int fwd_smem_bytes() {
    return (BR * (D + pad_of<T>()) + BC * (D + pad_of<T>()) + D * (BC + pad_of<T>())) * (int)sizeof(T);
}
template <typename T, int D> __host__ __device__ constexpr int bwd_smem_bytes() {
    return (2 * BC * (D + pad_of<T>()) + D * (BC + pad_of<T>()) + 2 * BQ * (D + pad_of<T>()) +
            2 * D * (BQ + pad_of<T>()) + BQ * (BC + pad_of<T>())) *
               (int)sizeof(T) +
           2 * BQ * 4;
}

// Rows [r0, r0 + N) of a row-major [t, D] matrix into shared memory, row-major into `dst` (row
// stride ld) and/or transposed into `dst_t` ([D][ldt]); zeros past row t. Each thread moves
// 8-element chunks, rows fastest across the block (so the transposed stores hit distinct banks);
// 16-byte global loads when the source is 16-byte aligned.
template <typename T, int D, int N>
__device__ __forceinline__ void load_rows(T *dst, int ld, T *dst_t, int ldt, const T *__restrict__ src, int r0,
                                          int t) {
    constexpr int C = D / 8;
    const bool vec = aligned16(src);
    for (int i = threadIdx.x; i < N * C; i += NW * 32) {
        const int r = i % N, c = (i / N) * 8;
        float v[8];
        if (r0 + r < t) {
            const T *p = src + (size_t)(r0 + r) * D + c;
            if (vec) {
                load8(p, v);
            } else {
#pragma unroll
                for (int j = 0; j < 8; ++j) v[j] = to_f32(p[j]);
            }
        } else {
#pragma unroll
            for (int j = 0; j < 8; ++j) v[j] = 0.f;
        }
        if (dst) store8(dst + r * ld + c, v);
        if (dst_t) {
#pragma unroll
            for (int j = 0; j < 8; ++j) dst_t[(c + j) * ldt + r] = from_f32<T>(v[j]);
        }
    }
}

template <typename T, int D>
__device__ void flash_fwd(const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v,
                          T *__restrict__ o, float *__restrict__ lse, int hq, int hk, int t, float scale) {
    constexpr int PAD = pad_of<T>(), LD = D + PAD, LDV = BC + PAD;
    require_smem(fwd_smem_bytes<T, D>());
    DYN_SMEM(smem);
    T *sQ = reinterpret_cast<T *>(smem);  // [BR][LD]
    T *sK = sQ + BR * LD;                   // [BC][LD]
    T *sVt = sK + BC * LD;                  // [D][LDV]: V transposed, so P·V reads 32-bit pairs

    const int nq = (t + BR - 1) / BR;
    const GridTile blk = heaviest_first();
    const int qt = nq - 1 - blk.tile;
    const int h = blk.head, b = blk.batch;
    const int hkv = h / (hq / hk);
    const T *qh = q + ((size_t)b * hq + h) * t * D;
    const T *kh = k + ((size_t)b * hk + hkv) * t * D;
    const T *vh = v + ((size_t)b * hk + hkv) * t * D;
    const int q0 = qt * BR;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;

    load_rows<T, D, BR>(sQ, LD, nullptr, 0, qh, q0, t);
    float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.f, 0.f};
    float acc[D / 8][4];
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[nt][i] = 0.f;
    const float sl2 = scale * LOG2E;
    const int kend = min(q0 + BR, t);  // keys [0, kend) can be visible to this tile
    const RowMajor<T> aQ = RowMajor<T>(sQ, LD).at(16 * warp, 0);

    for (int k0 = 0; k0 < kend; k0 += BC) {
        __syncthreads();  // the previous tile's K/V reads are done
        load_rows<T, D, BC>(sK, LD, nullptr, 0, kh, k0, t);
        load_rows<T, D, BC>(nullptr, 0, sVt, LDV, vh, k0, t);
        __syncthreads();

        float s[BC / 8][4];
#pragma unroll
        for (int nt = 0; nt < BC / 8; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) s[nt][i] = 0.f;
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks)
#pragma unroll
            for (int nt = 0; nt < BC / 8; ++nt)
                mma_tile<T>(s[nt], aQ.at(0, 16 * ks), RowMajor<T>(sK, LD).at(8 * nt, 16 * ks));

        float tmax[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < BC / 8; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int query = q0 + 16 * warp + g + 8 * (i >> 1);
                const int key = k0 + 8 * nt + 2 * tq + (i & 1);
                const float x = (key > query || key >= t) ? -INFINITY : s[nt][i] * sl2;
                s[nt][i] = x;
                tmax[i >> 1] = fmaxf(tmax[i >> 1], x);
            }
        float alpha[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffffu, tmax[r], 1));
            tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffffu, tmax[r], 2));
            const float m_new = fmaxf(m_r[r], tmax[r]);  // finite: key 0 is visible to every row
            alpha[r] = exp2f(m_r[r] - m_new);
            m_r[r] = m_new;
            l_r[r] *= alpha[r];
        }
#pragma unroll
        for (int nt = 0; nt < D / 8; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[nt][i] *= alpha[i >> 1];
#pragma unroll
        for (int nt = 0; nt < BC / 8; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float p = exp2f(s[nt][i] - m_r[i >> 1]);
                l_r[i >> 1] += p;
                s[nt][i] = p;  // P stays in registers as the A operand of P·V
            }
#pragma unroll
        for (int kk = 0; kk < BC / 16; ++kk)
#pragma unroll
            for (int nt = 0; nt < D / 8; ++nt)
                mma_tile_areg<T>(acc[nt], s[2 * kk], s[2 * kk + 1], RowMajor<T>(sVt, LDV).at(8 * nt, 16 * kk));
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l_r[r] += __shfl_xor_sync(0xffffffffu, l_r[r], 1);
        l_r[r] += __shfl_xor_sync(0xffffffffu, l_r[r], 2);
    }
    T *oh = o + ((size_t)b * hq + h) * t * D;
    float *lh = lse + ((size_t)b * hq + h) * t;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int query = q0 + 16 * warp + g + 8 * r;
        if (query >= t) continue;
        const float inv = 1.0f / l_r[r];
#pragma unroll
        for (int nt = 0; nt < D / 8; ++nt) {
            oh[(size_t)query * D + 8 * nt + 2 * tq] = from_f32<T>(acc[nt][2 * r] * inv);
            oh[(size_t)query * D + 8 * nt + 2 * tq + 1] = from_f32<T>(acc[nt][2 * r + 1] * inv);
        }
        if (tq == 0) lh[query] = (m_r[r] + log2f(l_r[r])) * LN2;
    }
}

template <typename T, int D>
__device__ void flash_bwd_pre(const T *__restrict__ o, const T *__restrict__ dout, float *__restrict__ delta,
                              long long rows) {
    const long long row = (long long)blockIdx.x * NW + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    float s = 0.f;
    if (row < rows)
        for (int c = lane; c < D; c += 32) s += to_f32(o[row * D + c]) * to_f32(dout[row * D + c]);
    s = warp_sum(s);
    if (row < rows && lane == 0) delta[row] = s;
}

template <typename T, int D>
__device__ void flash_bwd(const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v,
                          const T *__restrict__ dout, const float *__restrict__ lse,
                          const float *__restrict__ delta, float *__restrict__ dq_acc, T *__restrict__ dk,
                          T *__restrict__ dv, int hq, int hk, int t, float scale) {
    constexpr int PAD = pad_of<T>(), LD = D + PAD, LDK = BC + PAD, LDQ = BQ + PAD;
    require_smem(bwd_smem_bytes<T, D>());
    DYN_SMEM(smem);
    T *sK = reinterpret_cast<T *>(smem);  // [BC][LD]   A of Sᵀ = K Qᵀ
    T *sKt = sK + BC * LD;                  // [D][LDK]   B of dQ = dS K
    T *sV = sKt + D * LDK;                  // [BC][LD]   A of dPᵀ = V dOᵀ
    T *sQ = sV + BC * LD;                   // [BQ][LD]   B of Sᵀ
    T *sQt = sQ + BQ * LD;                  // [D][LDQ]   B of dK += dSᵀ Q
    T *sdO = sQt + D * LDQ;                 // [BQ][LD]   B of dPᵀ
    T *sdOt = sdO + BQ * LD;                // [D][LDQ]   B of dV += Pᵀ dO
    T *sdS = sdOt + D * LDQ;                // [BQ][LDK]  A of dQ
    float *sL = reinterpret_cast<float *>(sdS + BQ * LDK);
    float *sDl = sL + BQ;

    const GridTile blk = heaviest_first();
    const int kt = blk.tile, hkv = blk.head, b = blk.batch;
    const int group = hq / hk;
    const int k0 = kt * BC;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const T *kh = k + ((size_t)b * hk + hkv) * t * D;
    const T *vh = v + ((size_t)b * hk + hkv) * t * D;
    load_rows<T, D, BC>(sK, LD, sKt, LDK, kh, k0, t);
    load_rows<T, D, BC>(sV, LD, nullptr, 0, vh, k0, t);

    float dk_acc[D / 8][4], dv_acc[D / 8][4];
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) dk_acc[nt][i] = dv_acc[nt][i] = 0.f;
    const float sl2 = scale * LOG2E;
    const RowMajor<T> aK = RowMajor<T>(sK, LD).at(16 * warp, 0);
    const RowMajor<T> aV = RowMajor<T>(sV, LD).at(16 * warp, 0);
    // dQ split: warp w owns query rows 16·(w&1).. and head-dim columns (w>>1)·D/2 ..
    const int dq_r0 = 16 * (warp & 1), dq_c0 = (warp >> 1) * (D / 2);

    for (int hh = 0; hh < group; ++hh) {
        const int h = hkv * group + hh;
        const size_t qoff = ((size_t)b * hq + h) * t * D;
        const size_t loff = ((size_t)b * hq + h) * t;
        for (int q0 = (k0 / BQ) * BQ; q0 < t; q0 += BQ) {
            __syncthreads();  // the previous step's reads of the query-side tiles are done
            load_rows<T, D, BQ>(sQ, LD, sQt, LDQ, q + qoff, q0, t);
            load_rows<T, D, BQ>(sdO, LD, sdOt, LDQ, dout + qoff, q0, t);
            for (int i = threadIdx.x; i < BQ; i += NW * 32) {
                const bool ok = q0 + i < t;
                sL[i] = ok ? lse[loff + q0 + i] * LOG2E : INFINITY;  // past T: P = 0
                sDl[i] = ok ? delta[loff + q0 + i] : 0.f;
            }
            __syncthreads();

            // This warp's 16 keys × BQ queries of Sᵀ and dPᵀ.
            float st[BQ / 8][4], dpt[BQ / 8][4];
#pragma unroll
            for (int nt = 0; nt < BQ / 8; ++nt)
#pragma unroll
                for (int i = 0; i < 4; ++i) st[nt][i] = dpt[nt][i] = 0.f;
#pragma unroll
            for (int ks = 0; ks < D / 16; ++ks)
#pragma unroll
                for (int nt = 0; nt < BQ / 8; ++nt) {
                    mma_tile<T>(st[nt], aK.at(0, 16 * ks), RowMajor<T>(sQ, LD).at(8 * nt, 16 * ks));
                    mma_tile<T>(dpt[nt], aV.at(0, 16 * ks), RowMajor<T>(sdO, LD).at(8 * nt, 16 * ks));
                }
            // st ← Pᵀ, dpt ← dSᵀ (scale folded in); dS also goes to shared memory for dQ.
#pragma unroll
            for (int nt = 0; nt < BQ / 8; ++nt)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int krow = 16 * warp + g + 8 * (i >> 1), qcol = 8 * nt + 2 * tq + (i & 1);
                    const int key = k0 + krow, query = q0 + qcol;
                    const float p = (key > query || key >= t) ? 0.f : exp2f(st[nt][i] * sl2 - sL[qcol]);
                    const float ds = p * (dpt[nt][i] - sDl[qcol]) * scale;
                    st[nt][i] = p;
                    dpt[nt][i] = ds;
                    sdS[qcol * LDK + krow] = from_f32<T>(ds);
                }
#pragma unroll
            for (int kk = 0; kk < BQ / 16; ++kk)
#pragma unroll
                for (int nt = 0; nt < D / 8; ++nt) {
                    mma_tile_areg<T>(dv_acc[nt], st[2 * kk], st[2 * kk + 1], RowMajor<T>(sdOt, LDQ).at(8 * nt, 16 * kk));
                    mma_tile_areg<T>(dk_acc[nt], dpt[2 * kk], dpt[2 * kk + 1], RowMajor<T>(sQt, LDQ).at(8 * nt, 16 * kk));
                }
            __syncthreads();  // every warp's dS columns are written
#pragma unroll
            for (int nt = 0; nt < D / 16; ++nt) {
                float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                for (int ks = 0; ks < BC / 16; ++ks)
                    mma_tile<T>(c, RowMajor<T>(sdS, LDK).at(dq_r0, 16 * ks), RowMajor<T>(sKt, LDK).at(dq_c0 + 8 * nt, 16 * ks));
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int query = q0 + dq_r0 + g + 8 * (i >> 1);
                    const int col = dq_c0 + 8 * nt + 2 * tq + (i & 1);
                    if (query < t) atomicAdd(dq_acc + qoff + (size_t)query * D + col, c[i]);
                }
            }
        }
    }

    T *dkh = dk + ((size_t)b * hk + hkv) * t * D;
    T *dvh = dv + ((size_t)b * hk + hkv) * t * D;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int key = k0 + 16 * warp + g + 8 * r;
        if (key >= t) continue;
#pragma unroll
        for (int nt = 0; nt < D / 8; ++nt)
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                dkh[(size_t)key * D + 8 * nt + 2 * tq + j] = from_f32<T>(dk_acc[nt][2 * r + j]);
                dvh[(size_t)key * D + 8 * nt + 2 * tq + j] = from_f32<T>(dv_acc[nt][2 * r + j]);
            }
    }
}

// =============================================================================================
// bf16 tensor-core kernels (the fast path). Geometry: every warp owns 16-row m-tiles of its
// block's tile (fwd: 4 warps × 2 m-tiles; dq, dkdv: 8 warps × 1). Shared tiles are row-major [rows][D + 8] bf16: the 16-byte pad
// makes the row stride an odd multiple of 16 bytes for every D ∈ {32, 64, 96, 128}, so the 8 row
// addresses of each ldmatrix phase and the 8 16-byte cp.async stores of each quarter-warp fall in
// 8 distinct 4-bank groups (no bank conflicts; an XOR swizzle has no form for D = 96's 12
// chunks). Every MMA operand comes from shared memory through ldmatrix (.trans where the operand
// is needed transposed: V in P·V, dO/Q in dV/dK, K in dQ) or from registers (P, dS: the
// accumulator layout of S is the A-fragment layout). Global → shared through cp.async.cg
// (16-byte chunks, rows past T zero-filled) with double buffering: the next tile is in flight
// while the current one is computed. Inputs not 16-byte aligned take a synchronous copy into the
// same layout (same results).
// =============================================================================================
constexpr int TC_WARPS = 8, TC_THREADS = 32 * TC_WARPS;
constexpr int TC_BM = 128;  // fwd, dq: query rows per block
constexpr int TC_BN = 64;   // fwd, dq: keys per tile
constexpr int TC_BK = 128;  // dkdv: keys per block
constexpr int TC_BQ = 32;   // dkdv: queries per step

template <int D> __host__ __device__ constexpr int fwd_tc_smem_bytes() { return (TC_BM + 4 * TC_BN) * (D + 8) * 2; }
template <int D> __host__ __device__ constexpr int dkdv_tc_smem_bytes() {
    return (2 * TC_BK + 4 * TC_BQ) * (D + 8) * 2 + 4 * TC_BQ * 4;
}

// Rows [r0, r0 + N) of a row-major [t, D] bf16 matrix into dst [N][D + 8]; rows ≥ t zero-filled.
// vec: cp.async (the caller commits and waits), else synchronous loads/stores.
template <int D, int N, int NTH = TC_THREADS>
__device__ __forceinline__ void tile_load(bf16 *dst, const bf16 *__restrict__ src, int r0, int t, bool vec) {
    constexpr int C = D / 8, LDS = D + 8;
    if (!vec) {
        // Synchronous fallback (misaligned inputs), kept rolled: unrolled, its loads would all be
        // in flight at once, next to the kernel's accumulators (register spills).
#pragma unroll 1
        for (int i = threadIdx.x; i < N * C; i += NTH) {
            const int r = i / C, c = (i % C) * 8;
            const bool ok = r0 + r < t;
            const uint16_t *u = reinterpret_cast<const uint16_t *>(src + (size_t)(ok ? r0 + r : 0) * D + c);
            uint32_t w[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) w[j] = ok ? (uint32_t)u[2 * j] | ((uint32_t)u[2 * j + 1] << 16) : 0u;
            *reinterpret_cast<uint4 *>(dst + r * LDS + c) = make_uint4(w[0], w[1], w[2], w[3]);
        }
    } else if constexpr (NTH % C == 0 && (N * C) % NTH == 0) {
        // Every thread keeps one 8-column chunk and steps down the rows: one base address plus
        // compile-time offsets.
        constexpr int RS = NTH / C;  // rows per pass
        const int r = threadIdx.x / C, c = (threadIdx.x % C) * 8;
        const bf16 *p = src + (size_t)(r0 + r) * D + c;
        bf16 *d = dst + r * LDS + c;
#pragma unroll
        for (int n = 0; n < N / RS; ++n) {
            const bool ok = r0 + r + n * RS < t;
            cp_async16(d + n * RS * LDS, ok ? p + n * RS * D : src, ok);
        }
    } else {
#pragma unroll
        for (int i = threadIdx.x; i < N * C; i += NTH) {
            const int r = i / C, c = (i % C) * 8;
            const bool ok = r0 + r < t;
            cp_async16(dst + r * LDS + c, src + (size_t)(ok ? r0 + r : 0) * D + c, ok);
        }
    }
}

// ldmatrix row addresses (lane l, matrix m = l/8) for the three operand shapes, 16×16 each:
//   A (row-major [m][k] at rows r0.., cols c0..): matrices (r 0-7, k 0-7), (r 8-15, k 0-7),
//     (r 0-7, k 8-15), (r 8-15, k 8-15) = a0..a3.
//   Bᵀ row-major ([n][k], e.g. K in Q·Kᵀ), n0.., k0..: (n 0-7, k 0-7), (n 0-7, k 8-15),
//     (n 8-15, k 0-7), (n 8-15, k 8-15) = {b0, b1} of n-tile 0, {b0, b1} of n-tile 1.
//   B row-major ([k][n], e.g. V in P·V), with .trans: (k 0-7, n 0-7), (k 8-15, n 0-7),
//     (k 0-7, n 8-15), (k 8-15, n 8-15) = {b0, b1} of n-tile 0, {b0, b1} of n-tile 1.
template <int LDS> __device__ __forceinline__ const bf16 *a_addr(const bf16 *s, int r0, int c0, int lane) {
    return s + (r0 + (lane & 7) + 8 * ((lane >> 3) & 1)) * LDS + c0 + 8 * (lane >> 4);
}
template <int LDS> __device__ __forceinline__ const bf16 *bt_addr(const bf16 *s, int n0, int k0, int lane) {
    return s + (n0 + (lane & 7) + 8 * (lane >> 4)) * LDS + k0 + 8 * ((lane >> 3) & 1);
}
template <int LDS> __device__ __forceinline__ const bf16 *b_trans_addr(const bf16 *s, int k0, int n0, int lane) {
    return a_addr<LDS>(s, k0, n0, lane);
}
__device__ __forceinline__ void mma2(float c0[4], float c1[4], const uint32_t a[4], const uint32_t b[4]) {
    mma_bf16_16816(c0, a, b);
    mma_bf16_16816(c1, a, b + 2);
}

// Forward. grid (⌈T/128⌉, Hq, B), 128 threads (4 warps, 2 blocks per SM); block i: query tile
// ⌈T/128⌉−1−i (longest first); warp w: rows q0 + 32w .. as two 16-row m-tiles, so every K/V
// fragment read from shared memory feeds two MMAs (half the shared traffic per FLOP of 16 rows a
// warp, and two independent accumulator chains). 64-key tiles from 0 up to the diagonal, K/V
// double-buffered. A warp skips tiles whose keys all lie past its rows and masks only tiles that
// cross its diagonal. Softmax in base 2: m is kept in raw-score units and scale·log2 e is folded
// into one FMA before ex2. Smem fwd_tc_smem_bytes: Q [128], K [2][64], V [2][64] rows.
constexpr int TC_FWD_WARPS = 4, TC_FWD_THREADS = 32 * TC_FWD_WARPS, TC_FWD_MT = TC_BM / 16 / TC_FWD_WARPS;
template <int D, bool CAUSAL = true>
__device__ void flash_fwd_tc(const bf16 *__restrict__ q, const bf16 *__restrict__ k, const bf16 *__restrict__ v,
                             bf16 *__restrict__ o, float *__restrict__ lse, int hq, int hk, int t, float scale) {
    constexpr int LDS = D + 8, KS = D / 16, MT = TC_FWD_MT, NTH = TC_FWD_THREADS;
    constexpr int KB = D > 64 ? 32 : 64;  // keys per softmax step (S: MT·KB/2 registers; 64 spills at D ≥ 96)
    require_smem(fwd_tc_smem_bytes<D>(), NTH);
    DYN_SMEM(smem);
    bf16 *sQ = reinterpret_cast<bf16 *>(smem);
    bf16 *sK = sQ + TC_BM * LDS;
    bf16 *sV = sK + 2 * TC_BN * LDS;

    const int nq = (t + TC_BM - 1) / TC_BM;
    const GridTile blk = heaviest_first();
    const int qt = nq - 1 - blk.tile;
    const int hkv = blk.head / (hq / hk);
    const bf16 *qh = q + ((size_t)blk.batch * hq + blk.head) * t * D;
    const bf16 *kh = k + ((size_t)blk.batch * hk + hkv) * t * D;
    const bf16 *vh = v + ((size_t)blk.batch * hk + hkv) * t * D;
    const int q0 = qt * TC_BM;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const int wr0 = 16 * MT * warp;  // this warp's first row in the tile
    const int wq0 = q0 + wr0;        // ... as a query position
    const bool vec = aligned16(q) && aligned16(k) && aligned16(v);
    const int ntiles = ((CAUSAL ? min(q0 + TC_BM, t) : t) + TC_BN - 1) / TC_BN;

    tile_load<D, TC_BM, NTH>(sQ, qh, q0, t, vec);
    tile_load<D, TC_BN, NTH>(sK, kh, 0, t, vec);
    tile_load<D, TC_BN, NTH>(sV, vh, 0, t, vec);
    cp_async_commit();

    float m_r[MT][2], l_r[MT][2];
    float acc[MT][D / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        m_r[mt][0] = m_r[mt][1] = -INFINITY;
        l_r[mt][0] = l_r[mt][1] = 0.f;
#pragma unroll
        for (int nt = 0; nt < D / 8; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;
    }
    const float sl2 = scale * LOG2E;

    for (int j = 0; j < ntiles; ++j) {
        const int k0 = j * TC_BN;
        // Tile j (loaded during iteration j − 1, or before the loop) → visible. The barrier also
        // means every warp is done with tile j − 1, whose buffers the next loads reuse: one
        // barrier an iteration (the loads still have the whole iteration to land).
        cp_async_wait<0>();
        __syncthreads();
        if (j + 1 < ntiles) {
            const int nb = (j + 1) & 1;
            tile_load<D, TC_BN, NTH>(sK + nb * TC_BN * LDS, kh, k0 + TC_BN, t, vec);
            tile_load<D, TC_BN, NTH>(sV + nb * TC_BN * LDS, vh, k0 + TC_BN, t, vec);
        }
        cp_async_commit();  // possibly empty
#pragma unroll
        for (int kh0 = 0; kh0 < TC_BN; kh0 += KB) {
            const int kb0 = k0 + kh0;  // first key of this softmax step
            // Every key from here on lies past this warp's rows (causal) or past the sequence.
            if (CAUSAL ? kb0 > wq0 + 16 * MT - 1 : kb0 >= t) break;
            const bf16 *cK = sK + (j & 1) * TC_BN * LDS + kh0 * LDS, *cV = sV + (j & 1) * TC_BN * LDS + kh0 * LDS;
            float s[MT][KB / 8][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < KB / 8; ++nt)
#pragma unroll
                    for (int i = 0; i < 4; ++i) s[mt][nt][i] = 0.f;
#pragma unroll
            for (int ks = 0; ks < KS; ++ks) {
                uint32_t aq[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(aq[mt], a_addr<LDS>(sQ, wr0 + 16 * mt, 16 * ks, lane));
#pragma unroll
                for (int np = 0; np < KB / 16; ++np) {
                    uint32_t bk[4];
                    ldmatrix_x4(bk, bt_addr<LDS>(cK, 16 * np, 16 * ks, lane));
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) mma2(s[mt][2 * np], s[mt][2 * np + 1], aq[mt], bk);
                }
            }
            if (CAUSAL ? kb0 + KB - 1 > wq0 : kb0 + KB > t) {  // the step crosses the diagonal / the end
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int nt = 0; nt < KB / 8; ++nt)
#pragma unroll
                        for (int i = 0; i < 4; ++i) {
                            const int query = wq0 + 16 * mt + g + 8 * (i >> 1);
                            const int key = kb0 + 8 * nt + 2 * tq + (i & 1);
                            // causal: keys ≥ t lie past every valid row
                            if (CAUSAL ? key > query : key >= t) s[mt][nt][i] = -INFINITY;
                        }
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                float mb[2];
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    float mx = m_r[mt][r];
#pragma unroll
                    for (int nt = 0; nt < KB / 8; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                    // finite: key 0 (first step, never skipped) is visible to every row
                    const float alpha = fast_exp2((m_r[mt][r] - mx) * sl2);
                    m_r[mt][r] = mx;
                    mb[r] = mx * sl2;
                    l_r[mt][r] *= alpha;
#pragma unroll
                    for (int nt = 0; nt < D / 8; ++nt) acc[mt][nt][2 * r] *= alpha, acc[mt][nt][2 * r + 1] *= alpha;
                }
#pragma unroll
                for (int nt = 0; nt < KB / 8; ++nt)
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        const float p = fast_exp2(fmaf(s[mt][nt][i], sl2, -mb[i >> 1]));
                        l_r[mt][i >> 1] += p;
                        s[mt][nt][i] = p;
                    }
            }
#pragma unroll
            for (int kk = 0; kk < KB / 16; ++kk) {
                uint32_t a[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) acc_to_a(a[mt], s[mt][2 * kk], s[mt][2 * kk + 1]);
#pragma unroll
                for (int dp = 0; dp < D / 16; ++dp) {
                    uint32_t bv[4];
                    ldmatrix_x4_trans(bv, b_trans_addr<LDS>(cV, 16 * kk, 16 * dp, lane));
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) mma2(acc[mt][2 * dp], acc[mt][2 * dp + 1], a[mt], bv);
                }
            }
        }
    }

    // (the head's offset recomputed: nothing of `blk` stays live across the loop)
    const GridTile here = heaviest_first();
    const size_t hoff = ((size_t)here.batch * hq + here.head) * t;
    bf16 *oh = o + hoff * D;
    float *lh = lse + hoff;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float l = l_r[mt][r];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            const int query = wq0 + 16 * mt + g + 8 * r;
            if (query >= t) continue;
            const float inv = 1.0f / l;
#pragma unroll
            for (int nt = 0; nt < D / 8; ++nt)
                *reinterpret_cast<uint32_t *>(oh + (size_t)query * D + 8 * nt + 2 * tq) =
                    pack_bf16(acc[mt][nt][2 * r] * inv, acc[mt][nt][2 * r + 1] * inv);
            if (tq == 0) lh[query] = (m_r[mt][r] * sl2 + log2f(l)) * LN2;
        }
}

// Backward, dQ. grid (⌈T/128⌉, Hq, B), TC_DQ_THREADS threads (TC_DQ_WARPS warps × TC_DQ_MT 16-row
// m-tiles); the forward's loop again (128-query tile per block, DQ_BN-key tiles double-buffered,
// processed TC_DQ_KB keys at a time): S = Q Kᵀ and dP = dO Vᵀ, P from the saved lse,
// dS = P ⊙ (dP − Δ)·scale kept in registers as the A operand of dQ += dS K. No atomics; dq is
// written once, rounded to bf16. Smem dq_tc_smem_bytes: Q, dO [128], K, V [2][DQ_BN] rows.
// 2 m-tiles a warp, 32-key steps and 32-key tiles (104 KB of smem at D = 128, so 2 blocks an
// SM); the head-dim loop of S/dP unrolled by 2 only (254 registers; fully unrolled it spills at
// D = 128, for no gain). Measured on an H100, B2 H32 T4096 D128: 1.31 ms, vs 1.45 with 64-key
// tiles (1 block an SM) and 1.51 with 8 warps × 1 m-tile × 64 keys.
constexpr int TC_DQ_MT = 2, TC_DQ_KB = 32, DQ_BN = 32;
constexpr int TC_DQ_WARPS = TC_BM / 16 / TC_DQ_MT, TC_DQ_THREADS = 32 * TC_DQ_WARPS;
template <int D> __host__ __device__ constexpr int dq_tc_smem_bytes() { return (2 * TC_BM + 4 * DQ_BN) * (D + 8) * 2; }
template <int D>
__device__ void flash_bwd_dq_tc(const bf16 *__restrict__ q, const bf16 *__restrict__ k, const bf16 *__restrict__ v,
                                const bf16 *__restrict__ dout, const float *__restrict__ lse,
                                const float *__restrict__ delta, bf16 *__restrict__ dq, int hq, int hk, int t,
                                float scale) {
    constexpr int LDS = D + 8, KS = D / 16, MT = TC_DQ_MT, KB = TC_DQ_KB, NTH = TC_DQ_THREADS;
    require_smem(dq_tc_smem_bytes<D>(), NTH);
    DYN_SMEM(smem);
    bf16 *sQ = reinterpret_cast<bf16 *>(smem);
    bf16 *sdO = sQ + TC_BM * LDS;
    bf16 *sK = sdO + TC_BM * LDS;
    bf16 *sV = sK + 2 * DQ_BN * LDS;

    const int nq = (t + TC_BM - 1) / TC_BM;
    const GridTile blk = heaviest_first();
    const int qt = nq - 1 - blk.tile;
    const int hkv = blk.head / (hq / hk);
    const size_t qoff = ((size_t)blk.batch * hq + blk.head) * t * D;
    const size_t loff = ((size_t)blk.batch * hq + blk.head) * t;
    const bf16 *kh = k + ((size_t)blk.batch * hk + hkv) * t * D;
    const bf16 *vh = v + ((size_t)blk.batch * hk + hkv) * t * D;
    const int q0 = qt * TC_BM;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const int wr0 = 16 * MT * warp, wq0 = q0 + wr0;
    const bool vec = aligned16(q) && aligned16(k) && aligned16(v) && aligned16(dout);
    const int ntiles = (min(q0 + TC_BM, t) + DQ_BN - 1) / DQ_BN;

    tile_load<D, TC_BM, NTH>(sQ, q + qoff, q0, t, vec);
    tile_load<D, TC_BM, NTH>(sdO, dout + qoff, q0, t, vec);
    tile_load<D, DQ_BN, NTH>(sK, kh, 0, t, vec);
    tile_load<D, DQ_BN, NTH>(sV, vh, 0, t, vec);
    cp_async_commit();

    const float sl2 = scale * LOG2E;
    float lr[MT][2], dl[MT][2];  // this thread's rows: lse·log2 e (+∞ past T: P = 0) and Δ
    float acc[MT][D / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int query = wq0 + 16 * mt + g + 8 * r;
            lr[mt][r] = query < t ? lse[loff + query] * LOG2E : INFINITY;
            dl[mt][r] = query < t ? delta[loff + query] : 0.f;
        }
#pragma unroll
        for (int nt = 0; nt < D / 8; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;
    }

    for (int j = 0; j < ntiles; ++j) {
        const int k0 = j * DQ_BN;
        // Tile j → visible; every warp done with tile j − 1, whose buffers the next loads reuse
        // (one barrier an iteration, as in the forward).
        cp_async_wait<0>();
        __syncthreads();
        if (j + 1 < ntiles) {
            const int nb = (j + 1) & 1;
            tile_load<D, DQ_BN, NTH>(sK + nb * DQ_BN * LDS, kh, k0 + DQ_BN, t, vec);
            tile_load<D, DQ_BN, NTH>(sV + nb * DQ_BN * LDS, vh, k0 + DQ_BN, t, vec);
        }
        cp_async_commit();
#pragma unroll
        for (int kh0 = 0; kh0 < DQ_BN; kh0 += KB) {
            const int kb0 = k0 + kh0;
            if (kb0 > wq0 + 16 * MT - 1) break;  // every key from here on lies past this warp's rows
            const bf16 *cK = sK + (j & 1) * DQ_BN * LDS + kh0 * LDS, *cV = sV + (j & 1) * DQ_BN * LDS + kh0 * LDS;
            float s[MT][KB / 8][4], dp[MT][KB / 8][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < KB / 8; ++nt)
#pragma unroll
                    for (int i = 0; i < 4; ++i) s[mt][nt][i] = dp[mt][nt][i] = 0.f;
#pragma unroll 2
            for (int ks = 0; ks < KS; ++ks) {
                uint32_t aq[MT][4], ao[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    ldmatrix_x4(aq[mt], a_addr<LDS>(sQ, wr0 + 16 * mt, 16 * ks, lane));
                    ldmatrix_x4(ao[mt], a_addr<LDS>(sdO, wr0 + 16 * mt, 16 * ks, lane));
                }
#pragma unroll
                for (int np = 0; np < KB / 16; ++np) {
                    uint32_t bk[4], bv[4];
                    ldmatrix_x4(bk, bt_addr<LDS>(cK, 16 * np, 16 * ks, lane));
                    ldmatrix_x4(bv, bt_addr<LDS>(cV, 16 * np, 16 * ks, lane));
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma2(s[mt][2 * np], s[mt][2 * np + 1], aq[mt], bk);
                        mma2(dp[mt][2 * np], dp[mt][2 * np + 1], ao[mt], bv);
                    }
                }
            }
            const bool diag = kb0 + KB - 1 > wq0;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < KB / 8; ++nt)
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        const int r = i >> 1;
                        float p = fast_exp2(fmaf(s[mt][nt][i], sl2, -lr[mt][r]));
                        if (diag && kb0 + 8 * nt + 2 * tq + (i & 1) > wq0 + 16 * mt + g + 8 * r) p = 0.f;
                        s[mt][nt][i] = p * (dp[mt][nt][i] - dl[mt][r]) * scale;  // dS
                    }
#pragma unroll
            for (int kk = 0; kk < KB / 16; ++kk) {
                uint32_t a[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) acc_to_a(a[mt], s[mt][2 * kk], s[mt][2 * kk + 1]);
#pragma unroll
                for (int dp2 = 0; dp2 < D / 16; ++dp2) {
                    uint32_t bk[4];
                    ldmatrix_x4_trans(bk, b_trans_addr<LDS>(cK, 16 * kk, 16 * dp2, lane));
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) mma2(acc[mt][2 * dp2], acc[mt][2 * dp2 + 1], a[mt], bk);
                }
            }
        }
    }

    bf16 *dqh = dq + qoff;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int query = wq0 + 16 * mt + g + 8 * r;
            if (query >= t) continue;
#pragma unroll
            for (int nt = 0; nt < D / 8; ++nt)
                *reinterpret_cast<uint32_t *>(dqh + (size_t)query * D + 8 * nt + 2 * tq) =
                    pack_bf16(acc[mt][nt][2 * r], acc[mt][nt][2 * r + 1]);
        }
}

// Backward, dK and dV. grid (⌈T/128⌉, Hk, B), 256 threads; block = 128 keys of one K/V head, warp
// w: keys k0 + 16w ..; steps over the group's query heads × the 32-query tiles from k0 on (Q, dO,
// lse, Δ double-buffered). Sᵀ = K Qᵀ and dPᵀ = V dOᵀ in registers, Pᵀ and dSᵀ feed dV += Pᵀ dO and
// dK += dSᵀ Q directly (B operands through ldmatrix.trans); dK, dV accumulate in registers over
// the whole group. Smem dkdv_tc_smem_bytes: K, V [128], Q, dO [2][32] rows, lse, Δ [2][32] f32.
template <int D>
__device__ void flash_bwd_dkdv_tc(const bf16 *__restrict__ q, const bf16 *__restrict__ k,
                                  const bf16 *__restrict__ v, const bf16 *__restrict__ dout,
                                  const float *__restrict__ lse, const float *__restrict__ delta,
                                  bf16 *__restrict__ dk, bf16 *__restrict__ dv, int hq, int hk, int t, float scale) {
    constexpr int LDS = D + 8, KS = D / 16;
    require_smem(dkdv_tc_smem_bytes<D>(), TC_THREADS);
    DYN_SMEM(smem);
    bf16 *sK = reinterpret_cast<bf16 *>(smem);
    bf16 *sV = sK + TC_BK * LDS;
    bf16 *sQ = sV + TC_BK * LDS;     // [2][TC_BQ][LDS]
    bf16 *sdO = sQ + 2 * TC_BQ * LDS;  // [2][TC_BQ][LDS]
    float *sL = reinterpret_cast<float *>(sdO + 2 * TC_BQ * LDS);  // [2][TC_BQ]
    float *sDl = sL + 2 * TC_BQ;                                    // [2][TC_BQ]

    const GridTile blk = heaviest_first();
    const int kt = blk.tile, hkv = blk.head, b = blk.batch;
    const int group = hq / hk;
    const int k0 = kt * TC_BK;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const int wk0 = k0 + 16 * warp;  // this warp's first key
    const bool vec = aligned16(q) && aligned16(k) && aligned16(v) && aligned16(dout);
    const size_t kvoff = ((size_t)b * hk + hkv) * t * D;
    const int nqt = (t - k0 + TC_BQ - 1) / TC_BQ;  // query tiles from k0 (TC_BK % TC_BQ == 0)
    const int steps = group * nqt;
    const float sl2 = scale * LOG2E;

    // Step s: head hkv·group + s / nqt, queries k0 + (s % nqt)·TC_BQ ..; into buffer s & 1.
    auto issue = [&](int s) {
        const int h = hkv * group + s / nqt, q0 = k0 + (s % nqt) * TC_BQ, buf = s & 1;
        const size_t qoff = ((size_t)b * hq + h) * t * D, loff = ((size_t)b * hq + h) * t;
        tile_load<D, TC_BQ>(sQ + buf * TC_BQ * LDS, q + qoff, q0, t, vec);
        tile_load<D, TC_BQ>(sdO + buf * TC_BQ * LDS, dout + qoff, q0, t, vec);
        stage_lse_delta_async<TC_BQ, TC_THREADS>(sL + buf * TC_BQ, sDl + buf * TC_BQ, lse, delta, loff, q0, t);
    };
    tile_load<D, TC_BK>(sK, k + kvoff, k0, t, vec);
    tile_load<D, TC_BK>(sV, v + kvoff, k0, t, vec);
    issue(0);
    cp_async_commit();

    float dk_acc[D / 8][4], dv_acc[D / 8][4];
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) dk_acc[nt][i] = dv_acc[nt][i] = 0.f;

    for (int s = 0; s < steps; ++s) {
        // Step s's tiles → visible; every warp done with step s − 1, whose buffers (and, in the
        // 64-query kernels, the Pᵀ / dSᵀ staging) this step reuses: one barrier a step.
        cp_async_wait<0>();
        __syncthreads();
        if (s + 1 < steps) issue(s + 1);
        cp_async_commit();
        const int q0 = k0 + (s % nqt) * TC_BQ, buf = s & 1;
        if (q0 + TC_BQ - 1 >= wk0) {  // else every query of the tile precedes this warp's keys
            const bf16 *cQ = sQ + buf * TC_BQ * LDS, *cdO = sdO + buf * TC_BQ * LDS;
            const float *cL = sL + buf * TC_BQ, *cDl = sDl + buf * TC_BQ;
            float st[TC_BQ / 8][4], dpt[TC_BQ / 8][4];
#pragma unroll
            for (int nt = 0; nt < TC_BQ / 8; ++nt)
#pragma unroll
                for (int i = 0; i < 4; ++i) st[nt][i] = dpt[nt][i] = 0.f;
#pragma unroll
            for (int ks = 0; ks < KS; ++ks) {
                uint32_t ak[4], av[4];
                ldmatrix_x4(ak, a_addr<LDS>(sK, 16 * warp, 16 * ks, lane));
                ldmatrix_x4(av, a_addr<LDS>(sV, 16 * warp, 16 * ks, lane));
#pragma unroll
                for (int np = 0; np < TC_BQ / 16; ++np) {
                    uint32_t bq[4], bo[4];
                    ldmatrix_x4(bq, bt_addr<LDS>(cQ, 16 * np, 16 * ks, lane));
                    ldmatrix_x4(bo, bt_addr<LDS>(cdO, 16 * np, 16 * ks, lane));
                    mma2(st[2 * np], st[2 * np + 1], ak, bq);
                    mma2(dpt[2 * np], dpt[2 * np + 1], av, bo);
                }
            }
            const bool diag = q0 < wk0 + 15;
#pragma unroll
            for (int nt = 0; nt < TC_BQ / 8; ++nt)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int qc = 8 * nt + 2 * tq + (i & 1);
                    float p = fast_exp2(fmaf(st[nt][i], sl2, -(cL[qc] * LOG2E)));  // cL: lse
                    if (diag && wk0 + g + 8 * (i >> 1) > q0 + qc) p = 0.f;
                    st[nt][i] = p;
                    dpt[nt][i] = p * (dpt[nt][i] - cDl[qc]) * scale;
                }
#pragma unroll
            for (int kk = 0; kk < TC_BQ / 16; ++kk) {
                uint32_t ap[4], ad[4];
                acc_to_a(ap, st[2 * kk], st[2 * kk + 1]);
                acc_to_a(ad, dpt[2 * kk], dpt[2 * kk + 1]);
#pragma unroll
                for (int dp = 0; dp < D / 16; ++dp) {
                    uint32_t bo[4], bq[4];
                    ldmatrix_x4_trans(bo, b_trans_addr<LDS>(cdO, 16 * kk, 16 * dp, lane));
                    ldmatrix_x4_trans(bq, b_trans_addr<LDS>(cQ, 16 * kk, 16 * dp, lane));
                    mma2(dv_acc[2 * dp], dv_acc[2 * dp + 1], ap, bo);
                    mma2(dk_acc[2 * dp], dk_acc[2 * dp + 1], ad, bq);
                }
            }
        }
    }

    bf16 *dkh = dk + kvoff, *dvh = dv + kvoff;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int key = wk0 + g + 8 * r;
        if (key >= t) continue;
#pragma unroll
        for (int nt = 0; nt < D / 8; ++nt) {
            *reinterpret_cast<uint32_t *>(dkh + (size_t)key * D + 8 * nt + 2 * tq) =
                pack_bf16(dk_acc[nt][2 * r], dk_acc[nt][2 * r + 1]);
            *reinterpret_cast<uint32_t *>(dvh + (size_t)key * D + 8 * nt + 2 * tq) =
                pack_bf16(dv_acc[nt][2 * r], dv_acc[nt][2 * r + 1]);
        }
    }
}

// Backward, dK and dV in 64-query steps, and with FUSE_DQ dQ as well. grid (⌈T/128⌉, Hk, B), 256
// threads (8 warps); block = 128 keys of one K/V head; steps over the group's query heads × the
// 64-query tiles from k0 on (Q, dO, lse, Δ double-buffered). Each step in three phases:
//   1. Sᵀ = K Qᵀ and dPᵀ = V dOᵀ: warp w computes keys 32·(w%4).. × queries 32·(w/4).. (2 × 4
//      accumulator tiles: every K/V fragment feeds 4 MMAs, every Q/dO fragment 2), turns them into
//      Pᵀ and dSᵀ and stores both, rounded to bf16, in shared memory [128 keys][64 + 8].
//   2. dV += Pᵀ dO and dK += dSᵀ Q: warp w owns keys 32·(w%4).. × head-dim half (w/4) of dK and
//      dV (D floats a lane), A operands from the stored Pᵀ/dSᵀ, B operands dO, Q (.trans).
//   3. FUSE_DQ: dQ += dS K for queries 16·(w%4).. × head-dim half (w/4); dS is the stored dSᵀ
//      read through ldmatrix.trans; the partial sums go to dq_acc (f32, zero-filled, [B,Hq,T,D])
//      by atomic_add2. Without it the dQ kernel above computes dQ (S and dP again).
// Why: flash_bwd_dkdv_tc computes 16 keys × 32 queries a warp and is bound by shared-memory reads
// (per warp and step at D = 128: 80 ldmatrix.x4 for 128 MMAs, where the dQ kernel has 80 for 192
// and runs 1.5× faster per FLOP, H100). Here phases 1 + 2 take 112 ldmatrix.x4 plus 4 KB of Pᵀ/dSᵀ
// stores for 256 MMAs. Smem kv64_tc_smem_bytes: K, V [128], Q, dO [2][64] rows of D + 8; Pᵀ, dSᵀ
// [128][72]; lse, Δ [2][64] f32 (173 KB at D = 128: one block an SM, as the 32-query kernel).
constexpr int KV_BQ = 64, KV_LDP = KV_BQ + 8;
template <int D> __host__ __device__ constexpr int kv64_tc_smem_bytes() {
    return (2 * TC_BK + 4 * KV_BQ) * (D + 8) * 2 + 2 * TC_BK * KV_LDP * 2 + 4 * KV_BQ * 4;
}
template <int D, bool FUSE_DQ>
__device__ void flash_bwd_kv64_tc(const bf16 *__restrict__ q, const bf16 *__restrict__ k, const bf16 *__restrict__ v,
                                  const bf16 *__restrict__ dout, const float *__restrict__ lse,
                                  const float *__restrict__ delta, bf16 *__restrict__ dk, bf16 *__restrict__ dv,
                                  float *__restrict__ dq_acc, int hq, int hk, int t, float scale) {
    constexpr int LDS = D + 8, LDP = KV_LDP, KS = D / 16, DH = D / 2;
    require_smem(kv64_tc_smem_bytes<D>(), TC_THREADS);
    DYN_SMEM(smem);
    bf16 *sK = reinterpret_cast<bf16 *>(smem);
    bf16 *sV = sK + TC_BK * LDS;
    bf16 *sQ = sV + TC_BK * LDS;                                    // [2][KV_BQ][LDS]
    bf16 *sdO = sQ + 2 * KV_BQ * LDS;                               // [2][KV_BQ][LDS]
    bf16 *sP = sdO + 2 * KV_BQ * LDS;                               // Pᵀ [TC_BK][LDP]
    bf16 *sdS = sP + TC_BK * LDP;                                   // dSᵀ [TC_BK][LDP]
    float *sL = reinterpret_cast<float *>(sdS + TC_BK * LDP);       // [2][KV_BQ]
    float *sDl = sL + 2 * KV_BQ;                                    // [2][KV_BQ]

    const GridTile blk = heaviest_first();
    const int hkv = blk.head, b = blk.batch, group = hq / hk;
    const int k0 = blk.tile * TC_BK;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const int kr = 32 * (warp & 3);  // phases 1, 2: this warp's keys k0 + kr ..
    const int qc = 32 * (warp >> 2);  // phase 1: its queries q0 + qc ..
    const int dc = DH * (warp >> 2);  // phases 2, 3: its head-dim columns dc ..
    const int qr = 16 * (warp & 3);   // phase 3: its queries q0 + qr ..
    const bool vec = aligned16(q) && aligned16(k) && aligned16(v) && aligned16(dout);
    const size_t kvoff = ((size_t)b * hk + hkv) * t * D;
    const int nqt = (t - k0 + KV_BQ - 1) / KV_BQ;  // query tiles from k0 (TC_BK % KV_BQ == 0)
    const int steps = group * nqt;
    const float sl2 = scale * LOG2E;

    // Step s: head hkv·group + s / nqt, queries k0 + (s % nqt)·KV_BQ ..; into buffer s & 1.
    auto issue = [&](int s) {
        const int h = hkv * group + s / nqt, q0 = k0 + (s % nqt) * KV_BQ, buf = s & 1;
        const size_t qoff = ((size_t)b * hq + h) * t * D, loff = ((size_t)b * hq + h) * t;
        tile_load<D, KV_BQ>(sQ + buf * KV_BQ * LDS, q + qoff, q0, t, vec);
        tile_load<D, KV_BQ>(sdO + buf * KV_BQ * LDS, dout + qoff, q0, t, vec);
        stage_lse_delta_async<KV_BQ, TC_THREADS>(sL + buf * KV_BQ, sDl + buf * KV_BQ, lse, delta, loff, q0, t);
    };
    tile_load<D, TC_BK>(sK, k + kvoff, k0, t, vec);
    tile_load<D, TC_BK>(sV, v + kvoff, k0, t, vec);
    issue(0);
    cp_async_commit();

    float dk_acc[2][DH / 8][4], dv_acc[2][DH / 8][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < DH / 8; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) dk_acc[mt][nt][i] = dv_acc[mt][nt][i] = 0.f;

    for (int s = 0; s < steps; ++s) {
        // Step s's tiles → visible; every warp done with step s − 1, whose buffers (and, in the
        // 64-query kernels, the Pᵀ / dSᵀ staging) this step reuses: one barrier a step.
        cp_async_wait<0>();
        __syncthreads();
        if (s + 1 < steps) issue(s + 1);
        cp_async_commit();
        const int q0 = k0 + (s % nqt) * KV_BQ, buf = s & 1;
        const bf16 *cQ = sQ + buf * KV_BQ * LDS, *cdO = sdO + buf * KV_BQ * LDS;
        const float *cL = sL + buf * KV_BQ, *cDl = sDl + buf * KV_BQ;

        {  // 1. Pᵀ, dSᵀ of keys k0 + kr .. + 32 × queries q0 + qc .. + 32
            const int wk0 = k0 + kr, wq0 = q0 + qc;
            const bool live = wq0 + 31 >= wk0;  // else every query precedes every key: all zero
            const bool diag = wq0 < wk0 + 31;   // some key lies past some query: mask
            float st[2][4][4], dpt[2][4][4];
#pragma unroll
            for (int mt = 0; mt < 2; ++mt)
#pragma unroll
                for (int nt = 0; nt < 4; ++nt)
#pragma unroll
                    for (int i = 0; i < 4; ++i) st[mt][nt][i] = dpt[mt][nt][i] = 0.f;
            if (live) {
#pragma unroll 2
                for (int ks = 0; ks < KS; ++ks) {
                    uint32_t ak[2][4], av[2][4];
#pragma unroll
                    for (int mt = 0; mt < 2; ++mt) {
                        ldmatrix_x4(ak[mt], a_addr<LDS>(sK, kr + 16 * mt, 16 * ks, lane));
                        ldmatrix_x4(av[mt], a_addr<LDS>(sV, kr + 16 * mt, 16 * ks, lane));
                    }
#pragma unroll
                    for (int np = 0; np < 2; ++np) {
                        uint32_t bq[4], bo[4];
                        ldmatrix_x4(bq, bt_addr<LDS>(cQ, qc + 16 * np, 16 * ks, lane));
                        ldmatrix_x4(bo, bt_addr<LDS>(cdO, qc + 16 * np, 16 * ks, lane));
#pragma unroll
                        for (int mt = 0; mt < 2; ++mt) {
                            mma2(st[mt][2 * np], st[mt][2 * np + 1], ak[mt], bq);
                            mma2(dpt[mt][2 * np], dpt[mt][2 * np + 1], av[mt], bo);
                        }
                    }
                }
            }
#pragma unroll
            for (int mt = 0; mt < 2; ++mt)
#pragma unroll
                for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        const int qi = qc + 8 * nt + 2 * tq + (i & 1);  // query q0 + qi
                        float p = live ? fast_exp2(fmaf(st[mt][nt][i], sl2, -(cL[qi] * LOG2E))) : 0.f;  // cL: lse
                        if (diag && wk0 + 16 * mt + g + 8 * (i >> 1) > q0 + qi) p = 0.f;
                        st[mt][nt][i] = p;
                        dpt[mt][nt][i] = p * (dpt[mt][nt][i] - cDl[qi]) * scale;
                    }
#pragma unroll
                    for (int r = 0; r < 2; ++r) {
                        const int at = (kr + 16 * mt + g + 8 * r) * LDP + qc + 8 * nt + 2 * tq;
                        *reinterpret_cast<uint32_t *>(sP + at) = pack_bf16(st[mt][nt][2 * r], st[mt][nt][2 * r + 1]);
                        *reinterpret_cast<uint32_t *>(sdS + at) =
                            pack_bf16(dpt[mt][nt][2 * r], dpt[mt][nt][2 * r + 1]);
                    }
                }
        }
        __syncthreads();

        // 2. dV += Pᵀ dO, dK += dSᵀ Q over the step's queries, 16 at a time.
#pragma unroll
        for (int kk = 0; kk < KV_BQ / 16; ++kk) {
            if (q0 + 16 * kk + 15 < k0 + kr) continue;  // these queries precede the warp's keys: P = 0
            uint32_t ap[2][4], ad[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
                ldmatrix_x4(ap[mt], a_addr<LDP>(sP, kr + 16 * mt, 16 * kk, lane));
                ldmatrix_x4(ad[mt], a_addr<LDP>(sdS, kr + 16 * mt, 16 * kk, lane));
            }
#pragma unroll
            for (int dp = 0; dp < DH / 16; ++dp) {
                uint32_t bo[4], bq[4];
                ldmatrix_x4_trans(bo, b_trans_addr<LDS>(cdO, 16 * kk, dc + 16 * dp, lane));
                ldmatrix_x4_trans(bq, b_trans_addr<LDS>(cQ, 16 * kk, dc + 16 * dp, lane));
#pragma unroll
                for (int mt = 0; mt < 2; ++mt) {
                    mma2(dv_acc[mt][2 * dp], dv_acc[mt][2 * dp + 1], ap[mt], bo);
                    mma2(dk_acc[mt][2 * dp], dk_acc[mt][2 * dp + 1], ad[mt], bq);
                }
            }
        }

        if constexpr (FUSE_DQ) {  // 3. dQ += dS K for queries q0 + qr .. + 16, over the block's keys
            const int wq0 = q0 + qr;
            float acc[DH / 8][4];
#pragma unroll
            for (int nt = 0; nt < DH / 8; ++nt)
#pragma unroll
                for (int i = 0; i < 4; ++i) acc[nt][i] = 0.f;
            // A = dS [16 queries][16 keys]: the transposed fragments of the stored dSᵀ rows (keys).
#pragma unroll 2
            for (int kk = 0; kk < TC_BK / 16; ++kk) {
                if (k0 + 16 * kk > wq0 + 15) break;  // keys from here on lie past these queries
                uint32_t a[4];
                ldmatrix_x4_trans(a, bt_addr<LDP>(sdS, 16 * kk, qr, lane));
#pragma unroll
                for (int dp = 0; dp < DH / 16; ++dp) {
                    uint32_t bk[4];
                    ldmatrix_x4_trans(bk, b_trans_addr<LDS>(sK, 16 * kk, dc + 16 * dp, lane));
                    mma2(acc[2 * dp], acc[2 * dp + 1], a, bk);
                }
            }
            const int h = hkv * group + s / nqt;
            float *dqh = dq_acc + ((size_t)b * hq + h) * t * D;
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int query = wq0 + g + 8 * r;
                if (query >= t) continue;
#pragma unroll
                for (int nt = 0; nt < DH / 8; ++nt)
                    atomic_add2(dqh + (size_t)query * D + dc + 8 * nt + 2 * tq, acc[nt][2 * r], acc[nt][2 * r + 1]);
            }
        }
    }

    bf16 *dkh = dk + kvoff, *dvh = dv + kvoff;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int key = k0 + kr + 16 * mt + g + 8 * r;
            if (key >= t) continue;
#pragma unroll
            for (int nt = 0; nt < DH / 8; ++nt) {
                const size_t at = (size_t)key * D + dc + 8 * nt + 2 * tq;
                *reinterpret_cast<uint32_t *>(dkh + at) = pack_bf16(dk_acc[mt][nt][2 * r], dk_acc[mt][nt][2 * r + 1]);
                *reinterpret_cast<uint32_t *>(dvh + at) = pack_bf16(dv_acc[mt][nt][2 * r], dv_acc[mt][nt][2 * r + 1]);
            }
        }
}

// f32: the scalar-FMA kernels above (parity path). bf16: the tensor-core kernels.
#define FLASH_F32(D)                                                                                  \
    extern "C" __global__ void __launch_bounds__(128)                                                 \
        flash_fwd_f32_d##D(const float *q, const float *k, const float *v, float *o, float *lse,      \
                           int hq, int hk, int t, float scale) {                                      \
        flash_fwd<float, D>(q, k, v, o, lse, hq, hk, t, scale);                                       \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(128)                                                 \
        flash_bwd_pre_f32_d##D(const float *o, const float *dout, float *delta, long long rows) {     \
        flash_bwd_pre<float, D>(o, dout, delta, rows);                                                \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(128)                                                 \
        flash_bwd_f32_d##D(const float *q, const float *k, const float *v, const float *dout,         \
                           const float *lse, const float *delta, float *dq_acc, float *dk, float *dv, \
                           int hq, int hk, int t, float scale) {                                      \
        flash_bwd<float, D>(q, k, v, dout, lse, delta, dq_acc, dk, dv, hq, hk, t, scale);             \
    }
#define FLASH_BF16(D)                                                                                 \
    extern "C" __global__ void __launch_bounds__(TC_FWD_THREADS, 2)                                   \
        flash_fwd_bf16_d##D(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *o, float *lse, int hq, \
                            int hk, int t, float scale) {                                             \
        flash_fwd_tc<D>(q, k, v, o, lse, hq, hk, t, scale);                                           \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(TC_FWD_THREADS, 2)                                   \
        flash_fwd_full_bf16_d##D(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *o, float *lse,    \
                                 int hq, int hk, int t, float scale) {                                \
        flash_fwd_tc<D, false>(q, k, v, o, lse, hq, hk, t, scale);                                    \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(128)                                                 \
        flash_bwd_pre_bf16_d##D(const bf16 *o, const bf16 *dout, float *delta, long long rows) {      \
        flash_bwd_pre<bf16, D>(o, dout, delta, rows);                                                 \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(TC_DQ_THREADS, 256 / TC_DQ_THREADS)                 \
        flash_bwd_dq_bf16_d##D(const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *dout,         \
                               const float *lse, const float *delta, bf16 *dq, int hq, int hk, int t, \
                               float scale) {                                                         \
        flash_bwd_dq_tc<D>(q, k, v, dout, lse, delta, dq, hq, hk, t, scale);                          \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(TC_THREADS, 1)                                       \
        flash_bwd_dkdv_bf16_d##D(const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *dout,       \
                                 const float *lse, const float *delta, bf16 *dk, bf16 *dv, int hq,    \
                                 int hk, int t, float scale) {                                        \
        flash_bwd_dkdv_tc<D>(q, k, v, dout, lse, delta, dk, dv, hq, hk, t, scale);                    \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(TC_THREADS, 1)                                       \
        flash_bwd_dkdv64_bf16_d##D(const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *dout,     \
                                   const float *lse, const float *delta, bf16 *dk, bf16 *dv, int hq,  \
                                   int hk, int t, float scale) {                                      \
        flash_bwd_kv64_tc<D, false>(q, k, v, dout, lse, delta, dk, dv, nullptr, hq, hk, t, scale);    \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(TC_THREADS, 1)                                       \
        flash_bwd_dkdvdq_bf16_d##D(const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *dout,     \
                                   const float *lse, const float *delta, bf16 *dk, bf16 *dv,          \
                                   float *dq_acc, int hq, int hk, int t, float scale) {               \
        flash_bwd_kv64_tc<D, true>(q, k, v, dout, lse, delta, dk, dv, dq_acc, hq, hk, t, scale);      \
    }
FLASH_F32(32)
FLASH_F32(64)
FLASH_F32(96)
FLASH_F32(128)
FLASH_BF16(32)
FLASH_BF16(64)
FLASH_BF16(96)
FLASH_BF16(128)
