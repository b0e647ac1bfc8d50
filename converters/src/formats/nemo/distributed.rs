//! Writing the `model_weights/` Megatron-core distributed checkpoint (formats.md §1.6), zarr
//! backend (§1.6.1): what NeMo 1.21–1.23 `save_to` writes for an mcore GPT model.
//!
//! The caller (which knows the model: `convert::llama::dist_weights`) hands over each global
//! array as its grid of chunks, every chunk a lazy tensor (usually one rank's stored tensor, or a
//! zero-copy GLU half of it). This module knows only the container: one zarr v2 array directory
//! per key, a `.zarray` exactly as zarr 2.x serialises it, raw little-endian C-order chunk files
//! named by grid coordinates, one `torch.save(None)` file per ShardedObject (Transformer Engine's
//! `_extra_state` with no FP8 state), `common.pt` (`torch.save({})`) and `metadata.json`.
//! Chunks are streamed into their members like any tensor, so memory stays bounded by one chunk.

use crate::checkpoint::TensorEntry;
use crate::error::{Error, Result};
use crate::formats::pickle::Value;
use crate::formats::torch_zip;
use crate::DType;
use std::path::Path;

/// One global array to write: `shape` cut into chunks of `chunk` (dividing it exactly), the
/// chunks in C order of their grid coordinates.
#[derive(Clone, Debug)]
pub struct DistArray {
    /// The global key, e.g. `model.decoder.layers.self_attention.linear_qkv.weight`.
    pub key: String,
    /// Element type of every chunk.
    pub dtype: DType,
    /// Global shape (layers stacked on a leading axis).
    pub shape: Vec<usize>,
    /// Shape of one chunk.
    pub chunk: Vec<usize>,
    /// The chunks, grid coordinates in C order.
    pub chunks: Vec<TensorEntry>,
}

/// The weights of a distributed checkpoint.
#[derive(Clone, Debug, Default)]
pub struct DistWeights {
    /// Global arrays.
    pub arrays: Vec<DistArray>,
    /// ShardedObject keys (`<module>._extra_state/shard_<layer>_<layers>`), each written as
    /// `torch.save(None)`: what Transformer Engine stores without FP8 state, and what its
    /// `set_extra_state` ignores.
    pub objects: Vec<String>,
}

/// A member of `model_weights/` (path relative to it) and what it holds.
pub(super) enum DistMember<'a> {
    /// Small metadata, built here.
    Bytes(String, Vec<u8>),
    /// A chunk file: the chunk's bytes, streamed.
    Chunk(String, &'a str, &'a TensorEntry),
}

/// The `model_weights/metadata.json` of a zarr checkpoint (Megatron's `CheckpointingConfig`).
const ZARR_METADATA: &str = r#"{"sharded_backend": "zarr", "sharded_backend_version": 1, "common_backend": "torch", "common_backend_version": 1}"#;

/// The members of `weights` as a zarr distributed checkpoint, checked first: every key a safe
/// single path component, unique, chunks that tile their array with the array's dtype.
pub(super) fn zarr_members<'a>(weights: &'a DistWeights, dest: &Path) -> Result<Vec<DistMember<'a>>> {
    let mut out = vec![
        DistMember::Bytes("metadata.json".into(), ZARR_METADATA.as_bytes().to_vec()),
        DistMember::Bytes("common.pt".into(), torch_zip::save_plain(&Value::Dict(Vec::new()), "common")?),
    ];
    let mut seen = std::collections::HashSet::new();
    for a in &weights.arrays {
        check_key(&a.key, dest)?;
        if !seen.insert(a.key.as_str()) {
            return Err(Error::invalid(dest, format!("array '{}' is listed twice", a.key)));
        }
        let grid = check_grid(a, dest)?;
        out.push(DistMember::Bytes(format!("{}/.zarray", a.key), zarray(a)));
        let mut coord = vec![0usize; grid.len()];
        for chunk in &a.chunks {
            let name = if coord.is_empty() {
                "0".to_string()
            } else {
                coord.iter().map(usize::to_string).collect::<Vec<_>>().join(".")
            };
            out.push(DistMember::Chunk(format!("{}/{name}", a.key), &a.key, chunk));
            advance(&mut coord, &grid);
        }
    }
    let none = torch_zip::save_plain(&Value::None, "archive")?;
    for key in &weights.objects {
        let (dir, file) = key
            .split_once('/')
            .filter(|(_, f)| !f.contains('/'))
            .ok_or_else(|| Error::invalid(dest, format!("object key '{key}' is not '<module>/<shard>'")))?;
        check_key(dir, dest)?;
        check_key(file, dest)?;
        if seen.contains(dir) {
            return Err(Error::invalid(dest, format!("object '{key}' lies inside array '{dir}'")));
        }
        out.push(DistMember::Bytes(format!("{key}.pt"), none.clone()));
    }
    Ok(out)
}

