//! The parts of a multimodal (LLaVA-style) checkpoint, as data: one table row per stored-name
//! prefix, naming the part it belongs to and the canonical prefix it maps to there.
//!
//! Canonical names per part: the LLM uses HF LLaMA names (`model.layers.0…`, `lm_head.weight`),
//! the vision tower HF `CLIPVisionModel` names (`vision_model.…`), the projector the LLaVA/NeVA
//! suffixes (`mm_projector.0.weight`, formats.md §6.1–§6.3). A new layout that stores tensors
//! whole (liuhaotian LLaVA) is a new table and a [`Layout`] entry; the code below does not change.
//! NeVA's `.nemo` fuses and splits its LLM per rank, so it goes through canonical form instead
//! ([`super::neva`]).

use crate::checkpoint::{Checkpoint, ModelConfig, TensorEntry};
use crate::error::{Error, Result};
use serde_json::Value as Json;

/// A part of a multimodal model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Part {
    /// The LLaMA language model.
    Llm,
    /// The CLIP vision tower.
    Vision,
    /// The vision-to-text projector.
    Projector,
}

impl Part {
    /// Parse `llm`, `vision` or `projector`.
    pub fn parse(s: &str) -> Option<Part> {
        match s {
            "llm" => Some(Part::Llm),
            "vision" => Some(Part::Vision),
            "projector" => Some(Part::Projector),
            _ => None,
        }
    }

    /// The lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Part::Llm => "llm",
            Part::Vision => "vision",
            Part::Projector => "projector",
        }
    }
}

/// One row: stored names starting with `stored` belong to `part`, where their canonical name is
/// `canonical` followed by the rest of the stored name.
#[derive(Clone, Copy, Debug)]
pub struct PartRule {
    /// Stored-name prefix.
    pub stored: &'static str,
    /// The part.
    pub part: Part,
    /// Canonical prefix within the part.
    pub canonical: &'static str,
}

const fn rule(stored: &'static str, part: Part, canonical: &'static str) -> PartRule {
    PartRule { stored, part, canonical }
}

/// llava-hf as published (`LlavaForConditionalGeneration.save_pretrained`, transformers ≤ 4.51).
pub const LLAVA_HF: &[PartRule] = &[
    rule("language_model.model.", Part::Llm, "model."),
    rule("language_model.lm_head.", Part::Llm, "lm_head."),
    rule("vision_tower.", Part::Vision, ""),
    rule("multi_modal_projector.linear_1.", Part::Projector, "mm_projector.0."),
    rule("multi_modal_projector.linear_2.", Part::Projector, "mm_projector.2."),
];

/// llava-hf as newer transformers name it (everything but the head under `model.`).
pub const LLAVA_HF_NESTED: &[PartRule] = &[
    rule("model.language_model.", Part::Llm, "model."),
    rule("lm_head.", Part::Llm, "lm_head."),
    rule("model.vision_tower.", Part::Vision, ""),
    rule("model.multi_modal_projector.linear_1.", Part::Projector, "mm_projector.0."),
    rule("model.multi_modal_projector.linear_2.", Part::Projector, "mm_projector.2."),
];

/// A multimodal layout: how to recognise it and its table.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    /// Name for messages.
    pub name: &'static str,
    /// The rows.
    pub rules: &'static [PartRule],
}

/// Every layout surgery knows, tried in order; the first whose rows claim every tensor wins.
pub const LAYOUTS: &[Layout] = &[
    Layout { name: "llava-hf", rules: LLAVA_HF },
    Layout { name: "llava-hf (nested)", rules: LLAVA_HF_NESTED },
];

/// The canonical name and part of `stored` under `rules` (the longest matching prefix wins).
pub fn classify(rules: &[PartRule], stored: &str) -> Option<(Part, String)> {
    rules
        .iter()
        .filter(|r| stored.starts_with(r.stored))
        .max_by_key(|r| r.stored.len())
        .map(|r| (r.part, format!("{}{}", r.canonical, &stored[r.stored.len()..])))
}

/// The stored name of a canonical `name` of `part` under `rules` (inverse of [`classify`]).
pub fn stored_name(rules: &[PartRule], part: Part, name: &str) -> Option<String> {
    rules
        .iter()
        .filter(|r| r.part == part && name.starts_with(r.canonical))
        .max_by_key(|r| r.canonical.len())
        .map(|r| format!("{}{}", r.stored, &name[r.canonical.len()..]))
}

