//! AdamW with `torch.optim.AdamW` semantics, gradient-norm clipping like
//! `torch.nn.utils.clip_grad_norm_`, and NeMo's "BF16 O2" master weights.
//!
//! The update is one fused pass per parameter ([`crate::ops::adamw_step`]: a CUDA kernel, or its
//! CPU reference); clipping's norm is a parallel f64 sum on the CPU and tensor ops elsewhere.
//!
//! **AdamW** (torch 2.x `_single_tensor_adam`, `decoupled_weight_decay=True`, amsgrad off; the
//! CPU path, since torch uses it for CPU tensors), per parameter `p` with gradient `g`, step
//! count `t` (incremented first, so 1 on the first update), all tensors fp32:
//! ```text
//! p ← p · (1 − lr·wd)                                 param.mul_(1 - lr * weight_decay)
//! m ← lerp(m, g, 1 − β1)                              exp_avg.lerp_(grad, 1 - beta1)
//! v ← v·β2 + (1 − β2)·g·g                             exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
//! bc1 = 1 − β1^t,  bc2 = 1 − β2^t                     (python float pow)
//! denom = sqrt(v) / sqrt(bc2) + eps                   (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
//! p ← p − (lr / bc1) · m / denom                      param.addcdiv_(exp_avg, denom, value=-step_size)
//! ```
//! The scalars are computed in f64 like Python floats and enter the f32 kernels rounded to f32,
//! and the operations keep torch's order (`lerp`'s two branches, `(value · m) / denom`), so a
//! trace matches torch to a few f32 ulps. A parameter with no gradient is skipped entirely (no
//! decay, no step count), as in torch.
//!
//! **Clipping** (`clip_grad_norm_` with norm type 2, `foreach=None`): `total = ‖(‖g_i‖₂)_i‖₂`,
//! `coef = max_norm / (total + 1e-6)`, and when `coef < 1` every gradient is multiplied by it
//! (here inside the next fused step, not as a pass of its own). torch computes in f32; here the sums of squares are accumulated in f64 and the total rounded
//! to f32 (torch's cascade summation is close to exact, a naive f32 sum over millions of
//! elements is not), then `coef` is formed in f32 as torch does.
//!
//! **BF16 O2** ([`MasterWeights`]): the trainable weights live as fp32 [`Var`]s (the masters,
//! what AdamW updates); the model computes with a bf16 copy held in a bf16 `Var` of its own.
//! Backprop yields bf16 gradients for the copies; [`GradAccumulator::add`] converts them to f32
//! and sums the micro-batches in f32 (Megatron's fp32 `main_grad`), keyed by the masters; after
//! each optimizer step [`MasterWeights::refresh`] writes the masters back into the copies in
//! place, so a model built once over [`MasterWeights::compute_tensors`] sees the new weights.
//! In f32 the copies are the masters themselves.

use super::metrics::write_atomically;
use crate::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// AdamW hyper-parameters (the learning rate is passed to each [`AdamW::step`]).
#[derive(Debug, Clone, PartialEq)]
pub struct AdamWConfig {
    /// β1, β2.
    pub betas: (f64, f64),
    /// Added to the bias-corrected square root of the second moment.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Parameters whose name contains one of these get no weight decay.
    pub no_decay_patterns: Vec<String>,
}

impl Default for AdamWConfig {
    /// torch's defaults except weight decay (0 here, 0.01 in torch).
    fn default() -> Self {
        AdamWConfig { betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.0, no_decay_patterns: Vec::new() }
    }
}

impl AdamWConfig {
    /// From `optim:` of the train config.
    pub fn from_config(o: &super::config::OptimConfig) -> Self {
        AdamWConfig {
            betas: (o.betas[0], o.betas[1]),
            eps: o.eps,
            weight_decay: o.weight_decay,
            no_decay_patterns: o.no_decay_patterns.clone(),
        }
    }

    /// The weight decay that applies to parameter `name`.
    pub fn weight_decay_for(&self, name: &str) -> f64 {
        if self.no_decay_patterns.iter().any(|p| name.contains(p.as_str())) {
            0.0
        } else {
            self.weight_decay
        }
    }
}

struct ParamState {
    name: String,
    var: Var,
    weight_decay: f64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: u64,
}

/// AdamW over fp32 master weights with fp32 moments.
pub struct AdamW {
    params: Vec<ParamState>,
    cfg: AdamWConfig,
    /// The clipping factor [`AdamW::clip_grad_norm`] found, and the id of the first gradient
    /// it was found for (`step` applies it to those gradients only).
    clip: Option<(f32, candle_core::TensorId)>,
}

const STATE_PREFIXES: [&str; 4] = ["exp_avg.", "exp_avg_sq.", "step.", "param."];

