//! PyTorch zip checkpoints (being written).
use crate::error::{Error, Result};
use crate::Checkpoint;
use std::path::Path;

/// Read a PyTorch zip checkpoint as a single-rank checkpoint.
pub fn read_checkpoint(path: &Path) -> Result<Checkpoint> {
    Err(Error::invalid(path, "torch zip reading is not built yet"))
}
