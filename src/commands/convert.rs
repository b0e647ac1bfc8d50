//! `shardsmith convert`, `reshard` and `plan`: build the target checkpoint from headers (a pure
//! function of the source), print it as the plan, or stream it to disk.
//!
//! Multimodal sources (NeVA `.nemo`, llava-hf, original LLaVA) go through the canonical bundle
//! (`convert::llava`, `convert::neva`); a conversion may then write two outputs, the vision tower
//! as an HF CLIP directory beside the main one, and every destination is checked before the first
//! byte is written.

use super::inspect;
use anyhow::{bail, Result};
use shardsmith_converters::atomic;
use shardsmith_converters::convert::clip::{self, ClipVision};
use shardsmith_converters::convert::llama::{self, NemoTarget};
use shardsmith_converters::convert::llava::{self, CanonicalLlava, VisionSource};
use shardsmith_converters::convert::neva::{self, NevaTarget, VisionPlacement};
use shardsmith_converters::convert::sentencepiece;
use shardsmith_converters::formats::{self, hf_dir, nemo};
use shardsmith_converters::names::llama::NemoDialect;
use shardsmith_converters::names::neva::Template;
use shardsmith_converters::{Checkpoint, DType, Flavour, ModelConfig};
use std::path::{Path, PathBuf};

/// Where a conversion writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TargetKind {
    /// A `.nemo` archive (NeVA for multimodal sources).
    Nemo,
    /// A HuggingFace model directory (llava-hf for multimodal sources).
    Hf,
    /// An original LLaVA (liuhaotian) directory; multimodal sources only.
    Llava,
}

/// The backend of a distributed-checkpoint `.nemo` (`--dist-ckpt`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DistFormat {
    /// Zarr v2 arrays, one chunk file per layer × TP fragment (Megatron-core's zarr strategy;
    /// what NeMo 1.21–1.23 writes).
    Zarr,
    /// torch.distributed.checkpoint `.metadata` + `.distcp`, the same chunks (NeMo from 2024-08).
    #[value(name = "torch_dist")]
    TorchDist,
}

impl DistFormat {
    /// The writer's backend.
    pub fn backend(self) -> nemo::DistBackend {
        match self {
            DistFormat::Zarr => nemo::DistBackend::Zarr,
            DistFormat::TorchDist => nemo::DistBackend::TorchDist,
        }
    }

    /// The name Megatron's `metadata.json` gives the backend.
    pub fn name(self) -> &'static str {
        match self {
            DistFormat::Zarr => "zarr",
            DistFormat::TorchDist => "torch_dist",
        }
    }
}

/// What `--vision` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VisionArg {
    /// Put the tower's weights inside the `.nemo` (`freeze: false`).
    Bundle,
    /// Write the tower as an HF CLIP directory beside the output and reference it (`freeze: true`).
    Separate,
    /// Use this HF CLIP directory as the tower, bundled into a `.nemo` output.
    Path(PathBuf),
}

impl VisionArg {
    /// `bundle`, `separate`, or a path.
    pub fn parse(s: &str) -> Self {
        match s {
            "bundle" => VisionArg::Bundle,
            "separate" => VisionArg::Separate,
            p => VisionArg::Path(PathBuf::from(p)),
        }
    }
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
    /// Write the `.nemo` weights as a distributed checkpoint of this backend.
    pub dist_ckpt: Option<DistFormat>,
    /// Print the plan only.
    pub dry_run: bool,
    /// Plan as JSON.
    pub json: bool,
    /// Replace an existing destination.
    pub force: bool,
    /// Vision tower placement / source (multimodal only).
    pub vision: Option<VisionArg>,
    /// Conversation template (multimodal only).
    pub template: Option<Template>,
}

fn is_nemo(c: &Checkpoint) -> bool {
    matches!(c.meta.flavour, Flavour::Nemo { .. })
}

/// The `--tokenizer` SentencePiece model as the `tokenizer.model` artifact, checked to parse
/// and to fit the `rows` of the embedding it will index (a larger one writes a checkpoint that
/// cannot be read back).
fn given_tokenizer(o: &Options, rows: usize) -> Result<Option<shardsmith_converters::Artifact>> {
    let Some(path) = o.tokenizer.as_deref() else { return Ok(None) };
    let source = sentencepiece::read_model_file(path)?;
    let pieces = sentencepiece::SentencePieceModel::parse(source.bytes()?.into_owned(), path)?.len();
    if pieces > rows {
        bail!(
            "--tokenizer {}: {pieces} pieces, but the model's embedding has {rows} rows; it is another model's tokenizer",
            path.display()
        );
    }
    Ok(Some(shardsmith_converters::Artifact { name: "tokenizer.model".into(), source }))
}

