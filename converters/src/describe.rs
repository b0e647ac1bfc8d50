//! What model a checkpoint holds: family and hyper-parameters, for `inspect` and for planning.
//!
//! The stored configuration (HF `config.json`, NeMo `model_config.yaml`) is the first source;
//! tensor shapes fill in what it lacks (the padded vocabulary is always read off the embedding),
//! and a checkpoint with no configuration is described from its tensor names alone.

use crate::checkpoint::{Checkpoint, ModelConfig, TensorMap};
use serde::Serialize;
use serde_json::Value as Json;
use std::collections::BTreeSet;

/// The model families shardsmith knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// A LLaMA-2 style decoder.
    Llama,
    /// A CLIP vision tower.
    ClipVision,
    /// A NeMo NeVA bundle (LLaMA + CLIP + projector).
    Neva,
    /// A LLaVA checkpoint (original or llava-hf).
    Llava,
    /// Nothing recognisable.
    Unknown,
}

/// Architecture facts a user checks before converting.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Architecture {
    /// The family.
    pub family: Option<Family>,
    /// Number of transformer layers.
    pub layers: Option<usize>,
    /// Hidden size.
    pub hidden: Option<usize>,
    /// Attention heads.
    pub heads: Option<usize>,
    /// Key/value heads (query groups); equal to `heads` without GQA.
    pub query_groups: Option<usize>,
    /// MLP inner size.
    pub ffn: Option<usize>,
    /// Tokenizer vocabulary (unpadded), when known.
    pub vocab: Option<usize>,
    /// Rows of the stored embedding (vocabulary padded for tensor parallelism), summed over ranks.
    pub padded_vocab: Option<usize>,
    /// Where the numbers came from: `config` or `tensors`.
    pub source: &'static str,
}

/// Describe `ckpt`.
pub fn describe(ckpt: &Checkpoint) -> Architecture {
    let mut arch = match &ckpt.meta.config {
        Some(ModelConfig::HfJson(v)) => from_hf_config(v),
        Some(ModelConfig::NemoYaml(c)) => from_nemo_config(&c.value),
        None => Architecture::default(),
    };
    arch.source = if arch.family.is_some() { "config" } else { "tensors" };
    let names: BTreeSet<&str> =
        ckpt.shards.iter().flat_map(|s| s.tensors.keys().map(String::as_str)).collect();
    if arch.family.is_none() {
        arch.family = Some(family_from_names(&names));
    }
    if arch.layers.is_none() {
        arch.layers = count_layers(&names);
    }
    let embedding_rows = padded_vocab(ckpt);
    arch.padded_vocab = embedding_rows.map(|(rows, _)| rows);
    if arch.hidden.is_none() {
        arch.hidden = embedding_rows.map(|(_, h)| h);
    }
    if arch.vocab.is_none() {
        arch.vocab = tokenizer_vocab(ckpt);
    }
    arch
}

fn get(v: &Json, key: &str) -> Option<usize> {
    v.get(key).and_then(Json::as_u64).map(|x| x as usize)
}

fn llama_from_hf(v: &Json) -> Architecture {
    let heads = get(v, "num_attention_heads");
    Architecture {
        family: Some(Family::Llama),
        layers: get(v, "num_hidden_layers"),
        hidden: get(v, "hidden_size"),
        heads,
        query_groups: get(v, "num_key_value_heads").or(heads),
        ffn: get(v, "intermediate_size"),
        vocab: get(v, "vocab_size"),
        ..Architecture::default()
    }
}

fn from_hf_config(v: &Json) -> Architecture {
    let model_type = v.get("model_type").and_then(Json::as_str).unwrap_or("");
    match model_type {
        "llama" => llama_from_hf(v),
        "clip_vision_model" | "clip" => {
            let vision = v.get("vision_config").unwrap_or(v);
            let heads = get(vision, "num_attention_heads");
            Architecture {
                family: Some(Family::ClipVision),
                layers: get(vision, "num_hidden_layers"),
                hidden: get(vision, "hidden_size"),
                heads,
                query_groups: heads,
                ffn: get(vision, "intermediate_size"),
                ..Architecture::default()
            }
        }
        // llava-hf nests the LLaMA config; the original LLaVA's older configs used the same
        // model_type for a flat LLaMA config with mm_* keys.
        "llava" => {
            let mut a = llama_from_hf(v.get("text_config").unwrap_or(v));
            a.family = Some(Family::Llava);
            a
        }
        // Original LLaVA (liuhaotian) configs are LLaMA configs with mm_* keys.
        "llava_llama" => Architecture { family: Some(Family::Llava), ..llama_from_hf(v) },
        _ => Architecture::default(),
    }
}

