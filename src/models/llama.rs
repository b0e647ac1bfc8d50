//! LLaMA-2 (`LlamaForCausalLM`) in candle, as one tensor-parallel rank.
//!
//! Every weight is the rank's local shard ([`crate::weights::rank_tensors`] with
//! [`canonical_shard_spec`]): q/k/v and gate/up are column-parallel (the rank owns whole query
//! groups and their heads), o/down are row-parallel and end in an all-reduce, the embedding and
//! the head are vocab-parallel over the padded vocabulary. With one rank this is plain LLaMA.
//! Semantics follow transformers' `modeling_llama.py`: RMSNorm in f32, rotary on the two halves
//! of each head (`rotate_half`), linear RoPE scaling as `inv_freq / factor`, softmax in f32.
//!
//! Shapes: B batch, T new tokens, S cached + new tokens, H hidden, V vocabulary (Vp padded),
//! Hl / Gl query heads / query groups on this rank, D head dim, F/N the rank's MLP width.

use crate::ops;
use crate::parallel::Collective;
use crate::{Error, Result};
use candle_core::{DType, Device, IndexOp, Tensor, D};
use candle_nn::VarBuilder;
use shardsmith_converters::names::llama::LlamaHparams;
use std::sync::Arc;

pub use shardsmith_converters::names::llama::canonical_shard_spec;

/// What one rank needs to know about the parallel layout.
#[derive(Clone, Copy, Debug)]
pub struct RankLayout {
    /// Tensor-parallel size N.
    pub tp: usize,
    /// This rank.
    pub rank: usize,
    /// Padded vocabulary Vp (divisible by N); rank r owns rows `[r·Vp/N, (r+1)·Vp/N)`.
    pub padded_vocab: usize,
}

/// A bias-free linear layer `y = x Wᵀ` over x [.., in] (its rows one matrix, [`ops::matmul`]),
/// returned in x's dtype. bf16 activations multiply in bf16 where a bf16 GEMM exists (cuBLAS,
/// or [`ops::cpu_gemm`] on a CPU with AVX512-BF16, as PyTorch's oneDNN path does): bf16
/// weights as they are, a trainer's f32 master weights cast to bf16 per step (differentiably;
/// frozen ones once, cached). Elsewhere it computes in the weight's dtype, and bf16 CPU weights
/// are widened to f32 once at load:
/// candle's CPU bf16 matmul widens both operands on every call. Either way bf16×bf16 products
/// are exact in f32 and accumulate in f32, so the two paths differ only in summation order.
#[derive(Clone)]
struct Proj {
    /// [out, in].
    weight: Tensor,
    /// A low-rank update added to the output, when training with LoRA.
    lora: Option<Lora>,
    /// bf16 copy of a frozen f32 weight for the bf16 GEMM, made on first use.
    bf16: std::sync::OnceLock<Tensor>,
    /// A frozen weight's Wᵀ pre-packed for the CPU GEMM, made at the first product that packs
    /// it (none past the pre-packing budget, or where it does not apply).
    packed: std::sync::OnceLock<Option<Arc<ops::cpu_gemm::PackedB>>>,
    /// The same for W itself, the B of the input gradient dy·W (training through frozen layers).
    packed_w: std::sync::OnceLock<Option<Arc<ops::cpu_gemm::PackedB>>>,
}

/// Which form of a projection's weight a product reads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Operand {
    /// Wᵀ [in, out]: the forward x·Wᵀ.
    Wt,
    /// W [out, in]: the input gradient dy·W.
    W,
}

/// A LoRA adapter on one projection: `y += scale · (x Aᵀ) Bᵀ` (PEFT's `lora_A`, `lora_B`).
#[derive(Clone, Debug)]
pub struct Lora {
    /// `lora_A` [r, in].
    pub a: Tensor,
    /// `lora_B` [out, r].
    pub b: Tensor,
    /// `alpha / r`.
    pub scale: f64,
}

impl Proj {
    fn load(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        Self::new(vb.get((out_dim, in_dim), "weight")?)
    }

    fn new(w: Tensor) -> Result<Self> {
        let widen = w.device().is_cpu() && w.dtype() == DType::BF16 && !ops::cpu_gemm::bf16_available();
        let weight = if widen { w.to_dtype(DType::F32)? } else { w };
        Ok(Proj {
            weight,
            lora: None,
            bf16: std::sync::OnceLock::new(),
            packed: std::sync::OnceLock::new(),
            packed_w: std::sync::OnceLock::new(),
        })
    }

    /// The weight in bf16 for the bf16 GEMM: as is, cast (a trainable weight, so gradients reach
    /// its f32 master) or cached (a frozen one).
    fn weight_bf16(&self) -> Result<Tensor> {
        let w = &self.weight;
        if w.dtype() == DType::BF16 {
            return Ok(w.clone());
        }
        if w.is_variable() || w.track_op() {
            return Ok(ops::cast(w, DType::BF16)?);
        }
        if let Some(c) = self.bf16.get() {
            return Ok(c.clone());
        }
        let c = w.to_dtype(DType::BF16)?;
        Ok(self.bf16.get_or_init(|| c).clone())
    }

    /// The GEMM's dtype for activations like `x`, and the weight in it.
    fn compute_weight(&self, x: &Tensor) -> Result<(DType, Tensor)> {
        // bf16 activations compute in bf16 where a bf16 GEMM exists (cuBLAS; AVX512-BF16), also
        // against f32 master weights (cast per step, differentiably): otherwise a stage-2 run on
        // CUDA would multiply in f32.
        let bf16_gemm = x.dtype() == DType::BF16
            && (x.device().is_cuda() || (x.device().is_cpu() && ops::cpu_gemm::bf16_available()));
        Ok(if bf16_gemm {
            (DType::BF16, self.weight_bf16()?)
        } else if self.weight.dtype() == DType::BF16 && self.weight.device().is_cpu() {
            (DType::F32, self.weight.to_dtype(DType::F32)?) // bf16 weights, f32 activations
        } else {
            (self.weight.dtype(), self.weight.clone())
        })
    }

    /// `w` (this projection's weight in the compute dtype) pre-packed for the CPU GEMM — as Wᵀ
    /// for the forward x·Wᵀ, or as W for the input gradient dy·W (`Operand::W`) — when the
    /// weight is frozen and a product of `rows` rows would pack it (made at the first such
    /// product, within the budget of [`ops::cpu_gemm::PackedB::within_budget`]).
    fn prepacked(
        &self,
        w: &Tensor,
        rows: usize,
        operand: Operand,
    ) -> Result<Option<Arc<ops::cpu_gemm::PackedB>>> {
        use ops::cpu_gemm::{self as g, MatRef, PackedB};
        let cache = match operand {
            Operand::Wt => &self.packed,
            Operand::W => &self.packed_w,
        };
        let frozen = !(self.weight.is_variable() || self.weight.track_op() || w.track_op());
        if !frozen || !w.device().is_cpu() || rows <= g::DOT_MAX_M {
            return Ok(cache.get().cloned().flatten());
        }
        if let Some(p) = cache.get() {
            return Ok(p.clone());
        }
        let w = w.contiguous()?;
        let (out, inp) = w.dims2()?;
        fn pack<T: g::PackElement>(
            v: &[T],
            out: usize,
            inp: usize,
            operand: Operand,
        ) -> Result<Option<PackedB>> {
            let w = MatRef { data: v, rows: out, cols: inp, rs: inp, cs: 1 };
            Ok(PackedB::within_budget(if operand == Operand::Wt { w.t() } else { w })?)
        }
        let packed = match w.dtype() {
            DType::BF16 if g::bf16_available() => {
                pack(&w.flatten_all()?.to_vec1::<half::bf16>()?, out, inp, operand)?
            }
            DType::F32 if g::f32_available() => pack(&w.flatten_all()?.to_vec1::<f32>()?, out, inp, operand)?,
            _ => None,
        };
        Ok(cache.get_or_init(|| packed.map(Arc::new)).clone())
    }

    /// `x · wᵀ` through the pre-packed Wᵀ when there is one.
    fn product(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let rows = x.elem_count() / x.dim(D::Minus1)?.max(1);
        Ok(match self.prepacked(w, rows, Operand::Wt)? {
            Some(p) => ops::linear::matmul_prepacked(x, &w.t()?, &p)?,
            None => ops::matmul(x, &w.t()?)?,
        })
    }

    /// x [B, T, in] → [B, T, out] in x's dtype.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (compute, w) = self.compute_weight(x)?;
        // [B, T, in] straight into the GEMM (its rows are one matrix): no reshape nodes.
        let xc = x.to_dtype(compute)?;
        let mut y = self.product(&xc, &w)?;
        if let Some(l) = &self.lora {
            let (a, lb) = (l.a.to_dtype(compute)?, l.b.to_dtype(compute)?);
            let low = ops::matmul(&xc, &a.t()?)?; // [B, T, r]
            y = (y + (ops::matmul(&low, &lb.t()?)? * l.scale)?)?;
        }
        Ok(y.to_dtype(x.dtype())?)
    }

    /// [`Proj::forward`] plus `residual` (the layer's residual add, outside autograd): on CUDA
    /// for a decode step the add runs in the GEMV's epilogue (the same values, one launch
    /// fewer); otherwise the product, then one add.
    fn forward_add(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let Some(r) = residual else { return self.forward(x) };
        let frozen = !(self.weight.is_variable() || self.weight.track_op());
        if x.device().is_cuda() && frozen && self.lora.is_none() && r.dtype() == x.dtype() {
            let (compute, w) = self.compute_weight(x)?;
            if compute == x.dtype() {
                if let Some(y) = ops::linear::gemv_add(x, &w.t()?, r)? {
                    return Ok(y);
                }
            }
        }
        residual_add(r, &self.forward(x)?)
    }
}

/// x + y for a residual connection: outside autograd (inference) one parallel pass
/// (`ops::add_detached`) instead of candle's bf16 add; in a graph, candle's differentiable add.
fn residual_add(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    Ok(if x.track_op() || y.track_op() { (x + y)? } else { ops::add_detached(x, y)? })
}

/// Rotary position embedding tables for a run of positions.
struct Rope {
    /// `1 / theta^(2k/D) / factor`, k < D/2, rounded to f32 the way transformers computes it.
    inv_freq: Vec<f32>,
}

impl Rope {
    fn new(hp: &LlamaHparams) -> Self {
        let d = hp.head_dim;
        let factor = hp.rope_linear_factor.unwrap_or(1.0) as f32;
        let inv_freq = (0..d / 2)
            .map(|k| {
                // torch: base ** (arange(0, d, 2).float() / d), in f32.
                let exponent = (2 * k) as f32 / d as f32;
                let inv = (1.0 / hp.rope_theta.powf(exponent as f64)) as f32;
                inv / factor
            })
            .collect();
        Rope { inv_freq }
    }

