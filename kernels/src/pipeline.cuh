// Hopper's primitives for warp-specialised kernels (sm_90), in which a producer warpgroup fills
// shared-memory buffers and consumer warpgroups compute on them without block-wide barriers:
//
//   mbarrier   a 64-bit shared-memory barrier with an arrival count and a phase bit
//              (PTX ISA "Parallel Synchronization and Communication Instructions: mbarrier").
//              mbar_init(b, n): n arrivals complete a phase; mbar_arrive(b): one arrival (release,
//              CTA scope); mbar_wait(b, parity) returns once the phase of that parity has
//              completed (acquire), i.e. while the barrier's current phase bit still equals
//              `parity` it spins. A buffer used for the u-th time (u = 0, 1, ...) is waited for
//              with parity u & 1. Initialised by one thread, then made visible by __syncthreads.
//   named      bar.sync / bar.arrive on hardware barriers 1..15 (0 is __syncthreads'), `count`
//              threads a phase (a multiple of 32): named_sync waits for the phase, named_arrive
//              counts towards it without waiting. Two warpgroups order their work by them.
//   setmaxnreg a warpgroup gives registers back (dec) or takes more (inc): the producer needs
//              few, the consumers' accumulators many. Every warp of the warpgroup executes it.
//   copies     mbar_arrive_on_copies(b) (cp.async.mbarrier.arrive.noinc): one arrival on b once
//              every cp.async this thread has issued so far has landed, without the thread
//              waiting for them, so a producer keeps issuing while its earlier tiles are in
//              flight. noinc: the arrival is one of the count given to mbar_init (one a copying
//              thread), not an extra one balanced by the instruction itself.
//   TMA        tma_load_3d(dst, map, c0, c1, c2, bar) (cp.async.bulk.tensor, tile mode): one
//              thread copies a box of a tensor (a CUtensorMap the host encoded: dims, strides,
//              box, swizzle) into shared memory, zero-filling what lies outside the tensor, and
//              the copy's bytes count towards bar's current phase, which mbar_expect_tx(bar,
//              bytes) (an arrival that also announces the bytes) set up before. No thread waits
//              for the copy; the consumers wait on bar. The copy is in the async proxy, as wgmma
//              is: no proxy fence between them.
//   bulk       bulk_reduce_add(dst, src, bytes) (cp.reduce.async.bulk .add.f32): one thread adds
//   reduce     `bytes` of f32 from shared memory into global memory (16-byte aligned, a multiple
//              of 16 bytes) asynchronously, in its current bulk group; bulk_commit closes the
//              group; bulk_wait_read<N> returns once all but the newest N groups have read their
//              source (it may be overwritten), bulk_wait<N> once they have completed. The copy
//              reads in the async proxy: the source's writers fence.proxy.async first.
//   fence      fence.proxy.async: generic-proxy writes to shared memory (ordinary stores,
//              landed cp.async copies) made visible to the async proxy (wgmma). A producer
//              that arrives by mbar_arrive_on_copies never sees its copies land, so the
//              consumer fences after its wait instead: mbar_wait_copies.
//
// The emulator (kernels/emu/emu.h) runs mbarriers and named barriers on real thread
// synchronisation, so a wait that no arrival matches deadlocks there as on the device.
#pragma once
#include "common.cuh"
#ifndef SHARDSMITH_EMU
#include <cuda.h>  // CUtensorMap
#endif

