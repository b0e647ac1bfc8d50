//! `extract`, `swap-llm` and `keep-layers` on a NeVA `.nemo`. Its language model is stored fused
//! and split per rank, so a name table ([`super::parts`]) cannot take it apart: the bundle is read
//! into canonical form ([`neva::from_neva`]: LLaMA's HF names, `vision_model.*`, `mm_projector.*`)
//! and each part leaves from there.
//!
//! * `extract --part llm`: an HF LLaMA directory with NeVA's own SentencePiece model — *with*
//!   `<extra_id_0..7>`, the pieces the LLM was trained with (NeVA trains their rows as the image
//!   markers) — and the embedding and head cut to exactly that tokenizer's ids (NeMo's padding
//!   rows, and rows a converted source kept past the tokenizer, are dropped). Swapping the
//!   extracted LLM back in rebuilds the bundle.
//! * `extract --part vision`: the tower as an HF `CLIPVisionModel` directory, when its weights
//!   resolve (bundled, or a local `from_pretrained` directory); otherwise refused, naming it.
//! * `extract --part projector`: LLaVA's `model.mm_projector.*` keys, as for llava-hf.
//! * `swap-llm`: the new LLM's tokenizer gets `<extra_id_0..7>` appended when it lacks them and
//!   its embedding and head grow by the mean rule, exactly as `convert` / `assemble` do (the
//!   writing is [`neva::to_neva`]'s); the `.nemo` is written at the source's TP, PP, dialect and
//!   `make_vocab_size_divisible_by`, the tower keeps its placement, the projector its bytes.
//!
//! * `keep-layers`: the language model's first N layers, projector and tower as they are, written
//!   at the source's layout like `swap-llm`.
//! * `merge`: language model, projector and (when both bundle it) tower merged tensor by tensor
//!   under their canonical names, written at A's layout with A's tokenizer and yaml facts.
//!
//! Tensors are listed in the plans by canonical name.

use super::extract::{json_bytes, projector_config};
use super::parts::Part;
use super::plan::{Action, Change, Edit, Plan, WriteAs};
use crate::checkpoint::{
    Artifact, ByteSource, Checkpoint, Flavour, Meta, ModelConfig, NemoLayout, Parallelism, TensorMap,
};
use crate::convert::clip::{self, ClipVision};
use crate::convert::llava::{self, CanonicalLlava, ImageTokenScheme, VisionSource};
use crate::convert::neva::{self, NevaTarget, VisionPlacement};
use crate::convert::sentencepiece::SentencePieceModel;
use crate::convert::{llama, tokenizer};
use crate::error::{Error, Result};
use crate::formats::hf_dir::WeightFormat;
use crate::formats::nemo::NemoConfig;
use crate::names::llama as llama_names;
use crate::names::neva::{ConvertedFrom, EXTRA_IDS, IMAGE_END, IMAGE_PATCH, IMAGE_START};
use crate::DType;
use serde_json::{json, Value as Json};

const EMBED: &str = "model.embed_tokens.weight";
const HEAD: &str = "lm_head.weight";

/// Whether `ckpt` is a NeVA `.nemo` (a `.nemo` whose yaml has `mm_cfg`).
pub fn is_neva(ckpt: &Checkpoint) -> bool {
    matches!(&ckpt.meta.config, Some(ModelConfig::NemoYaml(cfg)) if neva::is_neva(cfg))
}

fn yaml(ckpt: &Checkpoint) -> Result<&NemoConfig> {
    match &ckpt.meta.config {
        Some(ModelConfig::NemoYaml(cfg)) => Ok(cfg),
        _ => Err(Error::missing(&ckpt.meta.path, "model_config.yaml")),
    }
}

