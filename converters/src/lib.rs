//! Checkpoint formats for LLaMA-2, CLIP and NeVA: read, convert, reshard and write them without
//! loading a model into memory.
//!
//! The one idea (see `shared/docs/design.md`): a [`Checkpoint`] is an ordered map from names to
//! lazy tensors plus typed metadata, and everything else is a pure function from one such value to
//! another. Formats know bytes, not models.

#![deny(missing_docs)]

pub mod atomic;
pub mod checkpoint;
pub mod convert;
pub mod describe;
pub mod dtype;
pub mod error;
pub mod formats;
pub mod names;
pub mod progress;
pub mod shard;
pub mod sink;
pub mod surgery;
pub mod transforms;

pub use checkpoint::{
    Artifact, ByteSource, Checkpoint, Flavour, Meta, ModelConfig, NemoLayout, Parallelism, Produce, Rank,
    Segment, Shard, TensorEntry, TensorMap,
};
pub use dtype::DType;
pub use error::{Error, Result};
