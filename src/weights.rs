//! Checkpoint → `VarBuilder`: the bridge between the converters crate's lazy tensors and candle.
//!
//! Models ask for canonical names; a [`TensorMapBackend`] answers from a `TensorMap` (already
//! renamed to canonical by the converters crate), reading each tensor's bytes only when the model
//! asks for it and converting to the requested dtype. [`rank_tensors`] narrows a canonical map to
//! one tensor-parallel rank with the same `ShardSpec` rules the resharder uses, still lazily.

use crate::{Error, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use shardsmith_converters::checkpoint::TensorMap;
use shardsmith_converters::shard::{self, ShardSpec};
use shardsmith_converters::DType as FileDType;
use std::path::PathBuf;

/// The candle dtype of a stored dtype, where candle has one.
pub fn candle_dtype(d: FileDType) -> Option<DType> {
    Some(match d {
        FileDType::F64 => DType::F64,
        FileDType::F32 => DType::F32,
        FileDType::F16 => DType::F16,
        FileDType::BF16 => DType::BF16,
        FileDType::I64 => DType::I64,
        FileDType::I32 => DType::I32,
        FileDType::I16 => DType::I16,
        FileDType::U8 => DType::U8,
        _ => return None,
    })
}

/// Parse a user's dtype flag (`f32`, `bf16`, `f16`).
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" | "float32" | "fp32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" | "fp16" => Ok(DType::F16),
        other => Err(Error::Usage(format!("unknown dtype '{other}' (expected f32, bf16 or f16)"))),
    }
}

/// A `SimpleBackend` over canonical lazy tensors.
pub struct TensorMapBackend {
    tensors: TensorMap,
    /// The checkpoint the tensors came from, named in errors.
    origin: PathBuf,
}

impl TensorMapBackend {
    /// Serve `tensors` (read from `origin`).
    pub fn new(tensors: TensorMap, origin: impl Into<PathBuf>) -> Self {
        TensorMapBackend { tensors, origin: origin.into() }
    }

    /// A `VarBuilder` producing `dtype` tensors on `device`.
    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    /// The tensor `name` as `dtype` on `dev`.
    pub fn load(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let entry = self.tensors.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!("{}: tensor '{name}' is missing", self.origin.display()))
        })?;
        let stored = candle_dtype(entry.dtype).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "{}: tensor '{name}': dtype {} cannot be loaded into a model",
                self.origin.display(),
                entry.dtype
            ))
        })?;
        let bytes = entry.bytes(name).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let t = Tensor::from_raw_buffer(&bytes, stored, &entry.shape, &Device::Cpu)?;
        t.to_dtype(dtype)?.to_device(dev)
    }
}

impl SimpleBackend for TensorMapBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Some(entry) = self.tensors.get(name) {
            if entry.shape.as_slice() != s.dims() {
                return Err(candle_core::Error::Msg(format!(
                    "{}: tensor '{name}': expected shape {:?}, got {:?}",
                    self.origin.display(),
                    s.dims(),
                    entry.shape
                )));
            }
        }
        self.load(name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// Rank `rank`'s part of every tensor in `tensors` for a TP-`tp` run, by `spec_of(name)`.
/// Lazy: only headers and gather plans are built here.
pub fn rank_tensors(
    tensors: &TensorMap,
    tp: usize,
    rank: usize,
    spec_of: impl Fn(&str) -> ShardSpec,
) -> Result<TensorMap> {
    let mut out = TensorMap::with_capacity(tensors.len());
    for (name, t) in tensors {
        let mut parts = shard::split(name, t, &spec_of(name), tp)?;
        out.insert(name.clone(), parts.swap_remove(rank));
    }
    Ok(out)
}
