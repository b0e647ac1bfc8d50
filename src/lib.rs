//! The shardsmith core: the candle models (LLaMA-2, CLIP vision, projector, NeVA/LLaVA), simulated
//! tensor parallelism, inference and validation, and the command implementations over the
//! `shardsmith-converters` crate.

pub mod commands;
pub mod error;
pub mod hub;
pub mod infer;
pub mod models;
pub mod ops;
pub mod parallel;
pub mod progress;
pub mod rng;
pub mod train;
pub mod validate;
pub mod weights;

pub use error::{Error, Result};
pub use shardsmith_converters as converters;
