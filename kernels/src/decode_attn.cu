// Attention of one new query position per sequence against its KV cache (decode), heads merged
// on the way out: softmax(q·Kᵀ·scale)·V for every query head in one launch (two for long
// caches), where the composed path ran a batched q·Kᵀ GEMM, a softmax, a batched P·V GEMM and a
// head merge per layer and token. No mask: every cached key precedes the query.
//
// Shapes: q [B, Hq, D] contiguous (the [B, Hq, 1, D] query); k, v [B, Hk, S, D] with rows of D
//         contiguous and any batch / head strides `sb`, `sh` (elements): the cache's narrowed
//         views, read in place; query head h reads K/V head h / (Hq / Hk). out [B, Hq·D] (head
//         h's values at h·D: merge_heads' layout for T = 1). D ∈ {32, 64, 96, 128}.
//         s_dev (nullable): a device int holding S instead of `s`, for a step replayed from a
//         CUDA graph; the grid is then sized for the cache's capacity and splits past S
//         contribute nothing (max −∞, sum 0) to the combine.
//         Split S (NS > 1): po [B, Hq, NS, D] f32 (unnormalised partial outputs), pm, pl
//         [B, Hq, NS] f32 (each split's max and sum of exponentials, base 2); counts (nullable)
//         [B, Hq] u32, zero before the launch and left zero after it, used by no other launch
//         running meanwhile: each split counts itself done, and the last of a row's splits
//         combines them (decode_combine_row), so no combine launch follows. The CUDA-graph
//         step passes its own; eager launches pass none (streams are per thread, and tensor-
//         parallel ranks decode on one device at once).
// Launch: decode_attn_T_dD    grid (Hq, B, NS), block 128 (4 warps), static smem only. Split z
//                             handles keys [z·C, min(S, (z+1)·C)) with C = decode_chunk(S, want):
//                             S spread over `want` splits in multiples of 64 keys, at most
//                             DECODE_CHUNK. The host picks `want` so that B·Hq·want blocks fill
//                             the GPU (a batch-1 step with 32 heads ran 32 blocks on 132 SMs) and
//                             NS ≥ ⌈S / C⌉; splits past S are empty. NS = 1 writes out directly;
//                             otherwise po/pm/pl. C depends on S and want only, so an eager step
//                             (NS = ⌈S / C⌉) and a graph step (NS for the capacity) split alike.
//         decode_attn_combine_T  grid (Hq, B), block D (a multiple of 32): out from the NS splits,
//                                when the splits ran without counts.
//         Inside a block, lanes work in groups of L = D/8 rounded up to a power of two: lane
//         `sub` of a group holds elements 8·sub..8·sub+7 of a row (16-byte loads when T is bf16),
//         each group takes one key (or V row) per step, 32/L of them per warp, and issues the
//         loads of DECODE_INFLIGHT steps before it uses the first.
// Numerics: f32 throughout: s_j = Σ_d q_d·k_jd · (scale·log2 e), m = max s, p_j = 2^(s_j − m),
//           l = Σ p_j, o = Σ p_j·v_j / l, rounded to T once (the composed path rounds the scores
//           and P to T as well). Splits combine as o = Σ 2^(m_i − M)·o_i / Σ 2^(m_i − M)·l_i.
//           Reference: ops::attention::decode_attention's cpu_fwd (same formula, f32).
// Supported T: f32, bf16.
#include "common.cuh"

#define LOG2E_F 1.4426950408889634f
constexpr int DECODE_WARPS = 4;
constexpr int DECODE_CHUNK = 512;     // most keys per split (the scores' shared array)
constexpr int DECODE_MIN_CHUNK = 64;  // fewest keys per split (a smaller split's work is its launch)
// Keys (and V rows) a lane group loads before it uses any. The kernel is latency-bound: a block
// of 4 warps moves 8 rows (2 KB at D = 128, bf16) per dependent round trip to memory, where an
// SM needs ~25 KB in flight to draw its share of HBM bandwidth (~36 B/ns × ~700 ns). With one
// row in flight, 256 keys in 4 splits took 12.5 µs a layer (H200, run 8's decode breakdown).
constexpr int DECODE_INFLIGHT = 8;

