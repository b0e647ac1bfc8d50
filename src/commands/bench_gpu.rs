//! GPU benchmarks at real sizes over random weights made on the device (no checkpoint): one JSON
//! line each, in the shape `bench/pytorch_gpu.py` prints for the same shapes, so `bench/gpu.sh`
//! can put ours and PyTorch's in one table.
//!
//! - `bench gpu-layer`: LLaMA decoder layers forward + backward (weights and input trainable).
//! - `bench attention`: causal attention forward, and forward + backward (the kernels alone; on
//!   CUDA in bf16 one line per kernel variant pair, `FlashForward` × `FlashBackward`).
//! - `bench decode`: prefill then greedy decode of a synthetic LLaMA with the KV cache.
//! - `bench neva-step`: one NeVA stage-1 training step (forward, backward, clip, AdamW).
//!
//! Every shape is a flag (7B defaults), so each runs on the CPU at toy sizes too (tests).
//! FLOPs are counted the same way on both sides: a linear layer 2·tokens·in·out forward, causal
//! attention 4·B·H·S²·D/2 forward; forward + backward is 3× forward for the layers and 3.5×
//! forward for attention alone (the FlashAttention convention, backward = 2.5× forward).

use crate::models::clip::{ClipActivation, ClipVisionConfig};
use crate::models::llama::{Llama, RankLayout};
use crate::models::neva::ImageTokens;
use crate::models::projector::ProjectorKind;
use crate::models::tp::ParallelLlama;
use crate::models::Model;
use crate::ops::attention::{
    causal_attention_backward_with, causal_attention_forward_with, wgmma_available, FlashBackward,
    FlashForward,
};
use crate::ops::linear::{matmul_with, GemmBackend};
use crate::parallel::Solo;
use crate::train::model::{Batch, TrainModel, IGNORE};
use crate::train::optim::{AdamW, AdamWConfig};
use crate::weights::RandomBackend;
use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;

/// A LLaMA's shape (the benchmarks default to LLaMA-2-7B's): the one `synth` makes checkpoints of.
pub use super::synth::LlamaShape;

/// Forward FLOPs of the linear layers of one decoder layer of `s`, per token.
fn layer_linear_flops_per_token(s: &LlamaShape) -> f64 {
    let (h, d) = (s.hidden as f64, (s.hidden / s.heads) as f64);
    let qkvo = h * (2 * s.heads + 2 * s.kv_heads) as f64 * d;
    2.0 * (qkvo + 3.0 * h * s.ffn as f64)
}

/// Heads divide the hidden size and kv heads divide the heads.
fn check_shape(s: &LlamaShape) -> Result<()> {
    ensure!(
        s.heads > 0
            && s.hidden.is_multiple_of(s.heads)
            && s.kv_heads > 0
            && s.heads.is_multiple_of(s.kv_heads),
        "shape: hidden {} must divide by heads {}, and heads by kv heads {}",
        s.hidden,
        s.heads,
        s.kv_heads
    );
    Ok(())
}

