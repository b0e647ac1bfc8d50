//! LLaVA-style bundles in canonical form — the LLaMA language model (HF LLaMA names), the CLIP
//! vision tower (`vision_model.*`, HF `CLIPVisionModel` names), the projector (`mm_projector.*`,
//! the LLaVA/NeVA suffixes, formats.md §6.1–§6.3) and what ties them together (tokenizer, image
//! tokens, template) — and the two HF-side layouts:
//!
//! * llava-hf (`LlavaForConditionalGeneration`). Both key spellings are read: the published one
//!   (`language_model.model.*`, `language_model.lm_head.*`, `vision_tower.*`,
//!   `multi_modal_projector.*`) and the one newer transformers use in memory
//!   (`model.language_model.*`, `lm_head.*`, `model.vision_tower.*`,
//!   `model.multi_modal_projector.*`). The published one is written.
//! * original LLaVA (liuhaotian, `LlavaLlamaForCausalLM`): LLaMA keys + `model.mm_projector.*`,
//!   `mm_*` keys in `config.json`, the vision tower referenced by `mm_vision_tower` (§6.2, §7.4).
//!
//! NeVA `.nemo` is in [`super::neva`].

use crate::checkpoint::{
    Artifact, ByteSource, Checkpoint, Flavour, Meta, ModelConfig, Parallelism, TensorMap,
};
use crate::convert::clip::{self, json_bytes, ClipVision};
use crate::convert::llama::{self, CanonicalLlama};
use crate::convert::sentencepiece::SentencePieceModel;
use crate::convert::{tokenizer, vocab};
use crate::error::{Error, Result};
use crate::names::neva::{self as names, ConvertedFrom, ProjectorType, Template};
use crate::DType;
use serde_json::{json, Value as Json};
use std::path::{Path, PathBuf};

/// Where a bundle's vision tower comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VisionSource {
    /// Its weights are in the checkpoint itself (llava-hf, a NeVA with an unfrozen tower).
    Bundled,
    /// An HF CLIP directory on disk (given by the user, or a local `from_pretrained` /
    /// `mm_vision_tower`); the weights are in [`CanonicalLlava::vision`].
    Directory(PathBuf),
    /// Referenced by a name only (an HF hub id such as `openai/clip-vit-large-patch14-336`):
    /// [`CanonicalLlava::vision`] is empty, [`CanonicalLlava::vision_config`] is the config when
    /// the name is a known tower, else `null`.
    Named(String),
}

/// How a prompt marks image positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageTokenScheme {
    /// llava-hf: N copies of the `image` id (`image_token_index`), each taking the next feature;
    /// `pad` is the padding token.
    Repeated {
        /// `image_token_index`.
        image: u32,
        /// `pad_token_id`.
        pad: Option<u32>,
    },
    /// Original LLaVA: one placeholder id −200 (`IMAGE_TOKEN_INDEX`) per image, expanded to N
    /// features inside the model; no vocabulary row stands for it.
    Placeholder,
    /// NeVA (formats.md §6.5): `start` (`<extra_id_4>`) + `patch` (`<extra_id_3>`) × (N − 2, or N
    /// with `use_im_start_end`) + `end` (`<extra_id_5>`), ids from the tokenizer.
    NevaSpan {
        /// `<extra_id_4>`.
        start: u32,
        /// `<extra_id_3>`.
        patch: u32,
        /// `<extra_id_5>`.
        end: u32,
        /// `mm_cfg.use_im_start_end`: the markers keep their embeddings and N patches sit between.
        use_im_start_end: bool,
    },
}

/// A LLaVA checkpoint split into canonical parts.
#[derive(Clone, Debug)]
pub struct CanonicalLlava {
    /// The language model.
    pub llm: CanonicalLlama,
    /// The vision tower, `vision_model.*` names (empty when only referenced by name).
    pub vision: TensorMap,
    /// The `vision_config` object (an HF `CLIPVisionConfig`); `null` when unknown.
    pub vision_config: Json,
    /// The projector, `mm_projector.*` names.
    pub projector: TensorMap,
    /// `mm_mlp_adapter_type` spelling of the projector (`mlp2x_gelu` for llava-hf).
    pub projector_type: String,
    /// The token id that stands for an image position: llava-hf's `image_token_index`; NeVA's
    /// `<extra_id_3>`; `u32::MAX` for original LLaVA (no id). See [`CanonicalLlava::image_tokens`].
    pub image_token: u32,
    /// `vision_feature_layer` (−2 in LLaVA-1.5).
    pub vision_feature_layer: isize,
    /// Whether the CLS token is dropped (`vision_feature_select_strategy: default`).
    pub drop_cls: bool,
    /// The checkpoint it came from.
    pub origin: PathBuf,
    /// Where the vision tower comes from.
    pub vision_source: VisionSource,
    /// How prompts mark images.
    pub image_tokens: ImageTokenScheme,
    /// `image_aspect_ratio` (`pad`, `square`, `keep`) when the source says.
    pub image_aspect_ratio: Option<String>,
    /// The conversation template, when the source says.
    pub template: Option<Template>,
    /// The SentencePiece `tokenizer.model`.
    pub tokenizer: Option<ByteSource>,
    /// The source's HF `tokenizer.json`. transformers' fast tokenizer does what this file says
    /// (llava-hf's, like Llama-2's, puts the `▁` prefix after every special token), which a
    /// file rebuilt from the SentencePiece model would not, so [`to_llava_hf`] writes it again
    /// when it still describes `tokenizer` and the image tokens.
    pub tokenizer_json: Option<ByteSource>,
    /// The source's HF `tokenizer_config.json`, whose settings (`legacy`, `add_prefix_space`, …)
    /// the HF directories written from this one keep ([`tokenizer::llama_tokenizer_config`]).
    pub tokenizer_config: Option<ByteSource>,
    /// HF `preprocessor_config.json` of the vision tower, when the source has one.
    pub preprocessor: Option<ByteSource>,
    /// What a NeVA file records about the checkpoint it was converted from.
    pub converted_from: Option<ConvertedFrom>,
}

