//! CUDA kernels (kernels/*.cu via src/ops) against their CPU references, forward and backward.
//!
//! Each check runs the same op on the GPU and on the CPU from identical inputs (bf16 inputs are
//! rounded once, then copied to both) and compares in f32 with the metric
//! `rel = max |gpu − cpu| / max(1, max |cpu|)`, printed for every case:
//!   f32 ops: rel ≤ 1e-5 (rmsnorm, softmax, swiglu, cross-entropy; attention ≤ 1e-4: different
//!            summation order over D and T), rope and AdamW bit-identical (rel = 0);
//!   bf16 ops: one bf16 rounding of the output (2⁻⁸ relative) plus f32 reordering: rel ≤ 1e-2;
//!            bf16 attention rounds P and dS to bf16 before the tensor-core products, as
//!            FlashAttention does: rel ≤ 2e-2 (o) and 3e-2 (dq, dk, dv).
//! Run on a GPU machine: `cargo test --release --features cuda --test cuda_parity -- --nocapture`.
//! The `bench_*` tests are `#[ignore]`d micro-benchmarks (`-- --ignored bench`).
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor, Var};
use shardsmith::ops;

/// One device for the whole process: every `Device::new_cuda` is a distinct device to candle.
/// The GPU, its freed memory kept in the driver's pool as the binary keeps it
/// (`ops::keep_pool_memory`): with the driver's default every synchronisation hands the pool
/// back, and each timed call of the benchmarks below mapped its outputs afresh (run 8's
/// `bench_layer_parts` timed a 128 MB RMSNorm at 0.26 ms, 0.5 TB/s).
fn gpu() -> Device {
    static GPU: std::sync::OnceLock<Device> = std::sync::OnceLock::new();
    GPU.get_or_init(|| {
        let dev = Device::new_cuda(0).expect("a CUDA device");
        if let Device::Cuda(cuda) = &dev {
            shardsmith::ops::keep_pool_memory(cuda).expect("the memory pool's release threshold");
        }
        dev
    })
    .clone()
}

