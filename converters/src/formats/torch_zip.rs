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

use crate::atomic::AtomicFile;
use crate::checkpoint::{ByteSource, Checkpoint, Flavour, Meta, Parallelism, TensorEntry, TensorMap};
use crate::error::{Error, IoContext, Result};
use crate::formats::pickle::{self, AllowList, Value};
use crate::DType;
use memmap2::Mmap;
use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{BufWriter, Cursor, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

const ZIP_MAGIC: &[u8] = b"PK\x03\x04";
/// `torch.save` before 1.6 pickled a magic number first: `PROTO 2, LONG1 10 bytes, ...`.
const LEGACY_MAGIC: &[u8] = &[0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8];
const FORMAT: &str = "pytorch zip";

/// Read a PyTorch zip checkpoint as a single-rank checkpoint (tensors only; see [`read_file`]
/// for the `None` and skipped keys).
pub fn read_checkpoint(path: &Path) -> Result<Checkpoint> {
    let state = read_file(path)?;
    let meta = Meta {
        path: path.to_path_buf(),
        flavour: Flavour::TorchZip,
        parallel: Parallelism::default(),
        config: None,
        artifacts: Vec::new(),
    };
    Ok(Checkpoint::single(meta, state.tensors))
}

/// Map `path` and index its tensors.
pub fn read_file(path: &Path) -> Result<TorchState> {
    let map = super::map_file(path)?;
    let len = map.len();
    read_mapped(map, 0, len, Arc::from(path))
}

/// Index the torch zip image that occupies `[offset, offset + len)` of `map` (a member of an
/// uncompressed tar, or a whole file). `origin` names it in errors and in each tensor's origin.
///
/// The top-level object must be a dict. When it holds no tensor itself but has a dict under
/// `state_dict` (a Lightning checkpoint) or else `model`, that nested dict is read instead, with
/// its own keys (no `state_dict.` prefix); the other top-level keys are reported as skipped.
pub fn read_mapped(map: Arc<Mmap>, offset: usize, len: usize, origin: Arc<Path>) -> Result<TorchState> {
    let image = offset
        .checked_add(len)
        .and_then(|end| map.get(offset..end))
        .ok_or_else(|| Error::malformed(&*origin, FORMAT, "range lies outside the file"))?;
    if image.starts_with(LEGACY_MAGIC) {
        return Err(Error::LegacyTorchFile { path: origin.to_path_buf() });
    }
    if !image.starts_with(ZIP_MAGIC) {
        let head: Vec<String> = image.iter().take(4).map(|b| format!("{b:02x}")).collect();
        return Err(Error::malformed(
            &*origin,
            FORMAT,
            format!("expected a zip local header (50 4b 03 04) at the start, found [{}]", head.join(" ")),
        ));
    }
    let archive = Archive::open(image, offset, &origin)?;
    let member = |rel: &str| PathBuf::from(format!("{}:{}/{rel}", origin.display(), archive.prefix));

    if archive.get("constants.pkl").is_some() {
        return Err(Error::invalid(
            &*origin,
            "a TorchScript archive (has constants.pkl), not a torch.save checkpoint",
        ));
    }
    let version = archive
        .get(".data/version")
        .or_else(|| archive.get("version"))
        .ok_or_else(|| Error::missing(&*origin, format!("record '{}/version'", archive.prefix)))?;
    let text = archive.small(&map, version, &origin)?;
    match std::str::from_utf8(text).ok().map(str::trim).and_then(|s| s.parse::<u64>().ok()) {
        Some(v) if v >= 1 => {}
        _ => {
            return Err(Error::malformed(
                &*origin,
                FORMAT,
                format!(
                    "record '{}' should hold a positive decimal version, got {:?}",
                    version.name,
                    lossy(text)
                ),
            ))
        }
    }
    let big_endian = match archive.get("byteorder") {
        None => false,
        Some(rec) => match archive.small(&map, rec, &origin)? {
            b"little" => false,
            b"big" => true,
            other => {
                return Err(Error::malformed(
                    &*origin,
                    FORMAT,
                    format!("record '{}' should be 'little' or 'big', got {:?}", rec.name, lossy(other)),
                ))
            }
        },
    };
    let pkl = archive
        .get("data.pkl")
        .ok_or_else(|| Error::missing(&*origin, format!("record '{}/data.pkl'", archive.prefix)))?;
    let root =
        pickle::load(archive.small(&map, pkl, &origin)?, AllowList::TorchWeights, &member("data.pkl"))?;

    let Value::Dict(top) = root else {
        return Err(Error::invalid(
            &*origin,
            format!("top-level object is a {}, expected a dict of tensors", root.describe()),
        ));
    };
    let mut state = TorchState::default();
    let entries = select_state_dict(top, &mut state.skipped);
    let mut reader =
        TensorReader { map: &map, archive: &archive, origin: &origin, big_endian, storages: HashMap::new() };
    for (key, value) in entries {
        let key = match key {
            Value::Str(s) => s,
            other => {
                state.skipped.push(Skipped { key: other.describe(), what: value.describe() });
                continue;
            }
        };
        if key.ends_with("_extra_state") || value == Value::None {
            state.none_keys.push(key);
            continue;
        }
        match tensor_spec(&value, &key, &origin)? {
            Some(spec) => {
                let entry = reader.entry(&key, spec)?;
                state.tensors.insert(key, entry);
            }
            None => state.skipped.push(Skipped { key, what: value.describe() }),
        }
    }
    Ok(state)
}

/// The dict whose entries are the checkpoint's tensors (see [`read_mapped`]).
fn select_state_dict(top: Vec<(Value, Value)>, skipped: &mut Vec<Skipped>) -> Vec<(Value, Value)> {
    let has_tensor = top.iter().any(|(_, v)| looks_like_tensor(v));
    let nested = ["state_dict", "model"]
        .into_iter()
        .find(|want| top.iter().any(|(k, v)| k.as_str() == Some(*want) && matches!(v, Value::Dict(_))));
    let Some(want) = nested.filter(|_| !has_tensor) else { return top };
    let mut inner = Vec::new();
    for (k, v) in top {
        match (k.as_str() == Some(want), v) {
            (true, Value::Dict(d)) => inner = d,
            (_, v) => skipped.push(Skipped {
                key: k.as_str().map_or_else(|| k.describe(), str::to_string),
                what: v.describe(),
            }),
        }
    }
    inner
}

fn looks_like_tensor(v: &Value) -> bool {
    match v {
        Value::Reduce { callable, .. } => matches!(
            callable.as_global(),
            Some(
                ("torch._utils", _)
                    | ("torch._tensor", "_rebuild_from_type_v2")
                    | ("torch.nn.parameter", "Parameter")
            )
        ),
        _ => false,
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(64)]).into_owned()
}

/// One stored record: its name relative to the archive prefix and its bytes in the mapping.
struct Record {
    name: String,
    start: usize,
    len: usize,
    crc: u32,
}

/// The records of one torch zip image.
struct Archive {
    prefix: String,
    records: HashMap<String, Record>,
}

