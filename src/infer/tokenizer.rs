//! LLaMA tokenizers from either HF `tokenizer.json` or a SentencePiece `tokenizer.model`.
//!
//! HF checkpoints ship `tokenizer.json`, which the `tokenizers` crate reads as-is (HF semantics).
//! NeMo checkpoints ship only the SentencePiece protobuf (an artifact inside the `.nemo`), and
//! NeMo tokenises with SentencePiece itself, so that path reproduces SentencePiece exactly:
//!
//! * the protobuf is read by a small hand-written reader (`tokenizer/sentencepiece.rs`, which says why);
//! * the BPE model is rebuilt the way transformers' `LlamaConverter` does it (vocab = pieces by
//!   id; merges = every split of a normal piece into two pieces, ranked by the merged piece's
//!   score, then its id — SentencePiece scores BPE pieces by merge order), with byte fallback and
//!   fused unknowns, and run through the `tokenizers` crate;
//! * normalisation is done here, once, on the whole text (`remove_extra_whitespaces`, then the
//!   dummy-prefix `▁`, then spaces → `▁`), before added pieces are split out. That is where
//!   SentencePiece does it; putting `Prepend("▁")` into the HF normaliser instead would prefix
//!   every segment between user-defined pieces (`<extra_id_7> USER` → `▁▁USER`), which breaks
//!   NeVA prompts.
//!
//! Decoding of LLaMA-style vocabularies (both sources) follows SentencePiece's `Decode`:
//! control pieces vanish, `<unk>` is shown as ` ⁇ `, byte pieces are gathered into UTF-8, and
//! only the first visible piece loses its dummy-prefix space. [`TokenStream`] is the same state
//! machine fed one id at a time, so streamed pieces always concatenate to [`Tokenizer::decode`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::AddedToken;

use crate::{Error, Result};

mod sentencepiece;

use sentencepiece::{byte_piece, PieceKind, SpModel};

/// The SentencePiece whitespace marker.
const SPACE: char = '▁';

/// A LLaMA tokenizer (SentencePiece BPE, loaded from `tokenizer.json` or `tokenizer.model`).
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    origin: PathBuf,
    /// How text is prepared before `inner` sees it.
    normalize: Normalize,
    /// The tokens transformers' slow `LlamaTokenizer` (an HF directory without `tokenizer.json`)
    /// cuts text at, longest first: its special and added tokens. Empty otherwise
    /// (SentencePiece's own way: one text, user-defined pieces matched inside it).
    added_split: Vec<String>,
    /// Its config says `legacy: true` or nothing: every piece between [`Self::added_split`]
    /// tokens is encoded by itself, dummy prefix included.
    legacy: bool,
    /// The [`Self::added_split`] tokens with transformers' `lstrip` / `rstrip` (either), and
    /// which: the whitespace beside them is dropped before encoding.
    strip: HashMap<String, (bool, bool)>,
    /// How ids become text.
    decode_style: DecodeStyle,
    /// Per id: its piece string and what kind of piece it is (index = id).
    pieces: Vec<Option<(String, PieceKind)>>,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    unk_id: Option<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("origin", &self.origin)
            .field("vocab_size", &self.vocab_size())
            .field("normalize", &self.normalize)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

