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
