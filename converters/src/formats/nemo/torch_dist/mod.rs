//! The torch_dist backend of the `model_weights/` distributed checkpoint (formats.md §1.6.2), and
//! the choice between it and zarr.
//!
//! `.metadata` is a pickle of `torch.distributed.checkpoint.metadata.Metadata`, decoded by the
//! restricted VM under [`AllowList::DistMetadata`] (executing nothing). For every tensor it gives
//! the global shape and dtype and the chunks (offsets, sizes) that cover it; `storage_data` says
//! where each chunk lives: a byte range of a `__<rank>_<i>.distcp` file holding a complete
//! `torch.save(tensor)` zip. Those embedded zips are indexed in place, inside the mapping of the
//! `.distcp` file, itself a range of the `.nemo` tar mapping, so nothing is copied or extracted.
//!
//! Each global tensor becomes one lazy entry. A tensor stored as a single contiguous chunk is a
//! zero-copy range; otherwise its chunks are placed at their offsets when its bytes are asked
//! for. The chunks must tile the global shape exactly (checked at open: in bounds, no overlap,
//! volumes adding up), so no element is ever left unset or written twice. Bytes items
//! (Megatron ShardedObjects such as Transformer Engine `_extra_state`) are not tensors and are
//! skipped.
//!
//! The embedded zips hold a bare tensor, not a state dict: each is read by
//! [`torch_zip::read_mapped_tensor`], which decodes it (strided views, big-endian files) exactly
//! as a state-dict entry. [`metadata`] decodes `.metadata` and checks the chunk layout.

mod metadata;

use self::metadata::{check_tiling, ChunkMeta, Index, Location, TensorMeta};
use super::{Blob, Store};
use crate::checkpoint::{ByteSource, TensorEntry, TensorMap};
use crate::error::{Error, Result};
use crate::formats::pickle::{self, AllowList};
use crate::formats::torch_zip;
use crate::transforms::{advance, gather_boxes, Placed};
use memmap2::Mmap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The index pickle inside the directory.
const METADATA: &str = ".metadata";

/// The storage backend a `model_weights/metadata.json` declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Backend {
    /// Zarr v2 arrays (formats.md §1.6.1).
    Zarr,
    /// torch.distributed.checkpoint `.metadata` + `.distcp` files (formats.md §1.6.2).
    TorchDist,
}

/// Which backend the distributed checkpoint under `dir` uses, from its `metadata.json`.
pub(super) fn backend(store: &Store, dir: &str) -> Result<Backend> {
    let name = format!("{dir}/metadata.json");
    if !store.files.contains_key(&name) {
        return Err(Error::missing(
            &store.root,
            format!("member {name} ({dir}/ is not a Megatron-core distributed checkpoint without it)"),
        ));
    }
    let origin = store.origin(&name);
    let meta: serde_json::Value = serde_json::from_slice(&store.source(&name)?.bytes()?)
        .map_err(|e| Error::malformed(&*origin, "json", e.to_string()))?;
    match meta.get("sharded_backend").and_then(|v| v.as_str()) {
        Some("zarr") => Ok(Backend::Zarr),
        Some("torch_dist") => Ok(Backend::TorchDist),
        other => Err(Error::invalid(
            &*origin,
            format!("unknown sharded_backend {other:?} (supported: zarr, torch_dist)"),
        )),
    }
}