impl CanonicalLlava {
    /// The tower's config as HF reads it (its defaults for absent keys), when there is one: `None`
    /// for a tower only named by a hub id, or a config the reader refuses (the writers and the
    /// loader report that one by name).
    pub fn vision_dims(&self) -> Option<clip::ClipVisionConfig> {
        clip::tower_dims(&self.vision_config, &self.origin).ok().flatten()
    }

    /// The vision tower's image side.
    pub fn image_size(&self) -> Option<usize> {
        self.vision_dims().map(|v| v.image_size)
    }

    /// The vision tower's patch side.
    pub fn patch_size(&self) -> Option<usize> {
        self.vision_dims().map(|v| v.patch_size)
    }

    /// The vision width C (projector input), from the config or the projector's first weight.
    pub fn vision_hidden(&self) -> Option<usize> {
        self.vision_dims().map(|v| v.hidden_size).or_else(|| {
            let first = ["mm_projector.0.weight", "mm_projector.weight"]
                .into_iter()
                .find_map(|n| self.projector.get(n))?;
            first.shape.get(1).copied()
        })
    }

    /// Features per image N = (image / patch)², plus one when CLS is kept.
    pub fn image_token_len(&self) -> Option<usize> {
        let (s, p) = (self.image_size()?, self.patch_size()?);
        (p > 0).then(|| (s / p).pow(2) + usize::from(!self.drop_cls))
    }

    /// Refuse a feature layer the tower does not have, when its config is known (a tower only
    /// named by a hub id has none here). Every bundle writer checks it, whatever the source.
    pub fn check_feature_layer(&self) -> Result<()> {
        if !self.vision_config.is_object() {
            return Ok(());
        }
        clip::check_feature_layer(
            self.vision_feature_layer,
            &self.vision_config,
            "vision feature layer",
            &self.origin,
        )
    }

    /// The parsed projector type.
    pub fn projector_kind(&self) -> Result<ProjectorType> {
        ProjectorType::parse(&self.projector_type).ok_or_else(|| {
            Error::invalid(
                &self.origin,
                format!("projector type '{}' is not supported (linear or mlpNx_gelu)", self.projector_type),
            )
        })
    }

    /// The tokenizer, parsed.
    pub fn sentencepiece(&self) -> Result<Option<SentencePieceModel>> {
        self.tokenizer
            .as_ref()
            .map(|t| SentencePieceModel::parse(t.bytes()?.into_owned(), &self.origin.join("tokenizer.model")))
            .transpose()
    }
}

/// Whether `cfg` is a llava-hf `config.json` (`model_type: llava` with a `text_config`; the
/// original LLaVA also used `model_type: llava`, for a flat LLaMA config).
pub fn is_llava_hf(cfg: &Json) -> bool {
    cfg.get("model_type").and_then(Json::as_str) == Some("llava")
        && cfg.get("text_config").is_some_and(Json::is_object)
}

/// Whether `cfg` is an original LLaVA (liuhaotian) `config.json`: a flat LLaMA config with the
/// `mm_*` keys LLaVA's training writes.
pub fn is_llava_original(cfg: &Json) -> bool {
    let model_type = cfg.get("model_type").and_then(Json::as_str).unwrap_or("");
    matches!(model_type, "llava" | "llava_llama")
        && !is_llava_hf(cfg)
        && (cfg.get("mm_vision_tower").is_some() || cfg.get("mm_projector_type").is_some())
}

/// Which part a llava-hf key belongs to, and its canonical name there.
enum Part {
    Llm(String),
    Vision(String),
    Projector(String),
}

fn classify(name: &str) -> Option<Part> {
    if let Some(rest) = name.strip_prefix("language_model.model.") {
        return Some(Part::Llm(format!("model.{rest}")));
    }
    if let Some(rest) = name.strip_prefix("model.language_model.") {
        return Some(Part::Llm(format!("model.{rest}")));
    }
    if name == "language_model.lm_head.weight" || name == "lm_head.weight" {
        return Some(Part::Llm("lm_head.weight".into()));
    }
    let vision = name.strip_prefix("vision_tower.").or_else(|| name.strip_prefix("model.vision_tower."));
    if let Some(rest) = vision {
        return Some(Part::Vision(rest.to_string()));
    }
    let mmp = name
        .strip_prefix("multi_modal_projector.")
        .or_else(|| name.strip_prefix("model.multi_modal_projector."))?;
    let (linear, param) = mmp.split_once('.')?;
    let index = match linear {
        "linear_1" => 0,
        "linear_2" => 2,
        _ => return None,
    };
    Some(Part::Projector(format!("mm_projector.{index}.{param}")))
}

