//! Fused ops with backward passes: RMSNorm, rotary embedding and softmax over the last dim here;
//! SwiGLU, cross-entropy, AdamW and causal attention in submodules.
//!
//! candle's fused versions of these (`candle_nn::ops::rms_norm`, `softmax_last_dim`,
//! `rotary_emb::rope`) have no backward, so a model built on them cannot train. These are
//! `CustomOp`s with a CPU forward written here (the reference the CUDA kernels of `kernels/` are
//! checked against) and a backward expressed in differentiable tensor ops, so one model serves
//! inference and training.
//!
//! Numerics follow transformers: RMSNorm normalises in f32, rounds to the input dtype, then
//! scales (`weight * hidden.to(input_dtype)`); softmax accumulates in f32; rope is exact
//! per-element arithmetic in f32, rounded once.
//!
//! More fused ops live in submodules: SwiGLU, vocabulary cross-entropy and the AdamW step
//! ([`fused`]), and causal flash attention ([`attention`]). [`matmul`] ([`linear`]) is the projections'
//! GEMM: it skips frozen operands' gradients and runs [`cpu_gemm`] (AVX-512) on the CPU. With the `cuda` feature every op
//! also has a `cuda_fwd` launching a kernel of `kernels/` (the `cuda` submodule has the
//! launchers); the CPU forwards are the references the kernels are parity-tested against
//! (tests/cuda_parity.rs).

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D,
};
use half::{bf16, f16};

/// A float element the CPU ops compute on in f32: widened exactly, narrowed to nearest even.
pub(crate) trait Float: Copy + Default + Send + Sync {
    fn widen(self) -> f32;
    fn narrow(v: f32) -> Self;
}

impl Float for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    #[inline(always)]
    fn narrow(v: f32) -> Self {
        v
    }
}

impl Float for bf16 {
    /// By the bits: vectorises, where `to_f32` need not.
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
    #[inline(always)]
    fn narrow(v: f32) -> Self {
        cpu_gemm::to_bf16(v)
    }
}

impl Float for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn narrow(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// Rows of length `n` of a contiguous layout, or an error naming the op.
fn contiguous<'a, T>(data: &'a [T], l: &Layout, op: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("{op}: input must be contiguous"),
    }
}

/// Run `$body` with `$x` bound to the contiguous `&[T]` of a float storage (f32, bf16 or f16;
/// T its element type, so generic code runs on the values as stored); every arm's result has one
/// type.
macro_rules! with_float_slice {
    ($s:expr, $l:expr, $op:expr, |$x:ident| $body:expr) => {
        match $s {
            CpuStorage::F32(v) => {
                let $x = contiguous(v, $l, $op)?;
                $body
            }
            CpuStorage::BF16(v) => {
                let $x = contiguous(v, $l, $op)?;
                $body
            }
            CpuStorage::F16(v) => {
                let $x = contiguous(v, $l, $op)?;
                $body
            }
            other => bail!("{}: unsupported dtype {:?}", $op, other.dtype()),
        }
    };
}

/// Apply `f` (over f32 values) to a float storage, returning storage of the same dtype.
macro_rules! float_dispatch {
    ($s:expr, $l:expr, $op:expr, |$x:ident| $body:expr) => {
        match $s {
            CpuStorage::F32(v) => {
                let $x = contiguous(v, $l, $op)?;
                CpuStorage::F32($body)
            }
            CpuStorage::BF16(v) => {
                let widened = convert(contiguous(v, $l, $op)?, |v| v.to_f32());
                let $x = widened.as_slice();
                let out: Vec<f32> = $body;
                CpuStorage::BF16(convert(&out, cpu_gemm::to_bf16))
            }
            CpuStorage::F16(v) => {
                let widened = convert(contiguous(v, $l, $op)?, |v| v.to_f32());
                let $x = widened.as_slice();
                let out: Vec<f32> = $body;
                CpuStorage::F16(convert(&out, f16::from_f32))
            }
            other => bail!("{}: unsupported dtype {:?}", $op, other.dtype()),
        }
    };
}

/// Values of a float storage as f32 (contiguous): f32 borrowed in place, bf16/f16 widened.
fn as_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<std::borrow::Cow<'a, [f32]>> {
    use std::borrow::Cow;
    Ok(match s {
        CpuStorage::F32(v) => Cow::Borrowed(contiguous(v, l, op)?),
        CpuStorage::BF16(v) => Cow::Owned(convert(contiguous(v, l, op)?, |v| v.to_f32())),
        CpuStorage::F16(v) => Cow::Owned(convert(contiguous(v, l, op)?, |v| v.to_f32())),
        other => bail!("{op}: unsupported dtype {:?}", other.dtype()),
    })
}

/// An element-wise op's operand: f32 borrowed in place, bf16/f16 widened a chunk at a time
/// (no full-size f32 copy of a [B, T, F] activation).
enum Operand<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
}

