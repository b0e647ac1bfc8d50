//! Decoding `.metadata` (a pickled `torch.distributed.checkpoint.metadata.Metadata`) into the
//! tensors' global layouts and chunk locations, and proving a tensor's chunks tile it.

use crate::error::{Error, Result};
use crate::formats::pickle::Value;
use crate::DType;
use std::collections::HashMap;
use std::path::Path;

/// At most this many chunk-pair comparisons are spent proving one tensor's chunks do not
/// overlap; a regular (Megatron) layout needs a handful per chunk.
const MAX_OVERLAP_CHECKS: usize = 1 << 26;

/// What `.metadata` says about the tensors: each one's global layout, and where each chunk is.
pub(super) struct Index {
    pub(super) tensors: Vec<TensorMeta>,
    /// (key, chunk offsets) → location; torch's `MetadataIndex` compares by exactly these two.
    pub(super) storage: HashMap<(String, Vec<usize>), Location>,
}

pub(super) struct TensorMeta {
    pub(super) key: String,
    pub(super) dtype: DType,
    pub(super) shape: Vec<usize>,
    pub(super) chunks: Vec<ChunkMeta>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ChunkMeta {
    pub(super) offsets: Vec<usize>,
    pub(super) sizes: Vec<usize>,
}

impl ChunkMeta {
    pub(super) fn volume(&self) -> usize {
        self.sizes.iter().product()
    }
}

/// `_StorageInfo`: a byte range of one `.distcp` file.
#[derive(Clone, Debug)]
pub(super) struct Location {
    pub(super) file: String,
    pub(super) offset: usize,
    pub(super) length: usize,
}

/// Decoding errors for one pickle, all naming the `.metadata` file.
struct Decoder<'a> {
    origin: &'a Path,
}

impl Decoder<'_> {
    fn bad(&self, detail: impl Into<String>) -> Error {
        Error::malformed(self.origin, "torch_dist metadata", detail)
    }

    /// The attributes of a pickled dataclass instance of `class` (`NEWOBJ` then `BUILD` with a
    /// dict, or with a `(dict, slots dict)` pair).
    fn attrs<'v>(&self, v: &'v Value, class: &str, what: &str) -> Result<Attrs<'v>> {
        let Value::Object { class: c, state, .. } = v else {
            return Err(self.bad(format!("{what} is a {}, expected a {class} object", v.describe())));
        };
        let name = c.as_global().map(|(_, n)| n);
        if name != Some(class) {
            return Err(self.bad(format!("{what} is a {}, expected a {class} object", v.describe())));
        }
        let mut out = Vec::new();
        let mut add = |d: &'v Value| -> Result<()> {
            match d {
                Value::Dict(pairs) => {
                    for (k, v) in pairs {
                        if let Value::Str(k) = k {
                            out.push((k.as_str(), v));
                        }
                    }
                    Ok(())
                }
                Value::None => Ok(()),
                other => Err(self.bad(format!("{what} state is a {}, expected a dict", other.describe()))),
            }
        };
        match state.as_deref() {
            None => {}
            Some(Value::Tuple(parts)) if parts.len() == 2 => {
                add(&parts[0])?;
                add(&parts[1])?;
            }
            Some(d) => add(d)?,
        }
        Ok(Attrs { items: out })
    }

    fn field<'v>(&self, attrs: &Attrs<'v>, name: &str, what: &str) -> Result<&'v Value> {
        attrs.get(name).ok_or_else(|| self.bad(format!("{what} has no '{name}' field")))
    }

    fn count(&self, v: &Value, what: &str) -> Result<usize> {
        v.as_int()
            .and_then(|i| usize::try_from(i).ok())
            .ok_or_else(|| self.bad(format!("{what} is a {}, expected a non-negative int", v.describe())))
    }

    /// A `torch.Size(...)` (or a plain tuple/list) of non-negative ints.
    fn size(&self, v: &Value, what: &str) -> Result<Vec<usize>> {
        let items = match v {
            Value::Reduce { callable, args, .. } if callable.is_global("torch", "Size") => {
                match args.as_seq() {
                    Some([]) => &[][..],
                    Some([inner]) => inner
                        .as_seq()
                        .ok_or_else(|| self.bad(format!("{what}: torch.Size of a {}", inner.describe())))?,
                    _ => return Err(self.bad(format!("{what}: torch.Size with unexpected arguments"))),
                }
            }
            Value::Tuple(items) | Value::List(items) => items,
            other => return Err(self.bad(format!("{what} is a {}, expected a torch.Size", other.describe()))),
        };
        items.iter().map(|i| self.count(i, what)).collect()
    }

    fn string<'v>(&self, v: &'v Value, what: &str) -> Result<&'v str> {
        v.as_str().ok_or_else(|| self.bad(format!("{what} is a {}, expected a str", v.describe())))
    }

    /// The dtype of a `TensorProperties`, pickled by its `__getstate__` as
    /// `(dtype, layout, requires_grad, memory_format, pin_memory)` (or, by old torch, as a dict).
    fn dtype(&self, props: &Value, key: &str) -> Result<DType> {
        let what = format!("properties of '{key}'");
        let state = match props {
            Value::Object { class, state, .. }
                if class.as_global().map(|(_, n)| n) == Some("TensorProperties") =>
            {
                state
            }
            _ => {
                return Err(
                    self.bad(format!("{what} is a {}, expected a TensorProperties object", props.describe()))
                )
            }
        };
        let dtype = match state.as_deref() {
            Some(Value::Tuple(fields)) if !fields.is_empty() => &fields[0],
            _ => self.field(&self.attrs(props, "TensorProperties", &what)?, "dtype", &what)?,
        };
        match dtype.as_global() {
            Some(("torch", name)) => DType::from_torch_name(name).ok_or_else(|| Error::UnsupportedDtype {
                path: self.origin.to_path_buf(),
                tensor: key.to_string(),
                dtype: format!("torch.{name}"),
            }),
            _ => Err(self.bad(format!("{what}: dtype is a {}, expected a torch dtype", dtype.describe()))),
        }
    }
}

