//! `train.yaml`: the trainer's configuration, nested like NeMo's NeVA config where that makes sense.
//!
//! ```yaml
//! model: {checkpoint: ../llava-tiny, tp: 1, precision: bf16, activations_checkpointing: false}
//! mm_cfg: {llm: {freeze: true}, vision_encoder: {freeze: true}, mm_mlp_adapter_type: mlp2x_gelu}
//! peft: {peft_scheme: none}
//! data: {data_path: data.json, image_folder: images, conv_template: vicuna_v1, image_aspect_ratio: pad}
//! optim:
//!   name: adamw
//!   lr: 2e-3
//!   weight_decay: 0.0
//!   betas: [0.9, 0.999]
//!   sched: {name: CosineAnnealing, warmup_steps: 10, min_lr: 0.0}
//! trainer: {max_steps: 100, global_batch_size: 8, micro_batch_size: 2, gradient_clip_val: 1.0}
//! output: {dir: runs/x, save_formats: [nemo, hf]}
//! ```
//!
//! Every section rejects unknown keys (the error lists the valid ones). Relative paths are taken
//! relative to the directory of the YAML file, not the working directory. Hydra-style overrides
//! (`trainer.max_steps=10`) can be applied on top with [`TrainConfig::load_with_overrides`].
//!
//! The three stages follow NeMo's NeVA recipes:
//!
//! | `mm_cfg.llm.freeze` | `peft.peft_scheme` | stage | trained |
//! | --- | --- | --- | --- |
//! | `true` | `none` | [`Stage::Stage1`] | projector |
//! | `false` | `none` | [`Stage::Stage2`] | projector + LLM |
//! | `true` | `lora` | [`Stage::Lora`] | projector + LoRA adapters on the frozen LLM |
//! | `false` | `lora` | error | (NeMo's `neva_peft.yaml`: "Set this to True in adapter learning!") |
//!
//! The vision tower is always frozen (`mm_cfg.vision_encoder.freeze: false` is an error).

pub use super::data::OnBadRecord;
use crate::infer::image::AspectMode;
use crate::infer::template::Template;
use crate::models::projector::ProjectorKind;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The whole `train.yaml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// The starting checkpoint and how the model is computed.
    pub model: ModelConfig,
    /// Which parts are frozen, the projector type (NeMo `model.mm_cfg`).
    #[serde(default)]
    pub mm_cfg: MmConfig,
    /// Parameter-efficient finetuning (NeMo `model.peft`); absent = none.
    #[serde(default)]
    pub peft: PeftConfig,
    /// The training data (NeMo `model.data`).
    pub data: DataConfig,
    /// Optimizer and learning-rate schedule (NeMo `model.optim`).
    pub optim: OptimConfig,
    /// Steps, batch sizes, seed, clipping, logging and checkpoint cadence (NeMo `trainer`).
    pub trainer: TrainerConfig,
    /// Where checkpoints, the metrics log and the loss curve go.
    pub output: OutputConfig,
}

/// `model:`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The NeVA/LLaVA checkpoint to start from: a `.nemo` file, a NeMo directory or a llava-hf
    /// directory (what `shardsmith generate` accepts).
    pub checkpoint: PathBuf,
    /// Simulated tensor-parallel degree of the model during training (default 1).
    #[serde(default = "one")]
    pub tp: usize,
    /// Compute precision (default `bf16`): `bf16` is NeMo's "BF16 O2" (bf16 forward/backward,
    /// fp32 master weights and fp32 optimizer state); `f32` computes in fp32 throughout.
    #[serde(default)]
    pub precision: Precision,
    /// Recompute each decoder layer's activations in the backward pass instead of keeping them
    /// (NeMo `activations_checkpoint_granularity: full`, `method: uniform`, one layer). Default false.
    #[serde(default)]
    pub activations_checkpointing: bool,
}

/// Compute precision of the forward and backward passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Precision {
    /// bf16 compute, fp32 master weights and optimizer state (`bf16`, `bf16-mixed`, `bf16_O2`).
    #[default]
    #[serde(rename = "bf16", alias = "bf16-mixed", alias = "bf16_O2")]
    Bf16,
    /// fp32 everywhere (`f32`, `fp32`, `32`, `32-true`).
    #[serde(rename = "f32", alias = "fp32", alias = "32", alias = "32-true")]
    F32,
}

impl Precision {
    /// The dtype the forward and backward passes run in.
    pub fn compute_dtype(self) -> candle_core::DType {
        match self {
            Precision::Bf16 => candle_core::DType::BF16,
            Precision::F32 => candle_core::DType::F32,
        }
    }
}

/// `mm_cfg:`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmConfig {
    /// `mm_cfg.llm.freeze` (default true): true = stage 1 (or LoRA), false = stage 2.
    #[serde(default)]
    pub llm: FreezeConfig,
    /// `mm_cfg.vision_encoder.freeze` (default true; must be true).
    #[serde(default)]
    pub vision_encoder: FreezeConfig,
    /// The projector architecture (`linear`, `mlp2x_gelu`, …). Absent: whatever the checkpoint
    /// has; present: must match the checkpoint's.
    #[serde(default)]
    pub mm_mlp_adapter_type: Option<String>,
}

impl MmConfig {
    /// The parsed `mm_mlp_adapter_type`, if given.
    pub fn projector_kind(&self) -> Result<Option<ProjectorKind>> {
        self.mm_mlp_adapter_type.as_deref().map(ProjectorKind::parse).transpose()
    }
}

/// `{freeze: bool}` of `mm_cfg.llm` / `mm_cfg.vision_encoder`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FreezeConfig {
    /// Whether the part's own weights are frozen (default true).
    #[serde(default = "yes")]
    pub freeze: bool,
}

impl Default for FreezeConfig {
    fn default() -> Self {
        FreezeConfig { freeze: true }
    }
}

/// `peft:`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeftConfig {
    /// `none` (or null / absent) or `lora`.
    #[serde(default)]
    pub peft_scheme: Option<PeftScheme>,
    /// LoRA settings; used when `peft_scheme: lora`.
    #[serde(default)]
    pub lora_tuning: LoraConfig,
}

impl PeftConfig {
    /// The LoRA settings when LoRA is on.
    pub fn lora(&self) -> Option<&LoraConfig> {
        (self.peft_scheme == Some(PeftScheme::Lora)).then_some(&self.lora_tuning)
    }
}

/// `peft.peft_scheme`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeftScheme {
    /// No adapters.
    None,
    /// Low-rank adapters on the LLM's linears.
    Lora,
}

/// `peft.lora_tuning:` (NeMo names). The adapter of a linear `W` (out × in) is
/// `y = W x + (alpha / adapter_dim) · B A x`, `A` (adapter_dim × in) Kaiming-uniform like
/// HF PEFT, `B` (out × adapter_dim) zero, so training starts from the base model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// The rank r (default 8).
    #[serde(default = "default_lora_dim")]
    pub adapter_dim: usize,
    /// The scale numerator (default: `adapter_dim`, NeMo's default, i.e. scale 1).
    #[serde(default)]
    pub alpha: Option<f64>,
    /// Dropout on the adapter input; only 0.0 is supported (default 0.0).
    #[serde(default)]
    pub adapter_dropout: f64,
    /// Which linears get adapters, as HF names (`q_proj k_proj v_proj o_proj gate_proj up_proj
    /// down_proj`) or NeMo names (`attention_qkv` = q,k,v; `attention_dense` = o; `mlp_fc1` =
    /// gate,up; `mlp_fc2` = down; `all`). Default: all seven.
    #[serde(default = "default_lora_targets")]
    pub target_modules: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            adapter_dim: default_lora_dim(),
            alpha: None,
            adapter_dropout: 0.0,
            target_modules: default_lora_targets(),
        }
    }
}

