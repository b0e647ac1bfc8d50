//! Fused SwiGLU, vocabulary cross-entropy and the AdamW step: each a CPU reference written here
//! and, with the `cuda` feature, a kernel of `kernels/` (swiglu.cu, cross_entropy.cu, adamw.cu).

use super::cpu_gemm::to_bf16;
use super::{contiguous, elementwise, par, vmath, Float, Operand};

/// Elements per parallel task of an element-wise loop.
const ELEMENTWISE_CHUNK: usize = 1 << 14;
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Device, InplaceOp1, Layout, Result, Shape, Tensor,
};
use std::cell::RefCell;
use std::sync::Mutex;

// ---------------------------------------------------------------------------------------------
// SwiGLU
// ---------------------------------------------------------------------------------------------

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    /// gate, up [...] → silu(gate)·up in f32, rounded once to the dtype.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() || s1.dtype() != s2.dtype() {
            bail!("swiglu: gate {:?} and up {:?} differ", l1.shape(), l2.shape());
        }
        let ins = [Operand::new(s1, l1, self.name())?, Operand::new(s2, l2, self.name())?];
        let dtype = s1.dtype();
        let out = elementwise(ins, 1, ELEMENTWISE_CHUNK, dtype, self.name(), |[g, u], out| {
            let y = &mut *out[0];
            // e^−g, vectorised; then silu(g) = g / (1 + e^−g), rounded to the input dtype before
            // the product, as torch's `act_fn(gate) * up` rounds its two ops (identity in f32).
            y.copy_from_slice(g);
            vmath::exp_affine_sum(y, -1.0, 0.0);
            match dtype {
                DType::BF16 => {
                    for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                        *y = to_bf16(g / (1.0 + *y)).to_f32() * u;
                    }
                }
                DType::F16 => {
                    for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                        *y = half::f16::from_f32(g / (1.0 + *y)).to_f32() * u;
                    }
                }
                _ => {
                    for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                        *y = g / (1.0 + *y) * u;
                    }
                }
            }
        })?;
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((super::cuda::swiglu_fwd(s1, l1, s2, l2)?, l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = swiglu_backward(gate, up, dy)?;
        Ok((Some(dg), Some(du)))
    }
}

/// (gate, up, dy) → [2, ...]: d gate, d up.
struct SwiGluBwd;

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "swiglu-backward"
    }

    /// σ = sigmoid(g): d up = dy·g·σ, d gate = dy·u·σ·(1 + g·(1 − σ)), in f32.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ins = [
            Operand::new(s1, l1, self.name())?,
            Operand::new(s2, l2, self.name())?,
            Operand::new(s3, l3, self.name())?,
        ];
        let out = elementwise(ins, 2, ELEMENTWISE_CHUNK, s1.dtype(), self.name(), |[g, u, dy], out| {
            let [dg, du] = out else { unreachable!("two outputs") };
            dg.copy_from_slice(g);
            vmath::exp_affine_sum(dg, -1.0, 0.0); // e^−g
            for ((((dg, du), &g), &u), &d) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dy) {
                let sig = 1.0 / (1.0 + *dg);
                *dg = d * u * (sig * (1.0 + g * (1.0 - sig)));
                *du = d * (g * sig);
            }
        })?;
        let mut dims = vec![2];
        dims.extend_from_slice(l1.dims());
        Ok((out, Shape::from(dims)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let mut dims = vec![2];
        dims.extend_from_slice(l1.dims());
        Ok((super::cuda::swiglu_bwd(s1, l1, s2, l2, s3, l3)?, Shape::from(dims)))
    }
}

/// (d gate, d up) of [`swiglu`] for the output gradient `dy`, in one pass (swiglu.cu on CUDA).
pub fn swiglu_backward(gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let dy = dy.to_dtype(gate.dtype())?.contiguous()?;
    let both = gate.contiguous()?.apply_op3_no_bwd(&up.contiguous()?, &dy, &SwiGluBwd)?; // [2, ...]
    let dg = both.narrow(0, 0, 1)?.reshape(gate.shape())?;
    let du = both.narrow(0, 1, 1)?.reshape(gate.shape())?;
    Ok((dg, du))
}