/// Read the torch_dist checkpoint under directory `dir` of `store`: every tensor item of its
/// `.metadata`, lazily.
pub(super) fn read(store: &Store, dir: &str) -> Result<TensorMap> {
    let meta_name = format!("{dir}/{METADATA}");
    if !store.files.contains_key(&meta_name) {
        return Err(Error::missing(
            &store.root,
            format!("member {meta_name} (the index of a torch_dist distributed checkpoint)"),
        ));
    }
    let meta_origin = store.origin(&meta_name);
    let bytes = store.source(&meta_name)?.bytes()?.into_owned();
    let root = pickle::load(&bytes, AllowList::DistMetadata, &meta_origin)?;
    let index = Index::decode(&root, &meta_origin)?;

    let mut files = Files { store, dir, maps: HashMap::new() };
    let mut tensors = TensorMap::new();
    for t in index.tensors {
        let bad = |detail: String| Error::invalid(&*meta_origin, format!("tensor '{}': {detail}", t.key));
        check_tiling(&t.shape, &t.chunks).map_err(bad)?;
        let mut pieces = Vec::with_capacity(t.chunks.len());
        for c in t.chunks.iter().filter(|c| c.volume() > 0) {
            let at = index.storage.get(&(t.key.clone(), c.offsets.clone())).ok_or_else(|| {
                Error::missing(
                    &*meta_origin,
                    format!("storage_data entry for chunk at offsets {:?} of tensor '{}'", c.offsets, t.key),
                )
            })?;
            pieces.push(files.piece(&t, c, at, &meta_origin)?);
        }
        let source = lazy_tensor(&t, pieces, meta_origin.clone());
        tensors.insert(t.key, TensorEntry::new(t.dtype, t.shape, source, meta_origin.clone()));
    }
    Ok(tensors)
}

// ---------------------------------------------------------------------------------------------
// `.distcp` files and the tensors embedded in them
// ---------------------------------------------------------------------------------------------

/// One chunk, located and checked against the metadata: its stored tensor (little-endian,
/// C-order bytes of `sizes`, possibly with size-1 dimensions added or dropped) and where it goes.
#[derive(Clone)]
struct Piece {
    tensor: TensorEntry,
    offsets: Vec<usize>,
    sizes: Vec<usize>,
}

/// The `.distcp` files named by `.metadata`, each mapped once.
struct Files<'a> {
    store: &'a Store,
    dir: &'a str,
    maps: HashMap<String, (Arc<Mmap>, usize, usize)>,
}

impl Files<'_> {
    /// The mapping, start and length of the `.distcp` file `rel`.
    fn get(&mut self, rel: &str, meta_origin: &Path) -> Result<(Arc<Mmap>, usize, usize)> {
        if let Some(m) = self.maps.get(rel) {
            return Ok(m.clone());
        }
        let safe = !rel.is_empty()
            && !rel.starts_with('/')
            && !rel.contains('\\')
            && rel.split('/').all(|p| !p.is_empty() && p != "." && p != "..");
        if !safe {
            return Err(Error::invalid(
                meta_origin,
                format!("storage file '{rel}' is not a plain path inside {}/", self.dir),
            ));
        }
        let name = format!("{}/{rel}", self.dir);
        let mapped = match self.store.files.get(&name) {
            Some(Blob::Range { map, offset, len }) => (map.clone(), *offset, *len),
            Some(Blob::File(path)) => {
                let map = crate::formats::map_file(path)?;
                let len = map.len();
                (map, 0, len)
            }
            None => {
                return Err(Error::missing(
                    &self.store.root,
                    format!("member {name} (holds chunks listed in {}/{METADATA})", self.dir),
                ))
            }
        };
        self.maps.insert(rel.to_string(), mapped.clone());
        Ok(mapped)
    }

    /// Locate chunk `c` of `t` stored at `at`, and check it against the metadata.
    fn piece(&mut self, t: &TensorMeta, c: &ChunkMeta, at: &Location, meta_origin: &Path) -> Result<Piece> {
        let (map, base, file_len) = self.get(&at.file, meta_origin)?;
        let file_origin = self.store.origin(&format!("{}/{}", self.dir, at.file));
        let end = at.offset.checked_add(at.length).filter(|&e| e <= file_len).ok_or_else(|| {
            Error::malformed(
                &*file_origin,
                "torch_dist",
                format!(
                    "chunk at offsets {:?} of tensor '{}' is stored at bytes {}..{}, past the end of \
                     the {file_len}-byte file (truncated?)",
                    c.offsets,
                    t.key,
                    at.offset,
                    at.offset as u128 + at.length as u128
                ),
            )
        })?;
        let origin: Arc<Path> =
            Arc::from(PathBuf::from(format!("{}@{}..{end}", file_origin.display(), at.offset)));
        let e = torch_zip::read_mapped_tensor(map, base + at.offset, at.length, origin.clone())?;
        let bad = |detail: String| {
            Error::invalid(
                &*origin,
                format!("chunk at offsets {:?} of tensor '{}': {detail}", c.offsets, t.key),
            )
        };
        if e.dtype != t.dtype {
            return Err(bad(format!("holds {} data, the metadata says {}", e.dtype, t.dtype)));
        }
        // Compare with size-1 dimensions dropped: a writer may add or drop the layer axis of a
        // one-layer chunk, which does not move any element.
        let squeeze = |shape: &[usize]| -> Vec<usize> { shape.iter().copied().filter(|&n| n != 1).collect() };
        if squeeze(&e.shape) != squeeze(&c.sizes) {
            return Err(bad(format!(
                "holds a tensor of shape {:?}, the metadata says {:?}",
                e.shape, c.sizes
            )));
        }
        // A DCP chunk is never a broadcast view (torch clones any chunk whose storage is not
        // exactly its own); refusing one keeps assembly bounded by the input's size.
        if e.nbytes() > at.length {
            return Err(bad(format!(
                "holds {} bytes of tensor data in {} bytes of file (a broadcast view)",
                e.nbytes(),
                at.length
            )));
        }
        Ok(Piece { tensor: e, offsets: c.offsets.clone(), sizes: c.sizes.clone() })
    }
}