/// The LLaMA linears LoRA can attach to, as HF names.
pub const LORA_TARGETS: [&str; 7] =
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

const LORA_TARGET_FORMS: &str = "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, \
                                 attention_qkv, attention_dense, mlp_fc1, mlp_fc2, all";

impl LoraConfig {
    /// `alpha / adapter_dim`.
    pub fn scale(&self) -> f64 {
        self.alpha.unwrap_or(self.adapter_dim as f64) / self.adapter_dim as f64
    }

    /// `target_modules` expanded to HF names, in [`LORA_TARGETS`] order, without duplicates.
    pub fn targets(&self) -> Result<Vec<&'static str>> {
        let mut on = [false; 7];
        for t in &self.target_modules {
            let idx: Vec<usize> = match t.as_str() {
                "all" => (0..LORA_TARGETS.len()).collect(),
                "attention_qkv" => vec![0, 1, 2],
                "attention_dense" => vec![3],
                "mlp_fc1" => vec![4, 5],
                "mlp_fc2" => vec![6],
                other => match LORA_TARGETS.iter().position(|n| *n == other) {
                    Some(i) => vec![i],
                    None => {
                        return Err(Error::Usage(format!(
                            "peft.lora_tuning.target_modules: unknown module {other:?}; valid: {LORA_TARGET_FORMS}"
                        )))
                    }
                },
            };
            for i in idx {
                on[i] = true;
            }
        }
        Ok(LORA_TARGETS.iter().zip(on).filter(|(_, on)| *on).map(|(n, _)| *n).collect())
    }
}

/// `data:`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// The conversations: a LLaVA JSON array of `{id, image, conversations}` records, or NeMo
    /// `.jsonl` (one record per line).
    pub data_path: PathBuf,
    /// Where the records' `image` paths are looked up: a directory or a `.tar` (default: the data
    /// file's directory).
    #[serde(default)]
    pub image_folder: Option<PathBuf>,
    /// Chat template (`vicuna_v1`, `v1`, `llama_2`, `nvgpt`, `plain`; default `vicuna_v1`).
    #[serde(default = "default_template")]
    pub conv_template: String,
    /// `square` (NeMo's default), `pad` (LLaVA-1.5) or `keep`. Default `square`.
    #[serde(default = "default_aspect")]
    pub image_aspect_ratio: String,
    /// Token sequences are truncated to this length (default 2048).
    #[serde(default = "default_seq_len")]
    pub max_seq_length: usize,
    /// What a malformed record or unreadable image does: `error` (default) stops the run naming
    /// the record; `skip` leaves it out and lists it in the data report.
    #[serde(default)]
    pub on_bad_record: OnBadRecord,
    /// Background threads preparing micro-batches (0 = in the training thread). Default 2.
    /// Results never depend on it.
    #[serde(default = "default_workers")]
    pub num_workers: usize,
    /// Reshuffle the records each epoch from `trainer.seed` (default true); false = file order.
    #[serde(default = "yes")]
    pub shuffle: bool,
}

impl DataConfig {
    /// The parsed `conv_template`.
    pub fn template(&self) -> Result<Template> {
        Template::parse(&self.conv_template)
    }

    /// The parsed `image_aspect_ratio`.
    pub fn aspect(&self) -> Result<AspectMode> {
        AspectMode::parse(&self.image_aspect_ratio)
    }
}

