//! NeVA `.nemo` (formats.md §5.3, §6) to and from the canonical bundle ([`CanonicalLlava`]).
//!
//! Writing ([`to_neva`]): the LLM goes through the LLaMA path (QKV interleave, GLU fuse, vocab
//! padding, TP/PP split, both key dialects); the projector is replicated on every tensor-parallel
//! rank of the first pipeline stage under NeVA's adapter prefix; a bundled vision tower likewise
//! under `…word_embeddings.vision_encoder.`. As NeVA saves only `named_parameters()`, the files
//! carry no rotary buffer and no `_extra_state` entries. The tokenizer gets NeVA's
//! `<extra_id_0..7>` appended when it lacks them, and the embedding and head grow to the new
//! vocabulary by the mean rule of [`super::vocab`]; rows a source has beyond the tokenizer
//! (llava-hf's `<image>`, `<pad>` and padding) are kept as they are, inside NeMo's padded rows.
//! What was changed is recorded in the yaml (`converted_from`) so converting back restores the
//! source exactly.
//!
//! Everything is checked before anything is built: `check_bundle` names every missing part.
//!
//! Reading ([`from_neva`]; the compute core's `models::tower` finds a tower it only names) undoes the layout: projector and
//! vision keys are split off by prefix, the rest is the LLaMA part (or, for a projector-only file
//! with `mm_cfg.llm.freeze: true`, the `.nemo` that `mm_cfg.llm.from_pretrained` names).

use crate::checkpoint::{
    Artifact, ByteSource, Checkpoint, Flavour, Meta, ModelConfig, NemoLayout, Parallelism, Shard, TensorMap,
};
use crate::convert::clip::{self, ClipVision};
use crate::convert::llama::{self, CanonicalLlama};
use crate::convert::llava::{self, CanonicalLlava, ImageTokenScheme, VisionSource};
use crate::convert::sentencepiece::SentencePieceModel;
use crate::convert::tokenizer;
use crate::error::{Error, Result};
use crate::formats::{self, nemo, nemo::NemoConfig};
use crate::names::llama::{self as llama_names, NemoDialect, NemoYamlOptions};
use crate::names::neva::{
    self as names, ConvertedFrom, NevaYaml, ProjectorType, Template, VisionYaml, EXTRA_IDS,
};
use crate::names::yaml;
use crate::shard;
use crate::DType;
use serde_json::Value as Json;
use std::path::{Path, PathBuf};

/// Where the vision tower goes in a NeVA file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VisionPlacement {
    /// Its weights go into the `.nemo` (`mm_cfg.vision_encoder.freeze: false`, since NeVA saves a
    /// tower exactly when it is unfrozen).
    Bundle,
    /// Only referenced: `from_pretrained` is this HF id or directory, `freeze: true`.
    Reference(String),
}

/// Options for building a NeVA `.nemo`.
#[derive(Clone, Debug)]
pub struct NevaTarget {
    /// LLM key dialect.
    pub dialect: NemoDialect,
    /// Tensor-parallel size.
    pub tp: usize,
    /// Pipeline-parallel size (mcore only: NeVA in NeMo 1.23 has no pipeline parallelism).
    pub pp: usize,
    /// Cast float tensors (`None` keeps the source's).
    pub dtype: Option<DType>,
    /// Vision tower placement.
    pub vision: VisionPlacement,
    /// Conversation template (overrides the source's).
    pub template: Option<Template>,
    /// `data.image_aspect_ratio` (overrides the source's; default `pad`, LLaVA-1.5's).
    pub image_aspect_ratio: Option<String>,
    /// `make_vocab_size_divisible_by` (default: what NeMo's converter picks for the source rows).
    pub divisible_by: Option<usize>,
    /// The `converted_from.format` to record (`llava-hf`, `llava`, `hf`); `None` derives it.
    pub source_format: Option<String>,
}

/// What [`check_bundle`] establishes.
struct Checked {
    tokenizer: SentencePieceModel,
    added: usize,
    template: Template,
    vision: VisionYaml,
    image_token_len: usize,
    projector: ProjectorType,
}

/// The tokenizer with NeVA's `<extra_id_0..7>`: as it is when it has all eight, with them appended
/// (as user-defined pieces) when it has none; a tokenizer with only some is refused.
fn with_extra_ids(
    sp: &SentencePieceModel,
    origin: &Path,
) -> std::result::Result<(SentencePieceModel, usize), String> {
    let present: Vec<&str> = EXTRA_IDS.iter().copied().filter(|t| sp.id(t).is_some()).collect();
    match present.len() {
        8 => Ok((sp.clone(), 0)),
        0 => sp.with_user_defined(&EXTRA_IDS, origin).map(|s| (s, 8)).map_err(|e| e.to_string()),
        _ => Err(format!(
            "tokenizer with all of NeVA's <extra_id_0..7> (it has only {}; add the rest by hand or start from the base tokenizer)",
            present.join(", ")
        )),
    }
}