/// What every GPU benchmark takes.
#[derive(Clone, Debug)]
pub struct Common {
    /// Where to run.
    pub device: Device,
    /// Compute dtype.
    pub dtype: DType,
    /// Timed repetitions after `warmup` untimed ones; the median is reported.
    pub runs: usize,
    /// Untimed repetitions first.
    pub warmup: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median seconds of `f` over `c.runs` runs after `c.warmup`, the device drained around each.
fn time(c: &Common, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..c.warmup {
        f()?;
    }
    c.device.synchronize()?;
    let mut times = Vec::with_capacity(c.runs);
    for _ in 0..c.runs.max(1) {
        let t0 = Instant::now();
        f()?;
        c.device.synchronize()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

/// Whether freed CUDA memory stays in the driver's pool (`ops::keep_pool_memory`, the default;
/// `SHARDSMITH_CUDA_POOL_KEEP=0` turns it off for comparisons).
fn cuda_pool_keep() -> bool {
    std::env::var("SHARDSMITH_CUDA_POOL_KEEP").map_or(true, |v| v != "0")
}

/// Whether a CUDA graph decode step of `rows` sequences at hidden size `h` folds its RMSNorms
/// into the GEMVs (`ops::decode_graph::folds`: by default, at 1–2 rows of at most 4096).
fn norms_folded(rows: usize, h: usize) -> bool {
    #[cfg(feature = "cuda")]
    return crate::ops::decode_graph::folds(rows, h);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (rows, h);
        false
    }
}

/// Decode steps replayed from a CUDA graph so far on this thread (`ops::decode_graph`).
fn graph_replays() -> usize {
    #[cfg(feature = "cuda")]
    return crate::ops::decode_graph::replays();
    #[cfg(not(feature = "cuda"))]
    0
}

/// The bf16 attention kernels the models run (`SHARDSMITH_FLASH_FWD`, `SHARDSMITH_FLASH_BWD`).
fn flash_names() -> Result<(&'static str, &'static str)> {
    Ok((FlashForward::from_env()?.name(), FlashBackward::from_env()?.name()))
}

fn device_name(d: &Device) -> &'static str {
    if d.is_cuda() {
        "cuda"
    } else {
        "cpu"
    }
}

fn dtype_name(d: DType) -> String {
    format!("{d:?}").to_lowercase()
}

/// A rank-0, TP-1 LLaMA over random weights on the device (`trainable`: every weight a Var).
pub fn random_llama(s: &LlamaShape, c: &Common, trainable: bool) -> Result<Llama> {
    check_shape(s)?;
    let backend = Arc::new(RandomBackend::new(0.02, trainable));
    let layout = RankLayout { tp: 1, rank: 0, padded_vocab: s.vocab };
    Ok(Llama::load(backend.var_builder(c.dtype, &c.device), &s.hparams(), layout)?)
}

/// What `bench gpu-layer` runs besides the shape.
pub struct GpuLayerOptions {
    /// Decoder layers as one graph node each (the trainer's default) or candle's composed ops.
    pub layer_nodes: bool,
    /// The weights' dtype when it is not the compute dtype (f32 master weights).
    pub masters: Option<DType>,
    /// One more step with its parts timed ([`crate::ops::phases`]), as a second JSON line.
    pub phases: bool,
}

/// `bench gpu-layer`: `s.layers` decoder layers forward + backward on x [B, S, H], the layers
/// as the trainer runs them (one graph node for their chain, `Llama::layers`) or candle's composed ops; the
/// weights are variables of `masters` (f32 master weights, cast to the compute dtype each step,
/// as `train` keeps them) or of the compute dtype.
pub fn gpu_layer(s: &LlamaShape, batch: usize, seq: usize, o: &GpuLayerOptions, c: &Common) -> Result<()> {
    let (layer_nodes, masters) = (o.layer_nodes, o.masters);
    if o.phases && !(layer_nodes && c.device.is_cuda()) {
        anyhow::bail!(
            "--phases times the parts of the one-node layers on a CUDA device: drop --composed, add --device cuda"
        );
    }
    let weights = Common { dtype: masters.unwrap_or(c.dtype), ..c.clone() };
    let mut llama = random_llama(s, &weights, true)?;
    llama.set_use_cache(false);
    llama.set_layer_nodes(layer_nodes);
    let inputs = llama.sequence_inputs(seq, c.dtype, &c.device)?;
    let x =
        Var::from_tensor(&Tensor::randn(0f32, 1.0, (batch, seq, s.hidden), &c.device)?.to_dtype(c.dtype)?)?;
    let mut step = || -> Result<()> {
        // As the trainer runs them (one graph node for the chain of one-node layers).
        let y = llama.layers(x.as_tensor(), &inputs, &Solo)?;
        let mut grads = y.backward()?;
        // One-node layers leave their weights' gradients aside: gather them as a step would.
        llama.take_param_grads(&mut grads)?;
        ensure!(grads.get(x.as_tensor()).is_some(), "no gradient reached the input");
        Ok(())
    };
    let secs = time(c, &mut step)?;
    let tokens = (batch * seq) as f64;
    let d = s.hidden / s.heads;
    let attn_fwd = 4.0 * (batch * s.heads * seq * seq * d) as f64 / 2.0;
    let flops = 3.0 * s.layers as f64 * (tokens * layer_linear_flops_per_token(s) + attn_fwd);
    let line = json!({
        "impl": "shardsmith",
        "bench": "gpu_layer",
        "device": device_name(&c.device),
        "dtype": dtype_name(c.dtype),
        "layers": s.layers,
        "hidden": s.hidden,
        "batch": batch,
        "seq": seq,
        "layer_nodes": layer_nodes,
        "cuda_pool_keep": cuda_pool_keep(),
        "flash_fwd": flash_names()?.0,
        "flash_bwd": flash_names()?.1,
        "masters": dtype_name(weights.dtype),
        "fused_qkv": crate::ops::node_fused_qkv(),
        "layer_chain": crate::ops::layer_chain(),
        "gemm": GemmBackend::from_env()?.name(),
        "gemm_f32": GemmBackend::for_product(true)?.name(),
        "step_ms": secs * 1e3,
        "tflops": flops / secs / 1e12,
    });
    println!("{line}");
    if o.phases {
        // The step once more, each part of the layers a region (DecoderLayer::forward_node's),
        // the whole step timed by events around it too: what no region holds is the rest.
        crate::ops::phases::record(true);
        let timed = crate::ops::phases::span(&c.device, &mut step);
        let regions = crate::ops::phases::take();
        crate::ops::phases::record(false);
        let (step_ms, regions) = (timed?, regions?);
        let in_regions: f64 = regions.iter().map(|p| p.ms).sum();
        let line = json!({
            "impl": "shardsmith",
            "bench": "gpu_layer_phases",
            "device": device_name(&c.device),
            "dtype": dtype_name(c.dtype),
            "layers": s.layers,
            "batch": batch,
            "seq": seq,
            "layer_nodes": layer_nodes,
            "masters": dtype_name(weights.dtype),
            "step_ms": step_ms,
            "timed_step_ms": secs * 1e3,
            "in_regions_ms": in_regions,
            "phases": regions.iter().map(|p| json!({"name": p.name, "calls": p.calls, "ms": p.ms})).collect::<Vec<_>>(),
        });
        println!("{line}");
    }
    Ok(())
}

/// `bench gemm`: the products of a LLaMA layer's training step at `rows` tokens, for each
/// projection (fused q/k/v, o, fused gate/up, down): forward x [rows, in] · Wᵀ, input gradient
/// dy [rows, out] · W, weight gradient dyᵀ · x widened to f32 (as for f32 master weights); and
/// `square` products n × n × n; each through every library of `backends` (empty: all), one JSON
/// line each. On the CPU every library is the CPU's product (one line per product).
pub fn gemm(
    s: &LlamaShape,
    rows: usize,
    square: &[usize],
    backends: &[GemmBackend],
    c: &Common,
) -> Result<()> {
    check_shape(s)?;
    let d = s.hidden / s.heads;
    let projections = [
        ("qkv", s.hidden, (s.heads + 2 * s.kv_heads) * d),
        ("o", s.heads * d, s.hidden),
        ("gate_up", s.hidden, 2 * s.ffn),
        ("down", s.ffn, s.hidden),
    ];
    let backends = match (c.device.is_cuda(), backends.is_empty()) {
        (false, _) => vec![GemmBackend::Candle],
        (true, true) => GemmBackend::ALL.to_vec(),
        (true, false) => backends.to_vec(),
    };
    let randn = |r: usize, k: usize| -> Result<Tensor> {
        Ok(Tensor::randn(0f32, 1.0, (r, k), &c.device)?.to_dtype(c.dtype)?)
    };
    let emit = |name: &str, op: &str, (m, n, k): (usize, usize, usize), b: GemmBackend, secs: f64| {
        let line = json!({
            "impl": "shardsmith",
            "bench": "gemm",
            "device": device_name(&c.device),
            "dtype": dtype_name(c.dtype),
            "gemm": b.name(),
            "name": name,
            "op": op,
            "m": m,
            "n": n,
            "k": k,
            "ms": secs * 1e3,
            "tflops": 2.0 * (m * n * k) as f64 / secs / 1e12,
        });
        println!("{line}");
    };
    for (name, fan_in, fan_out) in projections {
        let (x, w, dy) = (randn(rows, fan_in)?, randn(fan_out, fan_in)?, randn(rows, fan_out)?);
        let wt = w.t()?;
        let dyt = dy.t()?;
        for &b in &backends {
            let fwd = time(c, || Ok(matmul_with(b, &x, &wt, false).map(drop)?))?;
            emit(name, "x·Wᵀ", (rows, fan_out, fan_in), b, fwd);
            let dgrad = time(c, || Ok(matmul_with(b, &dy, &w, false).map(drop)?))?;
            emit(name, "dy·W", (rows, fan_in, fan_out), b, dgrad);
            let wgrad = time(c, || Ok(matmul_with(b, &dyt, &x, true).map(drop)?))?;
            emit(name, "dyᵀ·x (f32)", (fan_out, fan_in, rows), b, wgrad);
        }
    }
    for &n in square {
        let (a, bm) = (randn(n, n)?, randn(n, n)?);
        for &b in &backends {
            let secs = time(c, || Ok(matmul_with(b, &a, &bm, false).map(drop)?))?;
            emit("square", "a·b", (n, n, n), b, secs);
        }
    }
    Ok(())
}

/// The bf16 CUDA attention kernels `bench attention` times; empty: every one the build and head
/// dim have. `phases`: afterwards, profile the wgmma kernels' phases (`--phases`).
#[derive(Clone, Debug, Default)]
pub struct AttentionKernels {
    pub forward: Vec<FlashForward>,
    pub backward: Vec<FlashBackward>,
    pub phases: bool,
}

impl AttentionKernels {
    /// From the `--forward` / `--backward` spellings (`mma,wgmma`, `split,wide,fused,wgmma`).
    pub fn named(forward: &[String], backward: &[String], phases: bool) -> Result<AttentionKernels> {
        Ok(AttentionKernels {
            forward: forward.iter().map(|n| FlashForward::named(n)).collect::<candle_core::Result<_>>()?,
            backward: backward.iter().map(|n| FlashBackward::named(n)).collect::<candle_core::Result<_>>()?,
            phases,
        })
    }
}

/// `bench attention`: causal attention over q [B, H, S, D], k/v [B, Hk, S, D].
#[allow(clippy::too_many_arguments)]
pub fn attention(
    batch: usize,
    heads: usize,
    kv_heads: usize,
    seq: usize,
    head_dim: usize,
    kernels: &AttentionKernels,
    c: &Common,
) -> Result<()> {
    ensure!(kv_heads > 0 && heads.is_multiple_of(kv_heads), "heads must divide by kv heads");
    let randn = |h: usize| -> Result<Tensor> {
        Ok(Tensor::randn(0f32, 1.0, (batch, h, seq, head_dim), &c.device)?.to_dtype(c.dtype)?)
    };
    let (q, k, v, g) = (randn(heads)?, randn(kv_heads)?, randn(kv_heads)?, randn(heads)?);
    let scale = 1.0 / (head_dim as f64).sqrt();
    let flops = 4.0 * (batch * heads * seq * seq * head_dim) as f64 / 2.0;
    // On CUDA in bf16 every kernel variant asked for (one line per forward × backward pair, to
    // compare them on the same card); elsewhere the one path there is.
    let bf16_cuda = c.device.is_cuda() && c.dtype == DType::BF16;
    let wgmma_fwd = wgmma_available() && [64, 128].contains(&head_dim);
    let wgmma_bwd = wgmma_available() && head_dim == 128;
    let (forwards, backwards) = if bf16_cuda {
        let fwd = match kernels.forward.is_empty() {
            // Each wgmma variant where it runs its own kernel (wgmma128 is wgmma below D 128, tma
            // mma).
            true => FlashForward::ALL
                .into_iter()
                .filter(|f| match f {
                    FlashForward::MmaSync => true,
                    FlashForward::Wgmma => wgmma_fwd,
                    FlashForward::Wgmma128 | FlashForward::Tma => wgmma_fwd && head_dim == 128,
                })
                .collect(),
            false => kernels.forward.clone(),
        };
        let bwd = match kernels.backward.is_empty() {
            true => FlashBackward::ALL.into_iter().filter(|b| !b.is_wgmma() || wgmma_bwd).collect(),
            false => kernels.backward.clone(),
        };
        (fwd, bwd)
    } else {
        ensure!(
            kernels.forward.is_empty() && kernels.backward.is_empty(),
            "--forward / --backward choose among the bf16 CUDA kernels (this run: {} {})",
            device_name(&c.device),
            dtype_name(c.dtype)
        );
        (vec![FlashForward::MmaSync], vec![FlashBackward::Split])
    };
    // A wgmma variant asked for where it would silently run another kernel is an error, and so
    // is a profile of kernels this run does not have.
    ensure!(
        !kernels.phases || (bf16_cuda && wgmma_bwd),
        "--phases profiles the wgmma attention kernels: a CUDA build for compute capability 9.0, bf16 and head dim 128 (this run: {} {}, head dim {head_dim}, sm_90a build: {})",
        device_name(&c.device),
        dtype_name(c.dtype),
        wgmma_available()
    );
    ensure!(
        (wgmma_fwd || !forwards.iter().any(|f| f.is_wgmma())) && (wgmma_bwd || !backwards.iter().any(|b| b.is_wgmma())),
        "the wgmma attention kernels need an sm_90a build and head dim 128 (forward: 64 or 128); got head dim {head_dim}, sm_90a build: {}",
        wgmma_available()
    );
    for fwd_variant in forwards {
        let fwd = time(c, || {
            causal_attention_forward_with(fwd_variant, &q, &k, &v, scale)?;
            Ok(())
        })?;
        for bwd_variant in &backwards {
            let fwd_bwd = time(c, || {
                let (o, lse) = causal_attention_forward_with(fwd_variant, &q, &k, &v, scale)?;
                causal_attention_backward_with(*bwd_variant, &q, &k, &v, &o, &lse, &g, scale)?;
                Ok(())
            })?;
            let line = json!({
                "impl": "shardsmith",
                "bench": "attention",
                "device": device_name(&c.device),
                "dtype": dtype_name(c.dtype),
                "batch": batch, "heads": heads, "kv_heads": kv_heads, "seq": seq, "head_dim": head_dim,
                "flash_fwd": fwd_variant.name(),
                "flash_bwd": bwd_variant.name(),
                "attn_order": crate::ops::attention::AttentionGridOrder::from_env()?.name(),
                "fwd_ms": fwd * 1e3,
                "fwd_bwd_ms": fwd_bwd * 1e3,
                "tflops_fwd": flops / fwd / 1e12,
                "tflops_fwd_bwd": 3.5 * flops / fwd_bwd / 1e12,
            });
            println!("{line}");
        }
    }
    if kernels.phases {
        let shape = AttentionShape { batch, heads, kv_heads, seq };
        attention_phases(&shape, (&q, &k, &v, &g), scale, c)?;
    }
    Ok(())
}

/// The sizes of a `bench attention` run (head dim 128 for the profiles).
struct AttentionShape {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    seq: usize,
}

/// `bench attention --phases`: each profiled wgmma kernel (the forward over 64- and 128-key
/// tiles, the backward) timed beside its plain kernel, its phase counts checked against the
/// grid (`ops::attention::phases`), and its cycles by phase printed: one JSON line each
/// (`"bench": "attention_phases"`). `profiled_ms` includes the counters' allocation and their
/// read-back (a few hundred bytes, microseconds against the kernels' milliseconds).
fn attention_phases(
    s: &AttentionShape,
    (q, k, v, g): (&Tensor, &Tensor, &Tensor, &Tensor),
    scale: f64,
    c: &Common,
) -> Result<()> {
    use crate::ops::attention::phases::{self, PhaseProfile};
    let emit = |profile: &PhaseProfile, plain: f64, profiled: f64| {
        let mut line = json!({
            "impl": "shardsmith",
            "bench": "attention_phases",
            "batch": s.batch, "heads": s.heads, "kv_heads": s.kv_heads, "seq": s.seq, "head_dim": 128,
            "attn_order": crate::ops::attention::AttentionGridOrder::from_env()?.name(),
            "plain_ms": plain * 1e3,
            "profiled_ms": profiled * 1e3,
        });
        let p = profile.to_json();
        for key in ["kernel", "total_cycles", "phases"] {
            line[key] = p[key].clone();
        }
        println!("{line}");
        anyhow::Ok(())
    };
    for variant in [FlashForward::Wgmma, FlashForward::Wgmma128, FlashForward::Tma] {
        let plain = time(c, || Ok(causal_attention_forward_with(variant, q, k, v, scale).map(drop)?))?;
        let mut last = None;
        let profiled = time(c, || {
            last = Some(phases::profile_forward(variant, q, k, v, scale)?.2);
            Ok(())
        })?;
        let profile = last.expect("time runs at least once");
        profile.check_runs(&phases::forward_phases_of(variant, s.batch, s.heads, s.seq)?.1)?;
        emit(&profile, plain, profiled)?;
    }
    let (o, lse) = causal_attention_forward_with(FlashForward::MmaSync, q, k, v, scale)?;
    for variant in [FlashBackward::Wgmma, FlashBackward::Tma] {
        let plain =
            time(c, || Ok(causal_attention_backward_with(variant, q, k, v, &o, &lse, g, scale).map(drop)?))?;
        let mut last = None;
        let profiled = time(c, || {
            last = Some(phases::profile_backward(variant, q, k, v, &o, &lse, g, scale)?.1);
            Ok(())
        })?;
        let profile = last.expect("time runs at least once");
        profile.check_runs(&phases::backward_phases_of(variant, s.batch, s.heads, s.kv_heads, s.seq)?.1)?;
        emit(&profile, plain, profiled)?;
    }
    Ok(())
}

/// Seeded ids in [3, vocab) (SplitMix64).
fn seeded_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = crate::rng::SplitMix64::new(seed);
    (0..n).map(|_| 3 + (rng.next_u64() % (vocab as u64 - 3)) as u32).collect()
}