// Keys per split for S keys spread over `want` splits: ⌈S / want⌉ rounded up to a multiple of
// DECODE_MIN_CHUNK, clamped to [DECODE_MIN_CHUNK, DECODE_CHUNK]. ops::attention::decode::splits
// has the same function on the host (the grid's NS).
__host__ __device__ inline int decode_chunk(int s, int want) {
    const int c = ((s + want - 1) / want + DECODE_MIN_CHUNK - 1) / DECODE_MIN_CHUNK * DECODE_MIN_CHUNK;
    return c < DECODE_MIN_CHUNK ? DECODE_MIN_CHUNK : c > DECODE_CHUNK ? DECODE_CHUNK : c;
}

template <int D> __host__ __device__ constexpr int decode_group() {
    return D / 8 <= 4 ? 4 : D / 8 <= 8 ? 8 : D / 8 <= 16 ? 16 : 32;
}

// Row `row`'s output from its NS splits' partials, one column a thread (any block size): the
// combine kernel's block, or the last split's. The partials are read past L1 (__ldcg): other
// blocks wrote them, and a block of an earlier launch on this SM may have cached their lines.
template <typename T>
__device__ void decode_combine_row(const float *po, const float *pm, const float *pl, T *out, long long row, int d,
                                   int ns) {
    const float *m = pm + row * ns, *l = pl + row * ns;
    float mx = -INFINITY;
    for (int i = 0; i < ns; ++i) mx = fmaxf(mx, __ldcg(m + i));
    for (int x = threadIdx.x; x < d; x += blockDim.x) {
        float den = 0.f, num = 0.f;
        for (int i = 0; i < ns; ++i) {
            const float w = exp2f(__ldcg(m + i) - mx);
            den += w * __ldcg(l + i);
            num += w * __ldcg(po + (row * ns + i) * d + x);
        }
        out[row * d + x] = from_f32<T>(num / den);
    }
}

template <typename T, int D>
__device__ void decode_attn(const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v,
                            long long sb, long long sh, T *__restrict__ out, float *__restrict__ po,
                            float *__restrict__ pm, float *__restrict__ pl, int hq, int hk, int s, int want, float scale,
                            const int *__restrict__ s_dev, unsigned *__restrict__ counts) {
    if (s_dev) s = *s_dev;
    constexpr int L = decode_group<D>(), PER_WARP = 32 / L, STEP = DECODE_WARPS * PER_WARP;
    __shared__ float p[DECODE_CHUNK];                   // scores, then probabilities
    __shared__ float red[DECODE_WARPS * PER_WARP][D];   // each group's partial output
    __shared__ float scratch[32];
    const int h = blockIdx.x, b = blockIdx.y, split = blockIdx.z, ns = gridDim.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, sub = lane % L, slot = lane / L;
    const bool active = 8 * sub < D;  // D = 96: the last 4 lanes of a 16-lane group idle
    const int chunk = decode_chunk(s, want), j0 = split * chunk, n = min(chunk, s - j0);
    const long long kv = b * sb + (long long)(h / (hq / hk)) * sh;
    const T *kh = k + kv, *vh = v + kv;

    float qv[8] = {};
    if (active) {
        load8(q + ((long long)b * hq + h) * D + 8 * sub, qv);
#pragma unroll
        for (int i = 0; i < 8; ++i) qv[i] *= scale * LOG2E_F;
    }
    // V rows of the group (see below) DECODE_INFLIGHT at a time, the first of them issued with
    // the first keys: their round trip overlaps the scores' and softmax's (a 64-key split is one).
    const int v0 = warp * PER_WARP + slot;
    Chunk8<T> vr[DECODE_INFLIGHT];
    auto load_v = [&](int base) {
#pragma unroll
        for (int u = 0; u < DECODE_INFLIGHT; ++u)
            if (active && base + u * STEP < n) vr[u] = load_chunk_stream(vh + (long long)(j0 + base + u * STEP) * D + 8 * sub);
    };
    load_v(v0);
    // Scores: group `slot` of warp `warp` takes keys warp·PER_WARP + slot, + STEP, ..., loading
    // DECODE_INFLIGHT of them before using any.
    for (int base = warp * PER_WARP; base < n; base += STEP * DECODE_INFLIGHT) {
        Chunk8<T> kr[DECODE_INFLIGHT];
#pragma unroll
        for (int u = 0; u < DECODE_INFLIGHT; ++u) {
            const int j = base + u * STEP + slot;
            if (active && j < n) kr[u] = load_chunk_stream(kh + (long long)(j0 + j) * D + 8 * sub);
        }
#pragma unroll
        for (int u = 0; u < DECODE_INFLIGHT; ++u) {
            const int j = base + u * STEP + slot;
            float part = 0.f;
            if (active && j < n) {
                float kf[8];
                unpack8(kr[u], kf);
#pragma unroll
                for (int i = 0; i < 8; ++i) part = fmaf(qv[i], kf[i], part);
            }
#pragma unroll
            for (int o = L / 2; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
            if (sub == 0 && j < n) p[j] = part;
        }
    }
    __syncthreads();
    float m = -INFINITY;
    for (int j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, p[j]);
    m = block_max(m, scratch);
    float l = 0.f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const float e = exp2f(p[j] - m);
        p[j] = e;
        l += e;
    }
    l = block_sum(l, scratch);  // its barriers also publish p
    // o = Σ p_j v_j: group `slot` takes rows as the keys (summed in their order), lane `sub` its
    // 8 columns.
    if (active) {
        float acc[8] = {};
        for (int base = v0; base < n; base += STEP * DECODE_INFLIGHT) {
            if (base != v0) load_v(base);
#pragma unroll
            for (int u = 0; u < DECODE_INFLIGHT; ++u) {
                if (base + u * STEP >= n) break;
                const float pj = p[base + u * STEP];
                float vf[8];
                unpack8(vr[u], vf);
#pragma unroll
                for (int i = 0; i < 8; ++i) acc[i] = fmaf(pj, vf[i], acc[i]);
            }
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) red[warp * PER_WARP + slot][8 * sub + i] = acc[i];
    }
    __syncthreads();
    const long long row = (long long)b * hq + h;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float o = 0.f;
#pragma unroll
        for (int g = 0; g < DECODE_WARPS * PER_WARP; ++g) o += red[g][d];
        if (ns == 1) {
            out[row * D + d] = from_f32<T>(o / l);
        } else {
            po[(row * ns + split) * D + d] = o;
        }
    }
    if (ns > 1 && threadIdx.x == 0) {
        pm[row * ns + split] = m;
        pl[row * ns + split] = l;
    }
    if (ns > 1 && counts) {
        // The block's partials reach thread 0 by the barrier; its fences order them device-wide
        // before the count, and the other splits' (counted before) before the combine's reads
        // (cooperative groups' grid sync does the same).
        __shared__ bool last;
        __syncthreads();
        if (threadIdx.x == 0) {
            __threadfence();
            last = atomicAdd(counts + row, 1u) == (unsigned)ns - 1;
            __threadfence();
        }
        __syncthreads();
        if (last) {
            decode_combine_row(po, pm, pl, out, row, D, ns);
            if (threadIdx.x == 0) counts[row] = 0;  // for the next launch (stream-ordered)
        }
    }
}

