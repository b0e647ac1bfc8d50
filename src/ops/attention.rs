//! Causal self-attention as one differentiable op.
//!
//! On CUDA it runs the FlashAttention-style kernels of `kernels/flash_attn.cu` (tiled, online
//! softmax, no T×T matrix; backward by recomputation from the saved log-sum-exp). On the CPU
//! (`cpu`) the same algorithm blocked by query rows, in f32 GEMMs and a vectorised exp: what
//! the models run there, and what the CUDA kernels are parity-tested against. The materialised
//! softmax(QKᵀ·scale)V in candle ops ([`attention_reference`]) is the independent reference both
//! are tested against.
//!
//! Shapes: q [B, Hq, T, D], k and v [B, Hk, T, D], Hq % Hk = 0 (GQA: query head h uses K/V head
//! h / (Hq/Hk), a group's heads consecutive as in `models::llama`). Queries and keys cover the
//! same T positions (training, no KV cache); query i attends to keys j ≤ i.

use super::choice::EnvChoice;
use super::{as_f32, store};

mod cpu;
mod decode;
pub mod phases;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, D};
#[cfg(feature = "cuda")]
pub(crate) use decode::splits::{decode_graph_splits, decode_splits, decode_want};
pub use decode::{decode_attention, decode_kernel_supports};
use std::sync::Mutex;

/// Checked (B, Hq, Hk, T, D) of q [B, Hq, T, D], k and v [B, Hk, T, D].
pub(crate) fn attention_dims(q: &Shape, k: &Shape, v: &Shape) -> Result<(usize, usize, usize, usize, usize)> {
    let (b, hq, t, d) = q.dims4()?;
    let (bk, hk, tk, dk) = k.dims4()?;
    if (bk, tk, dk) != (b, t, d) || v.dims() != k.dims() || hk == 0 || hq % hk != 0 {
        bail!("causal-attention: q {q:?} and k {k:?} / v {v:?} need [B, Hq, T, D] and [B, Hk, T, D] with Hq % Hk = 0");
    }
    Ok((b, hq, hk, t, d))
}

/// Attention as one op: causal (forward on the CPU and CUDA, backward), or without the mask
/// (`causal` false: [`full_attention`]'s CUDA forward only).
struct FlashAttention {
    scale: f32,
    causal: bool,
    /// The bf16 CUDA forward kernel; `None`: [`FlashForward::from_env`].
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    forward: Option<FlashForward>,
    /// [B, Hq, T] f32 log-sum-exp of the scaled scores, made by the forward for the backward.
    lse: Mutex<Option<Tensor>>,
}

