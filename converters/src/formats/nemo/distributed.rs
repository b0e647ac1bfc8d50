//! Writing the `model_weights/` Megatron-core distributed checkpoint (formats.md §1.6): what
//! NeMo `save_to` writes for an mcore GPT model, in either backend.
//!
//! The caller (which knows the model: `convert::llama::dist_weights`) hands over each global
//! array as its grid of chunks, every chunk a lazy tensor (usually one rank's stored tensor, or a
//! zero-copy GLU half of it). This module knows only the containers:
//!
//! * zarr (§1.6.1, NeMo 1.21–1.23): one zarr v2 array directory per key, a `.zarray` exactly as
//!   zarr 2.x serialises it, raw little-endian C-order chunk files named by grid coordinates, one
//!   `torch.save(None)` file per ShardedObject (Transformer Engine's `_extra_state` with no FP8
//!   state);
//! * torch_dist (§1.6.2, NeMo from 2024-08): one `__0_0.distcp` file of items, each chunk a
//!   `torch.save(chunk)` zip and each ShardedObject `torch.save([None])` (Megatron's
//!   `_mcore_to_torch_sharded_object` wraps the object in a list, its save planner writes the
//!   bytes untouched, its loader unwraps the list), indexed by a `.metadata` pickle of
//!   `torch.distributed.checkpoint.metadata.Metadata` built here as pickle values.
//!
//! Both get `common.pt` (`torch.save({})`) and `metadata.json`. Chunks are streamed into their
//! members like any tensor, so memory stays bounded by one chunk.

use crate::checkpoint::TensorEntry;
use crate::error::{Error, IoContext, Result};
use crate::formats::pickle::Value;
use crate::formats::torch_zip;
use crate::transforms::advance;
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
    /// ShardedObject keys (`<module>._extra_state/shard_<layer>_<layers>`), each holding `None`:
    /// what Transformer Engine stores without FP8 state, and what its `set_extra_state` ignores
    /// (zarr: a `torch.save(None)` file; torch_dist: a `torch.save([None])` item).
    pub objects: Vec<String>,
}

/// The storage backend of a distributed checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DistBackend {
    /// Zarr v2 arrays (formats.md §1.6.1).
    Zarr,
    /// torch.distributed.checkpoint `.metadata` + `.distcp` (formats.md §1.6.2).
    TorchDist,
}

/// A member of `model_weights/` (path relative to it) and what it holds.
pub(super) enum DistMember<'a> {
    /// Small metadata, built here.
    Bytes(String, Vec<u8>),
    /// A chunk file: the chunk's bytes, streamed.
    Chunk(String, &'a str, &'a TensorEntry),
    /// A `.distcp` file: its items back to back, `len` bytes in all.
    Items(String, Vec<DistItem<'a>>, u64),
}

/// One item of a `.distcp` file.
pub(super) enum DistItem<'a> {
    /// Bytes built here (a ShardedObject's payload).
    Bytes(Vec<u8>),
    /// `torch.save(chunk)` of a chunk of array `key` (shaped as the chunk), `len` bytes.
    Tensor { key: &'a str, chunk: TensorEntry, len: u64 },
}

/// Write `items` back to back into `file` from byte `base`; returns the bytes written.
pub(super) fn write_distcp(
    items: &[DistItem<'_>],
    file: &std::fs::File,
    base: u64,
    dest: &Path,
) -> Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut at = base;
    for item in items {
        match item {
            DistItem::Bytes(b) => {
                file.write_all_at(b, at).at(dest)?;
                at += b.len() as u64;
            }
            DistItem::Tensor { key, chunk, len } => {
                let wrote = torch_zip::write_tensor_at(key, chunk, file, at, "archive", dest)?;
                if wrote != *len {
                    return Err(Error::invalid(
                        dest,
                        format!("a chunk of '{key}' took {wrote} bytes, {len} were planned"),
                    ));
                }
                at += len;
            }
        }
    }
    Ok(at - base)
}

