// Emulator checks of the kernels' logic against plain C++ references (double precision).
// Run: kernels/emu/run.sh. Shapes are small and odd on purpose: partial tiles, GQA, tiny rows.
#include "../src/adamw.cu"
#include "../src/bias_act.cu"
#include "../src/cast.cu"
#include "../src/cross_entropy.cu"
#include "../src/decode_attn.cu"
#include "../src/flash_attn.cu"
#include "../src/flash_wg.cu"
#include "../src/gather.cu"
#include "../src/gemv.cu"
#include "../src/rmsnorm.cu"
#include "../src/rope.cu"
#include "../src/softmax.cu"
#include "../src/swiglu.cu"
#include <cstdio>
#include <string>
#include <random>

static std::mt19937 rng(7);
static std::vector<float> randv(size_t n, float lo = -1, float hi = 1) {
    std::uniform_real_distribution<float> d(lo, hi);
    std::vector<float> v(n);
    for (auto &x : v) x = d(rng);
    return v;
}
template <class T> std::vector<T> cast(const std::vector<float> &v) {
    std::vector<T> r(v.size());
    for (size_t i = 0; i < v.size(); ++i) r[i] = from_f32<T>(v[i]);
    return r;
}
template <class T> std::vector<float> widen(const std::vector<T> &v) {
    std::vector<float> r(v.size());
    for (size_t i = 0; i < v.size(); ++i) r[i] = to_f32(v[i]);
    return r;
}
static int failures = 0;
static void check(const char *what, const std::vector<float> &got, const std::vector<double> &want, double tol) {
    double md = 0, mref = 0;
    for (size_t i = 0; i < got.size(); ++i) {
        const double d = std::fabs(got[i] - want[i]);
        md = std::isnan(d) ? INFINITY : std::max(md, d);  // a NaN must not vanish in max()
        mref = std::max(mref, std::fabs(want[i]));
    }
    const double rel = md / std::max(1.0, mref);
    const bool ok = rel <= tol && std::isfinite(rel);
    if (!ok) failures++;
    std::printf("%-44s max|d| %.3e  rel %.3e  (tol %.1e) %s\n", what, md, rel, tol, ok ? "ok" : "FAIL");
}

// A profiled kernel's counters (phases.cuh; prof [2][n]: cycles, then runs) against what its
// geometry implies: the emulator's clock ticks once a read, so each phase's cycles equal its
// runs, and `expect` gives the runs of some phases ({phase, runs}).
static void check_phases(const char *what, const std::vector<unsigned long long> &prof, int n,
                         std::initializer_list<std::pair<int, unsigned long long>> expect) {
    bool ok = (int)prof.size() == 2 * n;
    for (int p = 0; ok && p < n; ++p) ok = prof[p] == prof[n + p];
    for (auto [phase, runs] : expect) ok = ok && prof[n + phase] == runs;
    if (!ok) {
        failures++;
        for (int p = 0; p < n && (int)prof.size() == 2 * n; ++p)
            std::printf("  phase %d: cycles %llu runs %llu\n", p, prof[p], prof[n + p]);
    }
    std::printf("%-44s phase counts %s\n", what, ok ? "ok" : "FAIL");
}

// The tensor map the TMA attention kernels read x through, as ops::cuda::attention_tensor_map
// encodes it: bf16 [planes][t][d], boxes of `rows` rows × 64 columns, 128-byte swizzle.
static CUtensorMap attention_map(const void *x, int d, int t, int planes, uint32_t rows) {
    const uint64_t dims[3] = {(uint64_t)d, (uint64_t)t, (uint64_t)planes};
    const uint64_t strides[2] = {(uint64_t)d * 2, (uint64_t)t * d * 2};
    const uint32_t box[3] = {64, rows, 1};
    return emu::encode_tiled(x, 3, dims, strides, box, true);
}

