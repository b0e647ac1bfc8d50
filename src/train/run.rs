//! The training loop behind `shardsmith train --config train.yaml [--resume | --force]`.
//!
//! One optimizer step = `global_batch_size / micro_batch_size` micro-batches; the step loss is
//! the mean of the micro-batch losses (each the mean over its labelled tokens) and the gradient
//! the mean of theirs, then clipping, then AdamW at the scheduled learning rate. Every
//! `save_every_n_steps` and at the end a checkpoint directory is written atomically under
//! `output.dir/checkpoints/step-NNNNNN/`: the model (llava-hf and/or NeVA `.nemo`), the optimizer
//! state with the f32 master weights, and the data loader's position — so `--resume` continues
//! with exactly the losses an uninterrupted run would have had.

use crate::infer::image::PreprocessConfig;
use crate::infer::template::{Flavour, ImageTokens as PromptImageTokens};
use crate::infer::tokenizer::Tokenizer;
use crate::models::neva::ImageTokens;
use crate::train::config::{LoraConfig, SaveFormat, Stage as ConfigStage, TrainConfig};
use crate::train::data::{
    legacy_tokenizer, DataLoader, Dataset, DatasetConfig, ExampleConfig, LoaderOptions, LoaderState,
};
use crate::train::metrics::{MetricsLog, StepRecord, TrainProgress};
use crate::train::model::{Batch, LoraSpec, Stage, TrainModel};
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::schedule::LrSchedule;
use crate::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use shardsmith_converters::checkpoint::{ByteSource, TensorEntry};
use shardsmith_converters::convert::llava::{self, CanonicalLlava, ImageTokenScheme};
use shardsmith_converters::convert::neva::{self, NevaTarget, VisionPlacement};
use shardsmith_converters::formats::{hf_dir, nemo};
use shardsmith_converters::names::llama::NemoDialect;
use shardsmith_converters::{Checkpoint, DType as FileDType, ModelConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Options of one `train` invocation.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Continue from the latest checkpoint under `output.dir` (or this one).
    pub resume: Option<Option<PathBuf>>,
    /// Hydra-style `key=value` overrides of the config.
    pub overrides: Vec<String>,
    /// A fresh run in an `output.dir` that holds an earlier run removes that run's checkpoints,
    /// metrics and plot first (without it such a run is refused).
    pub force: bool,
}

/// What a finished run reports.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// Optimizer steps completed (in total, across resumes).
    pub steps: u64,
    /// The step losses of this invocation.
    pub losses: Vec<f64>,
    /// The last checkpoint written.
    pub checkpoint: PathBuf,
    /// `metrics.jsonl`.
    pub metrics: PathBuf,
    /// `loss.png`.
    pub plot: PathBuf,
    /// Records skipped as bad (with `on_bad_record: skip`).
    pub skipped_records: usize,
}

/// Saved next to the weights: where the run was.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct TrainerState {
    step: u64,
    consumed_samples: u64,
    elapsed_s: f64,
    loader: LoaderState,
    stage: String,
}

/// The checkpoint being trained, in canonical form, with what the data pipeline needs.
struct Source {
    canonical: CanonicalLlava,
    tokenizer: Tokenizer,
    flavour: Flavour,
    legacy_tokenizer: bool,
}

fn open_source(path: &Path) -> Result<Source> {
    let ckpt = shardsmith_converters::formats::open(path)?;
    match &ckpt.meta.config {
        Some(ModelConfig::NemoYaml(cfg)) if neva::is_neva(cfg) => {
            let canonical = crate::models::tower::with_tower(&ckpt, None)?;
            let bytes = canonical
                .tokenizer
                .as_ref()
                .ok_or_else(|| Error::config(path, "the NeVA checkpoint has no tokenizer model"))?
                .bytes()?;
            let tokenizer = Tokenizer::from_sentencepiece_bytes(&bytes, path.join("tokenizer.model"))?;
            Ok(Source { canonical, tokenizer, flavour: Flavour::Nemo, legacy_tokenizer: true })
        }
        Some(ModelConfig::HfJson(cfg)) if llava::is_llava_hf(cfg) => {
            let canonical = llava::from_llava_hf(&ckpt)?;
            Ok(Source {
                canonical,
                tokenizer: Tokenizer::from_dir(path)?,
                flavour: Flavour::Llava,
                legacy_tokenizer: legacy_tokenizer(path)?,
            })
        }
        _ => Err(Error::config(
            path,
            "the trainer trains NeVA (.nemo) or llava-hf checkpoints; build one with `shardsmith assemble` or `convert`",
        )),
    }
}

