// Rotary position embedding on the two halves of each head (transformers' rotate_half).
//
// Shapes: x, y [N, T, D] row-major contiguous (N = B·H heads), cos/sin [T, D/2] (rows past T
//         unused). The backward is this kernel with −sin (the rotation's transpose).
// Launch: 1-D grid-stride over N·T·D/2 (one thread per rotated pair), block 256,
//         grid min(ceil(N·T·D/2 / 256), 65535·…) chosen by the caller.
// Numerics: (a, b) → (a·c − b·s, b·c + a·s) in f32 with every product and sum rounded on its
//           own (__fmul_rn / __fadd_rn, no FMA contraction), rounded to T once: bit-identical
//           to the CPU reference (ops::Rope::cpu_fwd).
// Supported (T, C): (f32, f32), (bf16, bf16), (bf16, f32).
//
// rope_qkv_cache_*: one inference step's q, k and v into attention's layout in one launch — q
// rotated into q_out, k rotated and v copied into the KV cache at positions pos..pos+T (what
// two rotations, three head splits and two cache writes did).
// Shapes: q [B, T, Hq·D], k and v [B, T, G·D], element (b, t, j) at x[b·sb + t·st + j] (column
//         views of one fused projection are fine); cos/sin [T, D/2] for positions pos..pos+T;
//         q_out [B, Hq, T, D] contiguous; kv [2, B, G, cap, D] contiguous (keys, then values),
//         pos + T ≤ cap.
//         pos_dev (nullable): a device int holding the position instead of `pos`, for a
//         decode step replayed from a CUDA graph (the position changes, the launch does not);
//         cos/sin are then the whole tables [≥ cap, D/2], indexed by absolute position.
// Launch: 1-D grid-stride over B·T·(Hq + 2G)·D/2 (one thread per pair (i, i + D/2) of one head
//         row), block 256.
// Numerics: the rotation as above (bit-identical to ops::RopeQkvCache's CPU forward); v copied.
//
// rope_heads_*: attention heads between the projections' layout and attention's, rotated on the
// way (ops::heads): one pass where a strided copy and a rotation were two.
// Shapes: the tokens side [B, T, H·D], element (b, t, h, i) at b·sb + t·st + h·D + i (st ≥ H·D:
//         column views of one fused projection are fine; i unit-stride); the heads side
//         [B, H, T, D] contiguous; cos/sin [T, D/2]. `split` reads the tokens side and writes the
//         heads side, else the reverse; `rotate` applies the rotation by sign·θ (sign ±1: −1 is
//         its transpose, the backward), else the heads are moved as they are.
// Launch: 1-D grid-stride over B·H·T·(D/2 or D)/W work items, block 256, where W = 8 consecutive
//         elements moved with 16-byte accesses when every pointer is 16-byte aligned, sb and st
//         are multiples of 8 and D of 16, else W = 1.
// Numerics: the rotation as rope's (each product and sum rounded on its own, then to T once) with
//           s·sign in place of s: bit-identical to ops::heads' CPU pass and to the composed
//           copy + rope (whose backward passes −sin).
#include "common.cuh"

template <typename T, typename C>
__device__ void rope(const T *__restrict__ x, const C *__restrict__ cos, const C *__restrict__ sin,
                     T *__restrict__ y, long long pairs, int t, int d) {
    const int half = d / 2;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < pairs;
         idx += (long long)gridDim.x * blockDim.x) {
        const int i = (int)(idx % half);
        const long long row = idx / half;  // index into [N·T]
        const int p = (int)(row % t);
        const float a = to_f32(x[row * d + i]), b = to_f32(x[row * d + i + half]);
        const float c = to_f32(cos[p * half + i]), s = to_f32(sin[p * half + i]);
        y[row * d + i] = from_f32<T>(__fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s)));
        y[row * d + i + half] = from_f32<T>(__fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s)));
    }
}

template <typename T, typename C>
__device__ void rope_qkv_cache(const T *__restrict__ q, long long sqb, long long sqt, const T *__restrict__ k,
                               long long skb, long long skt, const T *__restrict__ v, long long svb, long long svt,
                               const C *__restrict__ cos, const C *__restrict__ sin,
                               T *__restrict__ q_out, T *__restrict__ kv, int b, int t, int hq, int g, int d, int cap,
                               int pos, const int *__restrict__ pos_dev) {
    // Table rows: relative to pos (host position), or absolute (device position).
    const int row0 = pos_dev ? *pos_dev : 0;
    if (pos_dev) pos = row0;
    cos += (long long)row0 * (d / 2);
    sin += (long long)row0 * (d / 2);
    const int half = d / 2, heads = hq + 2 * g;
    const long long pairs = (long long)b * t * heads * half;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < pairs;
         idx += (long long)gridDim.x * blockDim.x) {
        const int i = (int)(idx % half);
        long long r = idx / half;
        const int head = (int)(r % heads);
        r /= heads;
        const int p = (int)(r % t);
        const int bi = (int)(r / t);
        const T *src;
        T *dst;
        bool rotate = true;
        if (head < hq) {
            src = q + bi * sqb + p * sqt + (long long)head * d;
            dst = q_out + (((long long)bi * hq + head) * t + p) * d;
        } else if (head < hq + g) {
            src = k + bi * skb + p * skt + (long long)(head - hq) * d;
            dst = kv + (((long long)bi * g + (head - hq)) * cap + pos + p) * d;
        } else {
            src = v + bi * svb + p * svt + (long long)(head - hq - g) * d;
            dst = kv + ((((long long)b + bi) * g + (head - hq - g)) * cap + pos + p) * d;
            rotate = false;
        }
        if (rotate) {
            const float a = to_f32(src[i]), bv = to_f32(src[i + half]);
            const float c = to_f32(cos[p * half + i]), s = to_f32(sin[p * half + i]);
            dst[i] = from_f32<T>(__fsub_rn(__fmul_rn(a, c), __fmul_rn(bv, s)));
            dst[i + half] = from_f32<T>(__fadd_rn(__fmul_rn(bv, c), __fmul_rn(a, s)));
        } else {
            dst[i] = src[i];
            dst[i + half] = src[i + half];
        }
    }
}

