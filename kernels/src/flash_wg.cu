// Attention on Hopper's warpgroup MMA: the forward (causal, and unmasked for CLIP) and the
// backward (flash_bwd_wg, below). The FlashAttention-3 core (wgmma for every product, P kept in
// registers as the A operand of P·V), first without its warp specialisation and TMA: tiles come
// in by cp.async, double-buffered, as in flash_attn.cu's mma.sync kernels, which stay the path
// on other GPUs, head dims and alignments. flash_fwd_tma and flash_bwd_tma (below) are the same
// products warp-specialised and fed by TMA: a producer warpgroup's one thread loads 128-byte
// swizzled tiles, two consumer warpgroups compute, synchronised by mbarriers (pipeline.cuh); the
// defaults where built (FlashAttention-3's structure). Needs sm_90a (kernels/build.rs compiles for it when
// CUDA_COMPUTE_CAP is 90); elsewhere this file compiles to nothing and the launcher keeps the
// mma.sync kernels.
//
// Shapes as flash_attn.cu: q, o [B, Hq, T, D] and k, v [B, Hk, T, D] bf16, row-major contiguous
// (16-byte aligned; the launcher checks), Hq % Hk == 0; lse [B, Hq, T] f32; D ∈ {64, 128}.
// Geometry: grid (⌈T/128⌉, Hq, B), 256 threads = 2 warpgroups × 64 query rows; block i (the
// i-th tile of every head: common.cuh's heaviest_first) takes query tile ⌈T/128⌉−1−i (longest
// first). BN-key tiles (64; 128 for `_n128`, D 128 only) from 0
// up to the diagonal (causal) or T:
//   S = Q Kᵀ   D/16 × wgmma.m64nBNk16, Q from registers (its A fragments, read once from shared
//              memory: wg_load_a), K from shared memory (K-major);
//   O += P V   BN/16 × wgmma.m64nDk16, P from registers (S's accumulators rounded to bf16, the
//              same packing as flash_fwd_tc), V from shared memory (MN-major: .trans).
// 128-key tiles halve the barriers, waits and O rescales per key and read B in wider products,
// for 254 registers instead of 200 (one block an SM either way) and 160 KB of shared memory.
// Q in registers because shared memory's bandwidth (128 bytes a clock an SM) is what binds: an
// m64n64k16 with both operands in shared memory reads 4 KB in the ~32 clocks the tensor cores
// take for it, all of the bandwidth with nothing left for the tiles cp.async writes; with A in
// registers it reads 2 KB. (The first version read Q from shared memory: 199 TFLOP/s forward on
// an H200, against 281 for the mma.sync kernel; BENCHMARKS.md.)
// P·V of tile j is issued in iteration j + 1 together with S of tile j + 1 and runs while that
// tile's softmax is computed; O is rescaled once it lands (FlashAttention-3's intra-warpgroup
// overlap). So V loads lag K's by a tile: iteration j loads K_{j+1} and V_j.
// A warpgroup masks the tiles crossing its diagonal (and, with 64-key tiles, computes a block's
// last tile even where it lies wholly past its rows: a skip there makes ptxas serialise the
// wgmmas; a 128-key tile always starts at or before both warpgroups' first rows).
// Shared memory: every [rows][D] tile in wgmma's no-swizzle canonical layout (wgmma.cuh): core
// matrix (r/8, c/8) of 8 rows × 8 columns at byte ((r/8)·(D/8) + c/8)·128, row r%8 at +16·(r%8).
// Read as K-major (K; Q is read into registers by wg_load_a) it has LBO 128 and SBO D/8·128;
// read as MN-major (V, whose rows are the contraction) LBO D/8·128 and SBO 128. cp.async writes 16-byte chunks with the 8 rows of a
// core matrix on consecutive threads (conflict-free; each global row read in 64-byte runs).
// Smem wg_fwd_smem_bytes<D, BN>: Q [128], K [2][BN], V [2][BN] rows of D bf16 (96 KB at D = 128,
// 160 KB with 128-key tiles, 48 KB at D = 64); registers allow two blocks an SM at D = 64, one at
// D = 128.
// Numerics as flash_fwd_tc: f32 accumulation, base-2 online softmax with the scale folded in,
// P rounded to bf16 before P·V, l summed from the unrounded P, lse in natural units.
#include "phases.cuh"
#include "pipeline.cuh"
#include "wgmma.cuh"

#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

constexpr int WG_BM = 128, WG_THREADS = 256;

// Shared memory of flash_fwd_wg<D, BN>: Q [128] and K, V [2][BN] rows of D bf16.
template <int D, int BN> __host__ __device__ constexpr int wg_fwd_smem_bytes() { return (WG_BM + 4 * BN) * D * 2; }

#if SHARDSMITH_WGMMA
// The A fragments (wgmma.cuh: the m16n8k16 A layout of the warp's 16 rows) of rows 16·warp ..
// 16·warp + 15 of a 64-row tile in the canonical K-major layout with D columns, for each
// 16-column step: a[ks][i] holds row g + 8·(i & 1), columns 16·ks + 2·tq + 8·(i >> 1) and the next
// (g = lane / 4, tq = lane % 4). Each load instruction of the warp reads one core matrix's 128
// contiguous bytes: no bank conflicts. The caller makes the tile's cp.async writes visible first.
template <int D> __device__ __forceinline__ void wg_load_a(uint32_t (&a)[D / 16][4], const bf16 *tile, int warp, int lane) {
    const int g = lane >> 2, tq = lane & 3;
    const unsigned char *base = reinterpret_cast<const unsigned char *>(tile);
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int r = 16 * warp + g + 8 * (i & 1), c = 16 * ks + 2 * tq + 8 * (i >> 1);
            a[ks][i] = *reinterpret_cast<const uint32_t *>(base + ((r / 8) * (D / 8) + c / 8) * 128 + (r % 8) * 16 +
                                                           (c % 8) * 2);
        }
}

// Rows [r0, r0 + N) of a row-major [t, D] bf16 matrix into dst in the canonical layout (zeros
// past row t), by cp.async (the caller commits and waits), shared by the block's WG_THREADS.
// Chunk i: row (i/8/(D/8))·8 + i%8, column chunk (i/8) % (D/8).
template <int D, int N>
__device__ __forceinline__ void wg_tile_load(bf16 *dst, const bf16 *__restrict__ src, int r0, int t) {
    constexpr int C = D / 8, NTH = WG_THREADS;
    const int tid = threadIdx.x;
    // A whole number of chunks a thread (the kernels run NTH threads: require_smem), so the loop
    // unrolls completely, without the bounds branches a strided loop from threadIdx compiles to.
    static_assert(N * C % NTH == 0, "wg_tile_load: whole chunks per thread");
#pragma unroll
    for (int it = 0; it < N * C / NTH; ++it) {
        const int i = tid + it * NTH;
        const int r8 = i % 8, c = (i / 8) % C, rg = i / 8 / C, r = 8 * rg + r8;
        const bool ok = r0 + r < t;
        cp_async16(dst + (rg * C + c) * 64 + r8 * 8, src + (size_t)(ok ? r0 + r : 0) * D + 8 * c, ok);
    }
}

// The online softmax of one key tile (flash_fwd_wg and flash_fwd_tma): masks s [BN/8][4] (S of
// keys k0 .. k0 + BN against this warp's rows rq0 + g, + 8) across the diagonal (CAUSAL) or the
// end T, updates the running max m_r and sum l_r, and leaves P = exp2(s·sl2 − max·sl2) in s and
// O's rescale factor in alpha, a row's two values each.
template <int BN, bool CAUSAL>
__device__ __forceinline__ void wg_fwd_softmax(float (&s)[BN / 8][4], float (&m_r)[2], float (&l_r)[2],
                                               float (&alpha)[2], int k0, int rq0, int g, int tq, int t, float sl2) {
    if (CAUSAL ? k0 + BN - 1 > rq0 : k0 + BN > t) {  // crosses the diagonal / the end
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt)
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
        for (int nt = 0; nt < BN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        // finite once a row has seen key 0 (tile 0 is never skipped): a row whose keys in this
        // tile all lie past it keeps its max (−∞ − m is −∞, p = 0)
        alpha[r] = fast_exp2((m_r[r] - mx) * sl2);
        m_r[r] = mx;
        mb[r] = mx * sl2;
        l_r[r] *= alpha[r];
    }
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float p = fast_exp2(fmaf(s[nt][i], sl2, -mb[i >> 1]));
            l_r[i >> 1] += p;
            s[nt][i] = p;
        }
}