impl FlashAttention {
    fn new(scale: f64, causal: bool) -> Self {
        FlashAttention { scale: scale as f32, causal, forward: None, lse: Mutex::new(None) }
    }
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        if self.causal {
            "causal-attention"
        } else {
            "full-attention"
        }
    }

    /// Per (b, h, i): s_j = scale·q_i·k_j (j ≤ i, f32 sums), o_i = Σ softmax(s)_j v_j in f32,
    /// rounded to the dtype once; lse_i = max + ln Σ exp(s − max).
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if !self.causal {
            bail!("full-attention: the kernel op runs on CUDA only (the CPU takes the materialised path)");
        }
        let dims = attention_dims(l1.shape(), l2.shape(), l3.shape())?;
        let (q, k, v) =
            (as_f32(s1, l1, self.name())?, as_f32(s2, l2, self.name())?, as_f32(s3, l3, self.name())?);
        let (o, lse) = cpu::forward(&q, &k, &v, dims, self.scale)?;
        let (b, hq, _, t, _) = dims;
        let lse = Tensor::from_vec(lse, (b, hq, t), &Device::Cpu)?;
        *self.lse.lock().expect("attention state") = Some(lse);
        let o = store(o, s1.dtype(), "causal-attention")?;
        Ok((o, l1.shape().clone()))
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
        let variant = self.forward.map_or_else(FlashForward::from_env, Ok)?;
        let (o, lse) =
            super::cuda::attention_fwd(s1, l1, s2, l2, s3, l3, self.scale, self.causal, variant, None)?;
        *self.lse.lock().expect("attention state") = Some(lse);
        Ok((o, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if !self.causal {
            bail!("full-attention: no backward (full_attention differentiates the materialised path)");
        }
        let lse = self.lse.lock().expect("attention state").clone();
        let Some(lse) = lse else { bail!("causal-attention: backward before forward") };
        let (dq, dk, dv) = causal_attention_backward(q, k, v, o, &lse, g, self.scale as f64)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// Unmasked attention softmax(q kᵀ·scale) v (every query sees every key: the CLIP vision
/// tower). q [B, Hq, T, D], k and v [B, Hk, T, D].
/// On CUDA in bf16 with a head dim flash_attn.cu has, the FlashAttention-style kernel (no T×T
/// matrix; P rounded to bf16 before P·V; forward only, so taken only when no input needs a
/// gradient); elsewhere the materialised scores in q's dtype, the softmax in f32 (as
/// transformers' CLIP runs it), then P·V in q's dtype, differentiable.
pub fn full_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    full_attention_kernel(None, q, k, v, scale)
}

/// [`full_attention`] with the bf16 CUDA forward kernel chosen by the caller (parity tests).
pub fn full_attention_with(
    variant: FlashForward,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    full_attention_kernel(Some(variant), q, k, v, scale)
}

fn full_attention_kernel(
    forward: Option<FlashForward>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (_, hq, hk, _, d) = attention_dims(q.shape(), k.shape(), v.shape())?;
    // The kernel has no backward: inputs that need a gradient take the differentiable path.
    let tracked = q.track_op() || k.track_op() || v.track_op();
    #[cfg(feature = "cuda")]
    if !tracked
        && q.device().is_cuda()
        && q.dtype() == DType::BF16
        && super::cuda::ATTENTION_HEAD_DIMS.contains(&d)
    {
        return q.contiguous()?.apply_op3_no_bwd(
            &k.contiguous()?,
            &v.contiguous()?,
            &FlashAttention { forward, ..FlashAttention::new(scale, false) },
        );
    }
    let _ = (d, tracked, forward);
    let (k, v) = (repeat_kv(k, hq / hk)?, repeat_kv(v, hq / hk)?);
    let scores = (q.matmul(&k.t()?)? * scale)?; // [B, H, T, T]
    let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(scores.dtype())?;
    probs.matmul(&v.contiguous()?)
}

/// Whether [`causal_attention`] runs a kernel for q [B, Hq, T, `head_dim`] here: the CPU (f32,
/// bf16 or f16, any head dim), or a CUDA device with f32 or bf16 and a head dim flash_attn.cu is
/// instantiated for. The models take their fused path only then.
pub fn has_kernel(q: &Tensor) -> bool {
    q.dim(D::Minus1).is_ok_and(|d| kernel_supports(q.device(), q.dtype(), d))
}

/// [`has_kernel`] from the device, dtype and head dim alone.
pub fn kernel_supports(dev: &Device, dtype: DType, head_dim: usize) -> bool {
    #[cfg(feature = "cuda")]
    if dev.is_cuda() {
        return matches!(dtype, DType::F32 | DType::BF16)
            && super::cuda::ATTENTION_HEAD_DIMS.contains(&head_dim);
    }
    let _ = head_dim;
    dev.is_cpu() && matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
}

/// Causal attention softmax(q kᵀ·scale + causal mask) v, as one op: FlashAttention-style kernels
/// on CUDA (f32 or bf16, D ∈ {32, 64, 96, 128}), the blocked f32 kernel of `cpu` on the CPU.
/// Differentiable in q, k and v. Shapes in the module docs.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    attention_dims(q.shape(), k.shape(), v.shape())?;
    let op = FlashAttention::new(scale, true);
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// The forward alone, outside autograd: (o [B, Hq, T, D], lse [B, Hq, T] f32, the log-sum-exp of
/// the scaled scores), for callers that run [`causal_attention_backward`] themselves
/// (recomputation schemes, benchmarks of the kernels without candle's autograd around them).
pub fn causal_attention_forward(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<(Tensor, Tensor)> {
    forward_only(None, q, k, v, scale)
}

/// [`causal_attention_forward`] with the bf16 CUDA forward kernel chosen by the caller (parity
/// tests and benchmarks compare them in one process); `variant` has no effect elsewhere.
pub fn causal_attention_forward_with(
    variant: FlashForward,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    forward_only(Some(variant), q, k, v, scale)
}

fn forward_only(
    forward: Option<FlashForward>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    attention_dims(q.shape(), k.shape(), v.shape())?;
    let op = FlashAttention { forward, ..FlashAttention::new(scale, true) };
    let o = q.contiguous()?.apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)?;
    let lse = op.lse.lock().expect("attention state").take();
    match lse {
        Some(lse) => Ok((o, lse)),
        None => bail!("causal-attention: the forward left no log-sum-exp"),
    }
}

/// Why a wgmma variant cannot run in a build without the sm_90a kernels.
const WGMMA_BUILD: &str = "needs a --features cuda build for compute capability 9.0 (CUDA_COMPUTE_CAP=90)";

/// The order the flash attention kernels take their blocks in (kernels/src/common.cuh's
/// `heaviest_first`). Chosen by `SHARDSMITH_ATTN_ORDER` (`heaviest`, the default: each head's
/// tile i before any head's tile i + 1, so the heaviest tiles of every head start first; or
/// `head`: all of one head's tiles, heaviest first, before the next head's, which keeps a head's
/// K/V in L2 but can end a pass on a tail of heavy tiles) until a GPU measures both. The same
/// results either way; set once per device, when the kernels are loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionGridOrder {
    HeaviestFirst,
    HeadMajor,
}

