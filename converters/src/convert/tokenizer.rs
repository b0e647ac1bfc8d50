//! Tokenizer facts the converters need: vocabulary size and deterministic artifact names.

use crate::checkpoint::{Artifact, Checkpoint};
use crate::describe::sentencepiece_pieces;
use crate::error::{Error, Result};
use crate::formats::nemo::{self, NemoConfig};

/// Vocabulary of a `.nemo`'s tokenizer: SentencePiece pieces plus
/// `tokenizer.additional_special_tokens` (formats.md §4.2), when the tokenizer can be read.
pub fn nemo_vocab(ckpt: &Checkpoint, cfg: &NemoConfig) -> Option<usize> {
    let model = cfg.get_str("tokenizer.model")?;
    let artifact = nemo::resolve_artifact(ckpt, model)?;
    let pieces = sentencepiece_pieces(&artifact.source.bytes().ok()?)?;
    let extra = match cfg.get("tokenizer.additional_special_tokens") {
        Some(serde_yaml::Value::Sequence(s)) => s.len(),
        _ => 0,
    };
    Some(pieces + extra)
}

/// The SentencePiece model a `.nemo` references: `None` when model_config.yaml names none, an
/// error naming it when the archive does not hold the one it names (every caller would
/// otherwise carry on without a tokenizer the model was saved with).
pub fn nemo_tokenizer_model<'a>(ckpt: &'a Checkpoint, cfg: &NemoConfig) -> Result<Option<&'a Artifact>> {
    let Some(named) = cfg.get_str("tokenizer.model") else { return Ok(None) };
    nemo::resolve_artifact(ckpt, named).map(Some).ok_or_else(|| {
        let held: Vec<&str> = ckpt.meta.artifacts.iter().map(|a| a.name.as_str()).collect();
        Error::missing(
            &ckpt.meta.path,
            format!(
                "the tokenizer model '{named}' that model_config.yaml names (the archive holds: {}; \
                 pass --tokenizer PATH)",
                held.join(", ")
            ),
        )
    })
}

/// The SentencePiece model a `.nemo` must carry ([`nemo_tokenizer_model`], and an error when
/// model_config.yaml names none).
pub fn require_nemo_tokenizer_model<'a>(ckpt: &'a Checkpoint, cfg: &NemoConfig) -> Result<&'a Artifact> {
    nemo_tokenizer_model(ckpt, cfg)?.ok_or_else(|| {
        Error::missing(
            &ckpt.meta.path,
            "a tokenizer model (model_config.yaml has no tokenizer.model; pass --tokenizer PATH)",
        )
    })
}

/// NeMo's artifact name `<32 hex>_<basename>`. NeMo uses a random uuid; we hash the content so
/// converting the same input twice gives identical archives.
pub fn artifact_name(basename: &str, content: &[u8]) -> String {
    let fnv = |seed: u64| content.iter().fold(seed, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3));
    format!("{:016x}{:016x}_{basename}", fnv(0xcbf2_9ce4_8422_2325), fnv(0x6c62_272e_07bb_0142))
}

#[cfg(test)]
mod tests {
    #[test]
    fn artifact_names_are_content_addressed() {
        let a = super::artifact_name("tokenizer.model", b"abc");
        assert_eq!(a.len(), 32 + 1 + "tokenizer.model".len());
        assert_eq!(a, super::artifact_name("tokenizer.model", b"abc"));
        assert_ne!(a, super::artifact_name("tokenizer.model", b"abd"));
    }
}

/// llava-hf's own added tokens. Building a NeVA, they are not kept as pieces: their rows become
/// NeVA's first `<extra_id_*>` (formats.md; what `convert` does to a llava-hf).
pub const LLAVA_HF_TOKENS: [&str; 2] = [crate::names::neva::HF_IMAGE_TOKEN, crate::names::neva::HF_PAD_TOKEN];

/// One token transformers adds after a SentencePiece model's pieces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddedToken {
    /// Its id.
    pub id: u32,
    /// Its text.
    pub content: String,
    /// Special (skipped when decoding with `skip_special_tokens`).
    pub special: bool,
}

