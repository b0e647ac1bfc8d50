//! `shardsmith convert`, `reshard` and `plan`: build the target checkpoint from headers (a pure
//! function of the source), print it as the plan, or stream it to disk.

use super::inspect;
use anyhow::{bail, Context, Result};
use shardsmith_converters::convert::llama::{self, NemoTarget};
use shardsmith_converters::formats::{self, hf_dir, nemo};
use shardsmith_converters::names::llama::NemoDialect;
use shardsmith_converters::{Checkpoint, DType, Flavour, ModelConfig};
use std::path::Path;

/// Where a conversion writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TargetKind {
    /// A `.nemo` archive.
    Nemo,
    /// A HuggingFace model directory.
    Hf,
}

/// Everything `convert` and `reshard` take besides the paths.
#[derive(Clone, Debug)]
pub struct Options {
    /// Target container; inferred from the destination name when absent.
    pub to: Option<TargetKind>,
    /// Tensor-parallel size of a `.nemo` target.
    pub tp: usize,
    /// Pipeline-parallel size of a `.nemo` target.
    pub pp: usize,
    /// NeMo key dialect (`None`: mcore for new files, the source's when resharding).
    pub layout: Option<NemoDialect>,
    /// Cast floats on the way.
    pub dtype: Option<DType>,
    /// HF weight files.
    pub weights: hf_dir::WeightFormat,
    /// HF shard size cap in bytes.
    pub max_shard_bytes: u64,
    /// Vocabulary to keep when exporting (default: the tokenizer's).
    pub vocab: Option<usize>,
    /// SentencePiece model to register (default: the source's `tokenizer.model`).
    pub tokenizer: Option<std::path::PathBuf>,
    /// Write a gzip tar (`.nemo`).
    pub gzip: bool,
    /// Write an extracted `.nemo` directory.
    pub extracted: bool,
    /// Print the plan only.
    pub dry_run: bool,
    /// Plan as JSON.
    pub json: bool,
    /// Replace an existing destination.
    pub force: bool,
}

fn is_nemo(c: &Checkpoint) -> bool {
    matches!(c.meta.flavour, Flavour::Nemo { .. })
}

/// Build the target checkpoint (headers only).
pub fn build_target(src: &Checkpoint, dst: &Path, o: &Options) -> Result<(Checkpoint, TargetKind)> {
    let to = o.to.unwrap_or(if dst.extension().is_some_and(|e| e == "nemo") || o.extracted && is_nemo(src) {
        TargetKind::Nemo
    } else {
        TargetKind::Hf
    });
    let target = match (is_nemo(src), to) {
        (false, TargetKind::Nemo) => {
            // Say what the model is before asking for a tokenizer (headers only; cheap).
            llama::from_hf(src)?;
            let tokenizer = match &o.tokenizer {
                Some(p) => Some(shardsmith_converters::Artifact {
                    name: "tokenizer.model".into(),
                    source: shardsmith_converters::ByteSource::owned(
                        std::fs::read(p).with_context(|| format!("reading tokenizer {}", p.display()))?,
                    ),
                }),
                None => src.meta.artifacts.iter().find(|a| a.name == "tokenizer.model").cloned(),
            };
            if tokenizer.is_none() {
                bail!(
                    "{}: no tokenizer.model (NeMo LLaMA needs a SentencePiece tokenizer); pass --tokenizer PATH",
                    src.meta.path.display()
                );
            }
            let t = NemoTarget {
                dialect: o.layout.unwrap_or(NemoDialect::Mcore),
                tp: o.tp,
                pp: o.pp,
                dtype: o.dtype,
            };
            llama::hf_to_nemo(src, &t, tokenizer.as_ref())?
        }
        (true, TargetKind::Nemo) => llama::reshard_nemo(src, o.tp, o.pp, o.layout, o.dtype)?,
        (true, TargetKind::Hf) => llama::nemo_to_hf(src, o.vocab, o.dtype)?,
        (false, TargetKind::Hf) => {
            let c = llama::from_hf(src)?;
            let mut out = Checkpoint::single(src.meta.clone(), llama::cast_all(&c.tensors, o.dtype)?);
            if let (Some(d), Some(ModelConfig::HfJson(_))) = (o.dtype, &src.meta.config) {
                out.meta.config = Some(ModelConfig::HfJson(c.hparams.hf_config(d)));
            }
            out
        }
    };
    Ok((target, to))
}

/// Print the plan: target files, per-rank tensors, shapes, bytes and vocabulary padding.
pub fn print_plan(target: &Checkpoint, to: TargetKind, dst: &Path, json: bool) -> Result<()> {
    let report = inspect::report(target, None)?;
    if json {
        let v = serde_json::json!({ "destination": dst, "target": format!("{to:?}").to_lowercase(), "plan": report });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "plan: write {} as {}",
        dst.display(),
        if to == TargetKind::Nemo { ".nemo" } else { "HF directory" }
    );
    if let Some(ModelConfig::NemoYaml(cfg)) = &target.meta.config {
        let a = &report.architecture;
        if let (Some(v), Some(p)) = (a.vocab, a.padded_vocab) {
            println!(
                "vocab: {v} tokenizer rows, padded to {p} (make_vocab_size_divisible_by {} × tp {}): {} zero rows",
                cfg.get_usize("make_vocab_size_divisible_by").unwrap_or(1),
                target.meta.parallel.tp,
                p.saturating_sub(v)
            );
        }
    }
    print!("{}", inspect::render(&report));
    Ok(())
}

/// Write `target` to `dst`.
pub fn write_target(target: &Checkpoint, to: TargetKind, dst: &Path, o: &Options) -> Result<()> {
    match to {
        TargetKind::Nemo => {
            let opts =
                nemo::WriteOptions { layout: None, gzip: o.gzip, extracted: o.extracted, overwrite: o.force };
            nemo::write(target, dst, &opts)?;
        }
        TargetKind::Hf => {
            let opts = hf_dir::WriteOptions {
                weights: o.weights,
                max_shard_bytes: o.max_shard_bytes,
                overwrite: o.force,
            };
            hf_dir::write(target, dst, &opts)?;
        }
    }
    Ok(())
}

/// The `convert` / `reshard` command.
pub fn run(src: &Path, dst: &Path, o: &Options) -> Result<()> {
    let started = std::time::Instant::now();
    let source = formats::open(&crate::hub::resolve(src)?)?;
    let (target, to) = build_target(&source, dst, o)?;
    if o.dry_run {
        return print_plan(&target, to, dst, o.json);
    }
    {
        let _bar = crate::progress::WriteProgress::start(target.total_bytes() as u64, "writing");
        write_target(&target, to, dst, o)?;
    }
    let bytes = target.total_bytes();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "wrote {} ({} tensors, {:.2} GiB in {:.1} s, {:.0} MiB/s)",
        dst.display(),
        target.tensor_count(),
        bytes as f64 / (1u64 << 30) as f64,
        secs,
        bytes as f64 / (1u64 << 20) as f64 / secs.max(1e-9)
    );
    Ok(())
}