    /// `(cos, sin)`, each [T, D/2], for positions `start..start + t`, in `dtype`.
    fn tables(&self, start: usize, t: usize, dtype: DType, dev: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for p in start..start + t {
            for &f in &self.inv_freq {
                // The angle is an f32 product, as in transformers' f32 matmul of positions.
                let angle = (p as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let cos = Tensor::from_vec(cos, (t, half), dev)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (t, half), dev)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }
}

/// RMSNorm computed in f32 and cast back, then scaled (transformers' `LlamaRMSNorm`).
#[derive(Clone)]
struct Norm {
    weight: Tensor,
    eps: f64,
}

impl Norm {
    fn load(vb: VarBuilder, hp: &LlamaHparams) -> Result<Self> {
        Ok(Norm { weight: vb.get(hp.hidden, "weight")?, eps: hp.norm_eps })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(ops::rms_norm(x, &self.weight, self.eps)?)
    }
}

/// Whether a parameter can live inside a one-node layer: frozen, or a variable itself (its
/// gradient is then deposited for it; a weight computed from a variable would need candle's
/// graph to carry the gradient on).
fn node_ready(w: &Tensor) -> bool {
    w.is_variable() || !w.track_op()
}

/// A projection inside a one-node layer ([`DecoderLayer::forward_node`]): the GEMM weight
/// [out, in] in the compute dtype, made once for the forward and the backward, and the
/// variables that train, if the weight does. Several projections of one input (q, k, v) may be
/// one NodeProj ([`NodeProj::fused`]): their weights' rows stacked, each variable's gradient a
/// block of rows of one.
struct NodeProj {
    compute: DType,
    w: Tensor,
    /// The trained variables among the weights in `w`, each with its first row and row count.
    trains: Vec<(Tensor, usize, usize)>,
    /// Wᵀ and W pre-packed, for a frozen weight ([`Proj::prepacked`]).
    packed: Option<Arc<ops::cpu_gemm::PackedB>>,
    packed_w: Option<Arc<ops::cpu_gemm::PackedB>>,
}

impl NodeProj {
    fn new(p: &Proj, like: &Tensor) -> Result<Self> {
        let (compute, w) = p.compute_weight(like)?;
        let rows = like.elem_count() / like.dim(D::Minus1)?.max(1);
        let (packed, packed_w) = (p.prepacked(&w, rows, Operand::Wt)?, p.prepacked(&w, rows, Operand::W)?);
        let out = w.dim(0)?;
        let trains = p.weight.is_variable().then(|| (p.weight.clone(), 0, out)).into_iter().collect();
        Ok(NodeProj { compute, w: w.detach(), trains, packed, packed_w })
    }

    /// `projs` of one input as one product over their stacked weights, when they compute in one
    /// dtype and either all train (variables of one dtype) or none does; else `None`. A frozen
    /// set's stacked weight is `prefused`'s when that is in the compute dtype ([`FusedProj`],
    /// made once), else stacked here, as trained weights are for every forward (one copy of the
    /// weights, against wider GEMMs and one input-gradient product where there were three and
    /// two adds).
    fn fused(projs: &[&Proj], like: &Tensor, prefused: Option<&FusedProj>) -> Result<Option<Self>> {
        let weights = projs.iter().map(|p| p.compute_weight(like)).collect::<Result<Vec<_>>>()?;
        let compute = weights[0].0;
        let vars: Vec<&Tensor> = projs.iter().map(|p| &p.weight).filter(|w| w.is_variable()).collect();
        let all_or_none = vars.is_empty() || vars.len() == projs.len();
        if !all_or_none
            || weights.iter().any(|(c, _)| *c != compute)
            || vars.iter().any(|v| v.dtype() != vars[0].dtype())
        {
            return Ok(None);
        }
        let w = match prefused {
            Some(f) if vars.is_empty() && f.weight.dtype() == compute => f.weight.clone(),
            _ => ops::cat_rows(&weights.iter().map(|(_, w)| w.detach()).collect::<Vec<_>>())?,
        };
        let mut trains = Vec::new();
        let mut row = 0;
        for ((_, wi), p) in weights.iter().zip(projs) {
            let n = wi.dim(0)?;
            if p.weight.is_variable() {
                trains.push((p.weight.clone(), row, n));
            }
            row += n;
        }
        Ok(Some(NodeProj { compute, w: w.detach(), trains, packed: None, packed_w: None }))
    }

    /// x [B, T, in] → [B, T, out] in x's dtype.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (xc, wt) = (x.to_dtype(self.compute)?, self.w.t()?);
        let y = match &self.packed {
            Some(p) => ops::linear::matmul_prepacked(&xc, &wt, p)?,
            None => ops::matmul(&xc, &wt)?,
        };
        Ok(y.to_dtype(x.dtype())?)
    }

    /// dx = dy·W for the output gradient dy at input x; for trained weights also
    /// dW = dyᵀ·x over all rows, contiguous [out, in], into `sink`: computed from compute-dtype
    /// operands and kept at the GEMM's f32 precision for an f32 variable (the composed
    /// backward rounds it to bf16 first, then widens it: two passes over every weight, and
    /// precision lost on the way to an f32 master).
    fn backward(&self, x: &Tensor, dy: &Tensor, sink: &ops::GradSink) -> Result<Tensor> {
        let dyc = dy.to_dtype(self.compute)?;
        if let Some((first, ..)) = self.trains.first() {
            let x2 = x.to_dtype(self.compute)?.reshape(((), x.dim(D::Minus1)?))?;
            let dy2 = dyc.reshape(((), dyc.dim(D::Minus1)?))?;
            let dw = match first.dtype() {
                DType::F32 => ops::matmul_f32(&dy2.t()?, &x2)?,
                dtype => ops::matmul(&dy2.t()?, &x2)?.to_dtype(dtype)?,
            };
            // Each variable's rows of the stacked gradient: contiguous views, no copy.
            for (var, row, n) in &self.trains {
                let g = if *n == dw.dim(0)? { dw.clone() } else { dw.narrow(0, *row, *n)? };
                sink.deposit(var, g);
            }
        }
        let dx = match &self.packed_w {
            Some(p) => ops::linear::matmul_prepacked(&dyc, &self.w, p)?,
            None => ops::matmul(&dyc, &self.w)?,
        };
        Ok(dx.to_dtype(dy.dtype())?)
    }
}

/// q, k and v inside a one-node layer: one product over their stacked weights
/// ([`NodeProj::fused`]) or three.
enum NodeQkv {
    Fused(NodeProj),
    Apart([NodeProj; 3]),
}

impl NodeQkv {
    fn new(a: &Attention, like: &Tensor, fuse: bool) -> Result<Self> {
        let projs = [&a.q_proj, &a.k_proj, &a.v_proj];
        if fuse {
            if let Some(f) = NodeProj::fused(&projs, like, a.qkv.as_ref())? {
                return Ok(NodeQkv::Fused(f));
            }
        }
        let [q, k, v] = projs.map(|p| NodeProj::new(p, like));
        Ok(NodeQkv::Apart([q?, k?, v?]))
    }

    /// [q, k, v] of n1 [B, T, H]: [B, T, Hq·D], [B, T, G·D] twice (column views of one product
    /// when fused: the head splits read them in place).
    fn forward(&self, n1: &Tensor, a: &Attention) -> Result<[Tensor; 3]> {
        match self {
            NodeQkv::Fused(p) => {
                let y = p.forward(n1)?;
                let (q, kv) = (a.heads * a.head_dim, a.groups * a.head_dim);
                Ok([y.narrow(2, 0, q)?, y.narrow(2, q, kv)?, y.narrow(2, q + kv, kv)?])
            }
            NodeQkv::Apart([q, k, v]) => Ok([q.forward(n1)?, k.forward(n1)?, v.forward(n1)?]),
        }
    }

    /// dn1 for attention's input gradients dq [B, Hq, T, D], dk, dv [B, G, T, D], with q and k
    /// rotated back by −θ; the weights' gradients into `sink`.
    fn backward(
        &self,
        n1: &Tensor,
        [dq, dk, dv]: [&Tensor; 3],
        rope: (&Tensor, &Tensor),
        sink: &ops::GradSink,
    ) -> Result<Tensor> {
        match self {
            NodeQkv::Fused(p) => {
                let d = ops::split_heads_backward_cat(&[(dq, Some(rope)), (dk, Some(rope)), (dv, None)])?;
                p.backward(n1, &d, sink)
            }
            NodeQkv::Apart([qp, kp, vp]) => {
                let add = ops::add_detached;
                let rope = Some(rope);
                Ok(add(
                    &add(
                        &qp.backward(n1, &ops::split_heads_backward(dq, rope)?, sink)?,
                        &kp.backward(n1, &ops::split_heads_backward(dk, rope)?, sink)?,
                    )?,
                    &vp.backward(n1, &ops::merge_heads(dv)?, sink)?,
                )?)
            }
        }
    }
}

/// An RMSNorm inside a one-node layer: its weight (detached) and the variable, if it trains.
struct NodeNorm {
    w: Tensor,
    eps: f64,
    trains: Option<Tensor>,
}

impl NodeNorm {
    fn new(n: &Norm) -> Self {
        NodeNorm {
            w: n.weight.detach(),
            eps: n.eps,
            trains: n.weight.is_variable().then(|| n.weight.clone()),
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(ops::rms_norm(x, &self.w, self.eps)?)
    }

    /// dx (+ skip) for the output gradient dy at input x, `skip` being the gradient reaching x
    /// around the norm (the residual connection's: summed in the norm's pass on CUDA); dw (in
    /// x's dtype, as the composed backward rounds it, then the variable's) into `sink` when the
    /// weight trains.
    fn backward(
        &self,
        x: &Tensor,
        dy: &Tensor,
        skip: Option<&Tensor>,
        sink: &ops::GradSink,
    ) -> Result<Tensor> {
        let (dx, dw) = ops::rms_norm_backward(x, &self.w, dy, self.eps, self.trains.is_some(), skip)?;
        if let (Some(var), Some(dw)) = (&self.trains, dw) {
            sink.deposit(var, dw.to_dtype(x.dtype())?.to_dtype(var.dtype())?);
        }
        Ok(dx)
    }
}

/// Keys and values of the tokens seen so far, in one buffer [2, B, Gl, capacity, D] (keys, then
/// values) allocated once: each step writes its new rows in place and attention reads narrowed
/// views, so decoding allocates and copies nothing per token. The capacity is what
/// [`Llama::reserve`] asked for; past it the buffer grows (doubling, one copy), so an unreserved
/// cache still works.
struct KvCache {
    /// [2, B, Gl, capacity, D], or none before the first token.
    buffer: Option<Tensor>,
    /// Positions filled.
    len: usize,
    /// Positions to allocate at the first append.
    reserve: usize,
}

impl KvCache {
    fn new() -> Self {
        KvCache { buffer: None, len: 0, reserve: 0 }
    }

    /// Forget the tokens; the buffer stays for the next sequence.
    fn reset(&mut self) {
        self.len = 0;
    }

