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

/// Synthetic weights for benchmarks: every tensor a model asks for is made on the spot, on the
/// model's device (no checkpoint, no host copy). Matrices are N(0, `std`²); vectors are ones
/// (norm and layer-norm weights) or zeros (names ending in `bias`), so activations stay finite
/// through any depth. With `trainable`, each tensor is a fresh [`candle_core::Var`], collected
/// for [`RandomBackend::vars`].
pub struct RandomBackend {
    std: f64,
    trainable: bool,
    vars: std::sync::Mutex<Vec<(String, candle_core::Var)>>,
}

impl RandomBackend {
    /// A backend drawing N(0, std²) matrices.
    pub fn new(std: f64, trainable: bool) -> Self {
        RandomBackend { std, trainable, vars: Default::default() }
    }

    /// The `Var`s made so far (with `trainable`), by name.
    pub fn vars(&self) -> Vec<(String, candle_core::Var)> {
        self.vars.lock().expect("random backend").clone()
    }

    /// A `VarBuilder` over a shared backend.
    pub fn var_builder(self: &std::sync::Arc<Self>, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(SharedRandom(self.clone())), dtype, device.clone())
    }

    fn make(&self, shape: Shape, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let t = match shape.rank() {
            0 | 1 if name.ends_with("bias") => Tensor::zeros(shape, dtype, dev)?,
            0 | 1 => Tensor::ones(shape, dtype, dev)?,
            _ => Tensor::randn(0f32, self.std as f32, shape, dev)?.to_dtype(dtype)?,
        };
        if !self.trainable {
            return Ok(t);
        }
        let v = candle_core::Var::from_tensor(&t)?;
        let t = v.as_tensor().clone();
        self.vars.lock().expect("random backend").push((name.to_string(), v));
        Ok(t)
    }
}

struct SharedRandom(std::sync::Arc<RandomBackend>);

impl SimpleBackend for SharedRandom {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.make(s, name, dtype, dev).map_err(candle_core::Error::wrap)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights: '{name}' was asked for without a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}