fn stage_of(cfg: &TrainConfig) -> Result<Stage> {
    Ok(match cfg.stage() {
        ConfigStage::Stage1 => Stage::Projector,
        ConfigStage::Stage2 => Stage::ProjectorAndLlm,
        ConfigStage::Lora => {
            let lora = cfg.peft.lora().ok_or_else(|| Error::Usage("peft: lora settings missing".into()))?;
            Stage::Lora(LoraSpec {
                rank: lora.adapter_dim,
                alpha: lora.scale() * lora.adapter_dim as f64,
                targets: lora.targets()?.into_iter().map(String::from).collect(),
                seed: cfg.trainer.seed,
            })
        }
    })
}

/// The latest `step-*` directory under `dir/checkpoints`.
fn latest_checkpoint(dir: &Path) -> Option<PathBuf> {
    let mut steps: Vec<PathBuf> = std::fs::read_dir(dir.join("checkpoints"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("step-")))
        .filter(|p| p.join("trainer_state.json").is_file())
        .collect();
    steps.sort();
    steps.pop()
}

/// Run the training a config describes.
pub fn run(config: &Path, o: &RunOptions) -> Result<Summary> {
    let cfg = TrainConfig::load_with_overrides(config, &o.overrides)?;
    if cfg.model.tp != 1 {
        return Err(Error::config(
            config,
            format!(
                "model.tp is {}; training runs at tp=1 (checkpoints are written at output.nemo_tp)",
                cfg.model.tp
            ),
        ));
    }
    // Before anything loads: a fresh run into an earlier run's directory is refused or cleared.
    let out_dir = cfg.output.dir.clone();
    if o.resume.is_none() {
        clear_earlier_run(&out_dir, &cfg.model.checkpoint, o.force)?;
    }
    let src = open_source(&cfg.model.checkpoint)?;
    let c = &src.canonical;
    if cfg.output.save_formats.contains(&SaveFormat::Nemo) {
        // Checked now, not at the first save after hours of training.
        let tp = cfg.output.nemo_tp;
        shardsmith_converters::convert::llama::check_parallelism(
            &c.llm.hparams,
            NemoDialect::Mcore,
            tp,
            1,
            config,
        )
        .map_err(|e| match e {
            shardsmith_converters::Error::Invalid { detail, .. } => {
                Error::config(config, format!("output.nemo_tp: {detail}"))
            }
            other => other.into(),
        })?;
    }
    if let Some(kind) = cfg.mm_cfg.projector_kind()? {
        if kind.to_string() != c.projector_type {
            return Err(Error::config(
                config,
                format!(
                    "mm_cfg.mm_mlp_adapter_type is {kind} but {} has a {} projector",
                    cfg.model.checkpoint.display(),
                    c.projector_type
                ),
            ));
        }
    }
    // Every format the checkpoints are saved in is built once now, from the starting weights:
    // one the model cannot take (llava-hf with a linear projector) fails here, not after training.
    model_outputs(&cfg, &src, c).map_err(|e| Error::config(config, format!("output.save_formats: {e}")))?;
    let stage = stage_of(&cfg)?;
    let device = crate::models::parse_device(&cfg.trainer.device)
        .map_err(|e| Error::config(config, format!("trainer.device: {e}")))?;
    let mut model =
        TrainModel::from_llava_on(c, stage.clone(), cfg.model.precision.compute_dtype(), &device)?;

    // Data.
    let n = c.image_token_len().ok_or_else(|| Error::config(&c.origin, "cannot size the image span"))?;
    let prompt_images = match crate::models::image_tokens_of(c)? {
        ImageTokens::Repeated { id } => PromptImageTokens::LlavaHf { image_token_id: id, n },
        ImageTokens::Placeholder => unreachable!("image_tokens_of refuses original LLaVA"),
        ImageTokens::NevaSpan { keep_markers, .. } => {
            PromptImageTokens::Neva { n, use_im_start_end: keep_markers }
        }
    };
    let preprocess = match &c.preprocessor {
        Some(bytes) => PreprocessConfig::from_json(
            &serde_json::from_slice(&bytes.bytes()?).map_err(|e| Error::config(&c.origin, e.to_string()))?,
            &c.origin,
        )?,
        None => PreprocessConfig::clip_with_size(c.image_size().unwrap_or(336) as u32),
    };
    if let Some(side) = c.image_size() {
        preprocess.check_tower_size(side as u32, cfg.data.aspect()?, &c.origin)?;
    }
    let pad_id = match c.image_tokens {
        ImageTokenScheme::Repeated { pad: Some(p), .. } => p,
        _ => src.tokenizer.unk_id().unwrap_or(0),
    };
    let dataset = Dataset::open(
        DatasetConfig {
            data_path: cfg.data.data_path.clone(),
            image_folder: cfg.data.image_folder.clone(),
            example: ExampleConfig {
                template: cfg.data.template()?,
                flavour: src.flavour,
                image_tokens: prompt_images,
                max_len: cfg.data.max_seq_length,
                legacy_tokenizer: src.legacy_tokenizer,
            },
            preprocess,
            aspect: cfg.data.aspect()?,
            on_bad_record: cfg.data.on_bad_record,
            check_images: true,
        },
        src.tokenizer.clone(),
    )?;
    let report = dataset.report().clone();
    let mut loader = DataLoader::new(
        Arc::new(dataset),
        LoaderOptions {
            shuffle: cfg.data.shuffle,
            workers: cfg.data.num_workers,
            pad_id,
            ..LoaderOptions::new(cfg.trainer.seed)
        },
    )?;

    // Optimizer, schedule, output.
    let mut opt = AdamW::new(model.params().to_vec(), AdamWConfig::from_config(&cfg.optim))?;
    let sched = LrSchedule::from_config(&cfg);
    std::fs::create_dir_all(out_dir.join("checkpoints")).map_err(|e| Error::io(&out_dir, e))?;
    let metrics_path = out_dir.join("metrics.jsonl");
    let (mut step, mut consumed, mut elapsed0) = (0u64, 0u64, 0f64);
    let mut log = match &o.resume {
        Some(which) => {
            let dir = match which {
                Some(d) => d.clone(),
                None => latest_checkpoint(&out_dir).ok_or_else(|| {
                    Error::config(
                        &out_dir,
                        "--resume: no checkpoint (checkpoints/step-*/trainer_state.json) here",
                    )
                })?,
            };
            let state_path = dir.join("trainer_state.json");
            let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
            let state: TrainerState =
                serde_json::from_str(&text).map_err(|e| Error::config(&state_path, e.to_string()))?;
            if state.stage != cfg.stage().name() {
                return Err(Error::config(
                    &state_path,
                    format!(
                        "checkpoint is from a {} run, the config trains {}",
                        state.stage,
                        cfg.stage().name()
                    ),
                ));
            }
            opt.load_state(&dir.join("optimizer.safetensors"))?;
            loader.restore(state.loader)?;
            (step, consumed, elapsed0) = (state.step, state.consumed_samples, state.elapsed_s);
            MetricsLog::resume(&metrics_path, step)?.0
        }
        None => MetricsLog::create(&metrics_path)?,
    };

    let accumulation = cfg.trainer.accumulation_steps();
    let micro = cfg.trainer.micro_batch_size;
    let progress = TrainProgress::new(cfg.trainer.max_steps, step);
    progress.println(&format!(
        "training {} ({}, {} trainable tensors, {} parameters) on {} samples ({} skipped); {} steps of {} x {}",
        cfg.model.checkpoint.display(),
        cfg.stage().name(),
        model.params().len(),
        model.params().iter().map(|(_, v)| v.elem_count()).sum::<usize>(),
        report.usable,
        report.bad.len(),
        cfg.trainer.max_steps,
        accumulation,
        micro
    ));
    let start = Instant::now();
    let mut losses = Vec::new();
    let mut last_checkpoint = None;
    let mut skipped = report.bad.len();
    while step < cfg.trainer.max_steps {
        let t0 = Instant::now();
        let lr = sched.lr(step);
        let mut grads = GradStore::default();
        let (mut loss, mut tokens) = (0.0, 0usize);
        for _ in 0..accumulation {
            let b = loader.next_batch(micro)?;
            tokens += b.lengths.iter().sum::<usize>();
            let batch = Batch { ids: b.ids, labels: b.labels, pixel_values: b.pixel_values };
            let out = model.forward_backward(&batch, cfg.model.activations_checkpointing)?;
            loss += out.loss / accumulation as f64;
            model.collect(&mut grads, out.grads)?;
        }
        skipped += loader.take_skipped().len();
        model.scale_grads(&mut grads, 1.0 / accumulation as f64)?;
        let grad_norm = opt.clip_grad_norm(&grads, cfg.trainer.grad_clip())?;
        let mut extra = serde_json::Map::new();
        if grad_norm.is_finite() && loss.is_finite() {
            opt.step(&grads, lr)?;
        } else {
            // A non-finite gradient would poison every weight: skip the update, say so.
            extra.insert("skipped_update".into(), true.into());
            progress.println(&format!("step {}: non-finite loss or gradient norm; update skipped", step + 1));
        }
        step += 1;
        consumed += (accumulation * micro) as u64;
        losses.push(loss);
        let rec = StepRecord {
            step,
            loss,
            lr,
            grad_norm,
            tokens: tokens as u64,
            consumed_samples: consumed,
            tokens_per_s: tokens as f64 / t0.elapsed().as_secs_f64(),
            elapsed_s: elapsed0 + start.elapsed().as_secs_f64(),
            extra,
        };
        if step % cfg.trainer.log_every_n_steps.max(1) == 0 || step == cfg.trainer.max_steps {
            log.append(&rec)?;
        }
        progress.update(&rec);
        if cfg.trainer.save_due(step) || step == cfg.trainer.max_steps {
            let state = TrainerState {
                step,
                consumed_samples: consumed,
                elapsed_s: rec.elapsed_s,
                loader: loader.state(),
                stage: cfg.stage().name().into(),
            };
            last_checkpoint = Some(save(&cfg, &src, &model, &opt, &state)?);
        }
    }
    progress.finish();
    let plot = out_dir.join("loss.png");
    crate::train::plot::plot_loss_jsonl(&metrics_path, &plot, &format!("{} loss", cfg.stage().name()))?;
    let checkpoint = match last_checkpoint.or_else(|| latest_checkpoint(&out_dir)) {
        Some(c) => c,
        None => return Err(Error::config(&out_dir, "no checkpoint was written (max_steps is 0?)")),
    };
    Ok(Summary { steps: step, losses, checkpoint, metrics: metrics_path, plot, skipped_records: skipped })
}