/// `--breakdown` of `bench decode`: where the graph step's time goes after the timed runs
/// (`ops::decode_graph::profile`, `reps` replays of each partial graph), as a JSON line.
#[cfg(feature = "cuda")]
fn decode_breakdown(model: &mut Model, batch: usize, reps: usize) -> Result<serde_json::Value> {
    let llama = model.llm().single_mut()?;
    let position = llama.position();
    let (step_ms, kernels) = llama.decode_profile(batch, reps)?;
    let sum_ms: f64 = kernels.iter().map(|k| k.ms).sum();
    let kernels: Vec<_> =
        kernels.iter().map(|k| json!({"kernel": k.kernel.name(), "calls": k.calls, "ms": k.ms})).collect();
    Ok(json!({
        "impl": "shardsmith",
        "bench": "decode_breakdown",
        "dtype": dtype_name(llama.dtype()),
        "batch": batch,
        "position": position,
        "reps": reps,
        "step_ms": step_ms,
        "sum_ms": sum_ms,
        "kernels": kernels,
    }))
}

#[cfg(not(feature = "cuda"))]
fn decode_breakdown(_: &mut Model, _: usize, _: usize) -> Result<serde_json::Value> {
    anyhow::bail!("--breakdown times the CUDA graph decode step: it needs a build with --features cuda")
}