/// `silu(gate) · up` (the LLaMA MLP activation) fused: computed in f32 and rounded once;
/// differentiable in both inputs. gate and up share shape and dtype.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy over the vocabulary
// ---------------------------------------------------------------------------------------------

/// Labels that do not count (HF's and torch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

struct CrossEntropy {
    /// softmax − one-hot [N, V] in the logits' dtype, made by the forward for the backward.
    dlogits: Mutex<Option<Tensor>>,
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    /// logits [N, V], targets [N] i64 → loss [N] f32 (`lse − logit[target]`, 0 when ignored).
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let targets = match s2 {
            CpuStorage::I64(t) => contiguous(t, l2, self.name())?,
            other => bail!("cross-entropy: targets must be i64, got {:?}", other.dtype()),
        };
        if targets.len() != n {
            bail!("cross-entropy: {} targets for {n} rows of logits", targets.len());
        }
        if let Some(&t) = targets.iter().find(|&&t| t != IGNORE_INDEX && !(0..v as i64).contains(&t)) {
            bail!("cross-entropy: target {t} outside the vocabulary of {v}");
        }
        let (loss, dl) = with_float_slice!(s1, l1, self.name(), |x| {
            let (loss, dl) = cross_entropy_rows(x, targets, v);
            (loss, Tensor::from_vec(dl, (n, v), &Device::Cpu)?)
        });
        *self.dlogits.lock().expect("cross-entropy state") = Some(dl);
        Ok((CpuStorage::F32(loss), Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (loss, dl) = super::cuda::cross_entropy(s1, l1, s2, l2, IGNORE_INDEX)?;
        *self.dlogits.lock().expect("cross-entropy state") = Some(dl);
        Ok((loss, Shape::from(l1.dims()[0])))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        _t: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dl = self.dlogits.lock().expect("cross-entropy state").clone();
        let Some(dl) = dl else { bail!("cross-entropy: backward before forward") };
        // d logits = (softmax − one-hot) · d loss_row, scaled in f32.
        #[cfg(feature = "cuda")]
        if dl.device().is_cuda() {
            return Ok((Some(super::cuda::cross_entropy_bwd(&dl, g)?), None));
        }
        Ok((
            Some(
                dl.apply_op2_no_bwd(&g.to_dtype(DType::F32)?.contiguous()?, &ScaleRows)?
                    .to_dtype(logits.dtype())?,
            ),
            None,
        ))
    }
}

/// The CPU forward over rows of logits [N, V] in their storage dtype: per row the loss
/// `lse − x[target]` and `softmax − one-hot` rounded to the dtype (zeros for ignored rows),
/// in f32 with the vectorised exp, the outputs written once (no zero-fill, no f32 copy of the
/// logits or of the gradient).
fn cross_entropy_rows<T: Float>(x: &[T], targets: &[i64], v: usize) -> (Vec<f32>, Vec<T>) {
    let n = targets.len();
    let mut loss = vec![0f32; n];
    let mut dl: Vec<T> = Vec::with_capacity(n * v);
    par::chunks_mut2(&mut loss, 1, &mut dl.spare_capacity_mut()[..n * v], v, |r, loss, dl| {
        let t = targets[r];
        if t == IGNORE_INDEX {
            dl.iter_mut().for_each(|d| {
                d.write(T::default());
            });
            return;
        }
        ROW.with_borrow_mut(|e| {
            e.clear();
            e.extend(x[r * v..(r + 1) * v].iter().map(|&x| x.widen()));
            let m = vmath::max(e);
            let target = e[t as usize];
            // e ← exp(x − m); softmax = e / Σe, lse = m + ln Σe.
            let sum = vmath::exp_affine_sum(e, 1.0, m);
            let inv = 1.0 / sum;
            for (d, &e) in dl.iter_mut().zip(e.iter()) {
                d.write(T::narrow(e * inv));
            }
            dl[t as usize].write(T::narrow(e[t as usize] * inv - 1.0));
            loss[0] = m + sum.ln() - target;
        });
    });
    // SAFETY: every row of N·V elements was written above (ignored rows with zeros).
    unsafe { dl.set_len(n * v) };
    (loss, dl)
}

thread_local! {
    /// A row of logits widened to f32, reused across rows and calls.
    static ROW: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// dl [N, V] (any float dtype) × g [N] f32, row by row, rounded to dl's dtype once (the CPU
/// half of the cross-entropy backward; one pass instead of a widening, a broadcast multiply
/// and a rounding).
struct ScaleRows;

impl CustomOp2 for ScaleRows {
    fn name(&self) -> &'static str {
        "cross-entropy-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let CpuStorage::F32(g) = s2 else { bail!("{}: the row scales must be f32", self.name()) };
        let g = contiguous(g, l2, self.name())?;
        if g.len() != n {
            bail!("{}: {} scales for {n} rows", self.name(), g.len());
        }
        fn scale<T: Float>(x: &[T], g: &[f32], v: usize) -> Vec<T> {
            let mut out: Vec<T> = Vec::with_capacity(x.len());
            par::chunks_mut(&mut out.spare_capacity_mut()[..x.len()], v, |r, o| {
                for (o, &x) in o.iter_mut().zip(&x[r * v..(r + 1) * v]) {
                    o.write(T::narrow(x.widen() * g[r]));
                }
            });
            // SAFETY: the rows cover all N·V elements, each written above.
            unsafe { out.set_len(x.len()) };
            out
        }
        let out = match s1 {
            CpuStorage::F32(x) => CpuStorage::F32(scale(contiguous(x, l1, self.name())?, g, v)),
            CpuStorage::BF16(x) => CpuStorage::BF16(scale(contiguous(x, l1, self.name())?, g, v)),
            CpuStorage::F16(x) => CpuStorage::F16(scale(contiguous(x, l1, self.name())?, g, v)),
            other => bail!("{}: unsupported dtype {:?}", self.name(), other.dtype()),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// Per-row softmax cross-entropy of logits [N, V] against targets `[N]` (any integer dtype;
/// [`IGNORE_INDEX`] rows give 0): loss `[N]` f32, differentiable in the logits. The forward also
/// makes d loss / d logits (one pass over the vocabulary; kept until the graph is dropped).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let targets = targets.to_dtype(DType::I64)?.contiguous()?;
    logits.contiguous()?.apply_op2(&targets, CrossEntropy { dlogits: Mutex::new(None) })
}

/// Mean cross-entropy over the rows whose target is not [`IGNORE_INDEX`] (torch's
/// `cross_entropy(..., ignore_index=-100)`), and that count; `None` when no row counts (the
/// caller says what that means for its data).
pub fn cross_entropy_mean(logits: &Tensor, targets: &Tensor) -> Result<Option<(Tensor, usize)>> {
    let targets = targets.to_dtype(DType::I64)?;
    let count = targets.ne(IGNORE_INDEX)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()? as usize;
    if count == 0 {
        return Ok(None);
    }
    Ok(Some(((cross_entropy(logits, &targets)?.sum_all()? / count as f64)?, count)))
}

// ---------------------------------------------------------------------------------------------
// AdamW
// ---------------------------------------------------------------------------------------------

/// One AdamW update of one parameter, with `train::optim::AdamW`'s (torch's) semantics.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    /// Learning rate.
    pub lr: f64,
    /// (β1, β2).
    pub betas: (f64, f64),
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay of this parameter (0 = none).
    pub weight_decay: f64,
    /// The step count after this update (1 on the first).
    pub step: u64,
    /// Multiplies the gradient (in f32) before the update: gradient-norm clipping's factor,
    /// applied here instead of in a pass of its own (torch's `grad.mul_(clip_coef)` rounds the
    /// same way). 1 = none.
    pub grad_scale: f32,
}

/// The step's scalars, formed in f64 like Python floats and rounded to f32 as torch does; the
/// kernel and the CPU reference both take exactly these.
#[derive(Clone, Copy, Debug)]
pub(super) struct AdamWScalars {
    pub grad_scale: f32,
    pub decay: Option<f32>,
    pub w: f32,
    pub one_minus_w: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    pub neg_step_size: f32,
    pub bc2_sqrt: f32,
    pub eps: f32,
}

impl AdamWStep {
    fn scalars(&self) -> AdamWScalars {
        let (beta1, beta2) = self.betas;
        let t = self.step as f64;
        let w = (1.0 - beta1) as f32;
        AdamWScalars {
            grad_scale: self.grad_scale,
            decay: (self.weight_decay != 0.0).then_some((1.0 - self.lr * self.weight_decay) as f32),
            w,
            one_minus_w: 1.0f32 - w,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            neg_step_size: (-(self.lr / (1.0 - beta1.powf(t)))) as f32,
            bc2_sqrt: (1.0 - beta2.powf(t)).powf(0.5) as f32,
            eps: self.eps as f32,
        }
    }
}

/// The CPU reference of the fused step: p, m (exp_avg), v (exp_avg_sq) updated in place from g,
/// in torch's operation order with f32 rounding after every operation (see adamw.cu).
pub fn adamw_step_ref(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], step: &AdamWStep) {
    let s = step.scalars();
    let (mp, vp) = (par::SendPtr::new(m), par::SendPtr::new(v));
    par::chunks_mut(p, ELEMENTWISE_CHUNK, |c, p| {
        let at = c * ELEMENTWISE_CHUNK;
        // SAFETY: chunk c of m and v, like p's, is touched by this task only.
        let (m, v) = unsafe { (mp.slice(at, p.len()), vp.slice(at, p.len())) };
        let g = &g[at..at + p.len()];
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX512-F (checked just above).
            return unsafe { adamw_chunk_avx512(p, g, m, v, &s) };
        }
        adamw_chunk(p, g, m, v, &s);
    });
}

