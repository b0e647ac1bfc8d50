//! NeVA stage-1/stage-2 finetuning.

pub mod config;
pub mod data;
pub mod demo;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod plot;
pub mod run;
pub mod schedule;
