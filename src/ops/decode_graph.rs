//! A LLaMA decode step as one CUDA graph.
//!
//! An eager decode step at batch 1 is ~8 launches per layer (RMSNorm, q/k/v GEMV, rope + KV-cache
//! write, decode attention, o_proj GEMV + residual, RMSNorm, gate/up GEMV + SwiGLU, down GEMV +
//! residual), ~260 for a 7B model, and candle spends a few µs of host time on each (argument
//! packing, an allocation per output, kernel lookup): in total about as long as the GPU needs to
//! stream the weights once.
//! Here the step's launches are recorded once into a CUDA graph over buffers that never move
//! (the weights, the model's KV caches, the rotary tables, work buffers owned by the graph) and
//! replayed per token with one `cuGraphLaunch`. What changes between tokens lives in device
//! memory the kernels read: the token ids and the position, copied in before each replay
//! (rope.cu and decode_attn.cu take the position from a device int; the attention grid is sized
//! for the cache's capacity, and splits past the position contribute nothing).
//!
//! The graph holds only its own work buffers. The model's tensors it addresses are known by
//! their ids, and [`DecodeGraph::step`] replays only over the very tensors it was recorded over
//! (passed in again, alive for the launch): a model that reallocates its KV cache frees the old
//! one at once, and the stale graph is never launched.
//!
//! The kernels are the eager path's own (`ops::cuda`'s `launch_*`, one argument list per
//! kernel), so a replay computes what an eager step computes, bit for bit.

use super::attention::decode_graph_splits;
use super::cuda::{
    decode_attention_functions, embed_rows_function, gemv_function, gemv_norm_fits, launch_decode_attention,
    launch_embed_rows, launch_gemv, launch_rms_norm, launch_rope_qkv, rms_norm_function, rope_qkv_function,
    tensor_address, Addr, DecodeAttnArgs, GemvArgs, GemvKind, GemvNormArgs, RopeQkvArgs, StepPos,
};
use super::linear::GEMV_MAX_ROWS;
use candle_core::cuda_backend::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use candle_core::cuda_backend::cudarc::driver::{CudaGraph, CudaSlice, CudaStream, DevicePtr};
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, DType, Device, Result, Tensor, TensorId};
use std::cell::Cell;

/// One decoder layer as a decode step reads it.
pub struct StepLayer {
    /// `[H]` input RMSNorm weight.
    pub attn_norm: Tensor,
    /// [(Hq + 2G)·D, H]: q, k and v projections' rows, in that order.
    pub qkv: Tensor,
    /// [H, Hq·D].
    pub o: Tensor,
    /// `[H]` post-attention RMSNorm weight.
    pub mlp_norm: Tensor,
    /// [2F, H]: gate rows, then up rows.
    pub gate_up: Tensor,
    /// [H, F].
    pub down: Tensor,
    /// [2, B, G, cap, D]: the layer's KV cache (keys, then values), written in place.
    pub cache: Tensor,
}

/// A single-rank LLaMA's weights and KV caches as a decode step reads them: one CUDA device, one
/// dtype (f32 or bf16), every tensor contiguous.
pub struct StepModel {
    /// [V', H] embedding rows (V' the padded vocabulary).
    pub embed: Tensor,
    pub layers: Vec<StepLayer>,
    /// `[H]` final RMSNorm weight.
    pub norm: Tensor,
    /// [V', H] output head (may be `embed` itself).
    pub lm_head: Tensor,
    /// (cos, sin) [≥ cap, D/2] for positions from 0, in the model's dtype (or f32 for bf16).
    pub tables: (Tensor, Tensor),
    pub eps: f32,
    /// (Hq, G, D): query heads, K/V heads, head dim.
    pub heads: (usize, usize, usize),
}

impl StepModel {
    /// Every tensor the step addresses, in a fixed order (the graph's validity key).
    fn tensors(&self) -> Vec<&Tensor> {
        let mut all = vec![&self.embed, &self.norm, &self.lm_head, &self.tables.0, &self.tables.1];
        for l in &self.layers {
            all.extend([&l.attn_norm, &l.qkv, &l.o, &l.mlp_norm, &l.gate_up, &l.down, &l.cache]);
        }
        all
    }
}