template <typename T>
__device__ void decode_attn_combine(const float *__restrict__ po, const float *__restrict__ pm,
                                    const float *__restrict__ pl, T *__restrict__ out, int hq, int d, int ns) {
    decode_combine_row(po, pm, pl, out, (long long)blockIdx.y * hq + blockIdx.x, d, ns);
}

#define DECODE_ATTN(TY, NAME, D)                                                                           \
    extern "C" __global__ void __launch_bounds__(32 * DECODE_WARPS)                                        \
        decode_attn_##NAME##_d##D(const TY *q, const TY *k, const TY *v, long long sb, long long sh, TY *out, \
                                  float *po, float *pm, float *pl, int hq, int hk, int s, int want,         \
                                  float scale, const int *s_dev, unsigned *counts) {                       \
        decode_attn<TY, D>(q, k, v, sb, sh, out, po, pm, pl, hq, hk, s, want, scale, s_dev, counts);       \
    }
#define DECODE_ATTN_COMBINE(TY, NAME)                                                                       \
    extern "C" __global__ void decode_attn_combine_##NAME(const float *po, const float *pm, const float *pl, \
                                                          TY *out, int hq, int d, int ns) {                  \
        decode_attn_combine<TY>(po, pm, pl, out, hq, d, ns);                                                 \
    }
DECODE_ATTN(float, f32, 32)
DECODE_ATTN(float, f32, 64)
DECODE_ATTN(float, f32, 96)
DECODE_ATTN(float, f32, 128)
DECODE_ATTN(bf16, bf16, 32)
DECODE_ATTN(bf16, bf16, 64)
DECODE_ATTN(bf16, bf16, 96)
DECODE_ATTN(bf16, bf16, 128)
DECODE_ATTN_COMBINE(float, f32)
DECODE_ATTN_COMBINE(bf16, bf16)
