//! Which token ids a checkpoint's tokenizer uses, and adding tokens to it.
//!
//! Read from every file that can assign an id: `tokenizer.json` (model vocabulary and
//! `added_tokens`), `tokenizer_config.json` (`added_tokens_decoder`), `added_tokens.json`, and the
//! SentencePiece `tokenizer.model` (a `.nemo`'s through its yaml, plus
//! `tokenizer.additional_special_tokens`, which NeMo numbers after the pieces, formats.md §4.2).
//!
//! Adding tokens edits what the loader of that container reads:
//!
//! * HF: what `tokenizer.add_special_tokens({"additional_special_tokens": …})` + `save_pretrained`
//!   changes: `tokenizer.json` `added_tokens`, `tokenizer_config.json` `added_tokens_decoder` and
//!   `additional_special_tokens`, `special_tokens_map.json` `additional_special_tokens`, and
//!   `added_tokens.json` (each when present; `added_tokens.json` is created when the directory
//!   has only a SentencePiece model). `tokenizer.model` is left alone, as transformers does. The
//!   tokens are special: matched whole, never normalised or split.
//! * `.nemo`: the SentencePiece model gets USER_DEFINED pieces appended — what NeMo's
//!   `add_special_tokens_to_sentencepiece.py` does — and is stored under a new content-addressed
//!   artifact name. A yaml with `additional_special_tokens` is refused (their ids sit after the
//!   pieces and would move).

use super::extract::json_bytes;
use super::model::{LlamaModel, Store};
use crate::checkpoint::{Artifact, ByteSource};
use crate::convert::sentencepiece::SentencePieceModel;
use crate::convert::tokenizer;
use crate::error::{Error, Result};
use serde_json::{json, Value as Json};
use std::collections::BTreeMap;
use std::path::Path;

/// The ids a tokenizer assigns.
#[derive(Clone, Debug, Default)]
pub struct TokenizerView {
    /// id → token text.
    pub ids: BTreeMap<u32, String>,
    /// Which files were read.
    pub files: Vec<String>,
}

impl TokenizerView {
    /// Whether any tokenizer file was found.
    pub fn found(&self) -> bool {
        !self.files.is_empty()
    }

    /// Number of ids in use (highest id + 1), 0 without a tokenizer.
    pub fn len(&self) -> usize {
        self.ids.keys().next_back().map_or(0, |m| *m as usize + 1)
    }

    /// Whether no id is known.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The id of token `text`, if the tokenizer has it.
    pub fn id_of(&self, text: &str) -> Option<u32> {
        self.ids.iter().find(|(_, t)| t.as_str() == text).map(|(id, _)| *id)
    }

    /// Read the tokenizer of a LLaMA checkpoint.
    pub fn read(model: &LlamaModel) -> Result<Self> {
        let src = &model.source;
        match &model.store {
            Store::Hf(_) => Self::from_hf_artifacts(&src.meta.path, &src.meta.artifacts),
            Store::Nemo { cfg, .. } => {
                let mut view = TokenizerView::default();
                if let Some(a) = tokenizer::nemo_tokenizer_model(src, cfg)? {
                    view.add_sentencepiece(&a.source.bytes()?, &src.meta.path.join(&a.name))?;
                    view.files.push(a.name.clone());
                    if let Some(serde_yaml::Value::Sequence(extra)) =
                        cfg.get("tokenizer.additional_special_tokens")
                    {
                        let base = view.len() as u32;
                        for (i, t) in extra.iter().enumerate() {
                            view.ids.insert(base + i as u32, t.as_str().unwrap_or("?").to_string());
                        }
                    }
                }
                Ok(view)
            }
        }
    }

    /// Read the tokenizer files of an HF directory (`dir` names them in errors): the
    /// SentencePiece pieces (else the fast tokenizer's vocabulary), then the added tokens where
    /// transformers reads them ([`tokenizer::hf_added_tokens`], which refuses inconsistent ones).
    pub fn from_hf_artifacts(dir: &Path, artifacts: &[Artifact]) -> Result<Self> {
        const FILES: [&str; 4] =
            ["tokenizer.model", "tokenizer.json", "tokenizer_config.json", "added_tokens.json"];
        let file = |name: &str| artifacts.iter().find(|a| a.name == name);
        let mut view = TokenizerView::default();
        if let Some(a) = file("tokenizer.model") {
            view.add_sentencepiece(&a.source.bytes()?, &dir.join(&a.name))?;
        } else if let Some(a) = file("tokenizer.json") {
            view.add_vocabulary(&parse_json(&a.source.bytes()?, &dir.join(&a.name))?);
        }
        let read = |name: &str| file(name).map(|a| a.source.bytes().map(|b| b.into_owned())).transpose();
        for t in tokenizer::hf_added_tokens(read, dir)? {
            view.ids.insert(t.id, t.content);
        }
        view.files = FILES.iter().filter(|f| file(f).is_some()).map(|f| f.to_string()).collect();
        Ok(view)
    }

