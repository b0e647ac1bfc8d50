//! Checkpoint surgery: edits that are pure functions from one [`Checkpoint`] to an [`Edit`] (the
//! output checkpoint, still lazy, plus the [`Plan`] describing it), written by [`write()`] in the
//! input's own container unless asked otherwise.
//!
//! | operation | module | what |
//! |---|---|---|
//! | rename / drop | [`rename`] | regex renames, glob drops, by stored name, any format and rank |
//! | extract | [`extract`], [`neva`] | a multimodal checkpoint's (llava-hf or NeVA) LLM, vision tower or projector, as its ecosystem loads it |
//! | resize-vocab | [`vocab`] | grow or shrink a LLaMA's vocabulary, tokenizer included |
//! | keep-layers | [`layers`] | the first N decoder layers, byte for byte |
//! | merge-lora | [`lora`], [`lora_nemo`] | fold a PEFT (or NeMo) LoRA adapter into the weights |
//! | merge | [`merge`] | weighted average of two checkpoints of one architecture |
//! | swap-llm | [`swap`], [`neva`] | replace a multimodal bundle's (llava-hf or NeVA) language model |
//!
//! Tensors that change are lazy [`crate::ByteSource::Derived`] computations (or zero-copy
//! slices) over their inputs, so building an edit reads headers only — the plan is exact for
//! `--dry-run` — and writing streams one tensor at a time.
//!
//! [`Checkpoint`]: crate::Checkpoint

pub mod extract;
pub mod layers;
pub mod lora;
pub mod lora_nemo;
pub mod merge;
pub mod model;
pub mod neva;
pub mod numeric;
pub mod parts;
pub mod plan;
pub mod rename;
pub mod swap;
pub mod tokens;
pub mod vocab;

pub use plan::{write, Action, Change, Edit, Plan, WriteAs, WriteOptions};