/// Check that `c` is a complete bundle for `t`, naming every missing part at once.
fn check_bundle(c: &CanonicalLlava, t: &NevaTarget) -> Result<Checked> {
    let mut missing = Vec::new();
    let tokenizer = match c.sentencepiece() {
        Ok(Some(sp)) => match with_extra_ids(&sp, &c.origin) {
            Ok(x) => Some(x),
            Err(e) => {
                missing.push(e);
                None
            }
        },
        Ok(None) => {
            missing.push("tokenizer (a SentencePiece tokenizer.model; pass --tokenizer PATH)".into());
            None
        }
        Err(e) => {
            missing.push(format!("a readable tokenizer ({e})"));
            None
        }
    };
    let template = t.template.or(c.template);
    if template.is_none() {
        missing.push(format!(
            "conversation template (the source does not say; pass --template {})",
            Template::NAMES
        ));
    }
    let projector = match c.projector_kind() {
        Ok(k) if !c.projector.is_empty() => Some(k),
        Ok(_) => {
            missing.push("projector weights (mm_projector.*)".into());
            None
        }
        Err(e) => {
            missing.push(format!("a supported projector ({e})"));
            None
        }
    };
    let named = match &c.vision_source {
        VisionSource::Named(n) => format!(" (referenced as '{n}')"),
        _ => String::new(),
    };
    if t.vision == VisionPlacement::Bundle && c.vision.is_empty() {
        missing.push(format!(
            "vision tower weights to bundle{named}; pass an HF CLIP directory with --vision PATH"
        ));
    }
    if let VisionPlacement::Reference(r) = &t.vision {
        if r.is_empty() {
            missing.push("vision tower reference (mm_cfg.vision_encoder.from_pretrained)".into());
        }
    }
    let (image, patch, hidden) = (c.image_size(), c.patch_size(), c.vision_hidden());
    if image.is_none() || patch.is_none() || hidden.is_none() {
        missing.push(format!(
            "vision tower config (image_size, patch_size, hidden_size){named}: not a known tower; pass an HF CLIP directory with --vision PATH"
        ));
    }
    let (Some((tokenizer, added)), Some(template), Some(projector), Some(image), Some(patch), Some(hidden)) =
        (tokenizer, template, projector, image, patch, hidden)
    else {
        return Err(Error::IncompleteBundle { path: c.origin.clone(), missing });
    };
    if !missing.is_empty() {
        return Err(Error::IncompleteBundle { path: c.origin.clone(), missing });
    }
    let (from_pretrained, freeze) = match &t.vision {
        VisionPlacement::Bundle => {
            // NeMo still builds the tower module from `from_pretrained` before loading the bundled
            // weights: name it when we can.
            let name = match &c.vision_source {
                VisionSource::Directory(p) => Some(absolute(p).display().to_string()),
                VisionSource::Named(n) => Some(n.clone()),
                VisionSource::Bundled => names::known_clip_id(&c.vision_config).map(str::to_string),
            };
            (name, false)
        }
        VisionPlacement::Reference(r) => (Some(r.clone()), true),
    };
    let vision = VisionYaml {
        from_pretrained,
        freeze,
        patch,
        image_size: image,
        hidden,
        select_layer: c.vision_feature_layer,
        class_tokens: usize::from(c.drop_cls),
        hf_config: (!c.vision_config.is_null()).then(|| c.vision_config.clone()),
    };
    let image_token_len = (image / patch.max(1)).pow(2) + usize::from(!c.drop_cls);
    Ok(Checked { tokenizer, added, template, vision, image_token_len, projector })
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Canonical bundle → NeVA `.nemo` checkpoint (headers only; see the module comment).
pub fn to_neva(c: &CanonicalLlava, t: &NevaTarget) -> Result<Checkpoint> {
    if t.pp > 1 && t.dialect == NemoDialect::Legacy {
        return Err(Error::invalid(
            &c.origin,
            format!("pp={}: the legacy NeVA model (NeMo 1.23) has no pipeline parallelism; use --layout mcore or --pp 1", t.pp),
        ));
    }
    let checked = check_bundle(c, t)?;
    c.check_feature_layer()?;
    llama::check_parallelism(&c.llm.hparams, t.dialect, t.tp, t.pp, &c.origin)?;
    let pieces = checked.tokenizer.len();
    let mut llm: CanonicalLlama = c.llm.clone();
    let source_rows = llm.hparams.vocab;
    if source_rows < pieces {
        llava::grow_vocab(&mut llm, pieces)?;
    }
    let rows = llm.hparams.vocab;
    // NeMo sizes the embedding from the tokenizer (formats.md §4.2); rows past it (llava-hf's)
    // must fit in that padding, which then holds them unchanged.
    let mut m = t.divisible_by.unwrap_or_else(|| shard::divisible_by_for_hf_vocab(source_rows));
    while shard::padded_vocab(pieces, m, t.tp) < rows {
        m *= 2;
    }
    debug_assert_eq!(shard::padded_vocab(pieces, m, t.tp), shard::padded_vocab(rows, m, t.tp));
    let mut shards = llama::to_nemo_shards(&llm, t.dialect, t.tp, t.pp, m)?;
    for s in &mut shards {
        // NeVA saves named_parameters() only (formats.md §6.1).
        s.tensors.shift_remove(llama_names::LEGACY_INV_FREQ);
        s.none_keys.clear();
        s.tensors = llama::cast_all(&s.tensors, t.dtype)?;
    }
    let projector = llama::cast_all(&c.projector, t.dtype)?;
    let vision = match t.vision {
        VisionPlacement::Bundle => llama::cast_all(&c.vision, t.dtype)?,
        VisionPlacement::Reference(_) => TensorMap::new(),
    };
    for s in shards.iter_mut().filter(|s| s.rank.pp == 0) {
        for (name, tensor) in &projector {
            s.tensors.insert(format!("{}{name}", names::projector_prefix(t.dialect)), tensor.clone());
        }
        for (name, tensor) in &vision {
            s.tensors.insert(format!("{}{name}", names::vision_prefix(t.dialect)), tensor.clone());
        }
    }
    let tok_bytes = checked.tokenizer.bytes().to_vec();
    let tok_name = tokenizer::artifact_name("tokenizer.model", &tok_bytes);
    // Provenance: kept when the bundle already has it (a NeVA resharded), recorded for a
    // conversion from another layout, absent for a NeVA that never had one.
    let converted_from = match (&c.converted_from, &t.source_format, c.image_tokens) {
        (Some(cf), ..) => Some(cf.clone()),
        (None, None, ImageTokenScheme::NevaSpan { .. }) => None,
        (None, format, scheme) => {
            let (image, pad) = match scheme {
                ImageTokenScheme::Repeated { image, pad } => (Some(image), pad),
                _ => (None, None),
            };
            let format = format
                .clone()
                .unwrap_or_else(|| if image.is_some() { "llava-hf" } else { "llava" }.to_string());
            Some(ConvertedFrom {
                format,
                vocab_size: source_rows,
                added_pieces: checked.added,
                image_token_index: image,
                pad_token_id: pad,
            })
        }
    };
    let use_im_start_end =
        matches!(c.image_tokens, ImageTokenScheme::NevaSpan { use_im_start_end: true, .. });
    let stored =
        llm.tensors.get("model.embed_tokens.weight").map_or(DType::F32, |e| t.dtype.unwrap_or(e.dtype));
    let tokenizer_ref = format!("nemo:{tok_name}");
    let map = llm.hparams.nemo_yaml_map(&NemoYamlOptions {
        dialect: t.dialect,
        dtype: stored,
        tp: t.tp,
        pp: t.pp,
        divisible_by: m,
        tokenizer_model: Some(tokenizer_ref.clone()),
    });
    let neva = NevaYaml {
        template: checked.template,
        projector: checked.projector,
        vision: checked.vision,
        llm_freeze: false,
        llm_from_pretrained: None,
        use_im_start_end,
        image_token_len: checked.image_token_len,
        image_aspect_ratio: t
            .image_aspect_ratio
            .clone()
            .or_else(|| c.image_aspect_ratio.clone())
            .unwrap_or_else(|| "pad".into()),
        tokenizer_model: tokenizer_ref,
        converted_from,
    };
    let mut artifacts = vec![Artifact { name: tok_name, source: ByteSource::owned(tok_bytes) }];
    // The source's HF tokenizer files, for converting back (checked against the model then).
    artifacts.extend(tokenizer::kept_members(c.tokenizer_json.as_ref(), c.tokenizer_config.as_ref()));
    let text = yaml::emit(&names::neva_yaml_map(map, &neva));
    let cfg = NemoConfig::parse(text, Path::new("model_config.yaml"))?;
    let parallel = Parallelism { tp: t.tp, pp: t.pp };
    let meta = Meta {
        path: c.origin.clone(),
        flavour: Flavour::Nemo {
            layout: NemoLayout::for_parallelism(parallel),
            gzip: false,
            extracted: false,
        },
        parallel,
        config: Some(ModelConfig::NemoYaml(cfg)),
        artifacts,
    };
    Ok(Checkpoint { meta, shards })
}

/// Whether a `.nemo` config is a NeVA one (has `mm_cfg`).
pub fn is_neva(cfg: &NemoConfig) -> bool {
    cfg.get("mm_cfg").is_some_and(|v| v.is_mapping())
}

fn yaml_to_json(v: &serde_yaml::Value) -> Json {
    serde_json::to_value(v).unwrap_or(Json::Null)
}

/// Candidate directories for a `from_pretrained` path: as given (absolute, or relative to the
/// working directory, which is how NeMo resolves it), relative to the `.nemo`'s directory, and its
/// basename beside the `.nemo` (the two moved together).
fn local_candidates(value: &str, nemo_path: &Path) -> Vec<PathBuf> {
    let p = Path::new(value);
    let beside = nemo_path.parent().unwrap_or(Path::new("."));
    let mut out = vec![p.to_path_buf()];
    if p.is_relative() {
        out.push(beside.join(p));
    }
    if let Some(base) = p.file_name() {
        out.push(beside.join(base));
    }
    out
}

fn local_dir(value: &str, nemo_path: &Path) -> Option<PathBuf> {
    local_candidates(value, nemo_path).into_iter().find(|c| c.join("config.json").is_file())
}

/// NeVA `.nemo` → canonical bundle, in NeVA's own terms (NeVA tokenizer and `<extra_id_*>` image
/// span). `vision` is an HF CLIP tower given by the user; otherwise a bundled tower is used, or
/// `from_pretrained` when it is a local directory, and else the tower stays a reference
/// ([`VisionSource::Named`], no weights).
pub fn from_neva(ckpt: &Checkpoint, vision: Option<ClipVision>) -> Result<CanonicalLlava> {
    let path = &ckpt.meta.path;
    let Some(ModelConfig::NemoYaml(cfg)) = &ckpt.meta.config else {
        return Err(Error::missing(path, "model_config.yaml"));
    };
    if !is_neva(cfg) {
        return Err(Error::invalid(path, "model_config.yaml has no mm_cfg: this is a LLaMA .nemo, not NeVA"));
    }
    let converted_from = ConvertedFrom::from_yaml(&cfg.value);
    // Split projector and vision keys off every rank; the projector is replicated, so the first
    // rank's copy is the tensor.
    let mut llm_ckpt = ckpt.clone();
    let (mut projector, mut vision_t) = (TensorMap::new(), TensorMap::new());
    for s in &mut llm_ckpt.shards {
        let first = s.rank.tp == 0 && s.rank.pp == 0;
        let keys: Vec<String> = s.tensors.keys().cloned().collect();
        for key in keys {
            let name =
                key.strip_prefix("model.module.").map_or_else(|| key.clone(), |r| format!("model.{r}"));
            let part = if let Some((_, c)) = names::neva_projector_canonical(&name) {
                Some((&mut projector, c))
            } else if let Some((_, c)) = names::neva_vision_canonical(&name) {
                Some((&mut vision_t, c))
            } else {
                None
            };
            if let Some((map, canonical)) = part {
                let t = s.tensors.shift_remove(&key).expect("listed above");
                if first {
                    map.insert(canonical, t);
                }
            }
        }
    }
    let mut missing = Vec::new();
    // A missing tokenizer is reported with every other missing part, not on its own.
    let sp = match tokenizer::nemo_tokenizer_model(ckpt, cfg) {
        Ok(Some(a)) => {
            Some(SentencePieceModel::parse(a.source.bytes()?.into_owned(), &path.join("tokenizer.model"))?)
        }
        _ => None,
    };
    let ids =
        sp.as_ref().map(|sp| [names::IMAGE_START, names::IMAGE_PATCH, names::IMAGE_END].map(|t| sp.id(t)));
    match (&sp, ids) {
        (None, _) => missing.push(match cfg.get_str("tokenizer.model") {
            Some(named) => {
                format!("tokenizer ('{named}', which model_config.yaml names, is not in the archive)")
            }
            None => "tokenizer (model_config.yaml names no tokenizer.model)".to_string(),
        }),
        (Some(_), Some([Some(_), Some(_), Some(_)])) => {}
        (Some(_), _) => {
            missing.push("NeVA image tokens <extra_id_3>, <extra_id_4>, <extra_id_5> in the tokenizer".into())
        }
    }
    let has_llm = llm_ckpt.shards.iter().any(|s| !s.tensors.is_empty());
    let llm = if has_llm {
        let pieces = sp.as_ref().map(|sp| sp.len());
        let vocab = converted_from.as_ref().map(|c| c.vocab_size.max(pieces.unwrap_or(0)));
        Some(llama::from_nemo(&llm_ckpt, vocab)?)
    } else {
        match cfg
            .get_str("mm_cfg.llm.from_pretrained")
            .and_then(|v| local_candidates(v, path).into_iter().find(|p| p.exists()))
        {
            Some(p) => {
                let base = formats::open(&p)?;
                let mut l = llama::from_nemo(&base, None)?;
                // NeMo zero-pads the base LLM's embedding to the NeVA vocabulary (load_llm_weights).
                if let Some(rows) = sp.as_ref().map(|s| s.len()).filter(|r| *r > l.hparams.vocab) {
                    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
                        if let Some(t) = l.tensors.get(name) {
                            let padded = crate::transforms::pad_rows(name, t, rows)?;
                            l.tensors.insert(name.to_string(), padded);
                        }
                    }
                    l.hparams.vocab = rows;
                }
                Some(l)
            }
            None => {
                missing.push(format!(
                    "LLM weights: the file holds none (mm_cfg.llm.freeze: true) and mm_cfg.llm.from_pretrained ({}) is not a readable .nemo",
                    cfg.get_str("mm_cfg.llm.from_pretrained").unwrap_or("null")
                ));
                None
            }
        }
    };
    let kind_name = cfg.get_str("mm_cfg.mm_mlp_adapter_type").unwrap_or("linear").to_string();
    let kind = ProjectorType::parse(&kind_name);
    if kind.is_none() {
        missing
            .push(format!("a supported projector (mm_mlp_adapter_type '{kind_name}'; linear or mlpNx_gelu)"));
    }
    if projector.is_empty() {
        missing.push("projector weights (…adapter_layer.mm_projector_adapter.mm_projector.*)".into());
    }
    let (Some(llm), Some(sp), Some(kind), Some([Some(start), Some(patch), Some(end)])) = (llm, sp, kind, ids)
    else {
        return Err(Error::IncompleteBundle { path: path.clone(), missing });
    };
    if !missing.is_empty() {
        return Err(Error::IncompleteBundle { path: path.clone(), missing });
    }

    // Vision tower.
    let from_pretrained = cfg.get_str("mm_cfg.vision_encoder.from_pretrained").map(str::to_string);
    let yaml_config = cfg.get("mm_cfg.vision_encoder.hf_config").map(yaml_to_json).filter(Json::is_object);
    let local = from_pretrained.as_deref().and_then(|v| local_dir(v, path));
    let (vision_tensors, vision_config, vision_source, preprocessor) = if !vision_t.is_empty() {
        let config = match (yaml_config, &vision, &local, from_pretrained.as_deref().and_then(names::known_clip_config)) {
            (Some(c), ..) => c,
            (None, Some(v), ..) => v.config.clone(),
            (None, None, Some(dir), _) => clip::read_hf_clip(dir)?.config,
            (None, None, None, Some(c)) => c,
            (None, None, None, None) => {
                return Err(Error::IncompleteBundle {
                    path: path.clone(),
                    missing: vec!["the bundled vision tower's CLIP config (no mm_cfg.vision_encoder.hf_config, and from_pretrained is not a local directory or a known tower); pass --vision PATH".into()],
                })
            }
        };
        (clip::check_clip(&config, vision_t, path)?, config, VisionSource::Bundled, None)
    } else {
        let given = match (vision, &local) {
            (Some(v), _) => Some(v),
            (None, Some(dir)) => Some(clip::read_hf_clip(dir)?),
            (None, None) => None,
        };
        match given {
            Some(v) => {
                // The tower the file was made with is recorded; another one would run silently wrong.
                if let (Some(recorded), Some(found)) = (
                    yaml_config.as_ref().map(|c| clip::tower_dims(c, path)).transpose()?.flatten(),
                    clip::tower_dims(&v.config, &v.origin)?,
                ) {
                    let differing = found.differences(&recorded);
                    if !differing.is_empty() {
                        return Err(Error::invalid(
                            v.origin.join("config.json"),
                            format!(
                                "not the vision tower {} was made with: {} (this directory's, then mm_cfg.vision_encoder.hf_config's)",
                                path.display(),
                                differing.join(", ")
                            ),
                        ));
                    }
                }
                (v.tensors, v.config, VisionSource::Directory(v.origin), v.preprocessor)
            }
            None => {
                let name = from_pretrained.clone().unwrap_or_default();
                let config = yaml_config.or_else(|| names::known_clip_config(&name)).unwrap_or(Json::Null);
                (TensorMap::new(), config, VisionSource::Named(name), None)
            }
        }
    };
    let class_tokens = cfg.get_usize("mm_cfg.vision_encoder.class_token_length").unwrap_or(1);
    if class_tokens > 1 {
        return Err(Error::invalid(
            path,
            format!("mm_cfg.vision_encoder.class_token_length {class_tokens} (only 0 or 1 are supported)"),
        ));
    }
    let width = clip::tower_dims(&vision_config, path)?
        .map(|d| d.hidden_size)
        .or(cfg.get_usize("mm_cfg.vision_encoder.hidden_size"))
        .ok_or_else(|| Error::missing(path, "mm_cfg.vision_encoder.hidden_size"))?;
    let projector = llava::check_projector(kind, width, llm.hparams.hidden, projector, path)?;
    let template =
        cfg.get_str("data.conv_template").or(cfg.get_str("mm_cfg.llm.model_type")).and_then(Template::parse);
    // The source's HF tokenizer files, kept for converting back (see `to_neva`).
    let (tokenizer_json, tokenizer_config) = tokenizer::hf_tokenizer_files(ckpt);
    let c = CanonicalLlava {
        llm,
        vision: vision_tensors,
        vision_config,
        projector,
        projector_type: kind.name(),
        image_token: patch,
        vision_feature_layer: cfg
            .get("mm_cfg.vision_encoder.vision_select_layer")
            .and_then(serde_yaml::Value::as_i64)
            .unwrap_or(-2) as isize,
        drop_cls: class_tokens == 1,
        origin: path.clone(),
        vision_source,
        image_tokens: ImageTokenScheme::NevaSpan {
            start,
            patch,
            end,
            use_im_start_end: cfg.get_bool("mm_cfg.use_im_start_end").unwrap_or(false),
        },
        image_aspect_ratio: cfg.get_str("data.image_aspect_ratio").map(str::to_string),
        template,
        tokenizer: Some(ByteSource::owned(sp.bytes().to_vec())),
        tokenizer_json,
        tokenizer_config,
        preprocessor,
        converted_from,
    };
    if let (Some(stored), Some(derived)) = (cfg.get_usize("data.image_token_len"), c.image_token_len()) {
        if stored != derived {
            return Err(Error::invalid(
                path,
                format!("data.image_token_len is {stored} but the vision tower gives {derived} features per image"),
            ));
        }
    }
    Ok(c)
}

