//! What a surgery will do ([`Plan`]), the lazy result it builds ([`Edit`]), and writing that
//! result in the container it was read from ([`write()`]).
//!
//! Every surgery is a function `Checkpoint → Edit` over headers only: the plan is complete before
//! a tensor byte is read, so `--dry-run` prints exactly what a real run writes.

use crate::atomic::AtomicDir;
use crate::checkpoint::{Checkpoint, Flavour, TensorEntry, TensorMap};
use crate::error::{Error, Result};
use crate::formats::{hf_dir, nemo, safetensors, torch_zip};
use crate::DType;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// What happens to one tensor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Written unchanged, under its own name.
    Kept,
    /// Written unchanged under a new name (`from` holds the old one).
    Renamed,
    /// Not written.
    Dropped,
    /// New: built by the surgery.
    Added,
    /// Same name, new values or shape.
    Modified,
}

/// One line of a plan.
#[derive(Clone, Debug, Serialize)]
pub struct Change {
    /// The tensor's name in the output (in the input, for dropped tensors).
    pub name: String,
    /// `[tp, pp]` rank for multi-rank checkpoints.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rank: Option<[usize; 2]>,
    /// What happens.
    pub action: Action,
    /// The old name, for renamed tensors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// How a modified or added tensor is computed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Element type written.
    pub dtype: DType,
    /// Shape written.
    pub shape: Vec<usize>,
    /// Bytes written (dropped tensors: bytes not written).
    pub bytes: usize,
}

impl Change {
    /// A change for tensor `t`.
    pub fn new(name: impl Into<String>, action: Action, t: &TensorEntry) -> Self {
        Change {
            name: name.into(),
            rank: None,
            action,
            from: None,
            detail: None,
            dtype: t.dtype,
            shape: t.shape.clone(),
            bytes: t.nbytes(),
        }
    }

    /// The same change with a how-it-is-computed note.
    pub fn detail(mut self, d: impl Into<String>) -> Self {
        self.detail = Some(d.into());
        self
    }

    /// The same change, attributed to a rank.
    pub fn at_rank(mut self, tp: usize, pp: usize) -> Self {
        self.rank = Some([tp, pp]);
        self
    }
}

/// Counts per action.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Summary {
    /// Unchanged tensors.
    pub kept: usize,
    /// Renamed tensors.
    pub renamed: usize,
    /// Dropped tensors.
    pub dropped: usize,
    /// New tensors.
    pub added: usize,
    /// Modified tensors.
    pub modified: usize,
    /// Tensor bytes the output holds.
    pub bytes_written: usize,
}

/// A surgery's plan: per tensor what happens, plus config and companion-file edits.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    /// The operation (`rename`, `keep-layers`, ...).
    pub operation: String,
    /// The input checkpoint.
    pub source: PathBuf,
    /// The output container in words.
    pub output_format: String,
    /// Tensor changes, in output order (dropped ones where they were).
    pub tensors: Vec<Change>,
    /// Configuration edits, e.g. `num_hidden_layers: 2 -> 1`.
    pub config: Vec<String>,
    /// Companion-file edits, e.g. `tokenizer.json: 2 added tokens`.
    pub files: Vec<String>,
    /// Anything else a user should know about the result.
    pub notes: Vec<String>,
    /// Counts.
    pub summary: Summary,
}

impl Plan {
    /// An empty plan for `operation` on `source`.
    pub fn new(operation: &str, source: &Path) -> Self {
        Plan {
            operation: operation.to_string(),
            source: source.to_path_buf(),
            output_format: String::new(),
            tensors: Vec::new(),
            config: Vec::new(),
            files: Vec::new(),
            notes: Vec::new(),
            summary: Summary::default(),
        }
    }

    /// Record a change.
    pub fn push(&mut self, c: Change) {
        self.tensors.push(c);
    }

    /// Fill in the counts and the output format name.
    pub fn finish(mut self, write_as: &WriteAs) -> Self {
        let mut s = Summary::default();
        for c in &self.tensors {
            match c.action {
                Action::Kept => s.kept += 1,
                Action::Renamed => s.renamed += 1,
                Action::Dropped => s.dropped += 1,
                Action::Added => s.added += 1,
                Action::Modified => s.modified += 1,
            }
            if c.action != Action::Dropped {
                s.bytes_written += c.bytes;
            }
        }
        self.summary = s;
        self.output_format = write_as.to_string();
        self
    }

