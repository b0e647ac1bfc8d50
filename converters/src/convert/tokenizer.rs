//! Tokenizer facts the converters need: vocabulary size and deterministic artifact names.

use crate::checkpoint::{Artifact, ByteSource, Checkpoint};
use crate::convert::sentencepiece::SentencePieceModel;
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
        let held = if held.is_empty() {
            "no files besides the config and weights".to_string()
        } else {
            format!("only {}", held.join(", "))
        };
        Error::missing(
            &ckpt.meta.path,
            format!("the tokenizer model '{named}' that model_config.yaml names (the archive holds {held}; pass --tokenizer PATH)"),
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

/// Settings of transformers' `LlamaTokenizer` that change how it splits, pads or decodes text
/// (`legacy`: a "▁" after special tokens; `add_prefix_space`: one before the text), with the
/// JSON type each must have. They hold for any SentencePiece model, so a written directory takes
/// the source's.
const TOKENIZER_BEHAVIOUR: [(&str, IsWellTyped); 8] = [
    ("legacy", serde_json::Value::is_boolean),
    ("add_prefix_space", serde_json::Value::is_boolean),
    ("add_bos_token", serde_json::Value::is_boolean),
    ("add_eos_token", serde_json::Value::is_boolean),
    ("clean_up_tokenization_spaces", serde_json::Value::is_boolean),
    ("spaces_between_special_tokens", serde_json::Value::is_boolean),
    ("padding_side", serde_json::Value::is_string),
    ("sp_model_kwargs", serde_json::Value::is_object),
];

/// Whether a setting's JSON value has the type transformers expects.
type IsWellTyped = fn(&serde_json::Value) -> bool;

/// What a `tokenizer_config.json` we write keeps of the source's.
#[derive(Clone, Copy, Default)]
pub struct SourceTokenizer<'a> {
    /// The source directory's `tokenizer_config.json` (an HF directory without one has
    /// transformers' defaults: `{}`), or the copy a `.nemo` keeps; `None` for a tokenizer that
    /// never had one (NeMo's own).
    pub config: Option<&'a ByteSource>,
    /// The SentencePiece model written, whose pieces the source's added tokens must be to stay.
    pub model: Option<&'a SentencePieceModel>,
    /// The source had a `tokenizer.json` that is not written with this config. Its settings left
    /// to that file (`add_prefix_space: null`, which a fast tokenizer saves, meaning "as the
    /// file prefixes") then take the default, where transformers would read the null as false.
    pub json_left_behind: bool,
}

/// The `tokenizer_config.json` of a `LlamaTokenizer`, as our HF and llava-hf exports write it,
/// with the [`TOKENIZER_BEHAVIOUR`] settings of the source's config where it has them (of the
/// right type) and transformers' default `legacy: true` where it has a config without one.
/// Without a source config: `legacy: false`, which tokenizes as NeMo's SentencePiece tokenizer
/// (`sentencepiece_legacy: false`) does, with no extra "▁" after a special token, and
/// otherwise what Meta's LLaMA-2 directories ship.
///
/// The source's added tokens that are pieces of the model keep their `added_tokens_decoder`
/// entries and `additional_special_tokens` place, and its `pad_token` when it is a piece: an
/// HF added token a `.nemo` holds as a user-defined piece is special again (matched whole,
/// skipped when decoding), as it was.
pub fn llama_tokenizer_config(max_positions: usize, source: SourceTokenizer) -> serde_json::Value {
    use serde_json::Value as Json;
    let mut config = serde_json::json!({
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": true,
        "add_eos_token": false,
        "legacy": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": max_positions,
        "padding_side": "right",
    });
    // An unreadable source file was refused where its added tokens were read; here it only
    // means there is nothing to keep.
    let kept = source.config.and_then(|b| serde_json::from_slice::<Json>(&b.bytes().ok()?).ok());
    let Some(kept) = kept.as_ref().and_then(Json::as_object) else { return config };
    config["legacy"] = true.into();
    for (key, well_typed) in TOKENIZER_BEHAVIOUR {
        match kept.get(key) {
            Some(Json::Null) if !source.json_left_behind => config[key] = Json::Null,
            Some(v) if well_typed(v) => config[key] = v.clone(),
            _ => {}
        }
    }
    let Some(sp) = source.model else { return config };
    let is_piece = |id: u32, text: &str| sp.pieces().get(id as usize).is_some_and(|p| p.piece == text);
    let decoder: serde_json::Map<String, Json> = kept
        .get("added_tokens_decoder")
        .and_then(Json::as_object)
        .into_iter()
        .flatten()
        .filter(|(id, entry)| {
            let text = entry.get("content").and_then(Json::as_str);
            id.parse().ok().zip(text).is_some_and(|(id, text)| is_piece(id, text))
        })
        .map(|(id, entry)| (id.clone(), entry.clone()))
        .collect();
    let special: Vec<Json> = kept
        .get("additional_special_tokens")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .filter(|t| t.as_str().and_then(|t| sp.id(t)).is_some())
        .cloned()
        .collect();
    if !decoder.is_empty() {
        config["added_tokens_decoder"] = Json::Object(decoder);
    }
    if !special.is_empty() {
        config["additional_special_tokens"] = Json::Array(special);
    }
    if let Some(pad) = kept.get("pad_token").and_then(Json::as_str).filter(|p| sp.id(p).is_some()) {
        config["pad_token"] = pad.into();
    }
    config
}

