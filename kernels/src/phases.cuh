// Where a kernel's warps spend their cycles, phase by phase: the profiled instantiations of the
// wgmma attention kernels (flash_wg.cu, PROF = true; `shardsmith bench attention --phases`,
// ops::attention::phases) read the SM's cycle counter at each phase boundary and charge the
// cycles since the previous read to the phase that just ended. Without a profiler on the device
// this is how a stall is located: which wait the tensor cores leave exposed, how long the
// barriers hold a warpgroup, what the atomics cost.
//
// PhaseClock<ON, N, WARPS>: N phases, WARPS warps a block. ON false: every member is empty and
// the kernel compiles as if it were not there. ON true:
//   constructor  reads the clock (the first phase is charged from here) and zeroes this warp's
//                counters, [2][N] u32 in static shared memory ([WARPS][2][N] a block);
//   mark(p)      charges the cycles since the last read to phase p and counts one run of it;
//   flush()      adds the warp's counters to out [2][N] u64 (cycles, then runs), summed over
//                every warp of the grid by 64-bit atomics; out is zero-filled by the caller.
// The marks tile a warp's life (constructor to last mark), so Σ cycles is the warps' total time
// and each share is a fraction of it. Marks must sit where control flow is warp-uniform; only
// lane 0 keeps counters (a predicated shared-memory add). The 32-bit %clock wraps after ~2 s,
// far longer than a phase, and differences are taken modulo 2³².
// Cost: a clock read per boundary, the lane-0 adds, two registers (the last read, the counters'
// address); the numbers are for locating stalls, and bench prints the profiled kernel's time
// beside the plain one's so the perturbation shows.
#pragma once
#include "common.cuh"

__device__ __forceinline__ unsigned cycle_clock() {
#ifdef SHARDSMITH_EMU
    return emu::cycle_clock();
#else
    unsigned c;
    asm volatile("mov.u32 %0, %%clock;\n" : "=r"(c));
    return c;
#endif
}

template <bool ON, int N, int WARPS> struct PhaseClock {
    __device__ __forceinline__ explicit PhaseClock(unsigned long long *) {}
    __device__ __forceinline__ void mark(int) {}
    __device__ __forceinline__ void flush() {}
};

template <int N, int WARPS> struct PhaseClock<true, N, WARPS> {
    unsigned long long *out;
    unsigned *slot;  // this warp's counters: cycles [N], then runs [N]
    unsigned last;
    __device__ __forceinline__ explicit PhaseClock(unsigned long long *out_) : out(out_) {
        __shared__ unsigned slots[WARPS][2 * N];
        slot = slots[threadIdx.x / 32];
        if (threadIdx.x % 32 == 0)
            for (int i = 0; i < 2 * N; ++i) slot[i] = 0;
        last = cycle_clock();
    }
    __device__ __forceinline__ void mark(int phase) {
        const unsigned now = cycle_clock();
        if (threadIdx.x % 32 == 0) {
            slot[phase] += now - last;
            slot[N + phase] += 1;
        }
        last = now;
    }
    __device__ __forceinline__ void flush() {
        if (threadIdx.x % 32 == 0)
            for (int i = 0; i < 2 * N; ++i) atomicAdd(out + i, (unsigned long long)slot[i]);
    }
};