// ---------------------------------------------------------------------------------------------
// Assembly
// ---------------------------------------------------------------------------------------------

/// The bytes of tensor `t`: the chunk's own source (a range of the file when it is contiguous)
/// for a single chunk, else a lazy assembly.
fn lazy_tensor(t: &TensorMeta, pieces: Vec<Piece>, origin: Arc<Path>) -> ByteSource {
    let esize = t.dtype.size();
    let nbytes = t.shape.iter().product::<usize>() * esize;
    if nbytes == 0 {
        return ByteSource::owned(Vec::new());
    }
    if let [only] = pieces.as_slice() {
        if only.sizes == t.shape {
            return only.tensor.source.clone();
        }
    }
    // A plan over the chunks, so that one layer of a stacked array reads only its chunks.
    let boxes: Vec<Placed<'_>> = pieces
        .iter()
        .map(|p| Placed { offsets: &p.offsets, extent: &p.sizes, storage: &p.sizes, tensor: &p.tensor })
        .collect();
    if let Ok(Some(planned)) = gather_boxes(&t.key, t.dtype, &t.shape, &boxes, origin.clone()) {
        return planned.source;
    }
    let (shape, key) = (t.shape.clone(), t.key.clone());
    ByteSource::derived(move || assemble(&shape, esize, &pieces, &origin, &key))
}

/// Place every piece at its offsets in one C-order buffer of `shape`. The pieces tile the shape
/// (checked when they were read), so every byte is written exactly once. Each piece's bytes are
/// produced (a strided or byte-swapped chunk is copied once) and placed one piece at a time.
fn assemble(shape: &[usize], esize: usize, pieces: &[Piece], origin: &Path, key: &str) -> Result<Vec<u8>> {
    let total = shape.iter().product::<usize>() * esize;
    let mut out = Vec::new();
    out.try_reserve_exact(total).map_err(|_| {
        Error::invalid(origin, format!("tensor '{key}': its {total} bytes cannot be allocated"))
    })?;
    out.resize(total, 0);
    let n = shape.len();
    let mut out_stride = vec![esize; n];
    for d in (0..n.saturating_sub(1)).rev() {
        out_stride[d] = out_stride[d + 1] * shape[d + 1];
    }
    for p in pieces {
        // Checked against dtype × the stored shape, which has the chunk's element count.
        let src = p.tensor.bytes(key)?;
        if n == 0 {
            out.copy_from_slice(&src);
            continue;
        }
        let last = n - 1;
        let row = p.sizes[last] * esize;
        let mut idx = vec![0usize; last];
        for chunk_row in src.chunks_exact(row) {
            let dst_at = (0..n)
                .map(|d| (p.offsets[d] + idx.get(d).copied().unwrap_or(0)) * out_stride[d])
                .sum::<usize>();
            out[dst_at..dst_at + row].copy_from_slice(chunk_row);
            // Next row: all but the last (contiguous) axis.
            advance(&mut idx, &p.sizes[..last]);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