    fn add_sentencepiece(&mut self, bytes: &[u8], origin: &Path) -> Result<()> {
        let model = SentencePieceModel::parse(bytes.to_vec(), origin)?;
        for (i, p) in model.pieces().iter().enumerate() {
            self.ids.insert(i as u32, p.piece.clone());
        }
        Ok(())
    }

    /// A fast tokenizer's model vocabulary (`tokenizer.json` `model.vocab`).
    fn add_vocabulary(&mut self, v: &Json) {
        match v.pointer("/model/vocab") {
            Some(Json::Object(m)) => {
                for (text, id) in m {
                    if let Some(id) = id.as_u64() {
                        self.ids.insert(id as u32, text.clone());
                    }
                }
            }
            // Unigram: [[piece, score], ...], the id is the position.
            Some(Json::Array(a)) => {
                for (i, e) in a.iter().enumerate() {
                    let text = e.get(0).and_then(Json::as_str).unwrap_or("?");
                    self.ids.insert(i as u32, text.to_string());
                }
            }
            _ => {}
        }
    }
}

pub(crate) fn parse_json(bytes: &[u8], origin: &Path) -> Result<Json> {
    serde_json::from_slice(bytes).map_err(|e| Error::malformed(origin, "json", e.to_string()))
}

/// Tokenizer edits for added tokens: new artifacts, plan lines, and the yaml edit a `.nemo` needs
/// (its tokenizer's new artifact name).
pub struct AddedTokens {
    /// The checkpoint's companion files after the edit.
    pub artifacts: Vec<Artifact>,
    /// One line per edited file.
    pub lines: Vec<String>,
    /// `nemo:<new name>` for the yaml's `tokenizer.model`.
    pub nemo_tokenizer_ref: Option<String>,
}

/// Give `tokens` the ids `first, first + 1, …` in the tokenizer files of `model`.
pub fn add_tokens(model: &LlamaModel, tokens: &[String], first: u32) -> Result<AddedTokens> {
    let src = &model.source;
    let mut artifacts = src.meta.artifacts.clone();
    let mut lines = Vec::new();
    let ids = || tokens.iter().enumerate().map(|(i, t)| (first + i as u32, t.as_str()));
    let range = format!("ids {}..={}", first, first as usize + tokens.len() - 1);
    match &model.store {
        Store::Hf(_) => {
            let names: Vec<String> = artifacts.iter().map(|a| a.name.clone()).collect();
            let added: Vec<(u32, &str)> = ids().collect();
            for a in artifacts.iter_mut() {
                let name = a.name.clone();
                if edit_hf_file(a, &name, &src.meta.path, &added)? {
                    lines.push(format!("{}: {} added tokens ({range})", a.name, tokens.len()));
                }
            }
            if !names.iter().any(|n| n == "tokenizer.json" || n == "added_tokens.json") {
                if !names.iter().any(|n| n == "tokenizer.model") {
                    return Err(Error::missing(
                        &src.meta.path,
                        "a tokenizer (tokenizer.json or tokenizer.model) to add tokens to",
                    ));
                }
                let v: serde_json::Map<String, Json> =
                    ids().map(|(id, t)| (t.to_string(), json!(id))).collect();
                artifacts.push(Artifact {
                    name: "added_tokens.json".into(),
                    source: ByteSource::owned(json_bytes(&Json::Object(v))),
                });
                lines.push(format!("added_tokens.json: created with {} tokens ({range})", tokens.len()));
            }
            Ok(AddedTokens { artifacts, lines, nemo_tokenizer_ref: None })
        }
        Store::Nemo { cfg, .. } => {
            if matches!(cfg.get("tokenizer.additional_special_tokens"), Some(serde_yaml::Value::Sequence(s)) if !s.is_empty())
            {
                return Err(Error::invalid(
                    &src.meta.path,
                    "model_config.yaml: tokenizer.additional_special_tokens is set; their ids follow the \
                     SentencePiece pieces and would move if pieces were added — fold them into the \
                     SentencePiece model first",
                ));
            }
            if let Some(lib) = cfg.get_str("tokenizer.library") {
                if lib != "sentencepiece" {
                    return Err(Error::invalid(
                        &src.meta.path,
                        format!("model_config.yaml: tokenizer.library is '{lib}'; only sentencepiece tokenizers can get tokens"),
                    ));
                }
            }
            let old = tokenizer::require_nemo_tokenizer_model(src, cfg)?;
            let origin = src.meta.path.join(&old.name);
            let model = SentencePieceModel::parse(old.source.bytes()?.into_owned(), &origin)?;
            let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
            let bytes = model.with_user_defined(&tokens, &origin)?.bytes().to_vec();
            let name = tokenizer::artifact_name("tokenizer.model", &bytes);
            lines.push(format!(
                "{} -> {name}: {} USER_DEFINED SentencePiece pieces appended ({range})",
                old.name,
                tokens.len()
            ));
            let old_name = old.name.clone();
            artifacts.retain(|a| a.name != old_name);
            artifacts.push(Artifact { name: name.clone(), source: ByteSource::owned(bytes) });
            // The HF tokenizer files the .nemo keeps for converting back get the tokens as an HF
            // directory would, so they still describe its tokenizer.
            let added: Vec<(u32, &str)> = ids().collect();
            for a in artifacts.iter_mut() {
                let kept = tokenizer::KEPT_HF_FILES.iter().find(|(_, member)| *member == a.name);
                let Some((as_hf, _)) = kept else { continue };
                if edit_hf_file(a, as_hf, &src.meta.path, &added)? {
                    lines.push(format!("{} (kept {as_hf}): {} added tokens ({range})", a.name, tokens.len()));
                }
            }
            Ok(AddedTokens { artifacts, lines, nemo_tokenizer_ref: Some(format!("nemo:{name}")) })
        }
    }
}