impl<'a> Operand<'a> {
    fn new(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<Self> {
        Ok(match s {
            CpuStorage::F32(v) => Operand::F32(contiguous(v, l, op)?),
            CpuStorage::BF16(v) => Operand::Bf16(contiguous(v, l, op)?),
            CpuStorage::F16(v) => Operand::F16(contiguous(v, l, op)?),
            other => bail!("{op}: unsupported dtype {:?}", other.dtype()),
        })
    }

    fn len(&self) -> usize {
        match self {
            Operand::F32(v) => v.len(),
            Operand::Bf16(v) => v.len(),
            Operand::F16(v) => v.len(),
        }
    }

    /// Elements `r` as f32: borrowed, or widened into `buf`.
    fn chunk<'b>(&'b self, r: std::ops::Range<usize>, buf: &'b mut Vec<f32>) -> &'b [f32] {
        buf.clear();
        match self {
            Operand::F32(v) => return &v[r],
            Operand::Bf16(v) => buf.extend(v[r].iter().map(|x| x.to_f32())),
            Operand::F16(v) => buf.extend(v[r].iter().map(|x| x.to_f32())),
        }
        buf
    }
}

thread_local! {
    /// [`elementwise`]'s per-thread results of one chunk.
    static RESULTS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// An element-wise op over N same-length operands with `outs` outputs per element, `chunk`
/// elements at a time on the pool (a multiple of the row length for row-wise ops):
/// `f(inputs, outputs)` sees f32 chunks (widened into per-task scratch) and writes f32 results,
/// which are stored in `dtype` as one buffer [outs, n]. One pass over the data: no full-size
/// f32 copies of bf16 operands or results.
fn elementwise<const N: usize>(
    ins: [Operand; N],
    outs: usize,
    chunk: usize,
    dtype: DType,
    op: &str,
    f: impl Fn([&[f32]; N], &mut [&mut [f32]]) + Sync,
) -> Result<CpuStorage> {
    let n = ins.first().map_or(0, Operand::len);
    if ins.iter().any(|x| x.len() != n) {
        bail!("{op}: operands of different sizes");
    }
    let run = |out_chunk: &mut dyn FnMut(usize, &[f32]), c: usize| {
        let r = c * chunk..((c + 1) * chunk).min(n);
        let mut bufs: [Vec<f32>; N] = std::array::from_fn(|_| Vec::new());
        let mut it = bufs.iter_mut();
        let chunks: [&[f32]; N] =
            std::array::from_fn(|i| ins[i].chunk(r.clone(), it.next().expect("N buffers")));
        // Per-thread result scratch, reused without zeroing: `f` writes every result (a
        // zero-filled buffer per chunk was ~70 MB of memset per bf16 train step).
        par::with_scratch(&RESULTS, outs * r.len(), |results| {
            let mut parts: Vec<&mut [f32]> = results.chunks_mut(r.len().max(1)).collect();
            f(chunks, &mut parts);
            for (j, part) in results.chunks(r.len().max(1)).enumerate() {
                out_chunk(j * n + r.start, part);
            }
        });
    };
    let chunk = chunk.max(1);
    let tasks = n.div_ceil(chunk);
    macro_rules! stored {
        ($t:ty, $variant:ident, $narrow:expr) => {{
            let mut out: Vec<$t> = Vec::with_capacity(outs * n);
            let ptr = par::SendPtr::new(out.spare_capacity_mut());
            par::for_each(tasks, |c| {
                run(
                    &mut |at, vals| {
                        // SAFETY: chunks write disjoint ranges at..at+len of the capacity.
                        let dst = unsafe { ptr.slice(at, vals.len()) };
                        for (d, &v) in dst.iter_mut().zip(vals) {
                            d.write($narrow(v));
                        }
                    },
                    c,
                )
            });
            // SAFETY: the tasks wrote every element of 0..outs·n (each output's n values).
            unsafe { out.set_len(outs * n) };
            CpuStorage::$variant(out)
        }};
    }
    Ok(match dtype {
        DType::F32 => stored!(f32, F32, |v: f32| v),
        DType::BF16 => stored!(bf16, BF16, cpu_gemm::to_bf16),
        DType::F16 => stored!(f16, F16, f16::from_f32),
        other => bail!("{op}: unsupported dtype {other:?}"),
    })
}

/// Store f32 values in `dtype` (f32, bf16 or f16): the inverse of [`as_f32`].
fn store(v: Vec<f32>, dtype: DType, op: &str) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(v),
        DType::BF16 => CpuStorage::BF16(convert(&v, cpu_gemm::to_bf16)),
        DType::F16 => CpuStorage::F16(convert(&v, f16::from_f32)),
        other => bail!("{op}: unsupported dtype {other:?}"),
    })
}

/// `f` over every element, on the pool's threads (a bf16 op's widening and rounding were
/// single-threaded stretches while candle's other worker spun).
fn convert<A: Copy + Sync, B: Copy + Send>(src: &[A], f: impl Fn(A) -> B + Sync) -> Vec<B> {
    const CHUNK: usize = 1 << 14;
    // Written straight into the spare capacity: zero-filling first would be one more pass.
    let mut out = Vec::with_capacity(src.len());
    par::chunks_mut(&mut out.spare_capacity_mut()[..src.len()], CHUNK, |i, o| {
        for (o, &x) in o.iter_mut().zip(&src[i * CHUNK..]) {
            o.write(f(x));
        }
    });
    // SAFETY: the pieces cover 0..len and each element was written above.
    unsafe { out.set_len(src.len()) };
    out
}