template <class T, int D = 32> void test_attention(int B, int hq, int hk, int t, const char *name, double tol, int shift = 0) {
    const float scale = 1.0f / std::sqrt((float)D);
    auto qf = widen(cast<T>(randv((size_t)B * hq * t * D)));
    auto kf = widen(cast<T>(randv((size_t)B * hk * t * D)));
    auto vf = widen(cast<T>(randv((size_t)B * hk * t * D)));
    auto dof = widen(cast<T>(randv((size_t)B * hq * t * D)));
    auto q = cast<T>(qf), k = cast<T>(kf), v = cast<T>(vf), dO = cast<T>(dof);
    if (shift) {  // misalign every input by `shift` elements: the scalar load path
        for (auto *x : {&q, &k, &v, &dO}) x->insert(x->begin(), shift, from_f32<T>(0.f));
    }
    std::vector<T> o((size_t)B * hq * t * D), dk(k.size()), dv(v.size()), dq(q.size());
    std::vector<float> lse((size_t)B * hq * t), delta(lse.size()), dq_acc(q.size(), 0.f);
    const long long rows = (long long)B * hq * t;
    struct Extra {
        const char *what;
        std::vector<float> got;
        bool is_dq;  // else dk or dv, by the name's last letter
    };
    std::vector<Extra> extra;  // the bf16 backward's other kernel variants
    if constexpr (sizeof(T) == 4) {
        const int nq = (t + 63) / 64;
        emu::launch(dim3(nq, hq, B), dim3(128), fwd_smem_bytes<T, D>(), flash_fwd<T, D>, q.data() + shift,
                    k.data() + shift, v.data() + shift, o.data(), lse.data(), hq, hk, t, scale);
        emu::launch(dim3((rows + 3) / 4), dim3(128), 0, flash_bwd_pre<T, D>, o.data(), dO.data() + shift,
                    delta.data(), rows);
        emu::launch(dim3(nq, hk, B), dim3(128), bwd_smem_bytes<T, D>(), flash_bwd<T, D>, q.data() + shift,
                    k.data() + shift, v.data() + shift, dO.data() + shift, lse.data(), delta.data(), dq_acc.data(),
                    dk.data(), dv.data(), hq, hk, t, scale);
    } else {  // the tensor-core kernels: 256 threads, 128-row tiles
        const int nq = (t + TC_BM - 1) / TC_BM, nk = (t + TC_BK - 1) / TC_BK;
        emu::launch(dim3(nq, hq, B), dim3(TC_FWD_THREADS), fwd_tc_smem_bytes<D>(), flash_fwd_tc<D>, q.data() + shift,
                    k.data() + shift, v.data() + shift, o.data(), lse.data(), hq, hk, t, scale);
        emu::launch(dim3((rows + 3) / 4), dim3(128), 0, flash_bwd_pre<T, D>, o.data(), dO.data() + shift,
                    delta.data(), rows);
        emu::launch(dim3(nq, hq, B), dim3(TC_DQ_THREADS), dq_tc_smem_bytes<D>(), flash_bwd_dq_tc<D>, q.data() + shift,
                    k.data() + shift, v.data() + shift, dO.data() + shift, lse.data(), delta.data(), dq.data(), hq,
                    hk, t, scale);
        emu::launch(dim3(nk, hk, B), dim3(TC_THREADS), dkdv_tc_smem_bytes<D>(), flash_bwd_dkdv_tc<D>,
                    q.data() + shift, k.data() + shift, v.data() + shift, dO.data() + shift, lse.data(), delta.data(),
                    dk.data(), dv.data(), hq, hk, t, scale);
        dq_acc = widen(dq);
        // The 64-query dK/dV kernel, without (dQ from the dQ kernel above) and with dQ by atomics.
        std::vector<T> dk2(k.size()), dv2(v.size()), dk3(k.size()), dv3(v.size());
        std::vector<float> dq3(q.size(), 0.f);
        emu::launch(dim3(nk, hk, B), dim3(TC_THREADS), kv64_tc_smem_bytes<D>(), flash_bwd_kv64_tc<D, false>,
                    q.data() + shift, k.data() + shift, v.data() + shift, dO.data() + shift, lse.data(), delta.data(),
                    dk2.data(), dv2.data(), (float *)nullptr, hq, hk, t, scale);
        emu::launch(dim3(nk, hk, B), dim3(TC_THREADS), kv64_tc_smem_bytes<D>(), flash_bwd_kv64_tc<D, true>,
                    q.data() + shift, k.data() + shift, v.data() + shift, dO.data() + shift, lse.data(), delta.data(),
                    dk3.data(), dv3.data(), dq3.data(), hq, hk, t, scale);
        // Same products in the same order as the 32-query kernel: dK and dV bit-identical.
        const bool same = std::memcmp(dk2.data(), dk.data(), dk.size() * sizeof(T)) == 0 &&
                          std::memcmp(dv2.data(), dv.data(), dv.size() * sizeof(T)) == 0 &&
                          std::memcmp(dk3.data(), dk.data(), dk.size() * sizeof(T)) == 0 &&
                          std::memcmp(dv3.data(), dv.data(), dv.size() * sizeof(T)) == 0;
        if (!same) failures++;
        std::printf("attn %s D%d B%d Hq%d Hk%d T%d kv64 dk, dv identical to dkdv's: %s\n", name, D, B, hq, hk, t,
                    same ? "ok" : "FAIL");
        if constexpr (D == 128) {  // the wgmma backward (flash_wg.cu): dq by atomics, dk, dv
            std::vector<T> dk4(k.size()), dv4(v.size());
            std::vector<float> dq4(q.size(), 0.f);
            if (!shift) {  // 16-byte aligned inputs only (the launcher falls back otherwise)
                emu::launch(dim3(nk, hk, B), dim3(WG_THREADS), wg_bwd_smem_bytes<D>(), flash_bwd_wg<D>, q.data(), k.data(),
                            v.data(), dO.data(), lse.data(), delta.data(), dk4.data(), dv4.data(), dq4.data(), hq, hk,
                            t, scale, (unsigned long long *)nullptr);
                // The profiled instantiation: the same outputs, bit for bit, and its phases run
                // as often as the grid's steps say (8 warps a block; warpgroup 1 skips every
                // group head's first step, whose queries all precede its keys).
                std::vector<T> dk5(k.size()), dv5(v.size());
                std::vector<float> dq5(q.size(), 0.f);
                std::vector<unsigned long long> prof(2 * WB_PHASES, 0);
                emu::launch(dim3(nk, hk, B), dim3(WG_THREADS), wg_bwd_smem_bytes<D>(), flash_bwd_wg<D, true>, q.data(),
                            k.data(), v.data(), dO.data(), lse.data(), delta.data(), dk5.data(), dv5.data(), dq5.data(),
                            hq, hk, t, scale, prof.data());
                const bool same = std::memcmp(dk5.data(), dk4.data(), dk4.size() * sizeof(T)) == 0 &&
                                  std::memcmp(dv5.data(), dv4.data(), dv4.size() * sizeof(T)) == 0 &&
                                  std::memcmp(dq5.data(), dq4.data(), dq4.size() * sizeof(float)) == 0;
                if (!same) failures++;
                std::printf("attn %s D%d B%d Hq%d Hk%d T%d profiled wgmma bwd identical: %s\n", name, D, B, hq, hk, t,
                            same ? "ok" : "FAIL");
                unsigned long long blocks = (unsigned long long)nk * hk * B, steps = 0;
                for (int kt = 0; kt < nk; ++kt) steps += (unsigned long long)B * hq * ((t - kt * 128 + 63) / 64);
                const unsigned long long skipped = 4ull * B * hq * nk, worked = 8 * steps - skipped;
                char what[96];
                std::snprintf(what, sizeof what, "attn %s D%d B%d Hq%d Hk%d T%d wgmma bwd", name, D, B, hq, hk, t);
                check_phases(what, prof, WB_PHASES,
                             {{WB_PROLOGUE, 8 * blocks}, {WB_TILE_WAIT, 8 * steps}, {WB_ISSUE, worked}, {WB_WAIT_S, worked},
                              {WB_P, worked}, {WB_WAIT_DP, worked}, {WB_DS, worked}, {WB_SKIPPED, skipped},
                              {WB_BARRIER, 8 * steps}, {WB_DQ, 8 * steps}, {WB_ATOMICS, 8 * steps},
                              {WB_EPILOGUE, 8 * blocks}});
                // The warp-specialised backward fed by TMA (and profiled), over tensor maps as
                // ops::cuda encodes them ([B·H][T][D], boxes of 64 or 128 rows × 64 columns,
                // 128-byte swizzle): the same products in the same order as the wgmma backward, so
                // its dk, dv bit for bit (dq: the same sums, by bulk reduces, in another order).
                auto map = [&](const std::vector<T> &x, int heads, uint32_t rows) {
                    return attention_map(x.data(), D, t, B * heads, rows);
                };
                const CUtensorMap tmq = map(q, hq, 64), tmk = map(k, hk, 128), tmv = map(v, hk, 128),
                                  tmo = map(dO, hq, 64);
                auto tma_bwd = [&]<bool PROF>(const char *label, const char *dq_label, unsigned long long *prof) {
                    std::vector<T> dk6(k.size()), dv6(v.size());
                    std::vector<float> dq6(q.size(), 0.f);
                    emu::launch(dim3(nk, hk, B), dim3(WSB_THREADS), tma_bwd_smem_bytes<D>(), flash_bwd_tma<D, PROF>,
                                &tmq, &tmk, &tmv, &tmo, lse.data(), delta.data(), dk6.data(), dv6.data(), dq6.data(),
                                hq, hk, t, scale, prof);
                    const bool same = std::memcmp(dk6.data(), dk4.data(), dk4.size() * sizeof(T)) == 0 &&
                                      std::memcmp(dv6.data(), dv4.data(), dv4.size() * sizeof(T)) == 0;
                    if (!same) failures++;
                    std::printf("attn %s D%d B%d Hq%d Hk%d T%d %s dk, dv = wgmma bwd's bit for bit: %s\n", name, D, B, hq,
                                hk, t, label, same ? "ok" : "FAIL");
                    extra.push_back({dq_label, dq6, true});
                };
                tma_bwd.template operator()<false>("tma bwd", "tma dq", nullptr);
                // Profiled: besides, each phase as often as the geometry says (8 consumer warps as
                // the wgmma backward's, 4 producer warps, all of which stage lse and Δ each step).
                std::vector<unsigned long long> tprof(2 * WSB_PHASES, 0);
                tma_bwd.template operator()<true>("profiled tma bwd", "profiled tma dq", tprof.data());
                std::snprintf(what, sizeof what, "attn %s D%d B%d Hq%d Hk%d T%d tma bwd", name, D, B, hq, hk, t);
                check_phases(what, tprof, WSB_PHASES,
                             {{WSB_PROLOGUE, 12 * blocks}, {WSB_TILE_WAIT, 8 * steps}, {WSB_ISSUE_WAIT_S, worked},
                              {WSB_P, worked}, {WSB_WAIT_DP, worked}, {WSB_DS, worked}, {WSB_SKIPPED, skipped},
                              {WSB_BARRIER, 8 * steps}, {WSB_DQ, 8 * steps}, {WSB_ATOMICS, 8 * steps},
                              {WSB_EPILOGUE, 8 * blocks}, {WSB_LOAD_WAIT, 4 * steps},
                              {WSB_LOAD_ISSUE, 4 * (blocks + steps)}});
                extra.push_back({"wgmma dq", dq4, true});
                extra.push_back({"wgmma dk", widen(dk4), false});
                extra.push_back({"wgmma dv", widen(dv4), false});
            }
        }
        extra.push_back({"kv64 dk", widen(dk2), false});
        extra.push_back({"kv64 dv", widen(dv2), false});
        extra.push_back({"fused dq", dq3, true});
        extra.push_back({"fused dk", widen(dk3), false});
        extra.push_back({"fused dv", widen(dv3), false});
    }
    // Reference in double.
    std::vector<double> ro(o.size()), rl(lse.size()), rdq(q.size(), 0), rdk(k.size(), 0), rdv(v.size(), 0);
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < hq; ++h) {
            const int kv = h / (hq / hk);
            const float *Q = &qf[((size_t)b * hq + h) * t * D], *K = &kf[((size_t)b * hk + kv) * t * D],
                        *V = &vf[((size_t)b * hk + kv) * t * D], *dO_ = &dof[((size_t)b * hq + h) * t * D];
            for (int i = 0; i < t; ++i) {
                std::vector<double> p(i + 1);
                double mx = -1e300;
                for (int j = 0; j <= i; ++j) {
                    double s = 0;
                    for (int d = 0; d < D; ++d) s += (double)Q[i * D + d] * K[j * D + d];
                    p[j] = s * scale;
                    mx = std::max(mx, p[j]);
                }
                double l = 0;
                for (int j = 0; j <= i; ++j) l += (p[j] = std::exp(p[j] - mx));
                for (int j = 0; j <= i; ++j) p[j] /= l;
                rl[((size_t)b * hq + h) * t + i] = mx + std::log(l);
                std::vector<double> od(D, 0);
                for (int j = 0; j <= i; ++j)
                    for (int d = 0; d < D; ++d) od[d] += p[j] * V[j * D + d];
                double dl = 0;
                for (int d = 0; d < D; ++d) {
                    ro[(((size_t)b * hq + h) * t + i) * D + d] = od[d];
                    dl += od[d] * dO_[i * D + d];
                }
                for (int j = 0; j <= i; ++j) {
                    double dp = 0;
                    for (int d = 0; d < D; ++d) {
                        dp += (double)dO_[i * D + d] * V[j * D + d];
                        rdv[(((size_t)b * hk + kv) * t + j) * D + d] += p[j] * dO_[i * D + d];
                    }
                    const double ds = p[j] * (dp - dl) * scale;
                    for (int d = 0; d < D; ++d) {
                        rdq[(((size_t)b * hq + h) * t + i) * D + d] += ds * K[j * D + d];
                        rdk[(((size_t)b * hk + kv) * t + j) * D + d] += ds * Q[i * D + d];
                    }
                }
            }
        }
    char buf[128];
    std::snprintf(buf, sizeof buf, "attn %s D%d B%d Hq%d Hk%d T%d o", name, D, B, hq, hk, t);
    check(buf, widen(o), ro, tol);
    std::snprintf(buf, sizeof buf, "attn %s D%d B%d Hq%d Hk%d T%d lse", name, D, B, hq, hk, t);
    check(buf, lse, rl, tol);
    std::snprintf(buf, sizeof buf, "attn %s D%d B%d Hq%d Hk%d T%d dq", name, D, B, hq, hk, t);
    check(buf, dq_acc, rdq, tol);
    std::snprintf(buf, sizeof buf, "attn %s D%d B%d Hq%d Hk%d T%d dk", name, D, B, hq, hk, t);
    check(buf, widen(dk), rdk, tol);
    std::snprintf(buf, sizeof buf, "attn %s D%d B%d Hq%d Hk%d T%d dv", name, D, B, hq, hk, t);
    check(buf, widen(dv), rdv, tol);
    for (const Extra &e : extra) {
        std::snprintf(buf, sizeof buf, "attn %s D%d B%d Hq%d Hk%d T%d %s", name, D, B, hq, hk, t, e.what);
        const char last = e.what[std::strlen(e.what) - 1];
        check(buf, e.got, e.is_dq ? rdq : last == 'k' ? rdk : rdv, tol);
    }
}