impl AdamW {
    /// An optimizer over `params` (fp32 `Var`s with unique names); moments start at zero.
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let mut seen = HashSet::new();
        let mut states = Vec::with_capacity(params.len());
        for (name, var) in params {
            if !seen.insert(name.clone()) {
                return Err(Error::Usage(format!("optimizer: parameter '{name}' is listed twice")));
            }
            if var.dtype() != DType::F32 {
                return Err(Error::Weight {
                    tensor: name,
                    expected: "an f32 master weight".into(),
                    got: format!("{:?}", var.dtype()),
                });
            }
            // Two distinct buffers: the fused step updates them in place.
            let (exp_avg, exp_avg_sq) = (var.as_tensor().zeros_like()?, var.as_tensor().zeros_like()?);
            states.push(ParamState {
                weight_decay: cfg.weight_decay_for(&name),
                name,
                exp_avg,
                exp_avg_sq,
                var,
                step: 0,
            });
        }
        Ok(AdamW { params: states, cfg, clip: None })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// The parameters, in the order given to [`AdamW::new`].
    pub fn params(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.params.iter().map(|p| (p.name.as_str(), &p.var))
    }

    /// The number of updates parameter `name` has received (torch's `state['step']`).
    pub fn step_count(&self, name: &str) -> Option<u64> {
        self.params.iter().find(|p| p.name == name).map(|p| p.step)
    }

    /// The moments `(exp_avg, exp_avg_sq)` of parameter `name`.
    pub fn moments(&self, name: &str) -> Option<(&Tensor, &Tensor)> {
        self.params.iter().find(|p| p.name == name).map(|p| (&p.exp_avg, &p.exp_avg_sq))
    }

    /// The pre-clip global L2 norm of the parameters' gradients in `grads`, and clipping to
    /// `max_norm` when given (see the module docs). `grads` is not rewritten: the factor
    /// multiplies each gradient inside the next [`AdamW::step`]'s fused pass (f32, rounded as
    /// torch's `grad.mul_(clip_coef)`), which saves a read and a write of every gradient.
    /// Non-finite norms are returned as they are; the caller decides whether to step.
    pub fn clip_grad_norm(&mut self, grads: &GradStore, max_norm: Option<f64>) -> Result<f64> {
        let (norm, coef) = clip_factor(grads, self.params.iter().map(|p| p.var.as_tensor()), max_norm)?;
        self.clip = coef.zip(self.first_grad_id(grads));
        Ok(norm)
    }

    /// The id of the first parameter's gradient in `grads`: what ties a clipping factor to the
    /// gradients it was computed from.
    fn first_grad_id(&self, grads: &GradStore) -> Option<candle_core::TensorId> {
        self.params.iter().find_map(|p| grads.get(p.var.as_tensor())).map(|g| g.id())
    }