// The forward's epilogue (flash_fwd_wg and flash_fwd_tma): O = acc / l as bf16 and lse in natural
// units for this warp's rows rq0 + g, + 8 below T. The block's head comes from heaviest_first
// again, so nothing of the prologue's stays live across the loop.
template <int D>
__device__ __forceinline__ void wg_fwd_store(const float (&acc)[D / 8][4], const float (&m_r)[2], const float (&l_r)[2],
                                             bf16 *__restrict__ o, float *__restrict__ lse, int hq, int t, int rq0,
                                             int g, int tq, float sl2) {
    const GridTile here = heaviest_first();
    const size_t hoff = ((size_t)here.batch * hq + here.head) * t;
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

// The phases of the profiled forward (PROF, phases.cuh), in the order and with the meaning of
// ops::attention::phases::FORWARD.
enum WgFwdPhase { WF_PROLOGUE, WF_TILE_WAIT, WF_ISSUE, WF_WAIT_S, WF_SOFTMAX, WF_WAIT_PV, WF_RESCALE, WF_LAST_PV, WF_EPILOGUE, WF_PHASES };

// PROF: the profiled instantiation, counting cycles by phase into prof [2][WF_PHASES] (phases.cuh).
template <int D, int BN, bool CAUSAL, bool PROF = false>
__device__ void flash_fwd_wg(const bf16 *__restrict__ q, const bf16 *__restrict__ k, const bf16 *__restrict__ v,
                             bf16 *__restrict__ o, float *__restrict__ lse, int hq, int hk, int t, float scale,
                             unsigned long long *prof = nullptr) {
    static_assert(D == 64 || D == 128, "wgmma forward: D 64 or 128");
    static_assert(BN == 64 || BN == 128, "wgmma forward: 64- or 128-key tiles");
    constexpr int KS = D / 16, TILE = BN * D;  // elements of a K or V tile
    constexpr uint32_t KMAJ_LBO = 128, KMAJ_SBO = D / 8 * 128;  // K
    constexpr uint32_t MN_LBO = D / 8 * 128, MN_SBO = 128;       // V
    require_smem(wg_fwd_smem_bytes<D, BN>(), WG_THREADS);
    PhaseClock<PROF, WF_PHASES, WG_THREADS / 32> clk(prof);
    DYN_SMEM(smem);
    bf16 *sQ = reinterpret_cast<bf16 *>(smem);  // [128 rows]
    bf16 *sK = sQ + WG_BM * D;                    // [2][BN rows]
    bf16 *sV = sK + 2 * TILE;                     // [2][BN rows]

    const int nq = (t + WG_BM - 1) / WG_BM;
    const GridTile blk = heaviest_first();
    const int q0 = (nq - 1 - blk.tile) * WG_BM;
    const int hkv = blk.head / (hq / hk);
    const bf16 *qh = q + ((size_t)blk.batch * hq + blk.head) * t * D;
    const bf16 *kh = k + ((size_t)blk.batch * hk + hkv) * t * D;
    const bf16 *vh = v + ((size_t)blk.batch * hk + hkv) * t * D;
    const int wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x & 31;
    const int g = lane >> 2, tq = lane & 3;
    const int wq0 = q0 + 64 * wg;        // this warpgroup's first query
    const int rq0 = wq0 + 16 * warp;     // this warp's first query (rows rq0 + g, rq0 + g + 8)
    const int ntiles = ((CAUSAL ? min(q0 + WG_BM, t) : t) + BN - 1) / BN;

    wg_tile_load<D, WG_BM>(sQ, qh, q0, t);
    cp_async_commit();  // group: Q
    wg_tile_load<D, BN>(sK, kh, 0, t);
    cp_async_commit();  // group: K_0

    float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.f, 0.f};
    float acc[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[j][i] = 0.f;
    const float sl2 = scale * LOG2E;
    // This warpgroup's 64 rows of Q as register A operands, for every tile's S (K_0 may still be
    // in flight).
    cp_async_wait<1>();
    __syncthreads();
    uint32_t qa[KS][4];
    wg_load_a<D>(qa, sQ + 64 * wg * D, warp, lane);
    clk.mark(WF_PROLOGUE);
    // P of the previous tile, as the A operand (16 keys each) of its P·V, which is issued one
    // iteration late so that it runs while this tile's softmax is computed (FlashAttention-3's
    // intra-warpgroup overlap).
    uint32_t a[BN / 16][4];
    auto issue_pv = [&](const bf16 *cV) {
        const uint64_t v_desc = wgmma_desc(cV, MN_LBO, MN_SBO);
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {  // 16 keys = 2 row groups (2·LBO bytes) along K
            if constexpr (D == 128)
                wgmma_rs_m64n128k16_tb(acc, a[kk], wgmma_desc_add(v_desc, 2 * MN_LBO * kk), 1);
            else
                wgmma_rs_m64n64k16_tb(acc, a[kk], wgmma_desc_add(v_desc, 2 * MN_LBO * kk), 1);
        }
        wgmma_commit();
    };

    // Iteration j: S = Q K_j and the P·V of tile j − 1 in flight together; K_j and V_{j−1} in
    // shared memory (V lags K by a tile: K_{j+1} and V_j load meanwhile).
    for (int j = 0; j < ntiles; ++j) {
        const int k0 = j * BN;
        // K_j and V_{j−1} (loaded during iteration j − 1, K_0 before the loop) → visible to
        // wgmma. The barrier also means every thread is done with iteration j − 1 (K_{j−1},
        // V_{j−2}), whose buffers the next loads reuse: one barrier an iteration.
        cp_async_wait<0>();
        wgmma_fence_smem();  // this thread's cp.async data → visible to wgmma (async proxy)
        __syncthreads();
        clk.mark(WF_TILE_WAIT);
        // K_{j+1} and V_j, requested once this iteration's products are issued (below): their
        // address arithmetic runs beside the tensor cores.
        auto load_next = [&] {
            if (j + 1 < ntiles) wg_tile_load<D, BN>(sK + ((j + 1) & 1) * TILE, kh, k0 + BN, t);
            wg_tile_load<D, BN>(sV + (j & 1) * TILE, vh, k0, t);
            cp_async_commit();
        };
        // A warpgroup whose rows all precede the tile's keys (causal, 64-key tiles: warpgroup 0
        // in a block's last tile) still computes it, fully masked (p = 0, its max and O unchanged): skipping
        // makes ptxas serialise every wgmma of the kernel (C7520, a wgmma in a divergent path).
        float s[BN / 8][4], alpha[2];
        wgmma_pin(s);
        wgmma_pin(acc);
        wgmma_pin(a);
        wgmma_pin(qa);
        wgmma_fence();  // acc was rescaled and a written by ordinary instructions
        const uint64_t k_desc = wgmma_desc(sK + (j & 1) * TILE, KMAJ_LBO, KMAJ_SBO);
#pragma unroll
        for (int ks = 0; ks < KS; ++ks)  // 16 columns of D = 2 core matrices (256 bytes) along K
            if constexpr (BN == 64)
                wgmma_rs_m64n64k16(s, qa[ks], wgmma_desc_add(k_desc, 256 * ks), ks > 0);
            else
                wgmma_rs_m64n128k16(s, qa[ks], wgmma_desc_add(k_desc, 256 * ks), ks > 0);
        wgmma_commit();
        if (j > 0) {
            issue_pv(sV + ((j - 1) & 1) * TILE);
            load_next();
            clk.mark(WF_ISSUE);
            wgmma_wait<1>();  // S done (the older group), P·V still in flight
        } else {
            load_next();
            clk.mark(WF_ISSUE);
            wgmma_wait<0>();
        }
        wgmma_pin(s);
        clk.mark(WF_WAIT_S);
        // softmax of tile j, while the P·V of tile j − 1 runs
        wg_fwd_softmax<BN, CAUSAL>(s, m_r, l_r, alpha, k0, rq0, g, tq, t, sl2);
        clk.mark(WF_SOFTMAX);
        wgmma_wait<0>();  // P·V of tile j − 1 done: acc is O up to tile j − 1
        wgmma_pin(acc);
        wgmma_pin(a);
        clk.mark(WF_WAIT_PV);
        // rescale O to this tile's max; P of this tile becomes the A of the next P·V
#pragma unroll
        for (int nt = 0; nt < D / 8; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[nt][i] *= alpha[i >> 1];
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) acc_to_a(a[kk], s[2 * kk], s[2 * kk + 1]);
        clk.mark(WF_RESCALE);
    }
    // The last P·V (its V loaded in the last iteration's group).
    cp_async_wait<0>();
    wgmma_fence_smem();
    __syncthreads();
    wgmma_pin(acc);
    wgmma_pin(a);
    wgmma_fence();
    issue_pv(sV + ((ntiles - 1) & 1) * TILE);
    wgmma_wait<0>();
    wgmma_pin(acc);
    clk.mark(WF_LAST_PV);

    wg_fwd_store<D>(acc, m_r, l_r, o, lse, hq, t, rq0, g, tq, sl2);
    clk.mark(WF_EPILOGUE);
    clk.flush();
}

// Warp-specialised forward fed by TMA (FlashAttention-3's structure, D = 128;
// SHARDSMITH_FLASH_FWD=tma): the products and numerics of flash_fwd_wg<128, 128> (S over
// 128-key tiles, P·V of tile j issued with S of tile j + 1), reorganised so that loading, the two
// warpgroups' softmaxes and the tensor cores overlap instead of taking turns behind block-wide
// barriers:
//   warpgroup 0   producer: its thread 0 loads Q, then K_0, V_0, K_1, V_1, ... by TMA from the
//                 tensor maps tmq, tmk, tmv (q, k, v as [B·H][T][D], boxes of 128 rows × 64
//                 columns, 128-byte swizzle; tma_rows) into 2 buffers each of K and V, one
//                 instruction a box (the cp.async producer it replaced took ~2200 cycles to issue
//                 a tile, and the consumers waited a third of their time: run 5); each tile's
//                 `full` mbarrier completes when its bytes land (mbar_expect_tx); a buffer is
//                 refilled only after its `empty` mbarrier says both consumers are done with it
//                 (256 arrivals). The warpgroup gives its registers back (setmaxnreg 24).
//   warpgroups    consumers, 64 query rows each (setmaxnreg 240): per key tile j, wait for K_j;
//   1, 2          issue S = Q·K_jᵀ (8 × wgmma.m64n128k16, Q and K from shared memory, K-major)
//                 and, once V_{j−1} is there, O += P_{j−1}·V_{j−1} (8 × m64n128k16, P from
//                 registers, V MN-major); release K_j when S lands, compute the softmax of tile j
//                 while P·V runs, release V_{j−1} when it lands, rescale O.
//   ping-pong     the consumers take turns (named barriers 1 and 2): one issues its S and P·V,
//                 and the other issues its own once that S has landed, so that one warpgroup's
//                 products run on the tensor cores while the other computes its softmax.
// No __syncthreads after the prologue: a consumer waits only for the buffers it reads.
// Q stays in shared memory (the ss form; O's, S's and P's registers leave no room for Q's 64),
// as in FlashAttention-3. Geometry: grid (⌈T/128⌉, Hq, B) read by heaviest_first, 384 threads,
// one block an SM; smem tma_fwd_smem_bytes: Q [128], K [2][128], V [2][128] rows of D bf16, each
// tile D / 64 atom columns of its rows × 128 bytes, 128-byte swizzled (1024-byte aligned), and
// the mbarriers in static shared memory.
// Output o, lse as flash_fwd_wg<128, 128, CAUSAL>: the same products in the same order (S with Q
// from shared memory rather than registers), the same softmax; bit for bit on an H200 and in
// the emulator.
constexpr int WS_THREADS = 384, WS_BN = 128, WS_PRODUCER_REGS = 24, WS_CONSUMER_REGS = 240;
// Q [128] and K, V [2][128] rows of D bf16 (160 KB at D 128), and 1 KB to start the swizzled
// tiles on a 1024-byte boundary (align_smem).
template <int D> __host__ __device__ constexpr int tma_fwd_smem_bytes() { return (WG_BM + 4 * WS_BN) * D * 2 + 1024; }

// Rows r0 .. r0 + ROWS of one head (`plane`: batch · heads + head of the map's [planes][T][D])
// into dst as D / 64 boxes of 64 columns, each ROWS rows × 128 bytes, 128-byte swizzled: the atom
// columns wgmma_desc_sw128 reads, the one after the other (ROWS · 128 bytes apart). Rows past T
// are zeros. Signals `bar` with ROWS · D · 2 bytes (the caller's mbar_expect_tx).
template <int D, int ROWS>
__device__ __forceinline__ void tma_rows(bf16 *dst, const CUtensorMap *map, int r0, int plane, uint64_t *bar) {
#pragma unroll
    for (int h = 0; h < D / 64; ++h) tma_load_3d(dst + h * ROWS * 64, map, 64 * h, r0, plane, bar);
}

// The phases of the profiled warp-specialised forward (PROF, phases.cuh), in the order and with
// the meaning of ops::attention::phases::WS_FORWARD: the consumers' (prologue to epilogue), then
// the producer's (load_*; its prologue is the first).
enum WsFwdPhase {
    WS_PROLOGUE, WS_TILE_WAIT, WS_TURN, WS_ISSUE_WAIT_S, WS_SOFTMAX, WS_WAIT_PV, WS_RESCALE, WS_LAST_PV,
    WS_EPILOGUE, WS_LOAD_WAIT, WS_LOAD_ISSUE, WS_PHASES
};

// PROF: the profiled instantiation, counting cycles by phase into prof [2][WS_PHASES] (phases.cuh).
template <int D, bool CAUSAL, bool PROF = false>
__device__ void flash_fwd_tma(const CUtensorMap *tmq, const CUtensorMap *tmk, const CUtensorMap *tmv,
                              bf16 *__restrict__ o, float *__restrict__ lse, int hq, int hk, int t, float scale,
                              unsigned long long *prof = nullptr) {
    static_assert(D == 128, "warp-specialised forward: D 128");
    constexpr int BN = WS_BN, KS = D / 16, TILE = BN * D;
    constexpr int CONSUMERS = 256;  // threads
    constexpr int TURN = 1;         // named barriers TURN + c: consumer c may issue
    constexpr int S = 2;            // buffers each of K and V
    require_smem(tma_fwd_smem_bytes<D>(), WS_THREADS);
    PhaseClock<PROF, WS_PHASES, WS_THREADS / 32> clk(prof);
    DYN_SMEM(smem_raw);
    unsigned char *smem = align_smem<1024>(smem_raw);
    bf16 *sQ = reinterpret_cast<bf16 *>(smem);  // [128 rows]
    bf16 *sK = sQ + WG_BM * D;                    // [S][BN rows]
    bf16 *sV = sK + S * TILE;                     // [S][BN rows]
    // q_full; k_full, v_full, k_empty, v_empty [S] each
    __shared__ uint64_t bars[1 + 4 * S];  // 8-byte aligned, as mbarriers must be
    uint64_t *q_full = bars, *k_full = bars + 1, *v_full = bars + 1 + S, *k_empty = bars + 1 + 2 * S,
             *v_empty = bars + 1 + 3 * S;
    if (threadIdx.x == 0) {
        mbar_init(q_full, 1);  // the producer's expect_tx
        for (int i = 0; i < S; ++i) {
            mbar_init(k_full + i, 1);
            mbar_init(v_full + i, 1);
            mbar_init(k_empty + i, CONSUMERS);
            mbar_init(v_empty + i, CONSUMERS);
        }
    }
    __syncthreads();

    const int nq = (t + WG_BM - 1) / WG_BM;
    const GridTile blk = heaviest_first();
    const int q0 = (nq - 1 - blk.tile) * WG_BM;
    const int ntiles = ((CAUSAL ? min(q0 + WG_BM, t) : t) + BN - 1) / BN;
    const int wg = threadIdx.x / 128;

    if (wg == 0) {  // the producer
        setmaxnreg_dec<WS_PRODUCER_REGS>();
        clk.mark(WS_PROLOGUE);
        const int hkv = blk.head / (hq / hk), tid = threadIdx.x;
        if (tid == 0) {  // the other 127 threads have nothing to do
            constexpr unsigned TILE_BYTES = BN * D * 2;
            const int kv_plane = blk.batch * hk + hkv;
            mbar_expect_tx(q_full, WG_BM * D * 2);
            tma_rows<D, WG_BM>(sQ, tmq, q0, blk.batch * hq + blk.head, q_full);
            clk.mark(WS_LOAD_ISSUE);
            // Tile j goes to buffer j % S, its u-th use (u = j / S), after the consumers'
            // (u − 1)-th release of it.
            for (int j = 0; j < ntiles; ++j) {
                const int b = j % S, reuse = j / S - 1;
                if (reuse >= 0) mbar_wait(k_empty + b, reuse & 1);
                clk.mark(WS_LOAD_WAIT);
                mbar_expect_tx(k_full + b, TILE_BYTES);
                tma_rows<D, BN>(sK + b * TILE, tmk, j * BN, kv_plane, k_full + b);
                clk.mark(WS_LOAD_ISSUE);
                if (reuse >= 0) mbar_wait(v_empty + b, reuse & 1);
                clk.mark(WS_LOAD_WAIT);
                mbar_expect_tx(v_full + b, TILE_BYTES);
                tma_rows<D, BN>(sV + b * TILE, tmv, j * BN, kv_plane, v_full + b);
                clk.mark(WS_LOAD_ISSUE);
            }
        }
        clk.flush();
        return;
    }

    setmaxnreg_inc<WS_CONSUMER_REGS>();
    const int c = wg - 1, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x & 31;
    const int g = lane >> 2, tq = lane & 3;
    const int rq0 = q0 + 64 * c + 16 * warp;  // this warp's first query (rows rq0 + g, rq0 + g + 8)
    float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.f, 0.f};
    float acc[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[j][i] = 0.f;
    const float sl2 = scale * LOG2E;
    // Q and K K-major, V MN-major, 128-byte swizzled, as D / 64 atom columns of 128 rows × 128
    // bytes (16 KB) each.
    constexpr int COLUMN = 128 * 128;  // bytes of a swizzled atom column of Q, K or V
    const uint64_t q_desc = wgmma_desc_sw128(sQ + 64 * c * 64, 16, 1024);
    // 16 columns of D further along K: 32 bytes into the row, in atom column ks / 4
    auto kstep = [](int ks) { return (ks / 4) * COLUMN + (ks % 4) * 32; };
    uint32_t a[BN / 16][4];  // P of the previous tile: the A operand of its P·V
    // O += P_j·V_j, once the caller has waited for V_j (v_full): before its wgmma_fence, since a
    // spin loop between a group's products makes ptxas serialise them (C7514).
    auto issue_pv = [&](int j) {
        const uint64_t v_desc = wgmma_desc_sw128(sV + (j % S) * TILE, COLUMN, 1024);
        constexpr int KEYS16 = 16 * 128;  // 16 keys further along K: 16 rows of 128 bytes
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) wgmma_rs_m64n128k16_tb(acc, a[kk], wgmma_desc_add(v_desc, KEYS16 * kk), 1);
        wgmma_commit();
    };
    mbar_wait_copies(q_full, 0);
    if (c == 1) named_arrive(TURN, CONSUMERS);  // consumer 0 issues first
    clk.mark(WS_PROLOGUE);

    for (int j = 0; j < ntiles; ++j) {
        const int k0 = j * BN, b = j % S;
        // V_{j−1} was issued before K_j, so K_j's arrivals come after its: the first wait covers
        // both.
        mbar_wait_copies(k_full + b, (j / S) & 1);
        if (j > 0) mbar_wait_copies(v_full + (j - 1) % S, ((j - 1) / S) & 1);
        clk.mark(WS_TILE_WAIT);
        named_sync(TURN + c, CONSUMERS);
        clk.mark(WS_TURN);
        float s[BN / 8][4], alpha[2];
        wgmma_pin(s);
        wgmma_pin(acc);
        wgmma_pin(a);
        wgmma_fence();  // acc was rescaled and a written by ordinary instructions
        const uint64_t k_desc = wgmma_desc_sw128(sK + b * TILE, 16, 1024);
#pragma unroll
        for (int ks = 0; ks < KS; ++ks)
            wgmma_ss_m64n128k16(s, wgmma_desc_add(q_desc, kstep(ks)), wgmma_desc_add(k_desc, kstep(ks)), ks > 0);
        wgmma_commit();
        if (j > 0) issue_pv(j - 1);
        if (j > 0)
            wgmma_wait<1>();  // S done (the older group), P·V still in flight
        else
            wgmma_wait<0>();
        wgmma_pin(s);
        // One phase from the issue to S landing: a clock mark between a group's issue and its
        // wait makes ptxas serialise the products (C7514).
        clk.mark(WS_ISSUE_WAIT_S);
        // The other consumer's turn, once S has landed (a bar.arrive between a group's issue and
        // its wait makes ptxas serialise the products: C7514). Unconditionally, so consumer 0
        // takes the one arrival too many after its loop.
        named_arrive(TURN + 1 - c, CONSUMERS);
        mbar_arrive(k_empty + b);  // K_j read
        // softmax of tile j, while the P·V of tile j − 1 runs
        wg_fwd_softmax<BN, CAUSAL>(s, m_r, l_r, alpha, k0, rq0, g, tq, t, sl2);
        clk.mark(WS_SOFTMAX);
        wgmma_wait<0>();  // P·V of tile j − 1 done: acc is O up to tile j − 1
        wgmma_pin(acc);
        wgmma_pin(a);
        clk.mark(WS_WAIT_PV);
        if (j > 0) mbar_arrive(v_empty + (j - 1) % S);  // V_{j−1} read
#pragma unroll
        for (int nt = 0; nt < D / 8; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[nt][i] *= alpha[i >> 1];
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) acc_to_a(a[kk], s[2 * kk], s[2 * kk + 1]);
        clk.mark(WS_RESCALE);
    }
    // Consumer 1's arrival after its last issue, so that every phase of both barriers completes.
    if (c == 0) named_sync(TURN, CONSUMERS);
    mbar_wait_copies(v_full + (ntiles - 1) % S, ((ntiles - 1) / S) & 1);
    wgmma_pin(acc);
    wgmma_pin(a);
    wgmma_fence();
    issue_pv(ntiles - 1);  // the last P·V
    wgmma_wait<0>();
    wgmma_pin(acc);
    clk.mark(WS_LAST_PV);

    wg_fwd_store<D>(acc, m_r, l_r, o, lse, hq, t, rq0, g, tq, sl2);
    clk.mark(WS_EPILOGUE);
    clk.flush();
}

