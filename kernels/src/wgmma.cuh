// Hopper's warpgroup MMA (wgmma.mma_async, sm_90a) for bf16 operands with f32 accumulation: the
// shared-memory matrix descriptor, the fence / commit / wait protocol, and the seven forms the
// attention kernels use (`_tb`: B MN-major; `_tt`: A and B MN-major; neither: K-major operands).
// SHARDSMITH_WGMMA is 1 where they exist: an sm_90a build, or the emulator (kernels/emu/emu.h), which runs each
// product at the wait_group that covers it, with the accumulator NaN while in flight.
//
// A warpgroup is 4 consecutive warps (128 threads) and issues each wgmma together. Accumulator
// layout of m64nNk16 (PTX ISA, "Register fragment layout for accumulator matrix D"): warp w of the
// group holds rows 16w .. 16w+15 exactly as mma.m16n8k16 holds its 16 rows (common.cuh), one
// 16×8 tile per 8 columns: d[j][0], d[j][1] = D[16w + g][8j + 2t, +1], d[j][2], d[j][3] = the
// same columns of row 16w + g + 8. An A operand in registers has the m16n8k16 A fragment layout
// for the warp's 16 rows, so an accumulator tile pair packs into it as in acc_to_a.
//
// Descriptors (PTX ISA, "Matrix Descriptor Format"): bits 0-13 start address >> 4, 16-29 leading
// byte offset (LBO) >> 4, 32-45 stride byte offset (SBO) >> 4, 62-63 swizzle (0: none, 1: 128
// bytes). The tiles that TMA loads (flash_fwd_tma, flash_bwd_tma) are 128-byte swizzled
// (wgmma_desc_sw128); every other tile uses the no-swizzle ("interleaved") canonical layouts,
// made of core matrices of 8 rows × 16 bytes stored as 128 contiguous bytes;
//   K-major  ((8,m),(T,2k)):((1T,SBO),(1,LBO)): element (mn, k) at byte
//            (mn%8)·16 + (mn/8)·SBO + (k%8)·2 + (k/8)·LBO;
//   MN-major ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO)): element (mn, k) at byte
//            (mn%8)·2 + (mn/8)·SBO + (k%8)·16 + (k/8)·LBO.
// Shared memory written by ordinary stores or cp.async must be fenced to the async proxy
// (wgmma_fence_smem) before the barrier that precedes the wgmma reading it; registers a batch uses
// are pinned (wgmma_pin) before its wgmma_fence and after its wgmma_wait.
#pragma once
#include "common.cuh"

#if defined(SHARDSMITH_EMU) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SHARDSMITH_WGMMA 1
#else
#define SHARDSMITH_WGMMA 0
#endif

#if SHARDSMITH_WGMMA
// `desc` with its start address moved `bytes` (a multiple of 16) further into shared memory: one
// add on the start-address field (bits 0-13), which shared memory's 228 KB cannot overflow.
__device__ __forceinline__ uint64_t wgmma_desc_add(uint64_t desc, int bytes) { return desc + (uint64_t)(bytes >> 4); }
__device__ __forceinline__ uint64_t wgmma_desc(const void *smem, uint32_t lbo, uint32_t sbo);
// The descriptor of a 128-byte swizzled operand (layout type 1; the layout TMA's
// CU_TENSOR_MAP_SWIZZLE_128B writes): rows of 128 bytes in atoms of 8 rows, 1024-byte aligned.
// K-major: smem at the k-slice's place in the row (+32 bytes a 16-element step), SBO 1024 (8
// rows to the next), LBO unused. MN-major: SBO 1024 (8 K rows), LBO from 64 M/N elements to the
// next 64.
__device__ __forceinline__ uint64_t wgmma_desc_sw128(const void *smem, uint32_t lbo, uint32_t sbo) {
    return wgmma_desc(smem, lbo, sbo) | (1ull << 62);
}