fn randn(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * scale
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// `rel` of the module docs; panics above `tol`.
fn check(what: &str, gpu: &Tensor, cpu: &Tensor, tol: f32) {
    let g = gpu.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let c = cpu.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    assert_eq!(g.dims(), c.dims(), "{what}: shapes");
    let (g, c) = (g.to_vec1::<f32>().unwrap(), c.to_vec1::<f32>().unwrap());
    let diff = g.iter().zip(&c).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let peak = c.iter().map(|v| v.abs()).fold(0f32, f32::max);
    let rel = diff / peak.max(1.0);
    let ok = rel <= tol && g.iter().all(|v| v.is_finite() || c.iter().any(|c| !c.is_finite()));
    println!(
        "parity {what:<58} max|Δ| {diff:.3e}  rel {rel:.3e}  tol {tol:.0e}  {}",
        if ok { "ok" } else { "FAIL" }
    );
    assert!(ok, "{what}: rel {rel} > {tol}");
}

/// Input of `dtype` on the CPU and the same values on the GPU (as Vars, for gradients).
fn pair(shape: &[usize], seed: u64, scale: f32, dtype: DType) -> (Var, Var) {
    let t = randn(shape, seed, scale).to_dtype(dtype).unwrap();
    (Var::from_tensor(&t).unwrap(), Var::from_tensor(&t.to_device(&gpu()).unwrap()).unwrap())
}

fn tol(dtype: DType, f32_tol: f32) -> f32 {
    if dtype == DType::F32 {
        f32_tol
    } else {
        1e-2
    }
}

#[test]
fn rms_norm_forward_and_backward() {
    for (shape, dtype) in
        [(vec![3, 5, 37], DType::F32), (vec![4, 4096], DType::BF16), (vec![2, 7, 300], DType::BF16)]
    {
        let h = *shape.last().unwrap();
        let (xc, xg) = pair(&shape, 1, 2.0, dtype);
        let (wc, wg) = pair(&[h], 2, 1.0, dtype);
        let probe = randn(&shape, 3, 1.0).to_dtype(dtype).unwrap();
        let run = |x: &Var, w: &Var| {
            let y = ops::rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
            let p = probe.to_device(y.device()).unwrap();
            let grads = (y.to_dtype(DType::F32).unwrap() * p.to_dtype(DType::F32).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            (y, grads.get(x).unwrap().clone(), grads.get(w).unwrap().clone())
        };
        let (yg, dxg, dwg) = run(&xg, &wg);
        let (yc, dxc, dwc) = run(&xc, &wc);
        let name = format!("rms_norm {dtype:?} {shape:?}");
        check(&format!("{name} y"), &yg, &yc, tol(dtype, 1e-5));
        check(&format!("{name} dx"), &dxg, &dxc, tol(dtype, 1e-5));
        check(&format!("{name} dw"), &dwg, &dwc, tol(dtype, 1e-5));
        // The hand-written backward with the residual's gradient summed in (the layer node's).
        let skip = randn(&shape, 4, 1.0).to_dtype(dtype).unwrap();
        let direct = |x: &Var, w: &Var| {
            let dev = x.device();
            let (g, s) = (probe.to_device(dev).unwrap(), skip.to_device(dev).unwrap());
            let (dx, dw) =
                ops::rms_norm_backward(x.as_tensor(), w.as_tensor(), &g, 1e-5, true, Some(&s)).unwrap();
            (dx, dw.unwrap())
        };
        let ((dxg, dwg), (dxc, dwc)) = (direct(&xg, &wg), direct(&xc, &wc));
        check(&format!("{name} dx + skip (direct)"), &dxg, &dxc, tol(dtype, 1e-5));
        check(&format!("{name} dw (direct)"), &dwg, &dwc, tol(dtype, 1e-5));
    }
}

#[test]
fn rope_forward_and_backward_are_exact() {
    for (xd, cd) in [(DType::F32, DType::F32), (DType::BF16, DType::BF16), (DType::BF16, DType::F32)] {
        let (xc, xg) = pair(&[2, 3, 17, 64], 4, 1.0, xd);
        let cos = randn(&[17, 32], 5, 1.0).to_dtype(cd).unwrap();
        let sin = randn(&[17, 32], 6, 1.0).to_dtype(cd).unwrap();
        let probe = randn(&[2, 3, 17, 64], 7, 1.0).to_dtype(xd).unwrap();
        let run = |x: &Var| {
            let dev = x.device();
            let (c, s) = (cos.to_device(dev).unwrap(), sin.to_device(dev).unwrap());
            let y = ops::rope(x.as_tensor(), &c, &s).unwrap();
            let grads = (&y * probe.to_device(dev).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
            (y, grads.get(x).unwrap().clone())
        };
        let (yg, dxg) = run(&xg);
        let (yc, dxc) = run(&xc);
        check(&format!("rope x {xd:?} tables {cd:?} y"), &yg, &yc, 0.0);
        // The backward's gradient goes through a probe product and sum, rounded in x's dtype.
        check(&format!("rope x {xd:?} tables {cd:?} dx"), &dxg, &dxc, tol(xd, 1e-6));
    }
}

#[test]
fn softmax_forward() {
    for (shape, dtype) in
        [(vec![5, 1000], DType::F32), (vec![2, 3, 33], DType::BF16), (vec![4, 32000], DType::BF16)]
    {
        let x = randn(&shape, 8, 6.0).to_dtype(dtype).unwrap();
        let yg = ops::softmax_last_dim(&x.to_device(&gpu()).unwrap()).unwrap();
        let yc = ops::softmax_last_dim(&x).unwrap();
        check(&format!("softmax {dtype:?} {shape:?}"), &yg, &yc, tol(dtype, 1e-5));
        let yg = ops::softmax_last_dim_scaled(&x.to_device(&gpu()).unwrap(), -0.09).unwrap();
        let yc = ops::softmax_last_dim_scaled(&x, -0.09).unwrap();
        check(&format!("softmax scale -0.09 {dtype:?} {shape:?}"), &yg, &yc, tol(dtype, 1e-5));
    }
}

#[test]
fn swiglu_forward_and_backward() {
    for (shape, dtype) in [(vec![3, 7, 41], DType::F32), (vec![2, 5, 11008], DType::BF16)] {
        let (gc, gg) = pair(&shape, 9, 4.0, dtype);
        let (uc, ug) = pair(&shape, 10, 1.0, dtype);
        let probe = randn(&shape, 11, 1.0).to_dtype(dtype).unwrap();
        let run = |g: &Var, u: &Var| {
            let y = ops::swiglu(g.as_tensor(), u.as_tensor()).unwrap();
            let grads =
                (&y * probe.to_device(g.device()).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
            (y, grads.get(g).unwrap().clone(), grads.get(u).unwrap().clone())
        };
        let (yg, dgg, dug) = run(&gg, &ug);
        let (yc, dgc, duc) = run(&gc, &uc);
        let name = format!("swiglu {dtype:?} {shape:?}");
        check(&format!("{name} y"), &yg, &yc, tol(dtype, 1e-5));
        check(&format!("{name} dgate"), &dgg, &dgc, tol(dtype, 1e-5));
        check(&format!("{name} dup"), &dug, &duc, tol(dtype, 1e-5));
    }
}

#[test]
fn cross_entropy_forward_and_backward() {
    for (n, v, dtype) in [(7, 1001, DType::F32), (9, 32003, DType::BF16), (5, 32000, DType::F32)] {
        let (lc, lg) = pair(&[n, v], 12, 8.0, dtype);
        let targets: Vec<i64> =
            (0..n).map(|i| if i % 3 == 1 { -100 } else { (i as i64 * 7919) % v as i64 }).collect();
        let targets = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
        let run = |l: &Var| {
            let (loss, _) = ops::cross_entropy_mean(l.as_tensor(), &targets.to_device(l.device()).unwrap())
                .unwrap()
                .unwrap();
            let per_row = ops::cross_entropy(l.as_tensor(), &targets.to_device(l.device()).unwrap()).unwrap();
            let grads = loss.backward().unwrap();
            (per_row, grads.get(l).unwrap().clone())
        };
        let (rg, dg) = run(&lg);
        let (rc, dc) = run(&lc);
        let name = format!("cross_entropy {dtype:?} N{n} V{v}");
        check(&format!("{name} loss"), &rg, &rc, 1e-5);
        check(&format!("{name} dlogits"), &dg, &dc, tol(dtype, 1e-5));
    }
}

#[test]
fn adamw_step_is_bit_identical() {
    for wd in [0.0, 0.1] {
        let n = 100_003;
        let p = randn(&[n], 13, 1.0);
        let (pg, mg, vg) = (
            p.to_device(&gpu()).unwrap(),
            Tensor::zeros(n, DType::F32, &gpu()).unwrap(),
            Tensor::zeros(n, DType::F32, &gpu()).unwrap(),
        );
        let (pc, mc, vc) = (p.copy().unwrap(), p.zeros_like().unwrap(), p.zeros_like().unwrap());
        for step in 1..=3u64 {
            let g = randn(&[n], 20 + step, 0.1);
            // Step 2 with a clipping factor on the gradient.
            let grad_scale = if step == 2 { 0.37 } else { 1.0 };
            let hyper = ops::AdamWStep {
                lr: 3e-4,
                betas: (0.9, 0.95),
                eps: 1e-8,
                weight_decay: wd,
                step,
                grad_scale,
            };
            ops::adamw_step(&pg, &g.to_device(&gpu()).unwrap(), &mg, &vg, &hyper).unwrap();
            ops::adamw_step(&pc, &g, &mc, &vc, &hyper).unwrap();
        }
        check(&format!("adamw wd {wd} param (3 steps)"), &pg, &pc, 0.0);
        check(&format!("adamw wd {wd} exp_avg"), &mg, &mc, 0.0);
        check(&format!("adamw wd {wd} exp_avg_sq"), &vg, &vc, 0.0);
    }
}

#[test]
fn causal_attention_forward_and_backward() {
    // (B, Hq, Hk, T, D, dtype): GQA ratios 1, 2, 3, 4; T = 1, < tile, not a tile multiple, > 2 tiles.
    let cases = [
        (1, 4, 1, 77, 64, DType::BF16),
        (2, 4, 2, 130, 128, DType::BF16),
        (1, 2, 2, 1, 128, DType::BF16),
        (1, 3, 1, 200, 32, DType::BF16),
        (1, 2, 2, 64, 32, DType::F32),
        (1, 6, 2, 150, 96, DType::F32),
        (2, 2, 1, 97, 128, DType::F32),
    ];
    for (b, hq, hk, t, d, dtype) in cases {
        let (qc, qg) = pair(&[b, hq, t, d], 14, 2.0, dtype);
        let (kc, kg) = pair(&[b, hk, t, d], 15, 2.0, dtype);
        let (vc, vg) = pair(&[b, hk, t, d], 16, 1.0, dtype);
        let probe = randn(&[b, hq, t, d], 17, 1.0).to_dtype(dtype).unwrap();
        let scale = 1.0 / (d as f64).sqrt();
        let run = |q: &Var, k: &Var, v: &Var| {
            let o = ops::causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale).unwrap();
            let p = probe.to_device(q.device()).unwrap().to_dtype(DType::F32).unwrap();
            let grads = (o.to_dtype(DType::F32).unwrap() * p).unwrap().sum_all().unwrap().backward().unwrap();
            let g = |x: &Var| grads.get(x).unwrap().clone();
            (o, g(q), g(k), g(v))
        };
        let (og, dqg, dkg, dvg) = run(&qg, &kg, &vg);
        let (oc, dqc, dkc, dvc) = run(&qc, &kc, &vc);
        let name = format!("attention {dtype:?} B{b} Hq{hq} Hk{hk} T{t} D{d}");
        let (to, tg) = if dtype == DType::F32 { (1e-4, 1e-4) } else { (2e-2, 3e-2) };
        check(&format!("{name} o"), &og, &oc, to);
        check(&format!("{name} dq"), &dqg, &dqc, tg);
        check(&format!("{name} dk"), &dkg, &dkc, tg);
        check(&format!("{name} dv"), &dvg, &dvc, tg);
    }
}

/// The bf16 backward kernel sets `FlashBackward::{Split, Wide, Fused}` on the same forward: dq,
/// dk, dv against the CPU backward, and dk, dv bit-identical across them (the same products in
/// the same order; only dQ's summation order differs). T spans several 128-key blocks and
/// 64-query steps, with partial last tiles and GQA 1, 2, 3.
#[test]
fn attention_backward_variants_agree() {
    use ops::attention::FlashBackward;
    let cases =
        [(1, 4, 2, 300, 128), (2, 3, 1, 161, 96), (1, 2, 2, 257, 32), (1, 2, 1, 129, 64), (1, 1, 1, 1, 128)];
    for (b, hq, hk, t, d) in cases {
        let variants = [FlashBackward::Split, FlashBackward::Wide, FlashBackward::Fused];
        let grads = backward_variants(b, hq, hk, t, d, &variants);
        let (_, dk0, dv0) = &grads[0];
        for (variant, (_, dk, dv)) in variants.iter().zip(&grads).skip(1) {
            let name = format!("attention bwd {variant:?} B{b} Hq{hq} Hk{hk} T{t} D{d}");
            check(&format!("{name} dk vs Split"), dk, &dk0.to_device(&Device::Cpu).unwrap(), 0.0);
            check(&format!("{name} dv vs Split"), dv, &dv0.to_device(&Device::Cpu).unwrap(), 0.0);
        }
    }
}

/// (dq, dk, dv) on the GPU from each backward `variant` for seeded bf16 inputs of the given
/// shape, each checked against the CPU backward (rel ≤ 3e-2, the module's bf16 attention bound).
fn backward_variants(
    b: usize,
    hq: usize,
    hk: usize,
    t: usize,
    d: usize,
    variants: &[ops::attention::FlashBackward],
) -> Vec<(Tensor, Tensor, Tensor)> {
    let bf =
        |shape: &[usize], seed: u64, scale: f32| randn(shape, seed, scale).to_dtype(DType::BF16).unwrap();
    let (q, k, v, g) = (
        bf(&[b, hq, t, d], 21, 2.0),
        bf(&[b, hk, t, d], 22, 2.0),
        bf(&[b, hk, t, d], 23, 1.0),
        bf(&[b, hq, t, d], 24, 1.0),
    );
    let scale = 1.0 / (d as f64).sqrt();
    let (o, lse) = ops::causal_attention_forward(&q, &k, &v, scale).unwrap();
    let (dqc, dkc, dvc) = ops::causal_attention_backward(&q, &k, &v, &o, &lse, &g, scale).unwrap();
    let on = |x: &Tensor| x.to_device(&gpu()).unwrap();
    let (qg, kg, vg, gg) = (on(&q), on(&k), on(&v), on(&g));
    let (og, lseg) = ops::causal_attention_forward(&qg, &kg, &vg, scale).unwrap();
    variants
        .iter()
        .map(|&variant| {
            let (dq, dk, dv) = ops::attention::causal_attention_backward_with(
                variant, &qg, &kg, &vg, &og, &lseg, &gg, scale,
            )
            .unwrap();
            let name = format!("attention bwd {variant:?} B{b} Hq{hq} Hk{hk} T{t} D{d}");
            check(&format!("{name} dq"), &dq, &dqc, 3e-2);
            check(&format!("{name} dk"), &dk, &dkc, 3e-2);
            check(&format!("{name} dv"), &dv, &dvc, 3e-2);
            (dq, dk, dv)
        })
        .collect()
}

/// The CUDA GEMM libraries (ops::linear::GemmBackend) against the CPU product from the same
/// bf16 values: x·Wᵀ (W transposed, as projections call it), dy·W, dyᵀ·x widened to f32 (weight
/// gradients), both operands transposed, and x·Wᵀ in f16, at odd sizes and one row; and x as a
/// view of rows longer than K (a leading dimension candle's own matmul refuses: copied first
/// where a library turns it down). bf16/f16 results within one rounding; the direct libraries'
/// f32 results unrounded, so within tensor-core f32 accumulation (1e-4).
#[test]
fn gemm_backends_match_the_cpu() {
    use ops::linear::{matmul_with, GemmBackend};
    let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    // M 1 reaches cuBLAS in dy·W (x·Wᵀ of up to 8 rows is the GEMV kernel's); M 9 in every product.
    for (m, k, n) in [(37, 70, 129), (1, 64, 256), (9, 40, 24), (300, 520, 72)] {
        let bf = |shape: &[usize], seed: u64| randn(shape, seed, 1.0).to_dtype(DType::BF16).unwrap();
        let (x, w, dy, wide) = (bf(&[m, k], 41), bf(&[n, k], 42), bf(&[m, n], 43), bf(&[m, k + 24], 44));
        let x_km = bf(&[k, m], 45);
        let want_fwd = f32(&x).matmul(&f32(&w).t().unwrap()).unwrap();
        let want_tt = f32(&x_km).t().unwrap().matmul(&f32(&w).t().unwrap()).unwrap();
        let (x16, w16) = (x.to_dtype(DType::F16).unwrap(), w.to_dtype(DType::F16).unwrap());
        let want_dgrad = f32(&dy).matmul(&f32(&w)).unwrap();
        let want_wgrad = f32(&dy).t().unwrap().matmul(&f32(&x)).unwrap();
        let xv = wide.narrow(1, 3, k).unwrap();
        let want_view = f32(&xv).matmul(&f32(&w).t().unwrap()).unwrap();
        let on = |t: &Tensor| t.to_device(&gpu()).unwrap();
        let (xg, wg, dyg, wideg, x_kmg) = (on(&x), on(&w), on(&dy), on(&wide), on(&x_km));
        let (x16g, w16g) = (on(&x16), on(&w16));
        for b in GemmBackend::ALL {
            let name = format!("gemm {} M{m} K{k} N{n}", b.name());
            let fwd = matmul_with(b, &xg, &wg.t().unwrap(), false).unwrap();
            check(&format!("{name} x·Wᵀ"), &fwd, &want_fwd, 1e-2);
            let dgrad = matmul_with(b, &dyg, &wg, false).unwrap();
            check(&format!("{name} dy·W"), &dgrad, &want_dgrad, 1e-2);
            let wgrad = matmul_with(b, &dyg.t().unwrap(), &xg, true).unwrap();
            assert_eq!(wgrad.dtype(), DType::F32, "{name}: a widened product is f32");
            let tol = if b == GemmBackend::Candle { 1e-2 } else { 1e-4 };
            check(&format!("{name} dyᵀ·x f32"), &wgrad, &want_wgrad, tol);
            let tt = matmul_with(b, &x_kmg.t().unwrap(), &wg.t().unwrap(), false).unwrap();
            check(&format!("{name} xᵀ·Wᵀ"), &tt, &want_tt, 1e-2);
            let fwd16 = matmul_with(b, &x16g, &w16g.t().unwrap(), false).unwrap();
            check(&format!("{name} x·Wᵀ f16"), &fwd16, &want_fwd, 1e-2);
            let xv = wideg.narrow(1, 3, k).unwrap();
            let view = matmul_with(b, &xv, &wg.t().unwrap(), false).unwrap();
            check(&format!("{name} x (rows of {}) ·Wᵀ", k + 24), &view, &want_view, 1e-2);
        }
    }
}

/// The seven wgmma forms the attention kernels use, on one tile each (flash_wg.cu's `wgmma_probe`,
/// ops::wgmma_check): every output bit-exact. Printed whole, so that one run on a new GPU says
/// which form is wrong and where its elements came from. Skipped in a build without wgmma.
#[test]
fn wgmma_forms_are_exact() {
    if !ops::attention::wgmma_available() {
        println!("parity wgmma forms: skipped (no sm_90a kernels in this build)");
        return;
    }
    let Device::Cuda(dev) = gpu() else { unreachable!("gpu() is a CUDA device") };
    let report = ops::wgmma_check::self_check(&dev).unwrap();
    for line in report.to_string().lines() {
        println!("parity wgmma form {line}");
    }
    assert!(report.passed(), "wgmma forms:\n{report}");
}

/// The wgmma backwards (kernels/src/flash_wg.cu, `FlashBackward::Wgmma` and the warp-specialised
/// `Tma`, D 128) against the CPU and against Split on the same inputs (their own summation
/// order: within a bf16 rounding), and Tma's dk, dv against Wgmma's bit for bit (the same
/// products in the same order). Skipped (with a line saying so) in a build without them. Their own test so that a
/// fault in a kernel cannot hide the other variants' results.
#[test]
fn wgmma_backward_matches_the_cpu() {
    use ops::attention::FlashBackward;
    if !ops::attention::wgmma_available() {
        println!("parity wgmma backward: skipped (no sm_90a kernels in this build)");
        return;
    }
    // The last case: 10 steps in the first K/V block (GQA 2), every buffer of Tma refilled.
    let cases = [
        (1, 4, 2, 300, 128),
        (2, 3, 1, 200, 128),
        (1, 2, 2, 64, 128),
        (1, 1, 1, 1, 128),
        (1, 2, 1, 260, 128),
    ];
    for (b, hq, hk, t, d) in cases {
        let variants = [FlashBackward::Split, FlashBackward::Wgmma, FlashBackward::Tma];
        let grads = backward_variants(b, hq, hk, t, d, &variants);
        let (_, dk0, dv0) = &grads[0];
        for (variant, (_, dk, dv)) in variants.iter().zip(&grads).skip(1) {
            let name = format!("attention bwd {variant:?} B{b} Hq{hq} Hk{hk} T{t} D{d}");
            check(&format!("{name} dk vs Split"), dk, &dk0.to_device(&Device::Cpu).unwrap(), 1e-2);
            check(&format!("{name} dv vs Split"), dv, &dv0.to_device(&Device::Cpu).unwrap(), 1e-2);
        }
        let bits =
            |x: &Tensor| x.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        let (_, dkw, dvw) = &grads[1];
        for (variant, (_, dks, dvs)) in variants.iter().zip(&grads).skip(2) {
            assert!(
                bits(dkw) == bits(dks) && bits(dvw) == bits(dvs),
                "attention bwd {variant:?} B{b} Hq{hq} Hk{hk} T{t} D{d}: dk, dv differ from Wgmma's"
            );
            println!("parity attention bwd {variant:?} B{b} Hq{hq} Hk{hk} T{t} D{d} dk, dv = Wgmma's bit for bit: ok");
        }
    }
}

/// The wgmma forwards (kernels/src/flash_wg.cu, `FlashForward::Wgmma`, `Wgmma128` and the
/// warp-specialised `Tma`), causal and unmasked, against the CPU forward (o, lse) and against the
/// mma.sync kernel on the same inputs; whether `Tma` gives `Wgmma128`'s bits (the same products in
/// the same order; the emulator's and an H200's are identical) is printed. Skipped (with a line saying so) in a
/// build without it (CUDA_COMPUTE_CAP other than 90).
#[test]
fn wgmma_forward_matches_the_cpu() {
    use ops::attention::{causal_attention_forward_with, full_attention, full_attention_with, FlashForward};
    if !ops::attention::wgmma_available() {
        println!("parity wgmma forward: skipped (no sm_90a kernels in this build)");
        return;
    }
    // (B, Hq, Hk, T, D): several 128-row blocks, a partial last tile, GQA, T 1; D 128 (LLaMA) and 64
    // (CLIP); nine 128-key tiles (every K/V buffer of the warp-specialised kernel refilled 4 times).
    let cases = [
        (1, 4, 2, 300, 128),
        (2, 3, 1, 129, 64),
        (1, 2, 2, 1, 128),
        (1, 2, 1, 577, 64),
        (1, 2, 1, 1030, 128),
    ];
    for (b, hq, hk, t, d) in cases {
        let bf = |shape: &[usize], seed: u64| randn(shape, seed, 2.0).to_dtype(DType::BF16).unwrap();
        let (q, k, v) = (bf(&[b, hq, t, d], 31), bf(&[b, hk, t, d], 32), bf(&[b, hk, t, d], 33));
        let scale = 1.0 / (d as f64).sqrt();
        let on = |x: &Tensor| x.to_device(&gpu()).unwrap();
        let (qg, kg, vg) = (on(&q), on(&k), on(&v));
        let (oc, lc) = ops::causal_attention_forward(&q, &k, &v, scale).unwrap();
        let (om, lm) = causal_attention_forward_with(FlashForward::MmaSync, &qg, &kg, &vg, scale).unwrap();
        let f32 = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
        let fc = full_attention(&f32(&q), &f32(&k), &f32(&v), scale).unwrap();
        let mut wide = None;
        for variant in [FlashForward::Wgmma, FlashForward::Wgmma128, FlashForward::Tma] {
            let name = format!("{} forward B{b} Hq{hq} Hk{hk} T{t} D{d}", variant.name());
            let (ow, lw) = causal_attention_forward_with(variant, &qg, &kg, &vg, scale).unwrap();
            let bits =
                |x: &Tensor| x.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
            if variant == FlashForward::Wgmma128 {
                wide = Some((ow.clone(), lw.clone()));
            }
            match (variant, &wide) {
                (FlashForward::Tma, Some((o128, l128))) if d == 128 => {
                    // The same products in the same order (S from an ss rather than an rs
                    // wgmma form: not promised bit for bit), so within a rounding here; a
                    // pipeline race that spoils part of a tile, or (tma) a swizzle that TMA and
                    // the descriptors disagree on, would show.
                    let same = bits(&ow) == bits(o128) && bits(&lw) == bits(l128);
                    println!("parity {name} causal o, lse bit for bit = wgmma128: {same}");
                    check(
                        &format!("{name} causal o vs wgmma128"),
                        &ow,
                        &o128.to_device(&Device::Cpu).unwrap(),
                        5e-3,
                    );
                    check(
                        &format!("{name} causal lse vs wgmma128"),
                        &lw,
                        &l128.to_device(&Device::Cpu).unwrap(),
                        1e-5,
                    );
                }
                _ => {}
            }
            check(&format!("{name} causal o"), &ow, &oc, 2e-2);
            check(&format!("{name} causal lse"), &lw, &lc, 1e-3);
            check(&format!("{name} causal o vs mma.sync"), &ow, &om.to_device(&Device::Cpu).unwrap(), 1e-2);
            check(&format!("{name} causal lse vs mma.sync"), &lw, &lm.to_device(&Device::Cpu).unwrap(), 1e-4);
            let fw = full_attention_with(variant, &qg, &kg, &vg, scale).unwrap();
            check(&format!("{name} full o"), &fw, &fc, 2e-2);
        }
    }
}

/// The profiled wgmma kernels (ops::attention::phases, `bench attention --phases`): the plain
/// kernels' o, lse, dk and dv bit for bit (dq to a bf16 rounding: its f32 atomics add in any
/// order before the cast), every
/// phase run as often as the grid's geometry says, and cycles charged to every phase some warp
/// ran. Skipped (with a line saying so) in a build without the sm_90a kernels.
#[test]
fn wgmma_phase_profiles_match_the_plain_kernels() {
    use ops::attention::{causal_attention_backward_with, causal_attention_forward_with, phases};
    use ops::attention::{FlashBackward, FlashForward};
    if !ops::attention::wgmma_available() {
        println!("parity wgmma phase profiles: skipped (no sm_90a kernels in this build)");
        return;
    }
    let bits =
        |x: &Tensor| x.to_device(&Device::Cpu).unwrap().flatten_all().unwrap().to_dtype(DType::F32).unwrap();
    let same = |what: &str, a: &Tensor, b: &Tensor| {
        let (a, b) = (bits(a).to_vec1::<f32>().unwrap(), bits(b).to_vec1::<f32>().unwrap());
        assert!(
            a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{what}: not bit-identical"
        );
    };
    let cycles_where_run = |p: &phases::PhaseProfile| {
        for ph in &p.phases {
            assert_eq!(
                ph.cycles > 0,
                ph.runs > 0,
                "{}: phase {} ran {} times in {} cycles",
                p.kernel,
                ph.phase,
                ph.runs,
                ph.cycles
            );
        }
    };
    for (b, hq, hk, t) in [(1, 4, 2, 300), (2, 3, 1, 129), (1, 1, 1, 1)] {
        let bf = |shape: &[usize], seed: u64| {
            randn(shape, seed, 2.0).to_dtype(DType::BF16).unwrap().to_device(&gpu()).unwrap()
        };
        let (q, k, v, g) = (
            bf(&[b, hq, t, 128], 41),
            bf(&[b, hk, t, 128], 42),
            bf(&[b, hk, t, 128], 43),
            bf(&[b, hq, t, 128], 44),
        );
        let scale = 1.0 / 128f64.sqrt();
        let name = format!("B{b} Hq{hq} Hk{hk} T{t}");
        for variant in [FlashForward::Wgmma, FlashForward::Wgmma128, FlashForward::Tma] {
            let (o0, l0) = causal_attention_forward_with(variant, &q, &k, &v, scale).unwrap();
            let (o, l, p) = phases::profile_forward(variant, &q, &k, &v, scale).unwrap();
            same(&format!("profiled {} forward {name} o", variant.name()), &o, &o0);
            same(&format!("profiled {} forward {name} lse", variant.name()), &l, &l0);
            p.check_runs(&phases::forward_phases_of(variant, b, hq, t).unwrap().1).unwrap();
            cycles_where_run(&p);
        }
        let (o, lse) = causal_attention_forward_with(FlashForward::MmaSync, &q, &k, &v, scale).unwrap();
        for variant in [FlashBackward::Wgmma, FlashBackward::Tma] {
            let (dq0, dk0, dv0) =
                causal_attention_backward_with(variant, &q, &k, &v, &o, &lse, &g, scale).unwrap();
            let ((dq, dk, dv), p) =
                phases::profile_backward(variant, &q, &k, &v, &o, &lse, &g, scale).unwrap();
            let what = format!("profiled {} backward {name}", variant.name());
            same(&format!("{what} dk"), &dk, &dk0);
            same(&format!("{what} dv"), &dv, &dv0);
            check(&format!("{what} dq"), &dq, &dq0.to_device(&Device::Cpu).unwrap(), 1e-2);
            p.check_runs(&phases::backward_phases_of(variant, b, hq, hk, t).unwrap().1).unwrap();
            cycles_where_run(&p);
        }
    }
}

/// The unmasked bf16 attention kernel (CLIP's vision tower on CUDA) against the materialised
/// softmax(QKᵀ·scale)V in f32 on the CPU: ViT-L/14-336's 577 tokens at D 64, GQA, a partial key
/// tile, one token.
#[test]
fn full_attention_forward() {
    for (b, hq, hk, t, d) in [(2, 16, 16, 577, 64), (1, 4, 2, 130, 128), (1, 2, 2, 1, 32), (1, 3, 1, 20, 128)]
    {
        let (qc, qg) = pair(&[b, hq, t, d], 21, 2.0, DType::BF16);
        let (kc, kg) = pair(&[b, hk, t, d], 22, 2.0, DType::BF16);
        let (vc, vg) = pair(&[b, hk, t, d], 23, 1.0, DType::BF16);
        let scale = 1.0 / (d as f64).sqrt();
        let og =
            ops::attention::full_attention(qg.as_tensor(), kg.as_tensor(), vg.as_tensor(), scale).unwrap();
        let f32 = |x: &Var| x.as_tensor().to_dtype(DType::F32).unwrap();
        let oc = ops::attention::full_attention(&f32(&qc), &f32(&kc), &f32(&vc), scale).unwrap();
        check(&format!("full attention BF16 B{b} Hq{hq} Hk{hk} T{t} D{d} o"), &og, &oc, 2e-2);
    }
}

/// Decode's products through the GEMV kernel (a few rows against a linear's weight), against
/// the CPU's matmul: M 1..8, N not a multiple of the block's 4 columns, K past several unrolled
/// steps, a weight that is a row block of a larger one (FusedProj's views) and x as [1, 1, K];
/// shapes the kernel does not take (K not a multiple of 8, more than 8 rows) still match through
/// cuBLAS.
#[test]
fn decode_gemv_forward() {
    for dtype in [DType::F32, DType::BF16] {
        for (m, n, k, rows_before) in [
            (1, 37, 264, 0),
            (3, 300, 4104, 8),
            (8, 1001, 2056, 0),
            (1, 4096, 11008, 0),
            (5, 19, 13, 0),
            (9, 40, 64, 0),
        ] {
            let x = randn(&[m, k], 20, 1.0).to_dtype(dtype).unwrap();
            let whole = randn(&[rows_before + n + 3, k], 21, 0.05).to_dtype(dtype).unwrap();
            let w = whole.narrow(0, rows_before, n).unwrap();
            let (xg, wholeg) = (x.to_device(&gpu()).unwrap(), whole.to_device(&gpu()).unwrap());
            let wg = wholeg.narrow(0, rows_before, n).unwrap();
            let before = ops::cuda_gemv_launches();
            let yg = ops::matmul(&xg, &wg.t().unwrap()).unwrap();
            let took_kernel = ops::cuda_gemv_launches() > before;
            let rows = ops::cuda_gemv_rows().unwrap();
            assert_eq!(took_kernel, m <= rows && k % 8 == 0, "M {m} K {k}: GEMV kernel used: {took_kernel}");
            let yc = ops::matmul(&x, &w.t().unwrap()).unwrap();
            check(
                &format!("gemv {dtype:?} M{m} N{n} K{k} (rows from {rows_before})"),
                &yg,
                &yc,
                tol(dtype, 1e-5),
            );
        }
        // The epilogues: + residual (rounded product + r) and SwiGLU of a [gate; up] weight;
        // they apply to the rows the GEMV kernels take (ops::cuda_gemv_rows), else the caller
        // composes the op (`None`).
        let rows = ops::cuda_gemv_rows().unwrap();
        for (m, n, k) in [(1, 4096, 4096), (3, 1001, 2056), (8, 37, 264)] {
            let x = randn(&[m, k], 24, 1.0).to_dtype(dtype).unwrap();
            let w = randn(&[2 * n, k], 25, 0.05).to_dtype(dtype).unwrap();
            let r = randn(&[m, n], 26, 1.0).to_dtype(dtype).unwrap();
            let g = |t: &Tensor| t.to_device(&gpu()).unwrap();
            let wn = w.narrow(0, 0, n).unwrap();
            let added = ops::linear::gemv_add(&g(&x), &g(&wn).t().unwrap(), &g(&r)).unwrap();
            assert_eq!(added.is_some(), m <= rows, "M {m}: the add epilogue applies at most to {rows} rows");
            let Some(yg) = added else { continue };
            let yc = ops::add_detached(&r, &ops::matmul(&x, &wn.t().unwrap()).unwrap()).unwrap();
            check(&format!("gemv + residual {dtype:?} M{m} N{n} K{k}"), &yg, &yc, tol(dtype, 1e-5));
            let yg = ops::linear::gemv_swiglu(&g(&x), &g(&w).t().unwrap())
                .unwrap()
                .expect("the SwiGLU epilogue applies");
            let both = ops::matmul(&x, &w.t().unwrap()).unwrap();
            let yc = ops::swiglu(&both.narrow(1, 0, n).unwrap(), &both.narrow(1, n, n).unwrap()).unwrap();
            check(&format!("gemv swiglu {dtype:?} M{m} N{n} K{k}"), &yg, &yc, tol(dtype, 1e-5));
        }
        let x = randn(&[1, 1, 4096], 22, 1.0).to_dtype(dtype).unwrap();
        let w = randn(&[512, 4096], 23, 0.05).to_dtype(dtype).unwrap();
        let yg =
            ops::matmul(&x.to_device(&gpu()).unwrap(), &w.to_device(&gpu()).unwrap().t().unwrap()).unwrap();
        assert_eq!(yg.dims(), &[1, 1, 512]);
        check(
            &format!("gemv {dtype:?} x [1, 1, 4096]"),
            &yg,
            &ops::matmul(&x, &w.t().unwrap()).unwrap(),
            tol(dtype, 1e-5),
        );
    }
}

/// Decode attention (one query position against a KV cache, heads merged) against the op's CPU
/// forward: GQA, the cache's narrowed views read in place, one split (S ≤ 512) and several
/// with a partial last one (the combine kernel), and K/V rows that are not contiguous (copied
/// by the launcher first).
#[test]
fn decode_attention_forward() {
    for (b, hq, hk, s, d, dtype) in [
        (2, 4, 2, 37, 64, DType::F32),
        (1, 32, 32, 1100, 128, DType::BF16),
        (3, 6, 2, 513, 96, DType::BF16),
        (1, 2, 1, 1, 32, DType::BF16),
    ] {
        let q = randn(&[b, hq, 1, d], 40, 1.0).to_dtype(dtype).unwrap();
        let kc = randn(&[b, hk, s + 8, d], 41, 2.0).to_dtype(dtype).unwrap();
        let vc = randn(&[b, hk, s + 8, d], 42, 1.0).to_dtype(dtype).unwrap();
        let scale = 1.0 / (d as f64).sqrt();
        let on_gpu = |x: &Tensor| x.to_device(&gpu()).unwrap();
        let (kg, vg) = (on_gpu(&kc).narrow(2, 0, s).unwrap(), on_gpu(&vc).narrow(2, 0, s).unwrap());
        let yg = ops::attention::decode_attention(&on_gpu(&q), &kg, &vg, scale).unwrap();
        let (k, v) = (kc.narrow(2, 0, s).unwrap(), vc.narrow(2, 0, s).unwrap());
        let yc = ops::attention::decode_attention(&q, &k, &v, scale).unwrap();
        let name = format!("decode attention {dtype:?} B{b} Hq{hq} Hk{hk} S{s} D{d}");
        check(&name, &yg, &yc, tol(dtype, 1e-5));
    }
    // Rows of K/V D apart no more: every other column block of a [.., 2D] buffer.
    let (b, h, s, d) = (1, 2, 20, 64);
    let q = randn(&[b, h, 1, d], 43, 1.0).to_dtype(DType::BF16).unwrap();
    let wide = randn(&[b, h, s, 2 * d], 44, 1.0).to_dtype(DType::BF16).unwrap();
    let (k, v) = (wide.narrow(3, 0, d).unwrap(), wide.narrow(3, d, d).unwrap());
    let wg = wide.to_device(&gpu()).unwrap();
    let yg = ops::attention::decode_attention(
        &q.to_device(&gpu()).unwrap(),
        &wg.narrow(3, 0, d).unwrap(),
        &wg.narrow(3, d, d).unwrap(),
        0.125,
    )
    .unwrap();
    let yc = ops::attention::decode_attention(&q, &k, &v, 0.125).unwrap();
    check("decode attention BF16 strided K/V rows (copied)", &yg, &yc, 1e-2);
}

/// `ops::cat_rows` (one device-to-device copy a part) against candle's cat along dim 0, bit for
/// bit: f32 and bf16, a part that is a narrowed view at an offset, and a strided part (candle's
/// cat then).
#[test]
fn cat_rows_matches_candles_cat() {
    for dtype in [DType::F32, DType::BF16] {
        let on = |shape: &[usize], seed| {
            randn(shape, seed, 1.0).to_dtype(dtype).unwrap().to_device(&gpu()).unwrap()
        };
        let (a, b, wide) = (on(&[5, 24], 80), on(&[3, 24], 81), on(&[9, 24], 82));
        let rows = wide.narrow(0, 2, 4).unwrap(); // contiguous, at an offset
        let cols = on(&[6, 48], 83).narrow(1, 8, 24).unwrap(); // strided
        for parts in [vec![a.clone(), rows.clone(), b.clone()], vec![a.clone(), cols.clone()]] {
            let ours = ops::cat_rows(&parts).unwrap();
            let candle = Tensor::cat(&parts, 0).unwrap();
            check(&format!("cat_rows {dtype:?} {} parts", parts.len()), &ours, &candle, 0.0);
        }
    }
}

/// `ops::cast` (cast.cu) against candle's `to_dtype`, bit for bit, f32 → bf16 → f32: ties,
/// signed zero, infinities and NaN, the 16-byte path with a tail and the one-element path (an
/// odd offset), and the gradient of a cast variable.
#[test]
fn cast_matches_candles_to_dtype() {
    let mut v: Vec<f32> = randn(&[1003], 90, 3.0).to_vec1().unwrap();
    v[..6].copy_from_slice(&[
        1.0 + 1.0 / 256.0,
        1.0 + 3.0 / 256.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
    ]);
    let x = Tensor::from_vec(v, 1003, &gpu()).unwrap();
    // bf16 → f32 from a view at an odd offset too (the one-element path).
    let odd_bf16 = x.to_dtype(DType::BF16).unwrap().narrow(0, 1, 1000).unwrap();
    let (ours, candle) = (ops::cast(&odd_bf16, DType::F32).unwrap(), odd_bf16.to_dtype(DType::F32).unwrap());
    let f32_bits = |t: &Tensor| t.to_vec1::<f32>().unwrap().iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    assert_eq!(f32_bits(&ours), f32_bits(&candle), "bf16 → f32 at an odd offset");
    for x in [x.clone(), x.narrow(0, 1, 1000).unwrap()] {
        let (ours, candle) = (ops::cast(&x, DType::BF16).unwrap(), x.to_dtype(DType::BF16).unwrap());
        let bits =
            |t: &Tensor| t.to_vec1::<half::bf16>().unwrap().iter().map(|b| b.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&ours), bits(&candle), "f32 → bf16 of {} elements", x.elem_count());
        let (back, candle_back) =
            (ops::cast(&ours, DType::F32).unwrap(), candle.to_dtype(DType::F32).unwrap());
        let bits = |t: &Tensor| t.to_vec1::<f32>().unwrap().iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back), bits(&candle_back), "bf16 → f32 of {} elements", x.elem_count());
        println!("parity cast f32 ⇄ bf16 of {} elements: bit for bit candle's  ok", x.elem_count());
    }
    let w = Var::from_tensor(&randn(&[64], 91, 1.0).to_device(&gpu()).unwrap()).unwrap();
    let grads = ops::cast(w.as_tensor(), DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g = grads.get(w.as_tensor()).unwrap();
    assert_eq!(g.dtype(), DType::F32);
    check("cast's gradient", g, &Tensor::ones(64, DType::F32, &gpu()).unwrap(), 0.0);
}

/// `ops::add_detached` (bias_act.cu without a bias) against candle's add, bit for bit: f32 and
/// bf16, the 16-byte path and the one-element one (odd sizes, an operand at an odd offset).
#[test]
fn add_matches_candles_add() {
    for dtype in [DType::F32, DType::BF16] {
        for (n, offset) in [(4096, 0), (1001, 0), (64, 1)] {
            let a = randn(&[n + offset], 70, 2.0).to_dtype(dtype).unwrap().to_device(&gpu()).unwrap();
            let b = randn(&[n], 71, 2.0).to_dtype(dtype).unwrap().to_device(&gpu()).unwrap();
            let a = a.narrow(0, offset, n).unwrap();
            let ours = ops::add_detached(&a, &b).unwrap();
            let candle = (&a + &b).unwrap();
            check(&format!("add {dtype:?} n{n} offset {offset}"), &ours, &candle, 0.0);
        }
    }
}

/// Heads in and out of attention's layout (ops::heads; rope.cu's rope_heads) bit-identical to
/// the CPU pass: split with and without rope from a contiguous product and from a column view of
/// a wider one (rows strided, no copy), the gradient through autograd (the merge rotated by −θ),
/// merge_heads and split_heads_backward; the 16-byte path (D 64) and the one-element path (D 12).
#[test]
fn head_splits_and_merges_are_exact() {
    for (xd, cd, d) in
        [(DType::F32, DType::F32, 64), (DType::BF16, DType::BF16, 64), (DType::BF16, DType::F32, 12)]
    {
        let (b, t, h) = (2, 9, 3);
        let wide = randn(&[b, t, 3 * h * d], 60, 1.0).to_dtype(xd).unwrap();
        let cos = randn(&[t, d / 2], 61, 1.0).to_dtype(cd).unwrap();
        let sin = randn(&[t, d / 2], 62, 1.0).to_dtype(cd).unwrap();
        let probe = randn(&[b, h, t, d], 63, 1.0).to_dtype(xd).unwrap();
        let run = |dev: &Device, rotate: bool, view: bool| {
            let (wide, cos, sin) =
                (wide.to_device(dev).unwrap(), cos.to_device(dev).unwrap(), sin.to_device(dev).unwrap());
            let x = wide.narrow(2, h * d, h * d).unwrap();
            let x = if view { x } else { x.copy().unwrap() };
            let rope = rotate.then_some((&cos, &sin));
            let y = ops::split_heads(&x, h, rope).unwrap();
            // A variable is a contiguous copy: the gradient goes through the split of one.
            let x = Var::from_tensor(&x).unwrap();
            let p = probe.to_device(dev).unwrap();
            let grads = (ops::split_heads(x.as_tensor(), h, rope).unwrap().to_dtype(DType::F32).unwrap()
                * p.to_dtype(DType::F32).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
            let merged = ops::merge_heads(&p).unwrap();
            let back = ops::split_heads_backward(&p, rope).unwrap();
            (y, grads.get(&x).unwrap().clone(), merged, back)
        };
        for (rotate, view) in [(true, false), (true, true), (false, true), (false, false)] {
            let (g, c) = (run(&gpu(), rotate, view), run(&Device::Cpu, rotate, view));
            let name = format!("heads x {xd:?} tables {cd:?} D{d} rope {rotate} column view {view}");
            check(&format!("{name} split"), &g.0, &c.0, 0.0);
            check(&format!("{name} split's gradient"), &g.1, &c.1, 0.0);
            check(&format!("{name} merge"), &g.2, &c.2, 0.0);
            check(&format!("{name} split_heads_backward"), &g.3, &c.3, 0.0);
        }
        // A fused q/k/v product's gradient: three parts (GQA sizes) into one [B, T, ΣH·D].
        let (gq, gk, gv) =
            (randn(&[b, h, t, d], 64, 1.0), randn(&[b, 1, t, d], 65, 1.0), randn(&[b, 1, t, d], 66, 1.0));
        let cat = |dev: &Device| {
            let on = |x: &Tensor| x.to_dtype(xd).unwrap().to_device(dev).unwrap();
            let (c, s) = (cos.to_device(dev).unwrap(), sin.to_device(dev).unwrap());
            let (gq, gk, gv) = (on(&gq), on(&gk), on(&gv));
            ops::split_heads_backward_cat(&[(&gq, Some((&c, &s))), (&gk, Some((&c, &s))), (&gv, None)])
                .unwrap()
        };
        let what = format!("heads x {xd:?} tables {cd:?} D{d} split_heads_backward_cat");
        check(&what, &cat(&gpu()), &cat(&Device::Cpu), 0.0);
    }
}

/// One decode step's q, k, v into attention's layout and the KV cache (ops::kv_step): q and the
/// cache bit-identical to the CPU op, with q, k, v as column views of one fused product, a
/// cache with rows before and after the written positions, and every table dtype pairing.
#[test]
fn rope_qkv_into_cache_is_exact() {
    use candle_core::IndexOp;
    for (xd, cd, t) in
        [(DType::F32, DType::F32, 1), (DType::BF16, DType::BF16, 1), (DType::BF16, DType::F32, 3)]
    {
        let (b, hq, g, d, cap, pos) = (2, 8, 2, 64, 16, 5);
        let y = randn(&[b, t, (hq + 2 * g) * d], 50, 1.0).to_dtype(xd).unwrap();
        let cos = randn(&[t, d / 2], 51, 1.0).to_dtype(cd).unwrap();
        let sin = randn(&[t, d / 2], 52, 1.0).to_dtype(cd).unwrap();
        let cache = randn(&[2, b, g, cap, d], 53, 1.0).to_dtype(xd).unwrap();
        let run = |dev: &Device| {
            let (y, cos, sin) =
                (y.to_device(dev).unwrap(), cos.to_device(dev).unwrap(), sin.to_device(dev).unwrap());
            let kv = cache.to_device(dev).unwrap().copy().unwrap();
            let cols = |from: usize, n: usize| y.narrow(2, from * d, n * d).unwrap();
            let q = ops::kv_step::rope_qkv_into_cache(
                &cols(0, hq),
                &cols(hq, g),
                &cols(hq + g, g),
                (&cos, &sin),
                &kv,
                pos,
                hq,
            )
            .unwrap();
            (q, kv)
        };
        let ((qg, kvg), (qc, kvc)) = (run(&gpu()), run(&Device::Cpu));
        check(&format!("rope_qkv_into_cache x {xd:?} tables {cd:?} T{t} q"), &qg, &qc, 0.0);
        for half in 0..2 {
            let what = format!("rope_qkv_into_cache x {xd:?} tables {cd:?} T{t} cache {half}");
            check(&what, &kvg.i(half).unwrap(), &kvc.i(half).unwrap(), 0.0);
        }
    }
}

/// A linear's epilogue act(x + b) (+ r) (ops::epilogue, the CLIP tower's projections) against
/// its CPU forward: the vector path (C % 8 = 0) and the scalar one, with and without the
/// residual, quick GELU and identity.
#[test]
fn bias_act_forward() {
    use ops::epilogue::{bias_act, Act};
    for (shape, dtype) in
        [(vec![4, 577, 4096], DType::BF16), (vec![3, 7, 36], DType::F32), (vec![5, 12], DType::BF16)]
    {
        let c = *shape.last().unwrap();
        let x = randn(&shape, 60, 4.0).to_dtype(dtype).unwrap();
        let b = randn(&[c], 61, 1.0).to_dtype(dtype).unwrap();
        let r = randn(&shape, 62, 1.0).to_dtype(dtype).unwrap();
        let g = |t: &Tensor| t.to_device(&gpu()).unwrap();
        for (act, residual) in [(Act::QuickGelu, false), (Act::Identity, true), (Act::QuickGelu, true)] {
            let yg = bias_act(&g(&x), &g(&b), act, residual.then(|| g(&r)).as_ref()).unwrap();
            let yc = bias_act(&x, &b, act, residual.then_some(&r)).unwrap();
            check(
                &format!("bias_act {dtype:?} {shape:?} {act:?} residual {residual}"),
                &yg,
                &yc,
                tol(dtype, 1e-5),
            );
        }
    }
}

/// A seeded HF LLaMA directory shaped for the decode kernels (head dim 32, GQA, ffn a multiple of
/// 8, which the llama-gqa fixture's 8 and 172 are not): llama-gqa's config with these sizes, and
/// N(0, 0.05²) weights (norm weights N(1, 0.05²)) from SplitMix64, so CPU and GPU load the same
/// bytes.
fn decode_kernel_model(dir: &std::path::Path) {
    use shardsmith_converters::convert::init::SplitMix64;
    use shardsmith_converters::convert::llama::canonical_shapes;
    use shardsmith_converters::names::llama::LlamaHparams;
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/llama-gqa/config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(fixture).unwrap()).unwrap();
    for (key, v) in [
        ("hidden_size", 128),
        ("intermediate_size", 344),
        ("num_attention_heads", 4),
        ("num_key_value_heads", 2),
        ("head_dim", 32),
        ("num_hidden_layers", 2),
        ("vocab_size", 300),
    ] {
        cfg[key] = v.into();
    }
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let hp = LlamaHparams::from_hf(&cfg, dir).unwrap();
    let mut rng = SplitMix64::new(11);
    let tensors: std::collections::HashMap<String, Tensor> = canonical_shapes(&hp)
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let base = if name.ends_with("norm.weight") { 1.0 } else { 0.0 };
            let v: Vec<f32> = (0..n).map(|_| base + 0.05 * rng.normal() as f32).collect();
            (name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap())
        })
        .collect();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
}