/// The `special_tokens_map.json` that goes with a `tokenizer_config.json` we write: its named
/// tokens and `additional_special_tokens`.
pub fn special_tokens_map(config: &serde_json::Value) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for key in ["bos_token", "eos_token", "unk_token", "pad_token", "additional_special_tokens"] {
        if let Some(v) = config.get(key).filter(|v| !v.is_null()) {
            map.insert(key.into(), v.clone());
        }
    }
    serde_json::Value::Object(map)
}

/// The archive member in which a `.nemo` converted from an HF directory keeps that directory's
/// `tokenizer_config.json`, whose [`TOKENIZER_BEHAVIOUR`] settings converting back restores.
/// NeMo never reads it.
pub const NEMO_HF_TOKENIZER_CONFIG: &str = "hf_tokenizer_config.json";

/// The archive member in which a `.nemo` converted from an HF directory keeps that directory's
/// fast tokenizer (`tokenizer.json`). NeMo never reads it: it reads the archive members its config
/// names. Converting back writes it again while it still describes the SentencePiece model
/// ([`carry_tokenizer_json`]). That matters because the fast tokenizer transformers builds from
/// `tokenizer.model` alone can split text around special tokens differently from the one the
/// user started with.
pub const NEMO_HF_TOKENIZER_JSON: &str = "hf_tokenizer.json";

/// `json` (a `tokenizer.json`) for an output whose tokenizer is `sp` with exactly `added` after
/// its pieces. It is written again when its vocabulary is `sp`'s first pieces, id for id. Every
/// further piece (an HF added token stored as a user-defined piece) must be one of its added
/// tokens, and every added token it has must be a piece or one of `added`. Tokens of `added`
/// that it lacks are appended as special added tokens. `None` otherwise (a replaced or edited
/// tokenizer): the output then has the SentencePiece files only, which transformers converts
/// itself.
pub fn carry_tokenizer_json(
    json: &ByteSource,
    sp: &SentencePieceModel,
    added: &[(u32, &str)],
) -> Result<Option<ByteSource>> {
    use serde_json::{json, Value as Json};
    let Ok(mut v) = serde_json::from_slice::<Json>(&json.bytes()?) else { return Ok(None) };
    let pieces = sp.pieces();
    let base = v.pointer("/model/vocab").and_then(Json::as_object).filter(|vocab| {
        vocab.len() <= pieces.len()
            && pieces[..vocab.len()]
                .iter()
                .enumerate()
                .all(|(id, p)| vocab.get(&p.piece).and_then(Json::as_u64) == Some(id as u64))
    });
    let Some(base) = base.map(|vocab| vocab.len()) else { return Ok(None) };
    let Some(list) = v.get_mut("added_tokens").and_then(Json::as_array_mut) else { return Ok(None) };
    let describes = |t: &Json| match (t["id"].as_u64(), t["content"].as_str()) {
        (Some(id), Some(text)) => match pieces.get(id as usize) {
            Some(p) => p.piece == text,
            None => added.iter().any(|(i, a)| u64::from(*i) == id && *a == text),
        },
        _ => false,
    };
    let listed = |id: usize| list.iter().any(|t| t["id"].as_u64() == Some(id as u64));
    if !list.iter().all(describes) || !(base..pieces.len()).all(listed) {
        return Ok(None);
    }
    let missing: Vec<_> = added.iter().filter(|(id, _)| !listed(*id as usize)).collect();
    if missing.is_empty() {
        return Ok(Some(json.clone()));
    }
    for (id, text) in missing {
        list.push(json!({"id": id, "content": text, "single_word": false, "lstrip": false,
                         "rstrip": false, "normalized": false, "special": true}));
    }
    Ok(Some(ByteSource::owned(crate::convert::clip::json_bytes(&v))))
}