impl Archive {
    fn open(image: &[u8], base: usize, origin: &Path) -> Result<Archive> {
        let zip_err = |e: zip::result::ZipError| Error::malformed(origin, "zip", e.to_string());
        let mut zip = zip::ZipArchive::new(Cursor::new(image)).map_err(zip_err)?;
        // Local headers must agree with the central directory and entries must not overlap: the
        // data offsets we map come from the local headers.
        zip.validate_header_consistency().map_err(zip_err)?;
        let mut prefix: Option<String> = None;
        let mut records = HashMap::new();
        for i in 0..zip.len() {
            let f = zip.by_index_raw(i).map_err(zip_err)?;
            let name = f.name().map_err(zip_err)?.into_owned();
            // torch takes the archive's directory from the first central-directory entry.
            let pre: &str = match &prefix {
                Some(p) => p,
                None => {
                    let Some((dir, _)) = name.split_once('/') else {
                        return Err(Error::malformed(
                            origin,
                            FORMAT,
                            format!("first entry '{name}' is not inside a top-level directory"),
                        ));
                    };
                    prefix.insert(dir.to_string())
                }
            };
            if f.is_dir() {
                continue;
            }
            let Some(rel) = name.strip_prefix(pre).and_then(|r| r.strip_prefix('/')) else {
                continue;
            };
            if f.compression() != zip::CompressionMethod::Stored {
                return Err(Error::malformed(
                    origin,
                    FORMAT,
                    format!(
                        "record '{name}' is compressed ({:?}); torch stores records uncompressed",
                        f.compression()
                    ),
                ));
            }
            if f.encrypted() {
                return Err(Error::malformed(origin, FORMAT, format!("record '{name}' is encrypted")));
            }
            let start = f.data_start().ok_or_else(|| {
                Error::malformed(origin, "zip", format!("no data offset for record '{name}'"))
            })?;
            let (size, stored) = (f.size(), f.compressed_size());
            let end = start
                .checked_add(size)
                .filter(|&e| e <= image.len() as u64 && stored == size)
                .ok_or_else(|| {
                    Error::malformed(
                        origin,
                        FORMAT,
                        format!(
                        "record '{name}' ({size} bytes at offset {start}) does not fit the {}-byte archive",
                        image.len()
                    ),
                    )
                })?;
            let (start, end) = (start as usize, end as usize);
            records.insert(
                rel.to_string(),
                Record { name: name.clone(), start: base + start, len: end - start, crc: f.crc32() },
            );
        }
        let prefix = prefix.ok_or_else(|| Error::malformed(origin, FORMAT, "archive has no entries"))?;
        Ok(Archive { prefix, records })
    }

    fn get(&self, rel: &str) -> Option<&Record> {
        self.records.get(rel)
    }

    /// A small record's bytes, CRC-checked (tensor records are not read here, so not checked).
    fn small<'m>(&self, map: &'m Mmap, rec: &Record, origin: &Path) -> Result<&'m [u8]> {
        let bytes = &map[rec.start..rec.start + rec.len];
        let mut crc = flate2::Crc::new();
        crc.update(bytes);
        if crc.sum() != rec.crc {
            return Err(Error::malformed(
                origin,
                FORMAT,
                format!(
                    "record '{}': CRC-32 {:08x} does not match the stored {:08x}",
                    rec.name,
                    crc.sum(),
                    rec.crc
                ),
            ));
        }
        Ok(bytes)
    }
}

/// How a storage's elements are typed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StorageKind {
    /// `torch.<X>Storage`: `numel` counts elements of this dtype.
    Typed(DType),
    /// `torch.UntypedStorage`: `numel` counts bytes; the tensor's dtype comes from
    /// `_rebuild_tensor_v3`.
    Untyped,
}

/// A decoded `_rebuild_tensor*` call.
struct TensorSpec {
    key: String,
    kind: StorageKind,
    storage_numel: usize,
    dtype: DType,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// Decode `value` as a tensor: `Ok(None)` when it is not one at all, an error when it is a kind
/// of tensor this crate does not carry (quantized, sparse, nested, meta).
fn tensor_spec(value: &Value, name: &str, origin: &Path) -> Result<Option<TensorSpec>> {
    let Value::Reduce { callable, args, .. } = value else { return Ok(None) };
    let (Some((module, func)), Some(args)) = (callable.as_global(), args.as_seq()) else { return Ok(None) };
    call_spec(module, func, args, name, origin, 0)
}

fn call_spec(
    module: &str,
    func: &str,
    args: &[Value],
    name: &str,
    origin: &Path,
    depth: usize,
) -> Result<Option<TensorSpec>> {
    let bad = |detail: String| Error::invalid(origin, format!("tensor '{name}': {detail}"));
    if depth > 4 {
        return Err(bad("tensor rebuild calls nested too deeply".into()));
    }
    let nested = |v: Option<&Value>| -> Result<TensorSpec> {
        let Some(Value::Reduce { callable, args, .. }) = v else {
            return Err(bad(format!("{module}.{func} expects a tensor as its first argument")));
        };
        match (callable.as_global(), args.as_seq()) {
            (Some((m, f)), Some(a)) => call_spec(m, f, a, name, origin, depth + 1)?
                .ok_or_else(|| bad(format!("{module}.{func} wraps {m}.{f}, which is not a tensor"))),
            _ => Err(bad(format!("{module}.{func} expects a tensor as its first argument"))),
        }
    };
    match (module, func) {
        ("torch._utils", "_rebuild_tensor" | "_rebuild_tensor_v2" | "_rebuild_tensor_v3") => {
            rebuild_args(func, args, name, origin).map(Some)
        }
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state")
        | ("torch.nn.parameter", "Parameter") => nested(args.first()).map(Some),
        // `_rebuild_from_type_v2(func, new_type, args, state)`: a tensor subclass or a tensor
        // carrying Python attributes; the data is `func(*args)`.
        ("torch._tensor", "_rebuild_from_type_v2") => {
            match (args.first().and_then(Value::as_global), args.get(2).and_then(Value::as_seq)) {
                (Some((m, f)), Some(inner)) => call_spec(m, f, inner, name, origin, depth + 1),
                _ => Err(bad("malformed _rebuild_from_type_v2 arguments".into())),
            }
        }
        ("torch._utils", other) if other.starts_with("_rebuild") => Err(bad(format!(
            "torch._utils.{other} (quantized, sparse, nested or meta tensors) is not supported"
        ))),
        _ => Ok(None),
    }
}

/// `_rebuild_tensor(storage, offset, size, stride)`, `_rebuild_tensor_v2(..., requires_grad,
/// backward_hooks[, metadata])`, `_rebuild_tensor_v3(..., requires_grad, backward_hooks, dtype
/// [, metadata])`.
fn rebuild_args(func: &str, args: &[Value], name: &str, origin: &Path) -> Result<TensorSpec> {
    let bad = |detail: String| Error::invalid(origin, format!("tensor '{name}': {detail}"));
    let min = if func == "_rebuild_tensor_v3" { 7 } else { 4 };
    if args.len() < min {
        return Err(bad(format!(
            "torch._utils.{func} has {} arguments, expected at least {min}",
            args.len()
        )));
    }
    let Value::PersistentId(pid) = &args[0] else {
        return Err(bad(format!("storage argument is a {}, expected a persistent id", args[0].describe())));
    };
    let fields = pid.as_seq().unwrap_or(&[]);
    let [_, class, key, _location, numel, ..] = fields else {
        return Err(bad(format!(
            "storage id has {} fields, expected ('storage', class, key, location, numel)",
            fields.len()
        )));
    };
    let class_name = match class.as_global() {
        Some(("torch" | "torch.cuda" | "torch.storage", n)) => n,
        _ => return Err(bad(format!("storage class is a {}, expected torch.<X>Storage", class.describe()))),
    };
    let kind = if class_name == "UntypedStorage" {
        StorageKind::Untyped
    } else {
        StorageKind::Typed(DType::from_torch_storage(class_name).ok_or_else(|| Error::UnsupportedDtype {
            path: origin.to_path_buf(),
            tensor: name.to_string(),
            dtype: format!("torch.{class_name}"),
        })?)
    };
    let key = match key {
        Value::Str(s) => s.clone(),
        Value::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
        Value::Int(i) => i.to_string(),
        other => return Err(bad(format!("storage key is a {}, expected a string", other.describe()))),
    };
    let storage_numel = count(numel).ok_or_else(|| bad(format!("storage size is a {}", numel.describe())))?;
    let offset = count(&args[1]).ok_or_else(|| bad(format!("storage offset is a {}", args[1].describe())))?;
    let shape = counts(&args[2])
        .ok_or_else(|| bad(format!("size is a {}, expected a tuple of ints", args[2].describe())))?;
    let stride = counts(&args[3])
        .ok_or_else(|| bad(format!("stride is a {}, expected a tuple of ints", args[3].describe())))?;
    if shape.len() != stride.len() {
        return Err(bad(format!("size {shape:?} and stride {stride:?} have different lengths")));
    }
    let dtype = if func == "_rebuild_tensor_v3" {
        let d = args[6].as_global().filter(|(m, _)| *m == "torch").map(|(_, n)| n);
        match d.and_then(DType::from_torch_name) {
            Some(d) => d,
            None => {
                return Err(Error::UnsupportedDtype {
                    path: origin.to_path_buf(),
                    tensor: name.to_string(),
                    dtype: match args[6].as_global() {
                        Some((m, n)) => format!("{m}.{n}"),
                        None => args[6].describe(),
                    },
                })
            }
        }
    } else {
        match kind {
            StorageKind::Typed(d) => d,
            StorageKind::Untyped => {
                return Err(bad(format!("torch._utils.{func} on an untyped storage has no dtype")))
            }
        }
    };
    Ok(TensorSpec { key, kind, storage_numel, dtype, offset, shape, stride })
}

/// A non-negative int.
fn count(v: &Value) -> Option<usize> {
    v.as_int().and_then(|i| usize::try_from(i).ok())
}

/// A tuple of non-negative ints, or `torch.Size((...))`.
fn counts(v: &Value) -> Option<Vec<usize>> {
    match v {
        Value::Tuple(items) | Value::List(items) => items.iter().map(count).collect(),
        Value::Reduce { callable, args, .. } if callable.is_global("torch", "Size") => {
            args.as_seq().and_then(|a| a.first()).and_then(counts)
        }
        _ => None,
    }
}

/// Turns tensor specs into entries, checking each against its storage record.
struct TensorReader<'a> {
    map: &'a Arc<Mmap>,
    archive: &'a Archive,
    origin: &'a Arc<Path>,
    big_endian: bool,
    /// Storage key → how it was first declared, to catch a key declared twice differently.
    storages: HashMap<String, (StorageKind, usize)>,
}