/// `bench decode`: for each batch size, prefill `prompt` tokens, then `steps` greedy steps
/// exactly as `generate` runs them (KV cache reserved for the whole sequence, the next ids
/// read back to the host each step). One JSON line per batch size; with `breakdown`, a second
/// one with the graph step's time by kind of launch.
pub fn decode(
    s: &LlamaShape,
    batches: &[usize],
    prompt: usize,
    steps: usize,
    breakdown: bool,
    c: &Common,
) -> Result<()> {
    ensure!(prompt >= 1 && steps >= 1, "need --prompt-len >= 1 and --steps >= 1");
    ensure!(
        !breakdown || c.device.is_cuda(),
        "--breakdown times the CUDA graph decode step: add --device cuda"
    );
    let llama = random_llama(s, c, false)?;
    let mut model = Model::Llama(ParallelLlama::from_rank(llama, s.hparams()));
    for &b in batches {
        let ids = Tensor::from_vec(seeded_ids(b * prompt, s.vocab, b as u64), (b, prompt), &c.device)?;
        let mut run = |run_steps: usize| -> Result<(f64, f64)> {
            let llm = model.llm();
            llm.reset();
            // The timed runs' reservation in the warm-up too: a smaller cache would be replaced
            // in the first timed run, and its graph recorded again inside the timed steps.
            llm.reserve(prompt + steps + 1);
            let t0 = Instant::now();
            let mut logits = model.forward(&ids, None, true, false)?.logits; // [B, 1, V]
            let mut next = logits.argmax(D::Minus1)?.to_vec2::<u32>()?; // [B, 1]
            let prefill = t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            for _ in 0..run_steps {
                let step = Tensor::new(next, &c.device)?;
                logits = model.forward(&step, None, true, false)?.logits;
                next = logits.argmax(D::Minus1)?.to_vec2::<u32>()?;
            }
            Ok((prefill, t1.elapsed().as_secs_f64()))
        };
        for _ in 0..c.warmup {
            run(steps.min(8))?;
        }
        let (mut prefill, mut decode) = (Vec::new(), Vec::new());
        let replays_before = graph_replays();
        for _ in 0..c.runs.max(1) {
            let (p, d) = run(steps)?;
            prefill.push(p);
            decode.push(d);
        }
        // Timed steps replayed from a CUDA graph: all of them when the graph applies, 0 where it
        // does not (CPU, SHARDSMITH_CUDA_GRAPH=0, a refused capture).
        let replayed = graph_replays() - replays_before;
        let (prefill, decode) = (median(prefill), median(decode));
        let line = json!({
            "impl": "shardsmith",
            "bench": "decode",
            "device": device_name(&c.device),
            "dtype": dtype_name(c.dtype),
            "layers": s.layers,
            "hidden": s.hidden,
            "batch": b,
            "prompt_len": prompt,
            "steps": steps,
            "cuda_pool_keep": cuda_pool_keep(),
            "cuda_gemv_rows": crate::ops::cuda_gemv_rows()?,
            "cuda_graph": crate::ops::cuda_graph_enabled(),
            "cuda_events": crate::ops::cuda_events_kept(),
            "decode_norm_fold": norms_folded(b, s.hidden),
            "graph_replays": replayed,
            "prefill_ms": prefill * 1e3,
            "ms_per_step": decode / steps as f64 * 1e3,
            "tokens_per_s": (b * steps) as f64 / decode,
        });
        println!("{line}");
        if breakdown && replayed > 0 {
            // The last timed run left the caches at prompt + steps with room for one more.
            println!("{}", decode_breakdown(&mut model, b, 50)?);
        } else if breakdown {
            let why = "no CUDA graph step at this batch (eager decode)";
            println!(
                "{}",
                json!({"impl": "shardsmith", "bench": "decode_breakdown", "batch": b, "skipped": why})
            );
        }
    }
    Ok(())
}