/// `a + b` for same-shape tensors outside autograd (hand-written backwards), rounded to the
/// dtype once as candle's add rounds. bf16 on the CPU is one parallel pass here: candle's bf16
/// add converts through intrinsics it cannot inline (3–5 % of a bf16 training step). On CUDA
/// (f32, bf16) it is bias_act.cu without a bias, a thread per 16 bytes: candle's add, vectorised
/// too, launches a thread per element, most of its blocks only starting to exit (a 64 MB bf16 sum
/// at 1.3 TB/s on an H200; a training layer runs three).
pub fn add_detached(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let same = a.shape() == b.shape() && a.dtype() == b.dtype();
    let kernel = match a.device() {
        candle_core::Device::Cpu => a.dtype() == DType::BF16,
        candle_core::Device::Cuda(_) => {
            cfg!(feature = "cuda") && matches!(a.dtype(), DType::F32 | DType::BF16)
        }
        _ => false,
    };
    if same && kernel {
        return a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &AddSame);
    }
    a + b
}

/// `parts` stacked along dim 0, as `Tensor::cat(parts, 0)`: on CUDA, for contiguous f32 or bf16
/// parts outside autograd, one device-to-device copy each (candle's cat copies one element a
/// thread); elsewhere, or when a part carries a gradient, candle's cat.
pub fn cat_rows(parts: &[Tensor]) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if !parts.iter().any(|t| t.track_op()) {
        if let Some(t) = cuda::cat_rows(parts)? {
            return Ok(t);
        }
    }
    Tensor::cat(parts, 0)
}

/// [`add_detached`]'s op: bf16 on the CPU, f32 and bf16 on CUDA.
struct AddSame;

impl CustomOp2 for AddSame {
    fn name(&self) -> &'static str {
        "add"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        // Rows of 8 take the kernel's 16-byte path; other sizes its one-element loop.
        let n = l1.shape().elem_count();
        if l2.shape().elem_count() != n {
            candle_core::bail!("add: {:?} and {:?} differ", l1.shape(), l2.shape());
        }
        let cols = if n.is_multiple_of(8) { 8 } else { 1 };
        let y = cuda::bias_act((s1, l1), None, Some((s2, l2)), cols, epilogue::Act::Identity)?;
        Ok((y, l1.shape().clone()))
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if (s1.dtype(), s2.dtype()) != (DType::BF16, DType::BF16) {
            candle_core::bail!(
                "add: the CPU kernel adds bf16 only, got {:?} and {:?}",
                s1.dtype(),
                s2.dtype()
            );
        }
        let ins = [Operand::new(s1, l1, self.name())?, Operand::new(s2, l2, self.name())?];
        let out = elementwise(ins, 1, 1 << 14, DType::BF16, self.name(), |[a, b], out| {
            out[0].iter_mut().zip(a).zip(b).for_each(|((o, a), b)| *o = a + b);
        })?;
        Ok((out, l1.shape().clone()))
    }
}

/// Most rows of a product on CUDA (decode's batch) that the GEMV kernels of
/// `kernels/src/gemv.cu` take; more rows go to cuBLAS (and the decode step runs eagerly: the
/// CUDA graph runs the GEMV kernels). The kernels stream the weight once for all rows, so at
/// batch 1 they beat cuBLAS (3.55 against 4.25 ms of a 7B token's products on an H200), but
/// their per-row FMAs make them compute-bound by batch 4 (4.57 against 4.22) and 8 (5.97
/// against 4.24). Whole steps, graph with GEMVs against eager with cuBLAS: batch 4 5.44 against
/// 6.17 ms, batch 8 7.42 against 6.24 (BENCHMARKS.md, 2026-11-28).
/// `SHARDSMITH_CUDA_GEMV=N` (0 to [`linear::GEMV_MAX_ROWS`]) sets the limit, 0 turning the
/// kernels off, for comparisons; another value is an error naming the variable.
pub fn cuda_gemv_rows() -> Result<usize> {
    static ROWS: std::sync::OnceLock<std::result::Result<usize, String>> = std::sync::OnceLock::new();
    ROWS.get_or_init(|| parse_gemv_rows(std::env::var("SHARDSMITH_CUDA_GEMV").ok().as_deref()))
        .clone()
        .map_err(candle_core::Error::msg)
}

/// [`cuda_gemv_rows`]'s default: the largest measured batch whose graph step won on an H200
/// (5 to 7 were not measured).
pub const CUDA_GEMV_DEFAULT_ROWS: usize = 4;

fn parse_gemv_rows(value: Option<&str>) -> std::result::Result<usize, String> {
    match value {
        None | Some("") => Ok(CUDA_GEMV_DEFAULT_ROWS),
        Some(v) => v.parse::<usize>().ok().filter(|n| *n <= linear::GEMV_MAX_ROWS).ok_or_else(|| {
            format!(
                "SHARDSMITH_CUDA_GEMV={v:?}: expected the most rows for the GEMV kernels, 0 to {}",
                linear::GEMV_MAX_ROWS
            )
        }),
    }
}

