//! `.nemo` archives (being written).
use crate::error::{Error, Result};
use crate::Checkpoint;
use std::path::Path;

/// `model_config.yaml`, kept verbatim plus a parsed view.
#[derive(Clone, Debug)]
pub struct NemoConfig {
    /// The file's exact text.
    pub raw: String,
    /// Parsed view for reading fields.
    pub value: serde_yaml::Value,
}

/// Read a `.nemo` tar or extracted directory.
pub fn read(path: &Path) -> Result<Checkpoint> {
    Err(Error::invalid(path, ".nemo reading is not built yet"))
}