/// The container to write: `--to`, else a `.nemo` for a `.nemo` destination (or `--extracted`
/// from a `.nemo`), else HF. Options that only shape another container are refused here rather
/// than silently dropped.
fn target_kind(src: &Checkpoint, dst: &Path, o: &Options) -> Result<TargetKind> {
    let to = o.to.unwrap_or(if dst.extension().is_some_and(|e| e == "nemo") || o.extracted && is_nemo(src) {
        TargetKind::Nemo
    } else {
        TargetKind::Hf
    });
    let nemo = to == TargetKind::Nemo;
    // An HF copy keeps its own vocabulary and tokenizer files; a .nemo's vocabulary follows its
    // tokenizer, and a reshard keeps the tokenizer it has.
    let hf_copy = !is_nemo(src) && to == TargetKind::Hf && !neva::is_multimodal(src);
    let flags = [
        (!nemo && o.tp != 1, "--tp"),
        (!nemo && o.pp != 1, "--pp"),
        (!nemo && o.layout.is_some(), "--layout"),
        (!nemo && o.gzip, "--gzip"),
        (!nemo && o.extracted, "--extracted"),
        ((nemo || hf_copy) && o.vocab.is_some(), "--vocab-size"),
        ((nemo && is_nemo(src) || hf_copy) && o.tokenizer.is_some(), "--tokenizer"),
        (
            to == TargetKind::Hf && matches!(o.vision, Some(VisionArg::Bundle | VisionArg::Separate)),
            "--vision bundle|separate (a llava-hf directory always holds its tower)",
        ),
    ];
    let unused: Vec<&str> = flags.iter().filter(|(refused, _)| *refused).map(|(_, flag)| *flag).collect();
    if !unused.is_empty() {
        let (what, why) = match to {
            TargetKind::Nemo => (
                "a .nemo",
                "a .nemo's vocabulary follows its tokenizer, and a reshard keeps the tokenizer it has"
                    .to_string(),
            ),
            TargetKind::Hf | TargetKind::Llava => (
                if to == TargetKind::Hf { "an HF directory" } else { "a LLaVA directory" },
                format!("the destination {} decides the container; --to nemo writes a .nemo", dst.display()),
            ),
        };
        bail!(
            "{} {} when writing {what} from {} ({why})",
            unused.join(", "),
            if unused.len() == 1 { "does not apply" } else { "do not apply" },
            src.meta.path.display(),
        );
    }
    Ok(to)
}