/// The members of `weights` in `backend`, checked first (see [`zarr_members`]): Megatron's
/// `metadata.json`, `common.pt` (`torch.save({})`: a GPT model's weights have no common part),
/// then the backend's own.
pub(super) fn members<'a>(
    weights: &'a DistWeights,
    backend: DistBackend,
    dest: &Path,
) -> Result<Vec<DistMember<'a>>> {
    let name = match backend {
        DistBackend::Zarr => "zarr",
        DistBackend::TorchDist => "torch_dist",
    };
    let config = format!(
        r#"{{"sharded_backend": "{name}", "sharded_backend_version": 1, "common_backend": "torch", "common_backend_version": 1}}"#
    );
    let mut out = vec![
        DistMember::Bytes("metadata.json".into(), config.into_bytes()),
        DistMember::Bytes("common.pt".into(), torch_zip::save_plain(&Value::Dict(Vec::new()), "common")?),
    ];
    out.extend(match backend {
        DistBackend::Zarr => zarr_members(weights, dest)?,
        DistBackend::TorchDist => torch_dist_members(weights, dest)?,
    });
    Ok(out)
}

/// The file every item goes into (one writer, as `FileSystemWriter(thread_count=1)` names it).
const DISTCP: &str = "__0_0.distcp";

/// The torch_dist members: `.metadata` and one `.distcp`.
fn torch_dist_members<'a>(weights: &'a DistWeights, dest: &Path) -> Result<Vec<DistMember<'a>>> {
    const MD: &str = "torch.distributed.checkpoint.metadata";
    // `cls.__new__(cls)` then `BUILD` with `state`: how pickle restores these dataclasses.
    let new = |module: &str, class: &str, state: Option<Value>| Value::Object {
        class: Box::new(Value::global(module, class)),
        args: Box::new(Value::Tuple(Vec::new())),
        kwargs: None,
        state: state.map(Box::new),
    };
    let object = |class: &str, state: Option<Value>| new(MD, class, state);
    let fields = |pairs: Vec<(&str, Value)>| {
        Value::Dict(pairs.into_iter().map(|(k, v)| (Value::Str(k.into()), v)).collect())
    };
    let size = |dims: &[usize]| {
        let dims = dims.iter().map(|&d| Value::Int(d as i64)).collect();
        Value::call(Value::global("torch", "Size"), vec![Value::Tuple(dims)])
    };
    let storage_info = |offset: u64, length: u64| {
        let state = fields(vec![
            ("relative_path", Value::Str(DISTCP.into())),
            ("offset", Value::Int(offset as i64)),
            ("length", Value::Int(length as i64)),
        ]);
        new("torch.distributed.checkpoint.filesystem", "_StorageInfo", Some(state))
    };
    let mut items = Vec::new();
    let (mut sdm, mut planner, mut storage) = (Vec::new(), Vec::new(), Vec::new());
    let mut at = 0u64;
    let mut seen = std::collections::HashSet::new();
    // A ShardedObject: Megatron's torch_dist strategy stores `torch.save([obj])` (a one-element
    // list, which its loader unpacks after DCP's `torch.load`) and its save planner writes those
    // bytes as they are.
    let payload = torch_zip::save_plain(&Value::List(vec![Value::None]), "archive")?;
    for key in &weights.objects {
        if key.is_empty() || !seen.insert(key.as_str()) {
            return Err(Error::invalid(dest, format!("object key '{key}' is empty or listed twice")));
        }
        let len = payload.len() as u64;
        sdm.push((Value::Str(key.clone()), object("BytesStorageMetadata", None)));
        planner.push((Value::Str(key.clone()), Value::Tuple(vec![Value::Str(key.clone())])));
        let index = object(
            "MetadataIndex",
            Some(fields(vec![("fqn", Value::Str(key.clone())), ("index", Value::None)])),
        );
        storage.push((index, storage_info(at, len)));
        items.push(DistItem::Bytes(payload.clone()));
        at += len;
    }
    for a in &weights.arrays {
        if a.key.is_empty() || !seen.insert(a.key.as_str()) {
            return Err(Error::invalid(dest, format!("array key '{}' is empty or listed twice", a.key)));
        }
        let grid = check_grid(a, dest)?;
        let mut chunks = Vec::with_capacity(a.chunks.len());
        let mut coord = vec![0usize; grid.len()];
        for (i, c) in a.chunks.iter().enumerate() {
            let offsets: Vec<usize> = coord.iter().zip(&a.chunk).map(|(g, n)| g * n).collect();
            let chunk = TensorEntry { shape: a.chunk.clone(), ..c.clone() };
            let len = torch_zip::tensor_encoded_len(&a.key, &chunk, "archive")?;
            chunks.push(object(
                "ChunkStorageMetadata",
                Some(fields(vec![("offsets", size(&offsets)), ("sizes", size(&a.chunk))])),
            ));
            let index = object(
                "MetadataIndex",
                Some(fields(vec![
                    ("fqn", Value::Str(a.key.clone())),
                    ("index", Value::Int(i as i64)),
                    ("offset", size(&offsets)),
                ])),
            );
            storage.push((index, storage_info(at, len)));
            items.push(DistItem::Tensor { key: &a.key, chunk, len });
            at += len;
            advance(&mut coord, &grid);
        }
        // TensorProperties pickles its fields as a tuple (torch.memory_format cannot be
        // pickled); the 5-field form every torch since 2.0 reads.
        let properties = object(
            "TensorProperties",
            Some(Value::Tuple(vec![
                Value::global("torch", a.dtype.torch_name()),
                Value::call(
                    Value::global("torch.serialization", "_get_layout"),
                    vec![Value::Str("torch.strided".into())],
                ),
                Value::Bool(false),
                Value::call(Value::global(MD, "_MEM_FORMAT_ENCODING"), vec![Value::Int(0)]),
                Value::Bool(false),
            ])),
        );
        let meta = object(
            "TensorStorageMetadata",
            Some(fields(vec![
                ("properties", properties),
                ("size", size(&a.shape)),
                ("chunks", Value::List(chunks)),
            ])),
        );
        sdm.push((Value::Str(a.key.clone()), meta));
        planner.push((Value::Str(a.key.clone()), Value::Tuple(vec![Value::Str(a.key.clone())])));
    }
    let metadata = object(
        "Metadata",
        Some(fields(vec![
            ("state_dict_metadata", Value::Dict(sdm)),
            ("planner_data", Value::Dict(planner)),
            ("storage_data", Value::Dict(storage)),
            // Megatron's save planner records tensor reformulations here; none for weights.
            ("mcore_data", Value::Dict(Vec::new())),
        ])),
    );
    Ok(vec![
        DistMember::Bytes(".metadata".into(), crate::formats::pickle::dump(&metadata, dest)?),
        DistMember::Items(DISTCP.into(), items, at),
    ])
}