/// Extract `part` of a NeVA `.nemo` (see the module comment).
pub fn extract_neva(src: &Checkpoint, part: Part, as_file: bool) -> Result<Edit> {
    let path = &src.meta.path;
    let c = neva::from_neva(src, None)?;
    let mut plan = Plan::new(&format!("extract --part {}", part.name()), path);
    plan.notes.push("tensors are listed by canonical name (the .nemo stores the LLM fused, per rank)".into());
    for (other, tensors) in
        [(Part::Llm, &c.llm.tensors), (Part::Vision, &c.vision), (Part::Projector, &c.projector)]
    {
        if other != part {
            for (n, t) in tensors {
                plan.push(Change::new(n, Action::Dropped, t).detail(format!("{} part", other.name())));
            }
        }
    }
    let (tensors, config, artifacts, write_as) = match part {
        Part::Llm => {
            let (llm, artifacts, lines) = llm_as_hf(&c, &mut plan)?;
            plan.files.extend(lines);
            let dtype = llm.tensors.get(EMBED).map_or(DType::F32, |t| t.dtype);
            let cfg = llm.hparams.hf_config(dtype);
            (llm.tensors, Some(cfg), artifacts, WriteAs::HfDir(WeightFormat::Safetensors))
        }
        Part::Vision => {
            if c.vision.is_empty() {
                let named = match &c.vision_source {
                    VisionSource::Named(n) if !n.is_empty() => {
                        format!("'{n}', which is not a local directory")
                    }
                    _ => "nothing".into(),
                };
                return Err(Error::missing(
                    path,
                    format!(
                        "vision tower weights: the file has none (mm_cfg.vision_encoder.freeze: true) and \
                         mm_cfg.vision_encoder.from_pretrained names {named}; the tower is wherever that name \
                         points (an HF CLIP directory) — take it from there"
                    ),
                ));
            }
            if let VisionSource::Directory(dir) = &c.vision_source {
                plan.notes.push(format!(
                    "the tower is not in the .nemo: read from its from_pretrained directory {}",
                    dir.display()
                ));
            }
            let v = ClipVision {
                tensors: c.vision.clone(),
                config: c.vision_config.clone(),
                preprocessor: c.preprocessor.clone(),
                origin: path.clone(),
            };
            let out = clip::clip_checkpoint(&v, None)?;
            for (n, t) in &c.vision {
                plan.push(Change::new(n, Action::Kept, t));
            }
            let cfg = match out.meta.config {
                Some(ModelConfig::HfJson(cfg)) => cfg,
                _ => unreachable!("clip_checkpoint writes config.json"),
            };
            let artifacts = out.meta.artifacts;
            plan.files.push(format!(
                "written: {}",
                artifacts.iter().map(|a| a.name.as_str()).collect::<Vec<_>>().join(", ")
            ));
            (c.vision.clone(), Some(cfg), artifacts, WriteAs::HfDir(WeightFormat::Safetensors))
        }
        Part::Projector => {
            let tensors: TensorMap =
                c.projector.iter().map(|(n, t)| (format!("model.{n}"), t.clone())).collect();
            for (n, t) in &tensors {
                let from = n.strip_prefix("model.").unwrap_or(n).to_string();
                plan.push(Change { from: Some(from), ..Change::new(n, Action::Renamed, t) });
            }
            let width = c.vision_hidden().map_or(Json::Null, |w| json!(w));
            let cfg = projector_config(
                &c.projector_type,
                width,
                json!(c.llm.hparams.hidden),
                json!(c.vision_feature_layer),
                !c.drop_cls,
            );
            let write_as = if as_file { WriteAs::SafetensorsFile } else { WriteAs::ProjectorDir };
            (tensors, (!as_file).then_some(cfg), Vec::new(), write_as)
        }
    };
    let flavour = match write_as {
        WriteAs::SafetensorsFile => Flavour::SafetensorsFile,
        _ => Flavour::HfSafetensorsDir { sharded: false },
    };
    let meta = Meta {
        path: path.clone(),
        flavour,
        parallel: Parallelism::default(),
        config: config.map(ModelConfig::HfJson),
        artifacts,
    };
    Ok(Edit::new(Checkpoint::single(meta, tensors), write_as, plan))
}

