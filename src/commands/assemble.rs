//! `shardsmith assemble`: a ready NeVA starting checkpoint from an HF LLaMA, an HF CLIP vision
//! tower and a projector (LLaVA's `mm_projector.bin` or a seeded initialisation).

use super::convert::{self, Output, TargetKind};
use anyhow::Result;
use shardsmith_converters::convert::assemble::{self, AssembleOptions, ProjectorSource};
use shardsmith_converters::convert::neva::{self, NevaTarget, VisionPlacement};
use shardsmith_converters::convert::{clip, sentencepiece};
use shardsmith_converters::formats;
use shardsmith_converters::names::neva::{ProjectorType, Template};
use std::path::{Path, PathBuf};

/// Everything `assemble` takes.
#[derive(Clone, Debug)]
pub struct Options {
    /// HF LLaMA directory (or LLaMA `.nemo`).
    pub llm: PathBuf,
    /// HF CLIP vision directory.
    pub vision: PathBuf,
    /// Projector weights or seed.
    pub projector: ProjectorSource,
    /// Projector architecture.
    pub projector_type: Option<ProjectorType>,
    /// Conversation template.
    pub template: Template,
    /// Put the tower's weights inside the `.nemo` instead of referencing the directory.
    pub bundle_vision: bool,
    /// SentencePiece model to use instead of the LLM's.
    pub tokenizer: Option<PathBuf>,
    /// Output options shared with `convert` (tp, pp, layout, dtype, dry-run, json, force, ...).
    pub convert: convert::Options,
}

/// Parse `--projector-type`.
pub fn parse_projector_type(s: &str) -> Result<ProjectorType, String> {
    ProjectorType::parse(s).ok_or_else(|| format!("'{s}' is not one of linear, mlp2x_gelu (mlpNx_gelu)"))
}

/// Parse `--template`.
pub fn parse_template(s: &str) -> Result<Template, String> {
    Template::parse(s).ok_or_else(|| format!("'{s}' is not one of {}", Template::NAMES))
}

/// The command.
pub fn run(o: &Options, out: &Path) -> Result<()> {
    let started = std::time::Instant::now();
    let llm = formats::open(&crate::hub::resolve(&o.llm)?)?;
    let vision = clip::read_hf_clip(&crate::hub::resolve(&o.vision)?)?;
    let tokenizer = o.tokenizer.as_deref().map(sentencepiece::read_model_file).transpose()?;
    let opts = AssembleOptions {
        projector_type: o.projector_type,
        template: o.template,
        tokenizer,
        ..Default::default()
    };
    let bundle = assemble::assemble(&llm, vision, &o.projector, &opts)?;
    let c = &o.convert;
    let target = NevaTarget {
        dialect: c.layout.unwrap_or(shardsmith_converters::names::llama::NemoDialect::Mcore),
        tp: c.tp,
        pp: c.pp,
        dtype: c.dtype,
        vision: if o.bundle_vision {
            VisionPlacement::Bundle
        } else {
            VisionPlacement::Reference(convert::tower_reference(&o.vision))
        },
        template: Some(o.template),
        image_aspect_ratio: None,
        divisible_by: None,
        source_format: Some("hf".into()),
    };
    let ckpt = neva::to_neva(&bundle, &target)?;
    let mut sources = vec![o.llm.as_path(), o.vision.as_path()];
    if let ProjectorSource::File(p) = &o.projector {
        sources.push(p);
    }
    convert::emit(&[Output { ckpt, kind: TargetKind::Nemo, dest: out.to_path_buf() }], &sources, c, started)
}
