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