    /// The buffer, with room for `t` more positions of [B, Gl, ·, D] rows like `like`'s (dtype,
    /// device): as it is, or a new one holding the cached positions.
    fn room(&mut self, (b, g, t, d): (usize, usize, usize, usize), like: &Tensor) -> Result<Tensor> {
        let need = self.len + t;
        let fits = match &self.buffer {
            Some(kv) => {
                let (_, kb, kg, cap, kd) = kv.dims5()?;
                (kb, kg, kd) == (b, g, d)
                    && kv.dtype() == like.dtype()
                    && kv.device().same_device(like.device())
                    && cap >= need
                    // A new sequence starts in a buffer of the reserved size.
                    && (self.len > 0 || cap >= self.reserve)
            }
            None => false,
        };
        if !fits {
            let cap = self.reserve.max(need).max(2 * self.capacity());
            let kv = Tensor::zeros((2, b, g, cap, d), like.dtype(), like.device())?;
            match &self.buffer {
                Some(old) if self.len > 0 && old.dim(1)? == b => {
                    for half in 0..2 {
                        kv.i(half)?.slice_set(&old.i(half)?.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                    }
                }
                _ => self.len = 0,
            }
            self.buffer = Some(kv);
        }
        Ok(self.buffer.clone().expect("allocated above"))
    }

    /// Views [B, Gl, S, D] of the keys and values of every cached position.
    fn views(&self, kv: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((kv.i(0)?.narrow(2, 0, self.len)?, kv.i(1)?.narrow(2, 0, self.len)?))
    }

    /// Write k, v [B, Gl, T, D] after the cached positions; returns views [B, Gl, S, D] of all.
    fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, g, t, d) = k.dims4()?;
        let kv = self.room((b, g, t, d), k)?;
        kv.i(0)?.slice_set(&k.contiguous()?, 2, self.len)?;
        kv.i(1)?.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len += t;
        self.views(&kv)
    }

    /// One step from the projections q [B, T, Hl·D], k and v [B, T, Gl·D] (`ops::kv_step`):
    /// k rotated and v written after the cached positions; returns q rotated [B, Hl, T, D] and
    /// views [B, Gl, S, D] of all keys and values.
    fn append_rotated(
        &mut self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        tables: (&Tensor, &Tensor),
        heads: usize,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        // Checked before the buffer is touched: a bad step must not grow or reset the cache.
        let (b, t, g, d) = ops::kv_step::step_dims(q, k, v, heads)?;
        let kv = self.room((b, g, t, d), k)?;
        let q = ops::kv_step::rope_qkv_into_cache(q, k, v, tables, &kv, self.len, heads)?;
        self.len += t;
        let (k, v) = self.views(&kv)?;
        Ok((q, k, v))
    }

    fn capacity(&self) -> usize {
        self.buffer.as_ref().and_then(|kv| kv.dim(3).ok()).unwrap_or(0)
    }
}

/// Projections of one input held as one weight: the rows of `weight` [Σ out, in] are the
/// projections' weights in order, and each projection's own weight is a view of its rows (no
/// second copy). A decode step's product ([`decode_rows`]: one row, or up to 8 on CUDA) then
/// runs one GEMM instead of one per projection: fewer launches per token. Made at a layer's
/// first decode-sized forward ([`DecoderLayer::fuse_for_decode`]), so training never holds the
/// extra copy while loading.
struct FusedProj {
    weight: Tensor,
}

impl FusedProj {
    /// Fuse `projs` when their weights are frozen and share a dtype and device; otherwise `None`.
    fn new(projs: &mut [&mut Proj]) -> Result<Option<Self>> {
        let first = &projs[0].weight;
        let fusable = projs.iter().all(|p| {
            !(p.weight.is_variable() || p.weight.track_op())
                && p.weight.dtype() == first.dtype()
                && p.weight.device().same_device(first.device())
        });
        if !fusable {
            return Ok(None);
        }
        let weight = Tensor::cat(&projs.iter().map(|p| &p.weight).collect::<Vec<_>>(), 0)?;
        let mut row = 0;
        for p in projs.iter_mut() {
            let n = p.weight.dim(0)?;
            p.weight = weight.narrow(0, row, n)?;
            row += n;
        }
        Ok(Some(FusedProj { weight }))
    }

    /// Whether x [.., in] goes through the fused weight: the few rows of a decode step
    /// ([`decode_rows`]) in the weights' dtype, no projection with an adapter.
    fn applies(&self, x: &Tensor, projs: &[&Proj]) -> Result<bool> {
        Ok(decode_rows(x)? && x.dtype() == self.weight.dtype() && projs.iter().all(|p| p.lora.is_none()))
    }

    /// Each projection of x [.., in] as in `projs` (the projections it was made from), through
    /// one GEMM, where [`FusedProj::applies`]; otherwise `None` (the caller runs them one by
    /// one). The outputs are column views of one [.., Σ out] product (contiguous for one row).
    fn split(fused: Option<&Self>, x: &Tensor, projs: &[&Proj]) -> Result<Option<Vec<Tensor>>> {
        let Some(f) = fused else { return Ok(None) };
        if !f.applies(x, projs)? {
            return Ok(None);
        }
        let y = ops::matmul(x, &f.weight.t()?)?;
        let mut col = 0;
        let mut out = Vec::with_capacity(projs.len());
        for p in projs {
            let n = p.weight.dim(0)?;
            out.push(y.narrow(D::Minus1, col, n)?);
            col += n;
        }
        Ok(Some(out))
    }

    /// silu(x·W_gateᵀ)·(x·W_upᵀ) for a fused [gate; up] weight in one GEMV launch (the kernel's
    /// SwiGLU epilogue), where [`FusedProj::applies`] and the kernel takes it; otherwise `None`.
    fn swiglu(fused: Option<&Self>, x: &Tensor, projs: &[&Proj]) -> Result<Option<Tensor>> {
        match fused {
            Some(f) if f.applies(x, projs)? => Ok(ops::linear::gemv_swiglu(x, &f.weight.t()?)?),
            _ => Ok(None),
        }
    }
}

/// Whether x [.., in] is the few rows of a decode step: one row, or on CUDA up to
/// [`ops::linear::GEMV_MAX_ROWS`] (batched decode: through the GEMV kernels up to
/// [`ops::cuda_gemv_rows`], past that one cuBLAS product for the fused weight, the epilogues
/// composed).
fn decode_rows(x: &Tensor) -> Result<bool> {
    let rows = x.elem_count() / x.dim(D::Minus1)?.max(1);
    Ok(rows == 1 || (x.device().is_cuda() && rows <= ops::linear::GEMV_MAX_ROWS))
}

/// Self-attention on this rank's query groups.
struct Attention {
    q_proj: Proj,
    k_proj: Proj,
    v_proj: Proj,
    /// q, k and v fused ([`FusedProj`]) once the layer decodes, for frozen weights.
    qkv: Option<FusedProj>,
    /// Row-parallel: [H, Hl·D]; its partial sums are all-reduced.
    o_proj: Proj,
    heads: usize,
    groups: usize,
    head_dim: usize,
    cache: KvCache,
    /// Off for training: every forward is a whole sequence.
    use_cache: bool,
}

impl Attention {
    fn load(vb: VarBuilder, hp: &LlamaHparams, tp: usize) -> Result<Self> {
        let (h, d) = (hp.hidden, hp.head_dim);
        let (heads, groups) = (hp.heads / tp, hp.groups / tp);
        Ok(Attention {
            q_proj: Proj::load(vb.pp("q_proj"), h, heads * d)?,
            k_proj: Proj::load(vb.pp("k_proj"), h, groups * d)?,
            v_proj: Proj::load(vb.pp("v_proj"), h, groups * d)?,
            qkv: None,
            o_proj: Proj::load(vb.pp("o_proj"), heads * d, h)?,
            heads,
            groups,
            head_dim: d,
            cache: KvCache::new(),
            use_cache: true,
        })
    }

    /// x [B, T, H] at positions `start..start+T` → this rank's partial output [B, T, H].
    /// Plus `residual` when given (decode: in the output projection's GEMV epilogue).
    fn forward(
        &mut self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (hl, gl, d) = (self.heads, self.groups, self.head_dim);
        let per_group = hl / gl;
        let (qp, kp, vp) = (&self.q_proj, &self.k_proj, &self.v_proj);
        let (q, k, v) = match FusedProj::split(self.qkv.as_ref(), x, &[qp, kp, vp])?.as_deref() {
            Some([q, k, v]) => (q.clone(), k.clone(), v.clone()),
            _ => (qp.forward(x)?, kp.forward(x)?, vp.forward(x)?),
        };
        let scale = 1.0 / (d as f64).sqrt();
        let tracked = x.track_op() || q.track_op() || k.track_op() || v.track_op();
        // One decode step: q rotated, and k rotated and v written into the cache, in one op
        // (one kernel on CUDA) instead of two rotations, three head splits and two cache writes.
        let one_step = self.use_cache
            && t == 1
            && !tracked
            && matches!(
                (q.dtype(), cos.dtype()),
                (DType::F32, DType::F32) | (DType::BF16, DType::BF16 | DType::F32)
            );
        let (q, k, v) = if one_step {
            self.cache.append_rotated(&q, &k, &v, (cos, sin), hl)? // [B, Hl, 1, D], [B, Gl, S, D] ×2
        } else {
            let q = ops::split_heads(&q, hl, Some((cos, sin)))?; // [B, Hl, T, D]
            let k = ops::split_heads(&k, gl, Some((cos, sin)))?; // [B, Gl, T, D]
            let v = ops::split_heads(&v, gl, None)?;
            // The fused kernel's semantics are exactly "queries and keys are the same T
            // positions, causal": training and a prefill into an empty cache. Decode (T < S)
            // takes the path below.
            let past = if self.use_cache { self.cache.len } else { 0 };
            if past == 0 && ops::attention::has_kernel(&q) {
                if self.use_cache {
                    self.cache.append(&k, &v)?;
                }
                let y = ops::causal_attention(&q, &k, &v, scale)?; // [B, Hl, T, D]
                return self.o_proj.forward_add(&ops::merge_heads(&y)?, residual);
            }
            let (k, v) = if self.use_cache { self.cache.append(&k, &v)? } else { (k, v) }; // [B, Gl, S, D]
            (q, k, v)
        };
        // One new position against the cache (no mask: every key precedes it): one kernel for
        // what is below (two GEMMs, the softmax and the head merge), reading the cache in place.
        if t == 1
            && mask.is_none()
            && !tracked
            && ops::attention::decode_kernel_supports(x.device(), q.dtype(), d)
        {
            return self.o_proj.forward_add(&ops::attention::decode_attention(&q, &k, &v, scale)?, residual);
        }
        let s = k.dim(2)?;
        // GQA without copying K/V: a group's query heads are consecutive, so the group's queries
        // stack into one [per_group·T, D] matrix against its single K/V head.
        let q = q.reshape((b, gl, per_group * t, d))?;
        // On CUDA, cuBLAS reads the cache's narrowed views in place (rows D apart, batches one
        // buffer apart), and the softmax kernel widens to f32 and rounds once itself: decode
        // saves two copies and two casts per layer. The values are the same either way.
        let cuda = x.device().is_cuda();
        let kt = if cuda { k.t()? } else { k.t()?.contiguous()? };
        let scores = q.matmul(&kt)?; // [B, Gl, per_group·T, S], unscaled
        let probs = match mask {
            // The kernel scales in f32 in its own pass: one launch fewer per layer and token.
            None if cuda && matches!(scores.dtype(), DType::F32 | DType::BF16) => {
                ops::softmax_last_dim_scaled(&scores, scale)?
            }
            _ => {
                let scores = (scores * scale)?;
                let scores = scores.to_dtype(DType::F32)?.reshape((b, gl, per_group, t, s))?;
                let scores = match mask {
                    Some(m) => scores.broadcast_add(m)?, // m [T, S]: 0 or -inf
                    None => scores,
                };
                ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?.reshape((b, gl, per_group * t, s))?
            }
        };
        let v = if cuda { v } else { v.contiguous()? };
        let y = probs.matmul(&v)?; // [B, Gl, per_group·T, D]
        self.o_proj.forward_add(&ops::merge_heads(&y.reshape((b, hl, t, d))?)?, residual)
    }
}

/// SwiGLU MLP on this rank's F/N slice: down(silu(gate(x)) · up(x)), down row-parallel.
struct Mlp {
    gate_proj: Proj,
    up_proj: Proj,
    down_proj: Proj,
    /// gate and up fused ([`FusedProj`]) once the layer decodes, for frozen weights.
    gate_up: Option<FusedProj>,
}

impl Mlp {
    fn load(vb: VarBuilder, hp: &LlamaHparams, tp: usize) -> Result<Self> {
        let (h, f) = (hp.hidden, hp.ffn / tp);
        Ok(Mlp {
            gate_proj: Proj::load(vb.pp("gate_proj"), h, f)?,
            up_proj: Proj::load(vb.pp("up_proj"), h, f)?,
            down_proj: Proj::load(vb.pp("down_proj"), f, h)?,
            gate_up: None,
        })
    }