    /// One AdamW update of every parameter that has a gradient in `grads`, at learning rate `lr`,
    /// with the gradients clipped when [`AdamW::clip_grad_norm`] was last called on these same
    /// gradients (a factor found for other gradients, say of a skipped step, is dropped).
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let grad_scale = match self.clip.take() {
            Some((coef, id)) if self.first_grad_id(grads) == Some(id) => coef,
            _ => 1.0,
        };
        for st in &mut self.params {
            let Some(grad) = grads.get(st.var.as_tensor()) else { continue };
            if grad.dims() != st.var.dims() {
                return Err(Error::Weight {
                    tensor: st.name.clone(),
                    expected: format!("a gradient of shape {:?}", st.var.dims()),
                    got: format!("{:?}", grad.dims()),
                });
            }
            st.step += 1;
            // One pass reading p, g, m, v once and writing p, m, v once (adamw.cu on CUDA,
            // `adamw_step_ref` on the CPU), instead of a dozen tensor ops each allocating a
            // parameter-sized temporary: a tenth of a 134M CPU train step.
            let hyper = crate::ops::AdamWStep {
                lr,
                betas: self.cfg.betas,
                eps: self.cfg.eps,
                weight_decay: st.weight_decay,
                step: st.step,
                grad_scale,
            };
            crate::ops::adamw_step(st.var.as_tensor(), &grad.detach(), &st.exp_avg, &st.exp_avg_sq, &hyper)?;
        }
        Ok(())
    }

    /// Every state tensor, for a resume file: `exp_avg.<name>`, `exp_avg_sq.<name>` (f32),
    /// `step.<name>` (i64 scalar) and, with `include_params`, the master weight `param.<name>`.
    pub fn state_tensors(&self, include_params: bool) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for p in &self.params {
            out.insert(format!("exp_avg.{}", p.name), p.exp_avg.clone());
            out.insert(format!("exp_avg_sq.{}", p.name), p.exp_avg_sq.clone());
            out.insert(format!("step.{}", p.name), Tensor::new(p.step as i64, &Device::Cpu)?);
            if include_params {
                out.insert(format!("param.{}", p.name), p.var.as_tensor().detach());
            }
        }
        Ok(out)
    }

    /// Restores [`AdamW::state_tensors`]: every parameter's moments and step must be there with
    /// matching shapes, and nothing else; `param.*` entries, when present (all or none), also
    /// restore the master weights. Bit-exact.
    pub fn load_state_tensors(&mut self, mut map: HashMap<String, Tensor>, origin: &Path) -> Result<()> {
        let bad = |detail: String| Error::config(origin, detail);
        let with_params = self.params.iter().any(|p| map.contains_key(&format!("param.{}", p.name)));
        let mut restored = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let mut take = |prefix: &str, want: DType, shape: &[usize]| -> Result<Tensor> {
                let key = format!("{prefix}{}", p.name);
                let t = map.remove(&key).ok_or_else(|| bad(format!("optimizer state has no '{key}'")))?;
                if t.dtype() != want || t.dims() != shape {
                    return Err(bad(format!(
                        "optimizer state '{key}': expected {want:?} {shape:?}, got {:?} {:?}",
                        t.dtype(),
                        t.dims()
                    )));
                }
                Ok(t.to_device(p.var.device())?)
            };
            let dims = p.var.dims();
            let m = take("exp_avg.", DType::F32, dims)?;
            let v = take("exp_avg_sq.", DType::F32, dims)?;
            let step = take("step.", DType::I64, &[])?.to_device(&Device::Cpu)?.to_scalar::<i64>()?;
            let step = u64::try_from(step)
                .map_err(|_| bad(format!("optimizer state 'step.{}' is {step}", p.name)))?;
            let param = if with_params { Some(take("param.", DType::F32, dims)?) } else { None };
            restored.push((m, v, step, param));
        }
        if let Some(extra) = map.keys().min() {
            return Err(bad(format!(
                "optimizer state has '{extra}', which is not a trained parameter of this run ({} entries left \
                 over; a different stage or model?)",
                map.len()
            )));
        }
        for (p, (m, v, step, param)) in self.params.iter_mut().zip(restored) {
            p.exp_avg = m;
            p.exp_avg_sq = v;
            p.step = step;
            if let Some(w) = param {
                p.var.set(&w)?;
            }
        }
        Ok(())
    }

    /// Writes [`AdamW::state_tensors`] to a safetensors file, atomically.
    pub fn save_state(&self, path: &Path, include_params: bool) -> Result<()> {
        let map = self.state_tensors(include_params)?;
        write_atomically(path, |tmp| Ok(candle_core::safetensors::save(&map, tmp)?))
    }

    /// Reads a file written by [`AdamW::save_state`].
    pub fn load_state(&mut self, path: &Path) -> Result<()> {
        let map = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| Error::config(path, format!("reading optimizer state: {e}")))?;
        if map.keys().any(|k| !STATE_PREFIXES.iter().any(|p| k.starts_with(p))) {
            let k = map.keys().filter(|k| !STATE_PREFIXES.iter().any(|p| k.starts_with(p))).min().unwrap();
            return Err(Error::config(path, format!("'{k}' is not an optimizer state entry")));
        }
        self.load_state_tensors(map, path)
    }
}

/// `torch.nn.utils.clip_grad_norm_`'s arithmetic over the gradients of `params` present in
/// `grads` (see the module docs): the pre-clip total norm, and with `max_norm` the factor torch
/// would multiply every gradient by (`None` when the norm is within the limit, or not finite:
/// `coef < 1` is false for NaN).
pub fn clip_factor<'a>(
    grads: &GradStore,
    params: impl IntoIterator<Item = &'a Tensor>,
    max_norm: Option<f64>,
) -> Result<(f64, Option<f32>)> {
    let mut sum_sq = 0f64;
    for g in params.into_iter().filter_map(|p| grads.get(p)) {
        sum_sq += sum_of_squares(g)?;
    }
    let total = sum_sq.sqrt() as f32;
    let coef = max_norm.map(|max_norm| max_norm as f32 / (total + 1e-6f32)).filter(|&coef| coef < 1.0);
    Ok((total as f64, coef))
}