/// The bundle's LLM with the vocabulary cut to its tokenizer, plus the HF tokenizer files. Plan
/// lines for the LLM tensors are pushed; file lines are returned.
fn llm_as_hf(
    c: &CanonicalLlava,
    plan: &mut Plan,
) -> Result<(llama::CanonicalLlama, Vec<Artifact>, Vec<String>)> {
    let path = &c.origin;
    let sp = c.sentencepiece()?.ok_or_else(|| Error::missing(path, "tokenizer.model"))?;
    let pieces = sp.len();
    let mut llm = c.llm.clone();
    let rows = llm.hparams.vocab;
    if rows < pieces {
        // from_neva sizes the vocabulary from the tokenizer, so this is a broken file.
        return Err(Error::invalid(
            path,
            format!("the tokenizer has {pieces} pieces but the embedding only {rows} rows"),
        ));
    }
    llava::trim_vocab(&mut llm, pieces)?;
    for (n, t) in &llm.tensors {
        let change = if (n == EMBED || n == HEAD) && rows > pieces {
            Change::new(n, Action::Modified, t).detail(format!(
                "rows {rows} -> {pieces}: the tokenizer's ids; rows past them (padding) dropped"
            ))
        } else {
            Change::new(n, Action::Kept, t)
        };
        plan.push(change);
    }
    let tok = c.tokenizer.clone().ok_or_else(|| Error::missing(path, "tokenizer.model"))?;
    let (bos, eos) = (llm.hparams.bos.unwrap_or(1), llm.hparams.eos.unwrap_or(2));
    let json_artifact =
        |name: &str, v: &Json| Artifact { name: name.into(), source: ByteSource::owned(json_bytes(v)) };
    let tok_cfg = tokenizer::llama_tokenizer_config(
        llm.hparams.max_positions,
        tokenizer::SourceTokenizer {
            config: c.tokenizer_config.as_ref(),
            model: Some(&sp),
            // The NeVA tokenizer (with <extra_id_*>) is not the one the source's tokenizer.json
            // describes.
            json_left_behind: c.tokenizer_json.is_some(),
        },
    );
    let artifacts = vec![
        Artifact { name: "tokenizer.model".into(), source: tok },
        json_artifact("tokenizer_config.json", &tok_cfg),
        json_artifact("special_tokens_map.json", &tokenizer::special_tokens_map(&tok_cfg)),
        json_artifact(
            "generation_config.json",
            &json!({"bos_token_id": bos, "eos_token_id": eos, "_from_model_config": true}),
        ),
    ];
    let extra = EXTRA_IDS.iter().filter_map(|t| sp.id(t)).collect::<Vec<_>>();
    let lines = vec![format!(
        "tokenizer.model: the NeVA tokenizer as stored ({pieces} pieces{}); tokenizer_config.json, \
         special_tokens_map.json, generation_config.json written",
        match (extra.iter().min(), extra.iter().max()) {
            (Some(a), Some(b)) => format!(", <extra_id_*> at ids {a}..={b}"),
            _ => String::new(),
        }
    )];
    Ok((llm, artifacts, lines))
}

