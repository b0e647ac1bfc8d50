//! The zarr backend of the `model_weights/` Megatron-core distributed checkpoint (formats.md
//! §1.6.1, §8.3); [`super::torch_dist`] reads `metadata.json` and dispatches here or to the
//! torch_dist backend.
//!
//! One zarr v2 array directory per global key, each a `.zarray` JSON plus uncompressed
//! little-endian C-order chunk files named by grid coordinates. Each array becomes one lazy
//! tensor of its global (layer-stacked) shape; a single-chunk array is a zero-copy range, a
//! chunked one is assembled from its chunks when its bytes are asked for. Object directories
//! (`shard_*.pt`, Transformer-Engine `_extra_state`), `common.pt` and zarr group metadata are not
//! tensors and are skipped.

use super::Store;
use crate::checkpoint::{ByteSource, TensorEntry, TensorMap};
use crate::error::{Error, Result};
use crate::transforms::{advance, gather_boxes, Placed};
use crate::DType;
use serde::Deserialize;

/// `.zarray` fields this reader acts on; anything else is ignored.
#[derive(Deserialize)]
struct ZArray {
    zarr_format: u64,
    shape: Vec<usize>,
    chunks: Vec<usize>,
    dtype: String,
    #[serde(default)]
    compressor: serde_json::Value,
    #[serde(default)]
    filters: serde_json::Value,
    #[serde(default = "c_order")]
    order: String,
    #[serde(default)]
    dimension_separator: Option<String>,
}

fn c_order() -> String {
    "C".into()
}

/// Read the zarr distributed checkpoint under directory `dir` of `store`, whose `metadata.json`
/// [`super::torch_dist::backend`] has checked.
pub(super) fn read(store: &Store, dir: &str) -> Result<TensorMap> {
    let prefix = format!("{dir}/");
    let mut tensors = TensorMap::new();
    for name in store.files.keys() {
        let Some(key) = name.strip_prefix(&prefix).and_then(|r| r.strip_suffix("/.zarray")) else { continue };
        if key.contains('/') {
            continue; // nested groups are not part of Megatron's layout
        }
        let (dtype, shape, source) = array(store, &format!("{prefix}{key}"))?;
        let origin = store.origin(&format!("{prefix}{key}"));
        tensors.insert(key.to_string(), TensorEntry::new(dtype, shape, source, origin));
    }
    Ok(tensors)
}

fn dtype_of(s: &str) -> Option<DType> {
    Some(match s {
        // Megatron writes bfloat16 arrays with this literal instead of numpy's "<V2".
        "bfloat16" => DType::BF16,
        "<f8" => DType::F64,
        "<f4" => DType::F32,
        "<f2" => DType::F16,
        "<i8" => DType::I64,
        "<i4" => DType::I32,
        "<i2" => DType::I16,
        "|i1" | "<i1" => DType::I8,
        "|u1" | "<u1" => DType::U8,
        "|b1" | "<b1" => DType::Bool,
        _ => return None,
    })
}