// The bf16 forwards alone, causal or not: flash_fwd_tc<D, causal> (mma.sync) and, for D 64 and
// 128, flash_fwd_wg<D, 64, causal> (wgmma, flash_wg.cu; at D 128 also its 128-key tiles): o and
// lse against double precision.
template <int D> void test_forward(int B, int hq, int hk, int t, bool causal, double tol) {
    const float scale = 1.0f / std::sqrt((float)D);
    auto qf = widen(cast<bf16>(randv((size_t)B * hq * t * D)));
    auto kf = widen(cast<bf16>(randv((size_t)B * hk * t * D)));
    auto vf = widen(cast<bf16>(randv((size_t)B * hk * t * D)));
    auto q = cast<bf16>(qf), k = cast<bf16>(kf), v = cast<bf16>(vf);
    std::vector<double> ro((size_t)B * hq * t * D), rl((size_t)B * hq * t);
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < hq; ++h) {
            const int kv = h / (hq / hk);
            const float *Q = &qf[((size_t)b * hq + h) * t * D], *K = &kf[((size_t)b * hk + kv) * t * D],
                        *V = &vf[((size_t)b * hk + kv) * t * D];
            for (int i = 0; i < t; ++i) {
                const int n = causal ? i + 1 : t;  // keys this query sees
                std::vector<double> p(n);
                double mx = -1e300, l = 0;
                for (int j = 0; j < n; ++j) {
                    double s = 0;
                    for (int d = 0; d < D; ++d) s += (double)Q[i * D + d] * K[j * D + d];
                    mx = std::max(mx, p[j] = s * scale);
                }
                for (int j = 0; j < n; ++j) l += (p[j] = std::exp(p[j] - mx));
                rl[((size_t)b * hq + h) * t + i] = mx + std::log(l);
                for (int d = 0; d < D; ++d) {
                    double od = 0;
                    for (int j = 0; j < n; ++j) od += p[j] / l * V[j * D + d];
                    ro[(((size_t)b * hq + h) * t + i) * D + d] = od;
                }
            }
        }
    auto run = [&](const char *kernel, auto launch) {
        std::vector<bf16> o(ro.size());
        std::vector<float> lse(rl.size());
        launch(o.data(), lse.data());
        char buf[128];
        const char *mask = causal ? "causal" : "full";
        std::snprintf(buf, sizeof buf, "fwd %s %s D%d B%d Hq%d Hk%d T%d o", kernel, mask, D, B, hq, hk, t);
        check(buf, widen(o), ro, tol);
        std::snprintf(buf, sizeof buf, "fwd %s %s D%d B%d Hq%d Hk%d T%d lse", kernel, mask, D, B, hq, hk, t);
        check(buf, lse, rl, tol);
    };
    run("mma.sync", [&](bf16 *o, float *lse) {
        const int nq = (t + TC_BM - 1) / TC_BM;
        auto kernel = causal ? flash_fwd_tc<D, true> : flash_fwd_tc<D, false>;
        emu::launch(dim3(nq, hq, B), dim3(TC_FWD_THREADS), fwd_tc_smem_bytes<D>(), kernel, q.data(), k.data(),
                    v.data(), o, lse, hq, hk, t, scale);
    });
    const int nq = (t + WG_BM - 1) / WG_BM;
    std::vector<bf16> o128;  // the 128-key wgmma kernel's outputs, for the warp-specialised one
    std::vector<float> lse128;
    auto wgmma = [&]<int BN>(const char *name) {
        std::vector<bf16> o0;
        std::vector<float> lse0;
        run(name, [&](bf16 *o, float *lse) {
            auto kernel = causal ? flash_fwd_wg<D, BN, true> : flash_fwd_wg<D, BN, false>;
            emu::launch(dim3(nq, hq, B), dim3(WG_THREADS), wg_fwd_smem_bytes<D, BN>(), kernel, q.data(), k.data(),
                        v.data(), o, lse, hq, hk, t, scale, (unsigned long long *)nullptr);
            o0.assign(o, o + ro.size());
            lse0.assign(lse, lse + rl.size());
        });
        if (BN == 128) o128 = o0, lse128 = lse0;
        if (!causal || D != 128) return;
        // The profiled instantiation (causal, D 128): the same outputs, bit for bit, and every
        // per-tile phase run once a key tile by each of a block's 8 warps.
        std::vector<bf16> o(ro.size());
        std::vector<float> lse(rl.size());
        std::vector<unsigned long long> prof(2 * WF_PHASES, 0);
        emu::launch(dim3(nq, hq, B), dim3(WG_THREADS), wg_fwd_smem_bytes<D, BN>(), flash_fwd_wg<D, BN, true, true>,
                    q.data(), k.data(), v.data(), o.data(), lse.data(), hq, hk, t, scale, prof.data());
        const bool same = std::memcmp(o.data(), o0.data(), o.size() * sizeof(bf16)) == 0 &&
                          std::memcmp(lse.data(), lse0.data(), lse.size() * sizeof(float)) == 0;
        if (!same) failures++;
        std::printf("fwd %s causal D%d B%d Hq%d Hk%d T%d profiled identical: %s\n", name, D, B, hq, hk, t,
                    same ? "ok" : "FAIL");
        const unsigned long long blocks = (unsigned long long)nq * hq * B;
        unsigned long long tiles = 0;
        for (int i = 0; i < nq; ++i) tiles += (unsigned long long)B * hq * ((std::min((i + 1) * WG_BM, t) + BN - 1) / BN);
        char what[96];
        std::snprintf(what, sizeof what, "fwd %s causal D%d B%d Hq%d Hk%d T%d", name, D, B, hq, hk, t);
        check_phases(what, prof, WF_PHASES,
                     {{WF_PROLOGUE, 8 * blocks}, {WF_TILE_WAIT, 8 * tiles}, {WF_ISSUE, 8 * tiles}, {WF_WAIT_S, 8 * tiles},
                      {WF_SOFTMAX, 8 * tiles}, {WF_WAIT_PV, 8 * tiles}, {WF_RESCALE, 8 * tiles},
                      {WF_LAST_PV, 8 * blocks}, {WF_EPILOGUE, 8 * blocks}});
    };
    if constexpr (D == 64 || D == 128) wgmma.template operator()<64>("wgmma");
    if constexpr (D == 128) wgmma.template operator()<128>("wgmma128");
    if constexpr (D == 128) {
        // The warp-specialised forward fed by TMA (tensor maps over [B·H][T][D], boxes of 128 rows
        // × 64 columns, 128-byte swizzle, as ops::cuda encodes them): the 128-key kernel's
        // products in the same order over other tile layouts, so the same bits; and the profiled
        // kernel's phases (12 warps a block: 8 consumers, and one producer warp that loads).
        auto map = [&](const std::vector<bf16> &x, int heads) { return attention_map(x.data(), D, t, B * heads, 128); };
        const CUtensorMap tmq = map(q, hq), tmk = map(k, hk), tmv = map(v, hk);
        auto tma = [&]<bool PROF>(const char *name) {
            if (!causal && PROF) return;
            std::vector<bf16> o4(ro.size());
            std::vector<float> lse4(rl.size());
            std::vector<unsigned long long> prof(2 * WS_PHASES, 0);
            auto kernel = causal ? flash_fwd_tma<D, true, PROF> : flash_fwd_tma<D, false, PROF>;
            emu::launch(dim3(nq, hq, B), dim3(WS_THREADS), tma_fwd_smem_bytes<D>(), kernel, &tmq, &tmk, &tmv,
                        o4.data(), lse4.data(), hq, hk, t, scale,
                        PROF ? prof.data() : (unsigned long long *)nullptr);
            const bool same = std::memcmp(o4.data(), o128.data(), o4.size() * sizeof(bf16)) == 0 &&
                              std::memcmp(lse4.data(), lse128.data(), lse4.size() * sizeof(float)) == 0;
            if (!same) failures++;
            std::printf("fwd %s %s D%d B%d Hq%d Hk%d T%d = wgmma128 bit for bit: %s\n", name,
                        causal ? "causal" : "full", D, B, hq, hk, t, same ? "ok" : "FAIL");
            if (!PROF) return;
            const unsigned long long blocks = (unsigned long long)nq * hq * B;
            unsigned long long tiles = 0;
            for (int i = 0; i < nq; ++i) tiles += (unsigned long long)B * hq * ((std::min((i + 1) * WG_BM, t) + 127) / 128);
            char what[96];
            std::snprintf(what, sizeof what, "fwd tma causal D%d B%d Hq%d Hk%d T%d", D, B, hq, hk, t);
            check_phases(what, prof, WS_PHASES,
                         {{WS_PROLOGUE, 12 * blocks}, {WS_TILE_WAIT, 8 * tiles}, {WS_TURN, 8 * tiles},
                          {WS_ISSUE_WAIT_S, 8 * tiles}, {WS_SOFTMAX, 8 * tiles}, {WS_WAIT_PV, 8 * tiles},
                          {WS_RESCALE, 8 * tiles}, {WS_LAST_PV, 8 * blocks}, {WS_EPILOGUE, 8 * blocks},
                          {WS_LOAD_WAIT, 2 * tiles}, {WS_LOAD_ISSUE, blocks + 2 * tiles}});
        };
        tma.template operator()<false>("tma");
        tma.template operator()<true>("profiled tma");
    }
}