/// Whether a single-rank decode step on CUDA replays a recorded CUDA graph
/// (`decode_graph`; the default, where it applies: batches up to [`cuda_gemv_rows`], since the
/// graph runs the GEMV kernels) rather than issuing its launches one by one;
/// `SHARDSMITH_CUDA_GRAPH=0` turns it off, for comparisons.
pub fn cuda_graph_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("SHARDSMITH_CUDA_GRAPH").map_or(true, |v| v != "0"))
}

/// Whether a CUDA-graph decode step folds each RMSNorm into the GEMV that reads its output
/// (`decode_graph`; gemv.cu's `gemv_norm`: every block normalises x into shared memory, bit for
/// bit as the RMSNorm kernel, before its product): the default, 263.0–263.7 against
/// 258.3–259.5 tokens/s at batch 1 on an H200 (BENCHMARKS.md part 16);
/// `SHARDSMITH_DECODE_NORM_FOLD=0` keeps the separate launches, for comparisons. (A first fold,
/// into the residual GEMV before each norm with its last block normalising, was slower than
/// separate launches and is gone.)
pub fn decode_norm_fold() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("SHARDSMITH_DECODE_NORM_FOLD").map_or(true, |v| v != "0"))
}

/// Whether a training layer node on CUDA runs q, k and v as one product over their stacked
/// weights (`models::llama`'s `NodeQkv`): the default; `SHARDSMITH_NODE_FUSED_QKV=0` runs three,
/// for comparisons.
pub fn node_fused_qkv() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("SHARDSMITH_NODE_FUSED_QKV").map_or(true, |v| v != "0"))
}

/// Whether a training forward runs its one-node decoder layers as one graph node for the chain
/// (`models::llama::Llama::layers`: candle's backward then zero-fills and adds one input
/// gradient, not one a layer): the default; `SHARDSMITH_LAYER_CHAIN=0` makes a node a layer, for
/// comparisons.
pub fn layer_chain() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("SHARDSMITH_LAYER_CHAIN").map_or(true, |v| v != "0"))
}

/// Whether cudarc's per-buffer event tracking stays on for devices shardsmith opens
/// (`SHARDSMITH_CUDA_EVENTS=1`, for comparisons); off by default (`quiet_event_tracking`).
pub fn cuda_events_kept() -> bool {
    std::env::var("SHARDSMITH_CUDA_EVENTS").is_ok_and(|v| v == "1")
}

pub mod attention;
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // used by ops::cublas; tested everywhere
mod blas_plan;
mod cast;
mod choice;
pub mod cpu_gemm;
#[cfg(feature = "cuda")]
mod cublas;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
pub mod decode_graph;
pub mod epilogue;
#[cfg(feature = "cuda")]
pub use cuda::{gemv_launches as cuda_gemv_launches, keep_pool_memory, quiet_event_tracking};
pub mod fused;
pub mod heads;
pub mod kv_step;
pub mod linear;
pub mod opaque;
pub(crate) mod par;
pub mod phases;
pub(crate) mod vmath;
pub mod wgmma_check;

pub use attention::{causal_attention, causal_attention_backward, causal_attention_forward};
pub use cast::cast;
pub use fused::{
    adamw_step, adamw_step_ref, cross_entropy, cross_entropy_mean, swiglu, swiglu_backward, AdamWStep,
};
pub use heads::{merge_heads, split_heads, split_heads_backward, split_heads_backward_cat};
pub use linear::{matmul, matmul_f32};
pub use opaque::{opaque, GradSink};