// Backward, all of dQ, dK, dV in one kernel on wgmma (D = 128; the FlashAttention-3 backward's
// products without its warp specialisation): grid (⌈T/128⌉, Hk, B), 256 threads = 2 warpgroups;
// block = 128 keys of one K/V head, warpgroup w its keys k0 + 64w ..; steps over the group's
// query heads × the 64-query tiles from k0 on (Q, dO, lse, Δ double-buffered by cp.async). Step:
//   1. Sᵀ = K Qᵀ, dPᵀ = V dOᵀ   D/16 × wgmma.m64n64k16 each, all operands K-major from shared
//      memory, in two groups: Pᵀ = exp2(Sᵀ·scale·log2 e − lse·log2 e) (masked) is computed while
//      dPᵀ's products run; then dSᵀ = Pᵀ ⊙ (dPᵀ − Δ)·scale in registers, also stored (bf16) to
//      shared memory.
//   2. dV += Pᵀ dO, dK += dSᵀ Q   4 × wgmma.m64n128k16, A = Pᵀ / dSᵀ from registers, B = dO / Q
//      MN-major (.trans): dK, dV of the warpgroup's 64 keys accumulate in registers (64 floats
//      each a thread) over the whole group.
//   3. dQ += dS K   warpgroup w: the step's 64 queries × head-dim half w, over the block's 128
//      keys: A = dS from the stored dSᵀ (MN-major), B = K (MN-major); added to
//      dq_acc (f32, zero-filled, [B, Hq, T, D]) by atomic_add2. Phase 2's products are waited
//      for together with phase 3's, so they run across the barrier between the two.
// The next step's tiles are requested (cp.async) right after 1's products are issued.
// A warpgroup whose keys all lie past the step's queries (warpgroup 1 in a block's first step)
// skips 1 and 2 and stores zeros as its dSᵀ rows, so that 3 always runs its eight products as
// one wgmma group (an early exit there made ptxas issue each product as a group of its own,
// waiting for the one before: seen in the SASS). Two barriers a step: one before 1 (this step's
// tiles visible, the last step's buffers free: only then are the next step's loads issued) and
// one before 3 (dSᵀ complete). Smem wg_bwd_smem_bytes: K, V [128], Q, dO [2][64] rows of D,
// dSᵀ [128][64] bf16, all in the canonical layout (dSᵀ: core matrix (key/8, query/8) at ((key/8)·8 + query/8)·128);
// lse and Δ [2][64] f32 (by 4-byte cp.async with the tiles: stage_lse_delta_async): 145 KB at
// D = 128, one block an SM.
// Numerics as flash_bwd_kv64_tc<D, true> (P, dS rounded to bf16 before the products).
constexpr int WGB_BQ = 64;
template <int D> __host__ __device__ constexpr int wg_bwd_smem_bytes() {
    return (2 * 128 + 4 * WGB_BQ) * D * 2 + 128 * WGB_BQ * 2 + 4 * WGB_BQ * 4;
}