/// A candle tensor as a stored entry of `dtype` (owned little-endian bytes), same shape.
fn entry(t: &Tensor, dtype: FileDType, origin: &Path) -> Result<TensorEntry> {
    let shape = t.dims().to_vec();
    let t = t.to_device(&Device::Cpu)?.flatten_all()?;
    let bytes: Vec<u8> = match dtype {
        FileDType::F32 => {
            t.to_dtype(DType::F32)?.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect()
        }
        FileDType::BF16 => {
            t.to_dtype(DType::BF16)?.to_vec1::<half::bf16>()?.iter().flat_map(|v| v.to_le_bytes()).collect()
        }
        FileDType::F16 => {
            t.to_dtype(DType::F16)?.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_le_bytes()).collect()
        }
        other => return Err(Error::Usage(format!("cannot save a trained tensor as {other}"))),
    };
    Ok(TensorEntry::new(dtype, shape, ByteSource::owned(bytes), Arc::from(origin)))
}

/// The source checkpoint with the trained values written in (LoRA merged into the weights).
fn trained_canonical(src: &Source, model: &TrainModel) -> Result<CanonicalLlava> {
    let mut c = src.canonical.clone();
    let trained = model.trained();
    let lora_scale = model.lora_scale();
    for (name, value) in &trained {
        if name.ends_with(".lora_A.weight") || name.ends_with(".lora_B.weight") {
            continue;
        }
        let (map, what) = if name.starts_with("mm_projector.") {
            (&mut c.projector, "projector")
        } else {
            (&mut c.llm.tensors, "language model")
        };
        let old = map.get(name).ok_or_else(|| {
            Error::Usage(format!("trained tensor '{name}' is not in the {what} being saved"))
        })?;
        if old.shape.as_slice() != value.dims() {
            return Err(Error::Usage(format!(
                "trained tensor '{name}' has shape {:?}, the checkpoint's {:?}",
                value.dims(),
                old.shape
            )));
        }
        let e = entry(value, old.dtype, &c.origin)?;
        map.insert(name.clone(), e);
    }
    // LoRA: W' = W + (alpha / r) · B A, in f32, rounded once to W's dtype.
    for (name, a) in trained.iter().filter(|(n, _)| n.ends_with(".lora_A.weight")) {
        let base = name.trim_end_matches(".lora_A.weight");
        let b_name = format!("{base}.lora_B.weight");
        let (_, b) = trained
            .iter()
            .find(|(n, _)| *n == b_name)
            .ok_or_else(|| Error::Usage(format!("LoRA '{name}' has no lora_B")))?;
        let w_name = format!("{base}.weight");
        let old = c
            .llm
            .tensors
            .get(&w_name)
            .ok_or_else(|| Error::Usage(format!("LoRA target '{w_name}' is not in the model")))?;
        let bytes = old.bytes(&w_name)?;
        let stored = crate::weights::candle_dtype(old.dtype)
            .ok_or_else(|| Error::Usage(format!("'{w_name}' has dtype {}", old.dtype)))?;
        let w = Tensor::from_raw_buffer(&bytes, stored, &old.shape, &Device::Cpu)?.to_dtype(DType::F32)?;
        let merged = (w + (b.matmul(a)? * lora_scale.unwrap_or(1.0))?)?;
        let e = entry(&merged, old.dtype, &c.origin)?;
        c.llm.tensors.insert(w_name, e);
    }
    Ok(c)
}

