//! Replace the language model inside a multimodal bundle (llava-hf here; a NeVA `.nemo` in
//! [`super::neva`]) with another LLaMA of the same hidden size: the projector's output feeds the
//! LLM's embedding space, so the sizes must agree. Vision tower and projector are written byte for byte under their stored names.
//!
//! The new LLM's tensors go under the bundle's own spelling ([`super::parts`]); `text_config`
//! becomes the new LLM's config. The new LLM's tokenizer comes with it (its embedding rows mean
//! that tokenizer's ids), with the bundle's image and pad tokens (`<image>`, `<pad>`) added after
//! its last id when it lacks them — rows initialised to the mean of its token rows, as
//! `resize-vocab` does — and `image_token_index` / `pad_token_id` follow them.

use super::model::LlamaModel;
use super::parts::{stored_name, Bundle, Part};
use super::plan::{Action, Change, Edit, Plan, WriteAs};
use super::tokens::{parse_json, TokenizerView};
use super::vocab::{Init, VocabChange};
use crate::checkpoint::{Artifact, ByteSource, Checkpoint, ModelConfig, TensorMap};
use crate::convert::clip::json_bytes;
use crate::error::{Error, Result};
use crate::names::llama::LlamaHparams;
use serde_json::{json, Value as Json};
use std::collections::BTreeSet;
use std::path::Path;

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
    // The new LLM reads text with its own tokenizer, so that tokenizer comes along, with the
    // bundle's image (and pad) token added after its last id unless it has them.
    if llm.is_nemo() {
        return Err(Error::invalid(
            &llm_ckpt.meta.path,
            "a llava-hf bundle takes an HF LLaMA (its tokenizer files come along); convert the .nemo first \
             (shardsmith convert LLM.nemo DIR)",
        ));
    }
    let view = TokenizerView::from_hf_artifacts(path, &bundle_ckpt.meta.artifacts)?;
    let token_of = |key: &str, cfg: &Json| {
        let id = cfg.get(key).and_then(Json::as_u64)?;
        Some((key.to_string(), view.ids.get(&(id as u32))?.clone()))
    };
    let image = token_of("image_token_index", &bundle.config)
        .or_else(|| token_of("image_token_id", &bundle.config))
        .ok_or_else(|| {
            Error::missing(path, "config.json image_token_index naming a token of its tokenizer")
        })?;
    let pad = token_of("pad_token_id", &old_text).or_else(|| token_of("pad_token_id", &bundle.config));
    let new_view = TokenizerView::read(&llm)?;
    if !new_view.found() {
        return Err(Error::missing(
            &llm_ckpt.meta.path,
            "a tokenizer (tokenizer.model or tokenizer.json): the swapped bundle reads text with the new LLM's",
        ));
    }
    let mut missing: Vec<String> = Vec::new();
    for (_, t) in [Some(&image), pad.as_ref()].into_iter().flatten() {
        // A bundle that pads with its image token names it once.
        if new_view.id_of(t).is_none() && !missing.contains(t) {
            missing.push(t.clone());
        }
    }
    let grown;
    let (llm, llm_ckpt) = if missing.is_empty() {
        (llm, llm_ckpt)
    } else {
        grown = super::vocab::resize_vocab(llm_ckpt, &VocabChange::AddTokens(missing.clone()), Init::Mean)?
            .output;
        (LlamaModel::open(&grown)?, &grown)
    };
    let new_view = TokenizerView::read(&llm)?;
    let new = &llm.canonical.hparams;
    if new_view.len() > new.vocab {
        return Err(Error::invalid(
            &llm_ckpt.meta.path,
            format!("its tokenizer uses {} ids but its embedding has {} rows", new_view.len(), new.vocab),
        ));
    }
    let new_id = |token: &str| new_view.id_of(token).expect("present or just added");

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
    if let Some((_, token)) = &pad {
        o.insert("pad_token_id".into(), json!(new_id(token)));
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
    for (key, token) in [Some(&image), pad.as_ref()].into_iter().flatten() {
        if cfg.get(key).is_some() {
            let id = new_id(token);
            if cfg[key.as_str()] != json!(id) {
                plan.config
                    .push(format!("{key}: {} -> {id} ({token} in the new tokenizer)", cfg[key.as_str()]));
            }
            cfg[key.as_str()] = json!(id);
        }
    }
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
    plan.files.push(if missing.is_empty() {
        "tokenizer: the new LLM's files".to_string()
    } else {
        format!(
            "tokenizer: the new LLM's files, {} added after its last id (rows = mean of its token rows)",
            missing.join(", ")
        )
    });
    let mut out = bundle_ckpt.clone();
    let pad_token = pad.as_ref().map(|(_, t)| t.as_str());
    out.meta.artifacts =
        with_tokenizer_of(&bundle_ckpt.meta.artifacts, &llm_ckpt.meta.artifacts, pad_token, path)?;
    out.meta.config = Some(ModelConfig::HfJson(cfg));
    out.shards[0].tensors = tensors;
    // The result must read back as a complete llava-hf model.
    crate::convert::llava::from_llava_hf(&out)?;
    Ok(Edit::new(out, WriteAs::like(&bundle_ckpt.meta.flavour), plan))
}