thread_local! {
    static REPLAYS: Cell<usize> = const { Cell::new(0) };
}

/// Decode steps replayed from a graph so far on this thread (tests check the graph ran).
pub fn replays() -> usize {
    REPLAYS.with(Cell::get)
}

/// Ends a capture still open on its stream when dropped. cudarc's `end_capture` checks the
/// context's recorded errors before it ends the capture and returns early on one, and a panic
/// skips it; the driver calls here do neither (the captured graph, if any, is destroyed).
struct CaptureGuard(std::sync::Arc<CudaStream>);

impl Drop for CaptureGuard {
    fn drop(&mut self) {
        use candle_core::cuda_backend::cudarc::driver::{result, sys::CUstreamCaptureStatus};
        let stream = self.0.cu_stream();
        // SAFETY: the stream is alive (held); this thread made its context current for the
        // capture, and a graph ended here is destroyed once, by us.
        unsafe {
            if !matches!(
                result::stream::is_capturing(stream),
                Ok(CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
            ) {
                if let Ok(graph) = result::stream::end_capture(stream) {
                    if !graph.is_null() {
                        let _ = result::graph::destroy(graph);
                    }
                }
            }
        }
    }
}

/// The launches of a decode step by what they compute, in step order: the rows of a
/// [`profile`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepKernel {
    Embed,
    InputNorm,
    Qkv,
    RopeQkv,
    Attention,
    OProjAdd,
    MlpNorm,
    GateUpSwiglu,
    DownAdd,
    FinalNorm,
    Head,
}

impl StepKernel {
    pub const ALL: [StepKernel; 11] = [
        StepKernel::Embed,
        StepKernel::InputNorm,
        StepKernel::Qkv,
        StepKernel::RopeQkv,
        StepKernel::Attention,
        StepKernel::OProjAdd,
        StepKernel::MlpNorm,
        StepKernel::GateUpSwiglu,
        StepKernel::DownAdd,
        StepKernel::FinalNorm,
        StepKernel::Head,
    ];

    pub fn name(self) -> &'static str {
        match self {
            StepKernel::Embed => "embedding rows",
            StepKernel::InputNorm => "input RMSNorm",
            StepKernel::Qkv => "q/k/v GEMV (+ input RMSNorm when folded)",
            StepKernel::RopeQkv => "rope + KV-cache write",
            StepKernel::Attention => "decode attention (+ combine)",
            StepKernel::OProjAdd => "o_proj GEMV + residual",
            StepKernel::MlpNorm => "post-attention RMSNorm",
            StepKernel::GateUpSwiglu => "gate/up GEMV + SwiGLU (+ post-attention RMSNorm when folded)",
            StepKernel::DownAdd => "down GEMV + residual",
            StepKernel::FinalNorm => "final RMSNorm",
            StepKernel::Head => "lm_head GEMV (+ final RMSNorm when folded)",
        }
    }
}

/// Whether a step for `rows` sequences of hidden size `h` folds each RMSNorm into the GEMV that
/// reads its output (gemv.cu's `gemv_norm`), given norm weights on 16-byte boundaries (as
/// candle allocates them; [`DecodeGraph::record`] checks): where enabled
/// ([`super::decode_norm_fold`]), for 1 or 2 rows of a size the fold normalises exactly as the
/// RMSNorm kernel ([`gemv_norm_fits`]).
pub fn folds(rows: usize, h: usize) -> bool {
    super::decode_norm_fold() && gemv_norm_fits(rows, h)
}

/// Whether a step folding its RMSNorms or not (`folded`) launches kernels of kind `k`: all but
/// the RMSNorms when they are folded.
pub fn launches(k: StepKernel, folded: bool) -> bool {
    !(folded && matches!(k, StepKernel::InputNorm | StepKernel::MlpNorm | StepKernel::FinalNorm))
}

