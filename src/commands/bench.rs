//! `shardsmith bench forward`: CPU (or CUDA) forward timing — prefill of a prompt and per-token
//! decode with the KV cache — printed as one JSON line in the same shape as
//! `bench/pytorch_forward.py`, so `bench/forward.sh` can put both in one table; and
//! `shardsmith bench train-step`: one CPU training step (forward + backward, clipping, AdamW) of a
//! LLaVA / NeVA model, in the shape of `bench/pytorch_train_step.py` (`bench/train.sh`).

use crate::models::clip::ClipVisionConfig;
use crate::models::{self, LoadOptions, Model};
use crate::train::model::{Batch, LoraSpec, Stage, TrainModel, IGNORE};
use crate::train::optim::{AdamW, AdamWConfig};
use crate::validate::seeded_prompt;
use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use shardsmith_converters::convert::llava::{self, CanonicalLlava};
use shardsmith_converters::convert::neva;
use shardsmith_converters::ModelConfig;
use std::path::Path;
use std::time::Instant;

/// What to time.
pub struct Options {
    /// Prompt tokens for the prefill.
    pub prompt_len: usize,
    /// Decode steps timed after the prefill.
    pub decode: usize,
    /// Timed repetitions (after one warm-up); medians are reported.
    pub runs: usize,
    /// Compute dtype.
    pub dtype: DType,
    /// Tensor-parallel size (simulated in-process).
    pub tp: Option<usize>,
    /// Feed an image (vision models): the prompt gets one image's tokens.
    pub image: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One prefill + decode; returns (prefill seconds, seconds per decoded token).
fn once(model: &mut Model, ids: &Tensor, pixels: Option<&Tensor>, decode: usize) -> Result<(f64, f64)> {
    model.llm().reset();
    let t0 = Instant::now();
    let mut logits = model.forward(ids, pixels, true, false)?.logits;
    let mut next = logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()?;
    let prefill = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    for _ in 0..decode {
        let step = Tensor::new(&[[next]], ids.device())?;
        logits = model.forward(&step, None, true, false)?.logits;
        next = logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()?;
    }
    Ok((prefill, t1.elapsed().as_secs_f64() / decode.max(1) as f64))
}

/// The longest sequence `bench forward` runs: 32 × LLaMA-2's context.
const MAX_BENCH_POSITIONS: usize = 1 << 17;

/// Time `path` and print the JSON line.
pub fn forward(path: &Path, o: &Options) -> Result<()> {
    ensure!(o.runs >= 1 && o.prompt_len >= 2, "need --runs >= 1 and --prompt-len >= 2");
    // A benchmark sizes its work from the flags: an absurd one is refused, not allocated.
    ensure!(
        o.prompt_len.saturating_add(o.decode) <= MAX_BENCH_POSITIONS,
        "--prompt-len {} + --decode {} is more than {MAX_BENCH_POSITIONS} positions",
        o.prompt_len,
        o.decode
    );
    let device = Device::Cpu;
    let (mut model, info) =
        models::load(path, &LoadOptions { tp: o.tp, dtype: o.dtype, device: device.clone(), vision: None })?;
    let hp = model.llm().hparams().clone();
    let mut ids = seeded_prompt(o.prompt_len, hp.vocab, 7);
    let pixels = match (&model, o.image, info.image_tokens, info.image_size) {
        (Model::Neva(neva), true, Some(n), Some(side)) => {
            ids.splice(1..1 + n.min(ids.len() - 1), neva.image_tokens().expand(n));
            Some(Tensor::zeros((1, 3, side, side), DType::F32, &device)?)
        }
        (_, true, _, _) => anyhow::bail!("{} is not a vision model; drop --image", path.display()),
        _ => None,
    };
    let t = ids.len();
    let ids = Tensor::from_vec(ids, (1, t), &device)?;
    once(&mut model, &ids, pixels.as_ref(), o.decode.min(2))?; // warm-up
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for _ in 0..o.runs {
        let (p, d) = once(&mut model, &ids, pixels.as_ref(), o.decode)?;
        prefill.push(p);
        decode.push(d);
    }
    let params: usize = hp.layers
        * (hp.hidden * (hp.heads + 2 * hp.groups) * hp.head_dim
            + hp.hidden * hp.heads * hp.head_dim
            + 3 * hp.hidden * hp.ffn
            + 2 * hp.hidden)
        + hp.vocab * hp.hidden * if hp.tied { 1 } else { 2 }
        + hp.hidden;
    // No decode steps (`--decode 0`): the decode fields are null rather than a rate over nothing.
    let decode_s = (o.decode > 0).then(|| median(decode));
    let line = json!({
        "impl": "shardsmith",
        "model": path.display().to_string(),
        "family": info.family,
        "params": params,
        "threads": rayon_threads(),
        "dtype": format!("{:?}", o.dtype).to_lowercase(),
        "tp": info.tp,
        "prompt_len": t,
        "prefill_ms": median(prefill) * 1e3,
        "decode_ms_per_token": decode_s.map(|s| s * 1e3),
        "tokens_per_s": decode_s.map(|s| 1.0 / s),
    });
    println!("{line}");
    Ok(())
}

/// Threads candle's CPU kernels use (`RAYON_NUM_THREADS`, else the core count).
fn rayon_threads() -> usize {
    candle_core::utils::get_num_threads()
}

/// What `bench train-step` times.
pub struct TrainStepOptions {
    /// What trains (stage 1, stage 2, LoRA).
    pub stage: Stage,
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence (BOS + image tokens + text).
    pub seq: usize,
    /// Timed steps (after one warm-up); the median is reported.
    pub runs: usize,
    /// Compute dtype (master weights and optimizer state stay f32).
    pub dtype: DType,
    /// Recompute each decoder layer in the backward pass.
    pub checkpointing: bool,
}

/// The LoRA adapters `bench train-step --stage lora` trains (bench/pytorch_train_step.py
/// builds the same): rank 8, alpha 16, every linear of the decoder layers.
pub fn bench_lora() -> LoraSpec {
    LoraSpec {
        rank: 8,
        alpha: 16.0,
        targets: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            .map(String::from)
            .to_vec(),
        seed: 0,
    }
}

/// The deterministic benchmark batch: per sequence BOS, one image's tokens, then seeded text ids
/// in [3, 256); labels are the ids on the text after the image (`IGNORE` elsewhere); pixels are
/// seeded, uniform in [-1, 1).
fn train_batch(c: &CanonicalLlava, batch: usize, seq: usize) -> Result<Batch> {
    let dev = Device::Cpu;
    let vcfg = ClipVisionConfig::from_json(&c.vision_config, &c.origin)?;
    let grid = vcfg.image_size / vcfg.patch_size;
    let n = grid * grid + usize::from(!c.drop_cls);
    let image = models::image_tokens_of(c)?.expand(n);
    let text_from = 1 + image.len();
    ensure!(
        seq >= text_from + 2,
        "--seq {seq} is too short: BOS + {} image tokens + at least 2 text tokens",
        image.len()
    );
    let mut rng = crate::rng::SplitMix64::new(0x5eed);
    let mut next = || rng.next_u64();
    let (mut ids, mut labels) = (Vec::with_capacity(batch * seq), Vec::with_capacity(batch * seq));
    for _ in 0..batch {
        ids.push(1u32);
        ids.extend_from_slice(&image);
        for _ in text_from..seq {
            ids.push(3 + (next() % 253) as u32);
        }
        let row = &ids[ids.len() - seq..];
        labels
            .extend(row.iter().enumerate().map(|(i, &t)| if i >= text_from { i64::from(t) } else { IGNORE }));
    }
    let side = vcfg.image_size;
    let pixels: Vec<f32> = (0..batch * vcfg.num_channels * side * side)
        .map(|_| (next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        .collect();
    Ok(Batch {
        ids: Tensor::from_vec(ids, (batch, seq), &dev)?,
        labels: Tensor::from_vec(labels, (batch, seq), &dev)?,
        pixel_values: Some(Tensor::from_vec(pixels, (batch, vcfg.num_channels, side, side), &dev)?),
    })
}

/// Time one training step (forward + backward, clip to 1.0, AdamW) of a llava-hf directory or a
/// NeVA .nemo on the CPU and print the JSON line `bench/pytorch_train_step.py` also prints.
pub fn train_step(path: &Path, o: &TrainStepOptions) -> Result<()> {
    ensure!(o.runs >= 1 && o.batch >= 1, "need --runs >= 1 and --batch >= 1");
    let ckpt = shardsmith_converters::formats::open(path)?;
    let c = match &ckpt.meta.config {
        Some(ModelConfig::NemoYaml(cfg)) if neva::is_neva(cfg) => {
            crate::models::tower::with_tower(&ckpt, None)?
        }
        Some(ModelConfig::HfJson(cfg)) if llava::is_llava_hf(cfg) => llava::from_llava_hf(&ckpt)?,
        _ => anyhow::bail!("{}: bench train-step needs a llava-hf directory or a NeVA .nemo", path.display()),
    };
    let batch = train_batch(&c, o.batch, o.seq)?;
    let mut model = TrainModel::from_llava(&c, o.stage.clone(), o.dtype)?;
    drop(c);
    let trainable: usize = model.params().iter().map(|(_, v)| v.elem_count()).sum();
    // torch.optim.AdamW's defaults.
    let cfg = AdamWConfig { betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.01, no_decay_patterns: vec![] };
    let mut opt = AdamW::new(model.params().to_vec(), cfg)?;
    // (whole step, forward + backward, clipping, optimizer) seconds.
    let mut step = |model: &mut TrainModel| -> Result<[f64; 4]> {
        let t0 = Instant::now();
        let out = model.forward_backward(&batch, o.checkpointing)?;
        let t1 = Instant::now();
        opt.clip_grad_norm(&out.grads, Some(1.0))?;
        let t2 = Instant::now();
        opt.step(&out.grads, 1e-5)?;
        let t3 = Instant::now();
        Ok([t3 - t0, t1 - t0, t2 - t1, t3 - t2].map(|d| d.as_secs_f64()))
    };
    step(&mut model)?; // warm-up
    let times = (0..o.runs).map(|_| step(&mut model)).collect::<Result<Vec<_>>>()?;
    let phase = |i: usize| median(times.iter().map(|t| t[i]).collect()) * 1e3;
    let stage = match o.stage {
        Stage::Projector => "1",
        Stage::ProjectorAndLlm => "2",
        Stage::Lora(_) => "lora",
    };
    let line = json!({
        "impl": "shardsmith",
        "bench": "train_step",
        "model": path.display().to_string(),
        "stage": stage,
        "params_trainable": trainable,
        "threads": rayon_threads(),
        "dtype": format!("{:?}", o.dtype).to_lowercase(),
        "batch": o.batch,
        "seq": o.seq,
        "checkpointing": o.checkpointing,
        "runs": o.runs,
        "step_ms": phase(0),
        "forward_backward_ms": phase(1),
        "clip_ms": phase(2),
        "optimizer_ms": phase(3),
    });
    println!("{line}");
    Ok(())
}