/// What a run writes into `output.dir` (what `--force` removes).
const RUN_FILES: [&str; 3] = ["checkpoints", "metrics.jsonl", "loss.png"];

/// A fresh run into a directory that holds an earlier run's checkpoints would mix the two: the
/// metrics log restarts, but the earlier `checkpoints/step-*` stay, and a later `--resume` takes
/// the latest step there, which may be the earlier run's. So such a directory is refused, or
/// with `force` the run files are removed first (nothing else in it is touched). A run that died
/// before its first checkpoint leaves none and does not count. `--force` never removes the
/// checkpoint being trained from.
fn clear_earlier_run(out_dir: &Path, source: &Path, force: bool) -> Result<()> {
    // What a later `--resume` would pick up is exactly the hazard.
    if latest_checkpoint(out_dir).is_none() {
        return Ok(());
    }
    let checkpoints = out_dir.join("checkpoints");
    if !force {
        return Err(Error::config(
            out_dir,
            "output.dir holds an earlier run's checkpoints: pass --resume to continue it, --force to \
             start afresh (its checkpoints, metrics.jsonl and loss.png are removed), or choose another \
             output.dir",
        ));
    }
    let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    if canonical(source).starts_with(canonical(&checkpoints)) {
        return Err(Error::config(
            source,
            format!(
                "model.checkpoint lies under {}, which --force would remove; train from a copy",
                checkpoints.display()
            ),
        ));
    }
    for p in RUN_FILES.iter().map(|f| out_dir.join(f)) {
        let removed = match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&p),
            Ok(_) => std::fs::remove_file(&p), // files, and a symlink itself (never its target)
            Err(_) => continue,
        };
        removed.map_err(|e| Error::io(&p, e))?;
    }
    Ok(())
}