/// A piece of a text cut at added tokens ([`Tokenizer::split_added`]).
#[derive(Clone, Copy, Debug)]
enum Segment<'a> {
    /// Text between tokens.
    Text(&'a str),
    /// One of the [`Tokenizer::added_split`] tokens.
    Token(&'a str),
}

/// Python's `str.isspace`, which `str.strip` uses: Unicode whitespace and the separators
/// U+001C–U+001F.
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Text preparation before the `tokenizers` pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Normalize {
    /// `tokenizer.json`: its own normaliser/pre-tokeniser does everything.
    Hf,
    /// SentencePiece normaliser emulation (the inner tokenizer has no normaliser).
    /// `lone_prefix_before_special`: transformers' non-legacy `LlamaTokenizer` (an HF directory
    /// with `legacy: false` and no `tokenizer.json`) drops the dummy-prefix `▁` when it stands
    /// alone before a special token at the start (`<image>hi` → `<image>`, `hi`); SentencePiece
    /// itself (NeMo) keeps it.
    SentencePiece { add_dummy_prefix: bool, remove_extra_whitespaces: bool, drop_lone_prefix: bool },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum DecodeStyle {
    /// SentencePiece `Decode` semantics (see the module comment).
    SentencePiece { strip_leading_space: bool, unk_surface: String },
    /// Whatever the `tokenizer.json` decoder does (non-SentencePiece vocabularies).
    Hf,
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json`, or else `dir/tokenizer.model`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        for name in ["tokenizer.json", "tokenizer.model"] {
            let path = dir.join(name);
            if path.is_file() {
                return Self::from_file(&path);
            }
        }
        Err(Error::Tokenizer {
            path: dir.to_path_buf(),
            detail: "no tokenizer.json or tokenizer.model in this directory".into(),
        })
    }

    /// Loads a `tokenizer.json` (a file starting with `{`) or a SentencePiece model (anything
    /// else). The content decides, not the file name.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
        if first == Some(&b'{') {
            let config = read_tokenizer_config(path)?;
            Self::from_json_bytes(&bytes, path, config.as_ref())
        } else {
            // transformers appends the added tokens it finds beside the model (llava-hf's
            // `<image>` and `<pad>`).
            let mut tok = Self::from_sentencepiece_bytes(&bytes, path)?;
            let dir = path.parent().unwrap_or(Path::new("."));
            let read = |name: &str| {
                let file = dir.join(name);
                match std::fs::read(&file) {
                    Ok(b) => Ok(Some(b)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(shardsmith_converters::Error::Io { path: file, source: e }),
                }
            };
            let added = shardsmith_converters::convert::tokenizer::hf_added_tokens(read, dir)?;
            for t in &added {
                tok.append_added(t.id, &t.content, t.special)?;
            }
            // transformers' slow tokenizers apply lstrip / rstrip to the text beside a token
            // (done here, [`Tokenizer::strip_beside`]); single_word merges tokens into words,
            // which this tokenizer does not do, so it refuses rather than disagree quietly.
            if let Some(t) = added.iter().find(|t| t.single_word) {
                return Err(tok_err(
                    path,
                    format!(
                        "added token {:?} (id {}) is single_word, which is not supported for a \
                         tokenizer.model directory (a tokenizer.json beside it would be used instead)",
                        t.content, t.id
                    ),
                ));
            }
            // An HF directory's model (a config beside it) is read as transformers' slow
            // `LlamaTokenizer` reads its config: `legacy` and `add_prefix_space` default to true.
            // A null `add_prefix_space` (what saving a fast tokenizer writes) defers to the
            // tokenizer.json beside, which prefixes; alone, transformers reads it as false. A
            // bare model file (a `.nemo`'s, `--tokenizer`) tokenizes as SentencePiece does.
            let config = read_tokenizer_config(path)?;
            if config.is_none() && !dir.join("config.json").is_file() {
                return Ok(tok);
            }
            let setting = |key: &str| config.as_ref().and_then(|c| c.get(key));
            let legacy = setting("legacy").and_then(serde_json::Value::as_bool).unwrap_or(true);
            let add_prefix_space = match setting("add_prefix_space") {
                Some(serde_json::Value::Null) => dir.join("tokenizer.json").is_file(),
                v => v.and_then(serde_json::Value::as_bool).unwrap_or(true),
            };
            tok.strip = added
                .iter()
                .filter(|t| t.lstrip || t.rstrip)
                .map(|t| (t.content.clone(), (t.lstrip, t.rstrip)))
                .collect();
            let specials = tok
                .pieces
                .iter()
                .flatten()
                .filter(|(_, kind)| matches!(kind, PieceKind::Control | PieceKind::Unknown));
            tok.added_split =
                specials.map(|(p, _)| p.clone()).chain(added.into_iter().map(|t| t.content)).collect();
            // Longest first, so the longest token at a position wins.
            tok.added_split.sort_by_key(|t| std::cmp::Reverse(t.len()));
            tok.added_split.dedup();
            tok.legacy = legacy;
            if let (false, Normalize::SentencePiece { add_dummy_prefix, drop_lone_prefix, .. }) =
                (legacy, &mut tok.normalize)
            {
                // Non-legacy: "▁" + text when add_prefix_space, none after special tokens, and a
                // lone one before a special token at the start dropped; decoding strips it back.
                *add_dummy_prefix = add_prefix_space;
                *drop_lone_prefix = true;
                if let DecodeStyle::SentencePiece { strip_leading_space, .. } = &mut tok.decode_style {
                    *strip_leading_space = add_prefix_space;
                }
            }
            Ok(tok)
        }
    }

    /// A `tokenizer.json` already in memory; `config` is the parsed `tokenizer_config.json`
    /// beside it, if any (it names the BOS/EOS tokens).
    pub fn from_json_bytes(
        bytes: &[u8],
        origin: impl Into<PathBuf>,
        config: Option<&serde_json::Value>,
    ) -> Result<Self> {
        let origin = origin.into();
        // Parsed as JSON here, then handed to the tokenizers crate as a value (its `from_bytes`
        // is this same deserialization from the text): the crate panics on some syntax errors
        // instead of returning them (in a `decoder` section: `DecoderWrapper`'s
        // `.expect("Helper")`, 0.23; found by the tokenizer_json fuzz target), and a value has
        // none left.
        let json: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| tok_err(&origin, format!("not valid JSON: {e}")))?;
        let inner = guarded(
            &origin,
            || "reading it".into(),
            || serde_json::from_value::<tokenizers::Tokenizer>(json),
        )?
        .map_err(|e| tok_err(&origin, format!("not a valid tokenizer.json: {e}")))?;
        let unk_id = match inner.get_model() {
            tokenizers::ModelWrapper::BPE(bpe) => {
                bpe.get_unk_token().as_deref().and_then(|t| inner.token_to_id(t))
            }
            _ => inner.token_to_id("<unk>"),
        };
        let named = |key: &str, default: &str| -> Option<u32> {
            let name = config
                .and_then(|c| c.get(key))
                .and_then(|v| v.as_str().or_else(|| v.get("content").and_then(|c| c.as_str())))
                .unwrap_or(default);
            inner.token_to_id(name)
        };
        let bos_id = named("bos_token", "<s>");
        let eos_id = named("eos_token", "</s>");
        let decode_style = json_decode_style(&inner);
        let mut tok = Tokenizer {
            inner,
            origin,
            normalize: Normalize::Hf,
            added_split: Vec::new(),
            legacy: false,
            strip: HashMap::new(),
            decode_style,
            pieces: Vec::new(),
            bos_id,
            eos_id,
            unk_id,
        };
        tok.pieces = tok.classify_json_pieces();
        Ok(tok)
    }

    /// A SentencePiece `ModelProto` (`tokenizer.model`) already in memory, e.g. a `.nemo`
    /// artifact; `origin` names it in errors.
    pub fn from_sentencepiece_bytes(bytes: &[u8], origin: impl Into<PathBuf>) -> Result<Self> {
        let origin = origin.into();
        let model = SpModel::parse(bytes).map_err(|d| tok_err(&origin, d))?;
        model.check_supported().map_err(|d| tok_err(&origin, d))?;

        let id_of = |id: i32, want: PieceKind, what: &str| -> Result<Option<u32>> {
            if id < 0 {
                return Ok(None);
            }
            match model.pieces.get(id as usize) {
                Some(p) if p.kind == want => Ok(Some(id as u32)),
                Some(p) => Err(tok_err(
                    &origin,
                    format!("{what} id {id} is piece {:?} of type {:?}", p.piece, p.kind),
                )),
                None => Err(tok_err(
                    &origin,
                    format!("{what} id {id} is beyond the {} pieces", model.pieces.len()),
                )),
            }
        };
        let unk_id = id_of(model.unk_id, PieceKind::Unknown, "unk")?;
        let bos_id = id_of(model.bos_id, PieceKind::Control, "bos")?;
        let eos_id = id_of(model.eos_id, PieceKind::Control, "eos")?;
        let unk_piece = unk_id
            .map(|id| model.pieces[id as usize].piece.clone())
            .ok_or_else(|| tok_err(&origin, "the model has no <unk> piece (unk_id < 0)"))?;

        let vocab: Vocab =
            model.pieces.iter().enumerate().map(|(i, p)| (p.piece.clone(), i as u32)).collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, model.merges())
            .unk_token(unk_piece)
            .fuse_unk(true)
            .byte_fallback(model.byte_fallback)
            .build()
            .map_err(|e| tok_err(&origin, format!("cannot build the BPE model: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        // Control pieces are matched in text like HF's Llama tokenizers do (LLaVA templates spell
        // `</s><s>`); user-defined pieces are matched anywhere, as SentencePiece does.
        let specials = model
            .pieces
            .iter()
            .filter(|p| matches!(p.kind, PieceKind::Control | PieceKind::Unknown))
            .map(|p| AddedToken::from(p.piece.clone(), true).normalized(false));
        inner
            .add_special_tokens(specials)
            .map_err(|e| tok_err(&origin, format!("cannot register control pieces: {e}")))?;
        let user_defined = model
            .pieces
            .iter()
            .filter(|p| p.kind == PieceKind::UserDefined)
            .map(|p| AddedToken::from(p.piece.clone(), false).normalized(false));
        inner
            .add_tokens(user_defined)
            .map_err(|e| tok_err(&origin, format!("cannot register user-defined pieces: {e}")))?;

        Ok(Tokenizer {
            inner,
            origin,
            normalize: Normalize::SentencePiece {
                add_dummy_prefix: model.add_dummy_prefix,
                remove_extra_whitespaces: model.remove_extra_whitespaces,
                drop_lone_prefix: false,
            },
            added_split: Vec::new(),
            legacy: false,
            strip: HashMap::new(),
            decode_style: DecodeStyle::SentencePiece {
                strip_leading_space: model.add_dummy_prefix || model.remove_extra_whitespaces,
                unk_surface: model.unk_surface.clone(),
            },
            pieces: model.pieces.into_iter().map(|p| Some((p.piece, p.kind))).collect(),
            bos_id,
            eos_id,
            unk_id,
        })
    }

    /// Token ids of `text`, with the BOS id first when `add_bos`.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if add_bos {
            ids.push(self.bos_id.ok_or_else(|| {
                tok_err(&self.origin, "a BOS token was requested but the tokenizer has none")
            })?);
        }
        // Without lstrip / rstrip tokens, a non-legacy text is encoded whole (`inner` splits the
        // tokens out itself).
        if self.added_split.is_empty() || (!self.legacy && self.strip.is_empty()) {
            self.encode_whole(text, &mut ids)?;
            return Ok(ids);
        }
        let mut segments = self.split_added(text);
        self.strip_beside(&mut segments);
        if self.legacy {
            self.encode_legacy(&segments, text, &mut ids)?;
        } else {
            // The stripped text, which `inner` splits at the same tokens.
            let stripped: String = segments
                .iter()
                .map(|s| match s {
                    Segment::Text(t) | Segment::Token(t) => *t,
                })
                .collect();
            self.encode_whole(&stripped, &mut ids)?;
        }
        Ok(ids)
    }

    /// `text` cut at [`Tokenizer::added_split`] tokens as transformers' trie does: at the
    /// earliest position where one starts, the longest.
    fn split_added<'a>(&'a self, text: &'a str) -> Vec<Segment<'a>> {
        let mut segments = Vec::new();
        let (mut start, mut at) = (0, 0);
        while at < text.len() {
            match self.added_split.iter().find(|t| text[at..].starts_with(t.as_str())) {
                Some(token) => {
                    if start < at {
                        segments.push(Segment::Text(&text[start..at]));
                    }
                    segments.push(Segment::Token(token));
                    at += token.len();
                    start = at;
                }
                None => at += text[at..].chars().next().map_or(1, char::len_utf8),
            }
        }
        if start < text.len() {
            segments.push(Segment::Text(&text[start..]));
        }
        segments
    }

    /// transformers' `tokenize`: the text after an `rstrip` token loses its leading whitespace,
    /// the text before an `lstrip` token its trailing whitespace (Python's `str.isspace`).
    fn strip_beside(&self, segments: &mut [Segment]) {
        for i in 0..segments.len() {
            let Segment::Token(token) = segments[i] else { continue };
            let Some(&(lstrip, rstrip)) = self.strip.get(token) else { continue };
            if let (true, Some(Segment::Text(right))) = (rstrip, segments.get_mut(i + 1)) {
                *right = right.trim_start_matches(py_space);
            }
            if let (true, Some(Segment::Text(left))) =
                (lstrip, i.checked_sub(1).and_then(|j| segments.get_mut(j)))
            {
                *left = left.trim_end_matches(py_space);
            }
        }
    }

    /// `text` as `inner` reads it (see [`Normalize`]).
    fn prepare(&self, text: &str) -> String {
        match self.normalize {
            Normalize::Hf => text.to_owned(),
            Normalize::SentencePiece { add_dummy_prefix, remove_extra_whitespaces, .. } => {
                sentencepiece_normalize(text, add_dummy_prefix, remove_extra_whitespaces)
            }
        }
    }

    /// `inner`'s decoding of `ids` (guarded: a malformed file's decoder can panic inside the
    /// tokenizers crate, e.g. a `Strip` that removes more than a token has; a fuzzer find).
    fn decode_inner(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        guarded(
            &self.origin,
            || format!("decoding {} ids", ids.len()),
            || self.inner.decode(ids, skip_special),
        )?
        .map_err(|e| tok_err(&self.origin, format!("cannot decode: {e}")))
    }

    /// `inner`'s encoding of `prepared`, part of `text` (named in errors).
    fn encode_prepared(&self, prepared: &str, text: &str) -> Result<tokenizers::Encoding> {
        guarded(&self.origin, || format!("encoding {text:?}"), || self.inner.encode_fast(prepared, false))?
            .map_err(|e| tok_err(&self.origin, format!("cannot encode {text:?}: {e}")))
    }

    /// The ids of `text` normalised as one piece, appended to `ids`.
    fn encode_whole(&self, text: &str, ids: &mut Vec<u32>) -> Result<()> {
        let prepared = self.prepare(text);
        let encoding = self.encode_prepared(&prepared, text)?;
        let mut pieces = encoding.get_ids();
        if let (Normalize::SentencePiece { drop_lone_prefix: true, .. }, [first, next, ..]) =
            (self.normalize, pieces)
        {
            let lone_prefix = self
                .pieces
                .get(*first as usize)
                .is_some_and(|p| matches!(p, Some((s, _)) if s == "\u{2581}"));
            // A special token spelled out in the text right after the prefix (`<unk>` standing
            // for an unknown character is not one).
            let after_prefix = prepared.strip_prefix(SPACE).unwrap_or_default();
            let special = self.pieces.get(*next as usize).is_some_and(|p| {
                matches!(p, Some((s, PieceKind::Control | PieceKind::Unknown)) if after_prefix.starts_with(s.as_str()))
            });
            if lone_prefix && special {
                pieces = &pieces[1..];
            }
        }
        ids.extend_from_slice(pieces);
        Ok(())
    }

    /// [`Tokenizer::encode`] for transformers' legacy `LlamaTokenizer`: each text segment
    /// between tokens ([`Tokenizer::split_added`]) is encoded by itself, each with its own dummy
    /// prefix (`text`, the whole, names errors).
    fn encode_legacy(&self, segments: &[Segment], text: &str, ids: &mut Vec<u32>) -> Result<()> {
        for s in segments {
            match *s {
                Segment::Text("") => {}
                Segment::Text(piece) => {
                    ids.extend_from_slice(self.encode_prepared(&self.prepare(piece), text)?.get_ids())
                }
                Segment::Token(token) => {
                    let id = self.token_to_id(token);
                    ids.push(id.ok_or_else(|| tok_err(&self.origin, format!("{token:?} has no id")))?);
                }
            }
        }
        Ok(())
    }

    /// The text of `ids`. With `skip_special`, control tokens (BOS/EOS/pad) are dropped and
    /// `<unk>` shows as ` ⁇ `, exactly like SentencePiece's `decode`; otherwise they are shown by
    /// name.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let mut stream = self.stream(skip_special);
        let mut text = String::new();
        for &id in ids {
            text.push_str(&stream.next_token(id)?);
        }
        text.push_str(&stream.finish()?);
        Ok(text)
    }

    /// An incremental decoder for printing generated tokens as they arrive.
    pub fn stream(&self, skip_special: bool) -> TokenStream<'_> {
        TokenStream {
            tokenizer: self,
            skip_special,
            state: match &self.decode_style {
                DecodeStyle::SentencePiece { .. } => StreamState::SentencePiece {
                    at_start: true,
                    start_space_seen: false,
                    emitted_any: false,
                    bytes: Vec::new(),
                },
                DecodeStyle::Hf => StreamState::Hf { ids: Vec::new(), emitted: String::new() },
            },
        }
    }

    /// The id of a piece / added token, if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The piece / added token of an id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The BOS id (`<s>`), if the tokenizer defines one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The EOS id (`</s>`), if the tokenizer defines one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// The unknown-piece id (`<unk>`), if any.
    pub fn unk_id(&self) -> Option<u32> {
        self.unk_id
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Where this tokenizer was loaded from (for messages).
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// The underlying `tokenizers` pipeline. For a SentencePiece model it has no normaliser:
    /// [`Tokenizer::encode`] prepares the text first.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Appends `tokens` the vocabulary lacks as user-defined pieces (matched anywhere in text,
    /// shown as themselves when decoding), the way NeMo extends the LLaMA SentencePiece model
    /// with `<extra_id_0…7>` (ids 32000… for a 32000-piece model). Returns the id of every
    /// token, new or existing, in order.
    pub fn add_special_tokens(&mut self, tokens: &[&str]) -> Result<Vec<u32>> {
        for &token in tokens {
            if token.is_empty() || token.contains(' ') {
                return Err(tok_err(
                    &self.origin,
                    format!("cannot add {token:?}: added tokens must be non-empty without spaces"),
                ));
            }
            if self.token_to_id(token).is_none() {
                self.push_token(token, false)?;
            }
        }
        tokens
            .iter()
            .map(|t| self.token_to_id(t).ok_or_else(|| tok_err(&self.origin, format!("{t:?} vanished"))))
            .collect()
    }

    /// Appends `token` as id `vocab_size()`: a special one is matched in text and skipped when
    /// decoding with `skip_special` (a control piece), another is a user-defined piece.
    fn push_token(&mut self, token: &str, special: bool) -> Result<u32> {
        let expected = self.vocab_size() as u32;
        self.inner
            .add_tokens([AddedToken::from(token, special).normalized(false)])
            .map_err(|e| tok_err(&self.origin, format!("cannot add {token:?}: {e}")))?;
        let id = self.token_to_id(token);
        if id != Some(expected) {
            return Err(tok_err(
                &self.origin,
                format!("added {token:?} got id {id:?}, expected {expected} (ids have holes)"),
            ));
        }
        let kind = if special { PieceKind::Control } else { PieceKind::UserDefined };
        self.pieces.push(Some((token.to_owned(), kind)));
        Ok(expected)
    }

    /// One of transformers' added tokens at `id`: one the model
    /// already has there is checked, a new one must be the next id.
    fn append_added(&mut self, id: u32, token: &str, special: bool) -> Result<()> {
        let size = self.vocab_size() as u32;
        if id < size {
            return match self.id_to_token(id) {
                Some(piece) if piece == token => {
                    // A piece transformers lists as a special added token is one to it (split out
                    // whole, skipped when decoding).
                    if let (true, Some(Some((_, kind)))) = (special, self.pieces.get_mut(id as usize)) {
                        if *kind == PieceKind::UserDefined {
                            *kind = PieceKind::Control;
                        }
                    }
                    Ok(())
                }
                piece => Err(tok_err(
                    &self.origin,
                    format!(
                        "an added token says id {id} is {token:?}, but the model has {:?} there",
                        piece.unwrap_or_default()
                    ),
                )),
            };
        }
        if id > size {
            return Err(tok_err(
                &self.origin,
                format!(
                    "added token {token:?} has id {id}, but the vocabulary ends at {size} (ids have holes)"
                ),
            ));
        }
        if let Some(other) = self.token_to_id(token) {
            return Err(tok_err(
                &self.origin,
                format!("added token {token:?} (id {id}) is already id {other}"),
            ));
        }
        self.push_token(token, special).map(drop)
    }

    /// Piece kinds of a `tokenizer.json` vocabulary, for SentencePiece-style decoding.
    fn classify_json_pieces(&self) -> Vec<Option<(String, PieceKind)>> {
        let added = self.inner.get_added_tokens_decoder();
        (0..self.vocab_size() as u32)
            .map(|id| {
                let piece = self.inner.id_to_token(id)?;
                let kind = if Some(id) == self.unk_id {
                    PieceKind::Unknown
                } else if let Some(token) = added.get(&id) {
                    if token.special {
                        PieceKind::Control
                    } else {
                        PieceKind::UserDefined
                    }
                } else if let Some(b) = byte_piece(&piece) {
                    PieceKind::Byte(b)
                } else {
                    PieceKind::Normal
                };
                Some((piece, kind))
            })
            .collect()
    }

    fn piece(&self, id: u32) -> Result<(&str, PieceKind)> {
        match self.pieces.get(id as usize) {
            Some(Some((piece, kind))) => Ok((piece.as_str(), *kind)),
            _ => Err(tok_err(
                &self.origin,
                format!("token id {id} is not in the vocabulary (size {})", self.vocab_size()),
            )),
        }
    }
}

/// Incremental decoding: feed ids one by one, print what comes back.
///
/// Each call returns the text that became final with that token (possibly empty: an incomplete
/// UTF-8 sequence of byte pieces waits for its remaining bytes). [`TokenStream::finish`] flushes
/// what is left. The pieces concatenate to exactly [`Tokenizer::decode`] of the same ids.
pub struct TokenStream<'a> {
    tokenizer: &'a Tokenizer,
    skip_special: bool,
    state: StreamState,
}

enum StreamState {
    SentencePiece {
        /// SentencePiece's `is_bos_ws`: the next visible piece may lose its leading `▁`.
        at_start: bool,
        /// SentencePiece's `bos_ws_seen`: the previous piece consumed that `▁`.
        start_space_seen: bool,
        /// Whether any text has been produced (SentencePiece checks `!text.empty()`).
        emitted_any: bool,
        /// Byte-fallback pieces not yet assembled into UTF-8.
        bytes: Vec<u8>,
    },
    /// Non-SentencePiece decoders: decode everything, emit the new suffix.
    Hf { ids: Vec<u32>, emitted: String },
}

impl TokenStream<'_> {
    /// The text that token `id` completes.
    pub fn next_token(&mut self, id: u32) -> Result<String> {
        let tok = self.tokenizer;
        match &mut self.state {
            StreamState::SentencePiece { at_start, start_space_seen, emitted_any, bytes } => {
                let (piece, kind) = tok.piece(id)?;
                let mut out = String::new();
                if let PieceKind::Byte(b) = kind {
                    bytes.push(b);
                    drain_utf8(bytes, &mut out, false);
                    *emitted_any |= !out.is_empty();
                    return Ok(out);
                }
                drain_utf8(bytes, &mut out, true);
                *emitted_any |= !out.is_empty();
                if *start_space_seen || *emitted_any {
                    *at_start = false;
                }
                let DecodeStyle::SentencePiece { strip_leading_space, unk_surface } = &tok.decode_style
                else {
                    return Err(tok_err(&tok.origin, "decoder state does not match the tokenizer"));
                };
                *start_space_seen = false;
                match kind {
                    PieceKind::Control if self.skip_special => {}
                    PieceKind::Control => out.push_str(piece),
                    PieceKind::Unknown if self.skip_special => out.push_str(unk_surface),
                    PieceKind::Unknown => out.push_str(piece),
                    _ => {
                        let mut text = piece;
                        if *at_start && *strip_leading_space {
                            if let Some(rest) = text.strip_prefix(SPACE) {
                                text = rest;
                                *start_space_seen = true;
                            }
                        }
                        out.extend(text.chars().map(|c| if c == SPACE { ' ' } else { c }));
                    }
                }
                *emitted_any |= !out.is_empty();
                Ok(out)
            }
            StreamState::Hf { ids, emitted } => {
                ids.push(id);
                let text = tok.decode_inner(ids, self.skip_special)?;
                // Hold back while the tail is an incomplete character or the decoder rewrote
                // earlier text (e.g. a space that only now became a leading one).
                if text.ends_with('\u{FFFD}') || !text.starts_with(emitted.as_str()) {
                    return Ok(String::new());
                }
                let new = text[emitted.len()..].to_owned();
                *emitted = text;
                Ok(new)
            }
        }
    }

    /// Whatever is still pending (incomplete byte sequences become U+FFFD, one per byte, as in
    /// SentencePiece).
    pub fn finish(&mut self) -> Result<String> {
        let tok = self.tokenizer;
        match &mut self.state {
            StreamState::SentencePiece { bytes, emitted_any, .. } => {
                let mut out = String::new();
                drain_utf8(bytes, &mut out, true);
                *emitted_any |= !out.is_empty();
                Ok(out)
            }
            StreamState::Hf { ids, emitted } => {
                let text = tok.decode_inner(ids, self.skip_special)?;
                // If the decoder rewrote already-printed text, print only past the common part.
                let common = text
                    .char_indices()
                    .zip(emitted.chars())
                    .find(|((_, a), b)| a != b)
                    .map_or(emitted.len().min(text.len()), |((i, _), _)| i);
                let new = text[common..].to_owned();
                *emitted = text;
                Ok(new)
            }
        }
    }
}

/// Moves the complete UTF-8 prefix of `bytes` into `out`. Invalid bytes become U+FFFD one byte at
/// a time (SentencePiece's rule); an incomplete sequence at the end waits unless `flush`.
fn drain_utf8(bytes: &mut Vec<u8>, out: &mut String, flush: bool) {
    let mut start = 0;
    while start < bytes.len() {
        match std::str::from_utf8(&bytes[start..]) {
            Ok(s) => {
                out.push_str(s);
                start = bytes.len();
            }
            Err(e) => {
                let valid = e.valid_up_to();
                // The prefix was just validated by from_utf8, so this never replaces anything.
                out.push_str(&String::from_utf8_lossy(&bytes[start..start + valid]));
                start += valid;
                if e.error_len().is_none() && !flush {
                    break;
                }
                out.push('\u{FFFD}');
                start += 1;
            }
        }
    }
    bytes.drain(..start);
}

/// SentencePiece's normaliser for the identity rule: optionally drop leading/trailing spaces and
/// squeeze runs of spaces, add the dummy-prefix space, then spell spaces as `▁`.
fn sentencepiece_normalize(text: &str, add_dummy_prefix: bool, remove_extra: bool) -> String {
    let squeezed;
    let text = if remove_extra {
        let mut s = String::with_capacity(text.len());
        for word in text.split(' ').filter(|w| !w.is_empty()) {
            if !s.is_empty() {
                s.push(' ');
            }
            s.push_str(word);
        }
        squeezed = s;
        squeezed.as_str()
    } else {
        text
    };
    if text.is_empty() {
        return String::new();
    }
    let mut out = String::with_capacity(text.len() + 3);
    if add_dummy_prefix {
        out.push(SPACE);
    }
    out.extend(text.chars().map(|c| if c == ' ' { SPACE } else { c }));
    out
}

/// Whether a `tokenizer.json` decodes like SentencePiece (`▁` → space, byte fallback, strip the
/// first space), judged from its decoder.
fn json_decode_style(inner: &tokenizers::Tokenizer) -> DecodeStyle {
    let decoder =
        inner.get_decoder().and_then(|d| serde_json::to_value(d).ok()).unwrap_or(serde_json::Value::Null);
    let text = decoder.to_string();
    if !text.contains(SPACE) {
        return DecodeStyle::Hf;
    }
    let strip_leading_space =
        text.contains("\"Strip\"") || (text.contains("\"Metaspace\"") && !text.contains("\"never\""));
    DecodeStyle::SentencePiece { strip_leading_space, unk_surface: " \u{2047} ".into() }
}

/// `tokenizer_config.json` beside a `tokenizer.json`, if present.
fn read_tokenizer_config(tokenizer_json: &Path) -> Result<Option<serde_json::Value>> {
    let Some(dir) = tokenizer_json.parent() else { return Ok(None) };
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    serde_json::from_str(&text).map(Some).map_err(|e| tok_err(&path, format!("not valid JSON: {e}")))
}

/// `f`, a call into the tokenizers crate, with a panic turned into an error naming the file and
/// what was being done (`doing`, built only then): that crate trusts parts of a `tokenizer.json`
/// it deserializes and panics on some malformed ones, while loading, encoding or decoding (its open
/// hardening work lists several), and a bad file must be a named error, not a crash. (The
/// default panic hook still prints the panic before it is caught.)
fn guarded<T>(origin: &Path, doing: impl FnOnce() -> String, f: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|panic| {
        let why = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("no message");
        tok_err(
            origin,
            format!("the tokenizers library failed {} (a malformed tokenizer.json?): {why}", doing()),
        )
    })
}

fn tok_err(path: &Path, detail: impl Into<String>) -> Error {
    Error::Tokenizer { path: path.to_path_buf(), detail: detail.into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
    }

    struct Probe {
        text: String,
        ids: Vec<u32>,
        decoded: String,
    }

    fn probes(model: &str) -> Vec<Probe> {
        let path = fixture(model).join("golden/tokenize.json");
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(json["add_bos"], true);
        json["probes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| Probe {
                text: p["text"].as_str().unwrap().to_owned(),
                ids: p["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect(),
                decoded: p["decoded"].as_str().unwrap().to_owned(),
            })
            .collect()
    }

    fn both(model: &str) -> [Tokenizer; 2] {
        let dir = fixture(model);
        [
            Tokenizer::from_file(dir.join("tokenizer.json")).unwrap(),
            Tokenizer::from_file(dir.join("tokenizer.model")).unwrap(),
        ]
    }

    fn check_probes(model: &str) {
        let probes = probes(model);
        assert!(probes.len() >= 8);
        for tok in both(model) {
            assert_eq!(tok.bos_id(), Some(1), "{:?}", tok.origin());
            assert_eq!(tok.eos_id(), Some(2));
            assert_eq!(tok.unk_id(), Some(0));
            for p in &probes {
                let ids = tok.encode(&p.text, true).unwrap();
                assert_eq!(ids, p.ids, "{:?} on {:?}", tok.origin(), p.text);
                let text = tok.decode(&ids, true).unwrap();
                assert_eq!(text, p.decoded, "{:?} decoding {:?}", tok.origin(), p.text);
                let mut stream = tok.stream(true);
                let mut streamed = String::new();
                for &id in &ids {
                    streamed.push_str(&stream.next_token(id).unwrap());
                }
                streamed.push_str(&stream.finish().unwrap());
                assert_eq!(streamed, text, "{:?} streaming {:?}", tok.origin(), p.text);
            }
        }
    }

    /// Found by the tokenizer_json fuzz target: a syntax error inside `decoder` made the
    /// tokenizers crate panic while loading; it is a named error now, and so is any panic of that
    /// crate while loading or encoding.
    #[test]
    fn a_malformed_tokenizer_json_is_an_error_not_a_panic() {
        // A key that is not a string, a lone surrogate, a byte that is not UTF-8 (the second
        // find: the tokenizers crate decodes the strings a skipping parse let through).
        for bad in [&br#"{"decoder": {1: 2}}"#[..], br#"{"decoder": "\ud800"}"#, b"{\"decoder\": \"\x9e\"}"] {
            let Err(err) = Tokenizer::from_json_bytes(bad, "bad/tokenizer.json", None) else {
                panic!("a broken decoder section was accepted")
            };
            let err = err.to_string();
            assert!(err.contains("bad/tokenizer.json") && err.contains("not valid JSON"), "{err}");
        }
        // A BPE merge whose result is not in the vocabulary makes the tokenizers crate index
        // past a token (the fuzzer's third find; while loading here, while encoding in the
        // fuzzer's larger file): an error naming the file.
        let bpe = r#"{"version": "1.0", "model": {"type": "BPE", "vocab": {"\u2581che": 0, "ckpoin": 1},
            "merges": [["\u2581che", "ckpoin"]]}}"#;
        let Err(err) = Tokenizer::from_json_bytes(bpe.as_bytes(), "bpe/tokenizer.json", None) else {
            panic!("the broken merges were accepted")
        };
        let err = err.to_string();
        assert!(err.contains("bpe/tokenizer.json") && err.contains("the tokenizers library failed"), "{err}");
        // A `Strip` decoder told to remove more characters than a token has panics inside the
        // crate while decoding (the fuzzer's fourth find): an error naming the file. (No "▁" in
        // the chain, so the SentencePiece decoding does not stand in for it: the file's runs.)
        let mut json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fixture("llava-tiny/tokenizer.json")).unwrap()).unwrap();
        let plain = Tokenizer::from_json_bytes(&serde_json::to_vec(&json).unwrap(), "plain", None).unwrap();
        let (id, piece) = (3..plain.vocab_size() as u32)
            .filter_map(|id| plain.id_to_token(id).map(|t| (id, t)))
            .find(|(_, t)| t.chars().count() == 1 && t != "\u{2581}")
            .expect("a one-character token");
        json["decoder"] = serde_json::json!({"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{6581}"}, "content": " "},
            {"type": "Strip", "content": piece, "start": 0, "stop": 5}]});
        let tok =
            Tokenizer::from_json_bytes(&serde_json::to_vec(&json).unwrap(), "strip/tokenizer.json", None)
                .unwrap();
        let err = tok.decode(&[id], false).unwrap_err().to_string();
        assert!(err.contains("strip/tokenizer.json") && err.contains("failed decoding"), "{err}");
        let err = guarded(Path::new("t.json"), || "reading it".into(), || -> u32 { panic!("Helper") })
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("t.json") && err.contains("failed reading it") && err.contains("Helper"),
            "{err}"
        );
    }

    #[test]
    fn llama_mha_probes_match_from_json_and_sentencepiece() {
        check_probes("llama-mha");
    }

    #[test]
    fn llama_gqa_probes_match_from_json_and_sentencepiece() {
        check_probes("llama-gqa");
    }

    /// llama-mha's two tokenizers and the characters its vocabulary spells as single pieces
    /// (`▁` as a space), built once for all property cases.
    static ROUND_TRIP: std::sync::LazyLock<([Tokenizer; 2], Vec<char>)> = std::sync::LazyLock::new(|| {
        let tokenizers = both("llama-mha");
        let mut alphabet: Vec<char> = tokenizers[0]
            .inner()
            .get_vocab(false)
            .keys()
            .filter_map(|p| {
                let mut chars = p.chars();
                match (chars.next(), chars.next()) {
                    (Some('<' | '>'), None) => None,
                    (Some(c), None) => Some(if c == '\u{2581}' { ' ' } else { c }),
                    _ => None,
                }
            })
            .collect();
        alphabet.sort_unstable();
        assert!(alphabet.len() > 20, "the fixture vocabulary spells {} characters", alphabet.len());
        (tokenizers, alphabet)
    });

    proptest::proptest! {
        /// Encoding is inverted by decoding, for any text the vocabulary spells without `<unk>`
        /// (every character is a piece), and the tokenizer.json and tokenizer.model readers
        /// agree on the ids. No `<`/`>`: text spelling a special token (`a<s>b`) is tokenised
        /// differently after it by transformers' fast and slow LLaMA tokenizers (ids 21 vs 224
        /// for `b` here), and each reader follows its own.
        #[test]
        fn decode_inverts_encode(picks in proptest::collection::vec(0usize..1000, 0..40)) {
            let ([json, sp], alphabet) = &*ROUND_TRIP;
            let text: String = picks.iter().map(|&i| alphabet[i % alphabet.len()]).collect();
            let ids = json.encode(&text, true).unwrap();
            proptest::prop_assert_eq!(&ids, &sp.encode(&text, true).unwrap());
            proptest::prop_assert!(!ids.contains(&0), "no <unk> for {:?}", text);
            proptest::prop_assert_eq!(json.decode(&ids, true).unwrap(), text.clone());
            proptest::prop_assert_eq!(sp.decode(&ids, true).unwrap(), text);
        }
    }

    #[test]
    fn merges_match_the_converter_output() {
        for model in ["llama-mha", "llama-gqa"] {
            let [json, sp] = both(model);
            let merges = |t: &Tokenizer| -> Vec<(String, String)> {
                let v = serde_json::to_value(t.inner().get_model()).unwrap();
                v["merges"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| match m {
                        serde_json::Value::String(s) => {
                            let (l, r) = s.split_once(' ').unwrap();
                            (l.to_owned(), r.to_owned())
                        }
                        pair => (pair[0].as_str().unwrap().into(), pair[1].as_str().unwrap().into()),
                    })
                    .collect()
            };
            assert_eq!(merges(&json), merges(&sp), "{model}");
            assert_eq!(json.vocab_size(), sp.vocab_size());
        }
    }

    #[test]
    fn llava_tiny_generated_text_decodes_like_transformers() {
        let dir = fixture("llava-tiny");
        let Ok(text) = std::fs::read_to_string(dir.join("golden/generate.json")) else {
            return; // fixture not generated yet
        };
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        let tokenizers = [
            Tokenizer::from_file(dir.join("tokenizer.json")).unwrap(),
            Tokenizer::from_file(dir.join("tokenizer.model")).unwrap(),
        ];
        for case in json["cases"].as_array().unwrap() {
            let ids: Vec<u32> =
                case["new_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            for tok in &tokenizers {
                assert_eq!(tok.decode(&ids, true).unwrap(), case["new_text"].as_str().unwrap());
            }
        }
    }

    #[test]
    fn non_sentencepiece_decoders_stream_by_suffix() {
        // A word-level tokenizer.json without a decoder: tokens are joined with spaces.
        let json = br#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
            "decoder": null, "model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1, "<unk>": 2},
            "unk_token": "<unk>"}}"#;
        let tok = Tokenizer::from_json_bytes(json, "word.json", None).unwrap();
        assert_eq!(tok.decode_style, DecodeStyle::Hf);
        let ids = tok.encode("a b a", false).unwrap();
        assert_eq!(ids, [0, 1, 0]);
        let mut stream = tok.stream(true);
        let parts: Vec<String> = ids.iter().map(|&id| stream.next_token(id).unwrap()).collect();
        assert_eq!(parts, ["a", " b", " a"]);
        assert_eq!(stream.finish().unwrap(), "");
        assert_eq!(tok.decode(&ids, true).unwrap(), "a b a");
        assert!(tok.encode("a", true).is_err(), "no BOS token to add");
    }

    /// A SentencePiece model gets the added tokens transformers reads beside it (llava-hf's
    /// `<image>` and `<pad>`), from `tokenizer_config.json` or else `added_tokens.json`, splits
    /// them out of text and decodes like the `tokenizer.json` that carries them, and refuses a
    /// list it cannot honour.
    #[test]
    fn sentencepiece_directories_get_their_added_tokens() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(fixture("llava-tiny/tokenizer.model"), dir.path().join("tokenizer.model")).unwrap();
        let load = |config: &str, added: Option<&str>| {
            std::fs::write(dir.path().join("tokenizer_config.json"), config).unwrap();
            let legacy = dir.path().join("added_tokens.json");
            match added {
                Some(a) => std::fs::write(&legacy, a).unwrap(),
                None => drop(std::fs::remove_file(&legacy)),
            }
            Tokenizer::from_dir(dir.path())
        };
        let decoder = r#"{"added_tokens_decoder": {
            "0": {"content": "<unk>", "special": true},
            "257": {"content": "<pad>", "special": true},
            "256": {"content": "<image>", "special": true}}}"#;
        let from_json = Tokenizer::from_file(fixture("llava-tiny/tokenizer.json")).unwrap();
        for tok in
            [load(decoder, None).unwrap(), load("{}", Some(r#"{"<pad>": 257, "<image>": 256}"#)).unwrap()]
        {
            assert_eq!(tok.vocab_size(), 258);
            assert_eq!((tok.token_to_id("<image>"), tok.token_to_id("<pad>")), (Some(256), Some(257)));
            let ids = tok.encode("USER: <image>\nWhat?<pad>", true).unwrap();
            assert_eq!(ids.iter().filter(|&&i| i == 256).count(), 1, "{ids:?}");
            assert_eq!(ids.last(), Some(&257));
            assert_eq!(tok.decode(&ids, true).unwrap(), from_json.decode(&ids, true).unwrap());
            assert!(tok.decode(&[256], false).unwrap().contains("<image>"));
        }
        let bad = [
            (
                r#"{"added_tokens_decoder": {"300": {"content": "<image>"}}}"#,
                "vocabulary ends at 256 (ids have holes)",
            ),
            (r#"{"added_tokens_decoder": {"1": {"content": "<image>"}}}"#, "says id 1 is \"<image>\""),
            (r#"{"added_tokens_decoder": {"256": {"content": "<s>"}}}"#, "is already id 1"),
            (r#"{"added_tokens_decoder": {"x": {"content": "<s>"}}}"#, "key \"x\" is not an id"),
            (r#"{"added_tokens_decoder": []}"#, "not an object"),
            (
                r#"{"added_tokens_decoder": {"256": {"content": "<image>", "single_word": true}}}"#,
                "\"<image>\" (id 256) is single_word, which is not supported",
            ),
        ];
        for (config, want) in bad {
            let err = load(config, None).unwrap_err().to_string();
            assert!(err.contains(want), "{config}: {err}");
        }
        let err = load("{}", Some(r#"{"<image>": -1}"#)).unwrap_err().to_string();
        assert!(err.contains("added_tokens.json") && err.contains("is not an id"), "{err}");
        for (added, want) in
            [(r#"{"<image>": 256, "<pad>": 256}"#, "collide"), (r#"{"": 256}"#, "empty text")]
        {
            let err = load("{}", Some(added)).unwrap_err().to_string();
            assert!(err.contains("added_tokens.json") && err.contains(want), "{added}: {err}");
        }
    }

    /// lstrip / rstrip drop the whitespace beside a token, up to the next token, legacy or not
    /// (tests/interop.rs checks the ids against transformers); Python's whitespace includes
    /// U+001C–U+001F, which Rust's does not.
    #[test]
    fn added_tokens_strip_the_whitespace_beside_them() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(fixture("llava-tiny/tokenizer.model"), dir.path().join("tokenizer.model")).unwrap();
        let load = |legacy: bool, lstrip: bool, rstrip: bool| {
            let config = serde_json::json!({"legacy": legacy, "added_tokens_decoder": {
                "256": {"content": "<image>", "special": true, "lstrip": lstrip, "rstrip": rstrip}}});
            std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
            Tokenizer::from_dir(dir.path()).unwrap()
        };
        for legacy in [true, false] {
            let plain = load(legacy, false, false);
            let enc = |tok: &Tokenizer, text: &str| tok.encode(text, false).unwrap();
            let (both, left, right) =
                (load(legacy, true, true), load(legacy, true, false), load(legacy, false, true));
            assert_eq!(enc(&both, "a \u{1c}\t<image>\n b"), enc(&plain, "a<image>b"), "legacy {legacy}");
            assert_eq!(enc(&left, "a  <image>  b"), enc(&plain, "a<image>  b"), "legacy {legacy}");
            assert_eq!(enc(&right, "a  <image>  b"), enc(&plain, "a  <image>b"), "legacy {legacy}");
            // Only up to the neighbouring token: `<s>` keeps the space after it.
            assert_eq!(enc(&left, "<s> <image>"), enc(&plain, "<s><image>"), "legacy {legacy}");
            assert_eq!(enc(&right, "<image> </s> x"), enc(&plain, "<image></s> x"), "legacy {legacy}");
        }
    }

    #[test]
    fn from_dir_prefers_tokenizer_json() {
        let tok = Tokenizer::from_dir(fixture("llama-gqa")).unwrap();
        assert!(tok.origin().ends_with("tokenizer.json"));
        let err = Tokenizer::from_dir(fixture("clip-vision")).unwrap_err().to_string();
        assert!(err.contains("no tokenizer.json or tokenizer.model"), "{err}");
    }

    #[test]
    fn streaming_holds_back_partial_utf8() {
        let [_, sp] = both("llama-gqa");
        // "日" is three byte-fallback pieces in this vocabulary.
        let ids = sp.encode("日", false).unwrap();
        let mut stream = sp.stream(true);
        let parts: Vec<String> = ids.iter().map(|&id| stream.next_token(id).unwrap()).collect();
        assert_eq!(parts.last().unwrap(), "日");
        assert!(parts[..parts.len() - 1].iter().all(|p| p.is_empty() || p == " "), "{parts:?}");
        // A truncated sequence becomes one U+FFFD per byte, like SentencePiece.
        let truncated = &ids[..ids.len() - 1];
        let bytes = truncated.iter().filter(|&&id| matches!(sp.piece(id).unwrap().1, PieceKind::Byte(_)));
        let n = bytes.count();
        assert_eq!(sp.decode(truncated, true).unwrap().matches('\u{FFFD}').count(), n);
    }

    #[test]
    fn special_tokens_show_by_name_unless_skipped() {
        for tok in both("llama-mha") {
            let ids = tok.encode("The fox", true).unwrap();
            let mut with_eos = ids.clone();
            with_eos.push(2);
            assert_eq!(tok.decode(&with_eos, true).unwrap(), "The fox");
            assert_eq!(tok.decode(&with_eos, false).unwrap(), "<s> The fox</s>");
        }
    }

    #[test]
    fn out_of_range_ids_are_errors() {
        for tok in both("llama-mha") {
            let err = tok.decode(&[1, 99_999], true).unwrap_err().to_string();
            assert!(err.contains("99999") && err.contains("tokenizer"), "{err}");
        }
    }

    #[test]
    fn neva_extra_ids_are_appended_and_split_like_sentencepiece() {
        let extra: Vec<String> = (0..8).map(|i| format!("<extra_id_{i}>")).collect();
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let [_, mut sp] = both("llama-gqa");
        let n = sp.vocab_size() as u32;
        let ids = sp.add_special_tokens(&extra).unwrap();
        assert_eq!(ids, (n..n + 8).collect::<Vec<_>>());
        // Adding again changes nothing.
        assert_eq!(sp.add_special_tokens(&extra).unwrap(), ids);
        assert_eq!(sp.vocab_size() as u32, n + 8);

        // Reference ids from SentencePiece itself (this vocabulary + the 8 pieces appended as
        // USER_DEFINED, encoded with sentencepiece 0.2.3): the dummy prefix is added once, and
        // the user-defined pieces split the text without adding more.
        let cases: [(&str, &[u32]); 4] = [
            ("<extra_id_0>System\nhi", &[278, 333, 86, 296, 282, 283, 279, 287, 13, 292, 286]),
            ("a<extra_id_7> USER: b", &[278, 281, 340, 278, 88, 86, 72, 85, 309, 277]),
            (" <extra_id_1>", &[278, 278, 334]),
            ("<extra_id_4><extra_id_3><extra_id_5>\nWhat", &[278, 337, 336, 338, 13, 332, 292, 267]),
        ];
        for (text, want) in cases {
            assert_eq!(sp.encode(text, false).unwrap(), want, "{text:?}");
            assert_eq!(sp.decode(want, true).unwrap(), text);
        }
    }

    #[test]
    fn sentencepiece_normaliser() {
        assert_eq!(sentencepiece_normalize("a b", true, false), "▁a▁b");
        assert_eq!(sentencepiece_normalize("", true, false), "");
        assert_eq!(sentencepiece_normalize("  a   b ", true, true), "▁a▁b");
        assert_eq!(sentencepiece_normalize("   ", true, true), "");
        assert_eq!(sentencepiece_normalize(" x", false, false), "▁x");
    }

    #[test]
    fn corrupt_models_are_rejected_with_the_file_name() {
        let path = fixture("llama-mha").join("tokenizer.model");
        let bytes = std::fs::read(&path).unwrap();
        let err = Tokenizer::from_sentencepiece_bytes(&bytes[..bytes.len() / 2], "x/tokenizer.model")
            .unwrap_err()
            .to_string();
        assert!(err.contains("x/tokenizer.model") && err.contains("truncated"), "{err}");
        assert!(Tokenizer::from_sentencepiece_bytes(b"", "empty.model").is_err());
    }

    #[test]
    fn unigram_models_are_rejected() {
        // A one-piece ModelProto whose trainer_spec says model_type = UNIGRAM.
        let piece = [0x0a, 0x05, 0x0a, 0x03, b'<', b'u', b'>'];
        let trainer = [0x12, 0x02, 0x18, 0x01];
        let bytes: Vec<u8> = piece.iter().chain(trainer.iter()).copied().collect();
        let err = Tokenizer::from_sentencepiece_bytes(&bytes, "u.model").unwrap_err().to_string();
        assert!(err.contains("unigram"), "{err}");
    }
}
