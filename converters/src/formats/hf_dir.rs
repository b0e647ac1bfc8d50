//! HuggingFace model directories.
use crate::error::{Error, Result};
use crate::Checkpoint;
use std::path::Path;

/// Whether `dir` holds HF weights.
pub fn has_weights(_dir: &Path) -> Result<bool> {
    Ok(false)
}

/// Read an HF directory.
pub fn read(path: &Path) -> Result<Checkpoint> {
    Err(Error::invalid(path, "hf dir reading is not built yet"))
}
