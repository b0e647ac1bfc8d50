//! Inference building blocks: tokenizers, chat templates, image preprocessing, sampling.

pub mod generate;
pub mod image;
pub mod sampling;
pub mod template;
pub mod tokenizer;
