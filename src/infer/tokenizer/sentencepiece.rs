//! SentencePiece `ModelProto` (`tokenizer.model`) reader.
//!
//! Hand-written on purpose: the `sentencepiece` crate binds the C++ library (a C++ toolchain and
//! cmake in every build) and the protobuf crates need the `.proto` compiled in, while a BPE
//! LLaMA tokenizer needs a dozen fields of three messages, read here with the converters' wire
//! reader ([`shardsmith_converters::formats::protobuf`]). It refuses what it would get wrong
//! (unigram models, custom normalisation rules) instead of tokenising differently.

use shardsmith_converters::formats::protobuf::{Reader, Wire};

/// SentencePiece piece types (`ModelProto.SentencePiece.Type`), also used to classify the pieces
/// of a `tokenizer.json` for decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PieceKind {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte(u8),
}

/// `<0xAB>` → 0xAB.
pub(super) fn byte_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// The fields of `sentencepiece_model.proto` a BPE LLaMA tokenizer needs.
#[derive(Debug)]
pub(super) struct SpModel {
    pub(super) pieces: Vec<SpPiece>,
    pub(super) model_type: u64,
    pub(super) byte_fallback: bool,
    pub(super) unk_id: i32,
    pub(super) bos_id: i32,
    pub(super) eos_id: i32,
    pub(super) unk_surface: String,
    pub(super) treat_whitespace_as_suffix: bool,
    pub(super) normalizer_name: String,
    pub(super) has_charsmap: bool,
    pub(super) add_dummy_prefix: bool,
    pub(super) remove_extra_whitespaces: bool,
    pub(super) escape_whitespaces: bool,
}

#[derive(Debug)]
pub(super) struct SpPiece {
    pub(super) piece: String,
    pub(super) score: f32,
    pub(super) kind: PieceKind,
}

/// `TrainerSpec.ModelType`.
const MODEL_TYPE_UNIGRAM: u64 = 1;
const MODEL_TYPE_BPE: u64 = 2;

impl SpModel {
    pub(super) fn parse(bytes: &[u8]) -> std::result::Result<Self, String> {
        // Defaults are the proto2 defaults of sentencepiece_model.proto.
        let mut m = SpModel {
            pieces: Vec::new(),
            model_type: MODEL_TYPE_UNIGRAM,
            byte_fallback: false,
            unk_id: 0,
            bos_id: 1,
            eos_id: 2,
            unk_surface: " \u{2047} ".into(),
            treat_whitespace_as_suffix: false,
            normalizer_name: String::new(),
            has_charsmap: false,
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        };
        let mut r = Reader::new(bytes);
        while let Some(f) = r.next_field().map_err(|e| format!("not a SentencePiece model: {e}"))? {
            match (f.number, f.value) {
                (1, Wire::Bytes(b)) => m.pieces.push(parse_piece(b, m.pieces.len())?),
                (2, Wire::Bytes(b)) => m.parse_trainer_spec(b)?,
                (3, Wire::Bytes(b)) => m.parse_normalizer_spec(b)?,
                _ => {}
            }
        }
        if m.pieces.is_empty() {
            return Err("not a SentencePiece model (no pieces found)".into());
        }
        Ok(m)
    }

    fn parse_trainer_spec(&mut self, bytes: &[u8]) -> std::result::Result<(), String> {
        let mut r = Reader::new(bytes);
        while let Some(f) = r.next_field().map_err(|e| format!("not a SentencePiece model: {e}"))? {
            match (f.number, f.value) {
                (3, Wire::Varint(v)) => self.model_type = v,
                (24, Wire::Varint(v)) => self.treat_whitespace_as_suffix = v != 0,
                (35, Wire::Varint(v)) => self.byte_fallback = v != 0,
                // int32 fields: negative values are sign-extended to 64 bits on the wire.
                (40, Wire::Varint(v)) => self.unk_id = v as i64 as i32,
                (41, Wire::Varint(v)) => self.bos_id = v as i64 as i32,
                (42, Wire::Varint(v)) => self.eos_id = v as i64 as i32,
                (44, Wire::Bytes(b)) => self.unk_surface = utf8(b, "trainer_spec.unk_surface")?,
                _ => {}
            }
        }
        Ok(())
    }