// The wgmma backward's per-step work (flash_bwd_wg and flash_bwd_tma), shared. The points where
// the two kernels interleave their own work (the next step's loads, their phase-clock marks)
// are `hook(stage)` calls, after:
enum WgBwdStage {
    WGB_ISSUED,     // Sᵀ's and dPᵀ's products issued
    WGB_S_LANDED,   // Sᵀ landed
    WGB_P_ISSUED,   // Pᵀ computed, dV += Pᵀ·dO issued
    WGB_DP_LANDED,  // dPᵀ landed
    WGB_DS_ISSUED,  // dSᵀ computed and stored, dK += dSᵀ·Q issued
};

// Phases 1 and 2 of a step for a warpgroup (`wgi`, keys wk0 ..) some of whose keys the step's
// queries q0 .. reach: Sᵀ, dPᵀ from K (wK), V (wV), Q (cQ), dO (cdO); Pᵀ, dSᵀ with lse (cL) and
// Δ (cDl); dSᵀ stored into the block's tile cdS; dV += Pᵀ·dO and dK += dSᵀ·Q issued, left in
// flight (phase 3 waits for them), with their A operands in ap, ad.
// SW: the K, V, Q and dO tiles are 128-byte swizzled (TMA's; D = 128): atom columns of the
// tile's rows × 128 bytes, K and V 128 rows (wK, wV point at the warpgroup's 64 within the
// first column), Q and dO 64; else the core-matrix layout of wg_tile_load.
template <int D, bool SW = false, class Hook>
__device__ __forceinline__ void wg_bwd_dkdv(Hook hook, const bf16 *wK, const bf16 *wV, const bf16 *cQ, const bf16 *cdO,
                                            const float *cL, const float *cDl, bf16 *cdS, int wgi, int warp, int g,
                                            int tq, int q0, int wk0, int rk0, float sl2, float scale,
                                            float (&dk_acc)[D / 8][4], float (&dv_acc)[D / 8][4],
                                            uint32_t (&ap)[WGB_BQ / 16][4], uint32_t (&ad)[WGB_BQ / 16][4]) {
    constexpr int KS = D / 16;
    constexpr uint32_t KMAJ_LBO = 128, KMAJ_SBO = D / 8 * 128;  // K, V, Q, dO read K-major
    constexpr uint32_t MN_LBO = D / 8 * 128, MN_SBO = 128;       // Q, dO read MN-major
    static_assert(!SW || D == 128, "swizzled tiles: D 128");
    auto kmajor = [](const bf16 *p) {
        return SW ? wgmma_desc_sw128(p, 16, 1024) : wgmma_desc(p, KMAJ_LBO, KMAJ_SBO);
    };
    // 16 columns of D further along K in a tile of `rows` rows: 2 core matrices (256 bytes), or
    // swizzled 32 bytes into the row in atom column ks / 4
    auto kstep = [](int ks, int rows) { return SW ? (ks / 4) * rows * 128 + (ks % 4) * 32 : 256 * ks; };
    // 1. Sᵀ, dPᵀ [64 keys][64 queries]
    float st[WGB_BQ / 8][4], dpt[WGB_BQ / 8][4];
    wgmma_pin(st);
    wgmma_pin(dpt);
    const uint64_t k_desc = kmajor(wK), q_desc = kmajor(cQ), v_desc = kmajor(wV), o_desc = kmajor(cdO);
    // Sᵀ and dPᵀ as two groups: Pᵀ is computed while dPᵀ's products run.
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < KS; ++ks)
        wgmma_ss_m64n64k16(st, wgmma_desc_add(k_desc, kstep(ks, 128)), wgmma_desc_add(q_desc, kstep(ks, WGB_BQ)),
                           ks > 0);
    wgmma_commit();
#pragma unroll
    for (int ks = 0; ks < KS; ++ks)
        wgmma_ss_m64n64k16(dpt, wgmma_desc_add(v_desc, kstep(ks, 128)), wgmma_desc_add(o_desc, kstep(ks, WGB_BQ)),
                           ks > 0);
    wgmma_commit();
    hook(WGB_ISSUED);
    wgmma_wait<1>();  // Sᵀ done, dPᵀ in flight
    wgmma_pin(st);
    hook(WGB_S_LANDED);
    const bool diag = q0 < wk0 + 63;  // some key lies past some query: mask
#pragma unroll
    for (int j = 0; j < WGB_BQ / 8; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int qi = 8 * j + 2 * tq + (i & 1);  // query q0 + qi
            float p = fast_exp2(fmaf(st[j][i], sl2, -(cL[qi] * LOG2E)));  // cL: lse
            if (diag && rk0 + g + 8 * (i >> 1) > q0 + qi) p = 0.f;
            st[j][i] = p;
        }
    // 2a. dV += Pᵀ dO over the step's 64 queries, 16 at a time (A packed before the
    // fence: registers wgmma reads are written first), issued now so that it runs while
    // dSᵀ is computed.
    // Q, dO MN-major: swizzled, LBO from d 0..63 to 64..127 (an atom column), SBO 8 queries
    auto mnmajor = [](const bf16 *p) {
        return SW ? wgmma_desc_sw128(p, WGB_BQ * 128, 1024) : wgmma_desc(p, MN_LBO, MN_SBO);
    };
    constexpr int QUERIES16 = SW ? 16 * 128 : 2 * MN_LBO;  // 16 queries further along K
    const uint64_t o_mn = mnmajor(cdO), q_mn = mnmajor(cQ);
