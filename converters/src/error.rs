//! The one error type of the converters crate.
//!
//! Every variant names what a user needs to act on: the file, the tensor or member, and what was
//! expected versus found. Messages are lowercase and have no trailing period.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while reading, transforming or writing a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O failure on a named path.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The path is not any format this crate understands.
    #[error("{path}: cannot tell the checkpoint format ({reason}); supported: {supported}")]
    UnknownFormat {
        /// The path that was probed.
        path: PathBuf,
        /// What the probe saw.
        reason: String,
        /// The list of formats `detect` knows.
        supported: &'static str,
    },

    /// A structurally broken file: bad header, truncated data, inconsistent offsets.
    #[error("{path}: malformed {format}: {detail}")]
    Malformed {
        /// The file (or `archive:member`).
        path: PathBuf,
        /// Which format was being parsed (`safetensors`, `pickle`, `zip`, `tar`, ...).
        format: &'static str,
        /// What exactly is wrong.
        detail: String,
    },

    /// A tensor whose byte length does not match dtype × shape.
    #[error("{path}: tensor '{tensor}': expected {expected} bytes ({dtype} {shape:?}), got {got}")]
    TensorSize {
        /// Where the tensor lives.
        path: PathBuf,
        /// Tensor name.
        tensor: String,
        /// Its dtype.
        dtype: crate::DType,
        /// Its shape.
        shape: Vec<usize>,
        /// Bytes implied by dtype and shape.
        expected: usize,
        /// Bytes actually available.
        got: usize,
    },

    /// A dtype this crate does not carry (e.g. complex or fp8 in safetensors).
    #[error("{path}: tensor '{tensor}': unsupported dtype {dtype}")]
    UnsupportedDtype {
        /// Where the tensor lives.
        path: PathBuf,
        /// Tensor name.
        tensor: String,
        /// The dtype as the file spells it.
        dtype: String,
    },

    /// A cast between dtypes that has no defined meaning here (only float ↔ float is allowed).
    #[error("tensor '{tensor}': cannot cast {from} to {to} (only between f64, f32, f16 and bf16)")]
    InvalidCast {
        /// Tensor name.
        tensor: String,
        /// Source dtype.
        from: crate::DType,
        /// Requested dtype.
        to: crate::DType,
    },

    /// A pickle referenced a global outside the allow-list (like `torch.load(weights_only=True)`).
    #[error("{path}: pickle references forbidden global '{module}.{name}' (only tensor-rebuilding globals are allowed)")]
    ForbiddenGlobal {
        /// The pickle's file.
        path: PathBuf,
        /// Module part of the global.
        module: String,
        /// Name part of the global.
        name: String,
    },

    /// A legacy (pre-1.6, non-zip) `torch.save` file.
    #[error(
        "{path}: legacy non-zip PyTorch checkpoint; re-save it with torch.save(obj, path) from torch >= 1.6"
    )]
    LegacyTorchFile {
        /// The file.
        path: PathBuf,
    },

    /// An archive member whose path escapes the archive (absolute or containing `..`).
    #[error("{path}: tar member '{member}' has an unsafe path (absolute or containing '..')")]
    UnsafeMemberPath {
        /// The archive.
        path: PathBuf,
        /// The offending member name.
        member: String,
    },

    /// A tensor, member or file that must be present is not.
    #[error("{path}: missing {what}")]
    Missing {
        /// Where it was looked for.
        path: PathBuf,
        /// What is missing (e.g. `tensor 'lm_head.weight'`, `member model_config.yaml`).
        what: String,
    },

    /// A value that parsed but makes no sense (inconsistent TP/PP, bad config).
    #[error("{path}: {detail}")]
    Invalid {
        /// The file or checkpoint involved.
        path: PathBuf,
        /// What is inconsistent, with expected vs got.
        detail: String,
    },

    /// A command-line style argument (rename rule, glob, token list) that cannot be used.
    #[error("{arg}: {detail}")]
    Argument {
        /// The argument as given (e.g. `--rule 'a(=b'`).
        arg: String,
        /// What is wrong with it.
        detail: String,
    },

    /// Two tensors would end up under one name.
    #[error("{path}: tensors '{first}' and '{second}' would both be named '{target}'")]
    Collision {
        /// The checkpoint (and rank, where it has several).
        path: PathBuf,
        /// The first tensor mapped to `target`.
        first: String,
        /// The second one.
        second: String,
        /// The name both would get.
        target: String,
    },

    /// A multimodal bundle lacks parts it needs (LLM, vision tower or its reference, projector,
    /// tokenizer with the image tokens, template); each entry says what and how to supply it.
    #[error("{path}: incomplete multimodal bundle, missing: {}", .missing.join("; "))]
    IncompleteBundle {
        /// The source checkpoint.
        path: PathBuf,
        /// The missing parts.
        missing: Vec<String>,
    },

    /// The destination already exists and overwriting was not asked for.
    #[error("{path}: output already exists (pass --force to replace it)")]
    OutputExists {
        /// The destination.
        path: PathBuf,
    },
}

impl Error {
    /// Shorthand for [`Error::Malformed`].
    pub fn malformed(path: impl Into<PathBuf>, format: &'static str, detail: impl Into<String>) -> Self {
        Error::Malformed { path: path.into(), format, detail: detail.into() }
    }

    /// Shorthand for [`Error::Invalid`].
    pub fn invalid(path: impl Into<PathBuf>, detail: impl Into<String>) -> Self {
        Error::Invalid { path: path.into(), detail: detail.into() }
    }

    /// Shorthand for [`Error::Argument`].
    pub fn argument(arg: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Argument { arg: arg.into(), detail: detail.into() }
    }

    /// Shorthand for [`Error::Missing`].
    pub fn missing(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        Error::Missing { path: path.into(), what: what.into() }
    }
}

/// Attach a path to `std::io::Result`s.
pub trait IoContext<T> {
    /// Turn an I/O error into [`Error::Io`] naming `path`.
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io { path: path.into(), source })
    }
}