/// Undo what a conversion into NeVA changed in the vocabulary (recorded as `converted_from`): the
/// appended `<extra_id_*>` pieces are removed from the tokenizer, the embedding and head go back
/// to the source's rows, and the image tokens to the source's scheme. A bundle without that
/// record, or whose appended pieces were edited since, keeps the NeVA tokenizer.
pub fn undo_neva_tokens(c: &mut CanonicalLlava) -> Result<()> {
    let Some(cf) = c.converted_from.take() else { return Ok(()) };
    if cf.added_pieces > 0 {
        let Some(sp) = c.sentencepiece()? else { return Ok(()) };
        let appended = &EXTRA_IDS[EXTRA_IDS.len().saturating_sub(cf.added_pieces)..];
        let Some(base) = sp.without_appended(appended, &c.origin) else { return Ok(()) };
        c.tokenizer = Some(ByteSource::owned(base.bytes().to_vec()));
    }
    if c.llm.hparams.vocab > cf.vocab_size {
        llava::trim_vocab(&mut c.llm, cf.vocab_size)?;
    }
    match (cf.format.as_str(), cf.image_token_index) {
        ("llava-hf", Some(image)) => {
            c.image_tokens = ImageTokenScheme::Repeated { image, pad: cf.pad_token_id };
            c.image_token = image;
        }
        _ => {
            c.image_tokens = ImageTokenScheme::Placeholder;
            c.image_token = u32::MAX;
        }
    }
    Ok(())
}