#pragma unroll
    for (int kk = 0; kk < WGB_BQ / 16; ++kk) acc_to_a(ap[kk], st[2 * kk], st[2 * kk + 1]);
    wgmma_pin(dv_acc);
    wgmma_pin(ap);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < WGB_BQ / 16; ++kk)  // queries 16·kk ..
        wgmma_rs_m64n128k16_tb(dv_acc, ap[kk], wgmma_desc_add(o_mn, QUERIES16 * kk), 1);
    wgmma_commit();
    hook(WGB_P_ISSUED);
    wgmma_wait<1>();  // dPᵀ done (the older group), dV in flight
    wgmma_pin(dpt);
    hook(WGB_DP_LANDED);
#pragma unroll
    for (int j = 0; j < WGB_BQ / 8; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) dpt[j][i] = st[j][i] * (dpt[j][i] - cDl[8 * j + 2 * tq + (i & 1)]) * scale;
    // dSᵀ rows 64·wgi + 16·warp + g (+8) of the block, queries 8j + 2t, +1
#pragma unroll
    for (int j = 0; j < WGB_BQ / 8; ++j)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int key = 64 * wgi + 16 * warp + g + 8 * r;
            const int at = ((key / 8) * (WGB_BQ / 8) + j) * 64 + (key % 8) * 8 + 2 * tq;
            *reinterpret_cast<uint32_t *>(cdS + at) = pack_bf16(dpt[j][2 * r], dpt[j][2 * r + 1]);
        }
    // 2b. dK += dSᵀ Q, the same way.
#pragma unroll
    for (int kk = 0; kk < WGB_BQ / 16; ++kk) acc_to_a(ad[kk], dpt[2 * kk], dpt[2 * kk + 1]);
    wgmma_pin(dk_acc);
    wgmma_pin(ad);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < WGB_BQ / 16; ++kk)
        wgmma_rs_m64n128k16_tb(dk_acc, ad[kk], wgmma_desc_add(q_mn, QUERIES16 * kk), 1);
    wgmma_commit();  // 2a and 2b are waited for after phase 3's products are issued
    hook(WGB_DS_ISSUED);
}

// Warpgroup `wgi`'s dSᵀ rows of the block's tile dS as zeros, where every key of it lies past
// every query of the step (phases 1 and 2 skipped): stored so that phase 3 runs all eight of its
// products as one group (a product skipped there by a branch made ptxas issue each of them as
// its own serialised group). Its 64 rows are 8 KB, contiguous.
__device__ __forceinline__ void wg_bwd_zero_ds(bf16 *dS, int wgi) {
    uint4 *rows = reinterpret_cast<uint4 *>(dS + 64 * wgi * WGB_BQ);
#pragma unroll
    for (int i = threadIdx.x % 128; i < 64 * WGB_BQ * 2 / 16; i += 128) rows[i] = make_uint4(0, 0, 0, 0);
}

// Phase 3: dQ [64 queries][head-dim half `half`] of the step into acc, from the stored dSᵀ (cdS)
// and K (sK) over the block's 128 keys, waited for together with phase 2's products. SW: K is
// 128-byte swizzled (wg_bwd_dkdv), head-dim half `half` its atom column.
template <int D, bool SW = false>
__device__ __forceinline__ void wg_bwd_dq(float (&acc)[8][4], const bf16 *cdS, const bf16 *sK, int half,
                                          float (&dk_acc)[D / 8][4], float (&dv_acc)[D / 8][4],
                                          uint32_t (&ap)[WGB_BQ / 16][4], uint32_t (&ad)[WGB_BQ / 16][4]) {
    constexpr uint32_t MN_LBO = D / 8 * 128, MN_SBO = 128;       // K read MN-major
    constexpr uint32_t DS_LBO = WGB_BQ / 8 * 128, DS_SBO = 128;  // dSᵀ read as dS (MN-major A)
    // keys 16·kk ..: 2 row groups of dSᵀ and of K (this warpgroup's 64 columns of K)
    const uint64_t ds_desc = wgmma_desc(cdS, DS_LBO, DS_SBO);
    const uint64_t k_mn = SW ? wgmma_desc_sw128(sK + half * 128 * 64, 128 * 128, 1024)
                             : wgmma_desc(sK + half * (D / 16) * 64, MN_LBO, MN_SBO);
    constexpr int KEYS16 = SW ? 16 * 128 : 2 * MN_LBO;  // 16 keys further along K
    wgmma_pin(acc);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 128 / 16; ++kk)
        wgmma_ss_m64n64k16_tt(acc, wgmma_desc_add(ds_desc, 2 * DS_LBO * kk), wgmma_desc_add(k_mn, KEYS16 * kk),
                              kk > 0);
    wgmma_commit();
    wgmma_wait<0>();  // phase 2's and phase 3's products
    wgmma_pin(acc);
    wgmma_pin(dv_acc);
    wgmma_pin(dk_acc);
    wgmma_pin(ap);
    wgmma_pin(ad);
}

// dQ's head-dim half `half` of this warp's queries q0 + 16·warp + g (+ 8) below T, added into
// the head's f32 accumulator dqh [T, D].
template <int D>
__device__ __forceinline__ void wg_bwd_dq_add(const float (&acc)[8][4], float *dqh, int q0, int half, int warp, int g,
                                              int tq, int t) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int query = q0 + 16 * warp + g + 8 * r;
        if (query >= t) continue;
#pragma unroll
        for (int j = 0; j < 8; ++j)
            atomic_add2(dqh + (size_t)query * D + 64 * half + 8 * j + 2 * tq, acc[j][0 + 2 * r], acc[j][1 + 2 * r]);
    }
}

// dK and dV of this warp's keys rk0 + g (+ 8) below T, as bf16, into the K/V head's rows.
template <int D>
__device__ __forceinline__ void wg_bwd_store(const float (&dk_acc)[D / 8][4], const float (&dv_acc)[D / 8][4], bf16 *dkh,
                                             bf16 *dvh, int rk0, int g, int tq, int t) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int key = rk0 + g + 8 * r;
        if (key >= t) continue;
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
            const size_t at = (size_t)key * D + 8 * j + 2 * tq;
            *reinterpret_cast<uint32_t *>(dkh + at) = pack_bf16(dk_acc[j][0 + 2 * r], dk_acc[j][1 + 2 * r]);
            *reinterpret_cast<uint32_t *>(dvh + at) = pack_bf16(dv_acc[j][0 + 2 * r], dv_acc[j][1 + 2 * r]);
        }
    }
}

// The phases of the profiled backward (PROF, phases.cuh), in the order and with the meaning of
// ops::attention::phases::BACKWARD.
enum WgBwdPhase {
    WB_PROLOGUE, WB_TILE_WAIT, WB_ISSUE, WB_WAIT_S, WB_P, WB_WAIT_DP, WB_DS, WB_SKIPPED, WB_BARRIER, WB_DQ, WB_ATOMICS,
    WB_EPILOGUE, WB_PHASES
};