/// One tensor of a bundle.
#[derive(Clone, Debug)]
pub struct PartTensor {
    /// Which part.
    pub part: Part,
    /// Name as stored.
    pub stored: String,
    /// Canonical name within the part.
    pub canonical: String,
    /// The tensor.
    pub entry: TensorEntry,
}

/// A multimodal checkpoint split into parts (names only; bytes untouched).
#[derive(Clone, Debug)]
pub struct Bundle {
    /// The layout that matched.
    pub layout: Layout,
    /// Every tensor, in stored order.
    pub tensors: Vec<PartTensor>,
    /// The checkpoint's `config.json`.
    pub config: Json,
}

impl Bundle {
    /// Split a multimodal checkpoint; every tensor must belong to a part.
    pub fn split(ckpt: &Checkpoint) -> Result<Bundle> {
        let path = &ckpt.meta.path;
        if matches!(ckpt.meta.flavour, crate::Flavour::Nemo { .. }) {
            // NeVA .nemo files are taken apart before this (surgery::neva); this one is not NeVA.
            return Err(Error::invalid(
                path,
                "a text-only .nemo has no parts to take apart (extract works on NeVA .nemo and llava-hf \
                 checkpoints)",
            ));
        }
        let Some(ModelConfig::HfJson(config)) = &ckpt.meta.config else {
            return Err(Error::missing(path, "config.json (a multimodal checkpoint needs one)"));
        };
        if config.get("model_type").and_then(Json::as_str) != Some("llava") {
            return Err(Error::invalid(
                path,
                format!(
                    "config.json: model_type is {}, expected 'llava' (supported multimodal layouts: {})",
                    config.get("model_type").unwrap_or(&Json::Null),
                    LAYOUTS.iter().map(|l| l.name).collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        let tensors = ckpt.tensors()?;
        let mut best: Option<(Layout, Vec<String>)> = None;
        for layout in LAYOUTS {
            let unclaimed: Vec<String> =
                tensors.keys().filter(|n| classify(layout.rules, n).is_none()).cloned().collect();
            if unclaimed.is_empty() {
                let tensors = tensors
                    .iter()
                    .map(|(n, t)| {
                        let (part, canonical) = classify(layout.rules, n).expect("claimed above");
                        PartTensor { part, stored: n.clone(), canonical, entry: t.clone() }
                    })
                    .collect();
                return Ok(Bundle { layout: *layout, tensors, config: config.clone() });
            }
            if best.as_ref().is_none_or(|(_, u)| unclaimed.len() < u.len()) {
                best = Some((*layout, unclaimed));
            }
        }
        let (layout, unclaimed) = best.expect("at least one layout");
        let shown: Vec<&str> = unclaimed.iter().take(8).map(String::as_str).collect();
        Err(Error::invalid(
            path,
            format!(
                "{} tensors belong to no part of the closest layout ({}): {}",
                unclaimed.len(),
                layout.name,
                shown.join(", ")
            ),
        ))
    }

    /// The tensors of one part, canonical names.
    pub fn part(&self, part: Part) -> crate::TensorMap {
        self.tensors
            .iter()
            .filter(|t| t.part == part)
            .map(|t| (t.canonical.clone(), t.entry.clone()))
            .collect()
    }

    /// A sub-object of the config (`text_config`, `vision_config`).
    pub fn sub_config(&self, key: &str, path: &std::path::Path) -> Result<Json> {
        self.config
            .get(key)
            .filter(|v| v.is_object())
            .cloned()
            .ok_or_else(|| Error::missing(path, format!("config.json: '{key}'")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_and_invert_both_llava_spellings() {
        for (layout, stored) in [
            (LLAVA_HF, "language_model.model.layers.3.mlp.up_proj.weight"),
            (LLAVA_HF_NESTED, "model.language_model.layers.3.mlp.up_proj.weight"),
        ] {
            let (part, canonical) = classify(layout, stored).unwrap();
            assert_eq!((part, canonical.as_str()), (Part::Llm, "model.layers.3.mlp.up_proj.weight"));
            assert_eq!(stored_name(layout, part, &canonical).unwrap(), stored);
        }
        assert_eq!(
            classify(LLAVA_HF, "multi_modal_projector.linear_2.bias").unwrap(),
            (Part::Projector, "mm_projector.2.bias".to_string())
        );
        assert_eq!(
            stored_name(LLAVA_HF, Part::Llm, "lm_head.weight").unwrap(),
            "language_model.lm_head.weight"
        );
        assert_eq!(stored_name(LLAVA_HF_NESTED, Part::Llm, "lm_head.weight").unwrap(), "lm_head.weight");
        assert!(classify(LLAVA_HF, "something.else").is_none());
    }
}
