//! safetensors: `[u64 LE header length][JSON header][data]` (formats.md §8.1).
//!
//! Reading maps the file and validates the header with the `safetensors` crate (offsets must tile
//! the buffer exactly); every tensor is then a zero-copy range of the mapping. Writing builds the
//! header with the crate's own `Metadata` type, in the reference writer's order (descending dtype
//! alignment, then name), and streams tensor bytes one tensor at a time so memory stays bounded
//! by the largest tensor.

use crate::atomic::AtomicFile;
use crate::checkpoint::{ByteSource, Checkpoint, Flavour, Meta, Parallelism, TensorEntry, TensorMap};
use crate::error::{Error, IoContext, Result};
use crate::DType;
use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, Metadata, TensorInfo};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

/// A cheap content check for [`crate::formats::Format::detect`]: a plausible header length
/// followed by `{`.
pub fn looks_like(head: &[u8], file_len: u64) -> bool {
    let Some(len) = head.get(..8) else { return false };
    let n = u64::from_le_bytes(len.try_into().expect("8 bytes"));
    n >= 2 && n.saturating_add(8) <= file_len && head.get(8) == Some(&b'{')
}

/// Read one safetensors file as a single-rank checkpoint.
pub fn read_checkpoint(path: &Path) -> Result<Checkpoint> {
    let tensors = read_file(path)?;
    let meta = Meta {
        path: path.to_path_buf(),
        flavour: Flavour::SafetensorsFile,
        parallel: Parallelism::default(),
        config: None,
        artifacts: Vec::new(),
    };
    Ok(Checkpoint::single(meta, tensors))
}

/// Map `path` and index its tensors (in file order).
pub fn read_file(path: &Path) -> Result<TensorMap> {
    let map = super::map_file(path)?;
    let len = map.len();
    read_mapped(map, 0, len, Arc::from(path))
}

/// Index a safetensors image that occupies `[offset, offset + len)` of `map`.
pub fn read_mapped(map: Arc<Mmap>, offset: usize, len: usize, origin: Arc<Path>) -> Result<TensorMap> {
    let buf = map
        .get(offset..offset.saturating_add(len))
        .ok_or_else(|| Error::malformed(&*origin, "safetensors", "range lies outside the file"))?;
    let (header_len, metadata) = safetensors::SafeTensors::read_metadata(buf).map_err(|e| {
        Error::malformed(&*origin, "safetensors", explain_layout(buf).unwrap_or(e.to_string()))
    })?;
    let data_start = offset + 8 + header_len;
    let mut tensors = TensorMap::with_capacity(metadata.offset_keys().len());
    for name in metadata.offset_keys() {
        let info = metadata.info(&name).expect("name comes from the same header");
        let dtype = from_st(info.dtype).ok_or_else(|| Error::UnsupportedDtype {
            path: origin.to_path_buf(),
            tensor: name.clone(),
            dtype: format!("{:?}", info.dtype),
        })?;
        let (begin, end) = info.data_offsets;
        let entry = TensorEntry::new(
            dtype,
            info.shape.clone(),
            ByteSource::mapped(map.clone(), data_start + begin, end - begin),
            origin.clone(),
        );
        // read_metadata has checked sizes already; this keeps the invariant local and explicit.
        entry.check_len(&name, end - begin)?;
        tensors.insert(name, entry);
    }
    Ok(tensors)
}

/// The crate's layout errors name neither the tensor nor the sizes ("invalid shape, data type, or
/// offset for tensor", "incomplete metadata, file not fully covered"). For a header that parses,
/// say which tensor's byte range disagrees with its dtype × shape, or by how many bytes the file
/// is short (truncated) or long. `None` leaves the crate's message.
fn explain_layout(buf: &[u8]) -> Option<String> {
    let n = usize::try_from(u64::from_le_bytes(buf.get(..8)?.try_into().ok()?)).ok()?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(buf.get(8..8usize.checked_add(n)?)?).ok()?;
    let mut data_end = 0usize;
    for (name, value) in header.iter().filter(|(k, _)| *k != "__metadata__") {
        let info: TensorInfo = serde_json::from_value(value.clone()).ok()?;
        let (begin, end) = info.data_offsets;
        let bits = info.shape.iter().try_fold(info.dtype.bitsize(), |a, &d| a.checked_mul(d))?;
        if end < begin || end - begin != bits / 8 {
            return Some(format!(
                "tensor '{name}': {:?} {:?} needs {} bytes, but its data_offsets [{begin}, {end}] span {}",
                info.dtype,
                info.shape,
                bits / 8,
                end as i128 - begin as i128
            ));
        }
        data_end = data_end.max(end);
    }
    let want = 8usize.checked_add(n)?.checked_add(data_end)?;
    match buf.len().cmp(&want) {
        std::cmp::Ordering::Less => Some(format!(
            "the file is {} bytes but its header places tensor data up to byte {want}: truncated by {} bytes",
            buf.len(),
            want - buf.len()
        )),
        std::cmp::Ordering::Greater => {
            Some(format!("{} bytes follow the last tensor's data (byte {want})", buf.len() - want))
        }
        std::cmp::Ordering::Equal => None,
    }
}