/// [`adamw_chunk`] compiled for AVX512-F. The crate targets baseline x86-64, where this loop
/// vectorises to SSE at best and `sqrt`/`div` stayed scalar (`sqrtss`): the update of a 134M
/// model took longer than torch's. IEEE `+ − × ÷ √` round the same in every lane width and
/// Rust never contracts to FMA, so both builds give identical bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn adamw_chunk_avx512(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamWScalars) {
    adamw_chunk(p, g, m, v, s)
}

/// One chunk of the update, branch-free inside the loop so it vectorises: decay and the
/// gradient scale multiply by 1 when off (exact), and torch's two `lerp` branches are two
/// instances of the loop.
#[inline(always)]
fn adamw_chunk(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamWScalars) {
    #[inline(always)]
    fn run<const FROM_M: bool>(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamWScalars) {
        let n = p.len();
        let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
        let decay = s.decay.unwrap_or(1.0);
        for i in 0..n {
            let g = g[i] * s.grad_scale;
            let diff = g - m[i];
            m[i] = if FROM_M { m[i] + diff * s.w } else { g - diff * s.one_minus_w };
            v[i] = v[i] * s.beta2 + (g * s.one_minus_beta2) * g;
            let denom = v[i].sqrt() / s.bc2_sqrt + s.eps;
            p[i] = p[i] * decay + (m[i] * s.neg_step_size) / denom;
        }
    }
    if s.w < 0.5 {
        run::<true>(p, g, m, v, s)
    } else {
        run::<false>(p, g, m, v, s)
    }
}