/// A CLIP vision tower's shape (ViT-L/14-336 by default).
#[derive(Clone, Copy, Debug)]
pub struct ClipShape {
    /// Encoder layers.
    pub layers: usize,
    /// Width C.
    pub hidden: usize,
    /// Heads.
    pub heads: usize,
    /// MLP width.
    pub intermediate: usize,
    /// Image side.
    pub image: usize,
    /// Patch side.
    pub patch: usize,
}

impl ClipShape {
    fn config(&self) -> ClipVisionConfig {
        ClipVisionConfig {
            hidden_size: self.hidden,
            intermediate_size: self.intermediate,
            num_hidden_layers: self.layers,
            num_attention_heads: self.heads,
            patch_size: self.patch,
            image_size: self.image,
            num_channels: 3,
            layer_norm_eps: 1e-5,
            hidden_act: ClipActivation::QuickGelu,
        }
    }
}

/// The benchmark batch: per sequence BOS, one image's tokens (`tokens`, N of them), then seeded
/// text ids in [3, 256); labels on the text after the image; seeded pixels in [-1, 1).
pub fn synthetic_batch(
    vcfg: &ClipVisionConfig,
    tokens: ImageTokens,
    drop_cls: bool,
    batch: usize,
    seq: usize,
    dev: &Device,
) -> Result<Batch> {
    let grid = vcfg.image_size / vcfg.patch_size;
    let n = grid * grid + usize::from(!drop_cls);
    let image = tokens.expand(n);
    let text_from = 1 + image.len();
    ensure!(
        seq >= text_from + 2,
        "--seq {seq} is too short: BOS + {} image tokens + at least 2 text tokens",
        image.len()
    );
    let text = seeded_ids(batch * seq, 256, 0x5eed);
    let (mut ids, mut labels) = (Vec::with_capacity(batch * seq), Vec::with_capacity(batch * seq));
    for row in 0..batch {
        let start = ids.len();
        ids.push(1u32);
        ids.extend_from_slice(&image);
        ids.extend_from_slice(&text[row * seq + text_from..(row + 1) * seq]);
        let row = &ids[start..];
        labels
            .extend(row.iter().enumerate().map(|(i, &t)| if i >= text_from { i64::from(t) } else { IGNORE }));
    }
    let side = vcfg.image_size;
    let pixels = (Tensor::rand(0f32, 2.0, (batch, vcfg.num_channels, side, side), dev)? - 1.0)?;
    Ok(Batch {
        ids: Tensor::from_vec(ids, (batch, seq), dev)?,
        labels: Tensor::from_vec(labels, (batch, seq), dev)?,
        pixel_values: Some(pixels),
    })
}