/// A key must be one path component that names nothing else in the directory.
fn check_key(key: &str, dest: &Path) -> Result<()> {
    let reserved = ["metadata.json", "common.pt", ".metadata"];
    if key.is_empty() || key.starts_with('.') || key.contains(['/', '\\', '\0']) || reserved.contains(&key) {
        return Err(Error::invalid(
            dest,
            format!("'{key}' cannot name a member of a distributed checkpoint"),
        ));
    }
    Ok(())
}

/// The chunk grid of `a`, after checking that its chunks tile it.
fn check_grid(a: &DistArray, dest: &Path) -> Result<Vec<usize>> {
    let bad = |detail: String| Error::invalid(dest, format!("array '{}': {detail}", a.key));
    if a.chunk.len() != a.shape.len()
        || a.chunk.contains(&0)
        || a.shape.iter().zip(&a.chunk).any(|(s, c)| s % c != 0)
    {
        return Err(bad(format!("chunks {:?} do not divide shape {:?}", a.chunk, a.shape)));
    }
    let grid: Vec<usize> = a.shape.iter().zip(&a.chunk).map(|(s, c)| s / c).collect();
    let n: usize = grid.iter().product();
    if a.chunks.len() != n {
        return Err(bad(format!("{} chunks given, the grid {grid:?} has {n}", a.chunks.len())));
    }
    // A chunk may carry the array's shape with the unit axes dropped (one layer of a stacked
    // array), so element counts are compared, not shapes.
    let numel: usize = a.chunk.iter().product();
    for (i, c) in a.chunks.iter().enumerate() {
        if c.dtype != a.dtype || c.numel() != numel {
            return Err(bad(format!(
                "chunk {i} is {} {:?}, expected {} with {numel} elements ({:?})",
                c.dtype, c.shape, a.dtype, a.chunk
            )));
        }
    }
    Ok(grid)
}

/// The numpy type string zarr records (Megatron writes bfloat16 as the literal `bfloat16`).
fn zarr_dtype(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bfloat16",
        DType::F64 => "<f8",
        DType::F32 => "<f4",
        DType::F16 => "<f2",
        DType::I64 => "<i8",
        DType::I32 => "<i4",
        DType::I16 => "<i2",
        DType::I8 => "|i1",
        DType::U8 => "|u1",
        DType::Bool => "|b1",
    }
}

/// `.zarray` as zarr 2.x writes it: keys sorted, four-space indent, no trailing newline.
fn zarray(a: &DistArray) -> Vec<u8> {
    let v = serde_json::json!({
        "chunks": a.chunk,
        "compressor": null,
        "dtype": zarr_dtype(a.dtype),
        "fill_value": null,
        "filters": null,
        "order": "C",
        "shape": a.shape,
        "zarr_format": 2,
    });
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    serde::Serialize::serialize(&v, &mut ser).expect("JSON values serialise");
    out
}