/// The zarr members of `weights`, checked first: every key a safe single path component,
/// unique, chunks that tile their array with the array's dtype.
fn zarr_members<'a>(weights: &'a DistWeights, dest: &Path) -> Result<Vec<DistMember<'a>>> {
    let mut out = Vec::new();
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
        members(&w, DistBackend::Zarr, Path::new("out.nemo")).err().map(|e| e.to_string()).unwrap_or_default()
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
        let names: Vec<String> = members(&w, DistBackend::Zarr, Path::new("o"))
            .unwrap()
            .into_iter()
            .map(|m| match m {
                DistMember::Bytes(n, _) | DistMember::Chunk(n, _, _) | DistMember::Items(n, _, _) => n,
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
    fn torch_dist_indexes_every_item_in_one_distcp() {
        let w = DistWeights {
            arrays: vec![array("w", &[2, 4], &[1, 2], (0..4).map(|_| chunk(DType::BF16, &[2])).collect())],
            objects: vec!["m._extra_state/shard_0_2".into(), "m._extra_state/shard_1_2".into()],
        };
        let members = members(&w, DistBackend::TorchDist, Path::new("o")).unwrap();
        let names: Vec<&str> = members
            .iter()
            .map(|m| match m {
                DistMember::Bytes(n, _) | DistMember::Chunk(n, _, _) | DistMember::Items(n, _, _) => {
                    n.as_str()
                }
            })
            .collect();
        assert_eq!(names, ["metadata.json", "common.pt", ".metadata", "__0_0.distcp"]);
        let DistMember::Items(_, items, len) = &members[3] else { panic!("no .distcp") };
        assert_eq!(items.len(), 2 + 4, "one item per object and per chunk");
        let sum: u64 = items
            .iter()
            .map(|i| match i {
                DistItem::Bytes(b) => b.len() as u64,
                DistItem::Tensor { len, chunk, .. } => {
                    assert_eq!(chunk.shape, [1, 2], "chunks are saved with the chunk shape");
                    *len
                }
            })
            .sum();
        assert_eq!(sum, *len);
        // The index decodes under the allow-list our reader uses for NeMo's own files.
        let DistMember::Bytes(_, pickle) = &members[2] else { panic!("no .metadata") };
        let v = crate::formats::pickle::load(
            pickle,
            crate::formats::pickle::AllowList::DistMetadata,
            Path::new("m"),
        );
        assert!(v.is_ok(), "{v:?}");
    }

    /// Writes the torch_dist fuzz seed `fuzz/seeds/tar/torch_dist.nemo` (a few KB: the torch_dist
    /// reader's `.metadata` decoding, chunk tiling and `.distcp` zips get a valid starting point).
    /// Run `cargo test -p shardsmith-converters write_torch_dist_fuzz_seed -- --ignored`.
    #[test]
    #[ignore = "writes a committed fuzz seed"]
    fn write_torch_dist_fuzz_seed() {
        use crate::checkpoint::{Checkpoint, Flavour, Meta, ModelConfig, NemoLayout, Parallelism};
        let bytes = |n: usize| -> Vec<u8> { (0..n as u8).collect() };
        let entry = |dtype: DType, shape: &[usize]| {
            let n = shape.iter().product::<usize>() * dtype.size();
            TensorEntry::new(dtype, shape.to_vec(), ByteSource::owned(bytes(n)), Arc::from(Path::new("seed")))
        };
        let weights = DistWeights {
            arrays: vec![
                array("w", &[2, 2, 2], &[1, 1, 2], (0..4).map(|_| entry(DType::BF16, &[2])).collect()),
                DistArray {
                    key: "n".into(),
                    dtype: DType::F32,
                    shape: vec![3],
                    chunk: vec![3],
                    chunks: vec![entry(DType::F32, &[3])],
                },
            ],
            objects: vec!["w._extra_state/shard_0_2".into()],
        };
        let yaml = "mcore_gpt: true\ntensor_model_parallel_size: 1\npipeline_model_parallel_size: 1\n";
        let meta = Meta {
            path: "seed".into(),
            flavour: Flavour::Nemo { layout: NemoLayout::Distributed, gzip: false, extracted: false },
            parallel: Parallelism::default(),
            config: Some(ModelConfig::NemoYaml(
                crate::formats::nemo::NemoConfig::parse(yaml.into(), Path::new("y")).unwrap(),
            )),
            artifacts: vec![],
        };
        let dest = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/tar/torch_dist.nemo");
        let opts = super::super::WriteOptions { overwrite: true, ..Default::default() };
        super::super::write_distributed(
            &Checkpoint { meta, shards: vec![] },
            &weights,
            DistBackend::TorchDist,
            &dest,
            &opts,
        )
        .unwrap();
        let back = crate::formats::nemo::read(&dest).unwrap();
        assert_eq!(back.shards[0].tensors.len(), 2);
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