// ---------------------------------------------------------------------------------------------
// RMSNorm
// ---------------------------------------------------------------------------------------------

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    /// x [..., H], w [H] → w · round(x / rms(x)), per row, in f32.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let h = l1.dims().last().copied().unwrap_or(1);
        let w = as_f32(s2, l2, self.name())?;
        if w.len() != h {
            bail!("rms-norm: weight has {} elements, rows have {h}", w.len());
        }
        let (eps, dtype) = (self.eps, s1.dtype());
        // Whole rows per chunk; each row normalised in f32, rounded to the dtype (transformers'
        // `hidden.to(input_dtype)`), then scaled.
        let chunk = ((1 << 14) / h).max(1) * h;
        let out =
            elementwise([Operand::new(s1, l1, self.name())?], 1, chunk, dtype, self.name(), |[x], out| {
                for (x, y) in x.chunks_exact(h).zip(out[0].chunks_exact_mut(h)) {
                    let ms = x.iter().map(|v| v * v).sum::<f32>() / h as f32;
                    let r = 1.0 / (ms + eps).sqrt();
                    let rows = y.iter_mut().zip(x).zip(w.iter());
                    match dtype {
                        DType::BF16 => {
                            rows.for_each(|((y, x), w)| *y = w * cpu_gemm::to_bf16(x * r).to_f32())
                        }
                        DType::F16 => rows.for_each(|((y, x), w)| *y = w * f16::from_f32(x * r).to_f32()),
                        _ => rows.for_each(|((y, x), w)| *y = w * (x * r)),
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
        Ok((cuda::rms_norm_fwd(s1, l1, s2, l2, self.eps)?, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::BF16) {
            // The formulas below in one kernel (rmsnorm.cu), dw summed in f32.
            let (dx, dw) = cuda::rms_norm_bwd(x, w, g, None, self.eps)?;
            return Ok((Some(dx), Some(dw.to_dtype(w.dtype())?)));
        }
        // In f32: n = x·r, r = (mean(x²) + eps)^-½; y = w·n. dw = Σ_rows g·n, and only for a
        // weight that trains (a frozen norm's dw was a full pass over the activations for
        // nothing).
        let dx = rms_norm_backward_input(x, w, g, self.eps as f64)?;
        if !(w.is_variable() || w.track_op()) {
            return Ok((Some(dx), None));
        }
        let dw = rms_norm_backward_weight(x, g, self.eps as f64)?;
        Ok((Some(dx), Some(dw.to_dtype(w.dtype())?)))
    }
}

/// (dx, dw) of [`rms_norm`] outside autograd (hand-written backwards), dw (f32 `[H]`) only
/// `with_weight`; with `skip` (the gradient reaching x around the norm, by a residual
/// connection: same shape as x) dx + skip, as [`add_detached`] would sum them. On CUDA one kernel
/// gives all of it in the same pass over x and g (rmsnorm.cu); elsewhere
/// [`rms_norm_backward_input`], [`rms_norm_backward_weight`] and the add.
pub fn rms_norm_backward(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    eps: f64,
    with_weight: bool,
    skip: Option<&Tensor>,
) -> Result<(Tensor, Option<Tensor>)> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::BF16) {
        let (dx, dw) = cuda::rms_norm_bwd(x, w, g, skip, eps as f32)?;
        return Ok((dx, with_weight.then_some(dw)));
    }
    let dw = if with_weight { Some(rms_norm_backward_weight(x, g, eps)?) } else { None };
    let dx = rms_norm_backward_input(x, w, g, eps)?;
    let dx = match skip {
        Some(s) => add_detached(&s.to_dtype(dx.dtype())?, &dx)?,
        None => dx,
    };
    Ok((dx, dw))
}

/// dw of [`rms_norm`] at x [.., H] for the output gradient g: `Σ_rows g · x·r`, in f32 `[H]`.
pub fn rms_norm_backward_weight(x: &Tensor, g: &Tensor, eps: f64) -> Result<Tensor> {
    if x.device().is_cpu() && x.shape() == g.shape() {
        return x.contiguous()?.apply_op2_no_bwd(&g.contiguous()?, &RmsNormWeightGrad { eps: eps as f32 });
    }
    let (xf, gf) = (x.to_dtype(DType::F32)?, g.to_dtype(DType::F32)?);
    let r = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let n = xf.broadcast_mul(&r)?;
    (gf * n)?.reshape(((), x.dim(D::Minus1)?))?.sum(0)
}

/// [`rms_norm_backward_weight`]'s CPU pass (x, g → dw [H] f32): per row r = (mean(x²) + eps)^-½,
/// then dw += g·x·r, rows in order (the composed ops' eight passes and allocations over
/// [rows, H] were 4 % of a bf16 step's single-threaded time).
struct RmsNormWeightGrad {
    eps: f32,
}

impl CustomOp2 for RmsNormWeightGrad {
    fn name(&self) -> &'static str {
        "rms-norm-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let h = *l1.dims().last().unwrap_or(&1);
        if h == 0 {
            return Ok((CpuStorage::F32(Vec::new()), Shape::from(0)));
        }
        fn run<X: Float, G: Float>(x: &[X], g: &[G], h: usize, eps: f32) -> Vec<f32> {
            let mut dw = vec![0f32; h];
            for (x, g) in x.chunks_exact(h).zip(g.chunks_exact(h)) {
                let ss: f32 = x.iter().map(|&v| v.widen() * v.widen()).sum();
                let r = 1.0 / (ss / h as f32 + eps).sqrt();
                for ((d, &x), &g) in dw.iter_mut().zip(x).zip(g) {
                    *d += g.widen() * (x.widen() * r);
                }
            }
            dw
        }
        let name = self.name();
        let dw =
            with_float_slice!(s1, l1, name, |x| with_float_slice!(s2, l2, name, |g| run(x, g, h, self.eps)));
        Ok((CpuStorage::F32(dw), Shape::from(h)))
    }
}