/// Order `found` by the projector's canonical shapes, proving nothing is missing or left over.
pub fn check_projector(
    kind: ProjectorType,
    c: usize,
    h: usize,
    mut found: TensorMap,
    path: &Path,
) -> Result<TensorMap> {
    let mut out = TensorMap::new();
    for (name, shape) in kind.shapes(c, h) {
        match found.shift_remove(&name) {
            Some(t) if t.shape == shape => {
                super::require_float("projector tensor", &name, &t, path)?;
                out.insert(name, t);
            }
            Some(t) => {
                return Err(Error::invalid(
                    path,
                    format!(
                        "projector tensor '{name}': expected {shape:?} ({} from vision width {c} to LLM width {h}), got {:?}",
                        kind.name(),
                        t.shape
                    ),
                ))
            }
            None => return Err(Error::missing(path, format!("projector tensor '{name}' ({})", kind.name()))),
        }
    }
    if !found.is_empty() {
        let left: Vec<String> = found.into_keys().collect();
        return Err(Error::invalid(
            path,
            format!("projector tensors that a {} projector does not have: {}", kind.name(), left.join(", ")),
        ));
    }
    Ok(out)
}

/// The projector type a set of canonical names spells, or an error listing them.
pub fn projector_type_of(projector: &TensorMap, path: &Path) -> Result<ProjectorType> {
    ProjectorType::from_names(projector.keys().map(String::as_str)).ok_or_else(|| {
        let names: Vec<&str> = projector.keys().map(String::as_str).collect();
        Error::invalid(
            path,
            format!("projector tensors [{}] are not a linear or mlpNx_gelu projector", names.join(", ")),
        )
    })
}

fn artifact<'a>(ckpt: &'a Checkpoint, name: &str) -> Option<&'a ByteSource> {
    ckpt.meta.artifacts.iter().find(|a| a.name == name).map(|a| &a.source)
}

/// The template a llava-hf directory's chat template renders (`chat_template.json`,
/// `chat_template.jinja` or `tokenizer_config.json`'s `chat_template`), if recognisable.
fn hf_template(ckpt: &Checkpoint) -> Option<Template> {
    let text = |name: &str| -> Option<String> {
        String::from_utf8(artifact(ckpt, name)?.bytes().ok()?.into_owned()).ok()
    };
    let from_json = |name: &str| -> Option<String> {
        let v: Json = serde_json::from_str(&text(name)?).ok()?;
        v.get("chat_template")?.as_str().map(str::to_string)
    };
    let jinja = from_json("chat_template.json")
        .or_else(|| text("chat_template.jinja"))
        .or_else(|| from_json("tokenizer_config.json"))?;
    Template::from_chat_template(&jinja)
}

/// llava-hf checkpoint → canonical parts. Every stored tensor must land in a part.
pub fn from_llava_hf(ckpt: &Checkpoint) -> Result<CanonicalLlava> {
    let path = &ckpt.meta.path;
    let Some(ModelConfig::HfJson(cfg)) = &ckpt.meta.config else {
        return Err(Error::missing(path, "config.json (a llava-hf directory needs one)"));
    };
    if !is_llava_hf(cfg) {
        return Err(Error::invalid(
            path,
            "config.json: not a llava-hf config (model_type 'llava' with a text_config)",
        ));
    }
    let text_config = cfg
        .get("text_config")
        .filter(|v| v.is_object())
        .ok_or_else(|| Error::missing(path, "config.json: 'text_config'"))?;
    let vision_config = cfg
        .get("vision_config")
        .filter(|v| v.is_object())
        .cloned()
        .ok_or_else(|| Error::missing(path, "config.json: 'vision_config'"))?;
    let act = cfg.get("projector_hidden_act").and_then(Json::as_str).unwrap_or("gelu");
    if act != "gelu" {
        return Err(Error::invalid(
            path,
            format!("config.json: projector_hidden_act '{act}' is not supported (expected 'gelu')"),
        ));
    }
    let strategy = cfg.get("vision_feature_select_strategy").and_then(Json::as_str).unwrap_or("default");
    let drop_cls = match strategy {
        "default" => true,
        "full" => false,
        other => {
            return Err(Error::invalid(
                path,
                format!(
                    "config.json: vision_feature_select_strategy '{other}' (expected 'default' or 'full')"
                ),
            ))
        }
    };
    let vision_feature_layer = match cfg.get("vision_feature_layer") {
        None => -2,
        Some(v) => v.as_i64().map(|l| l as isize).ok_or_else(|| {
            Error::invalid(
                path,
                "config.json: vision_feature_layer must be one integer (lists are not supported)",
            )
        })?,
    };
    let key = if cfg.get("image_token_index").is_some() { "image_token_index" } else { "image_token_id" };
    let image_token = match cfg.get(key) {
        None | Some(Json::Null) => return Err(Error::missing(path, "config.json: 'image_token_index'")),
        Some(v) => v
            .as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| Error::invalid(path, format!("config.json: {key} must be a token id, got {v}")))?,
    };
    let pad = cfg
        .get("pad_token_id")
        .or_else(|| text_config.get("pad_token_id"))
        .and_then(Json::as_u64)
        .map(|p| p as u32);

    let (mut llm, mut vision, mut projector) = (TensorMap::new(), TensorMap::new(), TensorMap::new());
    let mut unmapped = Vec::new();
    for (name, t) in ckpt.tensors()? {
        match classify(name) {
            Some(Part::Llm(n)) => llm.insert(n, t.clone()),
            Some(Part::Vision(n)) => vision.insert(n, t.clone()),
            Some(Part::Projector(n)) => projector.insert(n, t.clone()),
            None => {
                unmapped.push(name.clone());
                None
            }
        };
    }
    if !unmapped.is_empty() {
        return Err(Error::invalid(path, format!("unmapped llava-hf tensors: {}", unmapped.join(", "))));
    }
    // Buffers older files carry; the model recomputes them.
    vision.shift_remove("vision_model.embeddings.position_ids");
    let llm = llama::from_hf_parts(text_config, llm, path)?;
    // The image token is an embedding row like any other.
    let rows = llm.hparams.vocab;
    if image_token as usize >= rows {
        return Err(Error::invalid(
            path,
            format!("config.json: image_token_index {image_token} is past the {rows}-row embedding"),
        ));
    }
    let (tokenizer_json, tokenizer_config) = tokenizer::hf_tokenizer_files(ckpt);
    Ok(CanonicalLlava {
        llm,
        vision,
        vision_config,
        projector,
        projector_type: "mlp2x_gelu".into(),
        image_token,
        vision_feature_layer,
        drop_cls,
        origin: Path::to_path_buf(path),
        vision_source: VisionSource::Bundled,
        image_tokens: ImageTokenScheme::Repeated { image: image_token, pad },
        image_aspect_ratio: None,
        template: hf_template(ckpt),
        tokenizer: artifact(ckpt, "tokenizer.model").cloned(),
        tokenizer_json,
        tokenizer_config,
        preprocessor: artifact(ckpt, "preprocessor_config.json").cloned(),
        converted_from: None,
    })
}