impl EnvChoice for AttentionGridOrder {
    const VAR: &'static str = "SHARDSMITH_ATTN_ORDER";
    const CHOICES: &'static [(&'static str, AttentionGridOrder)] =
        &[("heaviest", AttentionGridOrder::HeaviestFirst), ("head", AttentionGridOrder::HeadMajor)];
    const NOUN: &'static str = "attention grid order";
    fn cell() -> &'static std::sync::OnceLock<std::result::Result<Self, String>> {
        static CELL: std::sync::OnceLock<std::result::Result<AttentionGridOrder, String>> =
            std::sync::OnceLock::new();
        &CELL
    }
}

impl AttentionGridOrder {
    /// `SHARDSMITH_ATTN_ORDER`, read once: `heaviest` (or unset) or `head`; any other value is
    /// an error naming the variable.
    pub fn from_env() -> Result<AttentionGridOrder> {
        Self::from_var()
    }

    /// The order's `SHARDSMITH_ATTN_ORDER` spelling.
    pub fn name(self) -> &'static str {
        self.spelling()
    }
}

/// Which kernel runs the bf16 causal (and CLIP's unmasked) attention forward on CUDA. Chosen by
/// `SHARDSMITH_FLASH_FWD` (`mma`, `wgmma`, `wgmma128` or `tma`; [`FlashForward::from_env`]); the
/// default is `tma` in a build that has the wgmma kernels, else `mma`. All give the same o and
/// lse up to summation order (`tma` and `wgmma128` the same bits on an H200).
/// Measured on an H200 (B2 H32 S4096 D128 causal, forward TFLOP/s; BENCHMARKS.md, issue 7, part
/// 14): tma 489, mma 306, wgmma128 232, wgmma 198 (and the cp.async-fed warp-specialised kernel
/// that tma replaced 245); cuDNN 524.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlashForward {
    /// FlashAttention-2 style on mma.sync (`flash_fwd_bf16`; any head dim, any alignment, any
    /// GPU; the measured kernel).
    MmaSync,
    /// Hopper's warpgroup MMA (`kernels/src/flash_wg.cu`): taken for head dims 64 and 128 with
    /// 16-byte aligned inputs in a build for compute capability 9.0 ([`wgmma_available`]); other
    /// calls keep the mma.sync kernel. The first launch on a GPU runs
    /// [`super::wgmma_check`]'s self-check there; a failure is an error with its report.
    Wgmma,
    /// [`FlashForward::Wgmma`] over 128-key tiles at head dim 128 (twice the work between the
    /// block's barriers and O rescales, 254 registers instead of 200, 160 KB of shared memory
    /// instead of 96); head dim 64 runs `Wgmma`'s 64-key kernel.
    Wgmma128,
    /// [`FlashForward::Wgmma128`]'s products warp-specialised and fed by TMA at head dim 128
    /// (`flash_fwd_tma`, FlashAttention-3's structure: a producer warpgroup's one thread loads
    /// each tile as two tensor-map boxes into 128-byte swizzled tiles, two consumer warpgroups
    /// synchronise with it by mbarriers and take turns on the tensor cores), where the inputs are
    /// 16-byte aligned (TMA's rule for a tensor map's base); elsewhere the mma.sync kernel (the
    /// default everywhere, so head dims the TMA kernel lacks keep the kernel they had).
    Tma,
}