/// Whether a checkpoint is a multimodal one this module and [`super::llava`] handle: a NeVA
/// `.nemo`, llava-hf, or original LLaVA.
pub fn is_multimodal(ckpt: &Checkpoint) -> bool {
    match &ckpt.meta.config {
        Some(ModelConfig::NemoYaml(cfg)) => is_neva(cfg),
        Some(ModelConfig::HfJson(cfg)) => llava::is_llava_hf(cfg) || llava::is_llava_original(cfg),
        None => false,
    }
}

/// A NeVA `.nemo` → NeVA `.nemo` at another TP/PP/dialect/dtype. The vision tower keeps its
/// placement (`t.vision` is ignored), `make_vocab_size_divisible_by` and every recorded fact
/// survive.
pub fn reshard_neva(src: &Checkpoint, t: &NevaTarget) -> Result<Checkpoint> {
    let c = from_neva(src, None)?;
    let Some(ModelConfig::NemoYaml(cfg)) = &src.meta.config else {
        return Err(Error::missing(&src.meta.path, "model_config.yaml (a NeVA .nemo's config)"));
    };
    let mut t = t.clone();
    t.divisible_by = t.divisible_by.or(cfg.get_usize("make_vocab_size_divisible_by"));
    t.vision = if c.vision_source == VisionSource::Bundled {
        VisionPlacement::Bundle
    } else {
        VisionPlacement::Reference(
            cfg.get_str("mm_cfg.vision_encoder.from_pretrained").unwrap_or_default().to_string(),
        )
    };
    to_neva(&c, &t)
}