/// A dataclass instance's attributes, in pickle order.
struct Attrs<'v> {
    items: Vec<(&'v str, &'v Value)>,
}

impl<'v> Attrs<'v> {
    fn get(&self, name: &str) -> Option<&'v Value> {
        self.items.iter().rev().find(|(k, _)| *k == name).map(|(_, v)| *v)
    }
}

impl Index {
    pub(super) fn decode(root: &Value, origin: &Path) -> Result<Index> {
        let d = Decoder { origin };
        let meta = d.attrs(root, "Metadata", ".metadata")?;
        let Value::Dict(items) = d.field(&meta, "state_dict_metadata", "Metadata")? else {
            return Err(d.bad("state_dict_metadata is not a dict"));
        };
        let mut tensors = Vec::new();
        for (key, item) in items {
            let key = d.string(key, "a state_dict_metadata key")?;
            let class = match item {
                Value::Object { class, .. } => class.as_global().map(|(_, n)| n),
                _ => None,
            };
            match class {
                // A ShardedObject (Transformer Engine `_extra_state`, ...): not a tensor.
                Some("BytesStorageMetadata") => continue,
                Some("TensorStorageMetadata") => {}
                _ => {
                    let expected = "expected TensorStorageMetadata or BytesStorageMetadata";
                    return Err(d.bad(format!("'{key}' is described by a {}, {expected}", item.describe())));
                }
            }
            let what = format!("metadata of '{key}'");
            let a = d.attrs(item, "TensorStorageMetadata", &what)?;
            let dtype = d.dtype(d.field(&a, "properties", &what)?, key)?;
            let shape = d.size(d.field(&a, "size", &what)?, &format!("size of '{key}'"))?;
            let chunk_list = d.field(&a, "chunks", &what)?;
            let chunk_list = chunk_list.as_seq().ok_or_else(|| {
                d.bad(format!("chunks of '{key}' are a {}, expected a list", chunk_list.describe()))
            })?;
            let mut chunks = Vec::with_capacity(chunk_list.len());
            for c in chunk_list {
                let what = format!("a chunk of '{key}'");
                let a = d.attrs(c, "ChunkStorageMetadata", &what)?;
                let offsets = d.size(d.field(&a, "offsets", &what)?, &what)?;
                let sizes = d.size(d.field(&a, "sizes", &what)?, &what)?;
                chunks.push(ChunkMeta { offsets, sizes });
            }
            tensors.push(TensorMeta { key: key.to_string(), dtype, shape, chunks });
        }

        let Value::Dict(items) = d.field(&meta, "storage_data", "Metadata")? else {
            return Err(d.bad(
                "storage_data is not a dict (this checkpoint's storage reader is not the filesystem one)",
            ));
        };
        let mut storage = HashMap::with_capacity(items.len());
        for (index, info) in items {
            let a = d.attrs(index, "MetadataIndex", "a storage_data key")?;
            let fqn = d.string(d.field(&a, "fqn", "MetadataIndex")?, "MetadataIndex fqn")?;
            let offsets = match a.get("offset") {
                None | Some(Value::None) => Vec::new(),
                Some(v) => d.size(v, &format!("storage_data offset of '{fqn}'"))?,
            };
            let what = format!("storage of '{fqn}' at {offsets:?}");
            let s = d.attrs(info, "_StorageInfo", &what)?;
            match s.get("transform_descriptors") {
                None | Some(Value::None) => {}
                Some(Value::List(v) | Value::Tuple(v)) if v.is_empty() => {}
                Some(other) => {
                    return Err(Error::invalid(
                        origin,
                        format!(
                            "{what} is stored through transforms ({}), e.g. compression; only plain \
                             torch.save items are supported",
                            other.describe()
                        ),
                    ))
                }
            }
            let location = Location {
                file: d.string(d.field(&s, "relative_path", &what)?, &what)?.to_string(),
                offset: d.count(d.field(&s, "offset", &what)?, &format!("{what}: offset"))?,
                length: d.count(d.field(&s, "length", &what)?, &format!("{what}: length"))?,
            };
            storage.insert((fqn.to_string(), offsets), location);
        }
        Ok(Index { tensors, storage })
    }
}