impl EnvChoice for FlashForward {
    const VAR: &'static str = "SHARDSMITH_FLASH_FWD";
    const CHOICES: &'static [(&'static str, FlashForward)] = &[
        ("mma", FlashForward::MmaSync),
        ("wgmma", FlashForward::Wgmma),
        ("wgmma128", FlashForward::Wgmma128),
        ("tma", FlashForward::Tma),
    ];
    const NOUN: &'static str = "attention kernel";
    fn unavailable(self) -> Option<String> {
        (self.is_wgmma() && !wgmma_available()).then(|| WGMMA_BUILD.to_string())
    }
    fn default_choice() -> Self {
        if wgmma_available() {
            FlashForward::Tma
        } else {
            FlashForward::MmaSync
        }
    }
    fn cell() -> &'static std::sync::OnceLock<std::result::Result<Self, String>> {
        static CELL: std::sync::OnceLock<std::result::Result<FlashForward, String>> =
            std::sync::OnceLock::new();
        &CELL
    }
}

impl FlashForward {
    pub const ALL: [FlashForward; 4] =
        [FlashForward::MmaSync, FlashForward::Wgmma, FlashForward::Wgmma128, FlashForward::Tma];

    /// Whether this is one of the wgmma kernels (sm_90a builds only).
    pub fn is_wgmma(self) -> bool {
        self != FlashForward::MmaSync
    }

    /// Whether this variant runs the warp-specialised TMA kernel at head dim `d`.
    pub fn tma(self, d: usize) -> bool {
        self == FlashForward::Tma && d == 128
    }

    /// Keys per tile of the wgmma kernel this variant runs at head dim `d` (None: mma.sync; the
    /// wgmma kernels also need a build for compute capability 9.0 and aligned inputs).
    pub fn wgmma_keys(self, d: usize) -> Option<usize> {
        match self {
            FlashForward::MmaSync => None,
            FlashForward::Wgmma128 | FlashForward::Tma if d == 128 => Some(128),
            FlashForward::Tma => None,
            _ => Some(64),
        }
    }

    /// `SHARDSMITH_FLASH_FWD`, read once: `mma`, `wgmma`, `wgmma128` or `tma` (unset: tma in a
    /// build that has it, else mma); any other
    /// value, or a wgmma one in a build without it, is an error naming the variable.
    pub fn from_env() -> Result<FlashForward> {
        Self::from_var()
    }

    /// The variant spelled `name` as in `SHARDSMITH_FLASH_FWD`.
    pub fn named(name: &str) -> Result<FlashForward> {
        Self::by_name(name)
    }

    /// The variant's `SHARDSMITH_FLASH_FWD` spelling.
    pub fn name(self) -> &'static str {
        self.spelling()
    }
}