/// Index one array directory `dir`.
fn array(store: &Store, dir: &str) -> Result<(DType, Vec<usize>, ByteSource)> {
    let zname = format!("{dir}/.zarray");
    let origin = store.origin(&zname);
    let bad = |detail: String| Error::malformed(&*origin, "zarr", detail);
    let z: ZArray =
        serde_json::from_slice(&store.source(&zname)?.bytes()?).map_err(|e| bad(e.to_string()))?;
    if z.zarr_format != 2 {
        return Err(bad(format!("zarr_format {} (only 2 is supported)", z.zarr_format)));
    }
    if !z.compressor.is_null() {
        return Err(bad(format!("compressor {} (Megatron writes uncompressed arrays)", z.compressor)));
    }
    if !(z.filters.is_null() || z.filters.as_array().is_some_and(|f| f.is_empty())) {
        return Err(bad(format!("filters {} are not supported", z.filters)));
    }
    if z.order != "C" {
        return Err(bad(format!("order '{}' (only C order is supported)", z.order)));
    }
    let dtype = dtype_of(&z.dtype).ok_or_else(|| Error::UnsupportedDtype {
        path: origin.to_path_buf(),
        tensor: dir.to_string(),
        dtype: z.dtype.clone(),
    })?;
    let sep = z.dimension_separator.as_deref().unwrap_or(".");
    if sep != "." && sep != "/" {
        return Err(bad(format!("dimension_separator '{sep}'")));
    }
    let (shape, chunks) = (z.shape, z.chunks);
    if chunks.len() != shape.len() || chunks.contains(&0) {
        return Err(bad(format!("chunks {chunks:?} do not fit shape {shape:?}")));
    }
    let too_big = || bad(format!("shape {shape:?} / chunks {chunks:?} overflow"));
    let grid: Vec<usize> = shape.iter().zip(&chunks).map(|(s, c)| s.div_ceil(*c)).collect();
    let chunk_bytes = checked_product(&chunks, dtype.size()).ok_or_else(too_big)?;
    checked_product(&shape, dtype.size()).ok_or_else(too_big)?;
    let n_chunks = checked_product(&grid, 1).ok_or_else(too_big)?;
    // Every chunk is a file, so more chunks than files means some are missing; saying so before
    // enumerating keeps absurd shapes cheap.
    if n_chunks > store.files.len() {
        return Err(Error::missing(
            &*origin,
            format!("chunks: the array has {n_chunks}, the archive far fewer files"),
        ));
    }
    let mut sources = Vec::with_capacity(n_chunks);
    let mut coord = vec![0usize; grid.len()];
    for _ in 0..n_chunks {
        let key = if coord.is_empty() {
            "0".to_string()
        } else {
            coord.iter().map(usize::to_string).collect::<Vec<_>>().join(sep)
        };
        let name = format!("{dir}/{key}");
        let source = store.source(&name).map_err(|_| {
            Error::missing(&*origin, format!("chunk file '{key}' (Megatron writes every chunk)"))
        })?;
        if source.known_len() != Some(chunk_bytes) {
            let got = source.known_len().map_or("of unknown size".into(), |n| format!("{n} bytes"));
            return Err(bad(format!(
                "chunk '{key}' is {got}, expected {chunk_bytes} bytes ({dtype} {chunks:?}, uncompressed)"
            )));
        }
        sources.push(source);
        advance(&mut coord, &grid);
    }
    if shape == chunks {
        if let Some(only) = sources.pop() {
            return Ok((dtype, shape, only));
        }
    }
    // A plan over the chunk files, so that one layer of a stacked array reads only its chunks.
    let tensors: Vec<TensorEntry> =
        sources.iter().map(|s| TensorEntry::new(dtype, chunks.clone(), s.clone(), origin.clone())).collect();
    let mut placed = Vec::with_capacity(n_chunks);
    let mut coord = vec![0usize; grid.len()];
    for _ in 0..n_chunks {
        let offsets: Vec<usize> = coord.iter().zip(&chunks).map(|(g, c)| g * c).collect();
        let extent: Vec<usize> =
            offsets.iter().zip(&chunks).zip(&shape).map(|((o, c), s)| (*c).min(s - o)).collect();
        placed.push((offsets, extent));
        advance(&mut coord, &grid);
    }
    let boxes: Vec<Placed<'_>> = placed
        .iter()
        .zip(&tensors)
        .map(|((offsets, extent), tensor)| Placed { offsets, extent, storage: &chunks, tensor })
        .collect();
    if let Some(planned) = gather_boxes(dir, dtype, &shape, &boxes, origin.clone())? {
        return Ok((dtype, shape, planned.source));
    }
    let (s, c) = (shape.clone(), chunks);
    let source = ByteSource::derived(move || assemble(&s, &c, dtype.size(), &sources));
    Ok((dtype, shape, source))
}

