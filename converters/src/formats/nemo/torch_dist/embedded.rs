//! The `torch.save(tensor)` zip each tensor chunk of a `.distcp` file is: located with the `zip`
//! crate inside the file's mapping, `data.pkl` decoded under torch's weights-only allow-list, and
//! the `_rebuild_tensor*` view checked against its storage record.

use crate::error::{Error, Result};
use crate::formats::pickle::{self, AllowList, Value};
use crate::DType;
use memmap2::Mmap;
use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

/// The tensor a `torch.save(tensor)` zip holds: its view on the storage record.
pub(super) struct Embedded {
    pub(super) dtype: DType,
    pub(super) shape: Vec<usize>,
    /// In elements.
    pub(super) strides: Vec<usize>,
    /// Absolute offset in the mapping of element 0 (storage start + storage offset).
    pub(super) start: usize,
    pub(super) big_endian: bool,
}

/// One stored zip record: absolute data range in the mapping.
struct Record {
    start: usize,
    len: usize,
    crc: u32,
}

/// Index the torch zip at `[start, start + len)` of `map` and decode the tensor it holds.
pub(super) fn embedded_tensor(map: &Arc<Mmap>, start: usize, len: usize, origin: &Path) -> Result<Embedded> {
    let bad = |detail: String| Error::malformed(origin, "pytorch zip", detail);
    let image = start
        .checked_add(len)
        .and_then(|end| map.get(start..end))
        .ok_or_else(|| bad("range lies outside the file".into()))?;
    if !image.starts_with(b"PK\x03\x04") {
        let head: Vec<String> = image.iter().take(4).map(|b| format!("{b:02x}")).collect();
        return Err(bad(format!(
            "expected a torch.save zip (50 4b 03 04) at the start of the chunk, found [{}]",
            head.join(" ")
        )));
    }
    let records = zip_records(image, start, origin)?;
    let get = |rel: &str| records.get(rel);
    let pkl = get("data.pkl").ok_or_else(|| Error::missing(origin, "record 'data.pkl'"))?;
    if get("version").or_else(|| get(".data/version")).is_none() {
        return Err(Error::missing(origin, "record 'version'"));
    }
    let big_endian = match get("byteorder") {
        None => false,
        Some(r) => match checked(map, r, origin)? {
            b"little" => false,
            b"big" => true,
            other => return Err(bad(format!("byteorder record holds {:?}", String::from_utf8_lossy(other)))),
        },
    };
    let root = pickle::load(checked(map, pkl, origin)?, AllowList::TorchWeights, origin)?;
    let spec = rebuild_call(&root, origin, 0)?;
    let rec = get(&format!("data/{}", spec.key))
        .ok_or_else(|| Error::missing(origin, format!("record 'data/{}' (the chunk's storage)", spec.key)))?;
    let unit = spec.storage_unit;
    let storage_bytes = spec.storage_numel.checked_mul(unit).filter(|&b| b <= rec.len).ok_or_else(|| {
        bad(format!(
            "storage '{}' declares {} elements of {unit} bytes but its record holds {} bytes",
            spec.key, spec.storage_numel, rec.len
        ))
    })?;
    let esize = spec.dtype.size();
    let numel = spec.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let nbytes = numel.and_then(|n| n.checked_mul(esize));
    // A DCP chunk is never a broadcast view (torch clones any chunk whose storage is not exactly
    // its own); refusing one keeps assembly bounded by the input's size.
    let Some(nbytes) = nbytes.filter(|&b| b <= storage_bytes) else {
        return Err(bad(format!(
            "tensor of shape {:?} ({}) is larger than its {storage_bytes}-byte storage",
            spec.shape, spec.dtype
        )));
    };
    if nbytes > 0 {
        let last =
            spec.shape.iter().zip(&spec.stride).try_fold(spec.offset, |acc, (&n, &s)| {
                (n - 1).checked_mul(s).and_then(|x| acc.checked_add(x))
            });
        let extent = last.and_then(|l| l.checked_add(1)).and_then(|n| n.checked_mul(esize));
        if extent.is_none_or(|e| e > storage_bytes) {
            return Err(bad(format!(
                "view (offset {}, size {:?}, stride {:?}) reaches past its {storage_bytes}-byte storage",
                spec.offset, spec.shape, spec.stride
            )));
        }
    }
    Ok(Embedded {
        dtype: spec.dtype,
        shape: spec.shape,
        strides: spec.stride,
        // In bounds when there is data (checked above); an empty view has no element 0.
        start: if nbytes > 0 { rec.start + spec.offset * esize } else { rec.start },
        big_endian,
    })
}