// flash_wg.cu's wgmma_probe on small integers (every product and sum exact in f32, s exact in
// bf16): each of its seven outputs equal to its plain definition.
void test_wgmma_probe() {
    std::uniform_int_distribution<int> d(-2, 2);
    auto ints = [&](size_t n) {
        std::vector<float> x(n);
        for (auto &e : x) e = (float)d(rng);
        return x;
    };
    auto af = ints(64 * 64), bf = ints(64 * 64), cf = ints(64 * 64), vf = ints(64 * 128);
    auto a = cast<bf16>(af), b = cast<bf16>(bf), c = cast<bf16>(cf), v = cast<bf16>(vf);
    std::vector<float> out(10 * 64 * 64);
    emu::launch(dim3(1), dim3(WG_THREADS), WG_PROBE_SMEM, wgmma_probe, a.data(), b.data(), c.data(), v.data(),
                out.data());
    std::vector<double> rs(64 * 64), ro(64 * 128), rp(64 * 64), ru(64 * 64), rw(64 * 128);
    for (int m = 0; m < 64; ++m)
        for (int n = 0; n < 64; ++n)
            for (int k = 0; k < 64; ++k) {
                rs[m * 64 + n] += (double)af[m * 64 + k] * bf[n * 64 + k];
                ru[m * 64 + n] += (double)af[k * 64 + m] * vf[k * 128 + 64 + n];
                rw[m * 128 + n] += (double)af[m * 64 + k] * bf[n * 64 + k];
                rw[m * 128 + 64 + n] += (double)af[m * 64 + k] * cf[n * 64 + k];
            }
    for (int m = 0; m < 64; ++m)
        for (int k = 0; k < 64; ++k) {
            const double pk = rs[m * 64 + k];  // |s| ≤ 256: exact in bf16
            for (int n = 0; n < 128; ++n) ro[m * 128 + n] += pk * vf[k * 128 + n];
            for (int n = 0; n < 64; ++n) rp[m * 64 + n] += pk * cf[k * 64 + n];
        }
    auto part = [&](size_t at, size_t n) { return std::vector<float>(out.begin() + at, out.begin() + at + n); };
    check("wgmma probe s = a bT (ss, K-major)", part(0, 4096), rs, 0);
    check("wgmma probe o = s v (rs, MN-major B, n128)", part(4096, 8192), ro, 0);
    check("wgmma probe p = s c (rs, MN-major B, n64)", part(12288, 4096), rp, 0);
    check("wgmma probe u = aT v[:, 64:] (ss, MN-major A, B)", part(16384, 4096), ru, 0);
    check("wgmma probe q = a bT (rs, A from wg_load_a, K-major B)", part(20480, 4096), rs, 0);
    check("wgmma probe w = a [b; c]T (rs, A from wg_load_a, K-major B, n128)", part(24576, 8192), rw, 0);
    check("wgmma probe x = a [b; c]T (ss, K-major, n128)", part(32768, 8192), rw, 0);
}

template <class T> void test_rmsnorm(int rows, int h, double tol) {
    auto xf = widen(cast<T>(randv((size_t)rows * h))), wf = widen(cast<T>(randv(h, 0.5, 1.5)));
    auto gf = widen(cast<T>(randv((size_t)rows * h)));
    auto x = cast<T>(xf), w = cast<T>(wf), g = cast<T>(gf);
    std::vector<T> y(x.size()), dx(x.size());
    std::vector<float> dw(h, 0.f);
    const int bs = std::min(1024, ((h + 15) / 16 + 31) / 32 * 32);  // as ops::cuda's rms_block
    const int bs_bwd = std::min(512, bs);                               // and rms_block_bwd
    emu::launch(dim3(rows), dim3(bs), 0, rmsnorm_fwd_any<T>, x.data(), w.data(), y.data(), h, 1e-5f);
    emu::launch(dim3(std::min(rows, 3)), dim3(bs_bwd), (size_t)h * 4, rmsnorm_bwd_any<T>, x.data(), w.data(), g.data(),
                (const T *)nullptr, dx.data(), dw.data(), rows, h, 1e-5f);
    // With the skip connection's gradient: the same dx, plus skip, rounded once more (exact).
    auto skip = cast<T>(randv((size_t)rows * h));
    std::vector<T> dx_skip(x.size());
    std::vector<float> dw2(h, 0.f);
    emu::launch(dim3(2), dim3(bs_bwd), (size_t)h * 4, rmsnorm_bwd_any<T>, x.data(), w.data(), g.data(),
                (const T *)skip.data(), dx_skip.data(), dw2.data(), rows, h, 1e-5f);
    std::vector<double> want_skip(x.size());
    for (size_t i = 0; i < x.size(); ++i) want_skip[i] = to_f32(from_f32<T>(to_f32(skip[i]) + to_f32(dx[i])));
    std::vector<double> ry(x.size()), rdx(x.size()), rdw(h, 0);
    for (int r = 0; r < rows; ++r) {
        double ss = 0, gwn = 0;
        for (int i = 0; i < h; ++i) ss += (double)xf[r * h + i] * xf[r * h + i];
        const double rr = 1 / std::sqrt(ss / h + 1e-5);
        for (int i = 0; i < h; ++i) {
            ry[r * h + i] = wf[i] * to_f32(from_f32<T>((float)(xf[r * h + i] * rr)));
            gwn += (double)gf[r * h + i] * wf[i] * xf[r * h + i] * rr;
            rdw[i] += gf[r * h + i] * xf[r * h + i] * rr;
        }
        for (int i = 0; i < h; ++i)
            rdx[r * h + i] = (gf[r * h + i] * wf[i] - xf[r * h + i] * rr * gwn / h) * rr;
    }
    char buf[64];
    std::snprintf(buf, sizeof buf, "rmsnorm %zu-byte R%d H%d y", sizeof(T), rows, h);
    check(buf, widen(y), ry, tol);
    std::snprintf(buf, sizeof buf, "rmsnorm %zu-byte R%d H%d dx", sizeof(T), rows, h);
    check(buf, widen(dx), rdx, tol);
    std::snprintf(buf, sizeof buf, "rmsnorm %zu-byte R%d H%d dw", sizeof(T), rows, h);
    check(buf, dw, rdw, tol);
    std::snprintf(buf, sizeof buf, "rmsnorm %zu-byte R%d H%d dx + skip", sizeof(T), rows, h);
    check(buf, widen(dx_skip), want_skip, 0.0);
}

void test_softmax_ce(int rows, int n) {
    auto x = randv((size_t)rows * n, -4, 4);
    std::vector<float> y(x.size()), ys(x.size()), loss(rows), dl(x.size());
    std::vector<long long> tg(rows);
    for (int r = 0; r < rows; ++r) tg[r] = r == 1 ? -100 : (r * 7919) % n;
    const int bs = std::min(256, (n + 31) / 32 * 32);
    const float scale = -0.37f;  // a negative scale: the max must be taken of scale·x
    emu::launch(dim3(rows), dim3(bs), 0, softmax<float>, x.data(), y.data(), n, 1.0f);
    emu::launch(dim3(rows), dim3(bs), 0, softmax<float>, x.data(), ys.data(), n, scale);
    emu::launch(dim3(rows), dim3(bs), 0, cross_entropy<float>, x.data(), tg.data(), loss.data(), dl.data(), n,
                -100LL);
    std::vector<double> ry(x.size()), rys(x.size()), rl(rows), rdl(x.size());
    for (int r = 0; r < rows; ++r) {
        double ms = -1e300, ss = 0;
        for (int j = 0; j < n; ++j) ms = std::max(ms, (double)scale * x[r * n + j]);
        for (int j = 0; j < n; ++j) ss += std::exp((double)scale * x[r * n + j] - ms);
        for (int j = 0; j < n; ++j) rys[r * n + j] = std::exp((double)scale * x[r * n + j] - ms) / ss;
        double m = -1e300, s = 0;
        for (int j = 0; j < n; ++j) m = std::max(m, (double)x[r * n + j]);
        for (int j = 0; j < n; ++j) s += std::exp(x[r * n + j] - m);
        for (int j = 0; j < n; ++j) {
            ry[r * n + j] = std::exp(x[r * n + j] - m) / s;
            rdl[r * n + j] = tg[r] == -100 ? 0 : ry[r * n + j] - (j == tg[r]);
        }
        rl[r] = tg[r] == -100 ? 0 : m + std::log(s) - x[r * n + tg[r]];
    }
    char buf[64];
    std::snprintf(buf, sizeof buf, "softmax R%d N%d", rows, n);
    check(buf, y, ry, 1e-6);
    std::snprintf(buf, sizeof buf, "softmax scale -0.37 R%d N%d", rows, n);
    check(buf, ys, rys, 1e-6);
    std::snprintf(buf, sizeof buf, "cross-entropy R%d V%d loss", rows, n);
    check(buf, loss, rl, 1e-5);
    std::snprintf(buf, sizeof buf, "cross-entropy R%d V%d dlogits", rows, n);
    check(buf, dl, rdl, 1e-6);
}