    /// The one-line summary (`21 tensors written: 19 kept, 2 renamed; 1 dropped`).
    pub fn summary_line(&self) -> String {
        let s = &self.summary;
        let written = s.kept + s.renamed + s.added + s.modified;
        let mut parts = vec![format!("{} kept", s.kept)];
        for (n, what) in [(s.renamed, "renamed"), (s.modified, "modified"), (s.added, "added")] {
            if n > 0 {
                parts.push(format!("{n} {what}"));
            }
        }
        let dropped = if s.dropped > 0 { format!("; {} dropped", s.dropped) } else { String::new() };
        format!(
            "{written} tensors written ({}){dropped}; {} bytes ({:.2} GiB)",
            parts.join(", "),
            s.bytes_written,
            s.bytes_written as f64 / (1u64 << 30) as f64
        )
    }

    /// Human-readable plan. `all` lists unchanged tensors too; otherwise only changes.
    pub fn render(&self, all: bool) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(s, "{} {} -> {}", self.operation, self.source.display(), self.output_format);
        let shown: Vec<&Change> = self.tensors.iter().filter(|c| all || c.action != Action::Kept).collect();
        let w = shown.iter().map(|c| c.name.len()).max().unwrap_or(4);
        for c in shown {
            let rank = c.rank.map_or(String::new(), |[tp, pp]| format!(" tp={tp} pp={pp}"));
            let how = match (&c.from, &c.detail) {
                (Some(f), _) => format!("  <- {f}"),
                (None, Some(d)) => format!("  ({d})"),
                _ => String::new(),
            };
            let action = format!("{:?}", c.action).to_lowercase();
            let _ = writeln!(
                s,
                "  {action:<8} {:<w$}  {:<4} {:<14} {:>12}{rank}{how}",
                c.name,
                c.dtype.to_string(),
                format!("{:?}", c.shape),
                c.bytes
            );
        }
        for line in &self.config {
            let _ = writeln!(s, "  config   {line}");
        }
        for line in &self.files {
            let _ = writeln!(s, "  file     {line}");
        }
        for line in &self.notes {
            let _ = writeln!(s, "  note     {line}");
        }
        let _ = writeln!(s, "{}", self.summary_line());
        s
    }
}

/// The container an output is written as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteAs {
    /// One `.safetensors` file.
    SafetensorsFile,
    /// One PyTorch zip file.
    TorchZip,
    /// An HF model directory.
    HfDir(hf_dir::WeightFormat),
    /// A `.nemo` (per-rank layout for the checkpoint's TP/PP).
    Nemo {
        /// Gzip the tar.
        gzip: bool,
        /// Write an extracted directory.
        extracted: bool,
    },
    /// A directory holding `mm_projector.safetensors` and a LLaVA-style `config.json` (the output
    /// of LLaVA's projector pre-training stage).
    ProjectorDir,
}

impl WriteAs {
    /// The container a checkpoint was read from (a distributed `.nemo` is written per rank).
    pub fn like(flavour: &Flavour) -> WriteAs {
        match flavour {
            Flavour::SafetensorsFile => WriteAs::SafetensorsFile,
            Flavour::TorchZip => WriteAs::TorchZip,
            Flavour::HfSafetensorsDir { .. } => WriteAs::HfDir(hf_dir::WeightFormat::Safetensors),
            Flavour::HfBinDir { .. } => WriteAs::HfDir(hf_dir::WeightFormat::Bin),
            Flavour::Nemo { gzip, extracted, .. } => WriteAs::Nemo { gzip: *gzip, extracted: *extracted },
        }
    }
}

impl std::fmt::Display for WriteAs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteAs::SafetensorsFile => f.write_str("safetensors file"),
            WriteAs::TorchZip => f.write_str("PyTorch zip file"),
            WriteAs::HfDir(hf_dir::WeightFormat::Safetensors) => f.write_str("HF directory (safetensors)"),
            WriteAs::HfDir(hf_dir::WeightFormat::Bin) => f.write_str("HF directory (pytorch_model.bin)"),
            WriteAs::Nemo { extracted: true, .. } => f.write_str("extracted .nemo directory"),
            WriteAs::Nemo { gzip: true, .. } => f.write_str(".nemo (gzip tar)"),
            WriteAs::Nemo { .. } => f.write_str(".nemo (tar)"),
            WriteAs::ProjectorDir => {
                f.write_str("projector directory (mm_projector.safetensors + config.json)")
            }
        }
    }
}