/// Whether this build has the wgmma attention forward (`--features cuda`, compiled for sm_90a).
pub fn wgmma_available() -> bool {
    #[cfg(feature = "cuda")]
    return shardsmith_kernels::WGMMA;
    #[cfg(not(feature = "cuda"))]
    false
}

/// Which kernels run the bf16 causal-attention backward on CUDA. Split, Wide and Fused compute the
/// same dK and dV (bit-identical), Wgmma the same up to summation order; dQ differs in summation
/// order only (Tma: Wgmma's dK and dV bit for bit). Chosen by `SHARDSMITH_FLASH_BWD` (`split`,
/// `wide`, `fused`, `wgmma` or `tma`;
/// [`FlashBackward::from_env`]); the default is Tma in a build that has the wgmma kernels (at
/// head dim 128; Split elsewhere), else Split.
/// Measured on an H200 (B2 H32 S4096 D128 causal, run 7 of BENCHMARKS.md's issue 7, part 14;
/// the backward's TFLOP/s from fwd+bwd less fwd): tma 382, wgmma 273, fused 219, wide 207,
/// split 200 (and the cp.async-fed warp-specialised kernel that tma replaced 318); fwd+bwd with
/// the tma forward 388 (cuDNN 480).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlashBackward {
    /// dQ per 128-query block and dK/dV per 128-key block in 32-query steps, no atomics
    /// (`flash_bwd_dq` + `flash_bwd_dkdv`; bit-reproducible; the default without wgmma).
    Split,
    /// The same dQ kernel; dK/dV in 64-query steps with Pᵀ and dSᵀ staged in shared memory
    /// (`flash_bwd_dkdv64`: fewer shared-memory reads per MMA).
    Wide,
    /// One kernel: the 64-query dK/dV kernel also adds dS·K into an f32 dQ with atomics
    /// (`flash_bwd_dkdvdq`: no second pass over S and dP), then dQ is rounded to bf16. The
    /// atomics' order varies between runs, so dQ is not bit-reproducible (dK, dV are).
    Fused,
    /// Fused's algorithm on Hopper's warpgroup MMA (`flash_bwd_wg`, kernels/src/flash_wg.cu):
    /// taken for head dim 128 with 16-byte aligned inputs in a build for compute capability 9.0
    /// ([`wgmma_available`]); other calls run Split. dQ is then not bit-reproducible (f32
    /// atomics), so neither is bf16 CUDA training: `SHARDSMITH_FLASH_BWD=split` makes it so.
    /// Self-checked as [`FlashForward::Wgmma`] is.
    Wgmma,
    /// Wgmma's products warp-specialised and fed by TMA (`flash_bwd_tma`: a producer warpgroup
    /// loads K, V and each step's Q and dO by TMA into 128-byte swizzled tiles and lse, Δ by
    /// cp.async; the two consumer warpgroups synchronise with it by mbarriers and with each other
    /// by named barriers; dQ staged in shared memory and added by one bulk reduce a step instead
    /// of each thread's atomics), where Wgmma's kernel runs; Split elsewhere. Wgmma's dK and dV
    /// bit for bit.
    Tma,
}

impl EnvChoice for FlashBackward {
    const VAR: &'static str = "SHARDSMITH_FLASH_BWD";
    const CHOICES: &'static [(&'static str, FlashBackward)] = &[
        ("split", FlashBackward::Split),
        ("wide", FlashBackward::Wide),
        ("fused", FlashBackward::Fused),
        ("wgmma", FlashBackward::Wgmma),
        ("tma", FlashBackward::Tma),
    ];
    const NOUN: &'static str = "attention kernel";
    fn unavailable(self) -> Option<String> {
        (self.is_wgmma() && !wgmma_available()).then(|| WGMMA_BUILD.to_string())
    }
    fn default_choice() -> Self {
        if wgmma_available() {
            FlashBackward::Tma
        } else {
            FlashBackward::Split
        }
    }
    fn cell() -> &'static std::sync::OnceLock<std::result::Result<Self, String>> {
        static CELL: std::sync::OnceLock<std::result::Result<FlashBackward, String>> =
            std::sync::OnceLock::new();
        &CELL
    }
}