void test_elementwise() {
    const long long n = 8 * 37 + 5;
    auto gf = widen(cast<bf16>(randv(n, -6, 6))), uf = widen(cast<bf16>(randv(n))), df = widen(cast<bf16>(randv(n)));
    auto g = cast<bf16>(gf), u = cast<bf16>(uf), d = cast<bf16>(df);
    std::vector<bf16> y(n), dgd(2 * n);
    emu::launch(dim3(3), dim3(64), 0, swiglu_fwd<bf16>, g.data(), u.data(), y.data(), n);
    emu::launch(dim3(3), dim3(64), 0, swiglu_bwd<bf16>, g.data(), u.data(), d.data(), dgd.data(), n);
    std::vector<double> ry(n), rdgd(2 * n);
    for (long long i = 0; i < n; ++i) {
        const double sg = 1 / (1 + std::exp(-(double)gf[i]));
        ry[i] = gf[i] * sg * uf[i];
        rdgd[i] = df[i] * uf[i] * sg * (1 + gf[i] * (1 - sg));
        rdgd[n + i] = df[i] * gf[i] * sg;
    }
    check("swiglu bf16 fwd (vector + tail)", widen(y), ry, 1e-2);
    check("swiglu bf16 bwd (vector + tail)", widen(dgd), rdgd, 1e-2);

    // AdamW: the vector path (aligned) and the scalar path (shifted by one) agree bit for bit.
    auto p0 = randv(n), g0 = randv(n, -0.1f, 0.1f);
    std::vector<float> pa = p0, ma(n, 0.01f), va(n, 0.02f), pb(n + 1), mb(n + 1, 0.01f), vb(n + 1, 0.02f), gb(n + 1);
    std::copy(p0.begin(), p0.end(), pb.begin() + 1);
    std::copy(g0.begin(), g0.end(), gb.begin() + 1);
    emu::launch(dim3(2), dim3(64), 0, adamw_f32, pa.data(), g0.data(), ma.data(), va.data(), n, 0.37f, 1, 0.9999f, 0.1f,
                0.9f, 0.95f, 0.05f, -3e-4f, 0.2f, 1e-8f);
    emu::launch(dim3(2), dim3(64), 0, adamw_f32, pb.data() + 1, gb.data() + 1, mb.data() + 1, vb.data() + 1, n, 0.37f, 1,
                0.9999f, 0.1f, 0.9f, 0.95f, 0.05f, -3e-4f, 0.2f, 1e-8f);
    int diff = 0;
    for (long long i = 0; i < n; ++i) diff += pa[i] != pb[i + 1] || ma[i] != mb[i + 1] || va[i] != vb[i + 1];
    if (diff) failures++;
    std::printf("%-44s %d elements differ %s\n", "adamw vector vs scalar path", diff, diff ? "FAIL" : "ok");

    // Cross-entropy backward scaling, V % 8 = 0 (vector) and V = 7 (scalar).
    for (int v : {16, 7}) {
        const int rows = 5;
        auto dl = randv((size_t)rows * v), gl = randv(rows);
        std::vector<float> dx(dl.size());
        emu::launch(dim3(2), dim3(64), 0, cross_entropy_bwd<float>, dl.data(), gl.data(), dx.data(),
                    (long long)dl.size(), v);
        std::vector<double> want(dl.size());
        for (size_t i = 0; i < dl.size(); ++i) want[i] = (double)dl[i] * gl[i / v];
        check(v == 16 ? "cross-entropy bwd scale V16" : "cross-entropy bwd scale V7", dx, want, 1e-6);
    }
}

// y = x · wᵀ for M rows through the decode GEMV: rows of x and w padded (ldx > K, ldw > K) and
// x offset by a whole chunk, N not a multiple of the block's 4 columns, K below one lane sweep
// (33 chunks) and above two of the bf16 kernel's 8-chunk unrolled steps (257 chunks). MODE adds
// the residual r [M, N] (rounded product + r) or takes w as [2N, K] gate/up rows (SwiGLU of the
// two rounded products).
template <class T, int M, int MODE = GEMV_PLAIN> void test_gemv(int n, int k, double tol) {
    const int ldx = k + 8, ldw = k + 16, rows = MODE == GEMV_SWIGLU ? 2 * n : n;
    auto x = cast<T>(randv((size_t)M * ldx + 8)), w = cast<T>(randv((size_t)rows * ldw)), r = cast<T>(randv((size_t)M * n));
    std::vector<T> y((size_t)M * n);
    const T *xp = x.data() + 8;
    const int per_block = GEMV_WARPS * gemv_cols(M);
    emu::launch(dim3((n + per_block - 1) / per_block), dim3(32 * GEMV_WARPS), 0, gemv<T, M, MODE>, xp,
                (long long)ldx, (const T *)w.data(), (long long)ldw, (const T *)r.data(), y.data(), n, k,
                GemvRms<T>{});
    auto dot = [&](int m, int row) {
        double s = 0;
        for (int i = 0; i < k; ++i) s += (double)to_f32(xp[m * ldx + i]) * to_f32(w[(size_t)row * ldw + i]);
        return s;
    };
    std::vector<double> want((size_t)M * n);
    for (int m = 0; m < M; ++m)
        for (int j = 0; j < n; ++j) {
            const size_t o = (size_t)m * n + j;
            const double p = dot(m, j);
            if (MODE == GEMV_PLAIN) want[o] = p;
            if (MODE == GEMV_ADD) want[o] = p + to_f32(r[o]);
            if (MODE == GEMV_SWIGLU) want[o] = p / (1 + std::exp(-p)) * dot(m, n + j);
        }
    char buf[96];
    std::snprintf(buf, sizeof buf, "gemv%s %s M%d N%d K%d", MODE == GEMV_ADD ? " + r" : MODE == GEMV_SWIGLU ? " swiglu" : "",
                  sizeof(T) == 4 ? "f32" : "bf16", M, n, k);
    check(buf, widen(y), want, tol);
}

// gemv_norm (MODE plain or SwiGLU): bit for bit rmsnorm.cu's kernel on x, then the GEMV.
template <class T, int M, int MODE> void test_gemv_norm(int n, int k) {
    constexpr int R = MODE == GEMV_SWIGLU ? 2 : 1;
    auto x = cast<T>(randv((size_t)M * k, -2, 2)), w = cast<T>(randv((size_t)R * n * k));
    auto nw = cast<T>(randv(k, 0.5, 1.5));
    std::vector<T> xn((size_t)M * k), y_ref((size_t)M * n), y(y_ref.size(), from_f32<T>(NAN));
    const int vb = std::min(1024, ((k + 15) / 16 + 31) / 32 * 32);  // ops::cuda's rms_block(k)
    emu::launch(dim3(M), dim3(vb), 0, rmsnorm_fwd_any<T>, (const T *)x.data(), (const T *)nw.data(), xn.data(), k,
                1e-5f);
    const int per_block = GEMV_WARPS * gemv_cols(M), blocks = (n + per_block - 1) / per_block;
    emu::launch(dim3(blocks), dim3(32 * GEMV_WARPS), 0, gemv<T, M, MODE>, (const T *)xn.data(), (long long)k,
                (const T *)w.data(), (long long)k, (const T *)nullptr, y_ref.data(), n, k, GemvRms<T>{});
    emu::launch(dim3(blocks), dim3(32 * GEMV_WARPS), M * k * sizeof(T), gemv<T, M, MODE, true>, (const T *)x.data(),
                (long long)k, (const T *)w.data(), (long long)k, (const T *)nullptr, y.data(), n, k,
                GemvRms<T>{nw.data(), 1e-5f, vb});
    bool same = true;
    for (size_t i = 0; i < y.size(); ++i) same = same && to_f32(y[i]) == to_f32(y_ref[i]);
    if (!same) failures++;
    std::printf("%-44s %s\n",
                (std::string("RMSNorm + gemv") + (MODE == GEMV_SWIGLU ? " + SwiGLU " : " ") +
                 (sizeof(T) == 4 ? "f32" : "bf16") + " M" + std::to_string(M) + " N" + std::to_string(n) + " K" +
                 std::to_string(k) + " = rmsnorm, gemv")
                    .c_str(),
                same ? "ok" : "FAIL");
}