    /// down(silu(gate(x))·up(x)), plus `residual` when given (decode: in the down projection's
    /// GEMV epilogue where it applies).
    fn forward(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let (gp, up) = (&self.gate_proj, &self.up_proj);
        let act = match FusedProj::swiglu(self.gate_up.as_ref(), x, &[gp, up])? {
            Some(act) => act,
            None => {
                let (gate, up) = match FusedProj::split(self.gate_up.as_ref(), x, &[gp, up])?.as_deref() {
                    Some([gate, up]) => (gate.clone(), up.clone()),
                    _ => (gp.forward(x)?, up.forward(x)?),
                };
                // One fused op (and one saved pair for the backward) instead of silu, its
                // composed backward and a product: ~10 passes over [B, T, F] per layer in training.
                ops::swiglu(&gate, &up)?
            }
        };
        self.down_proj.forward_add(&act, residual)
    }
}

struct DecoderLayer {
    input_layernorm: Norm,
    self_attn: Attention,
    post_attention_layernorm: Norm,
    mlp: Mlp,
    /// [`DecoderLayer::fuse_for_decode`] ran.
    decode_fused: bool,
}

impl DecoderLayer {
    fn load(vb: VarBuilder, hp: &LlamaHparams, tp: usize) -> Result<Self> {
        Ok(DecoderLayer {
            input_layernorm: Norm::load(vb.pp("input_layernorm"), hp)?,
            self_attn: Attention::load(vb.pp("self_attn"), hp, tp)?,
            post_attention_layernorm: Norm::load(vb.pp("post_attention_layernorm"), hp)?,
            mlp: Mlp::load(vb.pp("mlp"), hp, tp)?,
            decode_fused: false,
        })
    }

    fn forward(
        &mut self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        comm: &dyn Collective,
    ) -> Result<Tensor> {
        if !self.decode_fused && !x.track_op() && decode_rows(x)? {
            self.fuse_for_decode()?;
        }
        let (attn_norm, mlp_norm) = (&self.input_layernorm, &self.post_attention_layernorm);
        if comm.world_size() == 1 && !x.track_op() {
            // One rank, inference: each residual add goes to the projection before it (on CUDA
            // into the decode GEMV's epilogue), there being no partial sums to reduce first.
            let x = self.self_attn.forward(&attn_norm.forward(x)?, cos, sin, mask, Some(x))?;
            return self.mlp.forward(&mlp_norm.forward(&x)?, Some(&x));
        }
        let attn = self.self_attn.forward(&attn_norm.forward(x)?, cos, sin, mask, None)?;
        let x = residual_add(x, &comm.all_reduce_sum(&attn)?)?;
        let mlp = self.mlp.forward(&mlp_norm.forward(&x)?, None)?;
        residual_add(&x, &comm.all_reduce_sum(&mlp)?)
    }

    /// Fuse q/k/v and gate/up ([`FusedProj`]) at the first decode-sized forward outside
    /// autograd ([`decode_rows`]), once: a model that only trains or prefills never makes the
    /// fused copy.
    fn fuse_for_decode(&mut self) -> Result<()> {
        self.decode_fused = true;
        let a = &mut self.self_attn;
        a.qkv = FusedProj::new(&mut [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj])?;
        let m = &mut self.mlp;
        m.gate_up = FusedProj::new(&mut [&mut m.gate_proj, &mut m.up_proj])?;
        Ok(())
    }

