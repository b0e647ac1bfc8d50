//! Conversion is composition: read → rename to canonical → undo transforms → reshard → apply
//! transforms → rename to target → write. This module holds the middle steps, as pure functions
//! over lazy tensors, so a plan can be printed and checked before a byte moves.

pub mod assemble;
pub mod clip;
pub mod init;
pub mod llama;
pub mod llava;
pub mod neva;
pub mod sentencepiece;
pub mod tokenizer;
pub mod vocab;

/// The global arrays of a `.nemo` checkpoint (LLaMA or NeVA, any TP/PP) as a distributed
/// checkpoint stores them.
pub fn dist_weights(ckpt: &crate::Checkpoint) -> crate::Result<crate::formats::nemo::DistWeights> {
    if neva::is_multimodal(ckpt) {
        neva::dist_weights(ckpt)
    } else {
        llama::dist_weights(ckpt)
    }
}

/// Refuse an integer tensor where the model has weights: it would be cast or multiplied as
/// numbers and give garbage instead of an error.
pub(crate) fn require_float(
    what: &str,
    name: &str,
    t: &crate::TensorEntry,
    path: &std::path::Path,
) -> crate::Result<()> {
    if t.dtype.is_float() {
        return Ok(());
    }
    Err(crate::Error::invalid(
        path,
        format!("{what} '{name}': expected floating-point weights, got {}", t.dtype),
    ))
}