/// `optim:`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// `adamw` (default). `fused_adam`, NeMo's name, is accepted as the same thing (apex's
    /// FusedAdam in its default `adam_w_mode`, i.e. decoupled weight decay).
    #[serde(default)]
    pub name: OptimName,
    /// Peak learning rate (> 0).
    pub lr: f64,
    /// Decoupled weight decay (default 0.0, NeMo NeVA's value; torch's default is 0.01).
    #[serde(default)]
    pub weight_decay: f64,
    /// Adam betas (default [0.9, 0.999], torch's).
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    /// Adam epsilon, added after the square root (default 1e-8).
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Parameters whose full name contains one of these substrings get no weight decay
    /// (default none, as plain `torch.optim.AdamW`; `[".bias", "norm"]` is close to NeMo's
    /// Megatron param groups).
    #[serde(default)]
    pub no_decay_patterns: Vec<String>,
    /// The learning-rate schedule; absent = constant `lr`.
    #[serde(default)]
    pub sched: Option<SchedConfig>,
}

/// `optim.name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum OptimName {
    /// `torch.optim.AdamW` semantics.
    #[default]
    #[serde(rename = "adamw", alias = "fused_adam")]
    AdamW,
}

/// `optim.sched:`, NeMo's scheduler keys (`max_steps` defaults to `trainer.max_steps`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedConfig {
    /// `CosineAnnealing`, `WarmupPolicy` (warmup then constant) or `Constant`.
    pub name: SchedName,
    /// Warmup length in optimizer steps (exclusive with `warmup_ratio`; default 0).
    #[serde(default)]
    pub warmup_steps: Option<u64>,
    /// Warmup as a fraction of `max_steps` (`int(ratio · max_steps)`, NeMo).
    #[serde(default)]
    pub warmup_ratio: Option<f64>,
    /// CosineAnnealing only: steps held at `min_lr` at the end; > 0 switches to Megatron's
    /// warmup-from-zero variant (see [`crate::train::schedule`]). Default 0.
    #[serde(default)]
    pub constant_steps: Option<u64>,
    /// `constant_steps` as a fraction of `max_steps` (exclusive with `constant_steps`).
    #[serde(default)]
    pub constant_ratio: Option<f64>,
    /// The floor of the decay (default 0.0).
    #[serde(default)]
    pub min_lr: f64,
    /// The schedule's length (default: `trainer.max_steps`).
    #[serde(default)]
    pub max_steps: Option<u64>,
}

impl SchedConfig {
    /// Warmup steps: `warmup_steps`, else `int(warmup_ratio · max_steps)` (NeMo), else 0.
    pub fn warmup(&self, max_steps: u64) -> u64 {
        self.warmup_steps.or(self.warmup_ratio.map(|r| (r * max_steps as f64) as u64)).unwrap_or(0)
    }

    /// Constant steps: `constant_steps`, else `int(constant_ratio · max_steps)`, else 0.
    pub fn constant(&self, max_steps: u64) -> u64 {
        self.constant_steps.or(self.constant_ratio.map(|r| (r * max_steps as f64) as u64)).unwrap_or(0)
    }
}

/// `optim.sched.name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SchedName {
    /// NeMo `CosineAnnealing`: linear warmup, cosine decay to `min_lr`.
    CosineAnnealing,
    /// NeMo `WarmupPolicy`: linear warmup, then `lr`.
    WarmupPolicy,
    /// `lr` at every step.
    #[serde(alias = "constant")]
    Constant,
}

/// `trainer:`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerConfig {
    /// Optimizer steps to run (≥ 1).
    pub max_steps: u64,
    /// Samples per optimizer step (a multiple of `micro_batch_size`).
    pub global_batch_size: usize,
    /// Samples per forward/backward pass; `global / micro` passes are accumulated per step.
    pub micro_batch_size: usize,
    /// Seed of the data order and of freshly initialised weights (LoRA). Default 1234.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Metrics line and progress update every N steps (default 1).
    #[serde(default = "one_u64")]
    pub log_every_n_steps: u64,
    /// Checkpoint every N steps (null or 0: only at the end, which always saves).
    #[serde(default)]
    pub save_every_n_steps: Option<u64>,
    /// Clip the global gradient L2 norm to this (PyTorch `clip_grad_norm_`); null or 0 = off.
    #[serde(default)]
    pub gradient_clip_val: Option<f64>,
    /// Where the step runs: `cpu` (default), `cuda` or `cuda:N` (a build with `--features cuda`:
    /// fused kernels for attention, SwiGLU, RMSNorm, rope, cross-entropy and AdamW).
    #[serde(default = "default_device")]
    pub device: String,
}

fn default_device() -> String {
    "cpu".into()
}

impl TrainerConfig {
    /// Micro-batches accumulated per optimizer step.
    pub fn accumulation_steps(&self) -> usize {
        self.global_batch_size / self.micro_batch_size
    }

    /// The clipping threshold when clipping is on.
    pub fn grad_clip(&self) -> Option<f64> {
        self.gradient_clip_val.filter(|v| *v > 0.0)
    }

    /// Whether a checkpoint is due after `step` optimizer steps (1-based count).
    pub fn save_due(&self, step: u64) -> bool {
        step == self.max_steps
            || matches!(self.save_every_n_steps, Some(n) if n > 0 && step.is_multiple_of(n))
    }
}

/// `output:`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// Run directory: checkpoints, `metrics.jsonl`, `loss.png`.
    pub dir: PathBuf,
    /// Checkpoint formats written at each save (default `[nemo]`).
    #[serde(default = "default_formats")]
    pub save_formats: Vec<SaveFormat>,
    /// Tensor-parallel degree of the saved `.nemo` (default 1).
    #[serde(default = "one")]
    pub nemo_tp: usize,
}