/// A per-rank mcore NeVA checkpoint (what [`to_neva`] builds) as the Megatron-core distributed
/// checkpoint NeMo's MegatronNevaModel saves since dist-ckpt support came to NeVA (May 2024,
/// formats.md §1.6, §6.1). Its `sharded_state_dict` is GPT's filtered to the parameters NeVA
/// saves (`get_keys_to_keep`: the projector always, the LLM and the tower when unfrozen), so:
/// the LLM's arrays are exactly LLaMA's ([`llama::dist_weights`]) when the file holds the LLM,
/// but without Transformer Engine's `_extra_state` objects (not parameters, so filtered out);
/// the projector and a bundled tower are each one replicated array under its state-dict key, as
/// `NevaWordEmbeddingMixin.sharded_state_dict` makes them. Nothing is read here.
pub fn dist_weights(ckpt: &Checkpoint) -> Result<nemo::DistWeights> {
    let path = &ckpt.meta.path;
    let Some(ModelConfig::NemoYaml(cfg)) = &ckpt.meta.config else {
        return Err(Error::missing(path, "model_config.yaml (a NeVA .nemo's config)"));
    };
    let keys = ckpt.shards.iter().flat_map(|s| s.tensors.keys().map(String::as_str));
    if llama_names::dialect_of(Some(cfg), keys) != NemoDialect::Mcore {
        return Err(Error::invalid(
            path,
            "a distributed checkpoint holds megatron-core names; the legacy NeVA layout has none (use --layout mcore)",
        ));
    }
    let multimodal = |key: &str| {
        names::neva_projector_canonical(key).is_some() || names::neva_vision_canonical(key).is_some()
    };
    let holds_llm = ckpt.shards.iter().any(|s| s.tensors.keys().any(|k| !multimodal(k)));
    let mut weights = if holds_llm {
        let mut llm = llama::dist_weights(ckpt)?;
        llm.objects.clear();
        llm
    } else {
        nemo::DistWeights::default()
    };
    // Replicated on the first stage's ranks: rank tp=0's copy is the array; every other rank of
    // that stage holds the same keys with the same shapes and dtypes (values are not compared:
    // that would read every copy), and no later stage holds any.
    let first_stage: Vec<&Shard> = ckpt.shards.iter().filter(|s| s.rank.pp == 0).collect();
    let Some(first) = first_stage.iter().find(|s| s.rank.tp == 0) else {
        return Err(Error::missing(path, "rank tp=0 pp=0 (where NeVA keeps its projector)"));
    };
    for s in &ckpt.shards {
        if let Some(key) =
            s.tensors.keys().find(|k| multimodal(k) && (s.rank.pp != 0 || !first.tensors.contains_key(*k)))
        {
            return Err(Error::invalid(
                path,
                format!(
                    "rank tp={} pp={} holds '{key}', which rank tp=0 pp=0 does not; NeVA keeps one replicated copy \
                     per rank of the first pipeline stage",
                    s.rank.tp, s.rank.pp
                ),
            ));
        }
    }
    for (key, t) in first.tensors.iter().filter(|(k, _)| multimodal(k)) {
        for s in &first_stage {
            match s.tensors.get(key) {
                Some(other) if other.shape == t.shape && other.dtype == t.dtype => {}
                other => {
                    return Err(Error::invalid(
                        path,
                        format!(
                            "tensor '{key}' is replicated but rank tp={} holds {} where tp=0 holds {} {:?}",
                            s.rank.tp,
                            other.map_or("nothing".to_string(), |o| format!("{} {:?}", o.dtype, o.shape)),
                            t.dtype,
                            t.shape
                        ),
                    ))
                }
            }
        }
        weights.arrays.push(nemo::DistArray {
            key: key.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            chunk: t.shape.clone(),
            chunks: vec![t.clone()],
        });
    }
    if weights.arrays.is_empty() {
        return Err(Error::missing(path, "NeVA weights (neither LLM nor projector tensors)"));
    }
    Ok(weights)
}