    /// Whether the layer can run as one graph node: no adapters, and every parameter frozen or
    /// a variable ([`node_ready`]).
    fn node_ready(&self) -> bool {
        let (a, m) = (&self.self_attn, &self.mlp);
        node_ready(&self.input_layernorm.weight)
            && node_ready(&self.post_attention_layernorm.weight)
            && [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
                .iter()
                .all(|p| p.lora.is_none() && node_ready(&p.weight))
    }

    /// [`DecoderLayer::forward`] as one node of x's graph ([`ops::opaque`]), on one rank, for a
    /// fresh sequence with the fused attention, when x's gradient is wanted (training). The
    /// forward runs on detached tensors, keeping what the backward needs; the backward is
    /// written out here and deposits the gradients of the weights that train into `sink`.
    /// candle's per-node gradient bookkeeping over the layer's ~17 nodes (a zero-filled
    /// accumulator and an add per gradient, bf16 adds through its slow path) was a fifth of a
    /// bf16 step. Same ops, same values as the composed forward and backward, except with
    /// `fuse_qkv` (CUDA): q, k and v one product ([`NodeQkv`]), their input gradient one
    /// product over the stacked heads' gradients, summed in the GEMM's f32 rather than by two
    /// adds in x's dtype.
    fn forward_node(
        &mut self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        sink: &ops::GradSink,
        fuse_qkv: bool,
    ) -> Result<Tensor> {
        let (y, backward) = self.forward_parts(x, cos, sin, sink, fuse_qkv)?;
        Ok(ops::opaque(x, y, backward)?)
    }

    /// [`DecoderLayer::forward_node`]'s output (computed from x detached) and backward (output
    /// gradient → x's), for the caller to make the graph node: one a layer, or one for a chain
    /// of layers ([`Llama::layers`]).
    fn forward_parts(
        &mut self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        sink: &ops::GradSink,
        fuse_qkv: bool,
    ) -> Result<(Tensor, ops::opaque::Backward)> {
        if fuse_qkv && !self.decode_fused {
            // Frozen q/k/v (and gate/up) stacked once, each weight a view of its rows: the
            // fused product then needs no copy per step. Trained weights are left as they are.
            self.fuse_for_decode()?;
        }
        let (a, m) = (&self.self_attn, &self.mlp);
        let xd = x.detach();
        // Each step a region of its own for `bench gpu-layer --phases` (ops::phases; nothing is
        // recorded unless it asks).
        let dev = x.device().clone();
        let region = |name, f: &mut dyn FnMut() -> Result<Tensor>| ops::phases::region(name, &dev, f);
        // The weights in the compute dtype (f32 masters cast), q/k/v stacked.
        let (qkv, [op, gp, upp, dp]) =
            ops::phases::region("fwd weights: casts, q/k/v stacking", &dev, || {
                Ok::<_, crate::error::Error>((
                    NodeQkv::new(a, &xd, fuse_qkv)?,
                    [
                        NodeProj::new(&a.o_proj, &xd)?,
                        NodeProj::new(&m.gate_proj, &xd)?,
                        NodeProj::new(&m.up_proj, &xd)?,
                        NodeProj::new(&m.down_proj, &xd)?,
                    ],
                ))
            })?;
        let (norm1, norm2) =
            (NodeNorm::new(&self.input_layernorm), NodeNorm::new(&self.post_attention_layernorm));
        let n1 = region("fwd RMSNorm", &mut || norm1.forward(&xd))?;
        let rope = Some((cos, sin));
        let [q, k, v] = ops::phases::region("fwd q/k/v product", &dev, || qkv.forward(&n1, a))?;
        let [q, k, v] = ops::phases::region("fwd head split + rope", &dev, || -> Result<_> {
            Ok([
                ops::split_heads(&q, a.heads, rope)?,  // [B, Hq, T, D]
                ops::split_heads(&k, a.groups, rope)?, // [B, Hk, T, D]
                ops::split_heads(&v, a.groups, None)?,
            ])
        })?;
        let scale = 1.0 / (a.head_dim as f64).sqrt();
        let (o, lse) =
            ops::phases::region("fwd attention", &dev, || ops::causal_attention_forward(&q, &k, &v, scale))?;
        let merged = region("fwd head merge", &mut || Ok(ops::merge_heads(&o)?))?;
        let attn_out = region("fwd o_proj product", &mut || op.forward(&merged))?;
        let h = region("fwd residual add", &mut || Ok(ops::add_detached(&xd, &attn_out)?))?;
        let n2 = region("fwd RMSNorm", &mut || norm2.forward(&h))?;
        let gate = region("fwd gate/up products", &mut || gp.forward(&n2))?;
        let up = region("fwd gate/up products", &mut || upp.forward(&n2))?;
        let act = region("fwd SwiGLU", &mut || Ok(ops::swiglu(&gate, &up)?))?;
        let mlp_out = region("fwd down product", &mut || dp.forward(&act))?;
        let y = region("fwd residual add", &mut || Ok(ops::add_detached(&h, &mlp_out)?))?;

        let heads = a.heads;
        let (cos, sin, sink) = (cos.clone(), sin.clone(), sink.clone());
        let backward = move |dy: &Tensor| -> candle_core::Result<Tensor> {
            let run = || -> Result<Tensor> {
                let dev = dy.device();
                let region = |name, f: &mut dyn FnMut() -> Result<Tensor>| ops::phases::region(name, dev, f);
                let add = ops::add_detached;
                // MLP: y = h + down(swiglu(gate(n2), up(n2))), n2 = norm2(h).
                let dact = region("bwd down dW + dx", &mut || dp.backward(&act, dy, &sink))?;
                let (dgate, dup) =
                    ops::phases::region("bwd SwiGLU", dev, || ops::swiglu_backward(&gate, &up, &dact))?;
                let dn2_gate = region("bwd gate/up dW + dx", &mut || gp.backward(&n2, &dgate, &sink))?;
                let dn2_up = region("bwd gate/up dW + dx", &mut || upp.backward(&n2, &dup, &sink))?;
                let dn2 = region("bwd gate + up dx add", &mut || Ok(add(&dn2_gate, &dn2_up)?))?;
                let dh =
                    region("bwd RMSNorm (+ residual)", &mut || norm2.backward(&h, &dn2, Some(dy), &sink))?;
                // Attention: h = x + o_proj(merge(attn(q, k, v))), q/k/v from n1 = norm1(x).
                let dmerged = region("bwd o_proj dW + dx", &mut || op.backward(&merged, &dh, &sink))?;
                let dout = region("bwd head split", &mut || Ok(ops::split_heads(&dmerged, heads, None)?))?;
                let (dq, dk, dv) = ops::phases::region("bwd attention", dev, || {
                    ops::causal_attention_backward(&q, &k, &v, &o, &lse, &dout, scale)
                })?;
                let dn1 = region("bwd q/k/v merge + dW + dx", &mut || {
                    qkv.backward(&n1, [&dq, &dk, &dv], (&cos, &sin), &sink)
                })?;
                region("bwd RMSNorm (+ residual)", &mut || norm1.backward(&xd, &dn1, Some(&dh), &sink))
            };
            run().map_err(|e| candle_core::Error::Msg(format!("decoder layer backward: {e}")))
        };
        Ok((y, Box::new(backward)))
    }
}

/// Whether a one-node layer on x runs q/k/v as one product: on CUDA (`SHARDSMITH_NODE_FUSED_QKV=0`:
/// three); on the CPU the frozen weights' pre-packed panels (per projection) are worth more.
fn node_fuses_qkv(x: &Tensor) -> bool {
    x.device().is_cuda() && ops::node_fused_qkv()
}

/// The dense gradient [V, H] of a gather of rows `ids` [N] from a [V, H] table, given the rows'
/// gradient `d` [N, H]: zeros, plus each row's gradient added at its id in order (as candle's
/// `index_add`). On the CPU (f32) one zero-filled buffer written in place.
fn scatter_rows((v, h): (usize, usize), ids: &Tensor, d: &Tensor) -> Result<Tensor> {
    if d.device().is_cpu() && d.dtype() == DType::F32 {
        let (ids, d) = (ids.to_vec1::<u32>()?, d.flatten_all()?.to_vec1::<f32>()?);
        let mut dense = vec![0f32; v * h];
        for (i, &id) in ids.iter().enumerate() {
            let row = &mut dense[id as usize * h..(id as usize + 1) * h];
            row.iter_mut().zip(&d[i * h..(i + 1) * h]).for_each(|(a, b)| *a += b);
        }
        return Ok(Tensor::from_vec(dense, (v, h), &Device::Cpu)?);
    }
    Ok(Tensor::zeros((v, h), d.dtype(), d.device())?.index_add(ids, &d.reshape(((), h))?, 0)?)
}

/// Per-sequence inputs shared by every layer.
pub struct SequenceInputs {
    /// [T, D/2].
    pub cos: Tensor,
    /// [T, D/2].
    pub sin: Tensor,
    /// [T, T] additive causal mask (none for one token, or when the fused kernel masks).
    pub mask: Option<Tensor>,
}

/// What a forward pass returns.
#[derive(Debug)]
pub struct LlamaOutput {
    /// [B, T', V] logits over the true vocabulary (T' = T, or 1 with `last_only`), in f32.
    pub logits: Tensor,
    /// With `hidden_states`: L + 1 tensors [B, T, H] as transformers' `output_hidden_states`
    /// (0 = embeddings, k = output of layer k − 1, L = after the final norm).
    pub hidden_states: Vec<Tensor>,
}

/// One rank of a LLaMA-2 model.
pub struct Llama {
    /// Local rows [Vp/N, H] of the embedding.
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Norm,
    /// Local rows [Vp/N, H] of the output head (the embedding when tied).
    lm_head: Proj,
    rope: Rope,
    /// Rotary tables (cos, sin) [P, D/2] for positions 0..P on the activations' device, built
    /// once per sequence length instead of per forward; each forward narrows them.
    rope_tables: Option<(Tensor, Tensor)>,
    /// Positions a sequence will reach ([`Llama::reserve`]): the KV cache and rotary tables are
    /// allocated for that many at once.
    reserved: usize,
    layout: RankLayout,
    vocab: usize,
    /// Tokens already in the KV cache.
    position: usize,
    /// [`Llama::set_layer_nodes`].
    layer_nodes: bool,
    /// [`Llama::param_grads`].
    param_grads: ops::GradSink,
    /// Embedding rows gathered for training, as leaves, with their ids ([`Llama::embed`]).
    embed_leaves: std::sync::Mutex<Vec<(candle_core::Var, Tensor)>>,
    /// [`Llama::node_forwards`].
    node_forwards: std::sync::atomic::AtomicUsize,
    /// The recorded decode step ([`Llama::graph_step`]), or why none can be recorded here.
    #[cfg(feature = "cuda")]
    decode_graph: Option<std::result::Result<ops::decode_graph::DecodeGraph, String>>,
}

/// Why a decode step runs eagerly instead of replaying a CUDA graph ([`Llama::graph_step`]);
/// cheap to make, since the eager path asks every step.
#[cfg(feature = "cuda")]
enum NoGraphStep {
    NotCuda,
    /// More rows than the GEMV kernels take (their limit).
    Rows(usize),
    Off,
    Tp(usize),
    NotPrefilled,
    Unsupported,
    Full,
}

#[cfg(feature = "cuda")]
impl NoGraphStep {
    /// The reason in words, for a step of `rows` sequences at `position`.
    fn say(&self, rows: usize, position: usize) -> String {
        match self {
            NoGraphStep::NotCuda => "the model is not on a CUDA device".into(),
            NoGraphStep::Rows(limit) => format!(
                "a batch of {rows} decodes eagerly (graph steps take 1 to {limit} rows, SHARDSMITH_CUDA_GEMV)"
            ),
            NoGraphStep::Off => {
                "graph decode is off for this model (SHARDSMITH_CUDA_GRAPH=0, or refused)".into()
            }
            NoGraphStep::Tp(tp) => format!("the model runs at tp={tp}"),
            NoGraphStep::NotPrefilled => "nothing was prefilled".into(),
            NoGraphStep::Unsupported => format!(
                "the model's weights, dtype or caches (for {rows} rows) are not what a graph step reads"
            ),
            NoGraphStep::Full => format!("the caches are full at position {position}"),
        }
    }
}

impl Llama {
    /// Load rank `layout.rank` from a `VarBuilder` over that rank's canonical (HF-named) shards.
    pub fn load(vb: VarBuilder, hp: &LlamaHparams, layout: RankLayout) -> Result<Self> {
        let tp = layout.tp;
        if !hp.heads.is_multiple_of(tp)
            || !hp.groups.is_multiple_of(tp)
            || !hp.ffn.is_multiple_of(tp)
            || !layout.padded_vocab.is_multiple_of(tp)
        {
            return Err(Error::Usage(format!(
                "cannot run at tp={tp}: heads {}, query groups {}, ffn {} and padded vocab {} must all divide by it",
                hp.heads, hp.groups, hp.ffn, layout.padded_vocab
            )));
        }
        let rows = layout.padded_vocab / tp;
        let embed_tokens = vb.get((rows, hp.hidden), "model.embed_tokens.weight")?;
        let lm_head = Proj::new(if hp.tied {
            embed_tokens.clone()
        } else {
            vb.get((rows, hp.hidden), "lm_head.weight")?
        })?;
        let layers = (0..hp.layers)
            .map(|l| DecoderLayer::load(vb.pp(format!("model.layers.{l}")), hp, tp))
            .collect::<Result<Vec<_>>>()?;
        Ok(Llama {
            embed_tokens,
            layers,
            norm: Norm::load(vb.pp("model.norm"), hp)?,
            lm_head,
            rope: Rope::new(hp),
            rope_tables: None,
            reserved: 0,
            layout,
            vocab: hp.vocab,
            position: 0,
            layer_nodes: true,
            param_grads: ops::GradSink::default(),
            embed_leaves: Default::default(),
            node_forwards: Default::default(),
            #[cfg(feature = "cuda")]
            decode_graph: None,
        })
    }

    /// The dtype the weights run in.
    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// Tokens currently held in the KV cache.
    pub fn position(&self) -> usize {
        self.position
    }

    /// Allocate the KV cache (and rotary tables) for sequences of up to `positions` tokens at
    /// the next forward, so decoding never reallocates. Longer sequences still work (the cache
    /// grows).
    pub fn reserve(&mut self, positions: usize) {
        self.reserved = positions;
        for l in &mut self.layers {
            l.self_attn.cache.reserve = positions;
        }
    }

    /// (cos, sin) [T, D/2] for positions `start..start + t` in `dtype` on `dev`: a view of the
    /// cached tables (the same values [`Rope::tables`] gives for the run).
    fn rope_run(&mut self, start: usize, t: usize, dtype: DType, dev: &Device) -> Result<(Tensor, Tensor)> {
        let end = start + t;
        let fits = match &self.rope_tables {
            Some((c, _)) => c.dim(0)? >= end && c.dtype() == dtype && c.device().same_device(dev),
            None => false,
        };
        if !fits {
            let have = self.rope_tables.as_ref().map_or(0, |(c, _)| c.dim(0).unwrap_or(0));
            let n = end.max(self.reserved).max(2 * have);
            self.rope_tables = Some(self.rope.tables(0, n, dtype, dev)?);
        }
        let Some((cos, sin)) = &self.rope_tables else { unreachable!("built above") };
        Ok((cos.narrow(0, start, t)?, sin.narrow(0, start, t)?))
    }

    /// One decode step — ids [B, 1], B ≤ [`ops::cuda_gemv_rows`], after the cached tokens — replayed from a recorded
    /// CUDA graph ([`ops::decode_graph`]): the same kernels as the eager step, without the host
    /// issuing ~8 launches per layer. Applies on one CUDA rank with the KV cache in use and
    /// room for the token, frozen weights in one dtype, no adapters, after a prefill; `Ok(None)`
    /// otherwise (the caller runs the layers). The graph is recorded at the first such step
    /// and again whenever a tensor it reads was replaced (a new cache, other weights).
    /// Returns f32 logits [B, 1, V].
    #[cfg(feature = "cuda")]
    pub fn graph_step(&mut self, ids: &Tensor) -> Result<Option<LlamaOutput>> {
        use ops::decode_graph::DecodeGraph;
        let &[rows, 1] = ids.dims() else { return Ok(None) };
        let Ok(model) = self.graph_step_model(rows)? else { return Ok(None) };
        // The ids on the host: checked as the eager embedding checks them, and copied in with
        // the position in one transfer.
        let ids = ids.flatten_all()?.to_vec1::<u32>()?;
        ids.iter().try_for_each(|&id| self.check_id(id))?;
        if !matches!(&self.decode_graph, Some(Ok(g)) if g.fits(&model, rows)) {
            // The old graph's buffers go before the new graph's are made. A capture the driver
            // refuses leaves the eager path, said once per model.
            self.decode_graph = None;
            self.decode_graph = Some(DecodeGraph::record(&model, rows).map_err(|e| {
                eprintln!("warning: cuda graph decode is off for this model, decoding eagerly: {e}");
                e.to_string()
            }));
        }
        let Some(Ok(graph)) = &mut self.decode_graph else { return Ok(None) };
        let logits = graph.step(&model, &ids, self.position)?; // [B, V'], the model's dtype
        for l in &mut self.layers {
            l.self_attn.cache.len += 1;
        }
        self.position += 1;
        let logits = logits.narrow(1, 0, self.vocab)?.to_dtype(DType::F32)?.unsqueeze(1)?;
        Ok(Some(LlamaOutput { logits, hidden_states: Vec::new() }))
    }