/// Σ x² of a float tensor, accumulated in f64. On the CPU it reads the storage in place, in
/// fixed 64 Ki-element chunks whose partial sums are added in order, each chunk summed in 16
/// interleaved lanes (one running sum is a chain of dependent adds, 4× slower than memory): the
/// same result for any thread count and CPU. Elsewhere it is the tensor-op version, which copies
/// the gradient to f64.
fn sum_of_squares(t: &Tensor) -> Result<f64> {
    use candle_core::{CpuStorage, Storage};
    fn chunked<T: Copy + Sync>(v: &[T], widen: impl Fn(T) -> f64 + Copy + Sync) -> f64 {
        const CHUNK: usize = 1 << 16;
        let mut parts = vec![0f64; v.len().div_ceil(CHUNK)];
        crate::ops::par::chunks_mut(&mut parts, 1, |i, part| {
            let chunk = &v[i * CHUNK..((i + 1) * CHUNK).min(v.len())];
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX512-F (checked just above).
                part[0] = unsafe { lanes_avx512(chunk, widen) };
                return;
            }
            part[0] = lanes(chunk, widen);
        });
        parts.iter().sum()
    }
    /// [`lanes`] built for AVX512-F (the crate's baseline x86-64 target vectorises it to SSE).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn lanes_avx512<T: Copy>(v: &[T], widen: impl Fn(T) -> f64) -> f64 {
        lanes(v, widen)
    }
    #[inline(always)]
    fn lanes<T: Copy>(v: &[T], widen: impl Fn(T) -> f64) -> f64 {
        let mut acc = [0f64; 16];
        let mut rows = v.chunks_exact(16);
        for row in &mut rows {
            for (a, &x) in acc.iter_mut().zip(row) {
                *a += widen(x) * widen(x);
            }
        }
        for (a, &x) in acc.iter_mut().zip(rows.remainder()) {
            *a += widen(x) * widen(x);
        }
        acc.iter().sum()
    }
    if t.device().is_cpu() {
        let t = t.contiguous()?;
        let (storage, layout) = t.storage_and_layout();
        let (start, end) = layout.contiguous_offsets().expect("made contiguous above");
        // bf16/f16 → f64 through f32 (exact); bf16 by its bits, which vectorises.
        let sum = match &*storage {
            Storage::Cpu(CpuStorage::F32(v)) => Some(chunked(&v[start..end], |x| x as f64)),
            Storage::Cpu(CpuStorage::BF16(v)) => {
                Some(chunked(&v[start..end], |x| crate::ops::Float::widen(x) as f64))
            }
            Storage::Cpu(CpuStorage::F16(v)) => Some(chunked(&v[start..end], |x| x.to_f64())),
            _ => None,
        };
        if let Some(sum) = sum {
            return Ok(sum);
        }
    }
    Ok(t.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?)
}

/// Trainable weights as fp32 masters plus, in bf16, a bf16 compute copy (see the module docs).
pub struct MasterWeights {
    names: Vec<String>,
    masters: Vec<Var>,
    copies: Option<Vec<Var>>,
    compute_dtype: DType,
}

impl MasterWeights {
    /// Masters (f32 copies of `params`) and, when `compute_dtype` is not f32, compute copies.
    pub fn new(params: Vec<(String, Tensor)>, compute_dtype: DType) -> Result<Self> {
        let mut names = Vec::with_capacity(params.len());
        let mut masters = Vec::with_capacity(params.len());
        for (name, t) in params {
            // `Var::from_tensor` of a non-variable copies, so the master never aliases `t`.
            masters.push(Var::from_tensor(&t.detach().to_dtype(DType::F32)?)?);
            names.push(name);
        }
        let copies = if compute_dtype == DType::F32 {
            None
        } else {
            let copy = |m: &Var| Var::from_tensor(&m.as_tensor().detach().to_dtype(compute_dtype)?);
            Some(masters.iter().map(copy).collect::<candle_core::Result<_>>()?)
        };
        Ok(MasterWeights { names, masters, copies, compute_dtype })
    }

    /// The compute dtype.
    pub fn compute_dtype(&self) -> DType {
        self.compute_dtype
    }

    /// `(name, master)` pairs, for [`AdamW::new`].
    pub fn masters(&self) -> Vec<(String, Var)> {
        self.names.iter().cloned().zip(self.masters.iter().cloned()).collect()
    }

    /// `(name, tensor)` pairs the model computes with. They stay valid across steps: the
    /// optimizer and [`MasterWeights::refresh`] update them in place (so build model layers
    /// over these tensors directly, not over copies such as a `.t()?.contiguous()?`).
    pub fn compute_tensors(&self) -> Vec<(String, Tensor)> {
        let src = self.copies.as_ref().unwrap_or(&self.masters);
        self.names.iter().cloned().zip(src.iter().map(|v| v.as_tensor().clone())).collect()
    }

    /// Writes the masters into the compute copies (a no-op in f32). Call after each step.
    pub fn refresh(&self) -> Result<()> {
        if let Some(copies) = &self.copies {
            for (m, c) in self.masters.iter().zip(copies) {
                c.set(&m.as_tensor().detach().to_dtype(self.compute_dtype)?)?;
            }
        }
        Ok(())
    }

    /// The tensor whose gradient backprop reports for weight `i` (the copy, or the master in f32).
    fn grad_key(&self, i: usize) -> &Tensor {
        match &self.copies {
            Some(c) => c[i].as_tensor(),
            None => self.masters[i].as_tensor(),
        }
    }
}