impl FlashBackward {
    pub const ALL: [FlashBackward; 5] = [
        FlashBackward::Split,
        FlashBackward::Wide,
        FlashBackward::Fused,
        FlashBackward::Wgmma,
        FlashBackward::Tma,
    ];

    /// Whether this is one of the wgmma kernels (sm_90a builds only).
    pub fn is_wgmma(self) -> bool {
        matches!(self, FlashBackward::Wgmma | FlashBackward::Tma)
    }

    /// `SHARDSMITH_FLASH_BWD`, read once: `split`, `wide`, `fused`, `wgmma` or `tma` (unset: tma
    /// in a build that has it, else split); any other value, or `wgmma` in a build without it, is an
    /// error naming the variable.
    pub fn from_env() -> Result<FlashBackward> {
        Self::from_var()
    }

    /// The variant spelled `name` as in `SHARDSMITH_FLASH_BWD`.
    pub fn named(name: &str) -> Result<FlashBackward> {
        Self::by_name(name)
    }

    /// The variant's `SHARDSMITH_FLASH_BWD` spelling.
    pub fn name(self) -> &'static str {
        self.spelling()
    }
}

/// (dq, dk, dv) of causal attention from the forward's o and lse and the output gradient `g`:
/// the FlashAttention backward kernels on CUDA (bf16: those of [`FlashBackward::from_env`]), the
/// blocked f32 one of `cpu` on the CPU (both recompute the probabilities from q, k and lse).
#[allow(clippy::too_many_arguments)]
pub fn causal_attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    g: &Tensor,
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let variant = if q.device().is_cuda() { FlashBackward::from_env()? } else { FlashBackward::Split };
    causal_attention_backward_with(variant, q, k, v, o, lse, g, scale)
}

/// [`causal_attention_backward`] with the bf16 CUDA kernels chosen by the caller (parity tests
/// and benchmarks compare them in one process); `variant` has no effect elsewhere.
#[allow(clippy::too_many_arguments)]
pub fn causal_attention_backward_with(
    variant: FlashBackward,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    g: &Tensor,
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        return super::cuda::attention_bwd(q, k, v, o, lse, g, scale as f32, variant, None);
    }
    let _ = variant;
    let dims = attention_dims(q.shape(), k.shape(), v.shape())?;
    let f32s = |x: &Tensor| x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
    let (dq, dk, dv) = cpu::backward(
        &f32s(q)?,
        &f32s(k)?,
        &f32s(v)?,
        &f32s(o)?,
        &f32s(lse)?,
        &f32s(g)?,
        dims,
        scale as f32,
    )?;
    let back =
        |x: Vec<f32>, like: &Tensor| Tensor::from_vec(x, like.shape(), like.device())?.to_dtype(like.dtype());
    Ok((back(dq, q)?, back(dk, k)?, back(dv, v)?))
}

/// k or v [B, Hk, T, D] repeated to [B, Hk·group, T, D] (each K/V head `group` times in a row).
fn repeat_kv(x: &Tensor, group: usize) -> Result<Tensor> {
    if group == 1 {
        return Ok(x.clone());
    }
    let (b, hk, t, d) = x.dims4()?;
    x.unsqueeze(2)?.broadcast_as((b, hk, group, t, d))?.reshape((b, hk * group, t, d))
}

/// [T, T] additive causal mask (0 on and below the diagonal, −∞ above).
fn causal_mask(t: usize, dev: &Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..t * t).map(|i| if i % t > i / t { f32::NEG_INFINITY } else { 0.0 }).collect();
    Tensor::from_vec(m, (t, t), dev)
}