/// llava-hf → canonical with every part checked: the vision tower complete for its config and
/// the projector complete for `mlp2x_gelu` (for conversions, which must not carry a partial part).
pub fn from_llava_hf_checked(ckpt: &Checkpoint) -> Result<CanonicalLlava> {
    checked_llava_hf(from_llava_hf(ckpt)?, &ckpt.meta.path)
}

/// [`from_llava_hf_checked`]'s checks on parts read from the llava-hf directory `path`.
pub fn checked_llava_hf(mut c: CanonicalLlava, path: &Path) -> Result<CanonicalLlava> {
    c.vision = clip::check_clip(&c.vision_config, std::mem::take(&mut c.vision), path)?;
    clip::check_feature_layer(
        c.vision_feature_layer,
        &c.vision_config,
        "config.json: vision_feature_layer",
        path,
    )?;
    let width = c.vision_hidden().unwrap_or(0);
    c.projector = check_projector(
        c.projector_kind()?,
        width,
        c.llm.hparams.hidden,
        std::mem::take(&mut c.projector),
        path,
    )?;
    Ok(c)
}

/// Original LLaVA (liuhaotian) checkpoint → canonical parts. `vision` is an HF CLIP tower given
/// by the user; without it, `mm_vision_tower` is read when it names a local directory and kept as
/// a reference otherwise.
pub fn from_llava_original(ckpt: &Checkpoint, vision: Option<ClipVision>) -> Result<CanonicalLlava> {
    let path = &ckpt.meta.path;
    let Some(ModelConfig::HfJson(cfg)) = &ckpt.meta.config else {
        return Err(Error::missing(path, "config.json (a LLaVA directory needs one)"));
    };
    if !is_llava_original(cfg) {
        return Err(Error::invalid(
            path,
            "config.json: not an original LLaVA config (model_type llava with mm_* keys)",
        ));
    }
    for key in ["mm_use_im_start_end", "mm_use_im_patch_token"] {
        if cfg.get(key).and_then(Json::as_bool) == Some(true) {
            return Err(Error::invalid(
                path,
                format!("config.json: {key} is true; LLaVA then adds its own image tokens to the vocabulary, which is not supported"),
            ));
        }
    }
    let projector_type = cfg.get("mm_projector_type").and_then(Json::as_str).unwrap_or("linear").to_string();
    let kind = ProjectorType::parse(&projector_type).ok_or_else(|| {
        Error::invalid(
            path,
            format!(
                "config.json: mm_projector_type '{projector_type}' is not supported (linear or mlpNx_gelu)"
            ),
        )
    })?;
    let drop_cls = match cfg.get("mm_vision_select_feature").and_then(Json::as_str).unwrap_or("patch") {
        "patch" => true,
        "cls_patch" => false,
        other => {
            return Err(Error::invalid(
                path,
                format!("config.json: mm_vision_select_feature '{other}' (expected 'patch' or 'cls_patch')"),
            ))
        }
    };
    let (mut llm, mut projector, mut tower) = (TensorMap::new(), TensorMap::new(), Vec::new());
    for (name, t) in ckpt.tensors()? {
        if let Some(canonical) = names::llava_projector_canonical(name) {
            projector.insert(canonical, t.clone());
        } else if name.starts_with("model.vision_tower.") {
            tower.push(name.clone());
        } else {
            llm.insert(name.clone(), t.clone());
        }
    }
    if !tower.is_empty() {
        return Err(Error::invalid(
            path,
            format!(
                "holds {} vision-tower tensors ({}, ...), which LLaVA reloads from mm_vision_tower; converting \
                 them is not supported: save the tower as an HF CLIP directory and pass it with --vision",
                tower.len(),
                tower[0]
            ),
        ));
    }
    let mut llama_cfg = cfg.clone();
    llama_cfg["model_type"] = json!("llama");
    let llm = llama::from_hf_parts(&llama_cfg, llm, path)?;
    let hidden = llm.hparams.hidden;
    let reference = cfg.get("mm_vision_tower").and_then(Json::as_str).map(str::to_string);
    let vision = match (vision, &reference) {
        (Some(v), _) => Some(v),
        (None, Some(r)) if Path::new(r).is_dir() => Some(clip::read_hf_clip(Path::new(r))?),
        _ => None,
    };
    let (tensors, vision_config, vision_source, preprocessor) = match vision {
        Some(v) => (v.tensors, v.config, VisionSource::Directory(v.origin), v.preprocessor),
        None => {
            let name = reference.ok_or_else(|| {
                Error::missing(path, "config.json: 'mm_vision_tower' (and no --vision given)")
            })?;
            let known = names::known_clip_config(&name).unwrap_or(Json::Null);
            (TensorMap::new(), known, VisionSource::Named(name), None)
        }
    };
    let width = tensors_width(&vision_config)
        .or_else(|| cfg.get("mm_hidden_size").and_then(Json::as_u64).map(|v| v as usize))
        .ok_or_else(|| Error::missing(path, "config.json: 'mm_hidden_size' (the vision width)"))?;
    if let Some(declared) = cfg.get("mm_hidden_size").and_then(Json::as_u64) {
        if declared as usize != width {
            return Err(Error::invalid(
                path,
                format!("config.json: mm_hidden_size {declared} but the vision tower is {width} wide"),
            ));
        }
    }
    let projector = check_projector(kind, width, hidden, projector, path)?;
    let (tokenizer_json, tokenizer_config) = tokenizer::hf_tokenizer_files(ckpt);
    Ok(CanonicalLlava {
        llm,
        vision: tensors,
        vision_config,
        projector,
        projector_type: kind.name(),
        image_token: u32::MAX,
        vision_feature_layer: cfg.get("mm_vision_select_layer").and_then(Json::as_i64).unwrap_or(-2) as isize,
        drop_cls,
        origin: path.clone(),
        vision_source,
        image_tokens: ImageTokenScheme::Placeholder,
        image_aspect_ratio: cfg.get("image_aspect_ratio").and_then(Json::as_str).map(str::to_string),
        template: None,
        tokenizer: artifact(ckpt, "tokenizer.model").cloned(),
        tokenizer_json,
        tokenizer_config,
        preprocessor,
        converted_from: None,
    })
}