/// The tokens an HF directory adds to its SentencePiece model, in id order, read where
/// transformers reads them: `tokenizer_config.json`'s `added_tokens_decoder`, else the older
/// `added_tokens.json` (all special), else `tokenizer.json`'s `added_tokens`. `read(name)` gives
/// a file's bytes (`None`: absent); `dir` names them in errors. An entry that is not an id and a
/// non-empty text, or two entries for one id or one text, is an error naming the file: a
/// tokenizer built from them would disagree with transformers.
pub fn hf_added_tokens(
    read: impl Fn(&str) -> Result<Option<Vec<u8>>>,
    dir: &std::path::Path,
) -> Result<Vec<AddedToken>> {
    use serde_json::Value as Json;
    let parse = |name: &str| -> Result<Option<Json>> {
        read(name)?
            .map(|b| {
                serde_json::from_slice(&b)
                    .map_err(|e| Error::malformed(dir.join(name), "json", e.to_string()))
            })
            .transpose()
    };
    let mut found: Option<(&str, Vec<AddedToken>)> = None;
    let bad = |name: &str, what: String| Error::invalid(dir.join(name), what);
    if let Some(decoder) =
        parse("tokenizer_config.json")?.and_then(|c| c.get("added_tokens_decoder").cloned())
    {
        let name = "tokenizer_config.json";
        let entries =
            decoder.as_object().ok_or_else(|| bad(name, "added_tokens_decoder is not an object".into()))?;
        let mut list = Vec::new();
        for (id, entry) in entries {
            let id = id
                .parse::<u32>()
                .map_err(|_| bad(name, format!("added_tokens_decoder key {id:?} is not an id")))?;
            let content = entry
                .get("content")
                .and_then(Json::as_str)
                .ok_or_else(|| bad(name, format!("added_tokens_decoder[{id}] has no string 'content'")))?;
            let special = entry.get("special").and_then(Json::as_bool).unwrap_or(false);
            list.push(AddedToken { id, content: content.to_owned(), special });
        }
        found = Some((name, list));
    }
    if found.is_none() {
        if let Some(map) = parse("added_tokens.json")? {
            let name = "added_tokens.json";
            let entries = map.as_object().ok_or_else(|| bad(name, "not an object of token: id".into()))?;
            let mut list = Vec::new();
            for (token, id) in entries {
                let id = id
                    .as_u64()
                    .and_then(|i| u32::try_from(i).ok())
                    .ok_or_else(|| bad(name, format!("{token:?}: {id} is not an id")))?;
                list.push(AddedToken { id, content: token.clone(), special: true });
            }
            found = Some((name, list));
        }
    }
    if found.is_none() {
        if let Some(v) = parse("tokenizer.json")? {
            let name = "tokenizer.json";
            let mut list = Vec::new();
            if let Some(added) = v.get("added_tokens").filter(|a| !a.is_null()) {
                let entries =
                    added.as_array().ok_or_else(|| bad(name, "added_tokens is not a list".into()))?;
                for t in entries {
                    let (Some(id), Some(content)) = (
                        t.get("id").and_then(Json::as_u64).and_then(|i| u32::try_from(i).ok()),
                        t.get("content").and_then(Json::as_str),
                    ) else {
                        return Err(bad(name, format!("added_tokens entry {t} is not an id and a content")));
                    };
                    let special = t.get("special").and_then(Json::as_bool).unwrap_or(false);
                    list.push(AddedToken { id, content: content.to_owned(), special });
                }
            }
            found = Some((name, list));
        }
    }
    let Some((name, mut list)) = found else { return Ok(Vec::new()) };
    list.sort_by_key(|t| t.id);
    for (i, t) in list.iter().enumerate() {
        if t.content.is_empty() {
            return Err(bad(name, format!("added token id {} has empty text", t.id)));
        }
        if let Some(other) = list[..i].iter().find(|o| o.id == t.id || o.content == t.content) {
            return Err(bad(
                name,
                format!(
                    "added tokens {:?} (id {}) and {:?} (id {}) collide",
                    other.content, other.id, t.content, t.id
                ),
            ));
        }
    }
    Ok(list)
}

/// An HF directory's `tokenizer.model` for a NeMo checkpoint, which reads nothing else: checked
/// to parse, with the tokens HF added after its pieces ([`hf_added_tokens`]) appended as
/// user-defined pieces (what `resize-vocab` does to a `.nemo`), except those named in `skip`.
/// They must follow the pieces without a gap and fit the embedding's `rows`.
pub fn sentencepiece_with_hf_added(
    src: &Checkpoint,
    model: &Artifact,
    rows: usize,
    skip: &[&str],
) -> Result<Artifact> {
    use crate::convert::sentencepiece::SentencePieceModel;
    let dir = &src.meta.path;
    let here = dir.join(&model.name);
    let sp = SentencePieceModel::parse(model.source.bytes()?.into_owned(), &here)?;
    let read = |name: &str| -> Result<Option<Vec<u8>>> {
        src.meta
            .artifacts
            .iter()
            .find(|a| a.name == name)
            .map(|a| a.source.bytes().map(|b| b.into_owned()))
            .transpose()
    };
    let added: Vec<AddedToken> = hf_added_tokens(read, dir)?
        .into_iter()
        .filter(|t| t.id as usize >= sp.len() && !skip.contains(&t.content.as_str()))
        .collect();
    if added.is_empty() {
        return Ok(model.clone());
    }
    if let Some((i, t)) = added.iter().enumerate().find(|(i, t)| t.id as usize != sp.len() + i) {
        return Err(Error::invalid(
            dir,
            format!(
                "added token '{}' has id {} but would be piece {} of the SentencePiece model (ids after its {} pieces must be contiguous)",
                t.content,
                t.id,
                sp.len() + i,
                sp.len()
            ),
        ));
    }
    if sp.len() + added.len() > rows {
        return Err(Error::invalid(
            dir,
            format!(
                "the tokenizer adds {} tokens after its {} pieces (ids up to {}), past the embedding's {rows} rows",
                added.len(),
                sp.len(),
                sp.len() + added.len() - 1
            ),
        ));
    }
    let tokens: Vec<&str> = added.iter().map(|t| t.content.as_str()).collect();
    let extended = sp.with_user_defined(&tokens, &here)?;
    Ok(Artifact { name: model.name.clone(), source: crate::ByteSource::owned(extended.bytes().to_vec()) })
}
