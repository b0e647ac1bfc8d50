// One fused AdamW step over a flat f32 parameter, in place: p, m (exp_avg), v (exp_avg_sq).
//
// Shapes: p, g, m, v [N] f32 contiguous (g may be any float dtype upstream; the caller passes f32).
// Launch: 1-D grid-stride, 8 elements per thread with 16-byte accesses when all four pointers are
//         16-byte aligned (else one), block 256, grid chosen by the caller.
// Numerics: torch.optim.AdamW (single-tensor, decoupled decay, amsgrad off), exactly the op order
//   of train::optim::AdamW::step, every f32 operation rounded on its own (__fmul_rn etc., no FMA
//   contraction), so the result is bit-identical to the CPU reference ops::adamw_step_ref:
//     g ← g·grad_scale                 (gradient clipping's factor, torch's grad.mul_; skipped at 1)
//     p ← p·decay                      (decay = f32(1 − lr·wd); skipped when wd = 0)
//     m ← w < ½ ? m + (g − m)·w : g − (g − m)·(1 − w)          (w = f32(1 − β1), torch's lerp)
//     v ← v·β2 + ((1 − β2)·g)·g
//     p ← p + (m·(−lr/bc1)) / (sqrt(v)/sqrt(bc2) + eps)
//   The scalars are formed in f64 on the host and rounded to f32, as torch does.
#include "common.cuh"

__device__ __forceinline__ void adamw_one(float &p, float g, float &m, float &v, float grad_scale, int decay_on,
                                          float decay, float w, float one_minus_w, float beta2,
                                          float one_minus_beta2, float neg_step_size, float bc2_sqrt, float eps) {
    if (grad_scale != 1.0f) g = __fmul_rn(g, grad_scale);
    if (decay_on) p = __fmul_rn(p, decay);
    const float diff = __fsub_rn(g, m);
    m = w < 0.5f ? __fadd_rn(m, __fmul_rn(diff, w)) : __fsub_rn(g, __fmul_rn(diff, one_minus_w));
    v = __fadd_rn(__fmul_rn(v, beta2), __fmul_rn(__fmul_rn(g, one_minus_beta2), g));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), bc2_sqrt), eps);
    p = __fadd_rn(p, __fdiv_rn(__fmul_rn(m, neg_step_size), denom));
}

extern "C" __global__ void adamw_f32(float *__restrict__ p, const float *__restrict__ g, float *__restrict__ m,
                                     float *__restrict__ v, long long n, float grad_scale, int decay_on,
                                     float decay, float w, float one_minus_w, float beta2, float one_minus_beta2,
                                     float neg_step_size, float bc2_sqrt, float eps) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    long long done = 0;
    if (aligned16(p) && aligned16(g) && aligned16(m) && aligned16(v)) {
        for (long long i = tid; i < n / 8; i += stride) {
            float pp[8], gg[8], mm[8], vv[8];
            load8(p + 8 * i, pp);
            load8(g + 8 * i, gg);
            load8(m + 8 * i, mm);
            load8(v + 8 * i, vv);
#pragma unroll
            for (int j = 0; j < 8; ++j)
                adamw_one(pp[j], gg[j], mm[j], vv[j], grad_scale, decay_on, decay, w, one_minus_w, beta2,
                          one_minus_beta2, neg_step_size, bc2_sqrt, eps);
            store8(p + 8 * i, pp);
            store8(m + 8 * i, mm);
            store8(v + 8 * i, vv);
        }
        done = n / 8 * 8;
    }
    for (long long i = done + tid; i < n; i += stride)
        adamw_one(p[i], g[i], m[i], v[i], grad_scale, decay_on, decay, w, one_minus_w, beta2, one_minus_beta2,
                  neg_step_size, bc2_sqrt, eps);
}
