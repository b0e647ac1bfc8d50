//! llava-hf (`LlavaForConditionalGeneration`) → its three canonical parts: the LLaMA language
//! model (HF LLaMA names), the CLIP vision tower (`vision_model.*`, HF `CLIPVisionModel` names)
//! and the projector (`mm_projector.{0,2}.*`, the LLaVA/NeVA suffixes, formats.md §6.1–§6.3).
//!
//! Both key spellings are read: the published one (`language_model.model.*`,
//! `language_model.lm_head.*`, `vision_tower.*`, `multi_modal_projector.*`) and the one newer
//! transformers use in memory (`model.language_model.*`, `lm_head.*`, `model.vision_tower.*`,
//! `model.multi_modal_projector.*`).

use crate::checkpoint::{Checkpoint, ModelConfig, TensorMap};
use crate::convert::llama::{self, CanonicalLlama};
use crate::error::{Error, Result};
use serde_json::Value as Json;
use std::path::{Path, PathBuf};

/// A LLaVA checkpoint split into canonical parts.
#[derive(Clone, Debug)]
pub struct CanonicalLlava {
    /// The language model.
    pub llm: CanonicalLlama,
    /// The vision tower, `vision_model.*` names.
    pub vision: TensorMap,
    /// The `vision_config` object (an HF `CLIPVisionConfig`).
    pub vision_config: Json,
    /// The projector, `mm_projector.*` names.
    pub projector: TensorMap,
    /// `mm_mlp_adapter_type` spelling of the projector (`mlp2x_gelu` for llava-hf).
    pub projector_type: String,
    /// The token id that marks image positions (`image_token_index`).
    pub image_token: u32,
    /// `vision_feature_layer` (−2 in LLaVA-1.5).
    pub vision_feature_layer: isize,
    /// Whether the CLS token is dropped (`vision_feature_select_strategy: default`).
    pub drop_cls: bool,
    /// The checkpoint it came from.
    pub origin: PathBuf,
}

/// Whether `cfg` is a llava-hf `config.json`.
pub fn is_llava_hf(cfg: &Json) -> bool {
    cfg.get("model_type").and_then(Json::as_str) == Some("llava")
}

/// Which part a llava-hf key belongs to, and its canonical name there.
enum Part {
    Llm(String),
    Vision(String),
    Projector(String),
}

fn classify(name: &str) -> Option<Part> {
    let projector = |rest: &str| {
        let rest = rest.strip_prefix("linear_1.").map(|r| format!("mm_projector.0.{r}"));
        rest.map(Part::Projector)
    };
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
    if let Some(rest) = mmp.strip_prefix("linear_2.") {
        return Some(Part::Projector(format!("mm_projector.2.{rest}")));
    }
    projector(mmp)
}

/// llava-hf checkpoint → canonical parts. Every stored tensor must land in a part.
pub fn from_llava_hf(ckpt: &Checkpoint) -> Result<CanonicalLlava> {
    let path = &ckpt.meta.path;
    let Some(ModelConfig::HfJson(cfg)) = &ckpt.meta.config else {
        return Err(Error::missing(path, "config.json (a llava-hf directory needs one)"));
    };
    if !is_llava_hf(cfg) {
        return Err(Error::invalid(path, "config.json: model_type is not 'llava'"));
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
    let image_token =
        cfg.get("image_token_index")
            .or_else(|| cfg.get("image_token_id"))
            .and_then(Json::as_u64)
            .ok_or_else(|| Error::missing(path, "config.json: 'image_token_index'"))? as u32;

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
    })
}