/// Write `tensors` to `dest` atomically.
///
/// Tensors are produced and written in parallel with positional writes (every offset is known
/// from the header), at most [`crate::progress::WRITER_THREADS`] at a time.
pub fn write_file(tensors: &TensorMap, dest: &Path, overwrite: bool) -> Result<()> {
    use rayon::prelude::*;
    use std::os::unix::fs::FileExt;
    let mut out = AtomicFile::create(dest, overwrite)?;
    let (head, order) = header(tensors, dest)?;
    let file = out.file();
    file.write_all_at(&head, 0).at(dest)?;
    let mut at = head.len() as u64;
    let placed: Vec<(&str, &TensorEntry, u64)> = order
        .into_iter()
        .map(|(n, t)| {
            let here = at;
            at += t.nbytes() as u64;
            (n, t, here)
        })
        .collect();
    let largest = placed.iter().map(|(_, t, _)| t.nbytes() as u64).max().unwrap_or(0);
    let budget = crate::progress::Budget::new(largest);
    crate::progress::writer_pool().install(|| {
        placed.par_iter().try_for_each(|(name, t, offset)| {
            let _room = budget.acquire(t.nbytes() as u64);
            crate::sink::write_tensor_at(file, dest, *offset, name, t, false)?;
            crate::progress::tensor_written(t.nbytes() as u64);
            Ok::<(), Error>(())
        })
    })?;
    // Zero-byte tensors at the end write nothing; the file still ends where the header says.
    if file.metadata().at(dest)?.len() < at {
        file.set_len(at).at(dest)?;
    }
    out.commit()
}

/// Tensors in the order they are laid out in the file.
type WriteOrder<'a> = Vec<(&'a str, &'a TensorEntry)>;

/// The header bytes (length prefix included) and the write order for `tensors`.
fn header<'a>(tensors: &'a TensorMap, dest: &Path) -> Result<(Vec<u8>, WriteOrder<'a>)> {
    let mut order: Vec<(&str, &TensorEntry)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    order.sort_by(|(ln, lt), (rn, rt)| to_st(rt.dtype).cmp(&to_st(lt.dtype)).then(ln.cmp(rn)));
    let mut infos = Vec::with_capacity(order.len());
    let mut offset = 0;
    for (name, t) in &order {
        let n = t.nbytes();
        infos.push((
            name.to_string(),
            TensorInfo { dtype: to_st(t.dtype), shape: t.shape.clone(), data_offsets: (offset, offset + n) },
        ));
        offset += n;
    }
    // HF transformers writes {"format": "pt"}; doing the same keeps our files byte-identical to
    // theirs and loadable by `from_pretrained`.
    let file_meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let metadata = Metadata::new(Some(file_meta), infos)
        .map_err(|e| Error::invalid(dest, format!("cannot build safetensors header: {e}")))?;
    let mut json = serde_json::to_vec(&metadata).map_err(|e| Error::invalid(dest, e.to_string()))?;
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut head = Vec::with_capacity(8 + json.len());
    head.extend_from_slice(&(json.len() as u64).to_le_bytes());
    head.extend_from_slice(&json);
    Ok((head, order))
}

/// Stream a safetensors image of `tensors` into `w`; `dest` names the output in errors.
pub fn write_to(tensors: &TensorMap, w: &mut impl Write, dest: &Path) -> Result<u64> {
    let (head, order) = header(tensors, dest)?;
    w.write_all(&head).at(dest)?;
    let mut written = head.len() as u64;
    for (name, t) in order {
        let bytes = t.bytes(name)?;
        w.write_all(&bytes).at(dest)?;
        written += bytes.len() as u64;
        drop(bytes);
        crate::progress::tensor_written(t.nbytes() as u64);
    }
    Ok(written)
}

