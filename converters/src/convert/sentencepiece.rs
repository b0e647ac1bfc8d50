//! The few SentencePiece `ModelProto` edits NeVA needs: list the pieces, append user-defined
//! pieces (NeMo's `add_special_tokens_to_sentencepiece.py --is_userdefined`, formats.md §6.4), and
//! remove pieces a conversion appended.
//!
//! No protobuf dependency because the edit is a byte splice: a `ModelProto` is a sequence of
//! top-level records, each piece one length-delimited field-1 record, so appending pieces means
//! inserting records after the last piece and leaving every other byte (trainer and normaliser
//! specs, unknown fields) exactly as it was. Re-serialising through generated code would instead
//! rewrite fields it does not know and tie the output bytes to one protobuf library's choices.
//! The records are read with [`crate::formats::protobuf`], which gives each one's byte span.
//!
//! A new piece is written the way Python protobuf serialises
//! `SentencePiece(piece=token, score=0.0, type=USER_DEFINED)`: field 1 (string), field 2 (float
//! 0.0, present because proto2 tracks explicit presence), field 3 (varint 4). The interop tests
//! compare our bytes with that reference.

use crate::error::{Error, Result};
use crate::formats::protobuf::{put_varint, Reader, Wire};
use std::path::Path;

/// A piece's type (`SentencePiece.Type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PieceType {
    /// A normal vocabulary piece (the proto default when the field is absent).
    Normal,
    /// `<unk>`.
    Unknown,
    /// Control symbols such as `<s>`, `</s>` (never produced from text).
    Control,
    /// Matched verbatim in text before segmentation (NeVA's `<extra_id_*>`).
    UserDefined,
    /// Byte-fallback pieces `<0x00>`…
    Byte,
    /// Unused.
    Unused,
    /// A value this reader does not know.
    Other(u64),
}

impl PieceType {
    fn from_raw(v: u64) -> Self {
        match v {
            1 => PieceType::Normal,
            2 => PieceType::Unknown,
            3 => PieceType::Control,
            4 => PieceType::UserDefined,
            5 => PieceType::Unused,
            6 => PieceType::Byte,
            other => PieceType::Other(other),
        }
    }
}

/// One vocabulary entry; its id is its index.
#[derive(Clone, Debug, PartialEq)]
pub struct Piece {
    /// The piece text.
    pub piece: String,
    /// Its score.
    pub score: f32,
    /// Its type.
    pub kind: PieceType,
}

/// A parsed `ModelProto`: its bytes plus where each piece record sits.
#[derive(Clone, Debug)]
pub struct SentencePieceModel {
    bytes: Vec<u8>,
    pieces: Vec<Piece>,
    /// Byte range of each piece's whole record (key, length and payload).
    records: Vec<(usize, usize)>,
}

const FORMAT: &str = "sentencepiece model";

fn parse_piece(b: &[u8]) -> std::result::Result<Piece, String> {
    let mut piece = Piece { piece: String::new(), score: 0.0, kind: PieceType::Normal };
    let mut r = Reader::new(b);
    while let Some(f) = r.next_field()? {
        match (f.number, f.value) {
            (1, Wire::Bytes(text)) => {
                piece.piece = String::from_utf8(text.to_vec()).map_err(|_| "its text is not UTF-8")?
            }
            (2, Wire::Fixed32(bits)) => piece.score = f32::from_bits(bits),
            (3, Wire::Varint(kind)) => piece.kind = PieceType::from_raw(kind),
            _ => {}
        }
    }
    Ok(piece)
}

/// The record bytes of a user-defined piece with score 0 (see the module comment).
fn user_defined_record(token: &str) -> Vec<u8> {
    let mut inner = vec![0x0a];
    put_varint(&mut inner, token.len() as u64);
    inner.extend_from_slice(token.as_bytes());
    inner.extend_from_slice(&[0x15, 0, 0, 0, 0, 0x18, 4]);
    let mut rec = vec![0x0a];
    put_varint(&mut rec, inner.len() as u64);
    rec.extend(inner);
    rec
}

