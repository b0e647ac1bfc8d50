//! The shardsmith core: command implementations over the `shardsmith-converters` crate.
//! (The candle compute core — models, validation, training — lands here in later issues.)

pub mod commands;
pub mod hub;
pub mod progress;

pub use shardsmith_converters as converters;