/// dx of [`rms_norm`] at x [.., H] with weight w `[H]` for the output gradient g:
/// `dx = r · (g·w − n · mean(g·w·n))`, n = x·r, r = (mean(x²) + eps)^-½, in f32, returned in x's
/// dtype. One fused pass per row on the CPU; composed tensor ops elsewhere.
pub fn rms_norm_backward_input(x: &Tensor, w: &Tensor, g: &Tensor, eps: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::BF16) {
        return Ok(cuda::rms_norm_bwd(x, w, g, None, eps as f32)?.0);
    }
    if x.device().is_cpu() {
        let w = w.to_dtype(x.dtype())?;
        return x.contiguous()?.apply_op3_no_bwd(
            &w.contiguous()?,
            &g.contiguous()?,
            &RmsNormBackward { eps: eps as f32 },
        );
    }
    let x_dtype = x.dtype();
    let (x, w, g) = (x.to_dtype(DType::F32)?, w.to_dtype(DType::F32)?, g.to_dtype(DType::F32)?);
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let n = x.broadcast_mul(&r)?;
    let gw = g.broadcast_mul(&w)?;
    let dot = (&gw * &n)?.mean_keepdim(D::Minus1)?;
    (gw - n.broadcast_mul(&dot)?)?.broadcast_mul(&r)?.to_dtype(x_dtype)
}

/// [`rms_norm_backward_input`]'s CPU pass (x, w, g → dx).
struct RmsNormBackward {
    eps: f32,
}

impl CustomOp3 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "rms-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let h = l1.dims().last().copied().unwrap_or(1);
        let w = as_f32(s2, l2, self.name())?;
        let (x, g) = (Operand::new(s1, l1, self.name())?, Operand::new(s3, l3, self.name())?);
        if w.len() != h || g.len() != x.len() {
            bail!("rms-norm-backward: x {:?}, weight {:?}, gradient {:?}", l1.dims(), l2.dims(), l3.dims());
        }
        let eps = self.eps;
        let chunk = ((1 << 14) / h).max(1) * h;
        let dx = elementwise([x, g], 1, chunk, s1.dtype(), self.name(), |[x, g], out| {
            for ((x, g), dx) in x.chunks_exact(h).zip(g.chunks_exact(h)).zip(out[0].chunks_exact_mut(h)) {
                let ms = x.iter().map(|v| v * v).sum::<f32>() / h as f32;
                let r = 1.0 / (ms + eps).sqrt();
                // mean(g·w·n) = r · mean(g·w·x)
                let dot =
                    r * x.iter().zip(g).zip(w.iter()).map(|((x, g), w)| g * w * x).sum::<f32>() / h as f32;
                for (((dx, x), g), w) in dx.iter_mut().zip(x).zip(g).zip(w.iter()) {
                    *dx = r * (g * w - x * r * dot);
                }
            }
        })?;
        Ok((dx, l1.shape().clone()))
    }
}

/// RMSNorm over the last dimension: `w · (x / sqrt(mean(x²) + eps))`, differentiable in x and w.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let w = w.to_dtype(x.dtype())?;
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding (the two halves of each head, transformers' `rotate_half`)
// ---------------------------------------------------------------------------------------------

struct Rope;

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    /// x [B, H, T, D], cos/sin [T, D/2]: (x1, x2) → (x1·cos − x2·sin, x2·cos + x1·sin).
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, _, t, d) = l1.shape().dims4()?;
        let half = d / 2;
        let (cos, sin) = (as_f32(s2, l2, self.name())?, as_f32(s3, l3, self.name())?);
        if cos.len() < t * half || sin.len() < t * half {
            bail!("rope: tables cover {} positions × {half}, need {t}", cos.len() / half.max(1));
        }
        let out = float_dispatch!(s1, l1, self.name(), |x| {
            let mut y = vec![0f32; x.len()];
            par::chunks_mut(&mut y, t * d, |bh, y| {
                let x = &x[bh * t * d..(bh + 1) * t * d];
                for p in 0..t {
                    let (c, s) = (&cos[p * half..(p + 1) * half], &sin[p * half..(p + 1) * half]);
                    let (x, y) = (&x[p * d..(p + 1) * d], &mut y[p * d..(p + 1) * d]);
                    for i in 0..half {
                        let (a, b) = (x[i], x[i + half]);
                        y[i] = a * c[i] - b * s[i];
                        y[i + half] = b * c[i] + a * s[i];
                    }
                }
            });
            y
        });
        Ok((out, l1.shape().clone()))
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
        Ok((cuda::rope(s1, l1, s2, l2, s3, l3)?, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The rotation's transpose is the rotation by −θ.
        Ok((Some(rope(g, cos, &sin.neg()?)?), None, None))
    }
}

/// Rotary embedding of x [B, H, T, D] with tables cos/sin [T, D/2]; differentiable in x.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope)
}

// ---------------------------------------------------------------------------------------------
// Softmax over the last dimension
// ---------------------------------------------------------------------------------------------

/// softmax(scale·x) over the last dimension.
struct Softmax {
    scale: f32,
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = l.dims().last().copied().unwrap_or(1);
        let scale = self.scale;
        let out = float_dispatch!(s, l, self.name(), |x| {
            let mut y = vec![0f32; x.len()];
            par::chunks_mut(&mut y, n, |r, y| {
                let x = &x[r * n..(r + 1) * n];
                let max = x.iter().map(|x| scale * x).fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for (y, x) in y.iter_mut().zip(x) {
                    *y = (scale * x - max).exp();
                    sum += *y;
                }
                y.iter_mut().for_each(|y| *y /= sum);
            });
            y
        });
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda::softmax(s, l, self.scale)?, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        // dx = scale · y · (g − Σ g·y)
        let dot = (g * y)?.sum_keepdim(D::Minus1)?;
        let dx = (y * g.broadcast_sub(&dot)?)?;
        Ok(Some(if self.scale == 1.0 { dx } else { (dx * self.scale as f64)? }))
    }
}