/// The tower width of a `CLIPVisionConfig` object as HF reads it (its default for an absent
/// key); `None` for no config (`null`) or one the reader refuses.
fn tensors_width(cfg: &Json) -> Option<usize> {
    clip::tower_dims(cfg, Path::new("")).ok().flatten().map(|c| c.hidden_size)
}

fn hf_meta(origin: &Path, config: Json, artifacts: Vec<Artifact>) -> Meta {
    Meta {
        path: origin.to_path_buf(),
        flavour: Flavour::HfSafetensorsDir { sharded: true },
        parallel: Parallelism::default(),
        config: Some(ModelConfig::HfJson(config)),
        artifacts,
    }
}

fn json_artifact(name: &str, v: &Json) -> Artifact {
    Artifact { name: name.into(), source: ByteSource::owned(json_bytes(v)) }
}

/// An added-token entry of `tokenizer_config.json`.
fn added_token(content: &str) -> Json {
    json!({"content": content, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": true})
}

/// Make `c` carry llava-hf's image and pad tokens: a bundle already in llava-hf's scheme keeps its
/// ids; otherwise `<image>` and `<pad>` become ids V and V + 1 after the V tokenizer pieces, and
/// the embedding and head grow to a multiple of 64 rows by the mean rule ([`vocab`]), as
/// transformers' converter lays llava-hf out (formats.md §6.3).
fn with_hf_image_tokens(c: &mut CanonicalLlava) -> Result<(u32, u32)> {
    if let ImageTokenScheme::Repeated { image, pad: Some(pad) } = c.image_tokens {
        return Ok((image, pad));
    }
    let pieces = c.sentencepiece()?.map(|sp| sp.len()).ok_or_else(|| {
        Error::missing(&c.origin, "tokenizer.model (needed to place llava-hf's <image> token)")
    })?;
    let (image, pad) = (pieces as u32, pieces as u32 + 1);
    let rows = (pieces + 2).div_ceil(names::HF_VOCAB_MULTIPLE) * names::HF_VOCAB_MULTIPLE;
    let rows = rows.max(c.llm.hparams.vocab);
    grow_vocab(&mut c.llm, rows)?;
    c.image_tokens = ImageTokenScheme::Repeated { image, pad: Some(pad) };
    c.image_token = image;
    Ok((image, pad))
}

/// Grow the embedding (and untied head) to `rows` by the mean rule.
pub fn grow_vocab(llm: &mut CanonicalLlama, rows: usize) -> Result<()> {
    if rows == llm.hparams.vocab {
        return Ok(());
    }
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        if let Some(t) = llm.tensors.get(name) {
            let grown = vocab::extend_rows_with_mean(name, t, rows)?;
            llm.tensors.insert(name.to_string(), grown);
        }
    }
    llm.hparams.vocab = rows;
    Ok(())
}

/// Keep the first `rows` rows of the embedding and head.
pub fn trim_vocab(llm: &mut CanonicalLlama, rows: usize) -> Result<()> {
    if rows == llm.hparams.vocab {
        return Ok(());
    }
    if rows > llm.hparams.vocab {
        return Err(Error::invalid(
            &llm.origin,
            format!("cannot trim a {}-row vocabulary to {rows} rows", llm.hparams.vocab),
        ));
    }
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        if let Some(t) = llm.tensors.get(name) {
            let cut = crate::transforms::trim_rows(name, t, rows)?;
            llm.tensors.insert(name.to_string(), cut);
        }
    }
    llm.hparams.vocab = rows;
    Ok(())
}

/// The vision tower's weights, or an error saying how to supply them.
fn require_vision<'a>(c: &'a CanonicalLlava, target: &str) -> Result<(&'a TensorMap, &'a Json)> {
    if c.vision.is_empty() {
        let name = match &c.vision_source {
            VisionSource::Named(n) => format!(" (it is referenced as '{n}')"),
            _ => String::new(),
        };
        return Err(Error::missing(
            &c.origin,
            format!("vision tower weights{name}; {target} stores the tower, so pass an HF CLIP directory with --vision PATH"),
        ));
    }
    Ok((&c.vision, &c.vision_config))
}