/// A write-locked storage handed to [`with_mut`]'s closure.
enum Dst<'a> {
    Cpu(&'a mut CpuStorage),
    #[cfg(feature = "cuda")]
    Cuda(&'a mut candle_core::CudaStorage),
}

/// An in-place op that runs a closure on the storage it is given.
struct WithMut<F>(RefCell<Option<F>>);

impl<F: for<'a, 'b> FnOnce(Dst<'a>, &'b Layout) -> Result<()>> InplaceOp1 for WithMut<F> {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        match self.0.borrow_mut().take() {
            Some(f) => f(Dst::Cpu(s), l),
            None => bail!("adamw: in-place closure ran twice"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &mut candle_core::CudaStorage, l: &Layout) -> Result<()> {
        match self.0.borrow_mut().take() {
            Some(f) => f(Dst::Cuda(s), l),
            None => bail!("adamw: in-place closure ran twice"),
        }
    }
}

/// Run `f` on `t`'s storage, write-locked (candle's in-place op machinery).
fn with_mut<F: for<'a, 'b> FnOnce(Dst<'a>, &'b Layout) -> Result<()>>(t: &Tensor, f: F) -> Result<()> {
    t.inplace_op1(&WithMut(RefCell::new(Some(f))))
}

fn f32_slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout, what: &str) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(v) = s else { bail!("adamw: {what} must be f32") };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut v[a..b]),
        None => bail!("adamw: {what} must be contiguous"),
    }
}