// W consecutive elements as f32 (W = 8: 16-byte accesses, see load8/store8).
template <int W, typename T> __device__ __forceinline__ void load_w(const T *p, float v[W]) {
    if constexpr (W == 8) {
        load8(p, v);
    } else {
#pragma unroll
        for (int j = 0; j < W; ++j) v[j] = to_f32(p[j]);
    }
}
template <int W, typename T> __device__ __forceinline__ void store_w(T *p, const float v[W]) {
    if constexpr (W == 8) {
        store8(p, v);
    } else {
#pragma unroll
        for (int j = 0; j < W; ++j) p[j] = from_f32<T>(v[j]);
    }
}

template <int W, typename T, typename C>
__device__ void rope_heads_w(const T *__restrict__ x, T *__restrict__ y, const C *__restrict__ cos,
                             const C *__restrict__ sin, int b, int t, int h, int d, long long sb, long long st,
                             bool split, bool rotate, float sign) {
    const int half = d / 2;
    const int items = (rotate ? half : d) / W;  // per head row
    const long long total = (long long)b * h * t * items;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        const int i = (int)(idx % items) * W;
        const long long row = idx / items;  // (b, h, p) in the heads layout
        const int p = (int)(row % t);
        const long long bh = row / t;
        const long long heads_at = row * d, tokens_at = (bh / h) * sb + p * st + (bh % h) * d;
        const T *src = x + (split ? tokens_at : heads_at);
        T *dst = y + (split ? heads_at : tokens_at);
        float a[W];
        load_w<W>(src + i, a);
        if (!rotate) {
            store_w<W>(dst + i, a);
            continue;
        }
        float bv[W], c[W], s[W], lo[W], hi[W];
        load_w<W>(src + i + half, bv);
        load_w<W>(cos + (long long)p * half + i, c);
        load_w<W>(sin + (long long)p * half + i, s);
#pragma unroll
        for (int j = 0; j < W; ++j) {
            const float sj = sign * s[j];
            lo[j] = __fsub_rn(__fmul_rn(a[j], c[j]), __fmul_rn(bv[j], sj));
            hi[j] = __fadd_rn(__fmul_rn(bv[j], c[j]), __fmul_rn(a[j], sj));
        }
        store_w<W>(dst + i, lo);
        store_w<W>(dst + i + half, hi);
    }
}

template <typename T, typename C>
__device__ void rope_heads(const T *__restrict__ x, T *__restrict__ y, const C *__restrict__ cos,
                           const C *__restrict__ sin, int b, int t, int h, int d, long long sb, long long st,
                           int split, int rotate, float sign) {
    // The tables are read only when rotating (the caller may pass empty ones otherwise).
    const bool wide = aligned16(x) && aligned16(y) && sb % 8 == 0 && st % 8 == 0 && d % 16 == 0 &&
                      (!rotate || (aligned16(cos) && aligned16(sin)));
    if (wide)
        rope_heads_w<8>(x, y, cos, sin, b, t, h, d, sb, st, split != 0, rotate != 0, sign);
    else
        rope_heads_w<1>(x, y, cos, sin, b, t, h, d, sb, st, split != 0, rotate != 0, sign);
}

#define ROPE(TY, CY, NAME)                                                                            \
    extern "C" __global__ void rope_##NAME(const TY *x, const CY *cos, const CY *sin, TY *y,           \
                                           long long pairs, int t, int d) {                           \
        rope<TY, CY>(x, cos, sin, y, pairs, t, d);                                                    \
    }                                                                                                 \
    extern "C" __global__ void rope_qkv_cache_##NAME(                                                 \
        const TY *q, long long sqb, long long sqt, const TY *k, long long skb, long long skt, const TY *v,    \
        long long svb, long long svt, const CY *cos, const CY *sin, TY *q_out, TY *kv, int b, int t, int hq, \
        int g, int d, int cap, int pos, const int *pos_dev) {                                               \
        rope_qkv_cache<TY, CY>(q, sqb, sqt, k, skb, skt, v, svb, svt, cos, sin, q_out, kv, b, t, hq, g, d, cap, \
                               pos, pos_dev);                                                               \
    }                                                                                                       \
    extern "C" __global__ void rope_heads_##NAME(const TY *x, TY *y, const CY *cos, const CY *sin, int b, int t, \
                                                 int h, int d, long long sb, long long st, int split, int rotate,  \
                                                 float sign) {                                              \
        rope_heads<TY, CY>(x, y, cos, sin, b, t, h, d, sb, st, split, rotate, sign);                        \
    }
ROPE(float, float, f32_f32)
ROPE(bf16, bf16, bf16_bf16)
ROPE(bf16, float, bf16_f32)