/// Any multimodal checkpoint ([`is_multimodal`]) as canonical parts, in its own terms (a NeVA's
/// vocabulary as NeVA has it; [`undo_neva_tokens`] restores its source's). `vision` is an HF
/// CLIP tower the user gave: the tower a NeVA or LLaVA only names ([`from_neva`],
/// [`llava::from_llava_original`]), or one replacing llava-hf's bundled tower. A llava-hf's
/// parts are as stored ([`llava::checked_llava_hf`] checks them), so `diff` can report what
/// is missing.
pub fn read_multimodal(ckpt: &Checkpoint, vision: Option<ClipVision>) -> Result<CanonicalLlava> {
    match &ckpt.meta.config {
        Some(ModelConfig::NemoYaml(_)) => from_neva(ckpt, vision),
        Some(ModelConfig::HfJson(cfg)) if llava::is_llava_hf(cfg) => {
            let mut c = llava::from_llava_hf(ckpt)?;
            if let Some(v) = vision {
                (c.vision, c.vision_config, c.vision_source) =
                    (v.tensors, v.config, VisionSource::Directory(v.origin));
                c.preprocessor = v.preprocessor.or(c.preprocessor);
            }
            Ok(c)
        }
        _ => llava::from_llava_original(ckpt, vision),
    }
}