// One query position per sequence against a KV cache of capacity `cap` > S (strided views),
// GQA, one split or several with a partial last one (then the combine kernel), S spread over
// `split_want` splits as ops::attention::decode::splits spreads it.
// `device_s`: S read from device memory and the grid sized for the capacity (a CUDA-graph step),
// so splits past S are empty and must not disturb the combine.
template <class T, int D>
void test_decode_attn(int B, int hq, int hk, int s, int cap, double tol, bool device_s = false, int split_want = 1) {
    const float scale = 1.0f / std::sqrt((float)D);
    auto q = cast<T>(randv((size_t)B * hq * D));
    auto k = cast<T>(randv((size_t)B * hk * cap * D, -2, 2)), v = cast<T>(randv((size_t)B * hk * cap * D));
    const long long sh = (long long)cap * D, sb = hk * sh;
    const int ns = device_s ? std::max(split_want, (cap + DECODE_CHUNK - 1) / DECODE_CHUNK)
                            : (s + decode_chunk(s, split_want) - 1) / decode_chunk(s, split_want);
    const int s_dev = s;
    std::vector<T> out((size_t)B * hq * D);
    std::vector<float> po((size_t)B * hq * ns * D), pm((size_t)B * hq * ns), pl(pm.size());
    emu::launch(dim3(hq, B, ns), dim3(32 * DECODE_WARPS), 0, decode_attn<T, D>, (const T *)q.data(),
                (const T *)k.data(), (const T *)v.data(), sb, sh, out.data(), po.data(), pm.data(), pl.data(), hq, hk,
                device_s ? -1 : s, split_want, scale, device_s ? &s_dev : (const int *)nullptr, (unsigned *)nullptr);
    if (ns > 1)
        emu::launch(dim3(hq, B), dim3((D + 31) / 32 * 32), 0, decode_attn_combine<T>, (const float *)po.data(),
                    (const float *)pm.data(), (const float *)pl.data(), out.data(), hq, D, ns);
    // The same launch with counts: the last split of each row combines, bit for bit as the
    // combine kernel, and leaves the counts at zero. Twice, as a graph replays it: blocks in
    // index order, then in reverse (so that the last to finish is another split), the partials
    // and the output poisoned before each (a premature combine would read or leave NaN).
    std::vector<unsigned> counts((size_t)B * hq, 0);
    std::vector<T> out_counted(out.size());
    bool same = true;
    for (int rep = 0; rep < 2; ++rep) {
        for (auto *part : {&po, &pm, &pl}) std::fill(part->begin(), part->end(), NAN);
        std::fill(out_counted.begin(), out_counted.end(), from_f32<T>(NAN));
        emu::reverse_blocks = rep == 1;
        emu::launch(dim3(hq, B, ns), dim3(32 * DECODE_WARPS), 0, decode_attn<T, D>, (const T *)q.data(),
                    (const T *)k.data(), (const T *)v.data(), sb, sh, out_counted.data(), po.data(), pm.data(),
                    pl.data(), hq, hk, device_s ? -1 : s, split_want, scale,
                    device_s ? &s_dev : (const int *)nullptr, counts.data());
        emu::reverse_blocks = false;
        same = same && std::all_of(counts.begin(), counts.end(), [](unsigned c) { return c == 0; });
        for (size_t i = 0; i < out.size(); ++i) same = same && to_f32(out[i]) == to_f32(out_counted[i]);
    }
    if (!same) {
        failures++;
        std::printf("decode attention D%d S%d %d splits: the counted launch differs from the combine kernel's "
                    "(or left a count)\n", D, s, ns);
    }
    std::vector<double> want(out.size());
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < hq; ++h) {
            const size_t kv = b * sb + (size_t)(h / (hq / hk)) * sh;
            std::vector<double> sc(s);
            double mx = -INFINITY, den = 0;
            for (int j = 0; j < s; ++j) {
                double d = 0;
                for (int i = 0; i < D; ++i) d += (double)to_f32(q[((size_t)b * hq + h) * D + i]) * to_f32(k[kv + (size_t)j * D + i]);
                sc[j] = d * scale;
                mx = std::max(mx, sc[j]);
            }
            for (int j = 0; j < s; ++j) den += sc[j] = std::exp(sc[j] - mx);
            for (int i = 0; i < D; ++i) {
                double o = 0;
                for (int j = 0; j < s; ++j) o += sc[j] * to_f32(v[kv + (size_t)j * D + i]);
                want[((size_t)b * hq + h) * D + i] = o / den;
            }
        }
    char buf[96];
    std::snprintf(buf, sizeof buf, "decode attention %s D%d Hq%d Hk%d S%d, %d splits%s", sizeof(T) == 4 ? "f32" : "bf16", D,
                  hq, hk, s, ns, device_s ? " (device S, capacity grid)" : "");
    check(buf, widen(out), want, tol);
}

// q, k, v as column views of one fused [B, T, (Hq + 2G)·D] product, rotated / copied into
// q_out and a [2, B, G, cap, D] cache at pos..pos+T; cache rows outside stay as they were.
// `device_pos`: the position read from device memory and the tables whole (absolute rows).
template <class T, class C>
void test_rope_qkv_cache(int B, int t, int hq, int g, int d, int cap, int pos, bool device_pos = false) {
    const int half = d / 2, width = (hq + 2 * g) * d;
    auto y = cast<T>(randv((size_t)B * t * width));
    const int row0 = device_pos ? pos : 0, table_rows = device_pos ? cap : t;
    auto cs = cast<C>(randv((size_t)table_rows * half)), sn = cast<C>(randv((size_t)table_rows * half));
    const T sentinel = from_f32<T>(7.f);
    std::vector<T> q_out((size_t)B * hq * t * d), kv((size_t)2 * B * g * cap * d, sentinel);
    const long long sb = (long long)t * width, st = width;
    const long long pairs = (long long)B * t * (hq + 2 * g) * half;
    emu::launch(dim3((unsigned)std::min<long long>((pairs + 63) / 64, 3)), dim3(64), 0, rope_qkv_cache<T, C>,
                (const T *)y.data(), sb, st, (const T *)y.data() + hq * d, sb, st, (const T *)y.data() + (hq + g) * d, sb,
                st, (const C *)cs.data(), (const C *)sn.data(), q_out.data(), kv.data(), B, t, hq, g, d, cap,
                device_pos ? -1 : pos, device_pos ? &pos : (const int *)nullptr);
    std::vector<double> wq(q_out.size()), wkv(kv.size(), 7.0);
    auto rot = [&](const T *src, int p, int i, bool second) {
        const float a = to_f32(src[i]), b = to_f32(src[i + half]);
        const float c = to_f32(cs[(row0 + p) * half + i]), s = to_f32(sn[(row0 + p) * half + i]);
        return (double)to_f32(from_f32<T>(second ? b * c + a * s : a * c - b * s));
    };
    for (int b = 0; b < B; ++b)
        for (int p = 0; p < t; ++p) {
            const T *row = y.data() + b * sb + p * st;
            for (int h = 0; h < hq + 2 * g; ++h)
                for (int i = 0; i < half; ++i) {
                    const T *src = row + (size_t)h * d;
                    if (h < hq) {
                        const size_t o = (((size_t)b * hq + h) * t + p) * d;
                        wq[o + i] = rot(src, p, i, false), wq[o + i + half] = rot(src, p, i, true);
                    } else if (h < hq + g) {
                        const size_t o = (((size_t)b * g + h - hq) * cap + pos + p) * d;
                        wkv[o + i] = rot(src, p, i, false), wkv[o + i + half] = rot(src, p, i, true);
                    } else {
                        const size_t o = ((((size_t)B + b) * g + h - hq - g) * cap + pos + p) * d;
                        wkv[o + i] = to_f32(src[i]), wkv[o + i + half] = to_f32(src[i + half]);
                    }
                }
        }
    char buf[96];
    std::snprintf(buf, sizeof buf, "rope_qkv_cache %s q B%d T%d Hq%d G%d D%d", sizeof(T) == 4 ? "f32" : "bf16", B, t, hq, g, d);
    check(buf, widen(q_out), wq, 0.0);
    std::snprintf(buf, sizeof buf, "rope_qkv_cache %s cache pos %d%s cap %d", sizeof(T) == 4 ? "f32" : "bf16", pos,
                  device_pos ? " (device)" : "", cap);
    check(buf, widen(kv), wkv, 0.0);
}