/// Canonical bundle → llava-hf directory checkpoint (`config.json`, weights under the published
/// llava-hf names, tokenizer and processor files).
pub fn to_llava_hf(c: &CanonicalLlava, dtype: Option<DType>) -> Result<Checkpoint> {
    c.check_feature_layer()?;
    let kind = c.projector_kind()?;
    if kind != (ProjectorType::MlpGelu { depth: 2 }) {
        return Err(Error::invalid(
            &c.origin,
            format!("llava-hf has only the mlp2x_gelu projector; this bundle's is {}", kind.name()),
        ));
    }
    let mut c = c.clone();
    let (image, pad) = with_hf_image_tokens(&mut c)?;
    let (vision, vision_config) = require_vision(&c, "llava-hf")?;
    let mut tensors = TensorMap::new();
    for (name, t) in llama::cast_all(&c.llm.tensors, dtype)? {
        let hf = match name.strip_prefix("model.") {
            Some(rest) => format!("language_model.model.{rest}"),
            None => format!("language_model.{name}"),
        };
        tensors.insert(hf, t);
    }
    for (name, t) in llama::cast_all(vision, dtype)? {
        tensors.insert(format!("vision_tower.{name}"), t);
    }
    for (name, t) in llama::cast_all(&c.projector, dtype)? {
        let hf = names::llava_hf_projector_name(&name).expect("mlp2x_gelu names map");
        tensors.insert(hf, t);
    }
    let stored = tensors.values().next().map_or(DType::F32, |t| t.dtype);
    let mut text_config = c.llm.hparams.hf_config(stored);
    text_config["pad_token_id"] = json!(pad);
    if let Some(obj) = text_config.as_object_mut() {
        obj.remove("architectures");
        obj.remove("torch_dtype");
    }
    let mut vcfg = vision_config.clone();
    if let Some(obj) = vcfg.as_object_mut() {
        obj.remove("architectures");
        obj.remove("torch_dtype");
        obj.insert("model_type".into(), json!("clip_vision_model"));
    }
    let image_size =
        c.image_size().ok_or_else(|| Error::missing(&c.origin, "vision config: 'image_size'"))?;
    let patch = c.patch_size().ok_or_else(|| Error::missing(&c.origin, "vision config: 'patch_size'"))?;
    let strategy = if c.drop_cls { "default" } else { "full" };
    let config = json!({
        "architectures": ["LlavaForConditionalGeneration"],
        "image_seq_length": c.image_token_len(),
        "image_token_index": image,
        "model_type": "llava",
        "multimodal_projector_bias": true,
        "pad_token_id": pad,
        "projector_hidden_act": "gelu",
        "text_config": text_config,
        "tie_word_embeddings": c.llm.hparams.tied,
        "torch_dtype": stored.torch_name(),
        "vision_config": vcfg,
        "vision_feature_layer": c.vision_feature_layer,
        "vision_feature_select_strategy": strategy,
    });
    let mut artifacts = tokenizer_files(&c, Some((image, pad)))?;
    artifacts.push(Artifact {
        name: "preprocessor_config.json".into(),
        source: c
            .preprocessor
            .clone()
            .unwrap_or_else(|| ByteSource::owned(json_bytes(&clip::default_preprocessor(image_size)))),
    });
    artifacts.push(json_artifact(
        "processor_config.json",
        &json!({
            "image_token": names::HF_IMAGE_TOKEN,
            "num_additional_image_tokens": 1,
            "patch_size": patch,
            "processor_class": "LlavaProcessor",
            "vision_feature_select_strategy": strategy,
        }),
    ));
    if let Some(jinja) = c.template.and_then(Template::hf_chat_template) {
        artifacts.push(json_artifact("chat_template.json", &json!({ "chat_template": jinja })));
    }
    Ok(Checkpoint::single(hf_meta(&c.origin, config, artifacts), tensors))
}

/// `tokenizer.model` plus the JSON files transformers needs for a LLaMA SentencePiece tokenizer;
/// with `hf_tokens` = (image, pad), llava-hf's `<image>` and `<pad>` as added special tokens.
fn tokenizer_files(c: &CanonicalLlava, hf_tokens: Option<(u32, u32)>) -> Result<Vec<Artifact>> {
    let Some(model) = &c.tokenizer else {
        return Err(Error::missing(&c.origin, "tokenizer.model (a SentencePiece tokenizer)"));
    };
    let (bos, eos) = (c.llm.hparams.bos.unwrap_or(1), c.llm.hparams.eos.unwrap_or(2));
    let mut out = vec![
        Artifact { name: "tokenizer.model".into(), source: model.clone() },
        json_artifact(
            "generation_config.json",
            &json!({"bos_token_id": bos, "eos_token_id": eos, "_from_model_config": true}),
        ),
    ];
    let added: Vec<(u32, &str)> = hf_tokens
        .map(|(image, pad)| vec![(image, names::HF_IMAGE_TOKEN), (pad, names::HF_PAD_TOKEN)])
        .unwrap_or_default();
    let sp = c.sentencepiece()?;
    let carried = carried_tokenizer_json(c, sp.as_ref(), &added)?;
    let source = tokenizer::SourceTokenizer {
        config: c.tokenizer_config.as_ref(),
        model: sp.as_ref(),
        json_left_behind: c.tokenizer_json.is_some() && carried.is_none(),
    };
    let mut tok = tokenizer::llama_tokenizer_config(c.llm.hparams.max_positions, source);
    if let Some(json) = carried {
        out.push(Artifact { name: "tokenizer.json".into(), source: json });
    }
    match hf_tokens {
        Some((image, pad)) => {
            tok["pad_token"] = json!(names::HF_PAD_TOKEN);
            if !tok["added_tokens_decoder"].is_object() {
                tok["added_tokens_decoder"] = json!({});
            }
            for (id, text) in [(image, names::HF_IMAGE_TOKEN), (pad, names::HF_PAD_TOKEN)] {
                tok["added_tokens_decoder"][id.to_string()] = added_token(text);
            }
            out.push(json_artifact(
                "added_tokens.json",
                &json!({names::HF_IMAGE_TOKEN: image, names::HF_PAD_TOKEN: pad}),
            ));
        }
        None => {
            // LLaVA trains with pad = unk (formats.md §7.4).
            tok["pad_token"] = json!("<unk>");
        }
    }
    let mut special = tokenizer::special_tokens_map(&tok);
    if hf_tokens.is_some() {
        // transformers' LlavaProcessor finds the image token among the special tokens.
        let list = special
            .as_object_mut()
            .expect("an object")
            .entry("additional_special_tokens")
            .or_insert(json!([]));
        if let Some(list) = list.as_array_mut().filter(|l| !l.contains(&json!(names::HF_IMAGE_TOKEN))) {
            list.push(json!(names::HF_IMAGE_TOKEN));
        }
    }
    out.push(json_artifact("tokenizer_config.json", &tok));
    out.push(json_artifact("special_tokens_map.json", &special));
    Ok(out)
}