    /// Where a graph decode step's time goes at the current position ([`ops::decode_graph::profile`]):
    /// the whole step's milliseconds and each kind of launch's. Needs what [`Llama::graph_step`]
    /// needs (a CUDA rank after a prefill of `rows` sequences, room for one more token); the
    /// caches' next entry is left garbage, which the next step overwrites.
    #[cfg(feature = "cuda")]
    pub fn decode_profile(
        &mut self,
        rows: usize,
        reps: usize,
    ) -> Result<(f64, Vec<ops::decode_graph::KernelTime>)> {
        let model = self.graph_step_model(rows)?.map_err(|why| {
            Error::Usage(format!("no CUDA graph decode step to profile: {}", why.say(rows, self.position)))
        })?;
        Ok(ops::decode_graph::profile(&model, rows, self.position, reps)?)
    }

    /// What a graph decode step of `rows` sequences reads now, or why none applies (then the
    /// eager step runs): a CUDA rank at tp 1 after a prefill, at most [`ops::cuda_gemv_rows`]
    /// rows, graph decode on and not refused for this model, weights and caches a step can read,
    /// room for the token (else the eager step grows the cache, and the graph is recorded anew).
    #[cfg(feature = "cuda")]
    fn graph_step_model(
        &mut self,
        rows: usize,
    ) -> Result<std::result::Result<ops::decode_graph::StepModel, NoGraphStep>> {
        if !self.device().is_cuda() {
            return Ok(Err(NoGraphStep::NotCuda));
        }
        let limit = ops::cuda_gemv_rows()?;
        if !(1..=limit).contains(&rows) {
            return Ok(Err(NoGraphStep::Rows(limit)));
        }
        if !ops::cuda_graph_enabled() || matches!(self.decode_graph, Some(Err(_))) {
            return Ok(Err(NoGraphStep::Off));
        }
        if self.layout.tp != 1 {
            return Ok(Err(NoGraphStep::Tp(self.layout.tp)));
        }
        if self.position == 0 {
            return Ok(Err(NoGraphStep::NotPrefilled));
        }
        let Some(model) = self.step_model(rows)? else { return Ok(Err(NoGraphStep::Unsupported)) };
        if self.position + 1 > model.layers[0].cache.dim(3)? {
            return Ok(Err(NoGraphStep::Full));
        }
        Ok(Ok(model))
    }

    /// Let decode steps replay a recorded CUDA graph where they can ([`Llama::graph_step`], the
    /// default) or always run eagerly (comparisons, tests).
    #[cfg(feature = "cuda")]
    pub fn set_graph_decode(&mut self, on: bool) {
        self.decode_graph = if on { None } else { Some(Err("turned off".into())) };
    }

    /// The weights and caches a graph decode step of `rows` sequences reads, where one applies
    /// ([`Llama::graph_step`]'s conditions).
    #[cfg(feature = "cuda")]
    fn step_model(&mut self, rows: usize) -> Result<Option<ops::decode_graph::StepModel>> {
        use ops::decode_graph::{StepLayer, StepModel};
        let dtype = self.dtype();
        let plain = |w: &Tensor| w.dtype() == dtype && !(w.is_variable() || w.track_op());
        let plain_proj = |p: &Proj| p.lora.is_none() && plain(&p.weight);
        if !plain_proj(&self.lm_head)
            || !plain(&self.norm.weight)
            || !matches!(dtype, DType::F32 | DType::BF16)
        {
            return Ok(None);
        }
        let (position, eps) = (self.position, self.norm.eps);
        let mut layers = Vec::with_capacity(self.layers.len());
        for layer in &mut self.layers {
            if !layer.decode_fused {
                layer.fuse_for_decode()?;
            }
            let (a, m) = (&layer.self_attn, &layer.mlp);
            let projs = [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj];
            let norms = [&layer.input_layernorm, &layer.post_attention_layernorm];
            let (Some(qkv), Some(gate_up), Some(cache)) = (&a.qkv, &m.gate_up, &a.cache.buffer) else {
                return Ok(None);
            };
            if !a.use_cache
                || a.cache.len != position
                || cache.dim(1)? != rows
                || cache.dtype() != dtype
                || !projs.iter().all(|p| plain_proj(p))
                || !norms.iter().all(|n| plain(&n.weight) && n.eps == eps)
            {
                return Ok(None);
            }
            layers.push(StepLayer {
                attn_norm: layer.input_layernorm.weight.clone(),
                qkv: qkv.weight.clone(),
                o: a.o_proj.weight.clone(),
                mlp_norm: layer.post_attention_layernorm.weight.clone(),
                gate_up: gate_up.weight.clone(),
                down: m.down_proj.weight.clone(),
                cache: cache.clone(),
            });
        }
        let Some(first) = self.layers.first() else { return Ok(None) };
        let a = &first.self_attn;
        let heads = (a.heads, a.groups, a.head_dim);
        if !ops::attention::decode_kernel_supports(self.device(), dtype, a.head_dim) {
            return Ok(None);
        }
        let capacity = layers[0].cache.dim(3)?;
        let dev = self.device().clone();
        // The whole cached tables (not a narrowed view: a view is a new tensor at every call,
        // and the graph is keyed by the tensors it reads).
        self.rope_run(0, capacity, dtype, &dev)?;
        let Some(tables) = self.rope_tables.clone() else { return Ok(None) };
        Ok(Some(StepModel {
            embed: self.embed_tokens.clone(),
            layers,
            norm: self.norm.weight.clone(),
            lm_head: self.lm_head.weight.clone(),
            tables,
            eps: eps as f32,
            heads,
        }))
    }

    /// Whether attention over a fresh sequence runs the fused causal kernel here (then no mask
    /// is built: it would be T×T floats, unused).
    fn fused_attention(&self, dtype: DType, dev: &Device) -> bool {
        ops::attention::kernel_supports(dev, dtype, 2 * self.rope.inv_freq.len())
    }

    /// Free the KV caches, the rotary tables and a recorded decode graph (the next forward
    /// allocates them afresh, at the size reserved then).
    pub fn release_caches(&mut self) {
        self.reset();
        for l in &mut self.layers {
            l.self_attn.cache.buffer = None;
        }
        self.rope_tables = None;
        #[cfg(feature = "cuda")]
        if matches!(self.decode_graph, Some(Ok(_))) {
            self.decode_graph = None;
        }
    }

    /// Forget the KV cache (start a new sequence).
    pub fn reset(&mut self) {
        for l in &mut self.layers {
            l.self_attn.cache.reset();
        }
        self.position = 0;
    }

    /// A token id must name a row of the true vocabulary (not the padding).
    fn check_id(&self, id: u32) -> Result<()> {
        if id as usize >= self.vocab {
            return Err(Error::Usage(format!("token id {id} is outside the vocabulary of {}", self.vocab)));
        }
        Ok(())
    }

    /// Vocab-parallel embedding lookup: ids [B, T] (u32) → [B, T, H]. Ids outside this rank's
    /// rows contribute zeros; the all-reduce assembles the full rows.
    pub fn embed(&self, ids: &Tensor, comm: &dyn Collective) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let rows = self.embed_tokens.dim(0)?;
        let flat = ids.flatten_all()?;
        self.check_id(flat.max(0)?.to_scalar::<u32>()?)?;
        let h = self.embed_tokens.dim(1)?;
        if self.layout.tp == 1 && self.layer_nodes && self.embed_tokens.is_variable() {
            // Training the table: the rows as a leaf whose gradient [B·T, H]
            // [`Llama::take_param_grads`] scatters into the table's. candle's gather backward
            // zero-fills a [V, H] accumulator, then index_add copies it into another: three
            // passes over the largest gradient of the model where one zero-fill will do.
            let rows = candle_core::Var::from_tensor(&self.embed_tokens.detach().index_select(&flat, 0)?)?;
            let x = rows.as_tensor().reshape((b, t, h))?;
            // Only the latest gather waits for its gradient: one forward per backward, and a
            // forward that never had one (evaluation) is dropped here.
            *self.embed_leaves.lock().unwrap_or_else(|p| p.into_inner()) = vec![(rows, flat)];
            return Ok(x);
        }
        if self.layout.tp == 1 {
            return Ok(self.embed_tokens.index_select(&flat, 0)?.reshape((b, t, h))?);
        }
        let start = (self.layout.rank * rows) as f64;
        let local = flat.to_dtype(DType::F32)?.affine(1.0, -start)?; // id − start
        let mine = local.ge(0.0)?.mul(&local.lt(rows as f64)?)?; // [B·T] u8
        let clamped = local.clamp(0.0, (rows - 1) as f64)?.to_dtype(DType::U32)?;
        let gathered = self.embed_tokens.index_select(&clamped, 0)?; // [B·T, H]
        let masked = gathered.broadcast_mul(&mine.to_dtype(gathered.dtype())?.unsqueeze(1)?)?;
        Ok(comm.all_reduce_sum(&masked)?.reshape((b, t, h))?)
    }

    /// Run the decoder on embeddings x [B, T, H] placed after the cached tokens, and return
    /// logits (all positions, or the last with `last_only`) and optionally every hidden state.
    pub fn forward_embeds(
        &mut self,
        x: &Tensor,
        comm: &dyn Collective,
        last_only: bool,
        hidden_states: bool,
    ) -> Result<LlamaOutput> {
        let (_, t, _) = x.dims3()?;
        let start = self.position;
        let (cos, sin) = self.rope_run(start, t, x.dtype(), x.device())?;
        let fused = start == 0 && self.fused_attention(x.dtype(), x.device());
        let mask = if t > 1 && !fused { Some(causal_mask(t, start, x.device())?) } else { None };
        let mut hidden = Vec::new();
        let mut x = x.clone();
        for layer in &mut self.layers {
            if hidden_states {
                hidden.push(x.clone());
            }
            x = layer.forward(&x, &cos, &sin, mask.as_ref(), comm)?;
        }
        self.position += t;
        let x = self.norm.forward(&x)?;
        if hidden_states {
            hidden.push(x.clone());
        }
        let x = if last_only { x.narrow(1, t - 1, 1)? } else { x };
        // Column-parallel head: local logits [B, T', Vp/N], gathered to [B, T', Vp], trimmed to V.
        let local = self.lm_head.forward(&x)?;
        let logits = comm.all_gather_last_dim(&local)?.narrow(D::Minus1, 0, self.vocab)?;
        Ok(LlamaOutput { logits: logits.to_dtype(DType::F32)?, hidden_states: hidden })
    }

