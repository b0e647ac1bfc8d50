// Embedding rows by device-side ids: out[r] = table[ids[r]] — the lookup at the start of a decode
// step replayed from a CUDA graph, where the ids live in device memory (the step's tokens are
// copied there before each replay, so the launch itself never changes).
//
// Shapes: ids [R] u32; table [V, H] row-major contiguous; out [R, H] contiguous. An id ≥ V
//         gives a row of zeros (what a vocab-parallel rank contributes for another rank's id)
//         instead of reading past the table.
// Launch: embed_rows_T   1-D grid-stride over R·H elements, block 256.
// Numerics: a copy.
// Supported T: f32, bf16.
#include "common.cuh"

template <typename T>
__device__ void embed_rows(const unsigned *__restrict__ ids, const T *__restrict__ table, T *__restrict__ out,
                           int rows, int h, int vocab) {
    const long long n = (long long)rows * h;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < n;
         idx += (long long)gridDim.x * blockDim.x) {
        const int r = (int)(idx / h), i = (int)(idx % h);
        const unsigned id = ids[r];
        out[idx] = id < (unsigned)vocab ? table[(long long)id * h + i] : from_f32<T>(0.f);
    }
}

#define EMBED_ROWS(TY, NAME)                                                                              \
    extern "C" __global__ void embed_rows_##NAME(const unsigned *ids, const TY *table, TY *out, int rows, \
                                                 int h, int vocab) {                                      \
        embed_rows<TY>(ids, table, out, rows, h, vocab);                                                  \
    }
EMBED_ROWS(float, f32)
EMBED_ROWS(bf16, bf16)