/// Decode on CUDA against the CPU, f32 and bf16, at batch 1 (fused q/k/v and gate/up) and
/// batch 3: the prompt's last logits and those of six steps fed the CPU's greedy tokens. On the
/// llama-gqa fixture (head dim 8: candle's attention, the eager path) and on a model shaped for
/// the decode kernels, where every step after the prompt is replayed from the CUDA graph of
/// GEMVs with their residual and SwiGLU epilogues, the q/k/v step into the KV cache and decode
/// attention — so the graph is checked against the CPU, not only against the eager steps.
#[test]
fn batched_decode_matches_the_cpu() {
    use shardsmith::models::{self, LoadOptions};
    let work = tempfile::tempdir().unwrap();
    let kernel_model = work.path().join("decode-kernels");
    decode_kernel_model(&kernel_model);
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/llama-gqa");
    for (path, graphed) in [(fixture, false), (kernel_model, true)] {
        for dtype in [DType::F32, DType::BF16] {
            let load = |device: Device| {
                models::load(&path, &LoadOptions { tp: None, dtype, device, vision: None }).unwrap().0
            };
            let (mut cpu, mut cuda) = (load(Device::Cpu), load(gpu()));
            for b in [1usize, 3] {
                let prompt: Vec<u32> = (0..b * 5).map(|i| (i as u32 * 37 + 11) % 200 + 3).collect();
                let ids = Tensor::from_vec(prompt, (b, 5), &Device::Cpu).unwrap();
                for m in [&mut cpu, &mut cuda] {
                    m.llm().reset();
                    m.llm().reserve(16);
                }
                let (replays, gemvs) = (ops::decode_graph::replays(), ops::cuda_gemv_launches());
                let mut ids_now = ids;
                for step in 0..7 {
                    let lc = cpu.forward(&ids_now, None, true, false).unwrap().logits;
                    let lg =
                        cuda.forward(&ids_now.to_device(&gpu()).unwrap(), None, true, false).unwrap().logits;
                    // A whole model's logits: bf16 rounds every op's output on both sides, in
                    // different summation orders, so a few bf16 ulps of the peak logit.
                    let tol = if dtype == DType::F32 { 3e-4 } else { 6e-2 };
                    let what = format!("decode {} {dtype:?} batch {b} step {step} logits", path.display());
                    check(&what, &lg, &lc, tol);
                    ids_now = lc.argmax(candle_core::D::Minus1).unwrap();
                }
                let replayed = ops::decode_graph::replays() - replays;
                let gemv_rows = ops::cuda_gemv_rows().unwrap();
                if graphed && ops::cuda_graph_enabled() && b <= gemv_rows {
                    assert_eq!(replayed, 6, "{dtype:?} batch {b}: steps replayed from the CUDA graph");
                } else if graphed && b <= gemv_rows {
                    // Eager steps (SHARDSMITH_CUDA_GRAPH=0): each took the GEMV kernels.
                    assert!(ops::cuda_gemv_launches() > gemvs + 6, "{dtype:?} batch {b}: no GEMV kernel ran");
                }
            }
        }
    }
}