/// The files a tokenizer is read from (transformers' `save_pretrained` set).
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "added_tokens.json",
    "special_tokens_map.json",
];

/// The bundle's companion files with its tokenizer files replaced by the new LLM's. A chat
/// template the bundle kept inside `tokenizer_config.json` replaces the new one's (it belongs
/// to the multimodal model, not to the LLM), or becomes `chat_template.json` when the LLM has no
/// `tokenizer_config.json`. The bundle's pad token becomes the tokenizer's `pad_token`.
fn with_tokenizer_of(
    bundle: &[Artifact],
    llm: &[Artifact],
    pad: Option<&str>,
    path: &Path,
) -> Result<Vec<Artifact>> {
    let is_tok = |a: &&Artifact| TOKENIZER_FILES.contains(&a.name.as_str());
    let mut out: Vec<Artifact> = bundle.iter().filter(|a| !is_tok(a)).cloned().collect();
    let template = match bundle.iter().find(|a| a.name == "tokenizer_config.json") {
        Some(a) => parse_json(&a.source.bytes()?, &path.join(&a.name))?.get("chat_template").cloned(),
        None => None,
    };
    for a in llm.iter().filter(is_tok) {
        // The bundle's pad token (its batches pad with it) is the tokenizer's pad token.
        let mut set: Vec<(&str, Json)> = Vec::new();
        if matches!(a.name.as_str(), "tokenizer_config.json" | "special_tokens_map.json") {
            set.extend(pad.map(|p| ("pad_token", json!(p))));
        }
        if a.name == "tokenizer_config.json" {
            set.extend(template.clone().map(|t| ("chat_template", t)));
        }
        out.push(if set.is_empty() { a.clone() } else { with_keys(a, &set, path)? });
    }
    if let Some(t) = template.filter(|_| !llm.iter().any(|a| a.name == "tokenizer_config.json")) {
        out.push(Artifact {
            name: "chat_template.json".into(),
            source: ByteSource::owned(json_bytes(&json!({ "chat_template": t }))),
        });
    }
    Ok(out)
}

/// A JSON-object artifact with `keys` set.
fn with_keys(a: &Artifact, keys: &[(&str, Json)], path: &Path) -> Result<Artifact> {
    let origin = path.join(&a.name);
    let mut v = parse_json(&a.source.bytes()?, &origin)?;
    let o =
        v.as_object_mut().ok_or_else(|| Error::invalid(&origin, format!("{} is not an object", a.name)))?;
    for (k, value) in keys {
        o.insert((*k).into(), value.clone());
    }
    Ok(Artifact { name: a.name.clone(), source: ByteSource::owned(json_bytes(&v)) })
}