/// A surgery's result: the output checkpoint (lazy: nothing computed yet), how to write it, and
/// the plan that describes it.
#[derive(Clone, Debug)]
pub struct Edit {
    /// The output.
    pub output: Checkpoint,
    /// Its container.
    pub write_as: WriteAs,
    /// What changed.
    pub plan: Plan,
}

impl Edit {
    /// Assemble an edit, finishing the plan.
    pub fn new(output: Checkpoint, write_as: WriteAs, plan: Plan) -> Self {
        let plan = plan.finish(&write_as);
        Edit { output, write_as, plan }
    }
}

/// Options for [`write()`].
#[derive(Clone, Copy, Debug)]
pub struct WriteOptions<'a> {
    /// Largest HF shard in bytes.
    pub max_shard_bytes: u64,
    /// Replace an existing destination.
    pub overwrite: bool,
    /// Write a `.nemo` output as a distributed checkpoint with these global arrays
    /// ([`crate::convert::dist_weights`] of the output) and backend; per rank when `None`.
    pub dist: Option<(&'a nemo::DistWeights, nemo::DistBackend)>,
}

impl Default for WriteOptions<'_> {
    fn default() -> Self {
        WriteOptions {
            max_shard_bytes: hf_dir::WriteOptions::default().max_shard_bytes,
            overwrite: false,
            dist: None,
        }
    }
}

/// The projector file inside a [`WriteAs::ProjectorDir`].
pub const PROJECTOR_FILE: &str = "mm_projector.safetensors";

/// Write an edit's output to `dest`, atomically, through the format writers (tensor by tensor,
/// so memory stays bounded by the largest tensor and its inputs).
pub fn write(edit: &Edit, dest: &Path, opts: &WriteOptions) -> Result<()> {
    let ckpt = &edit.output;
    if opts.dist.is_some() && !matches!(edit.write_as, WriteAs::Nemo { .. }) {
        return Err(Error::argument(
            "--dist-ckpt",
            format!("applies to .nemo outputs; this edit writes a {}", edit.write_as),
        ));
    }
    match edit.write_as {
        WriteAs::SafetensorsFile => safetensors::write_file(ckpt.tensors()?, dest, opts.overwrite),
        WriteAs::TorchZip => {
            let shard = single_shard(ckpt)?;
            let state = torch_zip::TorchState::new(shard.tensors.clone(), shard.none_keys.clone());
            torch_zip::write_file(&state, dest, opts.overwrite)
        }
        WriteAs::HfDir(weights) => {
            let o = hf_dir::WriteOptions {
                weights,
                max_shard_bytes: opts.max_shard_bytes,
                overwrite: opts.overwrite,
            };
            hf_dir::write(ckpt, dest, &o).map(|_| ())
        }
        WriteAs::Nemo { gzip, extracted } => {
            let o = nemo::WriteOptions { layout: None, gzip, extracted, overwrite: opts.overwrite };
            match opts.dist {
                Some((weights, backend)) => nemo::write_distributed(ckpt, weights, backend, dest, &o),
                None => nemo::write(ckpt, dest, &o),
            }
        }
        WriteAs::ProjectorDir => {
            let dir = AtomicDir::create(dest, opts.overwrite)?;
            safetensors::write_file(ckpt.tensors()?, &dir.path().join(PROJECTOR_FILE), false)?;
            if let Some(crate::ModelConfig::HfJson(cfg)) = &ckpt.meta.config {
                hf_dir::write_json(&dir.path().join("config.json"), cfg, false)?;
            }
            dir.commit()
        }
    }
}

fn single_shard(ckpt: &Checkpoint) -> Result<&crate::Shard> {
    match ckpt.shards.as_slice() {
        [only] => Ok(only),
        _ => Err(Error::invalid(&ckpt.meta.path, "a single-file output needs a single-rank checkpoint")),
    }
}

/// Plan lines for a tensor map passed through unchanged.
pub fn kept(plan: &mut Plan, tensors: &TensorMap) {
    for (n, t) in tensors {
        plan.push(Change::new(n, Action::Kept, t));
    }
}