/// Add `tokens` (id, text) to `a`, an HF tokenizer file read as `name` (`tokenizer.json`,
/// `tokenizer_config.json`, `special_tokens_map.json`, `added_tokens.json`) the way
/// `add_special_tokens` + `save_pretrained` changes it. `false` for any other file.
fn edit_hf_file(a: &mut Artifact, name: &str, dir: &Path, tokens: &[(u32, &str)]) -> Result<bool> {
    let origin = dir.join(&a.name);
    if !matches!(
        name,
        "tokenizer.json" | "tokenizer_config.json" | "added_tokens.json" | "special_tokens_map.json"
    ) {
        return Ok(false);
    }
    let mut v = parse_json(&a.source.bytes()?, &origin)?;
    let bad = || Error::invalid(&origin, "unexpected JSON layout (expected an object)");
    let o = v.as_object_mut().ok_or_else(bad)?;
    match name {
        "tokenizer.json" => {
            let added = o.entry("added_tokens").or_insert_with(|| json!([]));
            let list = added.as_array_mut().ok_or_else(bad)?;
            for &(id, t) in tokens {
                list.push(json!({
                    "id": id, "content": t, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": true,
                }));
            }
        }
        "tokenizer_config.json" => {
            let dec = o.entry("added_tokens_decoder").or_insert_with(|| json!({}));
            let map = dec.as_object_mut().ok_or_else(bad)?;
            for &(id, t) in tokens {
                map.insert(
                    id.to_string(),
                    json!({"content": t, "lstrip": false, "normalized": false, "rstrip": false,
                           "single_word": false, "special": true}),
                );
            }
            additional(o, tokens.iter().map(|(_, t)| json!(t))).ok_or_else(bad)?;
        }
        "special_tokens_map.json" => {
            let entry = |t: &str| json!({"content": t, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false});
            additional(o, tokens.iter().map(|(_, t)| entry(t))).ok_or_else(bad)?;
        }
        _ => {
            for &(id, t) in tokens {
                o.insert(t.to_string(), json!(id));
            }
        }
    }
    a.source = ByteSource::owned(json_bytes(&v));
    Ok(true)
}

/// Append to `additional_special_tokens` (created when absent), the list through which
/// transformers treats the tokens as special (the slow tokenizer then drops the `▁` it would
/// otherwise put before one at the start of a text). `None` if the key holds no list.
fn additional(o: &mut serde_json::Map<String, Json>, items: impl Iterator<Item = Json>) -> Option<()> {
    let list = o.entry("additional_special_tokens").or_insert_with(|| json!([]));
    list.as_array_mut()?.extend(items);
    Some(())
}