/// The materialised attention in f32 candle ops (differentiable through candle's autograd),
/// returned in q's dtype: the independent reference for tests.
pub fn attention_reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (_, hq, hk, t, _) = attention_dims(q.shape(), k.shape(), v.shape())?;
    let (qf, kf, vf) = (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?);
    let (ke, ve) = (repeat_kv(&kf, hq / hk)?, repeat_kv(&vf, hq / hk)?);
    let s = (qf.matmul(&ke.t()?.contiguous()?)? * scale)?.broadcast_add(&causal_mask(t, q.device())?)?;
    let p = candle_nn::ops::softmax(&s, D::Minus1)?; // composed, so autograd goes through it
    p.matmul(&ve.contiguous()?)?.to_dtype(q.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{max_diff, randn};
    use candle_core::Var;

    #[test]
    fn kernel_choices_parse_and_name_the_variable_on_error() {
        let bwd = FlashBackward::parse;
        let default = if wgmma_available() { FlashBackward::Tma } else { FlashBackward::Split };
        assert_eq!(bwd(None), Ok(default));
        assert_eq!(bwd(Some("")), Ok(default));
        for v in FlashBackward::ALL {
            assert_eq!(bwd(Some(v.name())), Ok(v));
            assert_eq!(FlashBackward::named(v.name()).unwrap(), v);
        }
        let err = bwd(Some("atomic")).unwrap_err();
        assert!(
            err.contains("SHARDSMITH_FLASH_BWD") && err.contains("atomic") && err.contains("fused"),
            "{err}"
        );
        let fwd = FlashForward::parse;
        let default = if wgmma_available() { FlashForward::Tma } else { FlashForward::MmaSync };
        assert_eq!(fwd(None), Ok(default));
        assert_eq!(FlashBackward::named("tma").unwrap(), FlashBackward::Tma);
        assert!(FlashBackward::Tma.is_wgmma() && FlashBackward::named("ws").is_err());
        for v in FlashForward::ALL {
            assert_eq!(fwd(Some(v.name())), Ok(v));
        }
        assert!(fwd(Some("fa3")).unwrap_err().contains("SHARDSMITH_FLASH_FWD"));
        let err = FlashForward::named("fa3").unwrap_err().to_string();
        assert!(err.contains("\"fa3\"") && err.contains("mma, wgmma, wgmma128, tma"), "{err}");
        assert_eq!(FlashForward::Wgmma128.wgmma_keys(128), Some(128));
        assert_eq!(FlashForward::Wgmma128.wgmma_keys(64), Some(64));
        assert_eq!(FlashForward::Wgmma.wgmma_keys(128), Some(64));
        assert_eq!(FlashForward::MmaSync.wgmma_keys(128), None);
        assert_eq!(FlashForward::named("tma").unwrap(), FlashForward::Tma);
        assert_eq!(FlashForward::Tma.wgmma_keys(128), Some(128));
        assert_eq!(FlashForward::Tma.wgmma_keys(64), None, "the TMA kernel is D 128; D 64 keeps mma");
        assert!(FlashForward::Tma.tma(128) && !FlashForward::Tma.tma(64) && !FlashForward::Wgmma128.tma(128));
        assert!(FlashForward::named("ws").is_err());
        let order = AttentionGridOrder::parse;
        assert_eq!(order(None), Ok(AttentionGridOrder::HeaviestFirst));
        assert_eq!(order(Some("head")), Ok(AttentionGridOrder::HeadMajor));
        assert_eq!(AttentionGridOrder::HeadMajor.name(), "head");
        let err = order(Some("tile")).unwrap_err();
        assert!(err.contains("SHARDSMITH_ATTN_ORDER") && err.contains("heaviest, head"), "{err}");
    }

    /// The CPU op against candle autograd through the materialised reference, with GQA, a T
    /// that is no multiple of anything and one that spans several query blocks.
    #[test]
    fn cpu_op_matches_autograd_through_the_reference() {
        for (hq, hk, t, d) in [(4, 2, 13, 8), (3, 3, 13, 8), (2, 1, 150, 16)] {
            let q = Var::from_tensor(&randn(&[2, hq, t, d], 1)).unwrap();
            let k = Var::from_tensor(&randn(&[2, hk, t, d], 2)).unwrap();
            let v = Var::from_tensor(&randn(&[2, hk, t, d], 3)).unwrap();
            let probe = randn(&[2, hq, t, d], 4);
            let scale = 1.0 / (d as f64).sqrt();
            let run = |ours: bool| {
                let f = if ours { causal_attention } else { attention_reference };
                let o = f(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale).unwrap();
                let grads = (&o * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                let g = |x: &Var| grads.get(x).unwrap().clone();
                (o, g(&q), g(&k), g(&v))
            };
            let (o1, dq1, dk1, dv1) = run(true);
            let (o2, dq2, dk2, dv2) = run(false);
            let what = format!("Hq {hq} Hk {hk} T {t} D {d}");
            assert!(max_diff(&o1, &o2) < 1e-6, "o {what}: {}", max_diff(&o1, &o2));
            assert!(max_diff(&dq1, &dq2) < 1e-5, "dq {what}: {}", max_diff(&dq1, &dq2));
            assert!(max_diff(&dk1, &dk2) < 1e-5, "dk {what}: {}", max_diff(&dk1, &dk2));
            assert!(max_diff(&dv1, &dv2) < 1e-5, "dv {what}: {}", max_diff(&dv1, &dv2));
        }
    }

    /// bf16 operands: computed in f32 and rounded once, so within a bf16 rounding of the f32
    /// reference on the same (bf16-representable) values.
    #[test]
    fn bf16_is_the_f32_result_rounded() {
        let (q, k, v) = (randn(&[1, 4, 70, 32], 5), randn(&[1, 2, 70, 32], 6), randn(&[1, 2, 70, 32], 7));
        let bf = |x: &Tensor| x.to_dtype(DType::BF16).unwrap();
        let (qb, kb, vb) = (bf(&q), bf(&k), bf(&v));
        let ours = causal_attention(&qb, &kb, &vb, 0.125).unwrap();
        assert_eq!(ours.dtype(), DType::BF16);
        let f = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
        let want = attention_reference(&f(&qb), &f(&kb), &f(&vb), 0.125).unwrap();
        // |o| ≤ 1: half a bf16 ulp is ≤ 2⁻⁹.
        assert!(max_diff(&ours, &want) <= 1.0 / 512.0 + 1e-6, "{}", max_diff(&ours, &want));
    }

    /// Any scale, a negative one included (the softmax shift must be the largest scaled score).
    #[test]
    fn negative_scale_matches_the_reference() {
        let (q, k, v) = (randn(&[1, 2, 20, 8], 1), randn(&[1, 2, 20, 8], 2), randn(&[1, 2, 20, 8], 3));
        // |scale · q·k| reaches thousands: exp overflows unless shifted by the true row maximum
        // (a wrong shift gives inf/NaN or O(1) errors). Scores that large carry f32 rounding of
        // ~10³·2⁻²⁴ ≈ 10⁻⁴ each, which the exponential turns into relative errors of the weights
        // of that size, summed in a different order on each path (the AVX2 and AVX-512 builds of
        // the kernel differ here): 1e-4 is what f32 can promise, not 1e-5.
        for scale in [-1000.0, 1000.0] {
            let ours = causal_attention(&q, &k, &v, scale).unwrap();
            let finite = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|x| x.is_finite());
            let d = max_diff(&ours, &attention_reference(&q, &k, &v, scale).unwrap());
            assert!(finite && d < 1e-4, "scale {scale}: finite {finite}, max |Δ| {d}");
        }
    }

    #[test]
    fn shape_errors_name_the_op() {
        let q = randn(&[1, 3, 4, 8], 1);
        let k = randn(&[1, 2, 4, 8], 2);
        let e = causal_attention(&q, &k, &k, 1.0).unwrap_err().to_string();
        assert!(e.contains("causal-attention") && e.contains("Hq % Hk"), "{e}");
    }
}