impl TensorReader<'_> {
    fn entry(&mut self, name: &str, spec: TensorSpec) -> Result<TensorEntry> {
        let (origin_arc, archive, map) = (self.origin, self.archive, self.map);
        let origin: &Path = origin_arc;
        let bad = |detail: String| Error::malformed(origin, FORMAT, format!("tensor '{name}': {detail}"));
        let declared = (spec.kind, spec.storage_numel);
        if let Some(&first) = self.storages.get(&spec.key) {
            if first != declared {
                return Err(bad(format!(
                    "storage '{}' declared as {:?} x {} here but {:?} x {} by an earlier tensor",
                    spec.key, declared.0, declared.1, first.0, first.1
                )));
            }
        } else {
            self.storages.insert(spec.key.clone(), declared);
        }
        let rel = format!("data/{}", spec.key);
        let rec = archive.get(&rel).ok_or_else(|| {
            Error::missing(origin, format!("record '{}/{rel}' (storage of tensor '{name}')", archive.prefix))
        })?;
        let unit = match spec.kind {
            StorageKind::Typed(d) => d.size(),
            StorageKind::Untyped => 1,
        };
        let storage_bytes =
            spec.storage_numel.checked_mul(unit).filter(|&b| b <= rec.len).ok_or_else(|| {
                bad(format!(
                    "storage '{}' declares {} elements of {} bytes but record '{}' holds {} bytes",
                    spec.key, spec.storage_numel, unit, rec.name, rec.len
                ))
            })?;
        let esize = spec.dtype.size();
        let numel = spec.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        let Some(numel) = numel.filter(|n| n.checked_mul(esize).is_some()) else {
            return Err(bad(format!("shape {:?} overflows", spec.shape)));
        };
        let source = if numel == 0 {
            ByteSource::owned(Vec::new())
        } else {
            // Last element the view touches, in elements of the tensor's dtype.
            let last = spec.shape.iter().zip(&spec.stride).try_fold(spec.offset, |acc, (&n, &s)| {
                (n - 1).checked_mul(s).and_then(|x| acc.checked_add(x))
            });
            let extent = last.and_then(|l| l.checked_add(1)).and_then(|n| n.checked_mul(esize));
            let Some(extent) = extent.filter(|&e| e <= storage_bytes) else {
                return Err(bad(format!(
                    "view (offset {}, size {:?}, stride {:?}) of {} elements reaches past storage '{}' ({} bytes)",
                    spec.offset, spec.shape, spec.stride, spec.dtype, spec.key, storage_bytes
                )));
            };
            let begin = rec.start + spec.offset * esize;
            let contiguous = is_contiguous(&spec.shape, &spec.stride);
            if contiguous && (!self.big_endian || esize == 1) {
                ByteSource::mapped(map.clone(), begin, numel * esize)
            } else {
                let (map, shape, stride) = (map.clone(), spec.shape.clone(), spec.stride.clone());
                let (swap, origin, name) =
                    (self.big_endian && esize > 1, origin_arc.clone(), name.to_string());
                let span = extent - spec.offset * esize;
                ByteSource::derived(move || {
                    let src = map.get(begin..begin + span).ok_or_else(|| {
                        Error::malformed(
                            &*origin,
                            FORMAT,
                            format!("tensor '{name}': view lies outside the file"),
                        )
                    })?;
                    let mut out = gather(src, &shape, &stride, esize);
                    if swap {
                        out.chunks_exact_mut(esize).for_each(<[u8]>::reverse);
                    }
                    Ok(out)
                })
            }
        };
        Ok(TensorEntry::new(spec.dtype, spec.shape, source, origin_arc.clone()))
    }
}

/// Whether a view with these strides is C-contiguous (dimensions of size 1 may have any stride).
fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1usize;
    for (&n, &s) in shape.iter().zip(stride).rev() {
        if n != 1 {
            if s != expected {
                return false;
            }
            expected = expected.saturating_mul(n);
        }
    }
    true
}