// Heads between [B, T, H·D] (rows `st` apart, st ≥ H·D: a column view of a wider product) and
// [B, H, T, D], rotated by sign·θ or moved as they are, both directions; `offset` elements of
// misalignment take the one-element path. Exact: the same float operations in the same order.
template <class T, class C>
void test_rope_heads(int B, int t, int h, int d, int extra, bool split, bool rotate, float sign, int offset = 0) {
    const int half = d / 2;
    const long long st = (long long)h * d + extra, sb = (long long)t * st;
    const size_t heads_n = (size_t)B * h * t * d, tokens_n = (size_t)B * sb;
    auto cs = cast<C>(randv((size_t)t * half)), sn = cast<C>(randv((size_t)t * half));
    auto xs = cast<T>(randv((split ? tokens_n : heads_n) + offset));
    const T sentinel = from_f32<T>(7.f);
    std::vector<T> ys((split ? heads_n : tokens_n) + offset, sentinel);
    const T *x = xs.data() + offset;
    T *y = ys.data() + offset;
    emu::launch(dim3(3), dim3(64), 0, rope_heads<T, C>, x, y, (const C *)cs.data(), (const C *)sn.data(), B, t, h, d,
                sb, st, (int)split, (int)rotate, sign);
    std::vector<double> want(ys.size(), 7.0);
    for (int b = 0; b < B; ++b)
        for (int hi = 0; hi < h; ++hi)
            for (int p = 0; p < t; ++p) {
                const size_t heads_at = (((size_t)b * h + hi) * t + p) * d, tokens_at = b * sb + p * st + (size_t)hi * d;
                const T *src = x + (split ? tokens_at : heads_at);
                const size_t to = offset + (split ? heads_at : tokens_at);
                if (!rotate) {  // every element, odd sizes' last one too
                    for (int i = 0; i < d; ++i) want[to + i] = to_f32(src[i]);
                    continue;
                }
                for (int i = 0; i < half; ++i) {
                    const float a = to_f32(src[i]), bb = to_f32(src[i + half]);
                    const float c = to_f32(cs[p * half + i]), s = sign * to_f32(sn[p * half + i]);
                    want[to + i] = to_f32(from_f32<T>(a * c - bb * s));
                    want[to + i + half] = to_f32(from_f32<T>(bb * c + a * s));
                }
            }
    char buf[96];
    std::snprintf(buf, sizeof buf, "rope_heads %s %s B%d T%d H%d D%d +%d%s%s", sizeof(T) == 4 ? "f32" : "bf16",
                  split ? "split" : "merge", B, t, h, d, extra, rotate ? (sign > 0 ? " rot" : " rot-") : "",
                  offset ? " misaligned" : "");
    check(buf, widen(ys), want, 0.0);
}

// act(x + b) (+ r) over rows of `cols`: the vector path (cols % 8 == 0) and the scalar one.
template <class T> void test_bias_act(int rows, int cols, int act, bool residual, double tol) {
    auto x = cast<T>(randv((size_t)rows * cols, -4, 4)), b = cast<T>(randv(cols)), r = cast<T>(randv((size_t)rows * cols));
    std::vector<T> y(x.size());
    const long long n = (long long)x.size();
    emu::launch(dim3(2), dim3(64), 0, bias_act<T>, (const T *)x.data(), (const T *)b.data(),
                residual ? (const T *)r.data() : (const T *)nullptr, y.data(), n, cols, act);
    std::vector<double> want(x.size());
    for (long long i = 0; i < n; ++i) {
        double v = (double)to_f32(x[i]) + to_f32(b[i % cols]);
        if (act == 1) v = v / (1 + std::exp(-1.702 * v));
        want[i] = v + (residual ? to_f32(r[i]) : 0.0);
    }
    char buf[96];
    std::snprintf(buf, sizeof buf, "bias_act %s [%d, %d] act %d%s", sizeof(T) == 4 ? "f32" : "bf16", rows, cols, act,
                  residual ? " + residual" : "");
    check(buf, widen(y), want, tol);
}

// x + r without a bias (ops::add_detached on CUDA): bit for bit one rounding of the f32 sum, as
// candle's add; the vector path (cols = 8) and the scalar one (n not a multiple of 8, cols = 1).
template <class T> void test_add(long long n, int cols) {
    auto x = cast<T>(randv(n, -4, 4)), r = cast<T>(randv(n));
    std::vector<T> y(x.size(), from_f32<T>(NAN));
    emu::launch(dim3(3), dim3(64), 0, bias_act<T>, (const T *)x.data(), (const T *)nullptr, (const T *)r.data(),
                y.data(), n, cols, 0);
    bool same = true;
    for (long long i = 0; i < n; ++i) same = same && to_f32(y[i]) == to_f32(from_f32<T>(to_f32(x[i]) + to_f32(r[i])));
    if (!same) failures++;
    std::printf("%-44s %s\n",
                (std::string("add ") + (sizeof(T) == 4 ? "f32" : "bf16") + " n" + std::to_string(n) + " = x + r")
                    .c_str(),
                same ? "ok" : "FAIL");
}

// f32 → bf16 → f32 through cast.cu: bit for bit the scalar conversions (round to nearest even;
// ties, specials), the 16-byte path with a tail (n 1003) and the one-element path (odd offset).
void test_cast(long long n, int offset) {
    auto x = randv(n + offset, -3, 3);
    x[offset] = 0x1.01p0f;  // ties between two bf16 values: down to even, then up to even
    x[offset + 1] = 0x1.03p0f;
    x[offset + 2] = -0.0f;
    x[offset + 3] = INFINITY;
    x[offset + 4] = NAN;
    std::vector<bf16> y(n);
    std::vector<float> back(n);
    emu::launch(dim3(2), dim3(64), 0, cast<float, bf16>, (const float *)x.data() + offset, y.data(), n);
    emu::launch(dim3(2), dim3(64), 0, cast<bf16, float>, (const bf16 *)y.data(), back.data(), n);
    bool same = true;
    for (long long i = 0; i < n; ++i) {
        const bf16 want = from_f32<bf16>(x[offset + i]);
        const bool nan = std::isnan(x[offset + i]);  // NaN stays NaN (the bits of a quiet one)
        same = same && (nan ? std::isnan(to_f32(y[i])) && std::isnan(back[i])
                            : __bfloat16_as_ushort(y[i]) == __bfloat16_as_ushort(want) && back[i] == to_f32(want));
    }
    if (!same) failures++;
    std::printf("%-44s %s\n", ("cast f32 -> bf16 -> f32 n" + std::to_string(n) + " offset " + std::to_string(offset)).c_str(),
                same ? "ok" : "FAIL");
}

// Rows of a [V, H] table by device ids, an out-of-range id giving zeros.
template <class T> void test_embed_rows(int v, int h) {
    auto table = cast<T>(randv((size_t)v * h));
    const std::vector<unsigned> ids = {3, 0, (unsigned)v - 1, (unsigned)v, 1u << 31};
    const int rows = (int)ids.size();
    std::vector<T> out((size_t)rows * h, from_f32<T>(7.f));
    emu::launch(dim3(2), dim3(64), 0, embed_rows<T>, ids.data(), (const T *)table.data(), out.data(), rows, h, v);
    std::vector<double> want(out.size(), 0.0);
    for (int r = 0; r < rows; ++r)
        for (int i = 0; i < h && ids[r] < (unsigned)v; ++i) want[(size_t)r * h + i] = to_f32(table[(size_t)ids[r] * h + i]);
    check(sizeof(T) == 4 ? "embed_rows f32" : "embed_rows bf16", widen(out), want, 0.0);
}