fn checked_product(dims: &[usize], init: usize) -> Option<usize> {
    dims.iter().try_fold(init, |acc, &d| acc.checked_mul(d))
}

/// Place every chunk (in C-order grid order) into one C-order buffer of `shape`. Edge chunks are
/// stored full-size by zarr; only their in-bounds part is copied.
fn assemble(shape: &[usize], chunks: &[usize], elem: usize, sources: &[ByteSource]) -> Result<Vec<u8>> {
    let total: usize = shape.iter().product::<usize>() * elem;
    let mut out = vec![0u8; total];
    if total == 0 {
        return Ok(out);
    }
    let n = shape.len();
    let grid: Vec<usize> = shape.iter().zip(chunks).map(|(s, c)| s.div_ceil(*c)).collect();
    // Byte strides of the output and of one chunk.
    let stride = |dims: &[usize]| -> Vec<usize> {
        let mut st = vec![elem; n];
        for d in (0..n.saturating_sub(1)).rev() {
            st[d] = st[d + 1] * dims[d + 1];
        }
        st
    };
    let (out_stride, chunk_stride) = (stride(shape), stride(chunks));
    let mut g = vec![0usize; n];
    for src in sources {
        let bytes = src.bytes()?;
        let origin: Vec<usize> = (0..n).map(|d| g[d] * chunks[d]).collect();
        let extent: Vec<usize> = (0..n).map(|d| chunks[d].min(shape[d] - origin[d])).collect();
        if n == 0 {
            let piece =
                bytes.get(..elem).ok_or_else(|| Error::invalid("<zarr chunk>", "empty scalar chunk"))?;
            out.copy_from_slice(piece);
            break;
        }
        let outer = n - 1;
        let row = extent[outer] * elem;
        let rows: usize = extent[..outer].iter().product();
        // Odometer over every index of the chunk except the last (contiguous) axis.
        let mut i = vec![0usize; outer];
        for _ in 0..rows {
            let src_at: usize = (0..outer).map(|d| i[d] * chunk_stride[d]).sum();
            let dst_at: usize = (0..outer).map(|d| (origin[d] + i[d]) * out_stride[d]).sum::<usize>()
                + origin[outer] * out_stride[outer];
            let piece = bytes.get(src_at..src_at + row).ok_or_else(|| {
                Error::invalid(
                    "<zarr chunk>",
                    format!("chunk is {} bytes, too short for {chunks:?}", bytes.len()),
                )
            })?;
            out[dst_at..dst_at + row].copy_from_slice(piece);
            advance(&mut i, &extent[..outer]);
        }
        advance(&mut g, &grid);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assemble_places_chunks_including_edges() {
        // A 3x5 u8 array in 2x2 chunks: grid 2x3, edge chunks padded to full size.
        let shape = [3usize, 5];
        let chunks = [2usize, 2];
        let want: Vec<u8> = (0..15).collect();
        let mut sources = Vec::new();
        for gi in 0..2 {
            for gj in 0..3 {
                let mut c = vec![255u8; 4];
                for a in 0..2 {
                    for b in 0..2 {
                        let (r, col) = (gi * 2 + a, gj * 2 + b);
                        if r < 3 && col < 5 {
                            c[a * 2 + b] = want[r * 5 + col];
                        }
                    }
                }
                sources.push(ByteSource::owned(c));
            }
        }
        assert_eq!(assemble(&shape, &chunks, 1, &sources).unwrap(), want);
        // One dimension and a scalar.
        let s = [ByteSource::owned(vec![1u8, 2]), ByteSource::owned(vec![3u8, 0])];
        assert_eq!(assemble(&[3], &[2], 1, &s).unwrap(), vec![1, 2, 3]);
        assert_eq!(assemble(&[], &[], 2, &[ByteSource::owned(vec![7u8, 8])]).unwrap(), vec![7, 8]);
    }
}