/// Sums micro-batch gradients in f32, keyed by the master weights.
#[derive(Default)]
pub struct GradAccumulator {
    grads: GradStore,
    micro_batches: usize,
}

impl GradAccumulator {
    /// Empty.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one micro-batch's gradients (from `loss.backward()`) of `weights`' compute tensors:
    /// the first is kept as it is (widened to f32), later ones are added, like torch's `.grad`.
    /// Gradients of anything else in `grads` are ignored.
    pub fn add(&mut self, weights: &MasterWeights, grads: &GradStore) -> Result<()> {
        for (i, master) in weights.masters.iter().enumerate() {
            let Some(g) = grads.get(weights.grad_key(i)) else { continue };
            let g = g.detach().to_dtype(DType::F32)?;
            let sum = match self.grads.remove(master.as_tensor()) {
                Some(acc) => (acc + g)?,
                None => g,
            };
            self.grads.insert(master.as_tensor(), sum);
        }
        self.micro_batches += 1;
        Ok(())
    }

    /// How many micro-batches were added since the last [`GradAccumulator::take`].
    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// The summed gradients (for [`AdamW::clip_grad_norm`] and [`AdamW::step`]); resets.
    pub fn take(&mut self) -> GradStore {
        self.micro_batches = 0;
        std::mem::take(&mut self.grads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const GOLDEN: &str =
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/train-tiny/golden/adamw.json"));

    fn tensor(v: &Value) -> Tensor {
        let rows: Vec<Vec<f32>> = match v.as_array().unwrap()[0] {
            Value::Array(_) => v
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect())
                .collect(),
            _ => vec![v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()],
        };
        let t = Tensor::new(rows, &Device::Cpu).unwrap();
        if matches!(v.as_array().unwrap()[0], Value::Array(_)) {
            t
        } else {
            t.squeeze(0).unwrap()
        }
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    fn assert_close(got: &[f32], want: &[f32], rel: f64, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let (g, w) = (*g as f64, *w as f64);
            assert!((g - w).abs() <= rel * w.abs().max(1e-3), "{what}[{i}]: {g} vs torch {w}");
        }
    }

    /// mean((tanh(x @ w + b) − y)²), as the golden generator computes it.
    fn loss(x: &Tensor, y: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
        x.matmul(w)
            .unwrap()
            .broadcast_add(b)
            .unwrap()
            .tanh()
            .unwrap()
            .sub(y)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
    }

    #[test]
    fn matches_torch_adamw_traces() {
        let golden: Value = serde_json::from_str(GOLDEN).unwrap();
        for trace in golden["traces"].as_array().unwrap() {
            let name = trace["name"].as_str().unwrap();
            let (x, y) = (tensor(&trace["x"]), tensor(&trace["y"]));
            let w = Var::from_tensor(&tensor(&trace["w0"])).unwrap();
            let b = Var::from_tensor(&tensor(&trace["b0"])).unwrap();
            let betas = trace["betas"].as_array().unwrap();
            let cfg = AdamWConfig {
                betas: (betas[0].as_f64().unwrap(), betas[1].as_f64().unwrap()),
                eps: trace["eps"].as_f64().unwrap(),
                weight_decay: trace["weight_decay"].as_f64().unwrap(),
                no_decay_patterns: trace["no_decay"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s.as_str().unwrap().to_string())
                    .collect(),
            };
            let max_norm = trace["max_norm"].as_f64();
            let mut opt = AdamW::new(vec![("w".into(), w.clone()), ("b".into(), b.clone())], cfg).unwrap();
            for (i, step) in trace["steps"].as_array().unwrap().iter().enumerate() {
                let what = format!("{name} step {i}");
                let l = loss(&x, &y, w.as_tensor(), b.as_tensor());
                let l_val = l.to_scalar::<f32>().unwrap() as f64;
                let want_loss = step["loss"].as_f64().unwrap();
                assert!((l_val - want_loss).abs() <= 1e-6 * want_loss, "{what}: loss {l_val} vs {want_loss}");
                let grads = l.backward().unwrap();
                let norm = opt.clip_grad_norm(&grads, max_norm).unwrap();
                let want_norm = step["grad_norm"].as_f64().unwrap();
                assert!(
                    (norm - want_norm).abs() <= 1e-6 * want_norm,
                    "{what}: grad norm {norm} vs {want_norm}"
                );
                opt.step(&grads, step["lr"].as_f64().unwrap()).unwrap();
                assert_close(&flat(w.as_tensor()), &flat(&tensor(&step["w"])), 1e-6, &format!("{what} w"));
                assert_close(&flat(b.as_tensor()), &flat(&tensor(&step["b"])), 1e-6, &format!("{what} b"));
                let (m, v) = opt.moments("w").unwrap();
                assert_close(&flat(m), &flat(&tensor(&step["exp_avg_w"])), 1e-5, &format!("{what} exp_avg"));
                assert_close(
                    &flat(v),
                    &flat(&tensor(&step["exp_avg_sq_w"])),
                    1e-5,
                    &format!("{what} exp_avg_sq"),
                );
                assert_eq!(opt.step_count("w"), Some(i as u64 + 1));
            }
        }
    }

    #[test]
    fn clipping_only_when_over_the_limit() {
        let p = Var::new(&[3f32, 4.0], &Device::Cpu).unwrap();
        let q = Var::new(&[[0f32]], &Device::Cpu).unwrap();
        // grad = p = [3, 4], norm 5.
        let grads = half_sum_of_squares(&p).backward().unwrap();
        assert_eq!(clip_factor(&grads, [p.as_tensor(), q.as_tensor()], Some(10.0)).unwrap(), (5.0, None));
        let coef = 1.0f32 / (5.0 + 1e-6);
        assert_eq!(clip_factor(&grads, [p.as_tensor()], Some(1.0)).unwrap(), (5.0, Some(coef)));
        // No clipping asked: the norm only.
        assert_eq!(clip_factor(&grads, [p.as_tensor()], None).unwrap(), (5.0, None));
    }

    fn half_sum_of_squares(p: &Var) -> Tensor {
        (p.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap()
    }

    /// The factor `clip_grad_norm` finds multiplies the gradients of the next step, exactly as
    /// scaling them beforehand (torch's `clip_grad_norm_`) would, and only that step.
    #[test]
    fn clipping_scales_the_next_step_only() {
        // A large eps makes the update depend on the gradient's scale (Adam's is scale-free).
        let cfg = AdamWConfig { eps: 1.0, ..Default::default() };
        let vars: Vec<Var> = (0..3).map(|_| Var::new(&[3f32, 4.0, -7.5], &Device::Cpu).unwrap()).collect();
        let mut opts: Vec<AdamW> =
            vars.iter().map(|v| AdamW::new(vec![("p".into(), v.clone())], cfg.clone()).unwrap()).collect();
        let grads: Vec<GradStore> = vars.iter().map(|v| half_sum_of_squares(v).backward().unwrap()).collect();
        // 0: clipped through the optimizer; 1: gradients scaled by hand; 2: not clipped.
        let norm = opts[0].clip_grad_norm(&grads[0], Some(2.0)).unwrap();
        let (_, coef) = clip_factor(&grads[1], [vars[1].as_tensor()], Some(2.0)).unwrap();
        assert_eq!(norm, (9.0f64 + 16.0 + 56.25).sqrt() as f32 as f64);
        let mut scaled = GradStore::default();
        let g = grads[1].get(vars[1].as_tensor()).unwrap();
        scaled.insert(vars[1].as_tensor(), g.affine(coef.unwrap() as f64, 0.0).unwrap());
        opts[0].step(&grads[0], 0.1).unwrap();
        opts[1].step(&scaled, 0.1).unwrap();
        opts[2].step(&grads[2], 0.1).unwrap();
        let values = |i: usize| vars[i].as_tensor().to_vec1::<f32>().unwrap();
        assert_eq!(values(0), values(1));
        assert_ne!(values(0), values(2));
        // The next step, with no clipping asked, takes the gradients as they are.
        for (o, v) in opts.iter_mut().zip(&vars).take(2) {
            o.step(&half_sum_of_squares(v).backward().unwrap(), 0.1).unwrap();
        }
        assert_eq!(values(0), values(1));
        let (m0, m1) = (opts[0].moments("p").unwrap().0, opts[1].moments("p").unwrap().0);
        assert_eq!(m0.to_vec1::<f32>().unwrap(), m1.to_vec1::<f32>().unwrap());
        // A factor found for gradients whose step was skipped does not clip other gradients.
        opts[0].clip_grad_norm(&half_sum_of_squares(&vars[0]).backward().unwrap(), Some(2.0)).unwrap();
        for (o, v) in opts.iter_mut().zip(&vars).take(2) {
            o.step(&half_sum_of_squares(v).backward().unwrap(), 0.1).unwrap();
        }
        assert_eq!(values(0), values(1));
    }

    #[test]
    fn params_without_gradients_are_left_alone() {
        let dev = Device::Cpu;
        let used = Var::new(&[1f32, 2.0], &dev).unwrap();
        let unused = Var::new(&[5f32, 6.0], &dev).unwrap();
        let cfg = AdamWConfig { weight_decay: 0.5, ..Default::default() };
        let mut opt =
            AdamW::new(vec![("used".into(), used.clone()), ("unused".into(), unused.clone())], cfg).unwrap();
        let grads = used.as_tensor().sum_all().unwrap().backward().unwrap();
        opt.step(&grads, 0.1).unwrap();
        assert_eq!(unused.as_tensor().to_vec1::<f32>().unwrap(), vec![5.0, 6.0]);
        assert_eq!(opt.step_count("unused"), Some(0));
        assert_eq!(opt.step_count("used"), Some(1));
        assert_ne!(used.as_tensor().to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
    }

    #[test]
    fn constructor_errors() {
        let dev = Device::Cpu;
        let a = Var::new(&[1f32], &dev).unwrap();
        let e =
            AdamW::new(vec![("a".into(), a.clone()), ("a".into(), a)], AdamWConfig::default()).err().unwrap();
        assert!(e.to_string().contains("'a' is listed twice"), "{e}");
        let h =
            Var::from_tensor(&Tensor::new(&[1f32], &dev).unwrap().to_dtype(DType::BF16).unwrap()).unwrap();
        let e = AdamW::new(vec![("h".into(), h)], AdamWConfig::default()).err().unwrap();
        assert!(e.to_string().contains("f32 master weight"), "{e}");
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            no_decay_patterns: vec![".bias".into(), "norm".into()],
            ..Default::default()
        };
        assert_eq!(cfg.weight_decay_for("layers.0.mlp.up_proj.weight"), 0.1);
        assert_eq!(cfg.weight_decay_for("mm_projector.0.bias"), 0.0);
        assert_eq!(cfg.weight_decay_for("layers.0.input_layernorm.weight"), 0.0);
    }

    fn run_steps(opt: &mut AdamW, vars: &[Var], from: usize, to: usize) {
        for s in from..to {
            let mut loss = Tensor::new(0f32, &Device::Cpu).unwrap();
            for (k, v) in vars.iter().enumerate() {
                let target = Tensor::ones(v.dims(), DType::F32, &Device::Cpu).unwrap();
                let d = (v.as_tensor().sin().unwrap() - target.affine((s + k) as f64 * 0.1, 0.3).unwrap())
                    .unwrap();
                loss = (loss + d.sqr().unwrap().sum_all().unwrap()).unwrap();
            }
            let grads = loss.backward().unwrap();
            opt.clip_grad_norm(&grads, Some(0.5)).unwrap();
            opt.step(&grads, 0.01 * (1.0 + s as f64)).unwrap();
        }
    }

    #[test]
    fn state_round_trip_is_bit_exact_and_resumes_exactly() {
        let dev = Device::Cpu;
        let init = || {
            vec![
                Var::from_tensor(
                    &Tensor::arange(0f32, 6.0, &dev)
                        .unwrap()
                        .reshape((2, 3))
                        .unwrap()
                        .affine(0.3, -0.7)
                        .unwrap(),
                )
                .unwrap(),
                Var::new(&[0.25f32, -1.5], &dev).unwrap(),
            ]
        };
        let cfg = AdamWConfig { weight_decay: 0.05, ..Default::default() };
        let named = |v: &[Var]| {
            vec![("layer.weight".to_string(), v[0].clone()), ("layer.bias".to_string(), v[1].clone())]
        };

        // Uninterrupted: 6 steps.
        let full = init();
        let mut opt = AdamW::new(named(&full), cfg.clone()).unwrap();
        run_steps(&mut opt, &full, 0, 6);

        // Interrupted after 3, saved with the master weights, reloaded into fresh vars.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("optim.safetensors");
        let first = init();
        let mut opt1 = AdamW::new(named(&first), cfg.clone()).unwrap();
        run_steps(&mut opt1, &first, 0, 3);
        opt1.save_state(&path, true).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temp file left behind");
        let resumed = init();
        let mut opt2 = AdamW::new(named(&resumed), cfg).unwrap();
        opt2.load_state(&path).unwrap();
        let a = opt1.state_tensors(true).unwrap();
        let b = opt2.state_tensors(true).unwrap();
        assert_eq!(a.len(), 8);
        for (k, t) in &a {
            let u = &b[k];
            if t.dtype() == DType::I64 {
                assert_eq!(t.to_scalar::<i64>().unwrap(), u.to_scalar::<i64>().unwrap(), "{k}");
            } else {
                let (x, y) = (flat(t), flat(u));
                assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()), "{k}");
            }
        }
        run_steps(&mut opt2, &resumed, 3, 6);
        for (f, r) in full.iter().zip(&resumed) {
            let (x, y) = (flat(f.as_tensor()), flat(r.as_tensor()));
            assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()), "{x:?} vs {y:?}");
        }
    }

    #[test]
    fn load_state_errors() {
        let dev = Device::Cpu;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.safetensors");
        let a = Var::new(&[1f32, 2.0], &dev).unwrap();
        let opt = AdamW::new(vec![("a".into(), a.clone())], AdamWConfig::default()).unwrap();
        opt.save_state(&path, false).unwrap();

        let b = Var::new(&[1f32, 2.0], &dev).unwrap();
        let mut other = AdamW::new(vec![("b".into(), b)], AdamWConfig::default()).unwrap();
        let e = other.load_state(&path).unwrap_err().to_string();
        assert!(e.contains("has no 'exp_avg.b'"), "{e}");

        let c = Var::new(&[1f32, 2.0, 3.0], &dev).unwrap();
        let mut other = AdamW::new(vec![("a".into(), c)], AdamWConfig::default()).unwrap();
        let e = other.load_state(&path).unwrap_err().to_string();
        assert!(e.contains("'exp_avg.a': expected F32 [3]"), "{e}");

        let mut none = AdamW::new(vec![], AdamWConfig::default()).unwrap();
        let e = none.load_state(&path).unwrap_err().to_string();
        assert!(e.contains("'exp_avg.a', which is not a trained parameter"), "{e}");

        let mut map = opt.state_tensors(false).unwrap();
        map.insert("lr".into(), Tensor::new(1f32, &dev).unwrap());
        candle_core::safetensors::save(&map, &path).unwrap();
        let e = AdamW::new(vec![("a".into(), a.clone())], AdamWConfig::default()).unwrap().load_state(&path);
        assert!(e.unwrap_err().to_string().contains("'lr' is not an optimizer state entry"));

        std::fs::write(&path, b"not safetensors").unwrap();
        let e = AdamW::new(vec![("a".into(), a)], AdamWConfig::default()).unwrap().load_state(&path);
        assert!(e.unwrap_err().to_string().contains("reading optimizer state"));
    }

    #[test]
    fn bf16_master_weights_accumulate_in_f32_and_refresh() {
        let dev = Device::Cpu;
        let w0 = Tensor::new(&[[0.5f32, -1.25], [2.0, 0.125]], &dev).unwrap();
        let mw = MasterWeights::new(vec![("w".into(), w0.clone())], DType::BF16).unwrap();
        let compute = mw.compute_tensors();
        assert_eq!(compute[0].1.dtype(), DType::BF16);
        assert_eq!(mw.masters()[0].1.dtype(), DType::F32);
        let mut opt = AdamW::new(mw.masters(), AdamWConfig::default()).unwrap();

        // Two micro-batches: loss_k = sum(w · x_k) in bf16, so grad_k = x_k.
        let xs = [
            Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &dev).unwrap(),
            Tensor::new(&[[0.5f32, 0.5], [0.5, 0.5]], &dev).unwrap(),
        ];
        let mut acc = GradAccumulator::new();
        for x in &xs {
            let l = (&compute[0].1 * x.to_dtype(DType::BF16).unwrap()).unwrap().sum_all().unwrap();
            acc.add(&mw, &l.backward().unwrap()).unwrap();
        }
        assert_eq!(acc.micro_batches(), 2);
        let grads = acc.take();
        assert_eq!(acc.micro_batches(), 0);
        let master = mw.masters()[0].1.clone();
        let g = grads.get(master.as_tensor()).unwrap();
        assert_eq!(g.dtype(), DType::F32);
        assert_eq!(g.to_vec2::<f32>().unwrap(), vec![vec![1.5, 2.5], vec![3.5, 4.5]]);

        opt.clip_grad_norm(&grads, None).unwrap();
        opt.step(&grads, 0.01).unwrap();
        // First Adam step moves every weight by -lr·sign(g) (up to eps).
        let m = master.as_tensor().to_vec2::<f32>().unwrap();
        let w = w0.to_vec2::<f32>().unwrap();
        for (r, rw) in m.iter().zip(&w) {
            for (a, b) in r.iter().zip(rw) {
                assert!((a - (b - 0.01)).abs() < 1e-6, "{a} vs {b}");
            }
        }
        // The compute copy is stale until refresh, then equals the rounded master.
        assert_eq!(compute[0].1.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap(), w);
        mw.refresh().unwrap();
        let want = master.as_tensor().to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
        assert_eq!(
            compute[0].1.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap(),
            want.to_vec2::<f32>().unwrap()
        );
    }

    #[test]
    fn f32_master_weights_are_the_compute_tensors() {
        let dev = Device::Cpu;
        let w0 = Tensor::new(&[1f32, 2.0], &dev).unwrap();
        let mw = MasterWeights::new(vec![("w".into(), w0.clone())], DType::F32).unwrap();
        let compute = mw.compute_tensors();
        let mut opt = AdamW::new(mw.masters(), AdamWConfig::default()).unwrap();
        let mut acc = GradAccumulator::new();
        acc.add(&mw, &compute[0].1.sum_all().unwrap().backward().unwrap()).unwrap();
        opt.step(&acc.take(), 0.5).unwrap();
        mw.refresh().unwrap();
        let now = compute[0].1.to_vec1::<f32>().unwrap();
        assert!((now[0] - 0.5).abs() < 1e-6 && (now[1] - 1.5).abs() < 1e-6, "{now:?}");
        // The source tensor is not aliased.
        assert_eq!(w0.to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
    }
}
