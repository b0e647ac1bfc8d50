//! Reading: `data.pkl` decoded under torch's allow-list, each `_rebuild_tensor*` call checked
//! against its storage record and turned into a zero-copy range or a lazy gather.

use super::zip::Archive;
use super::{malformed, Skipped, TorchState};
use crate::checkpoint::{ByteSource, Checkpoint, Flavour, Meta, Parallelism, TensorEntry};
use crate::error::{Error, Result};
use crate::formats::pickle::{self, AllowList, Value};
use crate::DType;
use memmap2::Mmap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const ZIP_MAGIC: &[u8] = b"PK\x03\x04";
/// `torch.save` before 1.6 pickled a magic number first: `PROTO 2, LONG1 10 bytes, ...`.
pub(super) const LEGACY_MAGIC: &[u8] =
    &[0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8];

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
    let map = crate::formats::map_file(path)?;
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
    let Opened { archive, big_endian, root } = open(&map, offset, len, &origin)?;
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

/// Index the torch zip image at `[offset, offset + len)` of `map` whose top-level object is a
/// single tensor, as `torch.save(tensor)` writes it (each chunk of a torch.distributed.checkpoint
/// `.distcp` file is one). The tensor is decoded exactly as a state-dict entry of [`read_mapped`]
/// is: a zero-copy range when contiguous, else a lazy gather and/or byte swap.
pub fn read_mapped_tensor(
    map: Arc<Mmap>,
    offset: usize,
    len: usize,
    origin: Arc<Path>,
) -> Result<TensorEntry> {
    /// The name errors give the tensor: the file holds no key for it.
    const NAME: &str = "<top level>";
    let Opened { archive, big_endian, root } = open(&map, offset, len, &origin)?;
    let spec = tensor_spec(&root, NAME, &origin)?.ok_or_else(|| {
        Error::invalid(&*origin, format!("top-level object is a {}, expected a tensor", root.describe()))
    })?;
    let mut reader =
        TensorReader { map: &map, archive: &archive, origin: &origin, big_endian, storages: HashMap::new() };
    reader.entry(NAME, spec)
}

/// A torch zip image with its records indexed and its `data.pkl` decoded.
struct Opened {
    archive: Archive,
    big_endian: bool,
    root: Value,
}

/// Check the image at `[offset, offset + len)` of `map` is a `torch.save` zip (not a legacy
/// file, not TorchScript), validate its `version` and `byteorder` records and load `data.pkl`.
fn open(map: &Mmap, offset: usize, len: usize, origin: &Path) -> Result<Opened> {
    let image = offset
        .checked_add(len)
        .and_then(|end| map.get(offset..end))
        .ok_or_else(|| malformed(origin, "range lies outside the file"))?;
    if image.starts_with(LEGACY_MAGIC) {
        return Err(Error::LegacyTorchFile { path: origin.to_path_buf() });
    }
    if !image.starts_with(ZIP_MAGIC) {
        let head: Vec<String> = image.iter().take(4).map(|b| format!("{b:02x}")).collect();
        return Err(malformed(
            origin,
            format!("expected a zip local header (50 4b 03 04) at the start, found [{}]", head.join(" ")),
        ));
    }
    let archive = Archive::open(image, offset, origin)?;
    let member = |rel: &str| PathBuf::from(format!("{}:{}/{rel}", origin.display(), archive.prefix));

    if archive.get("constants.pkl").is_some() {
        return Err(Error::invalid(
            origin,
            "a TorchScript archive (has constants.pkl), not a torch.save checkpoint",
        ));
    }
    let version = archive
        .get(".data/version")
        .or_else(|| archive.get("version"))
        .ok_or_else(|| Error::missing(origin, format!("record '{}/version'", archive.prefix)))?;
    let text = archive.small(map, version, origin)?;
    match std::str::from_utf8(text).ok().map(str::trim).and_then(|s| s.parse::<u64>().ok()) {
        Some(v) if v >= 1 => {}
        _ => {
            return Err(malformed(
                origin,
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
        Some(rec) => match archive.small(map, rec, origin)? {
            b"little" => false,
            b"big" => true,
            other => {
                return Err(malformed(
                    origin,
                    format!("record '{}' should be 'little' or 'big', got {:?}", rec.name, lossy(other)),
                ))
            }
        },
    };
    let pkl = archive
        .get("data.pkl")
        .ok_or_else(|| Error::missing(origin, format!("record '{}/data.pkl'", archive.prefix)))?;
    let root = pickle::load(archive.small(map, pkl, origin)?, AllowList::TorchWeights, &member("data.pkl"))?;
    Ok(Opened { archive, big_endian, root })
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
    let bad = |detail: String| bad_tensor(origin, name, detail);
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
    let bad = |detail: String| bad_tensor(origin, name, detail);
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
        let bad = |detail: String| malformed(origin, format!("tensor '{name}': {detail}"));
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
                        malformed(&origin, format!("tensor '{name}': view lies outside the file"))
                    })?;
                    // A stride-0 view (`expand`) of a tiny storage may be far larger than the file;
                    // refuse what cannot be allocated rather than abort.
                    let mut out = gather(src, &shape, &stride, esize).ok_or_else(|| {
                        bad_tensor(&origin, &name, format!("its {} bytes cannot be allocated", numel * esize))
                    })?;
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

/// The C-contiguous copy of a strided view whose element 0 is at `src[0]`, or `None` when it
/// cannot be allocated. The caller has checked that every element lies inside `src`.
fn gather(src: &[u8], shape: &[usize], stride: &[usize], esize: usize) -> Option<Vec<u8>> {
    let numel: usize = shape.iter().product();
    let mut out = Vec::new();
    out.try_reserve_exact(numel * esize).ok()?;
    if numel == 0 {
        return Some(out);
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
        if !crate::transforms::advance(&mut index, outer) {
            return Some(out);
        }
    }
}

/// An [`Error::Invalid`] about tensor `name`.
fn bad_tensor(origin: &Path, name: &str, detail: String) -> Error {
    Error::invalid(origin, format!("tensor '{name}': {detail}"))
}