#ifdef SHARDSMITH_EMU
__device__ __forceinline__ void mbar_init(uint64_t *b, int count) { emu::mbar_init(b, count); }
__device__ __forceinline__ void mbar_arrive(uint64_t *b) { emu::mbar_arrive(b); }
__device__ __forceinline__ void mbar_wait(uint64_t *b, int parity) { emu::mbar_wait(b, parity); }
__device__ __forceinline__ void mbar_arrive_on_copies(uint64_t *b) { emu::mbar_arrive_on_copies(b); }
__device__ __forceinline__ void mbar_expect_tx(uint64_t *b, unsigned bytes) { emu::mbar_arrive_expect_tx(b, bytes); }
__device__ __forceinline__ void bulk_reduce_add(float *dst, const float *src, unsigned bytes) {
    emu::bulk_reduce_add(dst, src, bytes);
}
__device__ __forceinline__ void bulk_commit() { emu::bulk_commit(); }
template <int N> __device__ __forceinline__ void bulk_wait_read() { emu::bulk_wait(N); }
template <int N> __device__ __forceinline__ void bulk_wait() { emu::bulk_wait(N); }
__device__ __forceinline__ void tma_load_3d(void *dst, const CUtensorMap *map, int c0, int c1, int c2, uint64_t *bar) {
    emu::tma_load_3d(dst, map, c0, c1, c2, bar);
}
__device__ __forceinline__ void named_sync(int id, int count) { emu::named_barrier(id, count, true); }
__device__ __forceinline__ void named_arrive(int id, int count) { emu::named_barrier(id, count, false); }
template <int N> __device__ __forceinline__ void setmaxnreg_inc() {}
template <int N> __device__ __forceinline__ void setmaxnreg_dec() {}
__device__ __forceinline__ void fence_proxy_async() {}
#else
__device__ __forceinline__ void mbar_init(uint64_t *b, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(b)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t *b) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(b)) : "memory");
}
// The spin loop stays inside one asm block (labels are local to its braces), so that the warp
// leaves it converged for the .aligned instructions that follow (bar.sync, wgmma).
__device__ __forceinline__ void mbar_wait(uint64_t *b, int parity) {
    asm volatile(
        "{\n.reg .pred p;\nWAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        "@!p bra WAIT;\n}\n" ::"r"(smem_u32(b)),
        "r"(parity)
        : "memory");
}
__device__ __forceinline__ void mbar_arrive_on_copies(uint64_t *b) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_u32(b)) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t *b, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(b)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bulk_reduce_add(float *dst, const float *src, unsigned bytes) {
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst),
                 "r"(smem_u32(src)), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void bulk_wait_read() {
    asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
template <int N> __device__ __forceinline__ void bulk_wait() {
    asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}
// `map` is the address of a __grid_constant__ kernel parameter (a generic address of param space).
__device__ __forceinline__ void tma_load_3d(void *dst, const CUtensorMap *map, int c0, int c1, int c2, uint64_t *bar) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
        "[%5];\n" ::"r"(smem_u32(dst)),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(smem_u32(bar))
        : "memory");
}
__device__ __forceinline__ void named_sync(int id, int count) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int count) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
template <int N> __device__ __forceinline__ void setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N> __device__ __forceinline__ void setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
#endif

// Wait for a buffer that mbar_arrive_on_copies signalled, then make its copies visible to this
// thread's wgmma (fence.proxy.async on the consumer's side; see `fence` above). The TMA kernels
// wait this way too: for TMA-written tiles (async proxy already) the fence is not needed, but
// they were measured and verified with it, and dropping it changes their SASS.
__device__ __forceinline__ void mbar_wait_copies(uint64_t *b, int parity) {
    mbar_wait(b, parity);
    fence_proxy_async();
}

// `smem` advanced to the next multiple of ALIGN in the shared address space (a 128-byte swizzled
// tile must start on a 1024-byte boundary for TMA's and wgmma's swizzles to agree; dynamic shared
// memory is only 16-byte aligned, after the static variables). The caller allocates ALIGN − 16
// bytes more.
template <unsigned ALIGN> __device__ __forceinline__ unsigned char *align_smem(unsigned char *smem) {
#ifdef SHARDSMITH_EMU
    const size_t at = smem - emu::dyn_smem;
#else
    const unsigned at = smem_u32(smem);
#endif
    return smem + ((ALIGN - at % ALIGN) % ALIGN);
}