/// The HF tokenizer files a checkpoint carries for its SentencePiece model: (`tokenizer.json`,
/// `tokenizer_config.json`) of an HF directory (`{}` when it has a `tokenizer.model` but no
/// config), or the copies a `.nemo` converted from one keeps ([`NEMO_HF_TOKENIZER_JSON`],
/// [`NEMO_HF_TOKENIZER_CONFIG`]).
pub fn hf_tokenizer_files(ckpt: &Checkpoint) -> (Option<ByteSource>, Option<ByteSource>) {
    let nemo = matches!(ckpt.meta.flavour, crate::checkpoint::Flavour::Nemo { .. });
    let [json, config] = KEPT_HF_FILES.map(|(hf, kept)| {
        let name = if nemo { kept } else { hf };
        ckpt.meta.artifacts.iter().find(|a| a.name == name).map(|a| a.source.clone())
    });
    // An HF directory without the file has transformers' defaults (`legacy: true`), which an
    // empty config records.
    let has_model = ckpt.meta.artifacts.iter().any(|a| a.name == "tokenizer.model");
    let config = config.or_else(|| (!nemo && has_model).then(|| ByteSource::owned(b"{}".to_vec())));
    (json, config)
}

/// The HF tokenizer files a `.nemo` keeps, each with the archive member that keeps it.
pub const KEPT_HF_FILES: [(&str, &str); 2] =
    [("tokenizer.json", NEMO_HF_TOKENIZER_JSON), ("tokenizer_config.json", NEMO_HF_TOKENIZER_CONFIG)];

/// The `.nemo` members keeping `json` and `config` (the inverse of [`hf_tokenizer_files`]).
pub fn kept_members(json: Option<&ByteSource>, config: Option<&ByteSource>) -> Vec<Artifact> {
    KEPT_HF_FILES
        .iter()
        .zip([json, config])
        .filter_map(|((_, member), file)| {
            file.map(|f| Artifact { name: member.to_string(), source: f.clone() })
        })
        .collect()
}

/// `json` (a `tokenizer.json`) without its added tokens whose text is one of `texts` and id `from`
/// or more: llava-hf's `<image>` and `<pad>`, for an output that drops their rows. `None` when it
/// is not JSON with a list of added tokens.
pub fn without_added_tokens(json: &ByteSource, texts: &[&str], from: usize) -> Result<Option<ByteSource>> {
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&json.bytes()?) else { return Ok(None) };
    let Some(list) = v.get_mut("added_tokens").and_then(serde_json::Value::as_array_mut) else {
        return Ok(None);
    };
    let dropped = |t: &serde_json::Value| {
        t["id"].as_u64().is_some_and(|id| id as usize >= from)
            && t["content"].as_str().is_some_and(|text| texts.contains(&text))
    };
    if !list.iter().any(dropped) {
        return Ok(Some(json.clone()));
    }
    list.retain(|t| !dropped(t));
    Ok(Some(ByteSource::owned(crate::convert::clip::json_bytes(&v))))
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
    /// transformers' `lstrip`: the whitespace before the token in a text is dropped before the
    /// rest is encoded.
    pub lstrip: bool,
    /// transformers' `rstrip`: the same for the whitespace after it.
    pub rstrip: bool,
    /// transformers' `single_word`: the token is only one where it stands as a word.
    pub single_word: bool,
}

impl AddedToken {
    /// A token without `lstrip`, `rstrip` or `single_word`.
    fn plain(id: u32, content: String, special: bool) -> Self {
        AddedToken { id, content, special, lstrip: false, rstrip: false, single_word: false }
    }