#ifdef SHARDSMITH_EMU
__device__ __forceinline__ uint64_t wgmma_desc(const void *smem, uint32_t lbo, uint32_t sbo) {
    return emu::wgmma_desc(smem, lbo, sbo);
}
__device__ __forceinline__ void wgmma_fence() {}
__device__ __forceinline__ void wgmma_commit() { emu::wgmma_commit(); }
template <int N> __device__ __forceinline__ void wgmma_wait() { emu::wgmma_wait(N); }
__device__ __forceinline__ void wgmma_fence_smem() {}
template <int N> __device__ __forceinline__ void wgmma_pin(float (&)[N][4]) {}
template <int N> __device__ __forceinline__ void wgmma_pin(uint32_t (&)[N][4]) {}
__device__ __forceinline__ void wgmma_ss_m64n64k16(float (&d)[8][4], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    emu::wgmma<64>(d, nullptr, desc_a, false, desc_b, false, accumulate);
}
__device__ __forceinline__ void wgmma_ss_m64n128k16(float (&d)[16][4], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    emu::wgmma<128>(d, nullptr, desc_a, false, desc_b, false, accumulate);
}
__device__ __forceinline__ void wgmma_rs_m64n64k16_tb(float (&d)[8][4], const uint32_t a[4], uint64_t desc_b, int accumulate) {
    emu::wgmma<64>(d, a, 0, false, desc_b, true, accumulate);
}
__device__ __forceinline__ void wgmma_rs_m64n64k16(float (&d)[8][4], const uint32_t a[4], uint64_t desc_b, int accumulate) {
    emu::wgmma<64>(d, a, 0, false, desc_b, false, accumulate);
}
__device__ __forceinline__ void wgmma_rs_m64n128k16_tb(float (&d)[16][4], const uint32_t a[4], uint64_t desc_b, int accumulate) {
    emu::wgmma<128>(d, a, 0, false, desc_b, true, accumulate);
}
__device__ __forceinline__ void wgmma_rs_m64n128k16(float (&d)[16][4], const uint32_t a[4], uint64_t desc_b, int accumulate) {
    emu::wgmma<128>(d, a, 0, false, desc_b, false, accumulate);
}
__device__ __forceinline__ void wgmma_ss_m64n64k16_tt(float (&d)[8][4], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    emu::wgmma<64>(d, nullptr, desc_a, true, desc_b, true, accumulate);
}
#else
__device__ __forceinline__ uint64_t wgmma_desc(const void *smem, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((smem_u32(smem) & 0x3FFFF) >> 4) | ((uint64_t)((lbo & 0x3FFFF) >> 4) << 16) |
           ((uint64_t)((sbo & 0x3FFFF) >> 4) << 32);
}
// Before the first wgmma of a sequence whose accumulator or A registers other instructions wrote.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Until at most N committed groups are pending (their accumulators may be read after N = 0).
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void wgmma_fence_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Pins accumulator (or A-operand) registers in place: the fence / commit / wait asm does not name
// them, so without this the compiler may move ordinary reads and writes of them across the
// asynchronous region, which the hardware does not order (CUTLASS's warpgroup_fence_operand).
// Call on every register set a wgmma batch uses, before wgmma_fence and after wgmma_wait.
template <int N> __device__ __forceinline__ void wgmma_pin(float (&d)[N][4]) {
#pragma unroll
    for (int j = 0; j < N; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) asm volatile("" : "+f"(d[j][i])::"memory");
}
template <int N> __device__ __forceinline__ void wgmma_pin(uint32_t (&a)[N][4]) {
#pragma unroll
    for (int j = 0; j < N; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) asm volatile("" : "+r"(a[j][i])::"memory");
}
// D[64][64] (+)= A[64][16] · B[16][64]: A and B from shared memory by descriptor, both K-major.
__device__ __forceinline__ void wgmma_ss_m64n64k16(float (&d)[8][4], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}
// D[64][128] (+)= A[64][16] · B[16][128]: A and B from shared memory by descriptor, both K-major
// (S = Q·Kᵀ over 128-key tiles with Q in shared memory: the warp-specialised forward).
__device__ __forceinline__ void wgmma_ss_m64n128k16(float (&d)[16][4], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}
// D[64][64] (+)= A[64][16] · B[16][64]: A from registers (the m16n8k16 A fragment of the warp's 16
// rows), B from shared memory by descriptor, MN-major (.trans, TRANS_B = 1) or K-major (0).
template <int TRANS_B>
__device__ __forceinline__ void wgmma_rs_m64n64k16_form(float (&d)[8][4], const uint32_t a[4], uint64_t desc_b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(TRANS_B));
}
__device__ __forceinline__ void wgmma_rs_m64n64k16_tb(float (&d)[8][4], const uint32_t a[4], uint64_t desc_b, int accumulate) {
    wgmma_rs_m64n64k16_form<1>(d, a, desc_b, accumulate);
}
// The same with B K-major: S = Q·Kᵀ with Q in registers.
__device__ __forceinline__ void wgmma_rs_m64n64k16(float (&d)[8][4], const uint32_t a[4], uint64_t desc_b, int accumulate) {
    wgmma_rs_m64n64k16_form<0>(d, a, desc_b, accumulate);
}
// D[64][128] (+)= A[64][16] · B[16][128]: A from registers (the m16n8k16 A fragment of the warp's 16
// rows), B from shared memory by descriptor, MN-major (.trans, TRANS_B = 1) or K-major (0).
template <int TRANS_B>
__device__ __forceinline__ void wgmma_rs_m64n128k16_form(float (&d)[16][4], const uint32_t a[4], uint64_t desc_b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(TRANS_B));
}
__device__ __forceinline__ void wgmma_rs_m64n128k16_tb(float (&d)[16][4], const uint32_t a[4], uint64_t desc_b, int accumulate) {
    wgmma_rs_m64n128k16_form<1>(d, a, desc_b, accumulate);
}
__device__ __forceinline__ void wgmma_rs_m64n128k16(float (&d)[16][4], const uint32_t a[4], uint64_t desc_b, int accumulate) {
    wgmma_rs_m64n128k16_form<0>(d, a, desc_b, accumulate);
}
// D[64][64] (+)= A[64][16] · B[16][64]: A and B from shared memory by descriptor, both MN-major
// (.trans: A stored as Aᵀ, B as B).
__device__ __forceinline__ void wgmma_ss_m64n64k16_tt(float (&d)[8][4], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 1, 1;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}
#endif  // SHARDSMITH_EMU
#endif  // SHARDSMITH_WGMMA