/// The model in each of `output.save_formats` (headers; the bytes are written by the caller):
/// llava-hf as `convert model.nemo` would write it (a NeVA source's vocabulary changes undone,
/// so `hf/` and `model.nemo` hold the same model), NeVA at `output.nemo_tp` with the tower
/// bundled. Built once before training too, so a format the model cannot take is refused then.
fn model_outputs(
    cfg: &TrainConfig,
    src: &Source,
    c: &CanonicalLlava,
) -> Result<Vec<(SaveFormat, Checkpoint)>> {
    let mut out = Vec::new();
    for format in &cfg.output.save_formats {
        let ckpt = match format {
            SaveFormat::Hf => {
                let mut c = c.clone();
                if src.flavour == Flavour::Nemo {
                    neva::undo_neva_tokens(&mut c)?;
                }
                llava::to_llava_hf(&c, None)?
            }
            SaveFormat::Nemo => {
                let target = NevaTarget {
                    dialect: NemoDialect::Mcore,
                    tp: cfg.output.nemo_tp,
                    pp: 1,
                    dtype: None,
                    vision: VisionPlacement::Bundle,
                    template: None,
                    image_aspect_ratio: Some(cfg.data.image_aspect_ratio.clone()),
                    divisible_by: None,
                    source_format: None,
                };
                let mut c = c.clone();
                if c.template.is_none() {
                    c.template = shardsmith_converters::names::neva::Template::parse(&cfg.data.conv_template);
                }
                neva::to_neva(&c, &target)?
            }
        };
        out.push((*format, ckpt));
    }
    Ok(out)
}