    /// `plain`, with the flags an `added_tokens_decoder` / `added_tokens` entry sets.
    fn with_flags(id: u32, content: String, special: bool, entry: &serde_json::Value) -> Self {
        let flag = |key: &str| entry.get(key).and_then(serde_json::Value::as_bool).unwrap_or(false);
        AddedToken {
            lstrip: flag("lstrip"),
            rstrip: flag("rstrip"),
            single_word: flag("single_word"),
            ..Self::plain(id, content, special)
        }
    }
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
    // transformers' order; the first file with a list is the list (even an empty one).
    let lists: [(&str, AddedTokenList); 3] = [
        ("tokenizer_config.json", added_tokens_decoder),
        ("added_tokens.json", added_tokens_json),
        ("tokenizer.json", tokenizer_json_added),
    ];
    for (name, list_of) in lists {
        let Some(bytes) = read(name)? else { continue };
        let bad = |what: String| Error::invalid(dir.join(name), what);
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::malformed(dir.join(name), "json", e.to_string()))?;
        let Some(list) = list_of(&v) else { continue };
        let mut list = list.map_err(bad)?;
        list.sort_by_key(|t| t.id);
        for (i, t) in list.iter().enumerate() {
            if t.content.is_empty() {
                return Err(bad(format!("added token id {} has empty text", t.id)));
            }
            if let Some(other) = list[..i].iter().find(|o| o.id == t.id || o.content == t.content) {
                return Err(bad(format!(
                    "added tokens {:?} (id {}) and {:?} (id {}) collide",
                    other.content, other.id, t.content, t.id
                )));
            }
        }
        return Ok(list);
    }
    Ok(Vec::new())
}

/// The added tokens one file lists: `None` when it has no list, `Err` saying what is wrong.
type AddedTokenList = fn(&serde_json::Value) -> Option<std::result::Result<Vec<AddedToken>, String>>;

/// `tokenizer_config.json`'s `added_tokens_decoder`: `{"id": {"content": …, "special": …}}`.
fn added_tokens_decoder(config: &serde_json::Value) -> Option<std::result::Result<Vec<AddedToken>, String>> {
    let decoder = config.get("added_tokens_decoder")?;
    let Some(entries) = decoder.as_object() else {
        return Some(Err("added_tokens_decoder is not an object".into()));
    };
    let token = |(id, entry): (&String, &serde_json::Value)| {
        let id = id.parse::<u32>().map_err(|_| format!("added_tokens_decoder key {id:?} is not an id"))?;
        let content = entry
            .get("content")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| format!("added_tokens_decoder[{id}] has no string 'content'"))?;
        let special = entry.get("special").and_then(serde_json::Value::as_bool).unwrap_or(false);
        Ok(AddedToken::with_flags(id, content.to_owned(), special, entry))
    };
    Some(entries.iter().map(token).collect())
}

/// The older `added_tokens.json`: `{"text": id}`, all special.
fn added_tokens_json(map: &serde_json::Value) -> Option<std::result::Result<Vec<AddedToken>, String>> {
    let Some(entries) = map.as_object() else { return Some(Err("not an object of token: id".into())) };
    let token = |(text, id): (&String, &serde_json::Value)| {
        let id = id
            .as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .ok_or_else(|| format!("{text:?}: {id} is not an id"))?;
        Ok(AddedToken::plain(id, text.clone(), true))
    };
    Some(entries.iter().map(token).collect())
}