int main() {
    test_wgmma_probe();
    test_elementwise();
    test_bias_act<float>(3, 40, 1, false, 1e-6);
    test_bias_act<float>(5, 13, 0, true, 1e-6);
    test_bias_act<bf16>(4, 64, 1, true, 1e-2);
    test_bias_act<bf16>(3, 12, 1, false, 1e-2);
    test_add<bf16>(4096, 8);
    test_add<float>(1000, 8);
    test_add<bf16>(1001, 1);
    test_cast(1003, 0);
    test_cast(64, 1);
    test_rmsnorm<float>(5, 37, 1e-5);
    test_rmsnorm<bf16>(4, 300, 2e-2);
    // The 16-byte path: 2 chunks a thread (LLaMA's 4096 and 8192, and a block with a partial
    // chunk), 1 (the block's one warp more than the row needs)
    test_rmsnorm<float>(3, 64, 1e-5);
    test_rmsnorm<bf16>(4, 4096, 2e-2);
    test_rmsnorm<bf16>(2, 8192, 2e-2);
    test_rmsnorm<bf16>(2, 2056, 2e-2);
    test_rmsnorm<float>(2, 520, 1e-5);
    // The one-element path with several warps (H 1001: 64 threads), and a row past the
    // backward's reach (H 12000: the forward's 16-byte path, the backward's one-element path)
    test_rmsnorm<bf16>(3, 1001, 2e-2);
    test_rmsnorm<float>(2, 12000, 1e-5);
    test_softmax_ce(3, 1000);
    test_softmax_ce(4, 7);
    test_gemv<float, 1>(37, 264, 1e-5);
    test_gemv<float, 3>(9, 2056, 1e-5);
    test_gemv<bf16, 1>(37, 264, 1e-2);
    test_gemv<bf16, 8>(6, 2056, 1e-2);
    test_gemv<bf16, 5>(5, 8, 1e-2);
    test_gemv<float, 2, GEMV_ADD>(9, 264, 1e-5);
    test_gemv<bf16, 1, GEMV_ADD>(37, 2056, 1e-2);
    test_gemv<float, 3, GEMV_SWIGLU>(9, 1032, 1e-5);
    test_gemv<bf16, 1, GEMV_SWIGLU>(13, 2056, 1e-2);
    // 2 and 4 columns per warp, N not a multiple of a block's columns
    test_gemv<bf16, 4, GEMV_PLAIN>(19, 264, 1e-2);
    test_gemv<float, 8, GEMV_ADD>(37, 264, 1e-5);
    test_gemv<bf16, 6, GEMV_SWIGLU>(23, 2056, 1e-2);
    // The RMSNorm folded into the GEMV after it: 1 and 2 chunks a virtual thread (virtual
    // blocks of 32, 64, 160 and 256; a partial chunk), warps past N in the last block, a first
    // step full for some lanes and partial for others (K 1800)
    test_gemv_norm<bf16, 1, GEMV_PLAIN>(13, 4096);
    test_gemv_norm<bf16, 2, GEMV_SWIGLU>(9, 4096);
    test_gemv_norm<float, 1, GEMV_SWIGLU>(6, 520);
    test_gemv_norm<float, 2, GEMV_PLAIN>(17, 1032);
    test_gemv_norm<bf16, 2, GEMV_PLAIN>(5, 16);
    test_gemv_norm<bf16, 1, GEMV_PLAIN>(8, 2056);
    test_gemv_norm<bf16, 1, GEMV_SWIGLU>(7, 1800);
    test_decode_attn<float, 64>(2, 4, 2, 37, 40, 1e-5);
    test_rope_qkv_cache<float, float>(2, 1, 4, 2, 16, 9, 5);
    test_rope_qkv_cache<bf16, bf16>(1, 3, 2, 1, 8, 6, 2);
    test_rope_qkv_cache<bf16, float>(2, 2, 3, 3, 12, 4, 0);
    test_decode_attn<bf16, 128>(1, 2, 1, 1100, 1104, 1e-2);
    test_decode_attn<bf16, 96>(1, 3, 3, 1, 8, 1e-2);
    // D 96's idle lanes over several full batches of keys and a partial one
    test_decode_attn<float, 96>(1, 2, 1, 300, 320, 1e-5, true, 2);
    test_decode_attn<bf16, 96>(2, 2, 2, 601, 610, 1e-2);
    test_decode_attn<float, 32>(1, 2, 1, 513, 520, 1e-5);
    // CUDA-graph steps: S from device memory, the grid for the capacity (empty splits; one split)
    test_decode_attn<bf16, 128>(2, 4, 2, 37, 1100, 1e-2, true);
    test_decode_attn<float, 64>(1, 2, 1, 600, 1500, 1e-5, true);
    test_decode_attn<bf16, 64>(1, 2, 2, 1, 300, 1e-2, true);
    // Keys spread over `want` splits (small B·Hq): 64-key chunks with a partial last one, 128-key
    // chunks, a capacity grid whose chunk follows S, and S too long for `want` chunks of 512
    test_decode_attn<float, 64>(1, 2, 1, 200, 210, 1e-5, false, 8);
    test_decode_attn<bf16, 128>(2, 2, 1, 1000, 1000, 1e-2, false, 8);
    test_decode_attn<float, 32>(1, 4, 2, 300, 2000, 1e-5, true, 6);
    test_decode_attn<bf16, 64>(1, 2, 1, 1100, 1200, 1e-2, true, 2);
    // 16-byte path (D/2 and the strides multiples of 8), a column view, the scalar path (D/2 = 4,
    // an odd stride, a misaligned pointer), both directions, rotated either way or not
    test_rope_heads<bf16, bf16>(2, 5, 3, 32, 0, true, true, 1.f);
    test_rope_heads<bf16, bf16>(1, 4, 2, 16, 48, true, true, 1.f);
    test_rope_heads<bf16, float>(2, 3, 2, 16, 0, false, true, -1.f);
    test_rope_heads<float, float>(1, 3, 3, 16, 16, true, false, 1.f);
    test_rope_heads<float, float>(2, 2, 2, 16, 0, false, false, 1.f);
    test_rope_heads<bf16, bf16>(1, 3, 3, 8, 0, true, true, -1.f);
    test_rope_heads<bf16, bf16>(2, 2, 2, 16, 5, true, true, 1.f);
    test_rope_heads<bf16, bf16>(1, 3, 2, 16, 0, false, true, 1.f, 1);
    test_rope_heads<float, float>(1, 2, 3, 12, 0, true, false, 1.f, 2);
    // Odd head sizes moved as they are (H 8: strides multiples of 8, still the one-element path)
    test_rope_heads<bf16, bf16>(2, 3, 8, 17, 0, false, false, 1.f);
    test_rope_heads<bf16, bf16>(1, 2, 8, 17, 0, true, false, 1.f);
    test_rope_heads<float, float>(1, 2, 8, 1, 8, false, false, 1.f);
    // A merge into a column block of a wider row (split_heads_backward_cat's writes)
    test_rope_heads<bf16, bf16>(2, 3, 2, 32, 64, false, true, -1.f);
    test_rope_qkv_cache<bf16, bf16>(2, 1, 4, 2, 16, 9, 5, true);
    test_rope_qkv_cache<float, float>(1, 1, 2, 1, 8, 6, 0, true);
    test_embed_rows<float>(11, 24);
    test_embed_rows<bf16>(5, 40);
    test_attention<float>(1, 2, 1, 70, "f32", 1e-4);
    test_attention<bf16>(1, 2, 1, 70, "bf16", 3e-2);
    test_attention<bf16>(2, 3, 3, 17, "bf16", 3e-2);
    test_attention<float>(1, 4, 2, 130, "f32", 1e-4);
    test_attention<bf16, 128>(1, 2, 1, 40, "bf16", 3e-2);
    test_attention<float, 96>(1, 1, 1, 33, "f32", 1e-4);
    test_attention<bf16, 64>(1, 2, 2, 45, "bf16 misaligned", 3e-2, 1);
    // tensor-core kernels: several 128-row query tiles, 64-key tiles, 32-query dkdv steps, partial
    // last tiles, GQA 2 and 3, every head dim, the misaligned (synchronous copy) path
    test_attention<bf16, 128>(1, 4, 2, 300, "bf16", 3e-2);
    test_attention<bf16, 96>(1, 3, 1, 161, "bf16", 3e-2);
    test_attention<bf16, 32>(2, 2, 2, 257, "bf16", 3e-2);
    test_attention<bf16, 64>(1, 2, 1, 129, "bf16 misaligned", 3e-2, 1);
    test_attention<bf16, 128>(1, 1, 1, 1, "bf16", 3e-2);
    test_attention<bf16, 128>(1, 3, 1, 200, "bf16", 3e-2);  // GQA 3, a partial second key block
    // non-causal forward: keys past the diagonal and a partial last key tile (T 161, 40, 1)
    test_forward<64>(1, 2, 1, 161, false, 2e-2);
    test_forward<128>(2, 2, 2, 40, false, 2e-2);
    test_forward<32>(1, 1, 1, 1, false, 2e-2);
    test_forward<128>(1, 3, 1, 20, false, 2e-2);  // the second 32-key step lies wholly past T
    test_forward<128>(1, 2, 1, 300, false, 2e-2); // several 64- and 128-key tiles, the last partial
    // causal forwards, both kernels: several 128-row blocks and 64-key tiles, a second warpgroup
    // with no rows (T 40), partial tiles, GQA 2 and 3, T 1
    test_forward<128>(1, 4, 2, 300, true, 2e-2);
    test_forward<64>(1, 3, 1, 129, true, 2e-2);
    test_forward<128>(1, 1, 1, 40, true, 2e-2);
    test_forward<128>(1, 1, 1, 520, true, 2e-2);  // five 128-key tiles, the last partial
    test_forward<64>(1, 1, 1, 1, true, 2e-2);
    // The pipelined attention kernels again with every cp.async landing at issue (emu.h): a
    // tile reloaded while another thread still reads the buffer shows up here. Several tiles
    // and steps, partial last ones, GQA, the synchronous path, both wgmma forwards.
    std::printf("cp.async landing at issue:\n");
    emu::cp_at_issue = true;
    test_attention<bf16, 128>(1, 4, 2, 300, "bf16", 3e-2);
    test_attention<bf16, 32>(2, 2, 2, 257, "bf16", 3e-2);
    test_attention<bf16, 64>(1, 2, 1, 129, "bf16 misaligned", 3e-2, 1);
    test_forward<128>(1, 4, 2, 300, true, 2e-2);
    test_forward<128>(1, 1, 1, 520, true, 2e-2);
    test_forward<64>(1, 2, 1, 161, false, 2e-2);
    emu::cp_at_issue = false;
    // blockIdx's own order (SHARDSMITH_ATTN_ORDER=head): the same blocks, so the same results.
    std::printf("attention blocks in blockIdx order:\n");
    attn_head_major = 1;
    test_attention<bf16, 128>(1, 4, 2, 300, "bf16", 3e-2);
    attn_head_major = 0;
    std::printf(failures ? "%d FAILED\n" : "all ok\n", failures);
    return failures != 0;
}