/// The LoRA adapters as a PEFT adapter directory (`adapter_config.json`,
/// `adapter_model.safetensors` with `base_model.model.model.layers.N.….lora_A.weight` keys, the
/// layout of a PEFT `LlamaForCausalLM`, i.e. of the LLM `surgery extract --part llm` takes out),
/// which `shardsmith surgery merge-lora` and PEFT read.
/// The projector, trained beside them, is in the saved models.
fn write_peft_adapter(lora: &LoraConfig, model: &TrainModel, dir: &Path) -> Result<()> {
    let tensors: std::collections::HashMap<String, Tensor> = model
        .trained()
        .into_iter()
        .filter(|(n, _)| n.contains(".lora_"))
        .map(|(n, t)| (format!("base_model.model.{n}"), t))
        .collect();
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors"))?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        // The keys fit the bare LLaMA (`surgery extract CKPT --part llm`), not the multimodal
        // checkpoint trained from, so no base is named.
        "base_model_name_or_path": null,
        "r": lora.adapter_dim,
        "lora_alpha": lora.scale() * lora.adapter_dim as f64,
        "lora_dropout": lora.adapter_dropout,
        "target_modules": lora.targets()?,
        "use_rslora": false,
        "use_dora": false,
        "bias": "none",
        "fan_in_fan_out": false,
        "modules_to_save": null,
    });
    let text = serde_json::to_string_pretty(&config).map_err(|e| Error::Usage(e.to_string()))?;
    let path = dir.join("adapter_config.json");
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
}

/// Write `checkpoints/step-NNNNNN/` atomically: the model in the configured formats, the LoRA
/// adapters (if any), the optimizer state with the f32 master weights, and the trainer state.
fn save(
    cfg: &TrainConfig,
    src: &Source,
    model: &TrainModel,
    opt: &AdamW,
    state: &TrainerState,
) -> Result<PathBuf> {
    let final_dir = cfg.output.dir.join("checkpoints").join(format!("step-{:06}", state.step));
    let tmp = cfg.output.dir.join("checkpoints").join(format!(".step-{:06}.tmp", state.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let written = write_checkpoint_files(cfg, src, model, opt, state, &tmp);
    if let Err(e) = written {
        // Best effort: the error being returned is the one the user needs to see.
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    // A step saved before (a resumed run passing it again) is replaced only once the new one is
    // complete, and put back if the move fails.
    shardsmith_converters::atomic::commit_together(&[(tmp.clone(), final_dir.clone())]).inspect_err(
        |_| {
            shardsmith_converters::atomic::remove_any(&tmp);
        },
    )?;
    Ok(final_dir)
}

/// The files of one checkpoint, into the staging directory `tmp`.
fn write_checkpoint_files(
    cfg: &TrainConfig,
    src: &Source,
    model: &TrainModel,
    opt: &AdamW,
    state: &TrainerState,
    tmp: &Path,
) -> Result<()> {
    let c = trained_canonical(src, model)?;
    for (dest, ckpt) in model_outputs(cfg, src, &c)? {
        match dest {
            SaveFormat::Hf => {
                let o = hf_dir::WriteOptions { overwrite: true, ..hf_dir::WriteOptions::default() };
                hf_dir::write(&ckpt, &tmp.join("hf"), &o)?;
            }
            SaveFormat::Nemo => {
                let o = nemo::WriteOptions { layout: None, gzip: false, extracted: false, overwrite: true };
                nemo::write(&ckpt, &tmp.join("model.nemo"), &o)?;
            }
        }
    }
    if let Some(lora) = cfg.peft.lora() {
        write_peft_adapter(lora, model, &tmp.join("lora_adapter"))?;
    }
    opt.save_state(&tmp.join("optimizer.safetensors"), true)?;
    let text = serde_json::to_string_pretty(state).map_err(|e| Error::Usage(e.to_string()))?;
    std::fs::write(tmp.join("trainer_state.json"), text).map_err(|e| Error::io(tmp, e))?;
    Ok(())
}