/// What `bench neva-step` runs besides the shapes.
#[derive(Clone, Copy, Debug)]
pub struct NevaStepOptions {
    /// Sequences (one image each).
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Activation checkpointing.
    pub checkpointing: bool,
    /// Decoder layers as one graph node each (the trainer's default) or candle's composed ops.
    pub layer_nodes: bool,
}

/// `bench neva-step`: one stage-1 step (projector trains, LLM and tower frozen in the compute
/// dtype) of LLaMA `s` + CLIP `v` + mlp2x_gelu: forward, backward through the whole LLM to the
/// projector, clip to 1.0, AdamW (torch defaults, wd 0.01). Also times its parts on their own:
/// the vision tower + projector forward, and forward + backward without the optimizer.
pub fn neva_step(s: &LlamaShape, v: &ClipShape, o: &NevaStepOptions, c: &Common) -> Result<()> {
    check_shape(s)?;
    let vcfg = v.config();
    let image_token = (s.vocab - 1) as u32;
    let kind = ProjectorKind::MlpGelu { depth: 2 };
    let mut model = TrainModel::synthetic(&s.hparams(), &vcfg, kind, image_token, false, c.dtype, &c.device)?;
    model.set_layer_nodes(o.layer_nodes);
    let batch_t =
        synthetic_batch(&vcfg, ImageTokens::Repeated { id: image_token }, true, o.batch, o.seq, &c.device)?;
    let cfg = AdamWConfig { betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.01, no_decay_patterns: vec![] };
    let mut opt = AdamW::new(model.params().to_vec(), cfg)?;
    let mut loss = 0.0;
    let secs = time(c, || {
        let out = model.forward_backward(&batch_t, o.checkpointing)?;
        opt.clip_grad_norm(&out.grads, Some(1.0))?;
        opt.step(&out.grads, 1e-5)?;
        loss = out.loss;
        Ok(())
    })?;
    ensure!(loss.is_finite(), "the loss is {loss}");
    let fwd_bwd = time(c, || {
        model.forward_backward(&batch_t, o.checkpointing)?;
        Ok(())
    })?;
    let pixels = batch_t.pixel_values.as_ref().expect("the benchmark batch has images");
    let vision = time(c, || {
        model.image_features(pixels)?;
        Ok(())
    })?;
    let line = json!({
        "impl": "shardsmith",
        "bench": "neva_step",
        "device": device_name(&c.device),
        "dtype": dtype_name(c.dtype),
        "stage": "1",
        "llm_layers": s.layers,
        "vision_layers": v.layers,
        "batch": o.batch,
        "seq": o.seq,
        "checkpointing": o.checkpointing,
        "layer_nodes": o.layer_nodes,
        "cuda_pool_keep": cuda_pool_keep(),
        "flash_fwd": flash_names()?.0,
        "flash_bwd": flash_names()?.1,
        "gemm": GemmBackend::from_env()?.name(),
        "gemm_f32": GemmBackend::for_product(true)?.name(),
        "fused_qkv": crate::ops::node_fused_qkv(),
        "layer_chain": crate::ops::layer_chain(),
        "loss": loss,
        "step_ms": secs * 1e3,
        "fwd_bwd_ms": fwd_bwd * 1e3,
        "vision_projector_ms": vision * 1e3,
        "tokens_per_s": (o.batch * o.seq) as f64 / secs,
    });
    println!("{line}");
    Ok(())
}