    /// Keep (inference) or skip (training: whole sequences) the KV cache.
    pub fn set_use_cache(&mut self, on: bool) {
        for l in &mut self.layers {
            l.self_attn.use_cache = on;
        }
    }

    /// Decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// What every layer of a fresh t-token sequence needs: rotary tables [T, D/2] and the
    /// causal mask [T, T].
    pub fn sequence_inputs(&self, t: usize, dtype: DType, dev: &Device) -> Result<SequenceInputs> {
        let (cos, sin) = self.rope.tables(0, t, dtype, dev)?;
        let fused = self.fused_attention(dtype, dev);
        let mask = if t > 1 && !fused { Some(causal_mask(t, 0, dev)?) } else { None };
        Ok(SequenceInputs { cos, sin, mask })
    }

    /// Decoder layer `i` on x [B, T, H] (training and activation recomputation).
    pub fn layer(
        &mut self,
        i: usize,
        x: &Tensor,
        s: &SequenceInputs,
        comm: &dyn Collective,
    ) -> Result<Tensor> {
        if self.runs_as_node(i, x, s) {
            self.node_forwards.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let fuse_qkv = node_fuses_qkv(x);
            return self.layers[i].forward_node(x, &s.cos, &s.sin, &self.param_grads, fuse_qkv);
        }
        self.layers[i].forward(x, &s.cos, &s.sin, s.mask.as_ref(), comm)
    }

    /// Every decoder layer on x [B, T, H], in training: where each would run as one graph node
    /// ([`Llama::layer`]), the whole chain is one node whose backward runs the layers'
    /// backwards in turn. candle's backward zero-fills each node's input gradient and adds the
    /// node's gradient to it (`GradStore::or_insert`, then an add: a memset and a [B, T, H] add
    /// a layer on top of the layer's own work); one node for the chain pays that once.
    /// Otherwise (or with `SHARDSMITH_LAYER_CHAIN=0`) the layers one by one.
    pub fn layers(&mut self, x: &Tensor, s: &SequenceInputs, comm: &dyn Collective) -> Result<Tensor> {
        let n = self.layers.len();
        if n == 0 || !ops::layer_chain() || !(0..n).all(|i| self.runs_as_node(i, x, s)) {
            let mut y = x.clone();
            for i in 0..n {
                y = self.layer(i, &y, s, comm)?;
            }
            return Ok(y);
        }
        let fuse_qkv = node_fuses_qkv(x);
        let mut y = x.detach();
        let mut backwards = Vec::with_capacity(n);
        for layer in &mut self.layers {
            self.node_forwards.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (next, backward) = layer.forward_parts(&y, &s.cos, &s.sin, &self.param_grads, fuse_qkv)?;
            backwards.push(backward);
            y = next;
        }
        Ok(ops::opaque(x, y, move |dy: &Tensor| {
            let mut g = dy.clone();
            for backward in backwards.iter().rev() {
                g = backward(&g)?;
            }
            Ok(g)
        })?)
    }

    /// Whether decoder layer `i` on x runs as one graph node ([`DecoderLayer::forward_node`]):
    /// nodes on, x's gradient wanted, one rank, a fresh sequence with the fused attention, and
    /// weights that can live inside a node.
    fn runs_as_node(&self, i: usize, x: &Tensor, s: &SequenceInputs) -> bool {
        let layer = &self.layers[i];
        self.layer_nodes
            && x.track_op()
            && self.layout.tp == 1
            && s.mask.is_none()
            && layer.node_ready()
            && ops::attention::kernel_supports(x.device(), x.dtype(), layer.self_attn.head_dim)
    }

    /// Run decoder layers and the head in training as one graph node each (the default;
    /// `DecoderLayer::forward_node`, [`Llama::head_native`]) or as the composed ops (off: for
    /// comparisons).
    pub fn set_layer_nodes(&mut self, on: bool) {
        self.layer_nodes = on;
    }

    /// How many decoder layers and heads have run as one graph node so far: what tests and
    /// benchmarks check to know which path they measured.
    pub fn node_forwards(&self) -> usize {
        self.node_forwards.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Where one-node layers leave the gradients of their trained weights during a backward
    /// pass ([`Llama::take_param_grads`] moves them into that backward's gradients).
    pub fn param_grads(&self) -> &ops::GradSink {
        &self.param_grads
    }

    /// Complete a backward pass's gradients `grads`: add the trained weights' gradients the
    /// one-node layers and head left aside, and, when `grads` has the gradient of the latest
    /// embedding gather made for training, turn it into the table's (summed with the head's
    /// when tied). A gather whose gradient is not in `grads` keeps waiting (with activation
    /// checkpointing it arrives with the last of the layer-by-layer backwards).
    pub fn take_param_grads(&self, grads: &mut candle_core::backprop::GradStore) -> Result<()> {
        self.param_grads.drain_into(grads)?;
        let mut leaves = self.embed_leaves.lock().unwrap_or_else(|p| p.into_inner());
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut *leaves)
            .into_iter()
            .partition(|(rows, _)| grads.get(rows.as_tensor()).is_some());
        *leaves = waiting;
        drop(leaves);
        for (rows, ids) in done {
            let Some(d) = grads.remove(rows.as_tensor()) else { continue };
            let table = &self.embed_tokens;
            let dense = scatter_rows(table.dims2()?, &ids, &d.to_dtype(table.dtype())?)?;
            let sum = match grads.remove(table) {
                Some(prev) => (prev + dense)?,
                None => dense,
            };
            grads.insert(table, sum);
        }
        Ok(())
    }

    /// Final norm and head over every position: x [B, T, H] → f32 logits [B, T, V].
    pub fn head(&self, x: &Tensor, comm: &dyn Collective) -> Result<Tensor> {
        Ok(self.head_native(x, comm)?.to_dtype(DType::F32)?)
    }

    /// [`Llama::head`] in the compute dtype: the trainer's fused cross-entropy widens the
    /// logits itself, which saves a cast of [B, T, V] each way.
    pub fn head_native(&self, x: &Tensor, comm: &dyn Collective) -> Result<Tensor> {
        let local = if self.layer_nodes
            && x.track_op()
            && self.layout.tp == 1
            && self.lm_head.lora.is_none()
            && node_ready(&self.norm.weight)
            && node_ready(&self.lm_head.weight)
        {
            self.node_forwards.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.head_node(x)?
        } else {
            self.lm_head.forward(&self.norm.forward(x)?)?
        };
        Ok(comm.all_gather_last_dim(&local)?.narrow(D::Minus1, 0, self.vocab)?)
    }

    /// Final norm and head as one node of x's graph, like a one-node decoder layer
    /// ([`DecoderLayer::forward_node`]): the head's weight gradient [V, H] is the largest of
    /// the model, and candle's backward took it through the weight's transpose and its cast
    /// (a zero-filled accumulator and an add at each, a bf16 rounding and a widening): as
    /// much memory traffic as the head's GEMMs. Here dW goes into the sink in f32 directly.
    fn head_node(&self, x: &Tensor) -> Result<Tensor> {
        let xd = x.detach();
        let norm = NodeNorm::new(&self.norm);
        let normed = norm.forward(&xd)?;
        let head = NodeProj::new(&self.lm_head, &normed)?;
        let logits = head.forward(&normed)?;
        let sink = self.param_grads.clone();
        let backward = move |dy: &Tensor| -> candle_core::Result<Tensor> {
            let run =
                || -> Result<Tensor> { norm.backward(&xd, &head.backward(&normed, dy, &sink)?, None, &sink) };
            run().map_err(|e| candle_core::Error::Msg(format!("head backward: {e}")))
        };
        Ok(ops::opaque(x, logits, backward)?)
    }

    /// Attach LoRA adapters to the projections whose name (`q_proj`, …, `down_proj`) is in
    /// `targets`; `make(name, out, in)` returns `(A [r, in], B [out, r])` for the canonical
    /// weight name. Returns the adapters' canonical names (`….q_proj.lora_A.weight`, …) and
    /// tensors, so the caller can train them.
    pub fn attach_lora(
        &mut self,
        targets: &[String],
        scale: f64,
        mut make: impl FnMut(&str, usize, usize) -> Result<(Tensor, Tensor)>,
    ) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (l, layer) in self.layers.iter_mut().enumerate() {
            let a = &mut layer.self_attn;
            let m = &mut layer.mlp;
            let projs: [(&str, &mut Proj); 7] = [
                ("self_attn.q_proj", &mut a.q_proj),
                ("self_attn.k_proj", &mut a.k_proj),
                ("self_attn.v_proj", &mut a.v_proj),
                ("self_attn.o_proj", &mut a.o_proj),
                ("mlp.gate_proj", &mut m.gate_proj),
                ("mlp.up_proj", &mut m.up_proj),
                ("mlp.down_proj", &mut m.down_proj),
            ];
            for (path, proj) in projs {
                let short = path.rsplit('.').next().unwrap_or(path);
                if !targets.iter().any(|t| t == short) {
                    continue;
                }
                let name = format!("model.layers.{l}.{path}");
                let (o, i) = proj.weight.dims2()?;
                let (la, lb) = make(&format!("{name}.weight"), o, i)?;
                out.push((format!("{name}.lora_A.weight"), la.clone()));
                out.push((format!("{name}.lora_B.weight"), lb.clone()));
                proj.lora = Some(Lora { a: la, b: lb, scale });
            }
        }
        Ok(out)
    }

    /// `embed` then `forward_embeds`.
    pub fn forward(
        &mut self,
        ids: &Tensor,
        comm: &dyn Collective,
        last_only: bool,
        hidden_states: bool,
    ) -> Result<LlamaOutput> {
        let x = self.embed(ids, comm)?;
        self.forward_embeds(&x, comm, last_only, hidden_states)
    }
}

