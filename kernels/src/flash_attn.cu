// Causal self-attention in the FlashAttention-2 style: tiled, online softmax, no T×T matrix in
// memory; forward, and backward by recomputation from the saved log-sum-exp.
//
// Shapes (row-major contiguous): q, o, do, dq [B, Hq, T, D]; k, v, dk, dv [B, Hk, T, D] with
//   Hq % Hk == 0 (GQA: query head h reads K/V head h / (Hq/Hk), the group's heads consecutive,
//   as in models::llama); lse, delta [B, Hq, T] f32; dq_acc [B, Hq, T, D] f32, zero-filled.
//   Queries and keys are the same T positions (training); query i sees keys j ≤ i.
//   D ∈ {32, 64, 96, 128}; T any (partial tiles are masked / zero-filled).
// Launch (4 warps = 128 threads per block; PAD = 16 bytes of T per shared row against bank
//   conflicts; LD = D + PAD; global tiles move in 16-byte chunks when 16-byte aligned):
//   flash_fwd   grid (⌈T/64⌉, Hq, B); block i handles query tile ⌈T/64⌉−1−i (longest first),
//               16 query rows per warp, 64-key tiles. P stays in registers (the S accumulators
//               are the A operand of P·V). Dynamic smem (64·LD·2 + D·(64+PAD))·sizeof(T):
//               Q, K and Vᵀ tiles.
//   flash_bwd_pre  grid (⌈B·Hq·T/4⌉), block 128, one warp per row: delta = Σ_d dO·O.
//   flash_bwd   grid (⌈T/64⌉, Hk, B); block = one 64-key tile of one K/V head, 16 keys per warp;
//               loops over the group's query heads and the 32-query tiles at or after the key
//               tile; Sᵀ, dPᵀ (hence Pᵀ, dSᵀ) live in registers and feed dV += Pᵀ dO and
//               dK += dSᵀ Q directly; dK, dV accumulate in registers (summed over the group: no
//               atomics); dS goes through shared memory for dQ += dS K, added to dq_acc with f32
//               atomics. Dynamic smem (2·64·LD + D·(64+PAD) + 2·32·LD + 2·D·(32+PAD)
//               + 32·(64+PAD))·sizeof(T) + 2·32·4: K, Kᵀ, V, Q, Qᵀ, dO, dOᵀ, dS tiles, lse and
//               delta of the query tile (transposed copies so every B operand is row-major).
//   flash_dq_convert  1-D grid-stride, block 256: dq = round_T(dq_acc) (bf16 only).
// Numerics: every product through mma_tile (common.cuh): bf16 operands on the tensor cores
//   (mma.sync m16n8k16) with f32 accumulation, or f32 operands with scalar f32 FMAs. Softmax
//   statistics in f32, base 2 with the scale folded in (s·scale·log2 e); lse is stored in natural
//   units of the scaled scores. P (and dS) are rounded to T before they multiply V (dO, Q, K),
//   as FlashAttention does; the row sum l uses the unrounded P. dS carries the softmax scale.
//   Reference: ops::attention's CPU forward (materialised softmax(QKᵀ·scale)V in f32) and
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

// A launch with less dynamic shared memory than the tiles need would corrupt memory silently.
__device__ __forceinline__ void require_smem(unsigned need) {
#ifndef SHARDSMITH_EMU
    unsigned have;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(have));
    if (have < need) __trap();
#endif
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
    const int qt = nq - 1 - (int)blockIdx.x;
    const int h = blockIdx.y, b = blockIdx.z;
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

    const int kt = blockIdx.x, hkv = blockIdx.y, b = blockIdx.z;
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

#define FLASH(TY, NAME, D)                                                                            \
    extern "C" __global__ void __launch_bounds__(128)                                                 \
        flash_fwd_##NAME##_d##D(const TY *q, const TY *k, const TY *v, TY *o, float *lse, int hq,      \
                                int hk, int t, float scale) {                                         \
        flash_fwd<TY, D>(q, k, v, o, lse, hq, hk, t, scale);                                          \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(128)                                                 \
        flash_bwd_pre_##NAME##_d##D(const TY *o, const TY *dout, float *delta, long long rows) {      \
        flash_bwd_pre<TY, D>(o, dout, delta, rows);                                                   \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(128)                                                 \
        flash_bwd_##NAME##_d##D(const TY *q, const TY *k, const TY *v, const TY *dout,                \
                                const float *lse, const float *delta, float *dq_acc, TY *dk, TY *dv,  \
                                int hq, int hk, int t, float scale) {                                 \
        flash_bwd<TY, D>(q, k, v, dout, lse, delta, dq_acc, dk, dv, hq, hk, t, scale);                \
    }
FLASH(float, f32, 32)
FLASH(float, f32, 64)
FLASH(float, f32, 96)
FLASH(float, f32, 128)
FLASH(bf16, bf16, 32)
FLASH(bf16, bf16, 64)
FLASH(bf16, bf16, 96)
FLASH(bf16, bf16, 128)

extern "C" __global__ void flash_dq_convert_bf16(const float *__restrict__ acc, bf16 *__restrict__ dq,
                                                 long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        dq[i] = from_f32<bf16>(acc[i]);
}