/// The source's `tokenizer.json` for an output whose tokenizer is `sp` (`c.tokenizer`, parsed)
/// with exactly `added` after its pieces ([`tokenizer::carry_tokenizer_json`]).
fn carried_tokenizer_json(
    c: &CanonicalLlava,
    sp: Option<&SentencePieceModel>,
    added: &[(u32, &str)],
) -> Result<Option<ByteSource>> {
    match (&c.tokenizer_json, sp) {
        (Some(json), Some(sp)) => tokenizer::carry_tokenizer_json(json, sp, added),
        _ => Ok(None),
    }
}

/// Canonical bundle → original LLaVA directory checkpoint (`LlavaLlamaForCausalLM`): LLaMA keys,
/// `model.mm_projector.*`, `mm_*` config keys; the vision tower is referenced by
/// `mm_vision_tower` = `vision_ref` (LLaVA never stores it).
pub fn to_llava_original(c: &CanonicalLlava, dtype: Option<DType>, vision_ref: &str) -> Result<Checkpoint> {
    c.check_feature_layer()?;
    // llava-hf's <image> and <pad> (and its padding rows) sit past the tokenizer's pieces; the
    // original layout spells the image as a placeholder and has no such rows, so they go (the
    // inverse of the llava-hf conversion, which added them).
    let mut c = c.clone();
    if let (ImageTokenScheme::Repeated { image, pad }, Some(pieces)) =
        (c.image_tokens, c.sentencepiece()?.map(|sp| sp.len()))
    {
        let past = |id: u32| id as usize >= pieces;
        if past(image) && pad.is_none_or(past) {
            if c.llm.hparams.vocab > pieces {
                trim_vocab(&mut c.llm, pieces)?;
            }
            // …and from the fast tokenizer.
            if let Some(json) = &c.tokenizer_json {
                c.tokenizer_json =
                    tokenizer::without_added_tokens(json, &tokenizer::LLAVA_HF_TOKENS, pieces)?;
            }
        }
    }
    let c = &c;
    let kind = c.projector_kind()?;
    let width =
        c.vision_hidden().ok_or_else(|| Error::missing(&c.origin, "the vision width (mm_hidden_size)"))?;
    let mut tensors = TensorMap::new();
    let llm = llama::cast_all(&c.llm.tensors, dtype)?;
    let head = llm.get("lm_head.weight").cloned();
    for (name, t) in llm {
        if name != "lm_head.weight" {
            tensors.insert(name, t);
        }
    }
    for (name, t) in llama::cast_all(&c.projector, dtype)? {
        tensors.insert(format!("model.{name}"), t);
    }
    if let Some(h) = head {
        tensors.insert("lm_head.weight".into(), h);
    }
    let stored = tensors.values().next().map_or(DType::F32, |t| t.dtype);
    let mut config = c.llm.hparams.hf_config(stored);
    let obj = config.as_object_mut().expect("object");
    obj.insert("architectures".into(), json!(["LlavaLlamaForCausalLM"]));
    obj.insert("model_type".into(), json!("llava_llama"));
    obj.insert("pad_token_id".into(), json!(0));
    for (k, v) in [
        ("mm_vision_tower", json!(vision_ref)),
        ("mm_hidden_size", json!(width)),
        ("mm_projector_type", json!(kind.name())),
        ("mm_vision_select_layer", json!(c.vision_feature_layer)),
        ("mm_vision_select_feature", json!(if c.drop_cls { "patch" } else { "cls_patch" })),
        ("mm_patch_merge_type", json!("flat")),
        ("image_aspect_ratio", json!(c.image_aspect_ratio.as_deref().unwrap_or("pad"))),
        ("mm_use_im_start_end", json!(false)),
        ("mm_use_im_patch_token", json!(false)),
        ("use_mm_proj", json!(true)),
        ("tune_mm_mlp_adapter", json!(false)),
        ("freeze_mm_mlp_adapter", json!(false)),
        ("mm_projector_lr", Json::Null),
        ("tokenizer_model_max_length", json!(c.llm.hparams.max_positions)),
        ("tokenizer_padding_side", json!("right")),
    ] {
        obj.insert(k.into(), v);
    }
    let artifacts = tokenizer_files(c, None)?;
    Ok(Checkpoint::single(hf_meta(&c.origin, config, artifacts), tensors))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures").join(name)
    }

    /// The source's tokenizer.json is written again only while it describes the tokenizer being
    /// written: as it is, with the image tokens appended when it lacks them, else not at all.
    #[test]
    fn tokenizer_json_is_carried_only_while_it_describes_the_tokenizer() {
        let c = from_llava_hf(&formats::open(&fixture("llava-tiny")).unwrap()).unwrap();
        let tokens = [(256, "<image>"), (257, "<pad>")];
        let original = c.tokenizer_json.as_ref().unwrap().bytes().unwrap().into_owned();
        let carried = |c: &CanonicalLlava, added: &[(u32, &str)]| {
            let sp = c.sentencepiece().unwrap();
            carried_tokenizer_json(c, sp.as_ref(), added).unwrap().map(|b| b.bytes().unwrap().into_owned())
        };
        assert_eq!(carried(&c, &tokens), Some(original.clone()));
        // Other ids for the image tokens, or no room for them: not this file.
        assert_eq!(carried(&c, &[(300, "<image>"), (301, "<pad>")]), None);
        assert_eq!(carried(&c, &[]), None);
        // Without its added tokens, they are appended.
        let mut v: Json = serde_json::from_slice(&original).unwrap();
        v["added_tokens"].as_array_mut().unwrap().retain(|t| t["id"].as_u64() < Some(256));
        let mut bare = c.clone();
        bare.tokenizer_json = Some(ByteSource::owned(serde_json::to_vec(&v).unwrap()));
        let back: Json = serde_json::from_slice(&carried(&bare, &tokens).unwrap()).unwrap();
        assert_eq!(back["added_tokens"], serde_json::from_slice::<Json>(&original).unwrap()["added_tokens"]);
        // Another SentencePiece model (convert --tokenizer): not this file.
        let mut other = c.clone();
        other.tokenizer =
            Some(ByteSource::owned(std::fs::read(fixture("llama-gqa/tokenizer.model")).unwrap()));
        assert_eq!(carried(&other, &tokens), None);
    }

    /// The tower's sizes are read as HF reads its config: transformers saves only the keys that
    /// differ from `CLIPVisionConfig()`'s defaults, so an absent key is the default, not unknown;
    /// no config at all (a tower only named by a hub id) is unknown.
    #[test]
    fn tower_sizes_take_hf_defaults_for_absent_keys() {
        let mut c = from_llava_hf(&formats::open(&fixture("llava-tiny")).unwrap()).unwrap();
        let (width, tiny_n) = (c.vision_hidden(), c.image_token_len());
        assert_eq!((width, tiny_n), (Some(48), Some(16)));
        c.vision_config = json!({});
        assert_eq!((c.image_size(), c.patch_size(), c.vision_hidden()), (Some(224), Some(32), Some(768)));
        assert_eq!(c.image_token_len(), Some(49 + usize::from(!c.drop_cls)));
        c.check_feature_layer().unwrap();
        c.vision_config = Json::Null;
        assert_eq!((c.image_size(), c.image_token_len()), (None, None));
        assert_eq!(c.vision_hidden(), width, "from the projector's first weight");
    }

    #[test]
    fn reads_llava_hf_and_original_layouts_of_the_same_model() {
        let hf = from_llava_hf_checked(&formats::open(&fixture("llava-tiny")).unwrap()).unwrap();
        assert_eq!(hf.image_tokens, ImageTokenScheme::Repeated { image: 256, pad: Some(257) });
        assert_eq!((hf.image_token_len(), hf.llm.hparams.vocab), (Some(16), 320));
        let tower = clip::read_hf_clip(&fixture("llava-tiny-clip")).unwrap();
        let orig =
            from_llava_original(&formats::open(&fixture("llava-orig-tiny")).unwrap(), Some(tower)).unwrap();
        assert_eq!(orig.llm.hparams.vocab, 256);
        assert_eq!(orig.image_tokens, ImageTokenScheme::Placeholder);
        assert_eq!(orig.image_aspect_ratio.as_deref(), Some("pad"));
        for (name, t) in &hf.projector {
            assert!(t.bytes(name).unwrap() == orig.projector[name.as_str()].bytes(name).unwrap(), "{name}");
        }
        for (name, t) in &hf.vision {
            assert!(t.bytes(name).unwrap() == orig.vision[name.as_str()].bytes(name).unwrap(), "{name}");
        }
        // Without a tower the reference stays a name the bundle cannot size.
        let named = from_llava_original(&formats::open(&fixture("llava-orig-tiny")).unwrap(), None).unwrap();
        assert_eq!(named.vision_source, VisionSource::Named("shardsmith-fixtures/llava-tiny-clip".into()));
        assert!(named.vision.is_empty() && named.vision_config.is_null());
        assert_eq!(named.vision_hidden(), Some(48));
    }

    #[test]
    fn llava_hf_config_is_told_apart_from_the_original_llava_config() {
        let hf: Json =
            serde_json::from_slice(&std::fs::read(fixture("llava-tiny/config.json")).unwrap()).unwrap();
        let orig: Json =
            serde_json::from_slice(&std::fs::read(fixture("llava-orig-tiny/config.json")).unwrap()).unwrap();
        assert!(is_llava_hf(&hf) && !is_llava_original(&hf));
        assert!(is_llava_original(&orig) && !is_llava_hf(&orig));
        let mut old = orig.clone();
        old["model_type"] = json!("llava");
        assert!(is_llava_original(&old) && !is_llava_hf(&old));
    }
}