// PROF: the profiled instantiation, counting cycles by phase into prof [2][WB_PHASES] (phases.cuh).
template <int D, bool PROF = false>
__device__ void flash_bwd_wg(const bf16 *__restrict__ q, const bf16 *__restrict__ k, const bf16 *__restrict__ v,
                             const bf16 *__restrict__ dout, const float *__restrict__ lse,
                             const float *__restrict__ delta, bf16 *__restrict__ dk, bf16 *__restrict__ dv,
                             float *__restrict__ dq_acc, int hq, int hk, int t, float scale,
                             unsigned long long *prof = nullptr) {
    static_assert(D == 128, "wgmma backward: D 128");
    constexpr int QT = WGB_BQ * D;  // elements of a Q or dO tile
    require_smem(wg_bwd_smem_bytes<D>(), WG_THREADS);
    PhaseClock<PROF, WB_PHASES, WG_THREADS / 32> clk(prof);
    DYN_SMEM(smem);
    bf16 *sK = reinterpret_cast<bf16 *>(smem);  // [128 keys]
    bf16 *sV = sK + 128 * D;                      // [128 keys]
    bf16 *sQ = sV + 128 * D;                      // [2][64 queries]
    bf16 *sdO = sQ + 2 * QT;                      // [2][64 queries]
    bf16 *sdS = sdO + 2 * QT;                     // dSᵀ [128 keys][64 queries]
    float *sL = reinterpret_cast<float *>(sdS + 128 * WGB_BQ);  // [2][64]
    float *sDl = sL + 2 * WGB_BQ;                                // [2][64]

    const GridTile blk = heaviest_first();
    const int hkv = blk.head, b = blk.batch, group = hq / hk;
    const int k0 = blk.tile * 128;
    const int wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x & 31;
    const int g = lane >> 2, tq = lane & 3;
    const int wk0 = k0 + 64 * wg;      // this warpgroup's first key
    const int rk0 = wk0 + 16 * warp;   // this warp's keys rk0 + g, rk0 + g + 8 (phases 1, 2)
    const size_t kvoff = ((size_t)b * hk + hkv) * t * D;
    const int nqt = (t - k0 + WGB_BQ - 1) / WGB_BQ;  // query tiles from k0 (128 % 64 == 0)
    const int steps = group * nqt;
    const float sl2 = scale * LOG2E;

    auto issue = [&](int s) {  // step s into buffer s & 1
        const int h = hkv * group + s / nqt, q0 = k0 + (s % nqt) * WGB_BQ, buf = s & 1;
        const size_t qoff = ((size_t)b * hq + h) * t * D, loff = ((size_t)b * hq + h) * t;
        wg_tile_load<D, WGB_BQ>(sQ + buf * QT, q + qoff, q0, t);
        wg_tile_load<D, WGB_BQ>(sdO + buf * QT, dout + qoff, q0, t);
        stage_lse_delta_async<WGB_BQ, WG_THREADS>(sL + buf * WGB_BQ, sDl + buf * WGB_BQ, lse, delta, loff, q0, t);
    };
    wg_tile_load<D, 128>(sK, k + kvoff, k0, t);
    wg_tile_load<D, 128>(sV, v + kvoff, k0, t);
    issue(0);
    cp_async_commit();

    float dk_acc[D / 8][4], dv_acc[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) dk_acc[j][i] = dv_acc[j][i] = 0.f;
    const bf16 *wK = sK + 64 * wg * D, *wV = sV + 64 * wg * D;  // this warpgroup's 64 keys
    clk.mark(WB_PROLOGUE);

    for (int s = 0; s < steps; ++s) {
        // Step s's tiles (loaded during step s − 1) → visible to every thread and to wgmma. The
        // barrier also means every thread is done with step s − 1, whose buffers the next loads
        // and this step's dSᵀ stores reuse: one barrier where there were two.
        cp_async_wait<0>();
        wgmma_fence_smem();
        __syncthreads();
        clk.mark(WB_TILE_WAIT);
        // The next step's loads (into the buffers step s − 1 used), issued once this step's
        // first products are (or, in a warpgroup with none, at once): their address arithmetic
        // then runs beside the tensor cores instead of before them.
        auto issue_next = [&] {
            if (s + 1 < steps) issue(s + 1);
            cp_async_commit();
        };
        const int q0 = k0 + (s % nqt) * WGB_BQ, buf = s & 1;
        const bf16 *cQ = sQ + buf * QT, *cdO = sdO + buf * QT;
        const float *cL = sL + buf * WGB_BQ, *cDl = sDl + buf * WGB_BQ;

        // Pᵀ, dSᵀ as the A operands of phase 2, whose products may still run during phase 3.
        uint32_t ap[WGB_BQ / 16][4], ad[WGB_BQ / 16][4];
        if (q0 + WGB_BQ - 1 >= wk0) {  // else every query precedes every key of this warpgroup
            wg_bwd_dkdv<D>(
                [&](WgBwdStage stage) {
                    switch (stage) {
                    case WGB_ISSUED: issue_next(); clk.mark(WB_ISSUE); break;
                    case WGB_S_LANDED: clk.mark(WB_WAIT_S); break;
                    case WGB_P_ISSUED: clk.mark(WB_P); break;
                    case WGB_DP_LANDED: clk.mark(WB_WAIT_DP); break;
                    case WGB_DS_ISSUED: clk.mark(WB_DS); break;
                    }
                },
                wK, wV, cQ, cdO, cL, cDl, sdS, wg, warp, g, tq, q0, wk0, rk0, sl2, scale, dk_acc, dv_acc, ap, ad);
        } else {
            issue_next();
            wg_bwd_zero_ds(sdS, wg);
            clk.mark(WB_SKIPPED);
        }
        wgmma_fence_smem();  // the dSᵀ stores → visible to phase 3's wgmma
        __syncthreads();
        clk.mark(WB_BARRIER);

        {  // 3. dQ [64 queries][head-dim half wg] += dS K over the block's 128 keys
            float acc[8][4];
            wg_bwd_dq<D>(acc, sdS, sK, wg, dk_acc, dv_acc, ap, ad);
            clk.mark(WB_DQ);
            const int h = hkv * group + s / nqt;
            wg_bwd_dq_add<D>(acc, dq_acc + ((size_t)b * hq + h) * t * D, q0, wg, warp, g, tq, t);
            clk.mark(WB_ATOMICS);
        }
    }

    wg_bwd_store<D>(dk_acc, dv_acc, dk + kvoff, dv + kvoff, rk0, g, tq, t);
    clk.mark(WB_EPILOGUE);
    clk.flush();
}

// Warp-specialised backward fed by TMA (SHARDSMITH_FLASH_BWD=tma, D = 128): flash_bwd_wg's
// products in its order (so dK and dV come out bit for bit the same), reorganised as
// flash_fwd_tma is:
//   warpgroup 0   producer (setmaxnreg 24): its thread 0 loads the block's K and V, then per
//                 step the Q and dO tiles by TMA from the tensor maps tmk, tmv (boxes of 128 rows
//                 × 64 columns) and tmq, tmo (64 rows × 64 columns), 128-byte swizzled; its 128
//                 threads stage lse and Δ by 4-byte cp.async (a tensor map's row stride must be a
//                 multiple of 16 bytes, T · 4 need not be), each arriving when its copy lands
//                 (cp.async.mbarrier.arrive.noinc), so a step's `full` barrier takes their 128
//                 arrivals and thread 0's announcing the TMA bytes. 2 buffers; one is refilled
//                 once its `empty` mbarrier says both consumers are done with the step that used it.
//   warpgroups    consumers (setmaxnreg 240), flash_bwd_wg's two warpgroups: phases 1 and 2 on
//   1, 2          their 64 keys, dSᵀ stored, one named barrier (dSᵀ of both complete), phase 3
//                 (dQ, reading both halves of dSᵀ), the step's buffers released once phase 2's
//                 and 3's products have landed, then dQ staged.
// dSᵀ is double-buffered, so that one barrier a step suffices for it: a consumer storing step
// s + 2's dSᵀ has passed step s + 1's barrier, which the other reaches only after its step-s
// phase 3. dQ is not added by each thread's atomics (run 5's profile of the cp.async kernel this
// replaced: 17% of the consumers' cycles) but staged in an f32 tile and added by one bulk reduce
// a step (FlashAttention-3's way): once both consumers have staged step s's tile (a second named
// barrier, DQ_READY), thread DQ_ISSUER issues it, and waits until it has been read before step
// s + 1's first barrier, after which the tile is staged again.
// Geometry as flash_bwd_wg, 384 threads; smem tma_bwd_smem_bytes, mbarriers static.
constexpr int WSB_THREADS = 384;
// K, V [128], Q, dO [2][64] rows of D, dSᵀ [2][128][64] bf16; lse, Δ [2][64], dQ [64] rows of D
// f32 (194 KB at D 128; a second dQ tile would leave the profiled kernel's counters no room under
// 227 KB); and 1 KB to start the swizzled tiles on a 1024-byte boundary (align_smem).
template <int D> __host__ __device__ constexpr int tma_bwd_smem_bytes() {
    return (2 * 128 + 4 * WGB_BQ) * D * 2 + 2 * 128 * WGB_BQ * 2 + 4 * WGB_BQ * 4 + WGB_BQ * D * 4 + 1024;
}

// dQ [64 queries][head-dim half `half`] of a step (wg_bwd_dq's acc) into the step's f32 tile
// [64][D] in shared memory, row-major as dq_acc's rows are (one bulk reduce adds it there).
template <int D>
__device__ __forceinline__ void wg_bwd_dq_stage(const float (&acc)[8][4], float *tile, int half, int warp, int g, int tq) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float *row = tile + (16 * warp + g + 8 * r) * D + 64 * half + 2 * tq;
#pragma unroll
        for (int j = 0; j < 8; ++j)
            *reinterpret_cast<float2 *>(row + 8 * j) = make_float2(acc[j][0 + 2 * r], acc[j][1 + 2 * r]);
    }
}

// The phases of the profiled warp-specialised backward (PROF, phases.cuh), in the order and with
// the meaning of ops::attention::phases::WS_BACKWARD: the consumers' (prologue to epilogue), then
// the producer's (load_*; its prologue is the first).
enum WsBwdPhase {
    WSB_PROLOGUE, WSB_TILE_WAIT, WSB_ISSUE_WAIT_S, WSB_P, WSB_WAIT_DP, WSB_DS, WSB_SKIPPED, WSB_BARRIER, WSB_DQ,
    WSB_ATOMICS, WSB_EPILOGUE, WSB_LOAD_WAIT, WSB_LOAD_ISSUE, WSB_PHASES
};