/// Read a SentencePiece model a user names (`--tokenizer`): its bytes, once they parse as one,
/// so a wrong file is refused under its own name before anything is written.
pub fn read_model_file(path: &Path) -> Result<crate::ByteSource> {
    let bytes = std::fs::read(path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
    let model = SentencePieceModel::parse(bytes, path)?;
    Ok(crate::ByteSource::owned(model.bytes))
}

impl SentencePieceModel {
    /// Parse `bytes`; `origin` names the file in errors.
    pub fn parse(bytes: Vec<u8>, origin: &Path) -> Result<Self> {
        let bad = |detail: String| Error::malformed(origin, FORMAT, detail);
        let top = Reader::new(&bytes).fields().map_err(|e| bad(format!("not a protobuf message: {e}")))?;
        let mut pieces = Vec::new();
        let mut spans = Vec::new();
        for f in top.into_iter().filter(|f| f.number == 1) {
            let Wire::Bytes(record) = f.value else {
                return Err(bad("field 1 (pieces) is not length-delimited".into()));
            };
            let p = parse_piece(record).map_err(|e| bad(format!("piece {}: {e}", pieces.len())))?;
            pieces.push(p);
            spans.push(f.span);
        }
        if pieces.is_empty() {
            return Err(bad("no pieces".into()));
        }
        Ok(SentencePieceModel { bytes, pieces, records: spans })
    }

    /// The serialised model.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The vocabulary; a piece's id is its index.
    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    /// Number of pieces (the vocabulary size).
    pub fn len(&self) -> usize {
        self.pieces.len()
    }

    /// Whether the model has no pieces (never true for a parsed model).
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// The id of `piece`.
    pub fn id(&self, piece: &str) -> Option<u32> {
        self.pieces.iter().position(|p| p.piece == piece).map(|i| i as u32)
    }

    /// The model with `tokens` appended as user-defined pieces (ids `len()…`), every other byte
    /// unchanged. Refuses a token that is already a piece.
    pub fn with_user_defined(&self, tokens: &[&str], origin: &Path) -> Result<SentencePieceModel> {
        if let Some(t) = tokens.iter().find(|t| self.id(t).is_some()) {
            return Err(Error::invalid(origin, format!("tokenizer already has the piece '{t}'")));
        }
        let at = self.records.last().map_or(0, |r| r.1);
        let mut out = Vec::with_capacity(self.bytes.len() + 32 * tokens.len());
        out.extend_from_slice(&self.bytes[..at]);
        for t in tokens {
            out.extend(user_defined_record(t));
        }
        out.extend_from_slice(&self.bytes[at..]);
        SentencePieceModel::parse(out, origin)
    }

    /// Undo [`SentencePieceModel::with_user_defined`]: the model without its last `tokens.len()`
    /// pieces, which must be exactly those tokens as that function writes them. `None` when they
    /// are not (the pieces were not appended by us, or were edited since).
    pub fn without_appended(&self, tokens: &[&str], origin: &Path) -> Option<SentencePieceModel> {
        let k = tokens.len();
        let n = self.records.len();
        if k == 0 || k >= n {
            return (k == 0).then(|| self.clone());
        }
        let tail = &self.records[n - k..];
        // Contiguous records, each byte-identical to what we append.
        let mut at = tail[0].0;
        for ((start, end), t) in tail.iter().zip(tokens) {
            if *start != at || self.bytes[*start..*end] != user_defined_record(t)[..] {
                return None;
            }
            at = *end;
        }
        let mut out = self.bytes[..tail[0].0].to_vec();
        out.extend_from_slice(&self.bytes[at..]);
        SentencePieceModel::parse(out, origin).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_model() -> SentencePieceModel {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/llama-mha/tokenizer.model");
        SentencePieceModel::parse(std::fs::read(&path).unwrap(), &path).unwrap()
    }

    #[test]
    fn reads_the_fixture_vocabulary() {
        let sp = fixture_model();
        assert_eq!(sp.len(), 256);
        assert_eq!(sp.pieces()[0].kind, PieceType::Unknown);
        assert_eq!((sp.pieces()[1].piece.as_str(), sp.pieces()[1].kind), ("<s>", PieceType::Control));
        assert_eq!(sp.id("</s>"), Some(2));
    }

    #[test]
    fn appending_and_removing_user_defined_pieces_is_exact() {
        let sp = fixture_model();
        let tokens = crate::names::neva::EXTRA_IDS;
        let grown = sp.with_user_defined(&tokens, Path::new("t")).unwrap();
        assert_eq!(grown.len(), 264);
        assert_eq!(grown.id("<extra_id_3>"), Some(259));
        assert!(grown.pieces()[256..].iter().all(|p| p.kind == PieceType::UserDefined && p.score == 0.0));
        // Everything but the spliced records is untouched, and the edit undoes exactly.
        assert_eq!(grown.bytes().len(), sp.bytes().len() + 8 * 23);
        let back = grown.without_appended(&tokens, Path::new("t")).unwrap();
        assert_eq!(back.bytes(), sp.bytes());
        assert!(sp.without_appended(&tokens, Path::new("t")).is_none(), "nothing was appended");
        let err = grown.with_user_defined(&["<extra_id_0>"], Path::new("t")).unwrap_err().to_string();
        assert!(err.contains("already has the piece '<extra_id_0>'"), "{err}");
    }

    proptest::proptest! {
        /// Appending user-defined pieces and removing them again are inverse, byte for byte, for
        /// any new tokens (UTF-8 of any length, so multi-byte varint lengths occur).
        #[test]
        fn appending_then_removing_gives_the_same_bytes(
            tokens in proptest::collection::btree_set("[a-z<>_\u{2581}\u{4e00}]{1,200}", 1..6)
        ) {
            let sp = fixture_model();
            let tokens: Vec<&str> = tokens.iter().map(String::as_str).filter(|t| sp.id(t).is_none()).collect();
            proptest::prop_assume!(!tokens.is_empty());
            let grown = sp.with_user_defined(&tokens, Path::new("t")).unwrap();
            proptest::prop_assert_eq!(grown.len(), sp.len() + tokens.len());
            for (i, t) in tokens.iter().enumerate() {
                proptest::prop_assert_eq!(grown.id(t), Some((sp.len() + i) as u32));
            }
            let back = grown.without_appended(&tokens, Path::new("t")).unwrap();
            proptest::prop_assert_eq!(back.bytes(), sp.bytes());
        }
    }

    #[test]
    fn garbage_is_a_named_error() {
        let err = SentencePieceModel::parse(vec![0x0a, 9, 1], Path::new("x.model")).unwrap_err().to_string();
        assert!(err.contains("x.model") && err.contains("sentencepiece"), "{err}");
    }
}