/// One fused AdamW step, in place on the f32 master `p` and its moments `m` (exp_avg) and `v`
/// (exp_avg_sq), from the gradient `g` (any float dtype, widened to f32). On CUDA one kernel
/// reads p, g, m, v once and writes p, m, v once (adamw.cu); on the CPU it is
/// [`adamw_step_ref`]. p, m and v must be distinct tensors (each is write-locked in turn).
pub fn adamw_step(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, step: &AdamWStep) -> Result<()> {
    let n = p.elem_count();
    if g.elem_count() != n || m.elem_count() != n || v.elem_count() != n {
        bail!(
            "adamw: parameter {:?}, grad {:?}, exp_avg {:?}, exp_avg_sq {:?} differ",
            p.shape(),
            g.shape(),
            m.shape(),
            v.shape()
        );
    }
    if p.id() == m.id() || p.id() == v.id() || m.id() == v.id() {
        bail!("adamw: the parameter and its two moments must be distinct tensors");
    }
    let g = g.to_dtype(DType::F32)?.contiguous()?;
    with_mut(p, move |pd, pl| {
        with_mut(m, move |md, ml| {
            with_mut(v, move |vd, vl| match (pd, md, vd) {
                (Dst::Cpu(ps), Dst::Cpu(ms), Dst::Cpu(vs)) => {
                    let (gs, gl) = g.storage_and_layout();
                    let candle_core::Storage::Cpu(CpuStorage::F32(gv)) = &*gs else {
                        bail!("adamw: grad on another device")
                    };
                    let (a, b) = gl.contiguous_offsets().expect("made contiguous above");
                    let p = f32_slice_mut(ps, pl, "the parameter")?;
                    let m = f32_slice_mut(ms, ml, "exp_avg")?;
                    let v = f32_slice_mut(vs, vl, "exp_avg_sq")?;
                    adamw_step_ref(p, &gv[a..b], m, v, step);
                    Ok(())
                }
                #[cfg(feature = "cuda")]
                (Dst::Cuda(ps), Dst::Cuda(ms), Dst::Cuda(vs)) => {
                    let (gs, gl) = g.storage_and_layout();
                    let candle_core::Storage::Cuda(gs) = &*gs else { bail!("adamw: grad on another device") };
                    super::cuda::adamw(ps, pl, gs, gl, ms, ml, vs, vl, &step.scalars())
                }
                #[allow(unreachable_patterns)]
                _ => bail!("adamw: the parameter, its moments and its grad must share a device"),
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{max_diff, randn};
    use candle_core::{Var, D};

    #[test]
    fn swiglu_matches_composed_silu_times_up_with_gradients() {
        let gate = Var::from_tensor(&(randn(&[3, 7, 5], 1) * 4.0).unwrap()).unwrap();
        let up = Var::from_tensor(&randn(&[3, 7, 5], 2)).unwrap();
        let probe = randn(&[3, 7, 5], 3);
        let run = |fused: bool| {
            let y = if fused {
                swiglu(gate.as_tensor(), up.as_tensor()).unwrap()
            } else {
                (candle_nn::ops::silu(gate.as_tensor()).unwrap() * up.as_tensor()).unwrap()
            };
            let grads = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            (y, grads.get(&gate).unwrap().clone(), grads.get(&up).unwrap().clone())
        };
        let (y1, dg1, du1) = run(true);
        let (y2, dg2, du2) = run(false);
        assert!(max_diff(&y1, &y2) < 1e-6);
        assert!(max_diff(&dg1, &dg2) < 1e-5);
        assert!(max_diff(&du1, &du2) < 1e-6);
    }

    /// bf16 over several element-wise chunks (and a ragged tail): the f32 computation with
    /// torch's two roundings, to within one bf16 rounding (the exp's last bits may flip one);
    /// the backward within bf16 rounding of the f32 formula.
    #[test]
    fn swiglu_bf16_across_chunks() {
        let n = 3 * ELEMENTWISE_CHUNK + 77;
        let bf = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
        let (g, u, dy) = (bf((randn(&[n], 4) * 6.0).unwrap()), bf(randn(&[n], 5)), bf(randn(&[n], 6)));
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        let (gv, uv, dv) = (f(&g), f(&u), f(&dy));
        let y = f(&swiglu(&g, &u).unwrap());
        let (dg, du) = swiglu_backward(&g, &u, &dy).unwrap();
        let (dg, du) = (f(&dg), f(&du));
        let r = |x: f32| half::bf16::from_f32(x).to_f32();
        for i in 0..n {
            let (gi, ui, di) = (gv[i] as f64, uv[i] as f64, dv[i] as f64);
            let sig = 1.0 / (1.0 + (-gi).exp());
            let want = r(r((gi * sig) as f32) * ui as f32);
            assert!((y[i] - want).abs() <= want.abs() / 128.0 + 1e-30, "y[{i}] {} vs {want}", y[i]);
            let want_dg = di * ui * sig * (1.0 + gi * (1.0 - sig));
            let want_du = di * gi * sig;
            assert!((dg[i] as f64 - want_dg).abs() <= want_dg.abs() / 128.0 + 1e-6, "dg[{i}]");
            assert!((du[i] as f64 - want_du).abs() <= want_du.abs() / 128.0 + 1e-6, "du[{i}]");
        }
    }

    #[test]
    fn cross_entropy_matches_log_softmax_with_ignore_index() {
        let logits = Var::from_tensor(&(randn(&[6, 11], 4) * 3.0).unwrap()).unwrap();
        let targets = Tensor::new(&[3i64, -100, 0, 10, 5, -100], &Device::Cpu).unwrap();
        let (loss, count) = cross_entropy_mean(logits.as_tensor(), &targets).unwrap().unwrap();
        assert_eq!(count, 4);
        let grads = loss.backward().unwrap();
        let ours = grads.get(&logits).unwrap().clone();

        let logp = candle_nn::ops::log_softmax(logits.as_tensor(), D::Minus1).unwrap();
        let keep = Tensor::new(&[1f32, 0., 1., 1., 1., 0.], &Device::Cpu).unwrap();
        let safe = Tensor::new(&[3u32, 0, 0, 10, 5, 0], &Device::Cpu).unwrap();
        let picked = logp.gather(&safe.unsqueeze(1).unwrap(), 1).unwrap().squeeze(1).unwrap();
        let want = ((picked * keep).unwrap().sum_all().unwrap().neg().unwrap() / 4.0).unwrap();
        let grads = want.backward().unwrap();
        assert!(max_diff(&loss, &want) < 1e-5);
        assert!(max_diff(&ours, grads.get(&logits).unwrap()) < 1e-6);

        let bad = Tensor::new(&[11i64, 0, 0, 0, 0, 0], &Device::Cpu).unwrap();
        let err = cross_entropy(logits.as_tensor(), &bad).unwrap_err().to_string();
        assert!(err.contains("target 11 outside the vocabulary of 11"), "{err}");
    }

    /// The fused step is bit-identical to the optimizer's tensor-op step (with and without decay,
    /// with and without a clipping factor on the gradient).
    #[test]
    fn fused_adamw_matches_composed_tensor_ops_bit_for_bit() {
        // torch's `_single_tensor_adam` order (the optimizer module docs), one tensor op at a
        // time with f32 rounding after each: the fused loop must give the same bits, on a
        // size that spans several parallel chunks.
        let n = 3 * ELEMENTWISE_CHUNK + 77;
        let f32s = |x: f64| x as f32 as f64;
        for wd in [0.0, 0.1] {
            let (beta1, beta2) = cfg_betas();
            let p = randn(&[n], 5);
            let (m, v) = (p.zeros_like().unwrap(), p.zeros_like().unwrap());
            let (mut rp, mut rm, mut rv) = (p.copy().unwrap(), m.copy().unwrap(), v.copy().unwrap());
            for step in 1..=4u64 {
                let g = randn(&[n], 10 + step);
                let lr = 1e-3 * step as f64;
                let grad_scale = if step % 2 == 0 { 0.37f32 } else { 1.0 };
                let hyper =
                    AdamWStep { lr, betas: cfg_betas(), eps: 1e-8, weight_decay: wd, step, grad_scale };
                adamw_step(&p, &g, &m, &v, &hyper).unwrap();
                // torch's clip_grad_norm_: `grad.mul_(clip_coef)` before the step.
                let g = g.affine(grad_scale as f64, 0.0).unwrap();
                if wd != 0.0 {
                    rp = rp.affine(f32s(1.0 - lr * wd), 0.0).unwrap();
                }
                let w = (1.0 - beta1) as f32;
                let diff = (&g - &rm).unwrap();
                rm = if w < 0.5 {
                    (&rm + diff.affine(w as f64, 0.0).unwrap()).unwrap()
                } else {
                    (&g - diff.affine((1.0f32 - w) as f64, 0.0).unwrap()).unwrap()
                };
                let gg = (g.affine(f32s(1.0 - beta2), 0.0).unwrap() * &g).unwrap();
                rv = (rv.affine(f32s(beta2), 0.0).unwrap() + gg).unwrap();
                let t = step as f64;
                let step_size = lr / (1.0 - beta1.powf(t));
                let bc2_sqrt = Tensor::new((1.0 - beta2.powf(t)).powf(0.5) as f32, &Device::Cpu).unwrap();
                let eps = Tensor::new(1e-8f32, &Device::Cpu).unwrap();
                let denom = rv.sqrt().unwrap().broadcast_div(&bc2_sqrt).unwrap().broadcast_add(&eps).unwrap();
                rp = (rp + rm.affine(f32s(-step_size), 0.0).unwrap().div(&denom).unwrap()).unwrap();
            }
            assert_eq!(max_diff(&p, &rp), 0.0, "param, wd {wd}");
            assert_eq!(max_diff(&m, &rm), 0.0, "exp_avg, wd {wd}");
            assert_eq!(max_diff(&v, &rv), 0.0, "exp_avg_sq, wd {wd}");
        }
    }

    fn cfg_betas() -> (f64, f64) {
        (0.9, 0.95)
    }
}