/// The stored records of a torch zip image (which starts at `base` of its mapping), keyed by
/// name below the archive's top-level directory.
fn zip_records(image: &[u8], base: usize, origin: &Path) -> Result<HashMap<String, Record>> {
    let zip_err = |e: zip::result::ZipError| Error::malformed(origin, "zip", e.to_string());
    let mut zip = zip::ZipArchive::new(Cursor::new(image)).map_err(zip_err)?;
    zip.validate_header_consistency().map_err(zip_err)?;
    let mut prefix: Option<String> = None;
    let mut records = HashMap::new();
    for i in 0..zip.len() {
        let f = zip.by_index_raw(i).map_err(zip_err)?;
        let name = f.name().map_err(zip_err)?.into_owned();
        // torch takes the archive's directory from the first entry.
        let pre: &str = match &prefix {
            Some(p) => p,
            None => match name.split_once('/') {
                Some((dir, _)) => prefix.insert(dir.to_string()),
                None => {
                    return Err(Error::malformed(
                        origin,
                        "zip",
                        format!("first entry '{name}' is not inside a top-level directory"),
                    ))
                }
            },
        };
        let Some(rel) = name.strip_prefix(pre).and_then(|r| r.strip_prefix('/')) else { continue };
        if f.is_dir() {
            continue;
        }
        if f.compression() != zip::CompressionMethod::Stored || f.encrypted() {
            return Err(Error::malformed(
                origin,
                "zip",
                format!("record '{name}' is compressed or encrypted; torch stores records as they are"),
            ));
        }
        let start = f
            .data_start()
            .ok_or_else(|| Error::malformed(origin, "zip", format!("no data offset for '{name}'")))?;
        let size = f.size();
        let end = start.checked_add(size).filter(|&e| e <= image.len() as u64 && f.compressed_size() == size);
        let Some(end) = end else {
            return Err(Error::malformed(
                origin,
                "zip",
                format!(
                    "record '{name}' ({size} bytes at {start}) does not fit the {}-byte archive",
                    image.len()
                ),
            ));
        };
        let (start, end) = (start as usize, end as usize);
        records.insert(rel.to_string(), Record { start: base + start, len: end - start, crc: f.crc32() });
    }
    Ok(records)
}

/// A small record's bytes, CRC-checked.
fn checked<'m>(map: &'m Mmap, r: &Record, origin: &Path) -> Result<&'m [u8]> {
    let bytes = &map[r.start..r.start + r.len];
    let mut crc = flate2::Crc::new();
    crc.update(bytes);
    if crc.sum() != r.crc {
        return Err(Error::malformed(
            origin,
            "zip",
            format!("CRC-32 {:08x} of a record does not match the stored {:08x}", crc.sum(), r.crc),
        ));
    }
    Ok(bytes)
}