/// Replace the language model of a NeVA `.nemo` with `llm_ckpt` (HF LLaMA directory or LLaMA
/// `.nemo`) of the same hidden size (see the module comment).
pub fn swap_llm_neva(src: &Checkpoint, llm_ckpt: &Checkpoint) -> Result<Edit> {
    let path = &src.meta.path;
    let new_path = &llm_ckpt.meta.path;
    let mut c = neva::from_neva(src, None)?;
    let llm_model = super::model::LlamaModel::open(llm_ckpt)?;
    let mut llm = llm_model.canonical.clone();
    let (old, new) = (&c.llm.hparams, &llm.hparams);
    if new.hidden != old.hidden {
        return Err(Error::invalid(
            new_path,
            format!(
                "hidden size {} differs from the NeVA bundle's language model ({}, what its projector outputs); \
                 swap-llm needs an LLM of hidden size {}",
                new.hidden, old.hidden, old.hidden
            ),
        ));
    }

    // The new LLM's SentencePiece model, with NeVA's pieces as convert / assemble add them.
    let tok = match (&llm_ckpt.meta.flavour, &llm_ckpt.meta.config) {
        (Flavour::Nemo { .. }, Some(ModelConfig::NemoYaml(lcfg))) => {
            tokenizer::require_nemo_tokenizer_model(llm_ckpt, lcfg)?
        }
        _ => {
            let model =
                llm_ckpt.meta.artifacts.iter().find(|a| a.name == "tokenizer.model").ok_or_else(|| {
                    Error::missing(
                        new_path,
                        "tokenizer.model (a NeVA bundle needs the LLM's SentencePiece tokenizer)",
                    )
                })?;
            // Tokens HF added after the pieces keep their ids (and trained rows) as user-defined
            // pieces; llava-hf's <image> and <pad> give their rows to NeVA's first <extra_id_*>,
            // as convert does.
            &crate::convert::tokenizer::sentencepiece_with_hf_added(
                llm_ckpt,
                model,
                llm.hparams.vocab,
                &crate::convert::tokenizer::LLAVA_HF_TOKENS,
            )?
        }
    };
    let sp = SentencePieceModel::parse(tok.source.bytes()?.into_owned(), &new_path.join("tokenizer.model"))?;
    let present: Vec<&str> = EXTRA_IDS.iter().copied().filter(|t| sp.id(t).is_some()).collect();
    let added = match present.len() {
        8 => 0,
        0 => EXTRA_IDS.len(),
        _ => {
            return Err(Error::invalid(
                new_path,
                format!(
                    "tokenizer.model has only some of NeVA's <extra_id_0..7> ({}); add the rest by hand or start \
                     from the base tokenizer",
                    present.join(", ")
                ),
            ))
        }
    };
    let pieces = sp.len() + added;
    let id = |t: &str| {
        sp.id(t).unwrap_or_else(|| {
            (sp.len() + EXTRA_IDS.iter().position(|e| *e == t).expect("NeVA token")) as u32
        })
    };
    let (start, patch, end) = (id(IMAGE_START), id(IMAGE_PATCH), id(IMAGE_END));

    let mut plan = Plan::new("swap-llm", path);
    plan.notes.push(format!("new language model: {}", new_path.display()));
    let rows = llm.hparams.vocab;
    if rows < pieces {
        llava::grow_vocab(&mut llm, pieces)?;
    }
    for (n, t) in &llm.tensors {
        let action = if c.llm.tensors.contains_key(n) { Action::Modified } else { Action::Added };
        let detail = match n.as_str() {
            EMBED | HEAD if rows < pieces => {
                format!(
                    "new LLM's, rows {rows} -> {pieces}: rows {rows}.. = mean of its rows (as convert does)"
                )
            }
            _ => "new LLM's".to_string(),
        };
        plan.push(Change::new(n, action, t).detail(detail));
    }
    for (n, t) in &c.llm.tensors {
        if !llm.tensors.contains_key(n) {
            plan.push(Change::new(n, Action::Dropped, t).detail("not in the new LLM"));
        }
    }
    plan.files.push(if added > 0 {
        format!(
            "tokenizer.model: the new LLM's ({} pieces) with <extra_id_0..7> appended at ids {}..={}",
            sp.len(),
            sp.len(),
            pieces - 1
        )
    } else {
        format!("tokenizer.model: the new LLM's ({pieces} pieces, already with <extra_id_0..7>)")
    });
    let (old_cfg, new_cfg) = (c.llm.hparams.hf_config(DType::F32), llm.hparams.hf_config(DType::F32));
    for (key, was) in old_cfg.as_object().into_iter().flatten() {
        let now = new_cfg.get(key).unwrap_or(&Json::Null);
        if now != was {
            plan.config.push(format!("llm {key}: {was} -> {now}"));
        }
    }

    let target = source_target(src, &c)?;
    for (n, t) in &c.projector {
        plan.push(Change::new(n, Action::Kept, t));
    }
    match &target.vision {
        VisionPlacement::Bundle => {
            for (n, t) in &c.vision {
                plan.push(Change::new(n, Action::Kept, t));
            }
        }
        VisionPlacement::Reference(r) => {
            plan.notes.push(format!("vision tower: referenced as '{r}' (not stored), as in the source"))
        }
    }
    if let (Some(p), Some(l)) = (c.projector.values().next(), llm.tensors.get(EMBED)) {
        if p.dtype != l.dtype {
            plan.notes.push(format!(
                "the new LLM is {} while the projector is {}; tensors keep their dtypes",
                l.dtype, p.dtype
            ));
        }
    }

    // What the bundle records about its vocabulary now describes the new LLM.
    c.converted_from = (added > 0 || rows != pieces).then(|| ConvertedFrom {
        format: if llm_model.is_nemo() { "nemo" } else { "hf" }.into(),
        vocab_size: rows,
        added_pieces: added,
        image_token_index: None,
        pad_token_id: None,
    });
    let use_im_start_end =
        matches!(c.image_tokens, ImageTokenScheme::NevaSpan { use_im_start_end: true, .. });
    c.image_tokens = ImageTokenScheme::NevaSpan { start, patch, end, use_im_start_end };
    c.image_token = patch;
    c.tokenizer = Some(tok.source.clone());
    // The new LLM's HF tokenizer files (kept for converting back) replace the old one's.
    (c.tokenizer_json, c.tokenizer_config) = tokenizer::hf_tokenizer_files(llm_ckpt);
    c.llm = llm;
    write_like_source(src, &c, &target, plan)
}