/// [T, S] additive causal mask for T new queries after `past` cached keys: 0 where key j ≤
/// query position, −∞ after it.
fn causal_mask(t: usize, past: usize, dev: &Device) -> Result<Tensor> {
    let s = past + t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..s).map(move |j| if j <= past + i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Ok(Tensor::from_vec(mask, (t, s), dev)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::max_diff;

    fn seq(t: usize, seed: f32) -> Tensor {
        let v: Vec<f32> = (0..2 * 3 * t * 4).map(|i| (i as f32 * 0.37 + seed).sin()).collect();
        Tensor::from_vec(v, (2, 3, t, 4), &Device::Cpu).unwrap()
    }

    /// The gradients in `grads` of `backend`'s variables, by name, in its order.
    fn var_grads(
        backend: &crate::weights::RandomBackend,
        grads: &candle_core::backprop::GradStore,
    ) -> Vec<(String, Tensor)> {
        backend
            .vars()
            .iter()
            .filter_map(|(n, v)| grads.get(v.as_tensor()).map(|g| (n.clone(), g.clone())))
            .collect()
    }

    /// The chain of one-node layers as one graph node ([`Llama::layers`]) gives the output, the
    /// input's gradient and every weight's gradient of a node a layer, bit for bit (the same
    /// backwards, in the same order; only candle's zero-filled accumulators between them go).
    #[test]
    fn layer_chain_matches_a_node_a_layer() {
        use crate::commands::synth::LlamaShape;
        use crate::ops::testing::randn;
        use crate::parallel::Solo;
        let shape = LlamaShape { layers: 3, hidden: 64, ffn: 96, heads: 4, kv_heads: 2, vocab: 32 };
        let (b, t) = (2, 7);
        for dtype in [DType::F32, DType::BF16] {
            let backend = Arc::new(crate::weights::RandomBackend::new(0.1, true));
            let layout = RankLayout { tp: 1, rank: 0, padded_vocab: shape.vocab };
            let mut llama =
                Llama::load(backend.var_builder(dtype, &Device::Cpu), &shape.hparams(), layout).unwrap();
            llama.set_use_cache(false);
            let s = llama.sequence_inputs(t, dtype, &Device::Cpu).unwrap();
            let x = candle_core::Var::from_tensor(&randn(&[b, t, 64], 3).to_dtype(dtype).unwrap()).unwrap();
            let probe = randn(&[b, t, 64], 4);
            let mut run = |chain: bool| {
                let before = llama.node_forwards();
                let y = if chain {
                    llama.layers(x.as_tensor(), &s, &Solo).unwrap()
                } else {
                    let mut y = x.as_tensor().clone();
                    for i in 0..3 {
                        y = llama.layer(i, &y, &s, &Solo).unwrap();
                    }
                    y
                };
                assert_eq!(llama.node_forwards() - before, 3, "every layer a node");
                let loss = (y.to_dtype(DType::F32).unwrap() * &probe).unwrap().sum_all().unwrap();
                let mut grads = loss.backward().unwrap();
                llama.take_param_grads(&mut grads).unwrap();
                (y, grads.get(x.as_tensor()).unwrap().clone(), var_grads(&backend, &grads))
            };
            let (y_apart, dx_apart, dw_apart) = run(false);
            let (y_chain, dx_chain, dw_chain) = run(true);
            assert_eq!(max_diff(&y_apart, &y_chain), 0.0, "{dtype:?}: y");
            assert_eq!(max_diff(&dx_apart, &dx_chain), 0.0, "{dtype:?}: dx");
            assert_eq!(dw_apart.len(), 3 * 9, "{dtype:?}: the layers' weight gradients");
            assert_eq!(
                dw_apart.iter().map(|(n, _)| n).collect::<Vec<_>>(),
                dw_chain.iter().map(|(n, _)| n).collect::<Vec<_>>()
            );
            for ((name, a), (_, c)) in dw_apart.iter().zip(&dw_chain) {
                assert_eq!(max_diff(a, c), 0.0, "{dtype:?} {name}");
            }
        }
    }

    /// A layer node with q, k and v as one product over their stacked weights (the CUDA
    /// node's) gives the three products' output, input gradient and weight gradients: every
    /// weight trained (f32 and bf16, GQA) and every weight frozen (stacked once, in place).
    #[test]
    fn fused_qkv_node_matches_three_products() {
        use crate::commands::synth::LlamaShape;
        use crate::ops::testing::randn;
        let shape = LlamaShape { layers: 1, hidden: 64, ffn: 96, heads: 4, kv_heads: 2, vocab: 32 };
        let hp = shape.hparams();
        let (b, t) = (2, 7);
        for (trainable, dtype, tol) in
            [(true, DType::F32, 1e-5), (true, DType::BF16, 2e-2), (false, DType::F32, 1e-5)]
        {
            let backend = Arc::new(crate::weights::RandomBackend::new(0.1, trainable));
            let mut layer =
                DecoderLayer::load(backend.var_builder(dtype, &Device::Cpu).pp("l"), &hp, 1).unwrap();
            let (cos, sin) = Rope::new(&hp).tables(0, t, dtype, &Device::Cpu).unwrap();
            let x = candle_core::Var::from_tensor(&randn(&[b, t, hp.hidden], 3).to_dtype(dtype).unwrap())
                .unwrap();
            let probe = randn(&[b, t, hp.hidden], 4);
            let mut run = |fuse: bool| {
                let sink = ops::GradSink::default();
                let y = layer.forward_node(x.as_tensor(), &cos, &sin, &sink, fuse).unwrap();
                let loss = (y.to_dtype(DType::F32).unwrap() * &probe).unwrap().sum_all().unwrap();
                let mut grads = loss.backward().unwrap();
                sink.drain_into(&mut grads).unwrap();
                (y, grads.get(x.as_tensor()).unwrap().clone(), var_grads(&backend, &grads))
            };
            let (y_apart, dx_apart, dw_apart) = run(false);
            let (y_fused, dx_fused, dw_fused) = run(true);
            let what = format!("trainable {trainable} {dtype:?}");
            assert!(max_diff(&y_apart, &y_fused) <= tol as f32, "{what}: y");
            let scale = |g: &Tensor| {
                g.abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    .max(1.0)
            };
            assert!(max_diff(&dx_apart, &dx_fused) <= tol as f32 * scale(&dx_apart), "{what}: dx");
            assert_eq!(dw_apart.len(), if trainable { 9 } else { 0 }, "{what}: weight gradients");
            assert_eq!(
                dw_apart.iter().map(|(n, _)| n).collect::<Vec<_>>(),
                dw_fused.iter().map(|(n, _)| n).collect::<Vec<_>>()
            );
            for ((name, a), (_, f)) in dw_apart.iter().zip(&dw_fused) {
                assert_eq!(a.dims(), f.dims(), "{what} {name}");
                assert!(max_diff(a, f) <= tol as f32 * scale(a), "{what} {name}: {}", max_diff(a, f));
            }
            // Frozen weights were stacked once, each projection a view of its rows.
            assert_eq!(layer.self_attn.qkv.is_some(), !trainable, "{what}");
        }
    }

    /// Reserved or growing, the cache returns exactly the concatenation of what was appended,
    /// and a reset reuses the buffers for a new sequence.
    #[test]
    fn kv_cache_holds_the_concatenation_reserved_or_growing() {
        for reserve in [0, 5, 64] {
            let mut cache = KvCache::new();
            cache.reserve = reserve;
            for round in 0..2 {
                let chunks: Vec<Tensor> =
                    [3, 1, 1, 4, 1].iter().map(|&t| seq(t, round as f32 + t as f32)).collect();
                for (i, c) in chunks.iter().enumerate() {
                    let (k, v) = cache.append(c, &(c * 2.0).unwrap()).unwrap();
                    let want = Tensor::cat(&chunks[..=i], 2).unwrap();
                    assert_eq!(max_diff(&k, &want), 0.0, "k after chunk {i}, reserve {reserve}");
                    assert_eq!(
                        max_diff(&v, &(&want * 2.0).unwrap()),
                        0.0,
                        "v after chunk {i}, reserve {reserve}"
                    );
                }
                if reserve >= 10 {
                    assert_eq!(cache.capacity(), reserve, "a reserved cache never grows");
                }
                cache.reset();
            }
        }
    }

    /// Decode steps (`append_rotated`, identity rotation here) after a prompt (`append`) land in
    /// the same buffer, growing it when needed: the views are the concatenation of the steps'
    /// keys and values in [B, G, S, D], and q comes back split into heads.
    #[test]
    fn kv_cache_steps_follow_the_prompt_through_growth() {
        let (b, g, d, heads) = (2, 3, 4, 6);
        let (cos, sin) = (
            Tensor::ones((1, d / 2), DType::F32, &Device::Cpu).unwrap(),
            Tensor::zeros((1, d / 2), DType::F32, &Device::Cpu).unwrap(),
        );
        let mut cache = KvCache::new();
        let prompt = seq(3, 0.5);
        cache.append(&prompt, &(&prompt * 2.0).unwrap()).unwrap();
        let (mut keys, mut values) = (vec![prompt.clone()], vec![(&prompt * 2.0).unwrap()]);
        for step in 0..5 {
            let row = |n: usize, seed: f32| {
                let v: Vec<f32> = (0..b * n * d).map(|i| (i as f32 * 0.11 + seed).cos()).collect();
                Tensor::from_vec(v, (b, 1, n * d), &Device::Cpu).unwrap()
            };
            let (q, k, v) = (row(heads, step as f32), row(g, 10.0 + step as f32), row(g, 20.0 + step as f32));
            let (qr, kv_k, kv_v) = cache.append_rotated(&q, &k, &v, (&cos, &sin), heads).unwrap();
            let split = |x: &Tensor, n: usize| x.reshape((b, 1, n, d)).unwrap().transpose(1, 2).unwrap();
            assert_eq!(max_diff(&qr, &split(&q, heads)), 0.0, "q at step {step}");
            keys.push(split(&k, g));
            values.push(split(&v, g));
            assert_eq!(max_diff(&kv_k, &Tensor::cat(&keys, 2).unwrap()), 0.0, "keys after step {step}");
            assert_eq!(max_diff(&kv_v, &Tensor::cat(&values, 2).unwrap()), 0.0, "values after step {step}");
        }
        assert!(cache.capacity() >= 8, "the cache grew past the prompt's 3 positions");
    }

    /// `release_caches` frees the KV buffers and rotary tables, and the next sequence rebuilds
    /// them at the size reserved then, with the logits of the first run.
    #[test]
    fn released_caches_are_rebuilt_for_the_next_sequence() {
        use crate::models::{self, LoadOptions, Model};
        fn run(model: &mut Model, reserve: usize) -> Vec<f32> {
            model.llm().reset();
            model.llm().reserve(reserve);
            let prompt = Tensor::new(&[[5u32, 17, 42, 9, 3]], &Device::Cpu).unwrap();
            let mut logits = model.forward(&prompt, None, true, false).unwrap().logits;
            let mut all = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for _ in 0..3 {
                let next = logits.argmax(D::Minus1).unwrap();
                logits = model.forward(&next, None, true, false).unwrap().logits;
                all.extend(logits.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            }
            let rank = &model.llm().ranks()[0];
            assert!(
                rank.layers.iter().all(|l| l.self_attn.cache.capacity() == reserve),
                "reserved {reserve}"
            );
            all
        }
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/llama-gqa");
        let load = LoadOptions { tp: None, dtype: DType::F32, device: Device::Cpu, vision: None };
        let mut model = models::load(&path, &load).unwrap().0;
        let first = run(&mut model, 9);
        model.llm().release_caches();
        let rank = &model.llm().ranks()[0];
        assert!(rank.layers.iter().all(|l| l.self_attn.cache.buffer.is_none()) && rank.rope_tables.is_none());
        assert_eq!(rank.position(), 0);
        assert_eq!(run(&mut model, 32), first);
    }
}