// PROF: the profiled instantiation, counting cycles by phase into prof [2][WSB_PHASES] (phases.cuh).
template <int D, bool PROF = false>
__device__ void flash_bwd_tma(const CUtensorMap *tmq, const CUtensorMap *tmk, const CUtensorMap *tmv,
                              const CUtensorMap *tmo, const float *__restrict__ lse, const float *__restrict__ delta,
                              bf16 *__restrict__ dk, bf16 *__restrict__ dv, float *__restrict__ dq_acc, int hq, int hk,
                              int t, float scale, unsigned long long *prof = nullptr) {
    static_assert(D == 128, "warp-specialised backward: D 128");
    constexpr int QT = WGB_BQ * D, DST = 128 * WGB_BQ;  // elements of a Q / dO / dSᵀ tile
    constexpr int PRODUCER = 128, CONSUMERS = 256, DS_READY = 1;  // threads; the named barrier
    constexpr int S = 2;                          // buffers of a step's Q, dO, lse, Δ
    constexpr int DQ_ISSUER = 128, DQ_READY = 2;  // consumer 0's first thread; the named barrier
    require_smem(tma_bwd_smem_bytes<D>(), WSB_THREADS);
    PhaseClock<PROF, WSB_PHASES, WSB_THREADS / 32> clk(prof);
    DYN_SMEM(smem_raw);
    unsigned char *smem = align_smem<1024>(smem_raw);
    bf16 *sK = reinterpret_cast<bf16 *>(smem);  // [128 keys]
    bf16 *sV = sK + 128 * D;                      // [128 keys]
    bf16 *sQ = sV + 128 * D;                      // [S][64 queries]
    bf16 *sdO = sQ + S * QT;                      // [S][64 queries]
    bf16 *sdS = sdO + S * QT;                     // dSᵀ [2][128 keys][64 queries]
    float *sL = reinterpret_cast<float *>(sdS + 2 * DST);  // [S][64]
    float *sDl = sL + S * WGB_BQ;                           // [S][64]
    float *sdQ = sDl + S * WGB_BQ;                          // [64 queries][D]
    __shared__ uint64_t bars[1 + 2 * S];  // kv_full; full, empty [S]
    uint64_t *kv_full = bars, *full = bars + 1, *empty = bars + 1 + S;
    if (threadIdx.x == 0) {
        mbar_init(kv_full, 1);  // the producer's expect_tx
        for (int i = 0; i < S; ++i) {
            mbar_init(full + i, PRODUCER + 1);  // the lse, Δ copies' and the expect_tx
            mbar_init(empty + i, CONSUMERS);
        }
    }
    __syncthreads();

    const GridTile blk = heaviest_first();
    const int hkv = blk.head, b = blk.batch, group = hq / hk;
    const int k0 = blk.tile * 128;
    const size_t kvoff = ((size_t)b * hk + hkv) * t * D;
    const int nqt = (t - k0 + WGB_BQ - 1) / WGB_BQ;  // query tiles from k0 (128 % 64 == 0)
    const int steps = group * nqt;
    const int wg = threadIdx.x / 128;

    if (wg == 0) {  // the producer
        setmaxnreg_dec<WS_PRODUCER_REGS>();
        clk.mark(WSB_PROLOGUE);
        const int tid = threadIdx.x;
        if (tid == 0) {
            mbar_expect_tx(kv_full, 2 * 128 * D * 2);
            tma_rows<D, 128>(sK, tmk, k0, b * hk + hkv, kv_full);
            tma_rows<D, 128>(sV, tmv, k0, b * hk + hkv, kv_full);
        }
        clk.mark(WSB_LOAD_ISSUE);
        // Step s into buffer s % S, its u-th use (u = s / S) after the consumers' (u − 1)-th
        // release; its full barrier completes when its bytes and copies land (the producer never
        // waits for them, only for buffers).
        for (int s = 0; s < steps; ++s) {
            const int buf = s % S, reuse = s / S - 1;
            if (reuse >= 0) mbar_wait(empty + buf, reuse & 1);
            clk.mark(WSB_LOAD_WAIT);
            const int h = hkv * group + s / nqt, q0 = k0 + (s % nqt) * WGB_BQ;
            const size_t loff = ((size_t)b * hq + h) * t;
            if (tid == 0) {
                mbar_expect_tx(full + buf, 2 * WGB_BQ * D * 2);
                tma_rows<D, WGB_BQ>(sQ + buf * QT, tmq, q0, b * hq + h, full + buf);
                tma_rows<D, WGB_BQ>(sdO + buf * QT, tmo, q0, b * hq + h, full + buf);
            }
            stage_lse_delta_async<WGB_BQ, PRODUCER>(sL + buf * WGB_BQ, sDl + buf * WGB_BQ, lse, delta, loff, q0, t);
            mbar_arrive_on_copies(full + buf);
            clk.mark(WSB_LOAD_ISSUE);
        }
        cp_async_commit();  // no copy outlives its thread
        cp_async_wait<0>();
        clk.flush();
        return;
    }

    setmaxnreg_inc<WS_CONSUMER_REGS>();
    const int c = wg - 1, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x & 31;  // c: flash_bwd_wg's wg
    const int g = lane >> 2, tq = lane & 3;
    const int wk0 = k0 + 64 * c;      // this warpgroup's first key
    const int rk0 = wk0 + 16 * warp;  // this warp's keys rk0 + g, rk0 + g + 8 (phases 1, 2)
    const float sl2 = scale * LOG2E;
    float dk_acc[D / 8][4], dv_acc[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) dk_acc[j][i] = dv_acc[j][i] = 0.f;
    // this warpgroup's 64 keys: rows of the first (swizzled) atom column
    const bf16 *wK = sK + 64 * c * 64, *wV = sV + 64 * c * 64;
    mbar_wait_copies(kv_full, 0);
    clk.mark(WSB_PROLOGUE);
    // Step st's dQ tile (sdQ) added into dq_acc's rows below T by one bulk reduce.
    auto dq_reduce = [&](int st) {
        const int h = hkv * group + st / nqt, qs = k0 + (st % nqt) * WGB_BQ;
        bulk_reduce_add(dq_acc + (((size_t)b * hq + h) * t + qs) * D, sdQ, min(WGB_BQ, t - qs) * D * 4);
        bulk_commit();
    };

    for (int s = 0; s < steps; ++s) {
        const int q0 = k0 + (s % nqt) * WGB_BQ, buf = s % S;
        mbar_wait_copies(full + buf, (s / S) & 1);
        clk.mark(WSB_TILE_WAIT);
        const bf16 *cQ = sQ + buf * QT, *cdO = sdO + buf * QT;
        const float *cL = sL + buf * WGB_BQ, *cDl = sDl + buf * WGB_BQ;
        bf16 *cdS = sdS + (s & 1) * DST;  // double-buffered whatever S (the barrier argument)

        // Pᵀ, dSᵀ as the A operands of phase 2, whose products may still run during phase 3.
        uint32_t ap[WGB_BQ / 16][4], ad[WGB_BQ / 16][4];
        if (q0 + WGB_BQ - 1 >= wk0) {  // else every query precedes every key of this warpgroup
            // No clock read between the issue and the wait (it would serialise the products).
            wg_bwd_dkdv<D, true>(
                [&](WgBwdStage stage) {
                    switch (stage) {
                    case WGB_ISSUED: break;
                    case WGB_S_LANDED: clk.mark(WSB_ISSUE_WAIT_S); break;
                    case WGB_P_ISSUED: clk.mark(WSB_P); break;
                    case WGB_DP_LANDED: clk.mark(WSB_WAIT_DP); break;
                    case WGB_DS_ISSUED: clk.mark(WSB_DS); break;
                    }
                },
                wK, wV, cQ, cdO, cL, cDl, cdS, c, warp, g, tq, q0, wk0, rk0, sl2, scale, dk_acc, dv_acc, ap, ad);
        } else {
            wg_bwd_zero_ds(cdS, c);
            clk.mark(WSB_SKIPPED);
        }
        wgmma_fence_smem();  // the dSᵀ stores → visible to phase 3's wgmma
        if (threadIdx.x == DQ_ISSUER) bulk_wait_read<0>();  // step s − 1's dQ tile read
        named_sync(DS_READY, CONSUMERS);
        clk.mark(WSB_BARRIER);

        {  // 3. dQ [64 queries][head-dim half c] += dS K over the block's 128 keys
            float acc[8][4];
            wg_bwd_dq<D, true>(acc, cdS, sK, c, dk_acc, dv_acc, ap, ad);
            mbar_arrive(empty + buf);  // Q, dO, lse, Δ of this step read
            clk.mark(WSB_DQ);
            wg_bwd_dq_stage<D>(acc, sdQ, c, warp, g, tq);
            wgmma_fence_smem();  // → visible to the bulk reduce (async proxy)
            named_sync(DQ_READY, CONSUMERS);
            if (threadIdx.x == DQ_ISSUER) dq_reduce(s);
            clk.mark(WSB_ATOMICS);
        }
    }
    if (threadIdx.x == DQ_ISSUER) bulk_wait<0>();  // the last step's reduce done

    wg_bwd_store<D>(dk_acc, dv_acc, dk + kvoff, dv + kvoff, rk0, g, tq, t);
    clk.mark(WSB_EPILOGUE);
    clk.flush();
}

// The seven wgmma forms above, each on one tile laid out and described exactly as the attention
// kernels lay out and describe theirs: a check of the descriptor and fragment conventions
// (wgmma.cuh) on the device itself, which ops::attention's wgmma self-check runs once per GPU
// before the first wgmma attention launch (the emulator checks it too). If they are wrong for
// some GPU or toolkit, this says which form, and the self-check's index patterns say how.
// Inputs bf16 row-major: a, b, c [64][64], v [64][128]. Output f32 [10·64·64], seven blocks in order:
//   s [64][64]   = a · bᵀ             ss, A and B K-major            (Sᵀ, dPᵀ)
//   o [64][128]  = bf16(s) · v        rs, B MN-major, n128           (O = P V at D 128; dV, dK)
//   p [64][64]   = bf16(s) · c        rs, B MN-major, n64            (O = P V at D 64)
//   u [64][64]   = aᵀ · v[:, 64:128]  ss, A and B MN-major, B from a column offset (dQ = dS K)
//   q [64][64]   = a · bᵀ             rs, A read by wg_load_a, B K-major (S = Q Kᵀ)
//   w [64][128]  = a · [b; c]ᵀ        rs, A as q, B K-major, n128 (S over 128-key tiles): b and c
//                                     lie one after the other, the canonical layout of [b; c]
//   x [64][128]  = a · [b; c]ᵀ        ss, A and B K-major, n128 (S = Q Kᵀ of the warp-specialised
//                                     forward, Q from shared memory)
// One block of 256 threads: both warpgroups compute every product (no wgmma in a divergent
// path); warpgroup 0 stores. Smem WG_PROBE_SMEM: a, b, c then v in the canonical layout.
constexpr int WG_PROBE_SMEM = (3 * 64 * 64 + 64 * 128) * 2;

