//! PyTorch zip checkpoints written by `torch.save`: `pytorch_model.bin`, `*.pt`, NeMo's
//! `model_weights.ckpt` (formats.md §8.2, §2).
//!
//! Reading: the `zip` crate parses the central directory and checks every local header against
//! it. Torch stores records uncompressed, so each tensor becomes a zero-copy range of the file
//! mapping; only views that are not C-contiguous, and files written on big-endian machines, get a
//! lazily computed [`ByteSource::Derived`] (a strided gather and/or byte swap). `data.pkl` is
//! decoded by the restricted VM in [`super::pickle`] with torch's `weights_only` allow-list.
//!
//! Writing: a small hand-written zip writer rather than the `zip` crate's, because the `.nemo`
//! writer must know the archive's exact length ([`encoded_len`]) before streaming it into a tar,
//! and the zip crate's choice of extra fields and ZIP64 records is not a contract we can predict
//! byte for byte. It writes only what torch's reader (miniz) needs: stored entries with CRC-32s,
//! data aligned to 64 bytes by torch's `FB` extra field, ZIP64 fields where sizes or offsets do
//! not fit 32 bits, a central directory and (when needed) the ZIP64 end records. Tensor bytes are
//! pulled one storage at a time, so memory stays bounded by the largest tensor.
//!
//! [`ByteSource::Derived`]: crate::checkpoint::ByteSource::Derived

mod read;
mod write;
mod zip;

#[cfg(test)]
mod tests;

pub use self::read::{read_checkpoint, read_file, read_mapped, read_mapped_tensor};
pub use self::write::{
    encoded_len, save_plain, tensor_encoded_len, write_at, write_file, write_tensor_at, write_to,
};

use crate::checkpoint::TensorMap;
use crate::error::Error;
use std::path::Path;

/// The top-level contents of a torch checkpoint: its tensors plus the keys that hold no tensor.
///
/// Keys whose value is `None` (NeMo's `…._extra_state`) are kept by name in `none_keys` and
/// written back as `None`. On writing, each `None` key is placed where torch's `state_dict()`
/// puts a module's extra state: after the last tensor of the same module (same name up to the
/// last `.`), else before the module's first child tensor, else at the end. That reproduces the
/// file order of torch-written state dicts without a separate key list.
#[derive(Clone, Debug, Default)]
pub struct TorchState {
    /// The tensors, in pickle order.
    pub tensors: TensorMap,
    /// Keys written as `None`: every `…_extra_state` key, whatever the file stored (Transformer
    /// Engine's and Megatron's `set_extra_state(None)` are no-ops, formats.md §2.2), and any
    /// other key whose value is `None`.
    pub none_keys: Vec<String>,
    /// Other non-tensor top-level values, shown by `inspect` and not written back.
    pub skipped: Vec<Skipped>,
}

impl TorchState {
    /// A state with the given tensors and `None` keys and nothing skipped.
    pub fn new(tensors: TensorMap, none_keys: Vec<String>) -> Self {
        TorchState { tensors, none_keys, skipped: Vec::new() }
    }
}

/// A top-level key whose value is neither a tensor nor `None` (an int, a string, a nested dict).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// The key.
    pub key: String,
    /// What its value is, e.g. `int 3` or `dict (4 entries)`.
    pub what: String,
}

/// The format name in errors.
const FORMAT: &str = "pytorch zip";

/// A [`Error::Malformed`] for this format.
fn malformed(origin: &Path, detail: impl Into<String>) -> Error {
    Error::malformed(origin, FORMAT, detail)
}