/// The tensors of any multimodal checkpoint under canonical names — LLaMA's HF names, the tower's
/// `vision_model.*`, the projector's `mm_projector.*` — with a NeVA file's vocabulary changes
/// undone ([`undo_neva_tokens`]), so a NeVA `.nemo` compares equal to the llava-hf or LLaVA
/// checkpoint it was converted from (for `shardsmith diff`). The vision tower is included when
/// its weights resolve (bundled, or a local `from_pretrained` / `mm_vision_tower` directory).
pub fn canonical_tensors(ckpt: &Checkpoint) -> Result<TensorMap> {
    let mut c = read_multimodal(ckpt, None)?;
    undo_neva_tokens(&mut c)?;
    let mut out = std::mem::take(&mut c.llm.tensors);
    out.extend(std::mem::take(&mut c.vision));
    out.extend(std::mem::take(&mut c.projector));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::TensorEntry;
    use crate::convert::llama::tests::{assert_same, canonical, hparams};
    use proptest::prelude::*;
    use std::sync::Arc;

    fn llava_tiny() -> CanonicalLlava {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/llava-tiny");
        llava::from_llava_hf_checked(&formats::open(&dir).unwrap()).unwrap()
    }

    /// A projector of `kind` from vision width `c` to LLM width `h` whose elements are all distinct
    /// (and distinct from the language model's, which count up from 1).
    fn projector(kind: ProjectorType, c: usize, h: usize) -> TensorMap {
        let origin: Arc<Path> = Arc::from(Path::new("synthetic"));
        let mut next = 1u32 << 30;
        kind.shapes(c, h)
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let bytes: Vec<u8> = (0..n)
                    .flat_map(|_| {
                        next += 1;
                        next.to_le_bytes()
                    })
                    .collect();
                (name, TensorEntry::new(DType::F32, shape, ByteSource::owned(bytes), origin.clone()))
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// llava-tiny's tokenizer (256 pieces), tower and image tokens (llava-hf's `<image>` 256
        /// and `<pad>` 257, any vocabulary past them; or original LLaVA's placeholder, with a
        /// vocabulary from 16 rows short of the tokenizer, which NeVA grows, to 64 past it)
        /// around a random language model (MHA or GQA, tied or not) and a random projector (linear or an MLP of 1–3 linears) → a NeVA
        /// `.nemo` at any TP, PP, layout and vocabulary divisibility NeVA allows → back
        /// ([`from_neva`], then [`undo_neva_tokens`], as `convert` does) is the identity: every
        /// tensor bit for bit, the hyperparameters, projector type, image tokens and tokenizer.
        /// On the way the projector and tower sit on every tensor-parallel rank of the first
        /// stage and nowhere else, and the tokenizer has NeVA's `<extra_id_0..7>`.
        #[test]
        fn neva_round_trip_is_identity(
            groups_log in 0u32..3, hpg in prop_oneof![Just(1usize), Just(2)], head_dim in 1usize..3,
            ffn_mult in 1usize..3, layers_per_stage in 1usize..3, extra_rows in 0usize..80, tied: bool,
            tp_log in 0u32..3, pp in 1usize..3, legacy: bool, depth in 0usize..4,
            m in prop_oneof![Just(None), Just(Some(1usize)), Just(Some(8))], placeholder: bool,
        ) {
            let groups = 1usize << groups_log;
            let tp = 1usize << tp_log.min(groups_log);
            // NeVA's legacy layout has neither grouped-query attention nor pipeline stages.
            let dialect = if legacy && hpg == 1 { NemoDialect::Legacy } else { NemoDialect::Mcore };
            let pp = if dialect == NemoDialect::Legacy { 1 } else { pp };
            let vocab = if placeholder { 240 + extra_rows } else { 258 + extra_rows };
            let hp = hparams(groups * hpg, groups, head_dim * 2, ffn_mult * tp, layers_per_stage * pp, vocab, tied);
            let kind = if depth == 0 { ProjectorType::Linear } else { ProjectorType::MlpGelu { depth } };
            let mut c = llava_tiny();
            let vision_width = c.vision_hidden().unwrap();
            c.llm = canonical(&hp);
            c.projector = projector(kind, vision_width, hp.hidden);
            c.projector_type = kind.name();
            c.template = Some(Template::VicunaV1);
            if placeholder {
                (c.image_tokens, c.image_token) = (ImageTokenScheme::Placeholder, u32::MAX);
            }
            let t = NevaTarget {
                dialect, tp, pp, dtype: None, vision: VisionPlacement::Bundle, template: None,
                image_aspect_ratio: None, divisible_by: m, source_format: None,
            };
            let nemo = to_neva(&c, &t).unwrap();
            let (proj, vis) = (names::projector_prefix(dialect), names::vision_prefix(dialect));
            for s in &nemo.shards {
                let (p, v) = (s.tensors.keys().filter(|k| k.starts_with(proj)).count(), s.tensors.keys().filter(|k| k.starts_with(vis)).count());
                let first = s.rank.pp == 0;
                prop_assert_eq!((p, v), if first { (c.projector.len(), c.vision.len()) } else { (0, 0) }, "rank {:?}", s.rank);
            }
            let neva_view = from_neva(&nemo, None).unwrap();
            let sp = neva_view.sentencepiece().unwrap().unwrap();
            prop_assert!(EXTRA_IDS.iter().all(|t| sp.id(t).is_some()));
            let mut back = neva_view;
            undo_neva_tokens(&mut back).unwrap();
            prop_assert_eq!(&back.llm.hparams, &c.llm.hparams);
            assert_same(&back.llm.tensors, &c.llm.tensors);
            assert_same(&back.projector, &c.projector);
            assert_same(&back.vision, &c.vision);
            prop_assert_eq!(&back.projector_type, &c.projector_type);
            prop_assert_eq!(back.image_tokens, c.image_tokens);
            prop_assert_eq!(back.image_token, c.image_token);
            let bytes = |x: &CanonicalLlava| x.tokenizer.as_ref().unwrap().bytes().unwrap().into_owned();
            prop_assert_eq!(bytes(&back), bytes(&c));
        }
    }
}
