// A linear layer's epilogue in one pass: y = act(x + b) (+ r), for the CLIP tower's projections
// (bias; bias + quick GELU after fc1; bias + residual after out_proj and fc2), where candle ran a
// broadcast add, then x·1.702, a sigmoid and a product, then the residual add. Without b and act,
// y = x + r: the training layers' residual and gradient sums (ops::add_detached). candle's add
// is vectorised too but launches a thread per element, so 7 of every 8 bf16 blocks start only to
// exit (0.148 ms for a 64 MB bf16 sum on an H200: 1.3 TB/s); this grid has a thread per chunk.
//
// Shapes: x, r, y [R, C] row-major contiguous (R = all leading dims); b [C]. r, b may be null.
// Launch: 1-D grid-stride over ⌈R·C/8⌉ threads' worth (8 elements per thread with 16-byte
//         accesses when C % 8 == 0 and x, r, y are 16-byte aligned, else one), block 256.
// Numerics: in f32, one rounding to T: v = x + b (v = x without b); act 0: v, act 1 (quick GELU):
//           v / (1 + e^(−1.702·v)); then v + r. Reference: ops::epilogue's CPU forward (same
//           formula in Rust f32); without b and act, candle's add (one rounding of x + r).
// Supported T: f32, bf16.
#include "common.cuh"

__device__ __forceinline__ float epilogue_act(float v, int act) { return act == 1 ? v / (1.0f + expf(-1.702f * v)) : v; }

template <typename T>
__device__ void bias_act(const T *__restrict__ x, const T *__restrict__ b, const T *__restrict__ r, T *__restrict__ y,
                         long long n, int cols, int act) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (cols % 8 == 0 && n % 8 == 0 && aligned16(x) && aligned16(y) && (r == nullptr || aligned16(r)) &&
        aligned16(b)) {
        for (long long i = tid; i < n / 8; i += stride) {
            float v[8], bv[8], rv[8];
            load8(x + 8 * i, v);
            if (b != nullptr) load8(b + (8 * i) % cols, bv);  // the 8 elements lie in one row: C % 8 == 0
            if (r != nullptr) load8(r + 8 * i, rv);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                v[j] = epilogue_act(b != nullptr ? v[j] + bv[j] : v[j], act);
                if (r != nullptr) v[j] += rv[j];
            }
            store8(y + 8 * i, v);
        }
        return;
    }
    for (long long i = tid; i < n; i += stride) {
        float v = to_f32(x[i]);
        v = epilogue_act(b != nullptr ? v + to_f32(b[i % cols]) : v, act);
        if (r != nullptr) v += to_f32(r[i]);
        y[i] = from_f32<T>(v);
    }
}

#define BIAS_ACT(TY, NAME)                                                                              \
    extern "C" __global__ void bias_act_##NAME(const TY *x, const TY *b, const TY *r, TY *y, long long n, \
                                               int cols, int act) {                                     \
        bias_act<TY>(x, b, r, y, n, cols, act);                                                         \
    }
BIAS_ACT(float, f32)
BIAS_ACT(bf16, bf16)