    fn parse_normalizer_spec(&mut self, bytes: &[u8]) -> std::result::Result<(), String> {
        let mut r = Reader::new(bytes);
        while let Some(f) = r.next_field().map_err(|e| format!("not a SentencePiece model: {e}"))? {
            match (f.number, f.value) {
                (1, Wire::Bytes(b)) => self.normalizer_name = utf8(b, "normalizer_spec.name")?,
                (2, Wire::Bytes(b)) => self.has_charsmap = !b.is_empty(),
                (3, Wire::Varint(v)) => self.add_dummy_prefix = v != 0,
                (4, Wire::Varint(v)) => self.remove_extra_whitespaces = v != 0,
                (5, Wire::Varint(v)) => self.escape_whitespaces = v != 0,
                _ => {}
            }
        }
        Ok(())
    }

    /// Refuses what this reader would get wrong, instead of tokenising differently.
    pub(super) fn check_supported(&self) -> std::result::Result<(), String> {
        match self.model_type {
            MODEL_TYPE_BPE => {}
            MODEL_TYPE_UNIGRAM => {
                return Err("this is a unigram SentencePiece model; only BPE models (LLaMA) are \
                            supported — convert it to tokenizer.json with transformers"
                    .into())
            }
            other => return Err(format!("SentencePiece model_type {other} is not supported (only BPE)")),
        }
        if self.has_charsmap {
            let name = if self.normalizer_name.is_empty() { "custom" } else { &self.normalizer_name };
            return Err(format!(
                "normalization rule {name:?} (a precompiled charsmap) is not supported; only \
                 \"identity\" (as in LLaMA) is"
            ));
        }
        if self.treat_whitespace_as_suffix {
            return Err("treat_whitespace_as_suffix models are not supported".into());
        }
        if !self.escape_whitespaces {
            return Err("models with escape_whitespaces=false are not supported".into());
        }
        Ok(())
    }

    /// BPE merges as transformers' `SentencePieceExtractor` derives them: every split of a
    /// normal piece into two pieces, best score first, then by merged id, left id, right id.
    pub(super) fn merges(&self) -> Vec<(String, String)> {
        let ids: std::collections::HashMap<&str, usize> =
            self.pieces.iter().enumerate().map(|(i, p)| (p.piece.as_str(), i)).collect();
        let mut merges = Vec::new();
        for (id, p) in self.pieces.iter().enumerate() {
            // Only normal pieces are merge results in SentencePiece's BPE.
            if p.kind != PieceKind::Normal {
                continue;
            }
            for (cut, _) in p.piece.char_indices().skip(1) {
                let (left, right) = p.piece.split_at(cut);
                if let (Some(&l), Some(&r)) = (ids.get(left), ids.get(right)) {
                    merges.push((p.score, id, l, r));
                }
            }
        }
        merges.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, a.2, a.3).cmp(&(b.1, b.2, b.3))));
        merges
            .into_iter()
            .map(|(_, _, l, r)| (self.pieces[l].piece.clone(), self.pieces[r].piece.clone()))
            .collect()
    }
}

fn parse_piece(bytes: &[u8], index: usize) -> std::result::Result<SpPiece, String> {
    let mut piece = None;
    let mut score = 0.0;
    let mut kind = 1;
    let mut r = Reader::new(bytes);
    while let Some(f) = r.next_field()? {
        match (f.number, f.value) {
            (1, Wire::Bytes(b)) => piece = Some(utf8(b, "piece")?),
            (2, Wire::Fixed32(bits)) => score = f32::from_bits(bits),
            (3, Wire::Varint(v)) => kind = v,
            _ => {}
        }
    }
    let piece = piece.ok_or_else(|| format!("piece {index} has no text"))?;
    let kind = match kind {
        1 => PieceKind::Normal,
        2 => PieceKind::Unknown,
        3 => PieceKind::Control,
        4 => PieceKind::UserDefined,
        5 => PieceKind::Unused,
        6 => PieceKind::Byte(
            byte_piece(&piece).ok_or_else(|| format!("byte piece {index} is {piece:?}, not <0xXX>"))?,
        ),
        other => return Err(format!("piece {index} ({piece:?}) has unknown type {other}")),
    };
    Ok(SpPiece { piece, score, kind })
}

fn utf8(bytes: &[u8], what: &str) -> std::result::Result<String, String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not valid UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_int32_ids_parse() {
        // trainer_spec { bos_id: -1 } (field 41, varint, sign-extended to 10 bytes)
        let mut spec = vec![0xc8, 0x02];
        spec.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        let mut m = SpModel::parse(&[0x0a, 0x05, 0x0a, 0x03, b'<', b'u', b'>']).unwrap();
        m.parse_trainer_spec(&spec).unwrap();
        assert_eq!(m.bos_id, -1);
    }
}