/// A decoded `torch._utils._rebuild_tensor*` call.
struct RebuildSpec {
    key: String,
    /// Bytes per storage element (1 for an untyped storage).
    storage_unit: usize,
    storage_numel: usize,
    dtype: DType,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// The tensor at the top of a chunk's `data.pkl`: `_rebuild_tensor_v2(storage, offset, size,
/// stride, ...)`, its `_v3` (untyped storage + dtype) and old forms, or a parameter wrapping one.
fn rebuild_call(v: &Value, origin: &Path, depth: usize) -> Result<RebuildSpec> {
    let bad = |detail: String| Error::invalid(origin, format!("chunk: {detail}"));
    let (func, args) = match v {
        Value::Reduce { callable, args, .. } => match (callable.as_global(), args.as_seq()) {
            (Some(g), Some(a)) => (g, a),
            _ => return Err(bad(format!("top-level object is a {}, expected a tensor", v.describe()))),
        },
        _ => return Err(bad(format!("top-level object is a {}, expected a tensor", v.describe()))),
    };
    match func {
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state")
        | ("torch.nn.parameter", "Parameter")
            if depth < 2 =>
        {
            let inner = args.first().ok_or_else(|| bad("parameter without a tensor".into()))?;
            rebuild_call(inner, origin, depth + 1)
        }
        ("torch._utils", f @ ("_rebuild_tensor" | "_rebuild_tensor_v2" | "_rebuild_tensor_v3")) => {
            let min = if f == "_rebuild_tensor_v3" { 7 } else { 4 };
            if args.len() < min {
                return Err(bad(format!(
                    "torch._utils.{f} has {} arguments, expected at least {min}",
                    args.len()
                )));
            }
            let Value::PersistentId(pid) = &args[0] else {
                return Err(bad(format!("storage argument is a {}", args[0].describe())));
            };
            let [_, class, key, _location, numel, ..] = pid.as_seq().unwrap_or(&[]) else {
                return Err(bad("storage id is not ('storage', class, key, location, numel)".into()));
            };
            let class = match class.as_global() {
                Some(("torch" | "torch.cuda" | "torch.storage", n)) => n,
                _ => return Err(bad(format!("storage class is a {}", class.describe()))),
            };
            let typed = if class == "UntypedStorage" {
                None
            } else {
                Some(DType::from_torch_storage(class).ok_or_else(|| Error::UnsupportedDtype {
                    path: origin.to_path_buf(),
                    tensor: "<chunk>".into(),
                    dtype: format!("torch.{class}"),
                })?)
            };
            let dtype = if f == "_rebuild_tensor_v3" {
                match args[6].as_global() {
                    Some(("torch", n)) => DType::from_torch_name(n),
                    _ => None,
                }
                .ok_or_else(|| Error::UnsupportedDtype {
                    path: origin.to_path_buf(),
                    tensor: "<chunk>".into(),
                    dtype: args[6].describe(),
                })?
            } else {
                typed.ok_or_else(|| bad(format!("torch._utils.{f} on an untyped storage has no dtype")))?
            };
            let key = match key {
                Value::Str(s) => s.clone(),
                Value::Int(i) => i.to_string(),
                other => return Err(bad(format!("storage key is a {}", other.describe()))),
            };
            let count = |v: &Value, what: &str| {
                v.as_int()
                    .and_then(|i| usize::try_from(i).ok())
                    .ok_or_else(|| bad(format!("{what} is a {}", v.describe())))
            };
            let counts = |v: &Value, what: &str| -> Result<Vec<usize>> {
                let items = match v {
                    Value::Reduce { callable, args, .. } if callable.is_global("torch", "Size") => {
                        args.as_seq().and_then(|a| a.first()).and_then(Value::as_seq)
                    }
                    other => other.as_seq(),
                };
                items
                    .ok_or_else(|| bad(format!("{what} is a {}", v.describe())))?
                    .iter()
                    .map(|i| count(i, what))
                    .collect()
            };
            let shape = counts(&args[2], "size")?;
            let stride = counts(&args[3], "stride")?;
            if shape.len() != stride.len() {
                return Err(bad(format!("size {shape:?} and stride {stride:?} differ in length")));
            }
            Ok(RebuildSpec {
                key,
                storage_unit: typed.map_or(1, DType::size),
                storage_numel: count(numel, "storage size")?,
                dtype,
                offset: count(&args[1], "storage offset")?,
                shape,
                stride,
            })
        }
        (m, n) => Err(bad(format!("top-level object is a {m}.{n}(...) result, expected a tensor"))),
    }
}