// ---------------------------------------------------------------------------------------------
// Chunk layout
// ---------------------------------------------------------------------------------------------

/// Prove `chunks` tile `shape` exactly: each in bounds, no two overlapping, volumes summing to
/// the whole. (Without overlaps, a volume shortfall is a gap and there can be no excess.)
pub(super) fn check_tiling(shape: &[usize], chunks: &[ChunkMeta]) -> std::result::Result<(), String> {
    let n = shape.len();
    let total = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("shape overflows")?;
    let mut covered = 0usize;
    for c in chunks {
        if c.offsets.len() != n || c.sizes.len() != n {
            return Err(format!(
                "chunk at offsets {:?} with sizes {:?} does not have the tensor's {n} dimensions",
                c.offsets, c.sizes
            ));
        }
        for d in 0..n {
            if c.offsets[d].checked_add(c.sizes[d]).is_none_or(|end| end > shape[d]) {
                return Err(format!(
                    "chunk at offsets {:?} with sizes {:?} reaches outside the global shape {shape:?}",
                    c.offsets, c.sizes
                ));
            }
        }
        // In bounds, so the volume is at most `total` and cannot overflow.
        covered = covered.checked_add(c.volume()).ok_or("chunk volumes overflow")?;
    }
    check_no_overlap(chunks)?;
    if covered != total {
        return Err(format!(
            "its chunks cover {covered} of its {total} elements (a gap in the shape {shape:?})"
        ));
    }
    Ok(())
}

/// Sweep along dimension 0: only chunks whose first-axis ranges intersect can overlap, and in
/// Megatron layouts those are the few TP fragments of one layer.
fn check_no_overlap(chunks: &[ChunkMeta]) -> std::result::Result<(), String> {
    let mut order: Vec<&ChunkMeta> = chunks.iter().filter(|c| c.volume() > 0).collect();
    if order.first().is_some_and(|c| c.offsets.is_empty()) {
        // Scalars: any two chunks overlap.
        return match order.as_slice() {
            [_, _, ..] => Err("two chunks both hold the scalar".into()),
            _ => Ok(()),
        };
    }
    order.sort_by(|a, b| a.offsets.cmp(&b.offsets));
    let mut active: Vec<&ChunkMeta> = Vec::new();
    let mut budget = MAX_OVERLAP_CHECKS;
    for c in order {
        active.retain(|a| a.offsets[0] + a.sizes[0] > c.offsets[0]);
        for a in &active {
            budget = budget.checked_sub(1).ok_or_else(|| {
                format!(
                    "its chunk layout is too irregular to verify (over {MAX_OVERLAP_CHECKS} overlap checks)"
                )
            })?;
            let disjoint = (0..c.offsets.len()).any(|d| {
                a.offsets[d] + a.sizes[d] <= c.offsets[d] || c.offsets[d] + c.sizes[d] <= a.offsets[d]
            });
            if !disjoint {
                return Err(format!(
                    "chunks at offsets {:?} (sizes {:?}) and {:?} (sizes {:?}) overlap",
                    a.offsets, a.sizes, c.offsets, c.sizes
                ));
            }
        }
        active.push(c);
    }
    Ok(())
}