/// Whether the step over `m` for `rows` sequences folds its RMSNorms: [`folds`], and every norm
/// weight on a 16-byte boundary (else the eager RMSNorm kernel takes its one-element path,
/// which the fold does not replay).
fn step_folds(m: &StepModel, rows: usize, stream: &std::sync::Arc<CudaStream>) -> Result<bool> {
    if !folds(rows, m.embed.dim(1)?) {
        return Ok(false);
    }
    let norms = m.layers.iter().flat_map(|l| [&l.attn_norm, &l.mlp_norm]).chain([&m.norm]);
    for w in norms {
        if tensor_address(w, stream, "decode graph: a norm weight")? % 16 != 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// One kind of launch's share of a decode step ([`profile`]).
#[derive(Clone, Copy, Debug)]
pub struct KernelTime {
    pub kernel: StepKernel,
    /// Launch calls per step (an attention call is one or two kernels: split, then combine).
    pub calls: usize,
    /// Milliseconds per step of a graph holding only these launches (so each one's launch and
    /// drain are counted, as in the whole step).
    pub ms: f64,
}

/// Where a decode step's time goes: the whole recorded step, then for each [`StepKernel`] a
/// graph of only its launches over the same tensors, each replayed `reps` times back to back
/// (after 3 warm-up replays) at position `pos`. A launch's cost in a graph is its kernel plus
/// the gap before the next node starts; the sum of the rows against the whole step shows how
/// much the kernels' order and dependencies add. Ids are 0. The partial graphs compute garbage
/// into the graphs' own buffers and into the caches' entry `pos`, which the caller must treat
/// as unwritten (a later step or prefill overwrites it).
pub fn profile(m: &StepModel, rows: usize, pos: usize, reps: usize) -> Result<(f64, Vec<KernelTime>)> {
    let time = |keep: &dyn Fn(StepKernel) -> bool| -> Result<(f64, usize)> {
        let (mut graph, calls) = DecodeGraph::record_only(m, rows, keep)?;
        graph.set_inputs(&vec![0; rows], pos)?;
        for _ in 0..3 {
            graph.graph.0.launch().w()?;
        }
        graph.stream.synchronize().w()?;
        let t0 = std::time::Instant::now();
        for _ in 0..reps.max(1) {
            graph.graph.0.launch().w()?;
        }
        graph.stream.synchronize().w()?;
        Ok((t0.elapsed().as_secs_f64() * 1e3 / reps.max(1) as f64, calls))
    };
    let (whole, _) = time(&|_| true)?;
    // Kinds the step does not launch (the norms folded into the GEMVs after them) are left out
    // before recording: their graphs would be empty.
    let Device::Cuda(dev) = m.embed.device() else {
        bail!("decode graph: the model is not on a cuda device")
    };
    let folded = step_folds(m, rows, &dev.cuda_stream())?;
    let kinds = StepKernel::ALL
        .into_iter()
        .filter(|&k| launches(k, folded))
        .map(|kernel| {
            let (ms, calls) = time(&|k| k == kernel)?;
            Ok(KernelTime { kernel, calls, ms })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((whole, kinds))
}

/// One recorded decode step for `rows` sequences over a [`StepModel`]'s tensors.
pub struct DecodeGraph {
    graph: OwnedGraph,
    stream: std::sync::Arc<CudaStream>,
    /// Ids of the model tensors the graph was recorded over ([`StepModel::tensors`]).
    model_ids: Vec<TensorId>,
    /// The graph's work buffers (the residual stream, normed rows, q/k/v, attention output,
    /// SwiGLU output, attention partials), alive as long as the graph.
    _work: Vec<Tensor>,
    /// [B + 2] u32: the step's token ids, then the position and the position + 1 (where the
    /// step writes, and how many keys it attends to), copied in before each replay.
    inputs: CudaSlice<u32>,
    /// [B, V'] the step's logits in the model's dtype, overwritten by each replay.
    logits: Tensor,
    rows: usize,
    capacity: usize,
}

/// A recorded graph, owned by one [`DecodeGraph`].
struct OwnedGraph(CudaGraph);

// SAFETY: CUDA graph objects are not internally synchronised, so calls on one must not overlap
// (the driver API's thread-safety notes); they may come from any thread. An `OwnedGraph` is only
// reached through its `DecodeGraph`, by `&mut` (replay) or by value (drop): never from two
// threads at once. It is not `Sync`. Moving it is memory-safe but not ordered: candle's stream
// is the per-thread default stream (handle 0x2, "the calling thread's"), so a replay is ordered
// only after the work the *replaying* thread queued, and the work buffers drop on the dropping
// thread's stream. The model that owns the graph is driven by one thread (generate, bench, and
// the tp = 1 rank that `ParallelLlama` runs inline); keep it so.
unsafe impl Send for OwnedGraph {}

/// `a` moved on by `elems` elements of `dtype`.
fn offset(a: Addr, elems: usize, dtype: DType) -> Addr {
    a + (elems * dtype.size_in_bytes()) as Addr
}

impl DecodeGraph {
    /// Whether this graph was recorded over exactly `m`'s tensors for `rows` sequences.
    pub fn fits(&self, m: &StepModel, rows: usize) -> bool {
        rows == self.rows && m.tensors().iter().map(|t| t.id()).eq(self.model_ids.iter().copied())
    }

    /// Record one decode step of `m` for `rows` sequences (1 ≤ rows ≤ 8, the caches' batch).
    pub fn record(m: &StepModel, rows: usize) -> Result<Self> {
        Ok(Self::record_only(m, rows, &|_| true)?.0)
    }

    /// Record the launches of one decode step that `keep` keeps (all of them: the step), with
    /// the number of launch calls recorded.
    fn record_only(m: &StepModel, rows: usize, keep: &dyn Fn(StepKernel) -> bool) -> Result<(Self, usize)> {
        let dtype = m.embed.dtype();
        let Device::Cuda(dev) = m.embed.device() else {
            bail!("decode graph: the model is not on a cuda device")
        };
        let (vocab_rows, h) = m.embed.dims2()?;
        let (hq, g, d) = m.heads;
        let Some(first) = m.layers.first() else { bail!("decode graph: the model has no layers") };
        let (_, b, _, cap, _) = first.cache.dims5()?;
        let f = first.gate_up.dim(0)? / 2;
        let (nq, nqkv) = (hq * d, (hq + 2 * g) * d);
        // Shapes: a mismatch is a caller's bug, but a graph over wrong sizes would read out of
        // bounds on every replay, so each is checked here, named.
        let expect = |t: &Tensor, dims: &[usize], what: &str| -> Result<()> {
            if t.dims() != dims || t.dtype() != dtype || !t.device().same_device(m.embed.device()) {
                bail!(
                    "decode graph: {what} is {:?} {:?}, expected {dims:?} {dtype:?} on the embedding's device",
                    t.dims(),
                    t.dtype()
                );
            }
            Ok(())
        };
        if rows == 0 || rows > GEMV_MAX_ROWS || b != rows {
            bail!("decode graph: {rows} rows against caches for {b} sequences (at most {GEMV_MAX_ROWS})");
        }
        if ![h, nq, f].iter().all(|k| k % 8 == 0) {
            bail!(
                "decode graph: hidden {h}, Hq·D {nq} and ffn {f} must be multiples of 8 (16-byte GEMV loads)"
            );
        }
        expect(&m.norm, &[h], "the final norm")?;
        expect(&m.lm_head, &[vocab_rows, h], "the output head")?;
        for (i, l) in m.layers.iter().enumerate() {
            expect(&l.attn_norm, &[h], &format!("layer {i} input norm"))?;
            expect(&l.qkv, &[nqkv, h], &format!("layer {i} q/k/v weight"))?;
            expect(&l.o, &[h, nq], &format!("layer {i} o_proj weight"))?;
            expect(&l.mlp_norm, &[h], &format!("layer {i} post-attention norm"))?;
            expect(&l.gate_up, &[2 * f, h], &format!("layer {i} gate/up weight"))?;
            expect(&l.down, &[h, f], &format!("layer {i} down_proj weight"))?;
            expect(&l.cache, &[2, b, g, cap, d], &format!("layer {i} KV cache"))?;
        }
        let (cos, sin) = &m.tables;
        if cos.dims() != sin.dims() || cos.dtype() != sin.dtype() || cos.dim(0)? < cap || cos.dim(1)? != d / 2
        {
            bail!(
                "decode graph: rotary tables {:?} {:?} / {:?} {:?} must be [≥ {cap}, {}] of one dtype",
                cos.dims(),
                cos.dtype(),
                sin.dims(),
                sin.dtype(),
                d / 2
            );
        }
        // Kernels first: module loads and attribute calls are not allowed while capturing.
        let fn_norm = rms_norm_function(dev, dtype)?;
        let fn_embed = embed_rows_function(dev, dtype)?;
        let fn_rope = rope_qkv_function(dev, dtype, cos.dtype())?;
        let fn_attn = decode_attention_functions(dev, dtype, d)?;
        let fn_plain = gemv_function(dev, GemvKind::Plain, dtype, rows)?;
        let fn_add = gemv_function(dev, GemvKind::Add, dtype, rows)?;
        let fn_swiglu = gemv_function(dev, GemvKind::SwiGlu, dtype, rows)?;

        // Work buffers (the graph's own; the residual stream ping-pongs between xa and xb so no
        // kernel writes the buffer it reads its residual from).
        let splits = decode_graph_splits(rows * hq, cap);
        let work = |n: usize, dt: DType| Tensor::zeros(n, dt, m.embed.device());
        let (xa, xb, hn) = (work(rows * h, dtype)?, work(rows * h, dtype)?, work(rows * h, dtype)?);
        let (qkv, q_rot, att) = (work(rows * nqkv, dtype)?, work(rows * nq, dtype)?, work(rows * nq, dtype)?);
        let act = work(rows * f, dtype)?;
        let logits = work(rows * vocab_rows, dtype)?.reshape((rows, vocab_rows))?;
        // The splits' partials, and the counts by which the last split of a row combines them.
        let partials = if splits > 1 {
            let n = rows * hq * splits;
            Some((
                work(n * d, DType::F32)?,
                work(n, DType::F32)?,
                work(n, DType::F32)?,
                work(rows * hq, DType::U32)?,
            ))
        } else {
            None
        };
        let stream = dev.cuda_stream();
        let inputs = stream.alloc_zeros::<u32>(rows + 2).w()?;

        let at = |t: &Tensor, what: &str| tensor_address(t, &stream, &format!("decode graph: {what}"));
        let (a_xa, a_xb, a_hn) = (at(&xa, "x")?, at(&xb, "x")?, at(&hn, "normed x")?);
        let (a_qkv, a_qrot, a_att, a_act) =
            (at(&qkv, "qkv")?, at(&q_rot, "q")?, at(&att, "att")?, at(&act, "act")?);
        let a_logits = at(&logits, "logits")?;
        let a_partials = match &partials {
            Some((po, pm, pl, _)) => Some((at(po, "po")?, at(pm, "pm")?, at(pl, "pl")?)),
            None => None,
        };
        let a_counts = match &partials {
            Some((.., counts)) => at(counts, "counts")?,
            None => 0,
        };
        let a_ids = inputs.device_ptr(&stream).0;
        let a_pos = a_ids + (rows * std::mem::size_of::<u32>()) as Addr; // read as an int
        let (a_cos, a_sin) = (at(cos, "cos")?, at(sin, "sin")?);
        struct LayerAddrs {
            attn_norm: Addr,
            qkv: Addr,
            o: Addr,
            mlp_norm: Addr,
            gate_up: Addr,
            down: Addr,
            cache: Addr,
        }
        let layers = m
            .layers
            .iter()
            .map(|l| {
                Ok(LayerAddrs {
                    attn_norm: at(&l.attn_norm, "input norm")?,
                    qkv: at(&l.qkv, "q/k/v weight")?,
                    o: at(&l.o, "o_proj weight")?,
                    mlp_norm: at(&l.mlp_norm, "post-attention norm")?,
                    gate_up: at(&l.gate_up, "gate/up weight")?,
                    down: at(&l.down, "down_proj weight")?,
                    cache: at(&l.cache, "KV cache")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (a_embed, a_norm, a_head) =
            (at(&m.embed, "embedding")?, at(&m.norm, "final norm")?, at(&m.lm_head, "head")?);
        // 16-byte GEMV loads: every weight's first element on a 16-byte boundary.
        for (what, a) in [("embedding", a_embed), ("head", a_head)].into_iter().chain(
            layers
                .iter()
                .flat_map(|l| [("q/k/v", l.qkv), ("o_proj", l.o), ("gate/up", l.gate_up), ("down", l.down)]),
        ) {
            if a % 16 != 0 {
                bail!("decode graph: the {what} weight does not start on a 16-byte boundary");
            }
        }

        let eps = m.eps;
        let scale = (1.0 / (d as f64).sqrt()) as f32; // as the eager step rounds it
        let rope_dims = super::kv_step::Dims { b: rows, t: 1, hq, g, d, cap, start: 0 };
        let row_strides = (nqkv as i64, nqkv as i64);
        let half = b * g * cap * d; // elements of the cache's keys
        let gemv = |x: Addr, k: usize, w: Addr, r: Option<Addr>, y: Addr, n: usize| GemvArgs {
            x,
            ldx: k,
            w,
            ldw: k,
            r,
            y,
            m: rows,
            n,
            k,
            norm: None,
        };
        // Each RMSNorm folded into the GEMV that reads its output (q/k/v, gate/up, lm_head), whose
        // product is then exactly that of the RMSNorm kernel's output: the norm weights 16-byte
        // aligned (else the eager kernel takes its one-element path) and the rows within the
        // fold's reach ([`folds`]).
        let fold = step_folds(m, rows, &stream)?;
        let fns_norm = if fold {
            Some((
                gemv_function(dev, GemvKind::Norm, dtype, rows)?,
                gemv_function(dev, GemvKind::NormSwiGlu, dtype, rows)?,
            ))
        } else {
            None
        };
        let calls = Cell::new(0);
        // Whether to record a launch of kind `k` (counted).
        let kept = |k: StepKernel| {
            let on = keep(k);
            calls.set(calls.get() + on as usize);
            on
        };
        // y = RMSNorm(x; weight `gw`)·wᵀ, plain or with the SwiGLU epilogue (its kinds `norm`
        // and `product`): one launch of the folded GEMV, or the RMSNorm kernel into hn and the
        // GEMV. SAFETY: as for the launches in `record` below.
        let normed_gemv = |(norm, product): (StepKernel, StepKernel),
                           swiglu: bool,
                           [x, gw, w, y]: [Addr; 4],
                           n: usize|
         -> Result<()> {
            unsafe {
                if let Some((fn_norm_plain, fn_norm_swiglu)) = &fns_norm {
                    if kept(product) {
                        let args = GemvArgs {
                            norm: Some(GemvNormArgs { w: gw, eps, dtype }),
                            ..gemv(x, h, w, None, y, n)
                        };
                        launch_gemv(&stream, if swiglu { fn_norm_swiglu } else { fn_norm_plain }, &args)?;
                    }
                    return Ok(());
                }
                if kept(norm) {
                    launch_rms_norm(&stream, &fn_norm, [x, gw, a_hn], rows, h, eps)?;
                }
                if kept(product) {
                    let gemv_fn = if swiglu { &fn_swiglu } else { &fn_plain };
                    launch_gemv(&stream, gemv_fn, &gemv(a_hn, h, w, None, y, n))?;
                }
            }
            Ok(())
        };
        let record = || -> Result<()> {
            use StepKernel::*;
            // SAFETY (every launch below): the addresses are the tensors checked above, each
            // holding what its kernel's header comment asks for these shapes; the position ints
            // are written before each replay, position + 1 ≤ cap ([`DecodeGraph::step`]).
            unsafe {
                if kept(Embed) {
                    launch_embed_rows(&stream, &fn_embed, [a_ids, a_embed, a_xa], (rows, h, vocab_rows))?;
                }
                for l in &layers {
                    normed_gemv((InputNorm, Qkv), false, [a_xa, l.attn_norm, l.qkv, a_qkv], nqkv)?;
                    let qkv_args = RopeQkvArgs {
                        q: (a_qkv, row_strides),
                        k: (offset(a_qkv, nq, dtype), row_strides),
                        v: (offset(a_qkv, nq + g * d, dtype), row_strides),
                        tables: (a_cos, a_sin),
                        q_out: a_qrot,
                        kv: l.cache,
                    };
                    if kept(RopeQkv) {
                        launch_rope_qkv(&stream, &fn_rope, &qkv_args, &rope_dims, StepPos::Device(a_pos))?;
                    }
                    let attn_args = DecodeAttnArgs {
                        q: a_qrot,
                        k: l.cache,
                        v: offset(l.cache, half, dtype),
                        strides: ((g * cap * d) as i64, (cap * d) as i64),
                        out: a_att,
                        partials: a_partials,
                        dims: (rows, hq, g, d),
                        splits,
                        keys: StepPos::Device(a_pos + std::mem::size_of::<i32>() as Addr),
                        scale,
                        counts: a_counts,
                    };
                    if kept(Attention) {
                        launch_decode_attention(&stream, (&fn_attn.0, &fn_attn.1), &attn_args)?;
                    }
                    if kept(OProjAdd) {
                        launch_gemv(&stream, &fn_add, &gemv(a_att, nq, l.o, Some(a_xa), a_xb, h))?;
                    }
                    normed_gemv((MlpNorm, GateUpSwiglu), true, [a_xb, l.mlp_norm, l.gate_up, a_act], f)?;
                    if kept(DownAdd) {
                        launch_gemv(&stream, &fn_add, &gemv(a_act, f, l.down, Some(a_xb), a_xa, h))?;
                    }
                }
                normed_gemv((FinalNorm, Head), false, [a_xa, a_norm, a_head, a_logits], vocab_rows)?;
            }
            Ok(())
        };
        stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).w()?;
        // From here the stream leaves capture mode whatever happens (an error, a panic), or every
        // later launch on this thread would be recorded instead of run.
        let _guard = CaptureGuard(stream.clone());
        let recorded = record();
        let graph = stream.end_capture(CUgraphInstantiate_flags(0));
        recorded?;
        let Some(graph) = graph.w()? else { bail!("decode graph: the capture recorded nothing") };
        graph.upload().w()?;

        let model_ids = m.tensors().iter().map(|t| t.id()).collect();
        let mut work = vec![xa, xb, hn, qkv, q_rot, att, act];
        work.extend(partials.into_iter().flat_map(|(po, pm, pl, counts)| [po, pm, pl, counts]));
        let graph = DecodeGraph {
            graph: OwnedGraph(graph),
            stream,
            model_ids,
            _work: work,
            inputs,
            logits,
            rows,
            capacity: cap,
        };
        Ok((graph, calls.get()))
    }

    /// Check a step's inputs (`ids`, B of them, each below the embedding's rows; position `pos`
    /// with room in the caches) and copy them where the graph reads them.
    fn set_inputs(&mut self, ids: &[u32], pos: usize) -> Result<()> {
        if ids.len() != self.rows {
            bail!("decode graph: {} ids for a graph recorded for {} rows", ids.len(), self.rows);
        }
        let vocab_rows = self.logits.dim(1)?;
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab_rows) {
            bail!("decode graph: token id {bad} is past the embedding's {vocab_rows} rows");
        }
        if pos + 1 > self.capacity || pos + 1 > i32::MAX as usize {
            bail!("decode graph: position {pos} is past the caches' capacity {}", self.capacity);
        }
        let mut inputs = Vec::with_capacity(self.rows + 2);
        inputs.extend_from_slice(ids);
        inputs.extend([pos as u32, pos as u32 + 1]);
        // Pageable host memory: the driver stages it before the call returns.
        self.stream.memcpy_htod(&inputs, &mut self.inputs).w()?;
        Ok(())
    }

    /// Replay the step over `m` (the tensors it was recorded over: [`DecodeGraph::fits`]) for
    /// token `ids` (B of them, each below the embedding's rows) at position `pos` (tokens already
    /// in the caches): the logits [B, V'] in the model's dtype, a copy of the graph's buffer.
    pub fn step(&mut self, m: &StepModel, ids: &[u32], pos: usize) -> Result<Tensor> {
        if !self.fits(m, ids.len()) {
            bail!("decode graph: replayed over other tensors or {} rows than it was recorded for", ids.len());
        }
        self.set_inputs(ids, pos)?;
        self.graph.0.launch().w()?;
        REPLAYS.with(|c| c.set(c.get() + 1));
        // A copy, queued before any later replay overwrites the buffer.
        self.logits.copy()
    }
}
