//! NeVA stage-1/stage-2 finetuning.

pub mod demo;
pub mod model;
