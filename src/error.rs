//! The one error type of the compute core (models, inference, validation, training).
//!
//! Like the converters' error, every variant names what the user acts on: the file, the tensor,
//! what was expected and what was found. Messages are lowercase with no trailing period.

use std::path::PathBuf;

/// Result alias used throughout the core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the compute core can report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or interpreting a checkpoint failed (format, names, shapes).
    #[error(transparent)]
    Checkpoint(#[from] shardsmith_converters::Error),

    /// A tensor operation failed inside candle.
    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),

    /// A model configuration value is missing or out of range.
    #[error("{path}: {detail}")]
    Config {
        /// The config file (or checkpoint) it came from.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },

    /// A tensor the model needs has the wrong shape or is missing.
    #[error("tensor '{tensor}': expected {expected}, got {got}")]
    Weight {
        /// Canonical tensor name.
        tensor: String,
        /// What the model needs.
        expected: String,
        /// What the checkpoint holds.
        got: String,
    },

    /// Tokenizer loading or encoding failed.
    #[error("tokenizer {path}: {detail}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },

    /// An image could not be read or preprocessed.
    #[error("image {path}: {detail}")]
    Image {
        /// The image file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },

    /// Bad user input that is not tied to a file (a prompt, a flag combination).
    #[error("{0}")]
    Usage(String),

    /// An I/O failure on a named path.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// A [`Error::Config`] for `path`.
    pub fn config(path: impl Into<PathBuf>, detail: impl Into<String>) -> Self {
        Error::Config { path: path.into(), detail: detail.into() }
    }

    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