/// Build the target checkpoint (headers only).
pub fn build_target(src: &Checkpoint, dst: &Path, o: &Options) -> Result<(Checkpoint, TargetKind)> {
    let to = target_kind(src, dst, o)?;
    let target = match (is_nemo(src), to) {
        (false, TargetKind::Nemo) => {
            // Say what the model is before asking for a tokenizer (headers only; cheap).
            let rows = llama::from_hf(src)?.hparams.vocab;
            let tokenizer = match given_tokenizer(o, rows)? {
                Some(given) => Some(given),
                None => match src.meta.artifacts.iter().find(|a| a.name == "tokenizer.model") {
                    Some(a) => Some(shardsmith_converters::convert::tokenizer::sentencepiece_with_hf_added(
                        src,
                        a,
                        rows,
                        &[],
                    )?),
                    None => None,
                },
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
        // The reader checks the tokenizer against the stored rows (it may be the only tokenizer).
        (true, TargetKind::Hf) => {
            llama::nemo_to_hf(src, o.vocab, o.dtype, given_tokenizer(o, usize::MAX)?.as_ref())?
        }
        (_, TargetKind::Llava) => {
            bail!("--to llava needs a multimodal source (NeVA .nemo, llava-hf or LLaVA)")
        }
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

/// What a plan says of a destination already there: the real run refuses it, or replaces it
/// with `--force`. Empty when there is none.
pub fn existing_destination(dst: &Path, force: bool) -> &'static str {
    match (dst.exists(), force) {
        (false, _) => "",
        (true, false) => " (it exists: the real run would refuse without --force)",
        (true, true) => " (it exists: --force replaces it)",
    }
}

/// The plan of one output as JSON: destination, target kind, the inspect report, and the
/// arrays of a distributed checkpoint.
fn plan_json(
    target: &Checkpoint,
    to: TargetKind,
    dst: &Path,
    dist: Option<(&nemo::DistWeights, DistFormat)>,
) -> Result<serde_json::Value> {
    let report = inspect::report(target, None)?;
    let exists = dst.exists();
    let mut v = serde_json::json!({
        "destination": dst, "destination_exists": exists, "target": format!("{to:?}").to_lowercase(),
        "plan": report,
    });
    if let Some((w, format)) = dist {
        let arrays: Vec<_> = w
                .arrays
                .iter()
                .map(|a| {
                    serde_json::json!({
                        "key": a.key, "dtype": a.dtype.to_string(), "shape": a.shape, "chunk": a.chunk,
                        "chunk_files": a.chunks.len(), "bytes": a.chunks.iter().map(|c| c.nbytes()).sum::<usize>(),
                    })
                })
                .collect();
        v["distributed"] =
            serde_json::json!({ "backend": format.name(), "arrays": arrays, "objects": w.objects });
    }
    Ok(v)
}

/// Print the plan: target files, per-rank tensors, shapes, bytes and vocabulary padding.
fn print_plan(
    target: &Checkpoint,
    to: TargetKind,
    dst: &Path,
    force: bool,
    dist: Option<(&nemo::DistWeights, DistFormat)>,
) -> Result<()> {
    let report = inspect::report(target, None)?;
    let what = match to {
        TargetKind::Nemo => ".nemo",
        TargetKind::Hf => "HF directory",
        TargetKind::Llava => "LLaVA directory",
    };
    println!("plan: write {} as {what}{}", dst.display(), existing_destination(dst, force));
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
    match dist {
        None => print!("{}", inspect::render(&report)),
        Some((w, format)) => print!("{}", render_dist(w, format)),
    }
    Ok(())
}

/// The arrays and objects of a distributed checkpoint to write, as a table.
fn render_dist(w: &nemo::DistWeights, format: DistFormat) -> String {
    use std::fmt::Write;
    let files: usize = w.arrays.iter().map(|a| a.chunks.len()).sum();
    let mut out = format!(
        "weights       model_weights/ {} distributed checkpoint: {} arrays in {files} chunks, {} extra-state objects\n\n",
        format.name(),
        w.arrays.len(),
        w.objects.len()
    );
    let width = w.arrays.iter().map(|a| a.key.len()).max().unwrap_or(4).max(4);
    let _ = writeln!(
        out,
        "{:<width$}  dtype  {:<16} {:<16} {:>5} {:>14}",
        "name", "shape", "chunk", "count", "bytes"
    );
    let mut total = 0;
    for a in &w.arrays {
        let bytes: usize = a.chunks.iter().map(|c| c.nbytes()).sum();
        total += bytes;
        let (shape, chunk) = (format!("{:?}", a.shape), format!("{:?}", a.chunk));
        let _ = writeln!(
            out,
            "{:<width$}  {:<5}  {shape:<16} {chunk:<16} {:>5} {bytes:>14}",
            a.key,
            a.dtype.to_string(),
            a.chunks.len()
        );
    }
    let _ = writeln!(
        out,
        "\ntotal         {} arrays, {total} bytes ({:.2} GiB)",
        w.arrays.len(),
        total as f64 / (1u64 << 30) as f64
    );
    out
}

/// The distributed-checkpoint arrays of a per-rank `.nemo` target: NeVA's (its sharded state
/// dict filtered to what it saves) or LLaMA's.
fn dist_weights(target: &Checkpoint) -> Result<nemo::DistWeights> {
    Ok(shardsmith_converters::convert::dist_weights(target)?)
}

/// What `outputs` are, for messages: "an HF directory", "a LLaVA directory and an HF directory".
fn outputs_named(outputs: &[Output]) -> String {
    let names: Vec<&str> = outputs
        .iter()
        .map(|out| match out.kind {
            TargetKind::Nemo => "a .nemo",
            TargetKind::Hf => "an HF directory",
            TargetKind::Llava => "a LLaVA directory",
        })
        .collect();
    names.join(" and ")
}

/// Write `target` to `dst`; a `.nemo` as the distributed checkpoint `dist` when given.
pub fn write_target(
    target: &Checkpoint,
    to: TargetKind,
    dst: &Path,
    o: &Options,
    dist: Option<(&nemo::DistWeights, DistFormat)>,
) -> Result<()> {
    match to {
        TargetKind::Nemo => {
            let opts =
                nemo::WriteOptions { layout: None, gzip: o.gzip, extracted: o.extracted, overwrite: o.force };
            match dist {
                Some((weights, format)) => {
                    nemo::write_distributed(target, weights, format.backend(), dst, &opts)?
                }
                None => nemo::write(target, dst, &opts)?,
            }
        }
        TargetKind::Hf | TargetKind::Llava => {
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

/// One checkpoint a conversion writes.
pub struct Output {
    /// The checkpoint (headers only).
    pub ckpt: Checkpoint,
    /// Its container.
    pub kind: TargetKind,
    /// Where it goes.
    pub dest: PathBuf,
}

/// The HF CLIP directory a separately written vision tower gets: `<dst stem>-clip` beside `dst`.
pub fn vision_dir_for(dst: &Path) -> PathBuf {
    let stem = dst
        .file_stem()
        .or(dst.file_name())
        .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
    dst.with_file_name(format!("{stem}-clip"))
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// How a written config names a `--vision` tower: its Hub id for `hf://org/name` (what
/// `from_pretrained` resolves anywhere; the cache path is this machine's), else the absolute path.
pub fn tower_reference(arg: &Path) -> String {
    match arg.to_str().and_then(crate::hub::HubRef::parse) {
        Some(Ok(r)) => r.repo,
        _ => absolute(arg).display().to_string(),
    }
}

/// The bundle's tower as a CLIP directory checkpoint (for `separate` and LLaVA outputs).
fn vision_output(c: &CanonicalLlava, dest: PathBuf, dtype: Option<DType>) -> Result<Output> {
    if c.vision.is_empty() {
        bail!(
            "{}: the vision tower has no weights here to write separately; pass an HF CLIP directory with --vision PATH",
            c.origin.display()
        );
    }
    let v = ClipVision {
        tensors: c.vision.clone(),
        config: c.vision_config.clone(),
        preprocessor: c.preprocessor.clone(),
        origin: c.origin.clone(),
    };
    Ok(Output { ckpt: clip::clip_checkpoint(&v, dtype)?, kind: TargetKind::Hf, dest })
}

/// Build every output of a multimodal conversion (headers only; nothing is written).
pub fn build_multimodal(src: &Checkpoint, dst: &Path, o: &Options) -> Result<Vec<Output>> {
    if o.vocab.is_some() {
        bail!(
            "--vocab-size applies to LLaMA exports; multimodal conversions restore the source's vocabulary"
        );
    }
    let to = target_kind(src, dst, o)?;
    let given = match &o.vision {
        Some(VisionArg::Path(p)) => Some(clip::read_hf_clip(&crate::hub::resolve(p)?)?),
        _ => None,
    };
    let nemo_source = is_nemo(src);
    if nemo_source && to == TargetKind::Nemo {
        if o.vision.is_some() {
            bail!("--vision does not apply to resharding a NeVA .nemo: the tower keeps its placement");
        }
        let t = neva_target(o, VisionPlacement::Bundle, None);
        return Ok(vec![Output { ckpt: neva::reshard_neva(src, &t)?, kind: to, dest: dst.to_path_buf() }]);
    }
    let mut c = neva::read_multimodal(src, given)?;
    if matches!(&src.meta.config, Some(ModelConfig::HfJson(cfg)) if llava::is_llava_hf(cfg)) {
        c = llava::checked_llava_hf(c, &src.meta.path)?;
    }
    neva::undo_neva_tokens(&mut c)?;
    c.template = o.template.or(c.template);
    if let Some(given) = given_tokenizer(o, c.llm.hparams.vocab)? {
        c.tokenizer = Some(given.source);
        c.tokenizer_json = None;
    }
    let side = vision_dir_for(dst);
    let mut outputs = Vec::new();
    match to {
        TargetKind::Nemo => {
            // Default: the tower stays outside the .nemo, as NeMo keeps a frozen tower; a llava-hf
            // source has it only inside, so it is written beside the .nemo.
            let placement = match (&o.vision, &c.vision_source) {
                (Some(VisionArg::Bundle | VisionArg::Path(_)), _) => VisionPlacement::Bundle,
                (Some(VisionArg::Separate), _) | (None, VisionSource::Bundled) => {
                    outputs.push(vision_output(&c, side.clone(), o.dtype)?);
                    VisionPlacement::Reference(absolute(&side).display().to_string())
                }
                (None, VisionSource::Directory(p)) => {
                    VisionPlacement::Reference(absolute(p).display().to_string())
                }
                (None, VisionSource::Named(n)) => VisionPlacement::Reference(n.clone()),
            };
            let t = neva_target(o, placement, None);
            outputs.push(Output { ckpt: neva::to_neva(&c, &t)?, kind: to, dest: dst.to_path_buf() });
        }
        TargetKind::Hf => {
            outputs.push(Output { ckpt: llava::to_llava_hf(&c, o.dtype)?, kind: to, dest: dst.to_path_buf() })
        }
        TargetKind::Llava => {
            let reference = match (&o.vision, &c.vision_source) {
                (Some(VisionArg::Path(p)), _) => tower_reference(p),
                (None | Some(VisionArg::Bundle), VisionSource::Named(n)) => n.clone(),
                (None | Some(VisionArg::Bundle), VisionSource::Directory(p)) => {
                    absolute(p).display().to_string()
                }
                _ => {
                    // LLaVA never stores the tower: write it beside the directory and point at it.
                    outputs.push(vision_output(&c, side.clone(), o.dtype)?);
                    absolute(&side).display().to_string()
                }
            };
            outputs.push(Output {
                ckpt: llava::to_llava_original(&c, o.dtype, &reference)?,
                kind: to,
                dest: dst.to_path_buf(),
            });
        }
    }
    Ok(outputs)
}

fn neva_target(o: &Options, vision: VisionPlacement, format: Option<&str>) -> NevaTarget {
    NevaTarget {
        dialect: o.layout.unwrap_or(NemoDialect::Mcore),
        tp: o.tp,
        pp: o.pp,
        dtype: o.dtype,
        vision,
        template: o.template,
        image_aspect_ratio: None,
        divisible_by: None,
        source_format: format.map(str::to_string),
    }
}

/// A destination `--force` would replace must not be, or hold, a checkpoint being read.
fn refuse_replacing_a_source(dest: &Path, sources: &[&Path]) -> Result<()> {
    let Ok(dest_abs) = dest.canonicalize() else { return Ok(()) };
    for src in sources {
        if src.canonicalize().is_ok_and(|s| s.starts_with(&dest_abs)) {
            bail!(
                "{}: replacing it would delete {}, which this run reads; write somewhere else",
                dest.display(),
                src.display()
            );
        }
    }
    Ok(())
}

/// Plan or write `outputs` from `sources`: every destination is checked first (none may hold a
/// source), then all are written, atomically together.
pub fn emit(outputs: &[Output], sources: &[&Path], o: &Options, started: std::time::Instant) -> Result<()> {
    // With --dist-ckpt every .nemo output's global arrays are planned here, once, so what a
    // distributed checkpoint cannot hold is refused before any output (a vision directory written
    // beside the .nemo included) is written.
    let dist: Vec<Option<(nemo::DistWeights, DistFormat)>> = outputs
        .iter()
        .map(|out| match (out.kind, o.dist_ckpt) {
            (TargetKind::Nemo, Some(format)) => Ok(Some((dist_weights(&out.ckpt)?, format))),
            _ => Ok(None),
        })
        .collect::<Result<_>>()?;
    if o.dist_ckpt.is_some() && dist.iter().all(Option::is_none) {
        bail!("--dist-ckpt applies to .nemo outputs; this conversion writes {}", outputs_named(outputs));
    }
    let dist_of = |i: usize| dist[i].as_ref().map(|(w, format)| (w, *format));
    if o.dry_run && o.json {
        // One JSON document: the plan, or an array of plans when a tower is written beside.
        let mut plans = outputs
            .iter()
            .enumerate()
            .map(|(i, out)| plan_json(&out.ckpt, out.kind, &out.dest, dist_of(i)))
            .collect::<Result<Vec<_>>>()?;
        let doc = if plans.len() == 1 { plans.remove(0) } else { serde_json::Value::Array(plans) };
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    if o.dry_run {
        for (i, out) in outputs.iter().enumerate() {
            print_plan(&out.ckpt, out.kind, &out.dest, o.force, dist_of(i))?;
        }
        return Ok(());
    }
    if !o.force {
        if let Some(out) = outputs.iter().find(|out| out.dest.exists()) {
            return Err(shardsmith_converters::Error::OutputExists { path: out.dest.clone() }.into());
        }
    }
    for out in outputs {
        refuse_replacing_a_source(&out.dest, sources)?;
    }
    // One output is written atomically by its writer. Several (a .nemo and the tower directory
    // it names) are staged beside their destinations and moved into place together, so a failed
    // run changes none of them.
    let together = outputs.len() > 1;
    let mut staged: Vec<(std::path::PathBuf, std::path::PathBuf)> = Vec::new();
    for (i, out) in outputs.iter().enumerate() {
        let at = if together { atomic::staging_path(&out.dest) } else { out.dest.clone() };
        let written = {
            let _bar = crate::progress::WriteProgress::start(out.ckpt.total_bytes() as u64, "writing");
            write_target(&out.ckpt, out.kind, &at, o, dist_of(i))
        };
        if let Err(e) = written {
            staged.iter().for_each(|(s, _)| atomic::remove_any(s));
            return Err(e);
        }
        if together {
            staged.push((at, out.dest.clone()));
        }
    }
    if together {
        if let Err(e) = atomic::commit_together(&staged) {
            staged.iter().for_each(|(s, _)| atomic::remove_any(s));
            return Err(e.into());
        }
    }
    for (i, out) in outputs.iter().enumerate() {
        let bytes = out.ckpt.total_bytes();
        let secs = started.elapsed().as_secs_f64();
        let count = match dist_of(i) {
            Some((w, _)) => format!("{} arrays", w.arrays.len()),
            None => format!("{} tensors", out.ckpt.tensor_count()),
        };
        eprintln!(
            "wrote {} ({count}, {:.2} GiB in {:.1} s, {:.0} MiB/s)",
            out.dest.display(),
            bytes as f64 / (1u64 << 30) as f64,
            secs,
            bytes as f64 / (1u64 << 20) as f64 / secs.max(1e-9)
        );
    }
    Ok(())
}

/// The `convert` / `reshard` command.
pub fn run(src: &Path, dst: &Path, o: &Options) -> Result<()> {
    let started = std::time::Instant::now();
    let source = formats::open(&crate::hub::resolve(src)?)?;
    let outputs = if neva::is_multimodal(&source) {
        build_multimodal(&source, dst, o)?
    } else {
        if o.vision.is_some() || o.template.is_some() {
            let what = match &source.meta.config {
                Some(ModelConfig::HfJson(v)) => match v.get("model_type").and_then(|t| t.as_str()) {
                    Some(t @ ("llava" | "llava_llama")) => format!(
                        "its config.json says model_type '{t}' but has neither llava-hf's text_config \
                         nor original LLaVA's mm_* keys"
                    ),
                    Some(t) => format!("it is a '{t}' checkpoint"),
                    None => "its config.json has no model_type".into(),
                },
                _ => "it is a text-only checkpoint".into(),
            };
            bail!(
                "{}: --vision and --template apply to multimodal sources (NeVA .nemo, llava-hf, LLaVA); {what}",
                source.meta.path.display()
            );
        }
        let (ckpt, kind) = build_target(&source, dst, o)?;
        vec![Output { ckpt, kind, dest: dst.to_path_buf() }]
    };
    let dist_source = matches!(
        source.meta.flavour,
        Flavour::Nemo { layout: shardsmith_converters::NemoLayout::Distributed, .. }
    );
    let per_rank_nemo = outputs.iter().any(|out| out.kind == TargetKind::Nemo) && o.dist_ckpt.is_none();
    if dist_source && per_rank_nemo && !o.json {
        eprintln!(
            "note: {} is a distributed checkpoint; writing one model_weights.ckpt per rank \
             (--dist-ckpt zarr|torch_dist writes a distributed checkpoint again)",
            src.display()
        );
    }
    emit(&outputs, &[src], o, started)
}