/// Decode steps replayed from the recorded CUDA graph (`ops::decode_graph`, the default on one
/// CUDA rank) give the eager steps' logits bit for bit: the same kernels, the position read
/// from device memory. Batches 1 to 3, f32 and bf16, GQA, head dim 64; the cache outgrows its
/// reservation mid-way (an eager step grows it, and the next step records a new graph over the
/// new cache), a reservation past 512 positions runs the attention grid for the capacity
/// (empty splits), and after a 600-token prompt the eager step too splits its keys.
#[test]
fn graph_decode_matches_the_eager_steps() {
    use shardsmith::commands::bench_gpu::{random_llama, Common, LlamaShape};
    use shardsmith::models::tp::ParallelLlama;
    let shape = LlamaShape { layers: 2, hidden: 512, ffn: 688, heads: 8, kv_heads: 4, vocab: 512 };
    for dtype in [DType::F32, DType::BF16] {
        let c = Common { device: gpu(), dtype, runs: 1, warmup: 0 };
        let mut model = ParallelLlama::from_rank(random_llama(&shape, &c, false).unwrap(), shape.hparams());
        // (batch, prompt, reserve, steps replayed): caches that grow after the first step; a
        // graph over 700 positions (many splits) after a short prompt; a long prompt, so the
        // eager step too splits its keys over several blocks.
        for (b, t, reserve, graph_steps) in
            [(1usize, 5, 8, 6), (3, 5, 8, 6), (2, 5, 700, 7), (1, 600, 700, 7)]
        {
            let prompt: Vec<u32> = (0..b * t).map(|i| (i as u32 * 37 + 11) % 500 + 3).collect();
            let prompt = Tensor::from_vec(prompt, (b, t), &gpu()).unwrap();
            let mut run = |graph: bool| -> Vec<Vec<f32>> {
                model.set_graph_decode(graph);
                // Fresh caches of the reserved size, so both runs grow them at the same step.
                model.release_caches();
                model.reserve(reserve);
                let mut logits = model.forward(&prompt, &[], true, false).unwrap().logits;
                let mut all = Vec::new();
                for _ in 0..7 {
                    // Greedy ids on the host, as generate feeds them.
                    let next = logits.argmax(candle_core::D::Minus1).unwrap();
                    logits = model.forward(&next, &[], true, false).unwrap().logits;
                    all.push(logits.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                }
                all
            };
            let eager = run(false);
            let before = ops::decode_graph::replays();
            let graphed = run(true);
            let replays = ops::decode_graph::replays() - before;
            println!(
                "parity graph decode {dtype:?} batch {b} prompt {t} reserve {reserve}: {replays} replays"
            );
            assert_eq!(replays, graph_steps, "{dtype:?} batch {b}: steps replayed from the graph");
            for (step, (g, e)) in graphed.iter().zip(&eager).enumerate() {
                let same = g.iter().zip(e).filter(|(a, b)| a.to_bits() == b.to_bits()).count();
                assert_eq!(
                    same,
                    e.len(),
                    "{dtype:?} batch {b} step {step}: {same} of {} logits identical",
                    e.len()
                );
            }
        }
    }
}

/// `bench decode --breakdown`'s profile: the whole graph step and one partial graph per kind of
/// launch, each with the launches a step makes of it, timed.
#[test]
fn decode_profile_times_every_kind_of_launch() {
    use shardsmith::commands::bench_gpu::{random_llama, Common, LlamaShape};
    use shardsmith::models::tp::ParallelLlama;
    use shardsmith::ops::decode_graph::StepKernel;
    let shape = LlamaShape { layers: 3, hidden: 256, ffn: 688, heads: 4, kv_heads: 2, vocab: 512 };
    let c = Common { device: gpu(), dtype: DType::BF16, runs: 1, warmup: 0 };
    let mut model = ParallelLlama::from_rank(random_llama(&shape, &c, false).unwrap(), shape.hparams());
    let err = model.single_mut().unwrap().decode_profile(1, 5).unwrap_err().to_string();
    assert!(err.contains("nothing was prefilled"), "{err}");
    model.reserve(16);
    let prompt = Tensor::from_vec((3..11).collect::<Vec<u32>>(), (1, 8), &gpu()).unwrap();
    model.forward(&prompt, &[], true, false).unwrap();
    let (step, kinds) = model.single_mut().unwrap().decode_profile(1, 5).unwrap();
    println!("parity decode profile: step {step:.4} ms; {kinds:?}");
    assert!(step.is_finite() && step > 0.0);
    // With the RMSNorms folded into the GEMVs after them (the default; SHARDSMITH_DECODE_NORM_FOLD=0
    // keeps them), none is a launch of its own.
    let fold = shardsmith::ops::decode_graph::folds(1, shape.hidden);
    let launches = |k: &StepKernel| shardsmith::ops::decode_graph::launches(*k, fold);
    let expected: Vec<StepKernel> = StepKernel::ALL.into_iter().filter(launches).collect();
    assert_eq!(kinds.iter().map(|k| k.kernel).collect::<Vec<_>>(), expected);
    if shardsmith::ops::decode_norm_fold() {
        assert_eq!(expected.len(), StepKernel::ALL.len() - 3, "{expected:?}");
    }
    for k in &kinds {
        let once = matches!(k.kernel, StepKernel::Embed | StepKernel::FinalNorm | StepKernel::Head);
        assert_eq!(k.calls, if once { 1 } else { 3 }, "{:?}", k.kernel);
        assert!(k.ms.is_finite() && k.ms > 0.0, "{:?}: {} ms", k.kernel, k.ms);
    }
}

/// A NeVA training step with each decoder layer as one graph node (`forward_node`: the
/// kernels above composed by hand, backward written out) gives the loss and every trained
/// parameter's gradient of the same step through candle's composed graph, on the GPU: stage 1
/// (only the projector trains; bf16 frozen LLM) and stage 2 (LLM in f32 masters too), f32 and
/// bf16 compute, head dims 64 and 128, GQA. The metric is `rel` against the composed step;
/// gradients relative to their own peak (bf16: 2e-2, the CPU test's tolerance, since the two
/// graphs round their bf16 partial sums at different points).
#[test]
fn train_step_layer_nodes_match_the_composed_graph() {
    use shardsmith::commands::bench_gpu::{synthetic_batch, LlamaShape};
    use shardsmith::models::clip::{ClipActivation, ClipVisionConfig};
    use shardsmith::models::neva::ImageTokens;
    use shardsmith::models::projector::ProjectorKind;
    use shardsmith::train::model::TrainModel;
    let dev = gpu();
    let vcfg = ClipVisionConfig {
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        patch_size: 8,
        image_size: 32,
        num_channels: 3,
        layer_norm_eps: 1e-5,
        hidden_act: ClipActivation::QuickGelu,
    };
    for (hidden, heads, kv_heads) in [(256, 4, 2), (256, 2, 2)] {
        let shape = LlamaShape { layers: 2, hidden, ffn: 688, heads, kv_heads, vocab: 512 };
        let image = ImageTokens::Repeated { id: 511 };
        let batch = synthetic_batch(&vcfg, image, true, 2, 48, &dev).unwrap();
        for train_llm in [false, true] {
            for dtype in [DType::F32, DType::BF16] {
                let hp = shape.hparams();
                let kind = ProjectorKind::MlpGelu { depth: 2 };
                let mut m = TrainModel::synthetic(&hp, &vcfg, kind, 511, train_llm, dtype, &dev).unwrap();
                let nodes = m.forward_backward(&batch, false).unwrap();
                // The node path ran (layers and head), then only the composed one.
                let ran = m.node_forwards();
                assert!(ran > 0, "no layer ran as a node on the GPU");
                m.set_layer_nodes(false);
                let composed = m.forward_backward(&batch, false).unwrap();
                assert_eq!(m.node_forwards(), ran);
                let what = format!(
                    "layer nodes stage {} {dtype:?} D{} Hq{heads} Hk{kv_heads}",
                    if train_llm { 2 } else { 1 },
                    hidden / heads
                );
                let tol = if dtype == DType::F32 { 1e-4 } else { 2e-2 };
                let loss = |l: f64| Tensor::new(&[l as f32], &Device::Cpu).unwrap();
                check(&format!("{what} loss"), &loss(nodes.loss), &loss(composed.loss), tol);
                // Every gradient against its own peak; the worst one printed and checked.
                let (mut worst, mut worst_name, mut checked) = (0f32, String::new(), 0);
                for (name, v) in m.params() {
                    let (Some(a), Some(b)) =
                        (nodes.grads.get(v.as_tensor()), composed.grads.get(v.as_tensor()))
                    else {
                        panic!("{what}: {name} has a gradient in only one of the steps (or none)");
                    };
                    let max = |t: &Tensor| {
                        let m = t.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
                        m.to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap()
                    };
                    let peak = max(b);
                    if peak == 0.0 {
                        assert!(name.contains("embed_tokens"), "{what} {name}: zero gradient");
                        continue;
                    }
                    let rel = max(&(a - b).unwrap()) / peak;
                    assert!(rel.is_finite(), "{what} {name}: rel {rel}");
                    if rel >= worst {
                        (worst, worst_name) = (rel, name.clone());
                    }
                    checked += 1;
                }
                println!(
                    "parity {:<58} rel {worst:.3e} (worst: {worst_name})  tol {tol:.0e}  {}",
                    format!("{what} {checked} grads"),
                    if worst <= tol { "ok" } else { "FAIL" }
                );
                assert!(worst <= tol, "{what}: {worst_name} rel {worst} > {tol}");
                assert!(checked >= if train_llm { 20 } else { 4 }, "{what}: only {checked} gradients");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Micro-benchmarks (ignored by default; bench/gpu_kernels.sh runs them next to PyTorch)
// ---------------------------------------------------------------------------------------------

/// Median milliseconds of `f` over `iters` runs after `warm` warm-up runs, device-synchronised.
fn time_ms(dev: &Device, warm: usize, iters: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..warm {
        f();
    }
    dev.synchronize().unwrap();
    let mut v: Vec<f64> = (0..iters)
        .map(|_| {
            let t0 = std::time::Instant::now();
            f();
            dev.synchronize().unwrap();
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
#[ignore]
fn bench_kernels() {
    let dev = gpu();
    let bf = DType::BF16;
    let on = |shape: &[usize], seed: u64, scale: f32| {
        Var::from_tensor(&randn(shape, seed, scale).to_dtype(bf).unwrap().to_device(&dev).unwrap()).unwrap()
    };
    println!("bench | op | shape | ours ms | TFLOP/s or GB/s");
    // Attention, B2 H32 T2048 D128 causal.
    let (b, h, t, d) = (2, 32, 2048, 128);
    let (q, k, v) = (on(&[b, h, t, d], 1, 1.0), on(&[b, h, t, d], 2, 1.0), on(&[b, h, t, d], 3, 1.0));
    let probe = on(&[b, h, t, d], 4, 1.0).as_tensor().clone();
    let scale = 1.0 / (d as f64).sqrt();
    let flops_fwd = 4.0 * (b * h * t * t * d) as f64 / 2.0;
    let fwd = time_ms(&dev, 3, 20, || {
        ops::causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale).unwrap();
    });
    let fwd_bwd = time_ms(&dev, 3, 20, || {
        let o = ops::causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale).unwrap();
        (o * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    });
    println!(
        "bench | attention fwd | B{b} H{h} T{t} D{d} causal bf16 | {fwd:.3} | {:.1} TFLOP/s",
        flops_fwd / fwd / 1e9
    );
    println!(
        "bench | attention fwd+bwd | B{b} H{h} T{t} D{d} causal bf16 | {fwd_bwd:.3} | {:.1} TFLOP/s",
        3.5 * flops_fwd / fwd_bwd / 1e9
    );
    drop((q, k, v, probe));

    // RMSNorm [4096, 4096].
    let (x, w) = (on(&[4096, 4096], 5, 1.0), on(&[4096], 6, 1.0));
    let probe = on(&[4096, 4096], 7, 1.0).as_tensor().clone();
    let bytes = 2.0 * 4096.0 * 4096.0 * 2.0;
    let ms = time_ms(&dev, 3, 50, || {
        ops::rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
    });
    println!("bench | rms_norm fwd | [4096, 4096] bf16 | {ms:.3} | {:.0} GB/s", bytes / ms / 1e6);
    let ms = time_ms(&dev, 3, 50, || {
        let y = ops::rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
        (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    });
    println!("bench | rms_norm fwd+bwd (+probe·sum) | [4096, 4096] bf16 | {ms:.3} | -");
    drop((x, w, probe));

    // SwiGLU [4096, 11008].
    let (g, u) = (on(&[4096, 11008], 8, 2.0), on(&[4096, 11008], 9, 1.0));
    let probe = on(&[4096, 11008], 10, 1.0).as_tensor().clone();
    let bytes = 3.0 * 4096.0 * 11008.0 * 2.0;
    let ms = time_ms(&dev, 3, 50, || {
        ops::swiglu(g.as_tensor(), u.as_tensor()).unwrap();
    });
    println!("bench | swiglu fwd | [4096, 11008] bf16 | {ms:.3} | {:.0} GB/s", bytes / ms / 1e6);
    let ms = time_ms(&dev, 3, 50, || {
        let y = ops::swiglu(g.as_tensor(), u.as_tensor()).unwrap();
        (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    });
    println!("bench | swiglu fwd+bwd (+probe·sum) | [4096, 11008] bf16 | {ms:.3} | -");
    drop((g, u, probe));

    // Cross-entropy [4096, 32000].
    let logits = on(&[4096, 32000], 11, 4.0);
    let targets: Vec<i64> = (0..4096).map(|i| (i * 7919) % 32000).collect();
    let targets = Tensor::new(targets.as_slice(), &dev).unwrap();
    let ms = time_ms(&dev, 3, 50, || {
        ops::cross_entropy(logits.as_tensor(), &targets).unwrap();
    });
    println!(
        "bench | cross_entropy fwd (+dlogits) | [4096, 32000] bf16 | {ms:.3} | {:.0} GB/s",
        2.0 * 4096.0 * 32000.0 * 2.0 / ms / 1e6
    );
    let ms = time_ms(&dev, 3, 50, || {
        let (loss, _) = ops::cross_entropy_mean(logits.as_tensor(), &targets).unwrap().unwrap();
        loss.backward().unwrap();
    });
    println!("bench | cross_entropy mean fwd+bwd | [4096, 32000] bf16 | {ms:.3} | -");
}

/// Decode's kernels against what they replace, on LLaMA-7B's decode shapes (bf16, batch 1, 2,
/// 4 and 8; run with `SHARDSMITH_CUDA_GEMV=8` so that every batch takes the GEMV kernel): the
/// GEMV against cuBLAS (candle's matmul, what `SHARDSMITH_CUDA_GEMV=0` runs) as weight
/// bytes over time (M = 1 is bound by HBM bandwidth), and the decode attention kernel against
/// the composed q·Kᵀ, scaled softmax and P·V. Each time is of 20 back-to-back calls (a decode
/// step issues them that way), per call, cycling through copies of the weight that together
/// exceed 256 MB: one weight called again would be read from L2 (an o_proj's 32 MB fits an
/// H100's or H200's 50 MB), which a decode step, streaming 32 layers, never does. The per-token
/// sums (32 layers + lm_head) set against `bench decode`'s ms per token give the time spent
/// outside the weight products.
#[test]
#[ignore]
fn bench_gemv() {
    let dev = gpu();
    let per_call = |f: &mut dyn FnMut()| {
        time_ms(&dev, 2, 10, || {
            for _ in 0..20 {
                f();
            }
        }) / 20.0
    };
    println!("bench | op | shape | ours ms | ours GB/s | cuBLAS ms | cuBLAS GB/s");
    const MS: [usize; 4] = [1, 2, 4, 8];
    let mut token = [[0.0; 2]; MS.len()]; // [m][ours, cuBLAS] ms per token
    let mut token_mbytes = 0.0;
    for (what, n, k, per_token) in [
        ("q/k/v fused", 12288, 4096, 32),
        ("o_proj", 4096, 4096, 32),
        ("gate/up fused", 22016, 4096, 32),
        ("down_proj", 4096, 11008, 32),
        ("lm_head", 32000, 4096, 1),
    ] {
        let w = randn(&[n, k], 30, 0.02).to_dtype(DType::BF16).unwrap().to_device(&dev).unwrap();
        let copies = (256usize << 20).div_ceil(n * k * 2);
        let wts: Vec<Tensor> = (0..copies).map(|_| w.copy().unwrap().t().unwrap()).collect();
        token_mbytes += (n * k * 2 * per_token) as f64 / 1e6;
        for (i, m) in MS.into_iter().enumerate() {
            let x = randn(&[m, k], 31, 1.0).to_dtype(DType::BF16).unwrap().to_device(&dev).unwrap();
            let mut call = 0;
            let ours = per_call(&mut || {
                call += 1;
                ops::matmul(&x, &wts[call % copies]).unwrap();
            });
            let cublas = per_call(&mut || {
                call += 1;
                x.matmul(&wts[call % copies]).unwrap();
            });
            token[i][0] += ours * per_token as f64;
            token[i][1] += cublas * per_token as f64;
            let mbytes = (n * k * 2) as f64 / 1e6; // MB over ms: GB/s
            println!(
                "bench | gemv {what} | M{m} N{n} K{k} bf16 | {ours:.4} | {:.0} | {cublas:.4} | {:.0}",
                mbytes / ours,
                mbytes / cublas
            );
        }
    }
    for (i, m) in MS.into_iter().enumerate() {
        println!(
            "bench | gemv per 7B token (32 layers + lm_head) | M{m} | {:.3} | {:.0} | {:.3} | {:.0}",
            token[i][0],
            token_mbytes / token[i][0],
            token[i][1],
            token_mbytes / token[i][1]
        );
    }
    println!("bench | op | shape | ours ms | - | composed ms | -");
    for (b, s) in [(1, 256), (1, 4096), (8, 256)] {
        let (h, d) = (32, 128);
        let on = |shape: &[usize], seed| {
            randn(shape, seed, 1.0).to_dtype(DType::BF16).unwrap().to_device(&dev).unwrap()
        };
        let q = on(&[b, h, 1, d], 32);
        let (kc, vc) = (on(&[b, h, s + 64, d], 33), on(&[b, h, s + 64, d], 34));
        let (k, v) = (kc.narrow(2, 0, s).unwrap(), vc.narrow(2, 0, s).unwrap());
        let scale = 1.0 / (d as f64).sqrt();
        let ours = per_call(&mut || {
            ops::attention::decode_attention(&q, &k, &v, scale).unwrap();
        });
        let composed = per_call(&mut || {
            let p = ops::softmax_last_dim_scaled(&q.matmul(&k.t().unwrap()).unwrap(), scale).unwrap();
            p.matmul(&v).unwrap().transpose(1, 2).unwrap().reshape((b, 1, h * d)).unwrap();
        });
        println!("bench | decode attention | B{b} H{h} S{s} D{d} bf16 | {ours:.4} | - | {composed:.4} | -");
    }
}

/// The attention and SwiGLU kernels timed on their own, outside candle's autograd (whose
/// `sum_all` of the probe product and gradient accumulation are inside `bench_kernels`'
/// fwd+bwd rows). Added after the measured run in BENCHMARKS.md: not yet run on a GPU.
#[test]
#[ignore]
fn bench_kernels_direct() {
    use ops::attention::{causal_attention_forward_with, wgmma_available, FlashBackward, FlashForward};
    let dev = gpu();
    let bf = DType::BF16;
    let on =
        |shape: &[usize], seed: u64| randn(shape, seed, 1.0).to_dtype(bf).unwrap().to_device(&dev).unwrap();
    let (b, h, t, d) = (2, 32, 2048, 128);
    let (q, k, v, g) =
        (on(&[b, h, t, d], 1), on(&[b, h, t, d], 2), on(&[b, h, t, d], 3), on(&[b, h, t, d], 4));
    let scale = 1.0 / (d as f64).sqrt();
    let flops_fwd = 4.0 * (b * h * t * t * d) as f64 / 2.0;
    // The wgmma variants only where they run their own kernels (else they would time others').
    let mut fwd_ms = 0.0;
    for variant in FlashForward::ALL.into_iter().filter(|f| !f.is_wgmma() || wgmma_available()) {
        let ms = time_ms(&dev, 3, 20, || {
            causal_attention_forward_with(variant, &q, &k, &v, scale).unwrap();
        });
        println!(
            "bench | attention fwd kernel ({variant:?}) | B{b} H{h} T{t} D{d} causal bf16 | {ms:.3} | {:.1} TFLOP/s",
            flops_fwd / ms / 1e9
        );
        if variant == FlashForward::MmaSync {
            fwd_ms = ms;
        }
    }
    let (o, lse) = ops::causal_attention_forward(&q, &k, &v, scale).unwrap();
    let fwd = fwd_ms;
    for variant in FlashBackward::ALL.into_iter().filter(|b| !b.is_wgmma() || wgmma_available()) {
        let bwd = time_ms(&dev, 3, 20, || {
            ops::attention::causal_attention_backward_with(variant, &q, &k, &v, &o, &lse, &g, scale).unwrap();
        });
        println!(
            "bench | attention bwd kernels ({variant:?}) | B{b} H{h} T{t} D{d} causal bf16 | {bwd:.3} | {:.1} TFLOP/s",
            2.5 * flops_fwd / bwd / 1e9
        );
        println!(
            "bench | attention fwd (mma) + bwd kernels ({variant:?}) | B{b} H{h} T{t} D{d} causal bf16 | {:.3} | {:.1} TFLOP/s",
            fwd + bwd,
            3.5 * flops_fwd / (fwd + bwd) / 1e9
        );
    }
    drop((q, k, v, g, o, lse));

    let (gate, up, dy) = (on(&[4096, 11008], 5), on(&[4096, 11008], 6), on(&[4096, 11008], 7));
    let ms = time_ms(&dev, 3, 50, || {
        ops::swiglu_backward(&gate, &up, &dy).unwrap();
    });
    println!(
        "bench | swiglu bwd kernel | [4096, 11008] bf16 | {ms:.3} | {:.0} GB/s",
        5.0 * 4096.0 * 11008.0 * 2.0 / ms / 1e6
    );
}

/// Where a 7B decoder layer's and a ViT-L/14-336 layer's time goes, part by part (bf16, device
/// synchronised around each timed call): the layer's GEMMs alone at its shapes (forward x·Wᵀ,
/// input gradient dy·W, weight gradient dyᵀ·x), the attention kernels, its element-wise ops
/// (norms, head splits with rope, merges, SwiGLU, adds) as often as a layer runs them, and the CLIP layer's
/// pieces (layer norm, attention block, MLP block, candle_nn's 3-D `Linear` against the same
/// product as one 2-D GEMM). `bench gpu-layer` / `bench neva-step` give the totals.
#[test]
#[ignore]
fn bench_layer_parts() {
    use candle_core::Module;
    use shardsmith::models::clip::{
        ClipActivation, ClipAttention, ClipEncoderLayer, ClipMlp, ClipVisionConfig,
    };
    let dev = gpu();
    let bf = DType::BF16;
    let on =
        |shape: &[usize], seed: u64| randn(shape, seed, 0.5).to_dtype(bf).unwrap().to_device(&dev).unwrap();

    // LLaMA-7B layer at B2 × S4096: (in, out, how many per layer).
    let m = 8192;
    let (mut fwd, mut dx, mut dw, mut flops) = (0.0, 0.0, 0.0, 0.0);
    // q/k/v as one product (the CUDA layer node's), o, gate and up, down.
    for (k, n, count) in [(4096, 12288, 1), (4096, 4096, 1), (4096, 11008, 2), (11008, 4096, 1)] {
        let (x, w, dy) = (on(&[m, k], 1), on(&[n, k], 2), on(&[m, n], 3));
        let f = time_ms(&dev, 3, 10, || {
            ops::matmul(&x, &w.t().unwrap()).unwrap();
        });
        let d = time_ms(&dev, 3, 10, || {
            ops::matmul(&dy, &w).unwrap();
        });
        let g = time_ms(&dev, 3, 10, || {
            ops::matmul(&dy.t().unwrap(), &x).unwrap();
        });
        let tf = |ms: f64| 2.0 * (m * n * k) as f64 / ms / 1e9;
        println!(
            "bench | gemm M{m} K{k} N{n} | x·Wᵀ {f:.3} ms {:.0} TFLOP/s | dy·W {d:.3} ms {:.0} | dyᵀ·x {g:.3} ms {:.0}",
            tf(f),
            tf(d),
            tf(g)
        );
        fwd += f * count as f64;
        dx += d * count as f64;
        dw += g * count as f64;
        flops += 2.0 * (m * n * k * count) as f64;
    }
    println!(
        "bench | 7B layer GEMMs B2×S4096 | fwd {fwd:.2} ms | dx {dx:.2} ms | dW {dw:.2} ms | all {:.2} ms, {:.0} TFLOP/s",
        fwd + dx + dw,
        3.0 * flops / (fwd + dx + dw) / 1e9
    );
    let (b, h, t, d) = (2, 32, 4096, 128);
    let (q, k, v, g) =
        (on(&[b, h, t, d], 4), on(&[b, h, t, d], 5), on(&[b, h, t, d], 6), on(&[b, h, t, d], 7));
    let scale = 1.0 / (d as f64).sqrt();
    let (o, lse) = ops::causal_attention_forward(&q, &k, &v, scale).unwrap();
    let af = time_ms(&dev, 2, 10, || {
        ops::causal_attention_forward(&q, &k, &v, scale).unwrap();
    });
    let ab = time_ms(&dev, 2, 10, || {
        ops::causal_attention_backward(&q, &k, &v, &o, &lse, &g, scale).unwrap();
    });
    let fl = 2.0 * (b * h * t * t * d) as f64;
    println!(
        "bench | 7B layer attention B2 H32 S4096 D128 | fwd {af:.2} ms {:.0} TFLOP/s | bwd {ab:.2} ms {:.0} TFLOP/s",
        fl / af / 1e9,
        2.5 * fl / ab / 1e9
    );
    drop((q, k, v, g, o, lse));

    // The same layer's element-wise work (forward_node in models/llama.rs: what neither the
    // GEMMs nor the attention kernels do), each op timed alone and summed by how often a layer's
    // forward and backward run it, so that layer time − GEMMs − attention can be split.
    let (x, w) = (on(&[b, t, h * d], 9), on(&[h * d], 10));
    let ffn = on(&[b, t, 11008], 11);
    let (cos, sin) = (on(&[t, d / 2], 12), on(&[t, d / 2], 13));
    let heads4 = on(&[b, h, t, d], 14);
    let mut per_layer = 0.0;
    let mut part = |what: &str, per: usize, f: &dyn Fn()| {
        let ms = time_ms(&dev, 3, 10, f);
        per_layer += ms * per as f64;
        println!("bench | 7B layer element-wise, B2×S4096 bf16 | {what} | {ms:.3} ms × {per} a layer");
    };
    part("RMSNorm forward [2, 4096, 4096]", 2, &|| {
        ops::rms_norm(&x, &w, 1e-5).unwrap();
    });
    part("RMSNorm backward (dx + the residual's gradient, dw)", 2, &|| {
        ops::rms_norm_backward(&x, &w, &x, 1e-5, true, Some(&x)).unwrap();
    });
    // What the one-pass kernel replaced (not counted in the layer's sum): a strided copy, then rope.
    let composed = time_ms(&dev, 3, 10, || {
        let y = x.reshape((b, t, h, d)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
        ops::rope(&y, &cos, &sin).unwrap();
    });
    println!("bench | 7B layer element-wise, B2×S4096 bf16 | composed head split + rope (before rope_heads) | {composed:.3} ms");
    part("split_heads with rope (q, k)", 2, &|| {
        ops::split_heads(&x, h, Some((&cos, &sin))).unwrap();
    });
    part("split_heads without rope (v, dout)", 2, &|| {
        ops::split_heads(&x, h, None).unwrap();
    });
    part("merge_heads (o)", 1, &|| {
        ops::merge_heads(&heads4).unwrap();
    });
    let rope = Some((&cos, &sin));
    part("split_heads_backward_cat (dq, dk rotated back, dv) into [2, 4096, 3·4096]", 1, &|| {
        ops::split_heads_backward_cat(&[(&heads4, rope), (&heads4, rope), (&heads4, None)]).unwrap();
    });
    part("SwiGLU forward [2, 4096, 11008]", 1, &|| {
        ops::swiglu(&ffn, &ffn).unwrap();
    });
    part("SwiGLU backward", 1, &|| {
        ops::swiglu_backward(&ffn, &ffn, &ffn).unwrap();
    });
    // Two residuals in the forward, gate's and up's input gradients summed in the backward.
    let candle_add = time_ms(&dev, 3, 10, &|| {
        (&x + &x).unwrap();
    });
    println!("bench | 7B layer element-wise, B2×S4096 bf16 | candle's add (before bias_act's) | {candle_add:.3} ms");
    part("add [2, 4096, 4096] (residuals, gradient sums)", 3, &|| {
        ops::add_detached(&x, &x).unwrap();
    });
    println!("bench | 7B layer element-wise, B2×S4096 bf16 | all, as often as a layer runs them | {per_layer:.2} ms");
    drop((x, w, ffn, cos, sin, heads4));

    // ViT-L/14-336 layer over 4 images: [4, 577, 1024], MLP 4096, 16 heads.
    let cfg = ClipVisionConfig {
        hidden_size: 1024,
        intermediate_size: 4096,
        num_hidden_layers: 1,
        num_attention_heads: 16,
        patch_size: 14,
        image_size: 336,
        num_channels: 3,
        layer_norm_eps: 1e-5,
        hidden_act: ClipActivation::QuickGelu,
    };
    let backend = std::sync::Arc::new(shardsmith::weights::RandomBackend::new(0.02, false));
    let vb = backend.var_builder(bf, &dev);
    let layer = ClipEncoderLayer::load(vb.pp("l"), &cfg).unwrap();
    let attn = ClipAttention::load(vb.pp("a"), &cfg).unwrap();
    let mlp = ClipMlp::load(vb.pp("m"), &cfg).unwrap();
    let x = on(&[4, 577, 1024], 8);
    let time = |what: &str, f: &dyn Fn()| {
        let ms = time_ms(&dev, 3, 20, f);
        println!("bench | ViT-L layer part, [4, 577, 1024] bf16 | {what} | {ms:.3} ms");
    };
    time("whole encoder layer", &|| {
        layer.forward(&x).unwrap();
    });
    time("attention block (fused q/k/v, flash kernel, out_proj + residual)", &|| {
        attn.forward(&x, Some(&x)).unwrap();
    });
    time("MLP block (fc1 + quick GELU, fc2 + residual)", &|| {
        mlp.forward(&x, Some(&x)).unwrap();
    });
    let ln = candle_nn::LayerNorm::new(
        Tensor::ones(1024, bf, &dev).unwrap(),
        Tensor::zeros(1024, bf, &dev).unwrap(),
        1e-5,
    );
    time("layer norm (candle_nn)", &|| {
        ln.forward(&x).unwrap();
    });
    let w = on(&[4096, 1024], 9);
    let lin = candle_nn::Linear::new(w.clone(), Some(on(&[4096], 10)));
    time("candle_nn Linear 1024→4096 on [4, 577, 1024] (+bias)", &|| {
        lin.forward(&x).unwrap();
    });
    let x2 = x.reshape((4 * 577, 1024)).unwrap();
    time("one 2-D GEMM 1024→4096 on [2308, 1024] (no bias)", &|| {
        ops::matmul(&x2, &w.t().unwrap()).unwrap();
    });
}