/// The target that rewrites the NeVA `src` (read as `c`) at its own layout, as `reshard_neva`
/// derives it: TP/PP (a distributed source's from its yaml), dialect,
/// `make_vocab_size_divisible_by`, and the tower's placement.
fn source_target(src: &Checkpoint, c: &CanonicalLlava) -> Result<NevaTarget> {
    let cfg = yaml(src)?;
    let Parallelism { tp, pp } = src.saved_parallelism()?;
    let dialect = llama_names::dialect_of(
        Some(cfg),
        src.shards.iter().flat_map(|s| s.tensors.keys().map(String::as_str)),
    );
    let vision = if c.vision_source == VisionSource::Bundled {
        VisionPlacement::Bundle
    } else {
        VisionPlacement::Reference(
            cfg.get_str("mm_cfg.vision_encoder.from_pretrained").unwrap_or_default().to_string(),
        )
    };
    Ok(NevaTarget {
        dialect,
        tp,
        pp,
        dtype: None,
        vision,
        template: None,
        image_aspect_ratio: None,
        divisible_by: cfg.get_usize("make_vocab_size_divisible_by"),
        source_format: None,
    })
}

/// The edited bundle `c` as a `.nemo` at `target` (from [`source_target`]) in the source's
/// container (tar, gzip or extracted; a distributed source is written per rank, and the plan
/// says so), checked to read back as a complete NeVA bundle.
fn write_like_source(
    src: &Checkpoint,
    c: &CanonicalLlava,
    target: &NevaTarget,
    mut plan: Plan,
) -> Result<Edit> {
    let mut out = neva::to_neva(c, target)?;
    let (gzip, extracted) = match src.meta.flavour {
        Flavour::Nemo { gzip, extracted, .. } => (gzip, extracted),
        _ => (false, false),
    };
    if let Flavour::Nemo { gzip: g, extracted: e, .. } = &mut out.meta.flavour {
        (*g, *e) = (gzip, extracted);
    }
    out.meta.path = src.meta.path.clone();
    plan.notes.push(format!(
        "written at the source's layout: tp={} pp={} {} dialect, make_vocab_size_divisible_by {}; \
         model_config.yaml regenerated as reshard does",
        target.tp,
        target.pp,
        match target.dialect {
            llama_names::NemoDialect::Mcore => "mcore",
            llama_names::NemoDialect::Legacy => "legacy",
        },
        target.divisible_by.map_or("derived".to_string(), |d| d.to_string()),
    ));
    if matches!(src.meta.flavour, Flavour::Nemo { layout: NemoLayout::Distributed, .. }) {
        plan.notes.push(
            "the source is a model_weights/ distributed checkpoint; the output is written per rank \
             unless --dist-ckpt zarr|torch_dist"
                .into(),
        );
    }
    neva::from_neva(&out, None)?;
    Ok(Edit::new(out, WriteAs::Nemo { gzip, extracted }, plan))
}