/// The exact size [`write_to`] will produce, from headers only.
pub fn encoded_len(tensors: &TensorMap) -> Result<u64> {
    let (head, _) = header(tensors, Path::new("<memory>"))?;
    Ok(head.len() as u64 + tensors.values().map(|t| t.nbytes() as u64).sum::<u64>())
}

fn to_st(d: DType) -> StDtype {
    match d {
        DType::F64 => StDtype::F64,
        DType::F32 => StDtype::F32,
        DType::F16 => StDtype::F16,
        DType::BF16 => StDtype::BF16,
        DType::I64 => StDtype::I64,
        DType::I32 => StDtype::I32,
        DType::I16 => StDtype::I16,
        DType::I8 => StDtype::I8,
        DType::U8 => StDtype::U8,
        DType::Bool => StDtype::BOOL,
    }
}

fn from_st(d: StDtype) -> Option<DType> {
    Some(match d {
        StDtype::F64 => DType::F64,
        StDtype::F32 => DType::F32,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        StDtype::I64 => DType::I64,
        StDtype::I32 => DType::I32,
        StDtype::I16 => DType::I16,
        StDtype::I8 => DType::I8,
        StDtype::U8 => DType::U8,
        StDtype::BOOL => DType::Bool,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(dtype: DType, shape: Vec<usize>, seed: u8) -> TensorEntry {
        let n: usize = shape.iter().product::<usize>() * dtype.size();
        let bytes: Vec<u8> = (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
        TensorEntry::new(dtype, shape, ByteSource::owned(bytes), Arc::from(Path::new("<test>")))
    }

    #[test]
    fn truncated_file_is_a_named_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.safetensors");
        let mut t = TensorMap::new();
        t.insert("w".into(), entry(DType::F32, vec![4, 4], 1));
        write_file(&t, &path, false).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let err = read_file(&path).unwrap_err().to_string();
        assert!(err.contains("a.safetensors") && err.contains("malformed safetensors"), "{err}");
        assert!(err.contains("the file is 157 bytes but its header places tensor data up to byte 160: truncated by 3 bytes"), "{err}");
        std::fs::write(&path, [&bytes[..], b"xy"].concat()).unwrap();
        let err = read_file(&path).unwrap_err().to_string();
        assert!(err.contains("2 bytes follow the last tensor's data (byte 160)"), "{err}");
    }

    #[test]
    fn a_tensor_whose_range_disagrees_with_its_shape_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.safetensors");
        let mut t = TensorMap::new();
        t.insert("lm_head.weight".into(), entry(DType::F32, vec![4, 4], 1));
        write_file(&t, &path, false).unwrap();
        // Same header length: F32 → F16 leaves the 64-byte range for a 32-byte tensor.
        let bytes = std::fs::read(&path).unwrap();
        let text = String::from_utf8_lossy(&bytes).replacen("\"F32\"", "\"F16\"", 1);
        std::fs::write(&path, text.as_bytes()).unwrap();
        let err = read_file(&path).unwrap_err().to_string();
        assert!(
            err.contains(
                "tensor 'lm_head.weight': F16 [4, 4] needs 32 bytes, but its data_offsets [0, 64] span 64"
            ),
            "{err}"
        );
    }

    proptest! {
        #[test]
        fn write_then_read_is_identity(specs in proptest::collection::vec((0usize..10, proptest::collection::vec(0usize..5, 0..3)), 0..6)) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("t.safetensors");
            let mut t = TensorMap::new();
            for (i, (d, shape)) in specs.into_iter().enumerate() {
                t.insert(format!("t{i}"), entry(DType::ALL[d], shape, i as u8));
            }
            write_file(&t, &path, false).unwrap();
            prop_assert_eq!(std::fs::metadata(&path).unwrap().len(), encoded_len(&t).unwrap());
            let back = read_file(&path).unwrap();
            prop_assert_eq!(back.len(), t.len());
            for (name, e) in &t {
                let b = &back[name.as_str()];
                prop_assert_eq!(b.dtype, e.dtype);
                prop_assert_eq!(&b.shape, &e.shape);
                prop_assert_eq!(b.bytes(name).unwrap(), e.bytes(name).unwrap());
            }
            // Writing what we read gives the same file, byte for byte.
            let again = dir.path().join("u.safetensors");
            write_file(&back, &again, false).unwrap();
            prop_assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(&again).unwrap());
        }
    }
}