/// `output.save_formats` entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SaveFormat {
    /// A `.nemo` archive.
    Nemo,
    /// A llava-hf directory (safetensors + config).
    Hf,
}

impl SaveFormat {
    /// The config's spelling.
    pub fn name(self) -> &'static str {
        match self {
            SaveFormat::Nemo => "nemo",
            SaveFormat::Hf => "hf",
        }
    }
}

/// What a run trains, from `mm_cfg.llm.freeze` and `peft.peft_scheme`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Projector only; LLM and vision tower frozen.
    Stage1,
    /// Projector and LLM; vision tower frozen.
    Stage2,
    /// Projector and LoRA adapters on the frozen LLM.
    Lora,
}

impl Stage {
    /// Whether the LLM's own weights train.
    pub fn trains_llm(self) -> bool {
        self == Stage::Stage2
    }

    /// A short name for logs.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Stage1 => "stage 1 (projector)",
            Stage::Stage2 => "stage 2 (projector + LLM)",
            Stage::Lora => "LoRA (projector + adapters)",
        }
    }
}

fn one() -> usize {
    1
}
fn one_u64() -> u64 {
    1
}
fn yes() -> bool {
    true
}
fn default_lora_dim() -> usize {
    8
}
fn default_lora_targets() -> Vec<String> {
    LORA_TARGETS.iter().map(|s| s.to_string()).collect()
}
fn default_template() -> String {
    "vicuna_v1".into()
}
fn default_aspect() -> String {
    "square".into()
}
fn default_seq_len() -> usize {
    2048
}
fn default_workers() -> usize {
    2
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_seed() -> u64 {
    1234
}
fn default_formats() -> Vec<SaveFormat> {
    vec![SaveFormat::Nemo]
}

impl TrainConfig {
    /// Reads, parses and validates `path`; relative paths inside are resolved against its directory.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with_overrides(path, &[])
    }

    /// [`TrainConfig::load`] with Hydra-style `dotted.key=value` overrides applied first (the value
    /// is parsed as YAML: `trainer.max_steps=10`, `optim.betas=[0.9,0.95]`, `peft.peft_scheme=lora`).
    pub fn load_with_overrides(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = read_config_text(path)?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::parse(&text, path, &base, overrides)
    }

    /// Parses YAML `text`; `origin` names it in errors, `base` resolves relative paths.
    pub fn parse(text: &str, origin: &Path, base: &Path, overrides: &[String]) -> Result<Self> {
        let bad = |detail: String| Error::config(origin, detail);
        let mut cfg: TrainConfig = if overrides.is_empty() {
            serde_yaml::from_str(text).map_err(|e| bad(e.to_string()))?
        } else {
            let mut doc: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| bad(e.to_string()))?;
            for o in overrides {
                apply_override(&mut doc, o).map_err(bad)?;
            }
            serde_yaml::from_value(doc).map_err(|e| bad(e.to_string()))?
        };
        cfg.resolve_paths(base);
        cfg.validate().map_err(bad)?;
        Ok(cfg)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.model.checkpoint);
        fix(&mut self.data.data_path);
        if let Some(dir) = self.data.image_folder.as_mut() {
            fix(dir);
        }
        fix(&mut self.output.dir);
    }

    /// What this config trains. Only valid configs are ever built, so this cannot fail.
    pub fn stage(&self) -> Stage {
        match (self.peft.lora().is_some(), self.mm_cfg.llm.freeze) {
            (true, _) => Stage::Lora,
            (false, true) => Stage::Stage1,
            (false, false) => Stage::Stage2,
        }
    }

    /// The schedule's length: `optim.sched.max_steps`, else `trainer.max_steps`.
    pub fn sched_max_steps(&self) -> u64 {
        self.optim.sched.as_ref().and_then(|s| s.max_steps).unwrap_or(self.trainer.max_steps)
    }

    /// Checks every value and combination; the message names the key (`trainer.micro_batch_size`).
    pub fn validate(&self) -> std::result::Result<(), String> {
        // Each worker is a thread decoding images; thousands only exhaust memory and threads.
        const MAX_DATA_WORKERS: usize = 256;
        crate::models::device_ordinal(&self.trainer.device).map_err(|e| format!("trainer.device: {e}"))?;
        let m = &self.model;
        if m.checkpoint.as_os_str().is_empty() {
            return Err("model.checkpoint is empty".into());
        }
        if m.tp == 0 {
            return Err("model.tp must be at least 1".into());
        }
        if !self.mm_cfg.vision_encoder.freeze {
            return Err("mm_cfg.vision_encoder.freeze: false is not supported (the vision tower is always \
                        frozen)"
                .into());
        }
        self.mm_cfg.projector_kind().map_err(|e| format!("mm_cfg.mm_mlp_adapter_type: {e}"))?;
        if let Some(lora) = self.peft.lora() {
            if !self.mm_cfg.llm.freeze {
                return Err(
                    "peft.peft_scheme: lora needs mm_cfg.llm.freeze: true (LoRA trains adapters on a \
                            frozen LLM, as in NeMo's neva_peft.yaml); for full LLM finetuning use \
                            peft_scheme: none"
                        .into(),
                );
            }
            if lora.adapter_dim == 0 {
                return Err("peft.lora_tuning.adapter_dim must be at least 1".into());
            }
            if let Some(a) = lora.alpha {
                if !(a.is_finite() && a > 0.0) {
                    return Err(format!("peft.lora_tuning.alpha must be positive, got {a}"));
                }
            }
            if lora.adapter_dropout != 0.0 {
                return Err(format!(
                    "peft.lora_tuning.adapter_dropout {} is not supported (only 0.0)",
                    lora.adapter_dropout
                ));
            }
            if lora.target_modules.is_empty() {
                return Err("peft.lora_tuning.target_modules is empty".into());
            }
            lora.targets().map_err(|e| e.to_string())?;
        }

        let d = &self.data;
        if d.data_path.as_os_str().is_empty() {
            return Err("data.data_path is empty".into());
        }
        d.template().map_err(|e| format!("data.conv_template: {e}"))?;
        d.aspect().map_err(|e| format!("data.image_aspect_ratio: {e}"))?;
        if d.max_seq_length == 0 {
            return Err("data.max_seq_length must be at least 1".into());
        }
        if d.num_workers > MAX_DATA_WORKERS {
            return Err(format!(
                "data.num_workers must be at most {MAX_DATA_WORKERS}, got {}",
                d.num_workers
            ));
        }

        let o = &self.optim;
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return Err(format!("optim.lr must be positive, got {}", o.lr));
        }
        if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
            return Err(format!("optim.weight_decay must be >= 0, got {}", o.weight_decay));
        }
        for (i, b) in o.betas.iter().enumerate() {
            if !(0.0..1.0).contains(b) {
                return Err(format!("optim.betas[{i}] must be in [0, 1), got {b}"));
            }
        }
        if !(o.eps.is_finite() && o.eps > 0.0) {
            return Err(format!("optim.eps must be positive, got {}", o.eps));
        }
        let t = &self.trainer;
        if t.max_steps == 0 {
            return Err("trainer.max_steps must be at least 1".into());
        }
        if t.micro_batch_size == 0 {
            return Err("trainer.micro_batch_size must be at least 1".into());
        }
        if t.global_batch_size == 0 {
            return Err("trainer.global_batch_size must be at least 1".into());
        }
        if !t.global_batch_size.is_multiple_of(t.micro_batch_size) {
            return Err(format!(
                "trainer.global_batch_size ({}) must be a multiple of trainer.micro_batch_size ({})",
                t.global_batch_size, t.micro_batch_size
            ));
        }
        if t.log_every_n_steps == 0 {
            return Err("trainer.log_every_n_steps must be at least 1".into());
        }
        if let Some(c) = t.gradient_clip_val {
            if !(c.is_finite() && c >= 0.0) {
                return Err(format!("trainer.gradient_clip_val must be >= 0 (0 = off), got {c}"));
            }
        }

        // After trainer.max_steps, which the schedule's length defaults to.
        if let Some(s) = &o.sched {
            self.validate_sched(s)?;
        }

        let out = &self.output;
        if out.dir.as_os_str().is_empty() {
            return Err("output.dir is empty".into());
        }
        if out.save_formats.is_empty() {
            return Err("output.save_formats is empty (valid: nemo, hf)".into());
        }
        for (i, f) in out.save_formats.iter().enumerate() {
            if out.save_formats[..i].contains(f) {
                return Err(format!("output.save_formats lists {} twice", f.name()));
            }
        }
        if out.nemo_tp == 0 {
            return Err("output.nemo_tp must be at least 1".into());
        }
        Ok(())
    }

    fn validate_sched(&self, s: &SchedConfig) -> std::result::Result<(), String> {
        let max_steps = self.sched_max_steps();
        if max_steps == 0 {
            return Err("optim.sched.max_steps must be at least 1".into());
        }
        if s.warmup_steps.is_some() && s.warmup_ratio.is_some() {
            return Err("optim.sched: give warmup_steps or warmup_ratio, not both".into());
        }
        if s.constant_steps.is_some() && s.constant_ratio.is_some() {
            return Err("optim.sched: give constant_steps or constant_ratio, not both".into());
        }
        for (key, r) in [("warmup_ratio", s.warmup_ratio), ("constant_ratio", s.constant_ratio)] {
            if let Some(r) = r {
                if !(0.0..=1.0).contains(&r) {
                    return Err(format!("optim.sched.{key} must be in [0, 1], got {r}"));
                }
            }
        }
        if !(s.min_lr.is_finite() && s.min_lr >= 0.0) {
            return Err(format!("optim.sched.min_lr must be >= 0, got {}", s.min_lr));
        }
        if s.min_lr > self.optim.lr {
            return Err(format!("optim.sched.min_lr ({}) is above optim.lr ({})", s.min_lr, self.optim.lr));
        }
        let (warmup, constant) = (s.warmup(max_steps), s.constant(max_steps));
        match s.name {
            SchedName::CosineAnnealing => {
                if warmup + constant > max_steps {
                    return Err(format!(
                        "optim.sched: warmup ({warmup}) + constant ({constant}) steps exceed max_steps ({max_steps})"
                    ));
                }
                if constant > 0 && s.min_lr >= self.optim.lr {
                    return Err("optim.sched: constant_steps > 0 needs min_lr below optim.lr".into());
                }
            }
            SchedName::WarmupPolicy | SchedName::Constant => {
                if constant > 0 {
                    return Err(format!(
                        "optim.sched: constant_steps/constant_ratio apply to CosineAnnealing only, \
                                        not {:?}",
                        s.name
                    ));
                }
                if s.name == SchedName::Constant && warmup > 0 {
                    return Err("optim.sched: Constant has no warmup (use WarmupPolicy)".into());
                }
            }
        }
        Ok(())
    }

    /// The config as YAML (paths as resolved), for saving next to checkpoints.
    pub fn to_yaml(&self) -> Result<String> {
        serde_yaml::to_string(self).map_err(|e| Error::Usage(format!("serialising the train config: {e}")))
    }
}