/// Softmax over the last dimension, accumulated in f32; differentiable.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    softmax_last_dim_scaled(x, 1.0)
}

/// softmax(scale·x) over the last dimension, the scaling done in f32 inside the same pass (the
/// scaled scores are never stored); differentiable. Scale 1 is [`softmax_last_dim`].
pub fn softmax_last_dim_scaled(x: &Tensor, scale: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax { scale: scale as f32 })
}

/// Deterministic inputs and comparisons shared by the ops' unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{DType, Device, Tensor};

    /// Uniform values in [-1, 1) from a seeded LCG, on the CPU.
    pub(crate) fn randn(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// max |a − b| over all elements, compared in f32; infinite when either side has a NaN or
    /// an infinity where the other has not (a reduction's max would skip the NaN).
    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.shape(), b.shape(), "max_diff of different shapes");
        let v = |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v(a).iter()
            .zip(&v(b))
            .map(|(x, y)| {
                if x == y {
                    0.0
                } else if (x - y).is_nan() {
                    f32::INFINITY
                } else {
                    (x - y).abs()
                }
            })
            .fold(0.0, f32::max)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{max_diff, randn};
    use super::*;
    use candle_core::Var;

    #[test]
    fn gemv_rows_parse_and_name_the_variable_on_error() {
        assert_eq!(parse_gemv_rows(None), Ok(CUDA_GEMV_DEFAULT_ROWS));
        assert_eq!(parse_gemv_rows(Some("")), Ok(CUDA_GEMV_DEFAULT_ROWS));
        assert_eq!(parse_gemv_rows(Some("0")), Ok(0));
        assert_eq!(parse_gemv_rows(Some("8")), Ok(8));
        for bad in ["9", "-1", "on"] {
            let err = parse_gemv_rows(Some(bad)).unwrap_err();
            assert!(
                err.contains("SHARDSMITH_CUDA_GEMV") && err.contains(bad) && err.contains("0 to 8"),
                "{err}"
            );
        }
    }

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let d = max_diff(a, b);
        assert!(d <= tol, "max |Δ| {d} > {tol}");
    }

    /// The fast bf16 add rounds exactly as candle's add (bit for bit, specials included).
    #[test]
    fn add_detached_matches_candle_bit_for_bit() {
        let mut a = randn(&[3, 40_000], 1)
            .to_dtype(DType::BF16)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<bf16>()
            .unwrap();
        let b = randn(&[3, 40_000], 2).affine(1e-3, 0.0).unwrap().to_dtype(DType::BF16).unwrap();
        a[..4].copy_from_slice(&[bf16::NAN, bf16::INFINITY, bf16::NEG_INFINITY, bf16::MAX]);
        let a = Tensor::from_vec(a, (3, 40_000), &candle_core::Device::Cpu).unwrap();
        let ours = add_detached(&a, &b).unwrap().flatten_all().unwrap().to_vec1::<bf16>().unwrap();
        let theirs = (&a + &b).unwrap().flatten_all().unwrap().to_vec1::<bf16>().unwrap();
        assert!(ours[0].is_nan() && theirs[0].is_nan());
        assert!(ours[1..].iter().zip(&theirs[1..]).all(|(x, y)| x.to_bits() == y.to_bits()));
    }

    /// The composed (slow, autograd-native) reference of each op.
    fn rms_ref(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
        let r = (x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + eps)
            .unwrap()
            .sqrt()
            .unwrap()
            .recip()
            .unwrap();
        x.broadcast_mul(&r).unwrap().broadcast_mul(w).unwrap()
    }

    fn rope_ref(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let d = x.dim(D::Minus1).unwrap();
        let (x1, x2) = (x.narrow(D::Minus1, 0, d / 2).unwrap(), x.narrow(D::Minus1, d / 2, d / 2).unwrap());
        let rot = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
        let cos = Tensor::cat(&[cos, cos], D::Minus1).unwrap();
        let sin = Tensor::cat(&[sin, sin], D::Minus1).unwrap();
        (x.broadcast_mul(&cos).unwrap() + rot.broadcast_mul(&sin).unwrap()).unwrap()
    }

    #[test]
    fn forward_and_gradients_match_composed_references() {
        let x = Var::from_tensor(&randn(&[2, 3, 5, 8], 1)).unwrap();
        let w = Var::from_tensor(&(randn(&[8], 2) + 1.0).unwrap()).unwrap();
        let cos = randn(&[5, 4], 3);
        let sin = randn(&[5, 4], 4);
        let probe = randn(&[2, 3, 5, 8], 5);
        type Pipeline<'a> = Box<dyn Fn(&Tensor, &Tensor) -> Tensor + 'a>;
        let ours: Pipeline = Box::new(|x, w| {
            softmax_last_dim(&rope(&rms_norm(x, w, 1e-5).unwrap(), &cos, &sin).unwrap()).unwrap()
        });
        let reference: Pipeline = Box::new(|x, w| {
            candle_nn::ops::softmax(&rope_ref(&rms_ref(x, w, 1e-5), &cos, &sin), D::Minus1).unwrap()
        });
        let run = |f: &Pipeline| {
            let y = f(x.as_tensor(), w.as_tensor());
            let grads = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            (y, grads.get(&x).unwrap().clone(), grads.get(&w).unwrap().clone())
        };
        let (y1, gx1, gw1) = run(&ours);
        let (y2, gx2, gw2) = run(&reference);
        close(&y1, &y2, 1e-6);
        close(&gx1, &gx2, 1e-5);
        close(&gw1, &gw2, 1e-5);
    }

    /// The CPU weight-gradient pass against the composed formula, f32 and bf16 inputs.
    #[test]
    fn rms_norm_weight_gradient_matches_the_composed_formula() {
        for dtype in [DType::F32, DType::BF16] {
            let x = (randn(&[3, 7, 40], 8) * 2.0).unwrap().to_dtype(dtype).unwrap();
            let g = randn(&[3, 7, 40], 9).to_dtype(dtype).unwrap();
            let ours = rms_norm_backward_weight(&x, &g, 1e-5).unwrap();
            let (xf, gf) = (x.to_dtype(DType::F32).unwrap(), g.to_dtype(DType::F32).unwrap());
            let n = rms_ref(&xf, &Tensor::ones(40, DType::F32, xf.device()).unwrap(), 1e-5);
            let want = (gf * n).unwrap().reshape((21, 40)).unwrap().sum(0).unwrap();
            assert_eq!(ours.dtype(), DType::F32);
            close(&ours, &want, 1e-5);
        }
    }

    /// softmax(scale·x), negative scale included, forward and gradient against candle's
    /// softmax of the scaled input; scale 1 is bit-identical to the unscaled op.
    #[test]
    fn scaled_softmax_matches_softmax_of_the_scaled_input() {
        let x = Var::from_tensor(&(randn(&[3, 4, 37], 6) * 3.0).unwrap()).unwrap();
        let probe = randn(&[3, 4, 37], 7);
        for scale in [0.125, -0.7] {
            let run = |y: Tensor| {
                let g = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                (y, g.get(&x).unwrap().clone())
            };
            let (y1, g1) = run(softmax_last_dim_scaled(x.as_tensor(), scale).unwrap());
            let (y2, g2) =
                run(candle_nn::ops::softmax(&(x.as_tensor() * scale).unwrap(), D::Minus1).unwrap());
            close(&y1, &y2, 1e-6);
            close(&g1, &g2, 1e-6);
        }
        let (a, b) =
            (softmax_last_dim_scaled(x.as_tensor(), 1.0).unwrap(), softmax_last_dim(x.as_tensor()).unwrap());
        assert_eq!(max_diff(&a, &b), 0.0);
    }

    /// Gradients come back in each input's dtype, so candle can sum them into its grad store.
    #[test]
    fn bf16_gradients_flow_through_every_op() {
        let x = Var::from_tensor(&randn(&[1, 2, 3, 8], 1).to_dtype(DType::BF16).unwrap()).unwrap();
        let w = Var::from_tensor(&(randn(&[8], 2) + 1.0).unwrap().to_dtype(DType::BF16).unwrap()).unwrap();
        let (cos, sin) = (
            randn(&[3, 4], 3).to_dtype(DType::BF16).unwrap(),
            randn(&[3, 4], 4).to_dtype(DType::BF16).unwrap(),
        );
        let y = softmax_last_dim(
            &rope(&rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap(), &cos, &sin).unwrap(),
        )
        .unwrap();
        let grads = y.to_dtype(DType::F32).unwrap().sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(grads.get(&x).unwrap().dtype(), DType::BF16);
        assert_eq!(grads.get(&w).unwrap().dtype(), DType::BF16);
    }

    #[test]
    fn bf16_rms_norm_rounds_before_scaling_like_transformers() {
        let x = randn(&[4, 16], 9).to_dtype(DType::BF16).unwrap();
        let w = (randn(&[16], 10) + 1.0).unwrap().to_dtype(DType::BF16).unwrap();
        let ours = rms_norm(&x, &w, 1e-6).unwrap().to_dtype(DType::F32).unwrap();
        // transformers: (x.f32 * rsqrt(mean(x.f32²) + eps)).to(bf16) * w  (bf16 multiply).
        let xf = x.to_dtype(DType::F32).unwrap();
        let r = (xf.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + 1e-6)
            .unwrap()
            .sqrt()
            .unwrap()
            .recip()
            .unwrap();
        let n = xf.broadcast_mul(&r).unwrap().to_dtype(DType::BF16).unwrap();
        let want = n.broadcast_mul(&w).unwrap().to_dtype(DType::F32).unwrap();
        close(&ours, &want, 0.0);
    }
}