fn from_nemo_config(v: &serde_yaml::Value) -> Architecture {
    let get = |k: &str| v.get(k).and_then(serde_yaml::Value::as_u64).map(|x| x as usize);
    let heads = get("num_attention_heads");
    let family = if v.get("mm_cfg").is_some() { Family::Neva } else { Family::Llama };
    Architecture {
        family: Some(family),
        layers: get("num_layers"),
        hidden: get("hidden_size"),
        heads,
        query_groups: get("num_query_groups").or(heads),
        ffn: get("ffn_hidden_size"),
        ..Architecture::default()
    }
}

fn family_from_names(names: &BTreeSet<&str>) -> Family {
    let any = |p: &str| names.iter().any(|n| n.contains(p));
    if any("mm_projector") || any("multi_modal_projector") {
        Family::Llava
    } else if any("vision_model.embeddings.patch_embedding") {
        Family::ClipVision
    } else if any("embed_tokens") || any("word_embeddings") {
        Family::Llama
    } else {
        Family::Unknown
    }
}

/// The largest `layers.<n>.` index + 1 over all names (NeMo dist-ckpt names have no index).
fn count_layers(names: &BTreeSet<&str>) -> Option<usize> {
    names
        .iter()
        .filter_map(|n| {
            let rest = &n[n.find("layers.")? + "layers.".len()..];
            rest.split('.').next()?.parse::<usize>().ok()
        })
        .max()
        .map(|m| m + 1)
}

/// Embedding names in every dialect formats.md lists, LLM first.
const EMBEDDING_NAMES: &[&str] = &[
    "model.embed_tokens.weight",
    "language_model.model.embed_tokens.weight",
    "model.language_model.embed_tokens.weight",
    "model.embedding.word_embeddings.weight",
    "model.language_model.embedding.word_embeddings.weight",
];

/// (rows summed over tensor-parallel ranks, hidden) of the word embedding.
fn padded_vocab(ckpt: &Checkpoint) -> Option<(usize, usize)> {
    let first_stage = ckpt.shards.iter().filter(|s| s.rank.pp == 0);
    let mut rows = 0;
    let mut hidden = None;
    for shard in first_stage {
        let (r, h) = embedding_shape(&shard.tensors)?;
        rows += r;
        hidden = Some(h);
    }
    hidden.map(|h| (rows, h))
}

fn embedding_shape(t: &TensorMap) -> Option<(usize, usize)> {
    EMBEDDING_NAMES.iter().find_map(|n| match t.get(*n)?.shape.as_slice() {
        [r, h] => Some((*r, *h)),
        _ => None,
    })
}

/// Vocabulary size from a tokenizer artifact (`tokenizer.json` or SentencePiece `.model`).
fn tokenizer_vocab(ckpt: &Checkpoint) -> Option<usize> {
    for a in &ckpt.meta.artifacts {
        let bytes = a.source.bytes().ok()?;
        if a.name.ends_with("tokenizer.json") {
            let v: Json = serde_json::from_slice(&bytes).ok()?;
            let base = v
                .pointer("/model/vocab")
                .and_then(|m| m.as_object().map(|m| m.len()).or(m.as_array().map(Vec::len)))?;
            let added = v
                .get("added_tokens")
                .and_then(Json::as_array)
                .map(|a| a.iter().filter_map(|t| get(t, "id")).filter(|id| *id >= base).count())
                .unwrap_or(0);
            return Some(base + added);
        }
        if a.name.ends_with(".model") {
            if let Some(n) = sentencepiece_pieces(&bytes) {
                return Some(n);
            }
        }
    }
    None
}

/// Count the `pieces` (field 1, length-delimited) of a SentencePiece `ModelProto`; `None` on
/// anything that does not parse as protobuf or holds no pieces.
pub fn sentencepiece_pieces(bytes: &[u8]) -> Option<usize> {
    use crate::formats::protobuf::{Reader, Wire};
    let fields = Reader::new(bytes).fields().ok()?;
    let pieces = fields.iter().filter(|f| f.number == 1 && matches!(f.value, Wire::Bytes(_))).count();
    (pieces > 0).then_some(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_layers_from_names() {
        let names: BTreeSet<&str> =
            ["model.layers.0.mlp.up_proj.weight", "model.layers.11.input_layernorm.weight", "lm_head.weight"]
                .into();
        assert_eq!(count_layers(&names), Some(12));
    }

    #[test]
    fn sentencepiece_counting_rejects_garbage() {
        // Two pieces: field 1 (key 0x0a) with lengths 1 and 2, then field 2 varint.
        assert_eq!(sentencepiece_pieces(&[0x0a, 1, b'a', 0x0a, 2, b'b', b'c', 0x10, 5]), Some(2));
        assert_eq!(sentencepiece_pieces(&[0x0a, 9, b'a']), None);
        assert_eq!(sentencepiece_pieces(&[0x0f]), None);
    }
}