/// `tokenizer.json`'s `added_tokens`: `[{"id": …, "content": …, "special": …}]` (absent: none).
fn tokenizer_json_added(v: &serde_json::Value) -> Option<std::result::Result<Vec<AddedToken>, String>> {
    let Some(added) = v.get("added_tokens").filter(|a| !a.is_null()) else { return Some(Ok(Vec::new())) };
    let Some(entries) = added.as_array() else { return Some(Err("added_tokens is not a list".into())) };
    let token = |t: &serde_json::Value| {
        let id = t.get("id").and_then(serde_json::Value::as_u64).and_then(|i| u32::try_from(i).ok());
        match (id, t.get("content").and_then(serde_json::Value::as_str)) {
            (Some(id), Some(content)) => {
                let special = t.get("special").and_then(serde_json::Value::as_bool).unwrap_or(false);
                Ok(AddedToken::with_flags(id, content.to_owned(), special, t))
            }
            _ => Err(format!("added_tokens entry {t} is not an id and a content")),
        }
    };
    Some(entries.iter().map(token).collect())
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn artifact_names_are_content_addressed() {
        let a = artifact_name("tokenizer.model", b"abc");
        assert_eq!(a.len(), 32 + 1 + "tokenizer.model".len());
        assert_eq!(a, artifact_name("tokenizer.model", b"abc"));
        assert_ne!(a, artifact_name("tokenizer.model", b"abd"));
    }

    fn fixture(path: &str) -> Vec<u8> {
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures").join(path)).unwrap()
    }

    fn sp(path: &str) -> SentencePieceModel {
        SentencePieceModel::parse(fixture(path), Path::new(path)).unwrap()
    }

    /// A kept tokenizer.json is written again only while it describes the model: its vocabulary
    /// id for id, and every piece past it one of its added tokens.
    #[test]
    fn a_kept_tokenizer_json_is_carried_only_while_it_describes_the_model() {
        let json = ByteSource::owned(fixture("llama-gqa/tokenizer.json"));
        let model = sp("llama-gqa/tokenizer.model");
        let carried = |json: &ByteSource, model: &SentencePieceModel, added: &[(u32, &str)]| {
            carry_tokenizer_json(json, model, added).unwrap().map(|b| b.bytes().unwrap().into_owned())
        };
        let original = json.bytes().unwrap().into_owned();
        assert_eq!(carried(&json, &model, &[]), Some(original.clone()));
        // An HF added token became a user-defined piece: carried only when the file lists it.
        let grown = model.with_user_defined(&["<a>"], Path::new("t")).unwrap();
        assert_eq!(carried(&json, &grown, &[]), None);
        let mut v: serde_json::Value = serde_json::from_slice(&original).unwrap();
        let id = model.len();
        v["added_tokens"].as_array_mut().unwrap().push(serde_json::json!({"id": id, "content": "<a>"}));
        let listed = ByteSource::owned(serde_json::to_vec(&v).unwrap());
        assert!(carried(&listed, &grown, &[]).is_some());
        // …but not as another text, and not for a model without that piece.
        v["added_tokens"].as_array_mut().unwrap().last_mut().unwrap()["content"] = "<b>".into();
        assert_eq!(carried(&ByteSource::owned(serde_json::to_vec(&v).unwrap()), &grown, &[]), None);
        assert_eq!(carried(&listed, &model, &[]), None);
        // Tokens the output adds past the pieces are appended when the file lacks them.
        let with_image = carried(&json, &model, &[(id as u32, "<image>")]).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&with_image).unwrap();
        assert_eq!(v["added_tokens"].as_array().unwrap().last().unwrap()["content"], "<image>");
        // Another model, or not JSON: not carried.
        assert_eq!(carried(&json, &sp("llama-mha/tokenizer.model"), &[]), None);
        assert_eq!(carried(&ByteSource::owned(b"{".to_vec()), &model, &[]), None);
    }

    /// An HF directory with `tokenizer.model` and the given files, as the readers see it.
    fn hf_dir(files: Vec<(&str, Vec<u8>)>) -> Checkpoint {
        use crate::checkpoint::{Flavour, Meta, Parallelism};
        let artifacts = files
            .into_iter()
            .map(|(name, bytes)| Artifact { name: name.into(), source: ByteSource::owned(bytes) })
            .collect();
        let meta = Meta {
            path: "hf".into(),
            flavour: Flavour::HfSafetensorsDir { sharded: false },
            parallel: Parallelism { tp: 1, pp: 1 },
            config: None,
            artifacts,
        };
        Checkpoint { meta, shards: vec![] }
    }

    proptest::proptest! {
        /// Tokens an HF directory adds after its SentencePiece model's pieces (any text the
        /// model lacks, any flags), listed in any of the three places transformers reads them,
        /// are read back as written ([`hf_added_tokens`]), become user-defined pieces at their
        /// ids in the `.nemo`'s model, which removing them restores byte for byte
        /// ([`sentencepiece_with_hf_added`]); listed as transformers saves them now
        /// (`added_tokens_decoder`), they are listed again, flags and all, in the config an HF
        /// export writes from that `.nemo` ([`llama_tokenizer_config`]).
        #[test]
        fn added_tokens_survive_hf_to_nemo_to_hf(
            texts in proptest::collection::btree_set("[<>a-z_|\u{2581}\u{4e00}]{1,12}", 1..6),
            flags in proptest::collection::vec((proptest::bool::ANY, proptest::bool::ANY, proptest::bool::ANY), 6),
            place in 0usize..3, spare_rows in 0usize..3,
        ) {
            use serde_json::{json, Map, Value as Json};
            let base = sp("llama-mha/tokenizer.model");
            let texts: Vec<&str> = texts.iter().map(String::as_str).filter(|t| base.id(t).is_none()).collect();
            proptest::prop_assume!(!texts.is_empty());
            let tokens: Vec<AddedToken> = texts
                .iter()
                .zip(&flags)
                .enumerate()
                .map(|(i, (text, &(special, lstrip, rstrip)))| AddedToken {
                    lstrip, rstrip, ..AddedToken::plain((base.len() + i) as u32, text.to_string(), special)
                })
                .collect();
            let entry = |t: &AddedToken| json!({"content": t.content, "special": t.special, "lstrip": t.lstrip,
                                                "rstrip": t.rstrip, "single_word": false, "normalized": false});
            let (file, listing) = match place {
                0 => ("tokenizer_config.json", json!({"added_tokens_decoder": tokens.iter().map(|t| (t.id.to_string(), entry(t))).collect::<Map<_, _>>()})),
                1 => ("added_tokens.json", Json::Object(tokens.iter().map(|t| (t.content.clone(), t.id.into())).collect())),
                _ => ("tokenizer.json", json!({"added_tokens": tokens.iter().map(|t| { let mut e = entry(t); e["id"] = t.id.into(); e }).collect::<Vec<_>>()})),
            };
            let model = fixture("llama-mha/tokenizer.model");
            let src = hf_dir(vec![("tokenizer.model", model.clone()), (file, serde_json::to_vec(&listing).unwrap())]);
            let read = |name: &str| Ok(src.meta.artifacts.iter().find(|a| a.name == name).map(|a| a.source.bytes().unwrap().into_owned()));
            // added_tokens.json has no flags: all its tokens are special, none strips.
            let want: Vec<AddedToken> = match place {
                1 => tokens.iter().map(|t| AddedToken::plain(t.id, t.content.clone(), true)).collect(),
                _ => tokens.clone(),
            };
            proptest::prop_assert_eq!(hf_added_tokens(read, Path::new("hf")).unwrap(), want);

            let rows = base.len() + tokens.len() + spare_rows;
            let member = Artifact { name: "tokenizer.model".into(), source: ByteSource::owned(model.clone()) };
            let grown = sentencepiece_with_hf_added(&src, &member, rows, &[]).unwrap();
            let grown = SentencePieceModel::parse(grown.source.bytes().unwrap().into_owned(), Path::new("grown")).unwrap();
            for t in &tokens {
                proptest::prop_assert_eq!(grown.id(&t.content), Some(t.id));
            }
            let back = grown.without_appended(&texts, Path::new("grown")).unwrap();
            proptest::prop_assert_eq!(back.bytes(), &model[..]);
            // Too few embedding rows for them: a named error.
            let err = sentencepiece_with_hf_added(&src, &member, rows - spare_rows - 1, &[]).unwrap_err().to_string();
            proptest::prop_assert!(err.contains("past the embedding"), "{}", err);

            if place == 0 {
                let kept = ByteSource::owned(serde_json::to_vec(&listing).unwrap());
                let source = SourceTokenizer { config: Some(&kept), model: Some(&grown), json_left_behind: false };
                let written = serde_json::to_vec(&llama_tokenizer_config(64, source)).unwrap();
                let out = hf_dir(vec![("tokenizer_config.json", written)]);
                let read = |name: &str| Ok(out.meta.artifacts.iter().find(|a| a.name == name).map(|a| a.source.bytes().unwrap().into_owned()));
                proptest::prop_assert_eq!(hf_added_tokens(read, Path::new("out")).unwrap(), tokens);
            }
        }
    }

    /// The settings that change how text is split come from the source's config; its token
    /// spellings and everything else do not.
    #[test]
    fn a_written_tokenizer_config_keeps_the_sources_behaviour() {
        let plain = llama_tokenizer_config(64, SourceTokenizer::default());
        assert_eq!((&plain["legacy"], &plain["model_max_length"]), (&false.into(), &64.into()));
        let config = ByteSource::owned(
            br#"{"add_prefix_space": null, "bos_token": "X", "model_max_length": 9, "add_eos_token": "yes"}"#
                .to_vec(),
        );
        let source = SourceTokenizer { config: Some(&config), ..Default::default() };
        let kept = llama_tokenizer_config(64, source);
        // A config without `legacy` is transformers' default; settings of the wrong type are not kept.
        assert_eq!((&kept["legacy"], &kept["add_eos_token"]), (&true.into(), &false.into()));
        assert!(kept.as_object().unwrap().get("add_prefix_space").is_some_and(serde_json::Value::is_null));
        assert_eq!((&kept["bos_token"], &kept["model_max_length"]), (&"<s>".into(), &64.into()));
        // Without the tokenizer.json a null deferred to, the default stands.
        let left = llama_tokenizer_config(64, SourceTokenizer { json_left_behind: true, ..source });
        assert!(left.as_object().unwrap().get("add_prefix_space").is_none());
        let broken = ByteSource::owned(b"[1]".to_vec());
        assert_eq!(
            llama_tokenizer_config(64, SourceTokenizer { config: Some(&broken), ..Default::default() }),
            plain
        );
    }
}