/// `keep-layers` on a NeVA `.nemo`: the language model keeps its first `first` decoder layers;
/// projector and tower are kept as they are; written at the source's layout. `keep` says which
/// canonical LLM names stay (the caller's layer rule).
pub fn keep_layers_neva(src: &Checkpoint, first: usize, keep: impl Fn(&str) -> bool) -> Result<Edit> {
    let mut c = neva::from_neva(src, None)?;
    let target = source_target(src, &c)?;
    let layers = c.llm.hparams.layers;
    super::layers::check_cut(&src.meta.path, first, layers, target.pp)?;
    let mut plan = Plan::new(&format!("keep-layers --first {first}"), &src.meta.path);
    plan.notes.push("tensors are listed by canonical name (the .nemo stores the LLM fused, per rank)".into());
    let mut kept = TensorMap::new();
    for (n, t) in &c.llm.tensors {
        if keep(n) {
            plan.push(Change::new(n, Action::Kept, t));
            kept.insert(n.clone(), t.clone());
        } else {
            plan.push(Change::new(n, Action::Dropped, t));
        }
    }
    for (n, t) in c.projector.iter().chain(&c.vision) {
        plan.push(Change::new(n, Action::Kept, t));
    }
    c.llm.tensors = kept;
    c.llm.hparams.layers = first;
    plan.config.push(format!("num_layers: {layers} -> {first}"));
    write_like_source(src, &c, &target, plan)
}

/// `merge` of two NeVA `.nemo` files: `wa·A + wb·B` for the language model (same shapes, as for
/// LLaMA), the projector, and the tower when both bundle it (a referenced tower is frozen: A's
/// reference is kept, B's must be the same). Written like A.
pub fn merge_neva(a: &Checkpoint, b: &Checkpoint, wa: f32, wb: f32, mut plan: Plan) -> Result<Edit> {
    let path = &a.meta.path;
    let (mut ca, cb) = (neva::from_neva(a, None)?, neva::from_neva(b, None)?);
    super::merge::check_same_llama(&ca.llm.hparams, &cb.llm.hparams, &mut plan, path)?;
    let target = source_target(a, &ca)?;
    let (bundled_a, bundled_b) =
        (ca.vision_source == VisionSource::Bundled, cb.vision_source == VisionSource::Bundled);
    if bundled_a != bundled_b {
        return Err(Error::invalid(
            path,
            format!(
                "{} bundles its vision tower and {} references one; merge needs both to bundle it (convert with \
                 --vision bundle) or both to reference the same tower",
                if bundled_a { "A" } else { "B" },
                if bundled_a { "B" } else { "A" }
            ),
        ));
    }
    if !bundled_a {
        let reference = |c: &Checkpoint| -> Result<String> {
            Ok(yaml(c)?.get_str("mm_cfg.vision_encoder.from_pretrained").unwrap_or_default().to_string())
        };
        let (ra, rb) = (reference(a)?, reference(b)?);
        if ra != rb {
            return Err(Error::invalid(
                path,
                format!("A references vision tower '{ra}' and B '{rb}'; a referenced tower is frozen, so they must be the same"),
            ));
        }
        plan.notes.push(format!("vision tower: referenced as '{ra}' by both (frozen, not merged)"));
    }
    let merge = super::merge::merge_maps;
    ca.llm.tensors = merge(&ca.llm.tensors, &cb.llm.tensors, wa, wb, &mut plan, path)?;
    ca.projector = merge(&ca.projector, &cb.projector, wa, wb, &mut plan, path)?;
    if bundled_a {
        ca.vision = merge(&ca.vision, &cb.vision, wa, wb, &mut plan, path)?;
    }
    plan.notes
        .push("tensors are listed by canonical name; tokenizer and model_config.yaml facts are A's".into());
    write_like_source(a, &ca, &target, plan)
}