/// Sets `a.b.c=value` in a YAML document, creating missing mappings.
fn apply_override(doc: &mut serde_yaml::Value, o: &str) -> std::result::Result<(), String> {
    use serde_yaml::Value;
    let (key, value) = o.split_once('=').ok_or_else(|| format!("override {o:?} is not key=value"))?;
    let key = key.trim();
    if key.is_empty() || key.split('.').any(str::is_empty) {
        return Err(format!("override {o:?}: bad key {key:?}"));
    }
    let value: Value =
        serde_yaml::from_str(value).map_err(|e| format!("override {o:?}: value is not YAML: {e}"))?;
    let mut node = doc;
    for part in key.split('.') {
        if node.is_null() {
            *node = Value::Mapping(Default::default());
        }
        let map = node
            .as_mapping_mut()
            .ok_or_else(|| format!("override {o:?}: {part:?} is under a non-mapping"))?;
        node = map.entry(Value::String(part.to_string())).or_insert(Value::Null);
    }
    *node = value;
    Ok(())
}

/// A config is a few kilobytes: reading stops past 16 MiB, so a wrong path (`/dev/zero`, a
/// dataset) is named instead of filling memory.
fn read_config_text(path: &Path) -> Result<String> {
    use std::io::Read;
    const LIMIT: u64 = 16 << 20;
    let io = |source| Error::Io { path: path.into(), source };
    let mut bytes = Vec::new();
    std::fs::File::open(path).map_err(io)?.take(LIMIT + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > LIMIT {
        return Err(Error::config(path, "is larger than 16 MiB; is this the training config?"));
    }
    String::from_utf8(bytes).map_err(|_| Error::config(path, "is not UTF-8 text"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "
model: {checkpoint: ckpt.nemo}
data: {data_path: data.json}
optim: {lr: 2e-3}
trainer: {max_steps: 10, global_batch_size: 8, micro_batch_size: 2}
output: {dir: runs/x}
";

    fn parse(text: &str) -> Result<TrainConfig> {
        TrainConfig::parse(text, Path::new("train.yaml"), Path::new("/base"), &[])
    }

    fn parse_with(overrides: &[&str]) -> Result<TrainConfig> {
        let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        TrainConfig::parse(BASE, Path::new("train.yaml"), Path::new("/base"), &o)
    }

    fn err_of(overrides: &[&str]) -> String {
        match parse_with(overrides) {
            Ok(_) => panic!("{overrides:?} parsed"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(BASE).unwrap();
        assert_eq!(c.model.checkpoint, Path::new("/base/ckpt.nemo"));
        assert_eq!(c.data.data_path, Path::new("/base/data.json"));
        assert_eq!(c.output.dir, Path::new("/base/runs/x"));
        assert_eq!(c.model.tp, 1);
        assert_eq!(c.model.precision, Precision::Bf16);
        assert!(!c.model.activations_checkpointing);
        assert!(c.mm_cfg.llm.freeze && c.mm_cfg.vision_encoder.freeze);
        assert_eq!(c.stage(), Stage::Stage1);
        assert_eq!(c.optim.lr, 2e-3);
        assert_eq!(c.optim.weight_decay, 0.0);
        assert_eq!(c.optim.betas, [0.9, 0.999]);
        assert_eq!(c.optim.eps, 1e-8);
        assert!(c.optim.sched.is_none());
        assert_eq!(c.trainer.accumulation_steps(), 4);
        assert_eq!(c.trainer.seed, 1234);
        assert_eq!(c.trainer.grad_clip(), None);
        assert_eq!(c.output.save_formats, vec![SaveFormat::Nemo]);
        assert_eq!(c.data.template().unwrap(), Template::VicunaV1);
        assert_eq!(c.data.aspect().unwrap(), AspectMode::Square);
        assert_eq!(c.data.on_bad_record, OnBadRecord::Error);
        assert_eq!(c.sched_max_steps(), 10);
    }

    #[test]
    fn the_fixture_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/train-tiny/train.yaml");
        let c = TrainConfig::load(&path).unwrap();
        let dir = path.parent().unwrap();
        assert_eq!(c.model.checkpoint, dir.join("../llava-tiny"));
        assert_eq!(c.model.precision, Precision::F32);
        assert_eq!(c.stage(), Stage::Stage1);
        assert_eq!(c.mm_cfg.projector_kind().unwrap(), Some(ProjectorKind::MlpGelu { depth: 2 }));
        let s = c.optim.sched.as_ref().unwrap();
        assert_eq!((s.name, s.warmup_steps, s.min_lr), (SchedName::CosineAnnealing, Some(2), 0.0));
        assert_eq!(c.trainer.grad_clip(), Some(1.0));
        assert_eq!(c.output.save_formats, vec![SaveFormat::Nemo, SaveFormat::Hf]);
        assert_eq!(c.peft.lora_tuning.targets().unwrap(), LORA_TARGETS.to_vec());
        // A round trip through to_yaml gives the same config.
        let again = TrainConfig::parse(&c.to_yaml().unwrap(), &path, Path::new("/elsewhere"), &[]).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn stages() {
        assert_eq!(parse_with(&["mm_cfg.llm.freeze=false"]).unwrap().stage(), Stage::Stage2);
        assert!(parse_with(&["mm_cfg.llm.freeze=false"]).unwrap().stage().trains_llm());
        assert_eq!(parse_with(&["peft.peft_scheme=lora"]).unwrap().stage(), Stage::Lora);
        assert_eq!(parse_with(&["peft.peft_scheme=none"]).unwrap().stage(), Stage::Stage1);
        assert_eq!(parse_with(&["peft.peft_scheme=null"]).unwrap().stage(), Stage::Stage1);
        let e = err_of(&["peft.peft_scheme=lora", "mm_cfg.llm.freeze=false"]);
        assert!(e.contains("needs mm_cfg.llm.freeze: true"), "{e}");
        let e = err_of(&["mm_cfg.vision_encoder.freeze=false"]);
        assert!(e.contains("vision_encoder.freeze"), "{e}");
    }

    #[test]
    fn lora_settings() {
        let c =
            parse_with(&["peft.peft_scheme=lora", "peft.lora_tuning={adapter_dim: 4, alpha: 16}"]).unwrap();
        let l = c.peft.lora().unwrap();
        assert_eq!(l.scale(), 4.0);
        let c = parse_with(&[
            "peft.peft_scheme=lora",
            "peft.lora_tuning.target_modules=[mlp_fc1, attention_qkv, q_proj]",
        ])
        .unwrap();
        assert_eq!(
            c.peft.lora().unwrap().targets().unwrap(),
            vec!["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
        );
        assert_eq!(c.peft.lora().unwrap().scale(), 1.0);
        let e = err_of(&["peft.peft_scheme=lora", "peft.lora_tuning.target_modules=[qkv]"]);
        assert!(e.contains("unknown module \"qkv\"") && e.contains("attention_qkv"), "{e}");
        let e = err_of(&["peft.peft_scheme=lora", "peft.lora_tuning.target_modules=[]"]);
        assert!(e.contains("target_modules is empty"), "{e}");
        let e = err_of(&["peft.peft_scheme=lora", "peft.lora_tuning.adapter_dim=0"]);
        assert!(e.contains("adapter_dim must be at least 1"), "{e}");
        let e = err_of(&["peft.peft_scheme=lora", "peft.lora_tuning.alpha=-1"]);
        assert!(e.contains("alpha must be positive"), "{e}");
        let e = err_of(&["peft.peft_scheme=lora", "peft.lora_tuning.adapter_dropout=0.1"]);
        assert!(e.contains("adapter_dropout 0.1 is not supported"), "{e}");
        let e = err_of(&["peft.peft_scheme=ia3"]);
        assert!(e.contains("unknown variant `ia3`") && e.contains("lora"), "{e}");
    }

    #[test]
    fn unknown_keys_list_the_valid_ones() {
        let e = parse(&format!("{BASE}bogus: 1\n")).unwrap_err().to_string();
        assert!(e.starts_with("train.yaml: ") && e.contains("unknown field `bogus`"), "{e}");
        assert!(e.contains("`model`") && e.contains("`trainer`") && e.contains("`output`"), "{e}");
        let e = err_of(&["trainer.max_step=5"]);
        assert!(e.contains("unknown field `max_step`") && e.contains("`max_steps`"), "{e}");
        let e = err_of(&["optim.sched={name: CosineAnnealing, warmup: 3}"]);
        assert!(e.contains("unknown field `warmup`") && e.contains("`warmup_steps`"), "{e}");
        let e = err_of(&["model.dtype=bf16"]);
        assert!(e.contains("unknown field `dtype`") && e.contains("`precision`"), "{e}");
        let e = err_of(&["data.foo=1"]);
        assert!(e.contains("`data_path`") && e.contains("`on_bad_record`"), "{e}");
        let e = err_of(&["mm_cfg.llm.frozen=true"]);
        assert!(e.contains("`freeze`"), "{e}");
        // Missing required keys are named too.
        let e = parse("model: {checkpoint: x}\n").unwrap_err().to_string();
        assert!(e.contains("missing field"), "{e}");
        // With the YAML position when no override was applied.
        let e = parse(&BASE.replace("max_steps: 10", "max_steps: 10, x: 1")).unwrap_err().to_string();
        assert!(e.contains("line 5"), "{e}");
    }

    #[test]
    fn bad_enum_values() {
        let e = err_of(&["model.precision=fp16"]);
        assert!(e.contains("unknown variant `fp16`") && e.contains("bf16") && e.contains("f32"), "{e}");
        assert_eq!(parse_with(&["model.precision=bf16-mixed"]).unwrap().model.precision, Precision::Bf16);
        assert_eq!(parse_with(&["model.precision=fp32"]).unwrap().model.precision, Precision::F32);
        assert_eq!(parse_with(&["optim.name=fused_adam"]).unwrap().optim.name, OptimName::AdamW);
        let e = err_of(&["optim.name=sgd"]);
        assert!(e.contains("unknown variant `sgd`") && e.contains("adamw"), "{e}");
        let e = err_of(&["optim.sched.name=Linear"]);
        assert!(e.contains("unknown variant `Linear`") && e.contains("CosineAnnealing"), "{e}");
        let e = err_of(&["data.on_bad_record=ignore"]);
        assert!(e.contains("skip") && e.contains("error"), "{e}");
        let e = err_of(&["output.save_formats=[nemo, gguf]"]);
        assert!(e.contains("unknown variant `gguf`") && e.contains("hf"), "{e}");
        let e = err_of(&["data.conv_template=chatml"]);
        assert!(e.contains("data.conv_template") && e.contains("vicuna_v1"), "{e}");
        let e = err_of(&["data.image_aspect_ratio=crop"]);
        assert!(e.contains("data.image_aspect_ratio") && e.contains("pad"), "{e}");
        let e = err_of(&["mm_cfg.mm_mlp_adapter_type=mlp0x_gelu"]);
        assert!(e.contains("mm_cfg.mm_mlp_adapter_type") && e.contains("depth"), "{e}");
    }

    #[test]
    fn value_errors_name_the_key() {
        let cases: &[(&[&str], &str)] = &[
            (&["trainer.global_batch_size=10", "trainer.micro_batch_size=4"], "must be a multiple of"),
            (&["trainer.micro_batch_size=0"], "trainer.micro_batch_size must be at least 1"),
            (&["trainer.global_batch_size=0"], "trainer.global_batch_size must be at least 1"),
            (&["trainer.max_steps=0"], "trainer.max_steps must be at least 1"),
            (&["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps must be at least 1"),
            (&["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val must be >= 0"),
            (&["optim.lr=0"], "optim.lr must be positive"),
            (&["optim.lr=-1e-3"], "optim.lr must be positive"),
            (&["optim.lr=.nan"], "optim.lr must be positive"),
            (&["optim.weight_decay=-0.1"], "optim.weight_decay must be >= 0"),
            (&["optim.betas=[0.9, 1.0]"], "optim.betas[1] must be in [0, 1)"),
            (&["optim.eps=0"], "optim.eps must be positive"),
            (&["model.tp=0"], "model.tp must be at least 1"),
            (&["model.checkpoint=''"], "model.checkpoint is empty"),
            (&["data.data_path=''"], "data.data_path is empty"),
            (&["data.max_seq_length=0"], "data.max_seq_length must be at least 1"),
            (&["output.dir=''"], "output.dir is empty"),
            (&["output.save_formats=[]"], "output.save_formats is empty"),
            (&["output.save_formats=[hf, hf]"], "output.save_formats lists hf twice"),
            (&["data.num_workers=100000"], "data.num_workers must be at most 256, got 100000"),
            (
                &["trainer.max_steps=0", "optim.sched={name: CosineAnnealing, warmup_steps: 0}"],
                "trainer.max_steps must be at least 1",
            ),
            (&["output.nemo_tp=0"], "output.nemo_tp must be at least 1"),
            (
                &["optim.sched={name: CosineAnnealing, warmup_steps: 2, warmup_ratio: 0.1}"],
                "warmup_steps or warmup_ratio, not both",
            ),
            (
                &["optim.sched={name: CosineAnnealing, constant_steps: 2, constant_ratio: 0.1}"],
                "constant_steps or constant_ratio, not both",
            ),
            (&["optim.sched={name: CosineAnnealing, warmup_ratio: 1.5}"], "warmup_ratio must be in [0, 1]"),
            (&["optim.sched={name: CosineAnnealing, min_lr: -1}"], "min_lr must be >= 0"),
            (&["optim.sched={name: CosineAnnealing, min_lr: 1}"], "is above optim.lr"),
            (
                &["optim.sched={name: CosineAnnealing, warmup_steps: 8, constant_steps: 3}"],
                "exceed max_steps",
            ),
            (
                &["optim.sched={name: CosineAnnealing, max_steps: 0}"],
                "optim.sched.max_steps must be at least 1",
            ),
            (
                &["optim.sched={name: CosineAnnealing, constant_steps: 2, min_lr: 2e-3}"],
                "needs min_lr below optim.lr",
            ),
            (&["optim.sched={name: WarmupPolicy, constant_steps: 2}"], "apply to CosineAnnealing only"),
            (&["optim.sched={name: Constant, warmup_steps: 2}"], "Constant has no warmup"),
        ];
        for (ov, want) in cases {
            let e = err_of(ov);
            assert!(e.starts_with("train.yaml: ") && e.contains(want), "{ov:?}: {e}");
        }
        // Boundary values that are fine.
        parse_with(&["trainer.gradient_clip_val=0"]).unwrap();
        parse_with(&["optim.sched={name: CosineAnnealing, warmup_steps: 10}"]).unwrap();
        parse_with(&["optim.sched={name: CosineAnnealing, warmup_steps: 10, max_steps: 20}"]).unwrap();
        parse_with(&["optim.sched={name: CosineAnnealing, min_lr: 2e-3}"]).unwrap();
    }

    #[test]
    fn overrides() {
        let c =
            parse_with(&["trainer.max_steps=3", "optim.betas=[0.9, 0.95]", "trainer.save_every_n_steps=2"])
                .unwrap();
        assert_eq!(c.trainer.max_steps, 3);
        assert_eq!(c.optim.betas, [0.9, 0.95]);
        assert!(!c.trainer.save_due(1) && c.trainer.save_due(2) && c.trainer.save_due(3));
        let c = parse_with(&["data.image_folder=/abs/images"]).unwrap();
        assert_eq!(c.data.image_folder.as_deref(), Some(Path::new("/abs/images")));
        let c = parse_with(&["trainer.save_every_n_steps=0"]).unwrap();
        assert!((1..10).all(|s| !c.trainer.save_due(s)) && c.trainer.save_due(10));
        for (bad, want) in [
            ("trainer.max_steps", "not key=value"),
            ("=3", "bad key"),
            ("trainer..x=1", "bad key"),
            ("trainer.max_steps.x=1", "under a non-mapping"),
            ("trainer.max_steps=[1", "not YAML"),
        ] {
            let e = err_of(&[bad]);
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn io_and_syntax_errors() {
        let e = TrainConfig::load(Path::new("/nonexistent/train.yaml")).unwrap_err().to_string();
        assert!(e.starts_with("/nonexistent/train.yaml: "), "{e}");
        let e = parse("model: [").unwrap_err().to_string();
        assert!(e.starts_with("train.yaml: "), "{e}");
        let e = parse("").unwrap_err().to_string();
        assert!(e.starts_with("train.yaml: "), "{e}");
    }
}
