//! Replace the language model inside a multimodal bundle (llava-hf here; a NeVA `.nemo` in
//! [`super::neva`]) with another LLaMA of the same hidden size: the projector's output feeds the
//! LLM's embedding space, so the sizes must agree. Vision tower and projector are written byte for byte under their stored names.
//!
//! The new LLM's tensors go under the bundle's own spelling ([`super::parts`]); `text_config`
//! becomes the new LLM's config (keeping the bundle's `pad_token_id`, which its tokenizer
//! defines). The bundle's tokenizer stays — it carries the image token — so the new vocabulary
//! must cover every id it uses, `image_token_index` included.

use super::model::LlamaModel;
use super::parts::{stored_name, Bundle, Part};
use super::plan::{Action, Change, Edit, Plan, WriteAs};
use super::tokens::TokenizerView;
use crate::checkpoint::{Checkpoint, ModelConfig, TensorMap};
use crate::error::{Error, Result};
use crate::names::llama::LlamaHparams;
use serde_json::{json, Value as Json};
use std::collections::BTreeSet;

/// Keys of an HF config that describe the file rather than the language model.
const NOT_TEXT_CONFIG: &[&str] =
    &["architectures", "torch_dtype", "dtype", "transformers_version", "_name_or_path"];

/// Put `llm` (HF LLaMA directory or `.nemo`) into the multimodal `bundle`.
pub fn swap_llm(bundle_ckpt: &Checkpoint, llm_ckpt: &Checkpoint) -> Result<Edit> {
    if crate::convert::neva::is_multimodal(llm_ckpt) {
        return Err(Error::invalid(
            &llm_ckpt.meta.path,
            "--llm is a multimodal checkpoint; take its language model out first \
             (shardsmith surgery extract BUNDLE --part llm -o DIR)",
        ));
    }
    if super::neva::is_neva(bundle_ckpt) {
        return super::neva::swap_llm_neva(bundle_ckpt, llm_ckpt);
    }
    let path = &bundle_ckpt.meta.path;
    let bundle = Bundle::split(bundle_ckpt)?;
    let old_text = bundle.sub_config("text_config", path)?;
    let old = LlamaHparams::from_hf(&old_text, path)?;
    let llm = LlamaModel::open(llm_ckpt)?;
    let new = &llm.canonical.hparams;
    if new.hidden != old.hidden {
        return Err(Error::invalid(
            &llm_ckpt.meta.path,
            format!(
                "hidden size {} differs from the bundle's language model ({}, what its projector outputs); \
                 swap-llm needs an LLM of hidden size {}",
                new.hidden, old.hidden, old.hidden
            ),
        ));
    }
    // Every id the bundle's tokenizer and config use must have an embedding row.
    let view = TokenizerView::from_hf_artifacts(path, &bundle_ckpt.meta.artifacts)?;
    let mut needed = vec![("the bundle's tokenizer".to_string(), view.len())];
    for key in ["image_token_index", "image_token_id", "pad_token_id"] {
        if let Some(id) = bundle.config.get(key).and_then(Json::as_u64) {
            needed.push((format!("config.json {key} {id}"), id as usize + 1));
        }
    }
    if let Some((what, rows)) = needed.iter().filter(|(_, n)| *n > new.vocab).max_by_key(|(_, n)| *n) {
        return Err(Error::invalid(
            &llm_ckpt.meta.path,
            format!(
                "vocabulary {} is too small for the bundle: {what} needs {rows} rows; grow it first \
                 (shardsmith surgery resize-vocab LLM -o OUT --to {rows}, or --add-tokens)",
                new.vocab
            ),
        ));
    }

    let mut plan = Plan::new("swap-llm", path);
    plan.notes.push(format!("new language model: {}", llm_ckpt.meta.path.display()));
    let old_llm: BTreeSet<&str> =
        bundle.tensors.iter().filter(|t| t.part == Part::Llm).map(|t| t.canonical.as_str()).collect();
    let mut new_llm = TensorMap::new();
    for (name, t) in &llm.canonical.tensors {
        let stored = stored_name(bundle.layout.rules, Part::Llm, name).ok_or_else(|| {
            Error::invalid(path, format!("tensor '{name}' has no name in the {} layout", bundle.layout.name))
        })?;
        let action = if old_llm.contains(name.as_str()) { Action::Modified } else { Action::Added };
        plan.push(Change::new(&stored, action, t).detail(format!("new LLM's {name}")));
        new_llm.insert(stored, t.clone());
    }
    let mut tensors = TensorMap::new();
    let mut placed = false;
    for t in &bundle.tensors {
        if t.part == Part::Llm {
            if !placed {
                tensors.extend(new_llm.iter().map(|(n, t)| (n.clone(), t.clone())));
                placed = true;
            }
            if !llm.canonical.tensors.contains_key(&t.canonical) {
                plan.push(Change::new(&t.stored, Action::Dropped, &t.entry).detail("not in the new LLM"));
            }
        } else {
            plan.push(Change::new(&t.stored, Action::Kept, &t.entry));
            tensors.insert(t.stored.clone(), t.entry.clone());
        }
    }
    if !placed {
        tensors.extend(new_llm);
    }

    let mut text = match &llm.store {
        super::model::Store::Hf(cfg) => cfg.clone(),
        super::model::Store::Nemo { .. } => new.hf_config(llm.dtype()),
    };
    let o = text
        .as_object_mut()
        .ok_or_else(|| Error::invalid(&llm_ckpt.meta.path, "config.json is not an object"))?;
    for k in NOT_TEXT_CONFIG {
        o.remove(*k);
    }
    if let Some(pad) = old_text.get("pad_token_id") {
        o.insert("pad_token_id".into(), pad.clone());
    }
    for (key, was) in old_text.as_object().into_iter().flatten() {
        match o.get(key) {
            Some(now) if now != was => plan.config.push(format!("text_config.{key}: {was} -> {now}")),
            None => plan.config.push(format!("text_config.{key}: {was} -> (absent)")),
            _ => {}
        }
    }
    let mut cfg = bundle.config.clone();
    cfg["text_config"] = text;
    if cfg.get("tie_word_embeddings").and_then(Json::as_bool).unwrap_or(false) != new.tied {
        plan.config.push(format!("tie_word_embeddings -> {}", new.tied));
        cfg["tie_word_embeddings"] = json!(new.tied);
    }
    if let (Some(a), Some(b)) = (
        bundle.tensors.iter().find(|t| t.part == Part::Projector).map(|t| t.entry.dtype),
        llm.canonical.tensors.values().next().map(|t| t.dtype),
    ) {
        if a != b {
            plan.notes
                .push(format!("the new LLM is {b} while the projector is {a}; tensors keep their dtypes"));
        }
    }
    plan.notes.push("tokenizer: the bundle's files are kept (they define the image token)".into());
    let mut out = bundle_ckpt.clone();
    out.meta.config = Some(ModelConfig::HfJson(cfg));
    out.shards[0].tensors = tensors;
    // The result must read back as a complete llava-hf model.
    crate::convert::llava::from_llava_hf(&out)?;
    Ok(Edit::new(out, WriteAs::like(&bundle_ckpt.meta.flavour), plan))
}
