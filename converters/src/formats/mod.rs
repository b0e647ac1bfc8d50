//! One module per container format, and [`Format::detect`] that picks among them.
//!
//! Detection looks at magic bytes and directory contents, never at a path's substrings, and it
//! refuses to guess: anything it does not recognise is an [`Error::UnknownFormat`] listing what
//! is supported.

pub mod hf_dir;
pub mod nemo;
pub mod pickle;
pub mod protobuf;
pub mod safetensors;
pub mod torch_zip;

use crate::error::{Error, IoContext, Result};
use crate::Checkpoint;
use std::io::Read;
use std::path::Path;

/// What [`Format::detect`] can recognise, for error messages.
pub const SUPPORTED: &str = "safetensors file, HF model directory (safetensors or pytorch_model.bin, \
single or sharded), PyTorch zip checkpoint (.bin/.pt/.ckpt), .nemo (tar or gzip tar), extracted .nemo directory";

/// A checkpoint container format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// A single `.safetensors` file.
    Safetensors,
    /// A PyTorch zip checkpoint.
    TorchZip,
    /// A HuggingFace model directory.
    HfDir,
    /// A `.nemo` tar (plain or gzip).
    NemoTar,
    /// An extracted `.nemo` directory.
    NemoDir,
}

const ZIP_MAGIC: &[u8] = b"PK\x03\x04";
const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
/// Legacy (pre-1.6) `torch.save` files start with a pickled magic number.
const LEGACY_TORCH_MAGIC: &[u8] = &[0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8];

impl Format {
    /// Recognise `path` by content.
    pub fn detect(path: &Path) -> Result<Format> {
        let meta = std::fs::metadata(path).at(path)?;
        if meta.is_dir() {
            return Self::detect_dir(path);
        }
        let mut head = [0u8; 512];
        let n = read_prefix(path, &mut head)?;
        let head = &head[..n];
        if head.starts_with(ZIP_MAGIC) {
            return Ok(Format::TorchZip);
        }
        if head.starts_with(LEGACY_TORCH_MAGIC) {
            return Err(Error::LegacyTorchFile { path: path.to_path_buf() });
        }
        if head.starts_with(GZIP_MAGIC) || (n >= 262 && &head[257..262] == b"ustar") {
            return Ok(Format::NemoTar);
        }
        if safetensors::looks_like(head, meta.len()) {
            return Ok(Format::Safetensors);
        }
        Err(unknown(path, format!("{n}-byte prefix matches no known magic")))
    }

    fn detect_dir(path: &Path) -> Result<Format> {
        if path.join("model_config.yaml").is_file() {
            return Ok(Format::NemoDir);
        }
        if hf_dir::has_weights(path)? {
            return Ok(Format::HfDir);
        }
        if path.join("weights").is_dir() && path.join("context").is_dir() {
            return Err(unknown(
                path,
                "a NeMo 2.x (context/ + weights/) checkpoint, which is out of scope".into(),
            ));
        }
        Err(unknown(path, "directory has neither model_config.yaml nor HF weights".into()))
    }

    /// Read `path` (headers only) as this format.
    pub fn read(self, path: &Path) -> Result<Checkpoint> {
        match self {
            Format::Safetensors => safetensors::read_checkpoint(path),
            Format::TorchZip => torch_zip::read_checkpoint(path),
            Format::HfDir => hf_dir::read(path),
            Format::NemoTar | Format::NemoDir => nemo::read(path),
        }
    }
}

/// Detect and read in one step.
pub fn open(path: &Path) -> Result<Checkpoint> {
    Format::detect(path)?.read(path)
}

fn unknown(path: &Path, reason: String) -> Error {
    Error::UnknownFormat { path: path.to_path_buf(), reason, supported: SUPPORTED }
}

fn read_prefix(path: &Path, buf: &mut [u8]) -> Result<usize> {
    let mut f = std::fs::File::open(path).at(path)?;
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]).at(path)? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Memory-map a whole file read-only.
pub fn map_file(path: &Path) -> Result<std::sync::Arc<memmap2::Mmap>> {
    let file = std::fs::File::open(path).at(path)?;
    // SAFETY: the map is read-only; like every mmap-based reader (safetensors, torch) we assume
    // the file is not truncated by another process while we hold it.
    let map = std::sync::Arc::new(unsafe { memmap2::Mmap::map(&file) }.at(path)?);
    crate::progress::register_map(&map, file);
    Ok(map)
}