extern "C" __global__ void __launch_bounds__(WG_THREADS, 1)
    wgmma_probe(const bf16 *a, const bf16 *b, const bf16 *c, const bf16 *v, float *out) {
    require_smem(WG_PROBE_SMEM, WG_THREADS);
    DYN_SMEM(probe_smem);
    bf16 *sa = reinterpret_cast<bf16 *>(probe_smem), *sb = sa + 64 * 64, *sc = sb + 64 * 64, *sv = sc + 64 * 64;
    wg_tile_load<64, 64>(sa, a, 0, 64);
    wg_tile_load<64, 64>(sb, b, 0, 64);
    wg_tile_load<64, 64>(sc, c, 0, 64);
    wg_tile_load<128, 64>(sv, v, 0, 64);
    cp_async_commit();
    cp_async_wait<0>();
    wgmma_fence_smem();
    __syncthreads();
    // Descriptor strides as flash_bwd_wg<128> (a, b: K, Q for Sᵀ; a: dSᵀ read as dS; v: K read
    // MN-major from head-dim column 64), flash_fwd_wg<64> (b: K, read by the q form with a in
    // registers as wg_load_a reads Q; c: V) and flash_fwd_wg<128> (v: V).
    constexpr uint32_t K64_LBO = 128, K64_SBO = 64 / 8 * 128, MN64_LBO = 64 / 8 * 128, MN128_LBO = 128 / 8 * 128;
    float s[8][4], o[16][4], p[8][4], u[8][4], q[8][4];
#pragma unroll
    for (int j = 0; j < 16; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            o[j][i] = 0.f;
            if (j < 8) s[j][i] = p[j][i] = u[j][i] = q[j][i] = 0.f;
        }
    wgmma_pin(s);
    wgmma_fence();
    const uint64_t a_k = wgmma_desc(sa, K64_LBO, K64_SBO), b_k = wgmma_desc(sb, K64_LBO, K64_SBO);
#pragma unroll
    for (int ks = 0; ks < 4; ++ks)
        wgmma_ss_m64n64k16(s, wgmma_desc_add(a_k, 256 * ks), wgmma_desc_add(b_k, 256 * ks), ks > 0);
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_pin(s);
    uint32_t pa[4][4];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) acc_to_a(pa[kk], s[2 * kk], s[2 * kk + 1]);
    wgmma_pin(o);
    wgmma_pin(p);
    wgmma_pin(u);
    wgmma_pin(pa);
    wgmma_fence();
    const uint64_t v_mn = wgmma_desc(sv, MN128_LBO, 128), c_mn = wgmma_desc(sc, MN64_LBO, 128);
    const uint64_t a_mn = wgmma_desc(sa, MN64_LBO, 128), v_mn_hi = wgmma_desc(sv + (128 / 16) * 64, MN128_LBO, 128);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {  // 16 rows of the contraction = 2 row groups (2·LBO bytes)
        wgmma_rs_m64n128k16_tb(o, pa[kk], wgmma_desc_add(v_mn, 2 * MN128_LBO * kk), 1);
        wgmma_rs_m64n64k16_tb(p, pa[kk], wgmma_desc_add(c_mn, 2 * MN64_LBO * kk), 1);
        wgmma_ss_m64n64k16_tt(u, wgmma_desc_add(a_mn, 2 * MN64_LBO * kk), wgmma_desc_add(v_mn_hi, 2 * MN128_LBO * kk),
                              kk > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_pin(o);
    wgmma_pin(p);
    wgmma_pin(u);
    const int wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x & 31;
    const int g = lane >> 2, tq = lane & 3;
    uint32_t qa[4][4];
    wg_load_a<64>(qa, sa, warp, lane);
    wgmma_pin(q);
    wgmma_pin(qa);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) wgmma_rs_m64n64k16(q, qa[ks], wgmma_desc_add(b_k, 256 * ks), ks > 0);
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_pin(q);
    float *os = out, *oo = os + 64 * 64, *op = oo + 64 * 128, *ou = op + 64 * 64, *oq = ou + 64 * 64;
    float *ow = oq + 64 * 64;
    if (wg == 0) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = 16 * warp + g + 8 * r;
#pragma unroll
            for (int j = 0; j < 16; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int col = 8 * j + 2 * tq + e;
                    oo[row * 128 + col] = o[j][2 * r + e];
                    if (j < 8) {
                        os[row * 64 + col] = s[j][2 * r + e];
                        op[row * 64 + col] = p[j][2 * r + e];
                        ou[row * 64 + col] = u[j][2 * r + e];
                        oq[row * 64 + col] = q[j][2 * r + e];
                    }
                }
        }
    }
    // w into o's registers (stored above): both warpgroups again, outside the divergent store.
    wgmma_pin(o);
    wgmma_pin(qa);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) wgmma_rs_m64n128k16(o, qa[ks], wgmma_desc_add(b_k, 256 * ks), ks > 0);
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_pin(o);
    float x[16][4];
#pragma unroll
    for (int j = 0; j < 16; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) x[j][i] = 0.f;
    wgmma_pin(x);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < 4; ++ks)
        wgmma_ss_m64n128k16(x, wgmma_desc_add(a_k, 256 * ks), wgmma_desc_add(b_k, 256 * ks), ks > 0);
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_pin(x);
    if (wg != 0) return;
    float *ox = ow + 64 * 128;
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int j = 0; j < 16; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int at = (16 * warp + g + 8 * r) * 128 + 8 * j + 2 * tq + e;
                ow[at] = o[j][2 * r + e];
                ox[at] = x[j][2 * r + e];
            }
}

// D = 128 needs more than the 128 registers of two blocks an SM (O alone is 64 a thread): one.
// NAME: the kernels' suffix after the dtype (d64, d128: 64-key tiles; d128_n128: 128-key tiles).
#define FLASH_WG(D, BN, NAME, BLOCKS_PER_SM)                                                          \
    extern "C" __global__ void __launch_bounds__(WG_THREADS, BLOCKS_PER_SM)                           \
        flash_fwd_wg_bf16_##NAME(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *o, float *lse, int hq, \
                                 int hk, int t, float scale) {                                        \
        flash_fwd_wg<D, BN, true>(q, k, v, o, lse, hq, hk, t, scale);                                 \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(WG_THREADS, BLOCKS_PER_SM)                           \
        flash_fwd_full_wg_bf16_##NAME(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *o, float *lse, \
                                      int hq, int hk, int t, float scale) {                           \
        flash_fwd_wg<D, BN, false>(q, k, v, o, lse, hq, hk, t, scale);                                \
    }
FLASH_WG(64, 64, d64, 2)
FLASH_WG(128, 64, d128, 1)
FLASH_WG(128, 128, d128_n128, 1)
// The warp-specialised forward: 384 threads, one block an SM (setmaxnreg needs the bound).
// The TMA-fed warp-specialised forward (SHARDSMITH_FLASH_FWD=tma): the tensor maps of q, k, v
// ([B·H][T][128] bf16, boxes of 128 rows × 64 columns, 128-byte swizzle; ops::cuda encodes them)
// as __grid_constant__ parameters, whose addresses TMA takes.
#define FLASH_FWD_TMA(NAME, CAUSAL, PROF, ...)                                                           \
    extern "C" __global__ void __launch_bounds__(WS_THREADS, 1)                                            \
        NAME(const __grid_constant__ CUtensorMap tq, const __grid_constant__ CUtensorMap tk,              \
             const __grid_constant__ CUtensorMap tv, bf16 *o, float *lse, int hq, int hk, int t,          \
             float scale __VA_ARGS__) {                                                                   \
        flash_fwd_tma<128, CAUSAL, PROF>(&tq, &tk, &tv, o, lse, hq, hk, t, scale, FLASH_TMA_PROF_##PROF); \
    }
#define FLASH_TMA_PROF_false nullptr
#define FLASH_TMA_PROF_true prof
FLASH_FWD_TMA(flash_fwd_tma_bf16_d128, true, false)
FLASH_FWD_TMA(flash_fwd_full_tma_bf16_d128, false, false)
FLASH_FWD_TMA(flash_fwd_tma_prof_bf16_d128, true, true, , unsigned long long *prof)
extern "C" __global__ void __launch_bounds__(WG_THREADS, 1)
    flash_bwd_wg_bf16_d128(const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *dout, const float *lse,
                           const float *delta, bf16 *dk, bf16 *dv, float *dq_acc, int hq, int hk, int t, float scale) {
    flash_bwd_wg<128>(q, k, v, dout, lse, delta, dk, dv, dq_acc, hq, hk, t, scale);
}

// The TMA-fed warp-specialised backward (SHARDSMITH_FLASH_BWD=tma): 384 threads, one block an SM;
// the tensor maps of q, k, v and dout ([B·H][T][128] bf16, boxes of 64 (q, dout) or 128 (k, v)
// rows × 64 columns, 128-byte swizzle; ops::cuda encodes them) as __grid_constant__ parameters.
#define FLASH_BWD_TMA(NAME, PROF, ...)                                                                   \
    extern "C" __global__ void __launch_bounds__(WSB_THREADS, 1)                                           \
        NAME(const __grid_constant__ CUtensorMap tq, const __grid_constant__ CUtensorMap tk,              \
             const __grid_constant__ CUtensorMap tv, const __grid_constant__ CUtensorMap tdo, const float *lse, \
             const float *delta, bf16 *dk, bf16 *dv, float *dq_acc, int hq, int hk, int t,                \
             float scale __VA_ARGS__) {                                                                   \
        flash_bwd_tma<128, PROF>(&tq, &tk, &tv, &tdo, lse, delta, dk, dv, dq_acc, hq, hk, t, scale,       \
                                 FLASH_TMA_PROF_##PROF);                                                  \
    }
FLASH_BWD_TMA(flash_bwd_tma_bf16_d128, false)
FLASH_BWD_TMA(flash_bwd_tma_prof_bf16_d128, true, , unsigned long long *prof)

// The profiled instantiations (phases.cuh) of the causal kernels at D 128: the same arguments
// plus prof, zero-filled [2][phases] u64 (ops::attention::phases).
#define FLASH_WG_PROF(BN, NAME)                                                                        \
    extern "C" __global__ void __launch_bounds__(WG_THREADS, 1)                                        \
        flash_fwd_wg_prof_bf16_##NAME(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *o, float *lse, int hq, \
                                      int hk, int t, float scale, unsigned long long *prof) {          \
        flash_fwd_wg<128, BN, true, true>(q, k, v, o, lse, hq, hk, t, scale, prof);                    \
    }
FLASH_WG_PROF(64, d128)
FLASH_WG_PROF(128, d128_n128)
extern "C" __global__ void __launch_bounds__(WG_THREADS, 1)
    flash_bwd_wg_prof_bf16_d128(const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *dout, const float *lse,
                                const float *delta, bf16 *dk, bf16 *dv, float *dq_acc, int hq, int hk, int t,
                                float scale, unsigned long long *prof) {
    flash_bwd_wg<128, true>(q, k, v, dout, lse, delta, dk, dv, dq_acc, hq, hk, t, scale, prof);
}
#endif  // SHARDSMITH_WGMMA
