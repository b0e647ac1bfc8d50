// A CPU emulator for shardsmith's CUDA kernels: one std::thread per CUDA thread, blocks run one
// after another, `__shared__` variables become function statics (shared by the block's threads,
// reused by the next block), __syncthreads is a block barrier, warp shuffles and mma.sync go
// through a per-warp exchange buffer with a warp barrier. Slow, but it runs the kernels'
// indexing, reductions, masking and MMA fragment packing exactly as written, so logic errors
// show up on a machine without a GPU. Build: see kernels/emu/run.sh.
#pragma once
#include <atomic>
#include <cstddef>
#include <barrier>
#include <algorithm>
#include <cmath>
#include <math.h>
#include <cstdint>
#include <cstring>
#include <memory>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
#define __constant__
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) alignas(n)
#define DYN_SMEM(name) unsigned char *name = emu::dyn_smem

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

struct __nv_bfloat16 {
    uint16_t x;
};
inline float __bfloat162float(__nv_bfloat16 v) {
    uint32_t u = (uint32_t)v.x << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (std::isnan(f)) return {(uint16_t)((u >> 16) | 0x40)};
    u += 0x7fff + ((u >> 16) & 1);
    return {(uint16_t)(u >> 16)};
}
using std::max;
using std::min;
struct float4 {
    float x, y, z, w;
};
struct uint4 {
    unsigned x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
struct float2 {
    float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float __uint_as_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 v) { return v.x; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline float __frcp_rn(float a) { return 1.0f / a; }

namespace emu {
alignas(1024) inline unsigned char dyn_smem[1 << 20];
inline std::barrier<> *block_bar;
struct Warp {
    std::unique_ptr<std::barrier<>> bar;
    uint64_t buf[32][8];
};
inline std::vector<Warp> warps;
// A warpgroup (4 consecutive warps): its barrier and the A registers its threads pass to wgmma.
struct WarpGroup {
    std::unique_ptr<std::barrier<>> bar;
    uint32_t a[128][4];
};
inline std::vector<WarpGroup> warpgroups;

// %clock for kernels/src/phases.cuh: a thread's own counter, one tick a read, so every phase
// boundary charges exactly one cycle and a profile's cycles equal its runs.
inline thread_local unsigned clock_ticks;
inline unsigned cycle_clock() { return ++clock_ticks; }

inline int flat_tid() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

inline void warp_sync() { warps[flat_tid() / 32].bar->arrive_and_wait(); }

template <class T> T shfl_from(T v, int src) {
    const int tid = flat_tid(), lane = tid % 32;
    Warp &w = warps[tid / 32];
    std::memcpy(&w.buf[lane][0], &v, sizeof(T));
    w.bar->arrive_and_wait();
    T r;
    std::memcpy(&r, &w.buf[src & 31][0], sizeof(T));
    w.bar->arrive_and_wait();
    return r;
}

// mma.sync.m16n8k16 row.col bf16 → f32, from the documented fragment layout.
inline void mma_bf16_16816(float c[4], const uint32_t a[4], const uint32_t b[2]) {
    const int tid = flat_tid(), lane = tid % 32;
    Warp &w = warps[tid / 32];
    for (int i = 0; i < 4; ++i) w.buf[lane][i] = a[i];
    w.buf[lane][4] = b[0];
    w.buf[lane][5] = b[1];
    w.bar->arrive_and_wait();
    float A[16][16], B[16][8];
    auto lo = [](uint64_t r) { return __bfloat162float({(uint16_t)(r & 0xffff)}); };
    auto hi = [](uint64_t r) { return __bfloat162float({(uint16_t)((r >> 16) & 0xffff)}); };
    for (int l = 0; l < 32; ++l) {
        const int g = l / 4, t = l % 4;
        const uint64_t *r = w.buf[l];
        A[g][2 * t] = lo(r[0]), A[g][2 * t + 1] = hi(r[0]);
        A[g + 8][2 * t] = lo(r[1]), A[g + 8][2 * t + 1] = hi(r[1]);
        A[g][2 * t + 8] = lo(r[2]), A[g][2 * t + 9] = hi(r[2]);
        A[g + 8][2 * t + 8] = lo(r[3]), A[g + 8][2 * t + 9] = hi(r[3]);
        B[2 * t][g] = lo(r[4]), B[2 * t + 1][g] = hi(r[4]);
        B[2 * t + 8][g] = lo(r[5]), B[2 * t + 9][g] = hi(r[5]);
    }
    w.bar->arrive_and_wait();
    const int g = lane / 4, t = lane % 4;
    const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
    for (int i = 0; i < 4; ++i) {
        float s = 0;
        for (int k = 0; k < 16; ++k) s += A[rows[i]][k] * B[k][cols[i]];
        c[i] += s;
    }
}

// ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{.trans}.shared.b16 (PTX ISA "Warp-level matrix load
// instruction: ldmatrix"): lanes 8m..8m+7 supply the row addresses of matrix m; register m of
// lane l = 4g + t receives row g, elements 2t (low half) and 2t+1 — or, with .trans, elements
// [2t][g] (low) and [2t+1][g] of matrix m. Rows must be 16-byte aligned (checked).
inline void ldmatrix(uint32_t *r, int num, bool trans, const void *p) {
    const int tid = flat_tid(), lane = tid % 32;
    Warp &w = warps[tid / 32];
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) throw "emu: ldmatrix row address not 16-byte aligned";
    w.buf[lane][0] = (uint64_t)reinterpret_cast<uintptr_t>(p);
    w.bar->arrive_and_wait();
    const int g = lane / 4, t = lane % 4;
    for (int m = 0; m < num; ++m) {
        uint16_t e[2];
        for (int j = 0; j < 2; ++j) {
            const int row = trans ? 2 * t + j : g, col = trans ? g : 2 * t + j;
            const uint16_t *rowp = reinterpret_cast<const uint16_t *>((uintptr_t)w.buf[8 * m + row][0]);
            e[j] = rowp[col];
        }
        r[m] = (uint32_t)e[0] | ((uint32_t)e[1] << 16);
    }
    w.bar->arrive_and_wait();
}

// A thread's asynchronous operations in commit groups, as cp.async and wgmma keep them: issued
// ones stay `open` until commit closes a group; wait(n, run) performs all but the newest n
// committed groups, oldest first.
template <class Op> struct AsyncGroups {
    std::vector<Op> open;
    std::vector<std::vector<Op>> groups;
    void commit() {
        groups.push_back(std::move(open));
        open.clear();
    }
    template <class Run> void wait(int n, Run run) {
        while ((int)groups.size() > n) {
            for (Op &op : groups.front()) run(op);
            groups.erase(groups.begin());
        }
    }
    bool empty() const { return open.empty() && groups.empty(); }
    template <class Pred> bool any(Pred pred) const {
        auto in = [&](const std::vector<Op> &ops) { return std::any_of(ops.begin(), ops.end(), pred); };
        return in(open) || std::any_of(groups.begin(), groups.end(), in);
    }
};

// cp.async: each thread queues its copies; commit closes a group; wait_group(n) performs all but
// the newest n committed groups. Copies therefore land as late as the PTX semantics allow, so a
// read that is not covered by a wait (+ barrier) sees the stale contents. With `cp_at_issue`
// they land as early as it allows instead, at issue: then a copy into a buffer other threads
// still read (a missing barrier before the reload) corrupts what they read.
struct CpAsync {
    void *dst;
    const void *src;
    int bytes, src_bytes;
};
inline thread_local AsyncGroups<CpAsync> cp_state;
inline bool cp_at_issue = false;
inline void cp_async(void *dst, const void *src, int bytes, int src_bytes) {
    if (reinterpret_cast<uintptr_t>(dst) % bytes || (src_bytes && reinterpret_cast<uintptr_t>(src) % bytes))
        throw "emu: cp.async address misaligned";
    if (cp_at_issue) {
        std::memset(dst, 0, bytes);
        if (src_bytes) std::memcpy(dst, src, src_bytes);
        return;
    }
    cp_state.open.push_back({dst, src, bytes, src_bytes});
}
inline void cp_async_commit() { cp_state.commit(); }
inline void cp_async_wait(int n) {
    cp_state.wait(n, [](const CpAsync &c) {
        std::memset(c.dst, 0, c.bytes);
        if (c.src_bytes) std::memcpy(c.dst, c.src, c.src_bytes);
    });
}

// cp.reduce.async.bulk .add.f32 (global += shared): a thread's bulk operations in bulk groups, as
// the device keeps them; wait_group(.read)(n) performs all but the newest n committed groups, so
// an operation lands as late as the PTX semantics allow and a source overwritten before its
// wait shows up as a wrong sum. Each element is added atomically (other blocks add too).
struct BulkReduce {
    float *dst;
    const float *src;
    int n;
};
inline thread_local AsyncGroups<BulkReduce> bulk_state;
inline void bulk_reduce_add(float *dst, const float *src, unsigned bytes) {
    if (reinterpret_cast<uintptr_t>(dst) % 16 || reinterpret_cast<uintptr_t>(src) % 16 || bytes % 16)
        throw "emu: bulk reduce address or size not a multiple of 16 bytes";
    const ptrdiff_t at = reinterpret_cast<const unsigned char *>(src) - dyn_smem;
    if (at < 0 || at + bytes > sizeof(dyn_smem)) throw "emu: bulk reduce source outside shared memory";
    bulk_state.open.push_back({dst, src, (int)(bytes / 4)});
}
inline void bulk_commit() { bulk_state.commit(); }
inline void bulk_wait(int n) {
    bulk_state.wait(n, [](const BulkReduce &r) {
        for (int i = 0; i < r.n; ++i) std::atomic_ref<float>(r.dst[i]).fetch_add(r.src[i]);
    });
}

// The 128-byte swizzle of TMA and wgmma (CU_TENSOR_MAP_SWIZZLE_128B; the wgmma descriptor's
// layout type 1): the 16-byte chunk index within a 128-byte row, address bits 4–6, is XORed with
// the row index mod 8, bits 7–9, of the shared-memory address (here: the offset into dyn_smem,
// which is 1024-byte aligned as the kernels align their swizzled tiles).
inline size_t swizzle128(size_t off) { return off ^ (((off >> 7) & 7) << 4); }

// wgmma (kernels/src/wgmma.cuh): descriptors hold the offset into dynamic shared memory (the
// device's shared-window address); the no-swizzle canonical layouts decoded as the PTX ISA's
// "Canonical Layouts" state them (K-major and MN-major, documented in wgmma.cuh).
inline uint64_t wgmma_desc(const void *smem, uint32_t lbo, uint32_t sbo) {
    const ptrdiff_t off = static_cast<const unsigned char *>(smem) - dyn_smem;
    if (off < 0 || off >= (ptrdiff_t)sizeof(dyn_smem) || off % 16 || lbo % 16 || sbo % 16)
        throw "emu: wgmma descriptor outside dynamic shared memory or not 16-byte aligned";
    return (uint64_t)((off & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) | ((uint64_t)(sbo >> 4) << 32);
}
inline float wgmma_elem(uint64_t desc, int mn, int k, bool mn_major) {
    const size_t base = (desc & 0x3FFF) << 4, lbo = ((desc >> 16) & 0x3FFF) << 4, sbo = ((desc >> 32) & 0x3FFF) << 4;
    const unsigned layout = desc >> 62;
    size_t at;
    if (layout == 0) {  // no swizzle: 8 × 16-byte core matrices, LBO along K, SBO along M/N
        at = base + (mn_major ? (mn % 8) * 2 + (mn / 8) * sbo + (k % 8) * 16 + (k / 8) * lbo
                              : (mn % 8) * 16 + (mn / 8) * sbo + (k % 8) * 2 + (k / 8) * lbo);
    } else if (layout == 1) {
        // 128-byte swizzle, rows of 128 bytes, atoms of 8 rows. K-major: a row per M/N index
        // (the k-slice's place in the row is in the start address), SBO from 8 rows to the
        // next, LBO unused. MN-major: a row per K index holding 64 M/N elements, SBO from 8 K
        // rows to the next, LBO from 64 M/N elements to the next (PTX ISA, "Strides").
        at = swizzle128(base + (mn_major ? (mn % 64) * 2 + (mn / 64) * lbo + (k % 8) * 128 + (k / 8) * sbo
                                         : (mn % 8) * 128 + (mn / 8) * sbo + k * 2));
    } else {
        throw "emu: only wgmma's no-swizzle and 128-byte swizzle layouts are emulated";
    }
    if (at + 2 > sizeof(dyn_smem)) throw "emu: wgmma operand past shared memory";
    uint16_t v;
    std::memcpy(&v, dyn_smem + at, 2);
    return __bfloat162float({v});
}
// wgmma.mma_async m64nNk16 bf16 → f32 for the calling thread's accumulator fragment: A [64][16]
// from the group's registers (a_regs, the m16n8k16 A layout per warp) or from desc_a (K-major, or
// MN-major: the .trans form), B [16][N] from desc_b (likewise). Asynchronous as on the device:
// issue reads the A registers (exchanged through the warpgroup), commit closes a group, and
// wait_group(n) runs all but the newest n groups, reading shared memory then. Between issue and
// completion the accumulator holds NaN, so a read that no wait covers (or shared memory
// overwritten too early) shows up as a wrong result. Successive wgmmas on one accumulator chain
// in order, as on the device.
struct WgmmaOp {
    float *d;            // the caller's accumulator fragment, N/2 floats
    int n;               // N
    bool accumulate;     // D += A·B (else D = A·B)
    bool chained;        // another pending op writes d first: start from its result
    float a[2][16];      // this thread's rows (g, g + 8 of its warp) of A, when from registers
    bool a_in_regs, a_mn_major, b_mn_major;
    uint64_t desc_a, desc_b;
    std::vector<float> init;  // d at issue (first op of a chain with accumulate)
};
inline thread_local AsyncGroups<WgmmaOp> wgmma_state;

inline void wgmma_run(WgmmaOp &op) {
    const int idx = flat_tid() % 128, warp = idx / 32, lane = idx % 32, g = lane / 4, t = lane % 4;
    for (int j = 0; j < op.n / 8; ++j)
        for (int i = 0; i < 4; ++i) {
            const int r = i >> 1, row = 16 * warp + g + 8 * r, col = 8 * j + 2 * t + (i & 1);
            float s = 0;
            for (int k = 0; k < 16; ++k) {
                const float a = op.a_in_regs ? op.a[r][k] : wgmma_elem(op.desc_a, row, k, op.a_mn_major);
                s += a * wgmma_elem(op.desc_b, col, k, op.b_mn_major);
            }
            float &d = op.d[4 * j + i];
            d = (op.accumulate ? (op.chained ? d : op.init[4 * j + i]) : 0.f) + s;
        }
}

template <int N>
inline void wgmma(float (&d)[N / 8][4], const uint32_t *a_regs, uint64_t desc_a, bool a_mn_major, uint64_t desc_b,
                  bool b_mn_major, int accumulate) {
    const int tid = flat_tid(), idx = tid % 128;
    if (warpgroups.empty()) throw "emu: wgmma needs a block of whole warpgroups";
    WarpGroup &w = warpgroups[tid / 128];
    WgmmaOp op{&d[0][0], N, accumulate != 0, false, {}, a_regs != nullptr, a_mn_major, b_mn_major, desc_a, desc_b, {}};
    if (a_regs) {  // the A registers are read at issue: the group's, through its barrier
        for (int i = 0; i < 4; ++i) w.a[idx][i] = a_regs[i];
        w.bar->arrive_and_wait();
        const int warp = idx / 32, g = idx % 32 / 4;
        for (int r = 0; r < 2; ++r)
            for (int k = 0; k < 16; ++k) {
                const uint32_t reg = w.a[32 * warp + 4 * g + (k % 8) / 2][r + 2 * (k >= 8)];
                op.a[r][k] = __bfloat162float({(uint16_t)(k % 2 ? reg >> 16 : reg & 0xffff)});
            }
        w.bar->arrive_and_wait();
    }
    op.chained = wgmma_state.any([&](const WgmmaOp &o) { return o.d == op.d; });
    if (op.accumulate && !op.chained) op.init.assign(&d[0][0], &d[0][0] + N / 2);
    for (int j = 0; j < N / 8; ++j)
        for (int i = 0; i < 4; ++i) d[j][i] = NAN;  // in flight
    wgmma_state.open.push_back(std::move(op));
}
inline void wgmma_commit() { wgmma_state.commit(); }
inline void wgmma_wait(int n) { wgmma_state.wait(n, wgmma_run); }

// A wait that no arrival will ever satisfy (a kernel's deadlock) would hang the test suite:
// every emulated barrier wait gives up after WAIT_LIMIT, saying which, and aborts the run.
#ifndef EMU_WAIT_LIMIT_S
#define EMU_WAIT_LIMIT_S 300
#endif
inline constexpr auto WAIT_LIMIT = std::chrono::seconds(EMU_WAIT_LIMIT_S);
[[noreturn]] inline void deadlock(const char *what) {
    std::fprintf(stderr, "emu: %s never completed (a deadlock): aborting\n", what);
    std::fflush(stdout);
    std::abort();
}

// mbarriers (kernels/src/pipeline.cuh), keyed by their shared-memory address: an arrival count,
// the arrivals still pending in the current phase, and the phase number (its low bit is the
// parity). mbar_wait(parity) blocks while the current phase's parity equals `parity`, i.e. until
// the phase of that parity has completed. Reset for every block.
struct MBarrier {
    int count = 0, pending = 0;
    unsigned phase = 0;
    long long tx = 0;  // bytes still expected by the current phase (expect_tx minus complete_tx)
};
inline std::mutex mbar_mutex;
inline std::condition_variable mbar_cv;
inline std::map<const void *, MBarrier> mbars;
inline void mbar_init(const void *b, int count) {
    if (count <= 0) throw "emu: mbarrier count must be positive";
    std::lock_guard<std::mutex> lock(mbar_mutex);
    mbars[b] = MBarrier{count, count, 0};
}
inline MBarrier &mbar_at(const void *b) {
    auto it = mbars.find(b);
    if (it == mbars.end()) throw "emu: mbarrier used before mbar_init";
    return it->second;
}
// A phase completes once its arrivals and its expected bytes are all in.
inline void mbar_complete_if_done(MBarrier &m) {
    if (m.pending == 0 && m.tx == 0) {
        m.pending = m.count;
        ++m.phase;
        mbar_cv.notify_all();
    }
}
// mbarrier.arrive(.expect_tx): one arrival; with `bytes`, the current phase also waits for that
// many bytes of asynchronous copies.
inline void mbar_arrive_expect_tx(const void *b, unsigned bytes) {
    std::lock_guard<std::mutex> lock(mbar_mutex);
    MBarrier &m = mbar_at(b);
    if (m.pending == 0) throw "emu: an mbarrier arrival past its count";
    m.tx += bytes;
    --m.pending;
    mbar_complete_if_done(m);
}
inline void mbar_arrive(const void *b) { mbar_arrive_expect_tx(b, 0); }
// complete_tx: `bytes` of a copy that signals the barrier have landed.
inline void mbar_complete_tx(const void *b, unsigned bytes) {
    std::lock_guard<std::mutex> lock(mbar_mutex);
    MBarrier &m = mbar_at(b);
    m.tx -= bytes;
    if (m.tx < 0) throw "emu: more bytes landed than the mbarrier's phase expects";
    mbar_complete_if_done(m);
}
// The kernels wait on each barrier once per phase, in order: a thread's n-th wait is for phase
// n, and nothing can complete phase n + 1 before it has returned (the other side needs this
// thread's next release or fill first). So it must find exactly n + 1 phases completed; more
// means a phase was skipped, and a parity wait would then have passed (or hung) on the wrong one.
inline thread_local std::map<const void *, unsigned> mbar_waits;
inline void mbar_wait(const void *b, int parity) {
    std::unique_lock<std::mutex> lock(mbar_mutex);
    if (!mbar_cv.wait_for(lock, WAIT_LIMIT, [&] { return (int)(mbar_at(b).phase & 1) != (parity & 1); }))
        deadlock("an mbarrier wait");
    const unsigned n = mbar_waits[b]++;
    if (mbar_at(b).phase != n + 1) throw "emu: an mbarrier wait found a phase skipped (parity aliasing)";
    if ((int)(n & 1) != (parity & 1)) throw "emu: an mbarrier wait with the wrong parity for its phase";
}
// cp.async.mbarrier.arrive.noinc: the arrival comes once all of this thread's copies so far have
// landed; here they land now (open and committed alike), then it arrives.
inline void mbar_arrive_on_copies(const void *b) {
    cp_async_commit();
    cp_async_wait(0);
    mbar_arrive(b);
}

}  // namespace emu

// A tiled tensor map (the driver's CUtensorMap, made by cuTensorMapEncodeTiled; here by
// emu::encode_tiled): bf16 elements, rank ≤ 5, dims[0] contiguous, strides in bytes of dims 1..,
// a box of box[i] elements per dim, optionally 128-byte swizzled.
struct CUtensorMap {
    const unsigned char *base = nullptr;
    int rank = 0;
    uint64_t dims[5] = {}, strides[5] = {};
    uint32_t box[5] = {};
    bool swizzle128 = false;
};

namespace emu {
// Run the next launches' blocks in reverse index order (see launch).
inline bool reverse_blocks = false;
inline CUtensorMap encode_tiled(const void *base, int rank, const uint64_t *dims, const uint64_t *strides,
                                const uint32_t *box, bool swizzle128) {
    CUtensorMap m;
    m.base = static_cast<const unsigned char *>(base);
    m.rank = rank;
    m.swizzle128 = swizzle128;
    for (int i = 0; i < rank; ++i) {
        m.dims[i] = dims[i];
        m.box[i] = box[i];
        m.strides[i] = i == 0 ? 2 : strides[i - 1];
    }
    if (swizzle128 && box[0] * 2 > 128) throw "emu: a 128-byte swizzled box's inner dimension exceeds 128 bytes";
    return m;
}
// cp.async.bulk.tensor.3d (tile mode, global → shared, complete_tx on `bar`): the box at
// coordinates c0, c1, c2 (elements), written row after row (dim 0 fastest) from dst, swizzled if
// the map says so; elements outside the tensor are zeros. Lands at once: the consumers still
// see it only through the barrier, whose phase needs these bytes.
inline void tma_load_3d(void *dst, const CUtensorMap *map, int c0, int c1, int c2, const void *bar) {
    const ptrdiff_t at = static_cast<unsigned char *>(dst) - dyn_smem;
    if (map->rank != 3) throw "emu: tma_load_3d with a map of another rank";
    if (at < 0 || at % 128 || (map->swizzle128 && at % 1024))
        throw "emu: TMA destination outside shared memory or misaligned (128 B; 1024 B swizzled)";
    const uint32_t b0 = map->box[0], b1 = map->box[1], b2 = map->box[2];
    unsigned bytes = 0;
    for (uint32_t i2 = 0; i2 < b2; ++i2)
        for (uint32_t i1 = 0; i1 < b1; ++i1)
            for (uint32_t i0 = 0; i0 < b0; ++i0) {
                const uint64_t x = (uint64_t)c0 + i0, y = (uint64_t)c1 + i1, z = (uint64_t)c2 + i2;
                uint16_t v = 0;
                if (c0 + (int)i0 >= 0 && c1 + (int)i1 >= 0 && c2 + (int)i2 >= 0 && x < map->dims[0] &&
                    y < map->dims[1] && z < map->dims[2])
                    std::memcpy(&v, map->base + x * 2 + y * map->strides[1] + z * map->strides[2], 2);
                size_t off = at + ((size_t)(i2 * b1 + i1) * b0 + i0) * 2;
                if (map->swizzle128) off = swizzle128(off);
                if (off + 2 > sizeof(dyn_smem)) throw "emu: TMA box past shared memory";
                std::memcpy(dyn_smem + off, &v, 2);
                bytes += 2;
            }
    mbar_complete_tx(bar, bytes);
}
// Named barriers 1..15 (bar.sync / bar.arrive id, count): `count` arrivals complete a phase;
// bar.sync arrives and waits for its phase to complete, bar.arrive only arrives. The count is
// fixed by the first use in a block; a later use with another count is an error, as on the
// device.
struct NamedBarrier {
    int count = 0, arrived = 0;
    unsigned phase = 0;
};
inline NamedBarrier named_barriers[16];
inline std::mutex named_mutex;
inline std::condition_variable named_cv;
inline void named_barrier(int id, int count, bool wait) {
    if (id <= 0 || id >= 16 || count <= 0 || count % 32) throw "emu: named barrier id 1..15, count a multiple of 32";
    std::unique_lock<std::mutex> lock(named_mutex);
    NamedBarrier &n = named_barriers[id];
    if (n.count == 0) n.count = count;
    if (n.count != count) throw "emu: named barrier used with two thread counts";
    const unsigned mine = n.phase;
    if (++n.arrived == n.count) {
        n.arrived = 0;
        ++n.phase;
        named_cv.notify_all();
        return;
    }
    if (wait && !named_cv.wait_for(lock, WAIT_LIMIT, [&] { return n.phase != mine; }))
        deadlock("a named barrier (bar.sync)");
}

template <class K, class... A> void launch(dim3 grid, dim3 block, size_t smem, K kernel, A... args) {
    if (smem > sizeof(dyn_smem)) throw "emu: dynamic shared memory too large";
    const unsigned n = block.x * block.y * block.z;
    if (n % 32 != 0) throw "emu: block size must be a multiple of 32";
    gridDim = grid;
    blockDim = block;
    for (unsigned bz0 = 0; bz0 < grid.z; ++bz0)
        for (unsigned by0 = 0; by0 < grid.y; ++by0)
            for (unsigned bx0 = 0; bx0 < grid.x; ++bx0) {
                // Blocks run in index order, or in reverse with `reverse_blocks` (kernels whose
                // blocks signal one another must not depend on which finishes last).
                const unsigned bz = reverse_blocks ? grid.z - 1 - bz0 : bz0;
                const unsigned by = reverse_blocks ? grid.y - 1 - by0 : by0;
                const unsigned bx = reverse_blocks ? grid.x - 1 - bx0 : bx0;
                std::barrier<> bar(n);
                block_bar = &bar;
                warps.clear();
                warps.resize(n / 32);
                for (auto &w : warps) w.bar = std::make_unique<std::barrier<>>(32);
                warpgroups.clear();
                if (n % 128 == 0) {
                    warpgroups.resize(n / 128);
                    for (auto &w : warpgroups) w.bar = std::make_unique<std::barrier<>>(128);
                }
                std::memset(dyn_smem, 0xcd, smem);  // garbage, like real shared memory
                mbars.clear();
                for (auto &n : named_barriers) n = NamedBarrier{};
                // The block's threads count themselves done: a thread stuck at a __syncthreads
                // or warp barrier that another thread never reaches (it returned early) would
                // otherwise hang the run, as the mbarrier and named-barrier waits do not.
                std::mutex done_m;
                std::condition_variable done_cv;
                unsigned done = 0;
                std::vector<std::thread> ts;
                ts.reserve(n);
                for (unsigned i = 0; i < n; ++i)
                    ts.emplace_back([=, &done_m, &done_cv, &done] {
                        threadIdx = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
                        blockIdx = dim3(bx, by, bz);
                        cp_state = {};
                        wgmma_state = {};
                        mbar_waits.clear();
                        kernel(args...);
                        if (!wgmma_state.empty())
                            throw "emu: wgmma issued but never waited for";
                        if (!bulk_state.empty()) throw "emu: a bulk reduce issued but never waited for";
                        if (!cp_state.empty()) {
                            // Copies never waited for: legal only if nothing reads them; apply them
                            // so a missing wait shows up as a wrong result, not a silent skip.
                            cp_async_commit();
                            cp_async_wait(0);
                        }
                        {
                            std::lock_guard<std::mutex> lock(done_m);
                            ++done;
                        }
                        done_cv.notify_one();
                    });
                {
                    std::unique_lock<std::mutex> lock(done_m);
                    if (!done_cv.wait_for(lock, WAIT_LIMIT, [&] { return done == n; }))
                        deadlock("a block (a __syncthreads or warp barrier that some thread never reached)");
                }
                for (auto &t : ts) t.join();
            }
}
}  // namespace emu

inline void __syncthreads() { emu::block_bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_sync(); }
template <class T> T __shfl_xor_sync(unsigned, T v, int m) {
    return emu::shfl_from(v, (emu::flat_tid() % 32) ^ m);
}
template <class T> T __shfl_sync(unsigned, T v, int src) { return emu::shfl_from(v, src); }
inline float atomicAdd(float *p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline unsigned atomicAdd(unsigned *p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <class T> T __ldcg(const T *p) { return *p; }

inline unsigned long long atomicAdd(unsigned long long *p, unsigned long long v) {
    return std::atomic_ref<unsigned long long>(*p).fetch_add(v);
}