/// Step a C-order odometer over `grid`.
fn advance(coord: &mut [usize], grid: &[usize]) {
    for d in (0..coord.len()).rev() {
        coord[d] += 1;
        if coord[d] < grid[d] {
            return;
        }
        coord[d] = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::ByteSource;
    use std::sync::Arc;

    fn chunk(dtype: DType, shape: &[usize]) -> TensorEntry {
        let n = shape.iter().product::<usize>() * dtype.size();
        TensorEntry::new(dtype, shape.to_vec(), ByteSource::owned(vec![0u8; n]), Arc::from(Path::new("t")))
    }

    fn array(key: &str, shape: &[usize], chunk_shape: &[usize], chunks: Vec<TensorEntry>) -> DistArray {
        DistArray {
            key: key.into(),
            dtype: DType::BF16,
            shape: shape.into(),
            chunk: chunk_shape.into(),
            chunks,
        }
    }

    fn members_err(arrays: Vec<DistArray>, objects: &[&str]) -> String {
        let w = DistWeights { arrays, objects: objects.iter().map(|s| s.to_string()).collect() };
        zarr_members(&w, Path::new("out.nemo")).err().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn zarray_is_what_zarr_2_writes() {
        let a = array("w", &[2, 4], &[1, 4], vec![]);
        let want = "{\n    \"chunks\": [\n        1,\n        4\n    ],\n    \"compressor\": null,\n    \
                    \"dtype\": \"bfloat16\",\n    \"fill_value\": null,\n    \"filters\": null,\n    \
                    \"order\": \"C\",\n    \"shape\": [\n        2,\n        4\n    ],\n    \"zarr_format\": 2\n}";
        assert_eq!(String::from_utf8(zarray(&a)).unwrap(), want);
    }

    #[test]
    fn members_are_named_by_grid_coordinates() {
        let w = DistWeights {
            arrays: vec![array("w", &[2, 4], &[1, 2], (0..4).map(|_| chunk(DType::BF16, &[2])).collect())],
            objects: vec!["m._extra_state/shard_0_2".into()],
        };
        let names: Vec<String> = zarr_members(&w, Path::new("o"))
            .unwrap()
            .into_iter()
            .map(|m| match m {
                DistMember::Bytes(n, _) | DistMember::Chunk(n, _, _) => n,
            })
            .collect();
        assert_eq!(
            names,
            [
                "metadata.json",
                "common.pt",
                "w/.zarray",
                "w/0.0",
                "w/0.1",
                "w/1.0",
                "w/1.1",
                "m._extra_state/shard_0_2.pt"
            ]
        );
    }

    #[test]
    fn chunks_that_do_not_tile_the_array_are_named() {
        let two = || (0..2).map(|_| chunk(DType::BF16, &[1, 2])).collect::<Vec<_>>();
        let err = members_err(vec![array("w", &[2, 3], &[1, 2], two())], &[]);
        assert!(err.contains("array 'w': chunks [1, 2] do not divide shape [2, 3]"), "{err}");
        let err = members_err(vec![array("w", &[2, 4], &[1, 2], two())], &[]);
        assert!(err.contains("2 chunks given, the grid [2, 2] has 4"), "{err}");
        let mut odd = two();
        odd[1] = chunk(DType::F32, &[1, 2]);
        let err = members_err(vec![array("w", &[2, 2], &[1, 2], odd)], &[]);
        assert!(err.contains("chunk 1 is f32 [1, 2], expected bf16"), "{err}");
    }

    #[test]
    fn unsafe_or_clashing_keys_are_refused() {
        let one = || vec![chunk(DType::BF16, &[2])];
        for key in ["../x", "a/b", "", ".zattrs", "metadata.json", "common.pt"] {
            let err = members_err(vec![array(key, &[2], &[2], one())], &[]);
            assert!(err.contains("cannot name a member"), "{key}: {err}");
        }
        let err = members_err(vec![array("w", &[2], &[2], one()), array("w", &[2], &[2], one())], &[]);
        assert!(err.contains("listed twice"), "{err}");
        let err = members_err(vec![array("w", &[2], &[2], one())], &["w/shard_0_1"]);
        assert!(err.contains("lies inside array 'w'"), "{err}");
        let err = members_err(vec![], &["noslash"]);
        assert!(err.contains("is not '<module>/<shard>'"), "{err}");
    }
}