/// The C-contiguous copy of a strided view whose element 0 is at `src[0]`. The caller has
/// checked that every element lies inside `src`.
fn gather(src: &[u8], shape: &[usize], stride: &[usize], esize: usize) -> Vec<u8> {
    let numel: usize = shape.iter().product();
    let mut out = Vec::with_capacity(numel * esize);
    if numel == 0 {
        return out;
    }
    let (inner, outer) = shape.split_last().map_or((1, &[][..]), |(&n, rest)| (n, rest));
    let inner_stride = stride.last().copied().unwrap_or(1);
    let mut index = vec![0usize; outer.len()];
    loop {
        let base: usize = index.iter().zip(stride).map(|(i, s)| i * s).sum();
        if inner_stride == 1 || inner == 1 {
            out.extend_from_slice(&src[base * esize..(base + inner) * esize]);
        } else {
            for j in 0..inner {
                let at = (base + j * inner_stride) * esize;
                out.extend_from_slice(&src[at..at + esize]);
            }
        }
        // Odometer over the outer dimensions, last fastest.
        let mut d = outer.len();
        loop {
            if d == 0 {
                return out;
            }
            d -= 1;
            index[d] += 1;
            if index[d] < outer[d] {
                break;
            }
            index[d] = 0;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Writing

/// Write `state` to `dest` atomically, with the archive directory named after the file stem as
/// torch does (`model_weights/` for `model_weights.ckpt`).
pub fn write_file(state: &TorchState, dest: &Path, overwrite: bool) -> Result<()> {
    let archive_name =
        dest.file_stem().and_then(|s| s.to_str()).filter(|s| !s.is_empty()).unwrap_or("archive").to_string();
    let mut out = AtomicFile::create(dest, overwrite)?;
    {
        let mut w = BufWriter::with_capacity(1 << 20, out.file());
        write_with(state, &mut w, &archive_name, dest, false)?;
        w.flush().at(dest)?;
    }
    out.commit()
}

/// Stream a torch zip image of `state` into `w` at its current position, with every record
/// under `<archive_name>/`; returns the bytes written (always [`encoded_len`]). Offsets inside
/// the archive are relative to that starting position, so `w` may be a window into a tar; the
/// position is read again at the end to check the length against the layout.
pub fn write_to<W: Write + Seek>(state: &TorchState, w: &mut W, archive_name: &str) -> Result<u64> {
    write_with(state, w, archive_name, Path::new(archive_name), false)
}

/// The exact number of bytes [`write_to`] produces for `state`, computed from headers only.
pub fn encoded_len(state: &TorchState, archive_name: &str) -> Result<u64> {
    let dest = Path::new(archive_name);
    let plan = Plan::new(state, dest)?;
    Ok(ZipLayout::new(&plan.records(archive_name, dest)?, false).total)
}

/// [`write_to`], optionally with ZIP64 fields on every entry (so tests cover that path without
/// writing 4 GiB).
fn write_with<W: Write + Seek>(
    state: &TorchState,
    w: &mut W,
    archive_name: &str,
    dest: &Path,
    force_zip64: bool,
) -> Result<u64> {
    let plan = Plan::new(state, dest)?;
    let records = plan.records(archive_name, dest)?;
    let layout = ZipLayout::new(&records, force_zip64);
    let start = w.stream_position().at(dest)?;
    let mut crcs = Vec::with_capacity(records.len());
    for (rec, entry) in records.iter().zip(&layout.entries) {
        let bytes = plan.bytes(&rec.content, dest)?;
        if bytes.len() as u64 != rec.size {
            return Err(Error::invalid(
                dest,
                format!("record '{}' produced {} bytes, expected {}", rec.name, bytes.len(), rec.size),
            ));
        }
        let mut crc = flate2::Crc::new();
        crc.update(&bytes);
        w.write_all(&entry.local_header(crc.sum())).at(dest)?;
        w.write_all(&bytes).at(dest)?;
        crcs.push(crc.sum());
    }
    for (entry, crc) in layout.entries.iter().zip(&crcs) {
        w.write_all(&entry.central_header(*crc)).at(dest)?;
    }
    w.write_all(&layout.end_records()).at(dest)?;
    let written = w.stream_position().at(dest)? - start;
    if written != layout.total {
        return Err(Error::invalid(
            dest,
            format!("wrote {written} bytes, layout predicted {}", layout.total),
        ));
    }
    Ok(written)
}

/// Where one storage's bytes come from when writing.
enum StorageSource<'a> {
    /// A range of a mapping covering one or more tensors that share it.
    Range { map: &'a Arc<Mmap>, offset: usize, len: usize },
    /// One tensor's own bytes.
    Tensor { name: &'a str, entry: &'a TensorEntry },
}

/// What a record holds.
enum Content {
    Pickle,
    Text(&'static [u8]),
    Storage(usize),
}

/// One zip record to write.
struct RecordPlan {
    name: String,
    size: u64,
    content: Content,
}

/// The pickle and storages of a state, decided from headers only.
struct Plan<'a> {
    pickle: Vec<u8>,
    storages: Vec<(StorageSource<'a>, u64)>,
}

impl<'a> Plan<'a> {
    fn new(state: &'a TorchState, dest: &Path) -> Result<Plan<'a>> {
        let order = ordered_entries(state, dest)?;
        for (name, entry) in &state.tensors {
            if let Some(n) = entry.source.known_len() {
                entry.check_len(name, n)?;
            }
        }
        let shared = SharedStorages::find(&state.tensors);
        let mut storages: Vec<(StorageSource<'a>, u64)> = Vec::new();
        let mut key_of_group: HashMap<usize, usize> = HashMap::new();
        let mut same_source: HashMap<(usize, DType, usize), usize> = HashMap::new();
        let mut dict = Vec::with_capacity(order.len());
        for (name, entry) in order {
            let value = match entry {
                None => Value::None,
                Some(entry) => {
                    let esize = entry.dtype.size();
                    let (key, offset) = match shared.of(name) {
                        Some((group, byte_offset)) => {
                            let key = *key_of_group.entry(group).or_insert_with(|| {
                                let (map, offset, len) = shared.groups[group];
                                storages.push((StorageSource::Range { map, offset, len }, len as u64));
                                storages.len() - 1
                            });
                            (key, byte_offset / esize)
                        }
                        None => {
                            let mut push = || {
                                storages.push((StorageSource::Tensor { name, entry }, entry.nbytes() as u64));
                                storages.len() - 1
                            };
                            let key = match same_source_key(entry) {
                                Some(k) => *same_source.entry(k).or_insert_with(push),
                                None => push(),
                            };
                            (key, 0)
                        }
                    };
                    let storage_numel = storages[key].1 / esize as u64;
                    tensor_value(entry, key, storage_numel, offset, dest)?
                }
            };
            dict.push((Value::Str(name.to_string()), value));
        }
        Ok(Plan { pickle: pickle::dump(&Value::Dict(dict), dest)?, storages })
    }

    /// The records in torch's order: `data.pkl`, `byteorder`, `data/<key>`…, `version`.
    fn records(&self, archive_name: &str, dest: &Path) -> Result<Vec<RecordPlan>> {
        if archive_name.is_empty() || archive_name.contains(['/', '\\']) {
            return Err(Error::invalid(
                dest,
                format!("archive name {archive_name:?} must be a non-empty name without '/'"),
            ));
        }
        let rec = |rel: &str, size: u64, content| RecordPlan {
            name: format!("{archive_name}/{rel}"),
            size,
            content,
        };
        let mut out = vec![rec("data.pkl", self.pickle.len() as u64, Content::Pickle)];
        out.push(rec("byteorder", 6, Content::Text(b"little")));
        for (key, (_, size)) in self.storages.iter().enumerate() {
            out.push(rec(&format!("data/{key}"), *size, Content::Storage(key)));
        }
        out.push(rec("version", 2, Content::Text(b"3\n")));
        if let Some(long) = out.iter().find(|r| r.name.len() > usize::from(u16::MAX)) {
            return Err(Error::invalid(
                dest,
                format!("zip entry name of {} bytes is too long", long.name.len()),
            ));
        }
        Ok(out)
    }

    fn bytes(&self, content: &Content, dest: &Path) -> Result<Cow<'_, [u8]>> {
        Ok(match content {
            Content::Pickle => Cow::Borrowed(&self.pickle),
            Content::Text(t) => Cow::Borrowed(t),
            Content::Storage(key) => match &self.storages[*key].0 {
                StorageSource::Range { map, offset, len } => Cow::Borrowed(
                    offset
                        .checked_add(*len)
                        .and_then(|end| map.get(*offset..end))
                        .ok_or_else(|| Error::invalid(dest, "a mapped tensor range lies outside its file"))?,
                ),
                StorageSource::Tensor { name, entry } => entry.bytes(name)?,
            },
        })
    }
}

/// Identity of an owned or derived source shared by several entries (`Arc` clones, e.g. a tied
/// `lm_head` that is a clone of a lazily cast embedding): equal keys mean equal bytes, because
/// derived closures are deterministic.
fn same_source_key(entry: &TensorEntry) -> Option<(usize, DType, usize)> {
    let ptr = match &entry.source {
        ByteSource::Owned(b) => b.as_ptr() as usize,
        ByteSource::Derived(f) => Arc::as_ptr(f) as *const () as usize,
        ByteSource::Mapped { .. } => return None,
    };
    (entry.nbytes() > 0).then_some((ptr, entry.dtype, entry.nbytes()))
}

/// The `_rebuild_tensor_v2` call for a contiguous tensor at element `offset` of storage `key`.
fn tensor_value(
    entry: &TensorEntry,
    key: usize,
    storage_numel: u64,
    offset: usize,
    dest: &Path,
) -> Result<Value> {
    let int = |n: u64| {
        i64::try_from(n)
            .map(Value::Int)
            .map_err(|_| Error::invalid(dest, format!("size {n} does not fit a pickle int")))
    };
    let mut stride = vec![0u64; entry.shape.len()];
    let mut acc = 1u64;
    for (s, &n) in stride.iter_mut().zip(&entry.shape).rev() {
        *s = acc;
        // torch's contiguous strides treat empty dimensions as size 1.
        acc = acc.saturating_mul(n.max(1) as u64);
    }
    let storage_id = Value::Tuple(vec![
        Value::Str("storage".into()),
        Value::global("torch", entry.dtype.torch_storage()),
        Value::Str(key.to_string()),
        Value::Str("cpu".into()),
        int(storage_numel)?,
    ]);
    Ok(Value::call(
        Value::global("torch._utils", "_rebuild_tensor_v2"),
        vec![
            Value::PersistentId(Box::new(storage_id)),
            int(offset as u64)?,
            Value::Tuple(entry.shape.iter().map(|&n| int(n as u64)).collect::<Result<_>>()?),
            Value::Tuple(stride.into_iter().map(int).collect::<Result<_>>()?),
            Value::Bool(false),
            Value::Dict(Vec::new()),
        ],
    ))
}

/// The write order of keys: tensors in map order with each `None` key placed as described on
/// [`TorchState`].
fn ordered_entries<'a>(
    state: &'a TorchState,
    dest: &Path,
) -> Result<Vec<(&'a str, Option<&'a TensorEntry>)>> {
    let parent = |k: &'a str| k.rfind('.').map(|i| &k[..i]);
    let names: Vec<&'a str> = state.tensors.keys().map(String::as_str).collect();
    let mut last_direct: HashMap<&'a str, usize> = HashMap::new();
    let mut first_under: HashMap<&'a str, usize> = HashMap::new();
    for (i, &name) in names.iter().enumerate() {
        if let Some(p) = parent(name) {
            last_direct.insert(p, i);
        }
        for (j, _) in name.match_indices('.') {
            first_under.entry(&name[..j]).or_insert(i);
        }
    }
    // Per tensor index i: keys that follow tensor i-1's module, then keys that precede i's.
    let mut after: Vec<Vec<&'a str>> = vec![Vec::new(); names.len() + 1];
    let mut before: Vec<Vec<&'a str>> = vec![Vec::new(); names.len() + 1];
    let mut seen = std::collections::HashSet::new();
    for key in &state.none_keys {
        if state.tensors.contains_key(key) || !seen.insert(key.as_str()) {
            return Err(Error::invalid(
                dest,
                format!("key '{key}' is listed twice (as a tensor or as a None key)"),
            ));
        }
        let p = parent(key.as_str());
        if let Some(&i) = p.and_then(|p| last_direct.get(p)) {
            after[i + 1].push(key.as_str());
        } else if let Some(&i) = p.and_then(|p| first_under.get(p)) {
            before[i].push(key.as_str());
        } else {
            after[names.len()].push(key.as_str());
        }
    }
    let mut out = Vec::with_capacity(names.len() + state.none_keys.len());
    for (i, (a, b)) in after.into_iter().zip(before).enumerate() {
        out.extend(a.into_iter().chain(b).map(|k| (k, None)));
        if let Some((name, entry)) = state.tensors.get_index(i) {
            out.push((name.as_str(), Some(entry)));
        }
    }
    Ok(out)
}

/// Tensors whose bytes overlap inside one mapping (views, tied weights read from one file) and
/// so can be written as one storage, as torch does.
struct SharedStorages<'a> {
    /// (map, offset, len) of each group's storage.
    groups: Vec<(&'a Arc<Mmap>, usize, usize)>,
    /// Tensor name → (group, byte offset inside the group's range).
    member: HashMap<&'a str, (usize, usize)>,
}

/// (byte offset, byte length, tensor name, mapping) of one mapped tensor.
type Span<'a> = (usize, usize, &'a str, &'a Arc<Mmap>);

impl<'a> SharedStorages<'a> {
    fn find(tensors: &'a TensorMap) -> SharedStorages<'a> {
        // Only tensors of one dtype whose ranges start at the same offset modulo the element size
        // can be views of one storage.
        type Key = (usize, DType, usize);
        let mut by_key: HashMap<Key, Vec<Span<'a>>> = HashMap::new();
        for (name, entry) in tensors {
            if let ByteSource::Mapped { map, offset, len } = &entry.source {
                if *len > 0 && *len == entry.nbytes() {
                    let esize = entry.dtype.size();
                    let key = (Arc::as_ptr(map) as usize, entry.dtype, offset % esize);
                    by_key.entry(key).or_default().push((*offset, *len, name.as_str(), map));
                }
            }
        }
        let mut out = SharedStorages { groups: Vec::new(), member: HashMap::new() };
        let mut keys: Vec<Key> = by_key.keys().copied().collect();
        keys.sort();
        for key in keys {
            let mut ranges = by_key.remove(&key).unwrap_or_default();
            ranges.sort_by_key(|&(offset, len, _, _)| (offset, std::cmp::Reverse(len)));
            // Sweep: a range that starts before the current cluster ends joins it.
            let mut cluster: Vec<Span<'a>> = Vec::new();
            let mut end = 0;
            for r in ranges {
                if !cluster.is_empty() && r.0 >= end {
                    out.close(std::mem::take(&mut cluster), end);
                }
                end = if cluster.is_empty() { r.0 + r.1 } else { end.max(r.0 + r.1) };
                cluster.push(r);
            }
            if !cluster.is_empty() {
                out.close(cluster, end);
            }
        }
        out
    }

    fn close(&mut self, cluster: Vec<Span<'a>>, end: usize) {
        if cluster.len() < 2 {
            return;
        }
        let (start, map) = (cluster[0].0, cluster[0].3);
        let group = self.groups.len();
        self.groups.push((map, start, end - start));
        for (offset, _, name, _) in cluster {
            self.member.insert(name, (group, offset - start));
        }
    }

    fn of(&self, name: &str) -> Option<(usize, usize)> {
        self.member.get(name).copied()
    }
}

/// Byte layout of the zip: computed once from record names and sizes, shared by
/// [`encoded_len`] and the writer so the two cannot disagree.
struct ZipLayout {
    entries: Vec<EntryLayout>,
    central_offset: u64,
    central_size: u64,
    total: u64,
}

struct EntryLayout {
    name: String,
    size: u64,
    offset: u64,
    zip64_size: bool,
    zip64_offset: bool,
    pad: usize,
}

const U32_LIMIT: u64 = 0xFFFF_FFFF;
const LOCAL_HEADER: u64 = 30;
const CENTRAL_HEADER: u64 = 46;
const EOCD: u64 = 22;
const ZIP64_EOCD: u64 = 56;
const ZIP64_LOCATOR: u64 = 20;
/// torch aligns record data to this many bytes (`kFieldAlignment`).
const ALIGN: u64 = 64;
/// DOS date 1980-01-01 (time 00:00): fixed so output is byte-for-byte reproducible.
const DOS_DATE: u16 = (1 << 5) | 1;

impl ZipLayout {
    fn new(records: &[RecordPlan], force_zip64: bool) -> ZipLayout {
        let mut entries = Vec::with_capacity(records.len());
        let mut at = 0u64;
        for rec in records {
            let zip64_size = force_zip64 || rec.size >= U32_LIMIT;
            let zip64_offset = force_zip64 || at >= U32_LIMIT;
            let fixed = LOCAL_HEADER + rec.name.len() as u64 + if zip64_size { 20 } else { 0 } + 4;
            let pad = ((ALIGN - (at + fixed) % ALIGN) % ALIGN) as usize;
            entries.push(EntryLayout {
                name: rec.name.clone(),
                size: rec.size,
                offset: at,
                zip64_size,
                zip64_offset,
                pad,
            });
            at += fixed + pad as u64 + rec.size;
        }
        let central_offset = at;
        let central_size: u64 =
            entries.iter().map(|e| CENTRAL_HEADER + e.name.len() as u64 + e.central_extra_len()).sum();
        let mut layout = ZipLayout { entries, central_offset, central_size, total: 0 };
        layout.total = central_offset + central_size + layout.end_len();
        layout
    }

    fn needs_zip64_end(&self) -> bool {
        self.entries.len() >= 0xFFFF
            || self.central_offset >= U32_LIMIT
            || self.central_size >= U32_LIMIT
            || self.entries.iter().any(|e| e.zip64_size || e.zip64_offset)
    }

    fn end_len(&self) -> u64 {
        EOCD + if self.needs_zip64_end() { ZIP64_EOCD + ZIP64_LOCATOR } else { 0 }
    }

    fn end_records(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.end_len() as usize);
        let n = self.entries.len() as u64;
        if self.needs_zip64_end() {
            let zip64_eocd_offset = self.central_offset + self.central_size;
            b.extend_from_slice(&0x0606_4b50u32.to_le_bytes());
            b.extend_from_slice(&(ZIP64_EOCD - 12).to_le_bytes());
            b.extend_from_slice(&45u16.to_le_bytes()); // version made by
            b.extend_from_slice(&45u16.to_le_bytes()); // version needed
            b.extend_from_slice(&0u32.to_le_bytes()); // this disk
            b.extend_from_slice(&0u32.to_le_bytes()); // disk with the central directory
            b.extend_from_slice(&n.to_le_bytes());
            b.extend_from_slice(&n.to_le_bytes());
            b.extend_from_slice(&self.central_size.to_le_bytes());
            b.extend_from_slice(&self.central_offset.to_le_bytes());
            b.extend_from_slice(&0x0706_4b50u32.to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
            b.extend_from_slice(&zip64_eocd_offset.to_le_bytes());
            b.extend_from_slice(&1u32.to_le_bytes());
        }
        let n16 = u16::try_from(n).ok().filter(|&v| v < 0xFFFF).unwrap_or(0xFFFF);
        b.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&n16.to_le_bytes());
        b.extend_from_slice(&n16.to_le_bytes());
        b.extend_from_slice(&clamp32(self.central_size).to_le_bytes());
        b.extend_from_slice(&clamp32(self.central_offset).to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes()); // comment length
        b
    }
}

fn clamp32(v: u64) -> u32 {
    u32::try_from(v).ok().filter(|&v| u64::from(v) < U32_LIMIT).unwrap_or(u32::MAX)
}

impl EntryLayout {
    fn version_needed(&self) -> u16 {
        if self.zip64_size || self.zip64_offset {
            45
        } else {
            20
        }
    }

    fn flags(&self) -> u16 {
        // Bit 11: the name is UTF-8.
        if self.name.is_ascii() {
            0
        } else {
            1 << 11
        }
    }

    fn central_extra_len(&self) -> u64 {
        let fields = if self.zip64_size { 16 } else { 0 } + if self.zip64_offset { 8 } else { 0 };
        if fields == 0 {
            0
        } else {
            4 + fields
        }
    }

    fn local_header(&self, crc: u32) -> Vec<u8> {
        let size32 = if self.zip64_size { u32::MAX } else { clamp32(self.size) };
        let extra_len = if self.zip64_size { 20 } else { 0 } + 4 + self.pad;
        let mut b = Vec::with_capacity(LOCAL_HEADER as usize + self.name.len() + extra_len);
        b.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        b.extend_from_slice(&self.version_needed().to_le_bytes());
        b.extend_from_slice(&self.flags().to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes()); // stored
        b.extend_from_slice(&0u16.to_le_bytes()); // time
        b.extend_from_slice(&DOS_DATE.to_le_bytes());
        b.extend_from_slice(&crc.to_le_bytes());
        b.extend_from_slice(&size32.to_le_bytes());
        b.extend_from_slice(&size32.to_le_bytes());
        b.extend_from_slice(&(self.name.len() as u16).to_le_bytes());
        b.extend_from_slice(&(extra_len as u16).to_le_bytes());
        b.extend_from_slice(self.name.as_bytes());
        if self.zip64_size {
            b.extend_from_slice(&1u16.to_le_bytes());
            b.extend_from_slice(&16u16.to_le_bytes());
            b.extend_from_slice(&self.size.to_le_bytes());
            b.extend_from_slice(&self.size.to_le_bytes());
        }
        b.extend_from_slice(b"FB");
        b.extend_from_slice(&(self.pad as u16).to_le_bytes());
        b.resize(b.len() + self.pad, b'Z');
        b
    }

    fn central_header(&self, crc: u32) -> Vec<u8> {
        let size32 = if self.zip64_size { u32::MAX } else { clamp32(self.size) };
        let offset32 = if self.zip64_offset { u32::MAX } else { clamp32(self.offset) };
        let extra_len = self.central_extra_len();
        let mut b = Vec::with_capacity(CENTRAL_HEADER as usize + self.name.len() + extra_len as usize);
        b.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        b.extend_from_slice(&45u16.to_le_bytes()); // version made by
        b.extend_from_slice(&self.version_needed().to_le_bytes());
        b.extend_from_slice(&self.flags().to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&DOS_DATE.to_le_bytes());
        b.extend_from_slice(&crc.to_le_bytes());
        b.extend_from_slice(&size32.to_le_bytes());
        b.extend_from_slice(&size32.to_le_bytes());
        b.extend_from_slice(&(self.name.len() as u16).to_le_bytes());
        b.extend_from_slice(&(extra_len as u16).to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes()); // comment length
        b.extend_from_slice(&0u16.to_le_bytes()); // disk number
        b.extend_from_slice(&0u16.to_le_bytes()); // internal attributes
        b.extend_from_slice(&0u32.to_le_bytes()); // external attributes
        b.extend_from_slice(&offset32.to_le_bytes());
        b.extend_from_slice(self.name.as_bytes());
        if extra_len > 0 {
            b.extend_from_slice(&1u16.to_le_bytes());
            b.extend_from_slice(&((extra_len - 4) as u16).to_le_bytes());
            if self.zip64_size {
                b.extend_from_slice(&self.size.to_le_bytes());
                b.extend_from_slice(&self.size.to_le_bytes());
            }
            if self.zip64_offset {
                b.extend_from_slice(&self.offset.to_le_bytes());
            }
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::pickle::build::P;
    use proptest::prelude::*;

    fn origin() -> Arc<Path> {
        Arc::from(Path::new("t.pt"))
    }

    fn mmap_of(bytes: &[u8]) -> Arc<Mmap> {
        let mut m = memmap2::MmapMut::map_anon(bytes.len().max(1)).unwrap();
        m[..bytes.len()].copy_from_slice(bytes);
        Arc::new(m.make_read_only().unwrap())
    }

    fn read_bytes(bytes: &[u8]) -> Result<TorchState> {
        read_mapped(mmap_of(bytes), 0, bytes.len(), origin())
    }

    fn entry(dtype: DType, shape: Vec<usize>, seed: u8) -> TensorEntry {
        let n = shape.iter().product::<usize>() * dtype.size();
        let bytes: Vec<u8> = (0..n).map(|i| (i as u8).wrapping_mul(37).wrapping_add(seed)).collect();
        TensorEntry::new(dtype, shape, ByteSource::owned(bytes), origin())
    }

    fn write_vec(state: &TorchState) -> Vec<u8> {
        let mut cur = Cursor::new(Vec::new());
        let n = write_to(state, &mut cur, "archive").unwrap();
        assert_eq!(n, cur.get_ref().len() as u64);
        cur.into_inner()
    }

    /// A stored zip of arbitrary records, laid out by the writer's own layout code.
    fn zip_of(records: &[(&str, &[u8])]) -> Vec<u8> {
        let plans: Vec<RecordPlan> = records
            .iter()
            .map(|(n, b)| RecordPlan { name: n.to_string(), size: b.len() as u64, content: Content::Pickle })
            .collect();
        let layout = ZipLayout::new(&plans, false);
        let mut out = Vec::new();
        let mut crcs = Vec::new();
        for ((_, bytes), e) in records.iter().zip(&layout.entries) {
            let mut crc = flate2::Crc::new();
            crc.update(bytes);
            out.extend(e.local_header(crc.sum()));
            out.extend_from_slice(bytes);
            crcs.push(crc.sum());
        }
        for (e, crc) in layout.entries.iter().zip(crcs) {
            out.extend(e.central_header(crc));
        }
        out.extend(layout.end_records());
        assert_eq!(out.len() as u64, layout.total);
        out
    }

    /// `_rebuild_tensor_v2` of storage `key` (class of `dtype`, `numel` elements).
    fn view(dtype: DType, key: &str, numel: i64, offset: i64, size: &[i64], stride: &[i64]) -> Value {
        let ints = |v: &[i64]| Value::Tuple(v.iter().map(|&i| Value::Int(i)).collect());
        Value::call(
            Value::global("torch._utils", "_rebuild_tensor_v2"),
            vec![
                Value::PersistentId(Box::new(Value::Tuple(vec![
                    Value::Str("storage".into()),
                    Value::global("torch", dtype.torch_storage()),
                    Value::Str(key.into()),
                    Value::Str("cpu".into()),
                    Value::Int(numel),
                ]))),
                Value::Int(offset),
                ints(size),
                ints(stride),
                Value::Bool(false),
                Value::Dict(Vec::new()),
            ],
        )
    }

    fn pkl(entries: Vec<(&str, Value)>) -> Vec<u8> {
        let dict = Value::Dict(entries.into_iter().map(|(k, v)| (Value::Str(k.into()), v)).collect());
        pickle::dump(&dict, Path::new("x")).unwrap()
    }

    fn f32_bytes(v: impl IntoIterator<Item = f32>) -> Vec<u8> {
        v.into_iter().flat_map(f32::to_le_bytes).collect()
    }

    #[test]
    fn shared_storage_offsets_and_transposed_views() {
        let data = f32_bytes((0..12).map(|i| i as f32));
        let pickle = pkl(vec![
            ("a", view(DType::F32, "0", 12, 0, &[3, 4], &[4, 1])),
            ("b", view(DType::F32, "0", 12, 4, &[4], &[1])),
            ("t", view(DType::F32, "0", 12, 0, &[4, 3], &[1, 4])),
            ("s", view(DType::F32, "0", 12, 11, &[], &[])),
            ("e", view(DType::F32, "0", 12, 12, &[0, 5], &[5, 1])),
        ]);
        let zip = zip_of(&[("m/data.pkl", &pickle), ("m/data/0", &data), ("m/version", b"3\n")]);
        let state = read_bytes(&zip).unwrap();
        let got = |k: &str| state.tensors[k].bytes(k).unwrap().into_owned();
        assert_eq!(got("a"), data);
        assert_eq!(got("b"), f32_bytes([4.0, 5.0, 6.0, 7.0]));
        assert_eq!(got("t"), f32_bytes([0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11].map(|i| i as f32)));
        assert_eq!(got("s"), f32_bytes([11.0]));
        assert!(got("e").is_empty());
        assert!(
            matches!(state.tensors["b"].source, ByteSource::Mapped { .. }),
            "contiguous views are zero-copy"
        );

        // Written back: a and b overlap in the mapping and share one storage; t is its own.
        let out = write_vec(&state);
        let mut z = zip::ZipArchive::new(Cursor::new(&out)).unwrap();
        let storages =
            z.file_names().filter(|n| n.as_ref().is_ok_and(|n| n.starts_with("archive/data/"))).count();
        assert_eq!(storages, 3, "a+b+s (s lies inside a), t, and the empty e");
        z.validate_header_consistency().unwrap();
        let back = read_bytes(&out).unwrap();
        for k in ["a", "b", "t", "s", "e"] {
            assert_eq!(back.tensors[k].bytes(k).unwrap(), state.tensors[k].bytes(k).unwrap(), "{k}");
            assert_eq!(back.tensors[k].shape, state.tensors[k].shape);
        }
    }

    #[test]
    fn identical_mapped_tensors_are_written_once() {
        let data = f32_bytes((0..8).map(|i| i as f32));
        let map = mmap_of(&data);
        let mut tensors = TensorMap::new();
        for (name, offset, len) in [("embed", 0, 32), ("lm_head", 0, 32), ("tail", 16, 16)] {
            let shape = vec![len / 4];
            tensors.insert(
                name.into(),
                TensorEntry::new(DType::F32, shape, ByteSource::mapped(map.clone(), offset, len), origin()),
            );
        }
        let state = TorchState::new(tensors, vec![]);
        let out = write_vec(&state);
        let z = zip::ZipArchive::new(Cursor::new(&out)).unwrap();
        assert_eq!(z.file_names().filter(|n| n.as_ref().is_ok_and(|n| n.contains("/data/"))).count(), 1);
        let back = read_bytes(&out).unwrap();
        assert_eq!(back.tensors["tail"].bytes("tail").unwrap(), &data[16..]);
        assert_eq!(back.tensors["lm_head"].bytes("lm_head").unwrap(), &data[..]);
    }

    #[test]
    fn arc_clones_of_owned_and_derived_sources_are_written_once() {
        let owned = entry(DType::BF16, vec![4, 2], 9);
        let cast = owned.cast("w", DType::F32).unwrap();
        let mut tensors = TensorMap::new();
        for (name, e) in [("a", &owned), ("b", &owned), ("c", &cast), ("d", &cast)] {
            tensors.insert(name.into(), e.clone());
        }
        let out = write_vec(&TorchState::new(tensors.clone(), vec![]));
        let z = zip::ZipArchive::new(Cursor::new(&out)).unwrap();
        assert_eq!(z.file_names().filter(|n| n.as_ref().is_ok_and(|n| n.contains("/data/"))).count(), 2);
        let back = read_bytes(&out).unwrap();
        for (k, t) in &tensors {
            assert_eq!(back.tensors[k].bytes(k).unwrap(), t.bytes(k).unwrap(), "{k}");
        }
    }

    #[test]
    fn records_follow_torch_order_and_alignment() {
        let mut tensors = TensorMap::new();
        tensors.insert("w".into(), entry(DType::BF16, vec![3, 5], 1));
        tensors.insert("b".into(), entry(DType::I64, vec![7], 2));
        let out = write_vec(&TorchState::new(tensors, vec![]));
        let mut z = zip::ZipArchive::new(Cursor::new(&out)).unwrap();
        let names: Vec<String> = z.file_names().map(|n| n.unwrap().into_owned()).collect();
        assert_eq!(
            names,
            ["archive/data.pkl", "archive/byteorder", "archive/data/0", "archive/data/1", "archive/version"]
        );
        for i in 0..z.len() {
            let f = z.by_index_raw(i).unwrap();
            assert_eq!(f.data_start().unwrap() % 64, 0, "{}", f.name().unwrap());
        }
    }

    #[test]
    fn forced_zip64_is_readable() {
        let mut tensors = TensorMap::new();
        tensors.insert("w".into(), entry(DType::F16, vec![4, 4], 3));
        let state = TorchState::new(tensors, vec!["w_extra._extra_state".into()]);
        let mut cur = Cursor::new(Vec::new());
        let n = write_with(&state, &mut cur, "archive", Path::new("x"), true).unwrap();
        let out = cur.into_inner();
        assert_eq!(n as usize, out.len());
        assert!(out.windows(4).any(|w| w == b"PK\x06\x06"), "zip64 end record present");
        let back = read_bytes(&out).unwrap();
        assert_eq!(back.tensors["w"].bytes("w").unwrap(), state.tensors["w"].bytes("w").unwrap());
        assert_eq!(back.none_keys, state.none_keys);
    }

    #[test]
    fn none_keys_sit_where_torch_puts_extra_state() {
        let mut tensors = TensorMap::new();
        for k in ["m.qkv.weight", "m.qkv.bias", "m.proj.weight", "m.core.inner.weight"] {
            tensors.insert(k.into(), entry(DType::F32, vec![1], 0));
        }
        let none = ["m.core._extra_state", "m.qkv._extra_state", "top", "m.proj._extra_state"];
        let state = TorchState::new(tensors, none.iter().map(|s| s.to_string()).collect());
        let order: Vec<&str> =
            ordered_entries(&state, Path::new("x")).unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            order,
            [
                "m.qkv.weight",
                "m.qkv.bias",
                "m.qkv._extra_state",
                "m.proj.weight",
                "m.proj._extra_state",
                "m.core._extra_state",
                "m.core.inner.weight",
                "top"
            ]
        );
        let back = read_bytes(&write_vec(&state)).unwrap();
        assert_eq!(
            back.none_keys,
            ["m.qkv._extra_state", "m.proj._extra_state", "m.core._extra_state", "top"]
        );
        let dup = TorchState::new(state.tensors.clone(), vec!["m.qkv.bias".into()]);
        assert!(matches!(encoded_len(&dup, "a"), Err(Error::Invalid { .. })));
    }

    #[test]
    fn non_tensor_values_are_skipped_and_extra_state_is_kept_as_none() {
        let bytes_io = Value::Object {
            class: Box::new(Value::global("_io", "BytesIO")),
            args: Box::new(Value::Tuple(vec![])),
            kwargs: None,
            state: Some(Box::new(Value::Tuple(vec![Value::Bytes(vec![1, 2]), Value::Int(0), Value::None]))),
        };
        let pickle = pkl(vec![
            ("w", view(DType::U8, "0", 2, 0, &[2], &[1])),
            ("x._extra_state", bytes_io),
            ("step", Value::Int(7)),
            ("name", Value::Str("llama".into())),
        ]);
        let zip = zip_of(&[("m/data.pkl", &pickle), ("m/data/0", &[9, 8]), ("m/.data/version", b"6\n")]);
        let state = read_bytes(&zip).unwrap();
        assert_eq!(state.tensors.len(), 1);
        assert_eq!(state.none_keys, ["x._extra_state"]);
        assert_eq!(
            state.skipped,
            [
                Skipped { key: "step".into(), what: "int 7".into() },
                Skipped { key: "name".into(), what: "str \"llama\"".into() }
            ]
        );
    }

    #[test]
    fn lightning_state_dict_is_flattened() {
        let inner = Value::Dict(vec![(Value::Str("layer.w".into()), view(DType::I8, "0", 3, 0, &[3], &[1]))]);
        let pickle = pkl(vec![("epoch", Value::Int(1)), ("state_dict", inner)]);
        let zip =
            zip_of(&[("ckpt/data.pkl", &pickle), ("ckpt/data/0", &[1, 2, 3]), ("ckpt/version", b"3\n")]);
        let state = read_bytes(&zip).unwrap();
        assert_eq!(state.tensors.keys().collect::<Vec<_>>(), ["layer.w"]);
        assert_eq!(state.skipped, [Skipped { key: "epoch".into(), what: "int 1".into() }]);
    }

    #[test]
    fn big_endian_files_are_swapped_lazily() {
        let data: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|f| f.to_be_bytes()).collect();
        let pickle = pkl(vec![("w", view(DType::F32, "0", 2, 0, &[2], &[1]))]);
        let zip = zip_of(&[
            ("m/data.pkl", &pickle),
            ("m/byteorder", b"big"),
            ("m/data/0", &data),
            ("m/version", b"3\n"),
        ]);
        let state = read_bytes(&zip).unwrap();
        assert_eq!(state.tensors["w"].bytes("w").unwrap(), f32_bytes([1.5, -2.0]));
    }

    #[test]
    fn hostile_and_broken_archives_are_named_errors() {
        // A data.pkl that calls os.system.
        let evil = P::new().global("os", "system").str("echo pwned").raw(b"\x85R").stop();
        let zip = zip_of(&[("m/data.pkl", &evil), ("m/version", b"3\n")]);
        match read_bytes(&zip) {
            Err(Error::ForbiddenGlobal { module, name, .. }) => {
                assert_eq!((module.as_str(), name.as_str()), ("os", "system"))
            }
            other => panic!("expected ForbiddenGlobal, got {other:?}"),
        }

        // Storage record missing.
        let pickle = pkl(vec![("w", view(DType::F32, "7", 4, 0, &[4], &[1]))]);
        let zip = zip_of(&[("m/data.pkl", &pickle), ("m/version", b"3\n")]);
        let err = read_bytes(&zip).unwrap_err();
        assert!(
            matches!(&err, Error::Missing { what, .. } if what.contains("m/data/7") && what.contains("'w'")),
            "{err}"
        );

        // View beyond its storage, and storage beyond its record.
        let data = f32_bytes([0.0; 4]);
        for (v, needle) in [
            (view(DType::F32, "0", 4, 2, &[3], &[1]), "reaches past storage"),
            (view(DType::F32, "0", 4, 0, &[2, 2], &[1, 3]), "reaches past storage"),
            (view(DType::F32, "0", 5, 0, &[4], &[1]), "holds 16 bytes"),
        ] {
            let pickle = pkl(vec![("w", v)]);
            let zip = zip_of(&[("m/data.pkl", &pickle), ("m/data/0", &data), ("m/version", b"3\n")]);
            let err = read_bytes(&zip).unwrap_err().to_string();
            assert!(err.contains("tensor 'w'") && err.contains(needle), "{err}");
        }

        // Truncated archive.
        let mut tensors = TensorMap::new();
        tensors.insert("w".into(), entry(DType::F32, vec![8], 5));
        let good = write_vec(&TorchState::new(tensors, vec![]));
        for cut in [good.len() - 1, good.len() / 2, 10] {
            let err = read_bytes(&good[..cut]).unwrap_err();
            assert!(matches!(err, Error::Malformed { format: "zip", .. }), "cut {cut}: {err}");
        }

        // Corrupted pickle bytes fail the CRC check.
        let mut bad = good.clone();
        let at = bad.windows(2).position(|w| w == [0x80, 0x02]).unwrap();
        bad[at + 2] ^= 0xff;
        assert!(read_bytes(&bad).unwrap_err().to_string().contains("CRC-32"));

        // A compressed entry (method 8 patched into both headers).
        let mut deflated = good.clone();
        for sig in [&b"PK\x03\x04"[..], b"PK\x01\x02"] {
            let at = deflated.windows(4).position(|w| w == sig).unwrap();
            let method = at + if sig[2] == 3 { 8 } else { 10 };
            deflated[method] = 8;
        }
        let err = read_bytes(&deflated).unwrap_err().to_string();
        assert!(err.contains("compressed") || err.contains("zip"), "{err}");

        // Legacy torch.save and non-zip input.
        let mut legacy = LEGACY_MAGIC.to_vec();
        legacy.extend_from_slice(&[0x50, 0x19, b'.']);
        assert!(matches!(read_bytes(&legacy), Err(Error::LegacyTorchFile { .. })));
        assert!(matches!(read_bytes(b"hello"), Err(Error::Malformed { format: FORMAT, .. })));

        // No version record; TorchScript archive.
        let pickle = pkl(vec![]);
        assert!(matches!(read_bytes(&zip_of(&[("m/data.pkl", &pickle)])), Err(Error::Missing { .. })));
        let ts = zip_of(&[("m/data.pkl", &pickle), ("m/constants.pkl", &pickle), ("m/version", b"3\n")]);
        assert!(read_bytes(&ts).unwrap_err().to_string().contains("TorchScript"));
    }

    #[test]
    fn write_file_names_the_archive_after_the_stem() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("model_weights.ckpt");
        let mut tensors = TensorMap::new();
        tensors.insert("w".into(), entry(DType::BF16, vec![2, 3], 4));
        write_file(&TorchState::new(tensors.clone(), vec![]), &dest, false).unwrap();
        let mut z = zip::ZipArchive::new(std::fs::File::open(&dest).unwrap()).unwrap();
        assert_eq!(z.by_index(0).unwrap().name().unwrap(), "model_weights/data.pkl");
        let ckpt = read_checkpoint(&dest).unwrap();
        assert_eq!(ckpt.meta.flavour, Flavour::TorchZip);
        assert_eq!(ckpt.tensors().unwrap()["w"].bytes("w").unwrap(), tensors["w"].bytes("w").unwrap());
        assert!(matches!(write_file(&TorchState::default(), &dest, false), Err(Error::OutputExists { .. })));
    }

    fn dtype() -> impl Strategy<Value = DType> {
        prop::sample::select(DType::ALL.to_vec())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        // read ∘ write = id for every dtype, scalars and empty tensors included; the written
        // length is what encoded_len predicted, also when the image starts mid-stream.
        #[test]
        fn write_then_read_is_identity(
            specs in prop::collection::vec((dtype(), prop::collection::vec(0usize..4, 0..4), any::<u8>()), 0..8),
            n_none in 0usize..3,
            lead in 0usize..700,
        ) {
            let mut tensors = TensorMap::new();
            for (i, (d, shape, seed)) in specs.into_iter().enumerate() {
                tensors.insert(format!("layer.{i}.weight"), entry(d, shape, seed));
            }
            let none: Vec<String> = (0..n_none).map(|j| format!("layer.{}._extra_state", j * 3)).collect();
            let state = TorchState::new(tensors, none);
            let predicted = encoded_len(&state, "archive").unwrap();
            let mut cur = Cursor::new(vec![0xAA; lead]);
            cur.set_position(lead as u64);
            let written = write_to(&state, &mut cur, "archive").unwrap();
            let buf = cur.into_inner();
            prop_assert_eq!(written, predicted);
            prop_assert_eq!(buf.len() as u64, lead as u64 + written);
            let back = read_mapped(mmap_of(&buf), lead, written as usize, origin()).unwrap();
            prop_assert_eq!(back.tensors.keys().collect::<Vec<_>>(), state.tensors.keys().collect::<Vec<_>>());
            for (name, t) in &state.tensors {
                let b = &back.tensors[name];
                prop_assert_eq!(b.dtype, t.dtype);
                prop_assert_eq!(&b.shape, &t.shape);
                prop_assert_eq!(b.bytes(name).unwrap(), t.bytes(name).unwrap());
            }
            prop_assert_eq!(&back.none_keys, &state.none_keys);
            prop_assert!(back.skipped.is_empty());
        }

        #[test]
        fn corrupted_archives_never_panic(at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut tensors = TensorMap::new();
            tensors.insert("a".into(), entry(DType::F32, vec![2, 3], 1));
            tensors.insert("b".into(), entry(DType::I64, vec![], 2));
            let mut buf = write_vec(&TorchState::new(tensors, vec!["c._extra_state".into()]));
            let i = at.index(buf.len());
            buf[i] = byte;
            if let Ok(state) = read_bytes(&buf) {
                for (name, t) in &state.tensors {
                    let _ = t.bytes(name);
                }
            }
        }
    }
}
