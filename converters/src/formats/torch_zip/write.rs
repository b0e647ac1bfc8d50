//! Writing: the pickle and the storages planned from headers only, then streamed record by
//! record through the zip layout in [`super::zip`].

use super::zip::{crc32, ZipLayout};
use super::TorchState;
use crate::atomic::AtomicFile;
use crate::checkpoint::{ByteSource, Segment, TensorEntry, TensorMap};
use crate::error::{Error, IoContext, Result};
use crate::formats::pickle::{self, Value};
use crate::DType;
use memmap2::Mmap;
use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{Seek, Write};
use std::path::Path;
use std::sync::Arc;

/// Write `state` to `dest` atomically, with the archive directory named after the file stem as
/// torch does (`model_weights/` for `model_weights.ckpt`).
pub fn write_file(state: &TorchState, dest: &Path, overwrite: bool) -> Result<()> {
    let archive_name =
        dest.file_stem().and_then(|s| s.to_str()).filter(|s| !s.is_empty()).unwrap_or("archive").to_string();
    let mut out = AtomicFile::create(dest, overwrite)?;
    write_at(state, out.file(), 0, &archive_name, dest)?;
    out.commit()
}

/// Stream a torch zip image of `state` into `w` at its current position, with every record
/// under `<archive_name>/`; returns the bytes written (always [`encoded_len`]). Offsets inside
/// the archive are relative to that starting position, so `w` may be a window into a tar; the
/// position is read again at the end to check the length against the layout.
pub fn write_to<W: Write + Seek>(state: &TorchState, w: &mut W, archive_name: &str) -> Result<u64> {
    write_with(state, w, archive_name, Path::new(archive_name), false)
}

/// Write a torch zip image of `state` into `file` at byte `base` with positional writes, filling
/// records in parallel (every offset is known from headers, so records land in any order; the
/// CRC goes into each local header after its data is known). Returns the bytes written (always
/// [`encoded_len`]). At most [`crate::progress::WRITER_THREADS`] records are in memory at once.
pub fn write_at(
    state: &TorchState,
    file: &std::fs::File,
    base: u64,
    archive_name: &str,
    dest: &Path,
) -> Result<u64> {
    write_plan_at(&Plan::new(state, dest)?, file, base, archive_name, dest)
}

/// `torch.save(tensor)` of one tensor (`name` in errors) — a zip whose top-level object is the
/// tensor, as each chunk of a torch.distributed.checkpoint `.distcp` file is — written into
/// `file` at byte `base` like [`write_at`]. Returns the bytes written ([`tensor_encoded_len`]).
pub fn write_tensor_at(
    name: &str,
    entry: &TensorEntry,
    file: &std::fs::File,
    base: u64,
    archive_name: &str,
    dest: &Path,
) -> Result<u64> {
    write_plan_at(&Plan::bare(name, entry, dest)?, file, base, archive_name, dest)
}

/// The exact length [`write_tensor_at`] writes, from headers only.
pub fn tensor_encoded_len(name: &str, entry: &TensorEntry, archive_name: &str) -> Result<u64> {
    let dest = Path::new(archive_name);
    let plan = Plan::bare(name, entry, dest)?;
    Ok(layout_of(&plan.records(archive_name, dest)?, false).total)
}

fn write_plan_at(
    plan: &Plan<'_>,
    file: &std::fs::File,
    base: u64,
    archive_name: &str,
    dest: &Path,
) -> Result<u64> {
    use rayon::prelude::*;
    use std::os::unix::fs::FileExt;
    let records = plan.records(archive_name, dest)?;
    let layout = layout_of(&records, false);
    let largest = records.iter().map(|r| r.size).max().unwrap_or(0);
    let budget = crate::progress::Budget::new(largest);
    let crcs = crate::progress::writer_pool().install(|| {
        records
            .par_iter()
            .zip(&layout.entries)
            .map(|(rec, entry)| {
                let _room = budget.acquire(rec.size);
                // The data first (streamed, CRC on the way), then the local header that holds the CRC.
                let at = base + entry.offset();
                let data_at = at + entry.local_header(0).len() as u64;
                let mut sink = crate::sink::PositionalSink::new(file, dest, data_at, true);
                plan.stream(&rec.content, &mut sink)?;
                let written = sink.pos() - data_at;
                if written != rec.size {
                    return Err(Error::invalid(
                        dest,
                        format!("record '{}' produced {written} bytes, expected {}", rec.name, rec.size),
                    ));
                }
                let crc = sink.crc().expect("the sink was asked for a CRC");
                file.write_all_at(&entry.local_header(crc), at).at(dest)?;
                sink.start_writeback();
                crate::progress::tensor_written(rec.size);
                Ok(crc)
            })
            .collect::<Result<Vec<u32>>>()
    })?;
    let mut tail = Vec::new();
    for (entry, crc) in layout.entries.iter().zip(&crcs) {
        tail.extend_from_slice(&entry.central_header(*crc));
    }
    tail.extend_from_slice(&layout.end_records());
    let central = super::zip::EntryLayout::central_offset(&layout);
    file.write_all_at(&tail, base + central).at(dest)?;
    if central + tail.len() as u64 != layout.total {
        return Err(Error::invalid(
            dest,
            format!("wrote {} bytes, layout predicted {}", central + tail.len() as u64, layout.total),
        ));
    }
    Ok(layout.total)
}

/// The exact number of bytes [`write_to`] produces for `state`, computed from headers only.
pub fn encoded_len(state: &TorchState, archive_name: &str) -> Result<u64> {
    let dest = Path::new(archive_name);
    let plan = Plan::new(state, dest)?;
    Ok(layout_of(&plan.records(archive_name, dest)?, false).total)
}

/// `torch.save(value)` of a value that holds no tensors (`None`, `{}`: Megatron's `common.pt` and
/// Transformer Engine's empty `_extra_state` objects), as bytes.
pub fn save_plain(value: &Value, archive_name: &str) -> Result<Vec<u8>> {
    let dest = Path::new(archive_name);
    let plan = Plan { pickle: pickle::dump(value, dest)?, storages: Vec::new() };
    let mut out = std::io::Cursor::new(Vec::new());
    write_plan(&plan, &mut out, archive_name, dest, false)?;
    Ok(out.into_inner())
}

/// [`write_to`], optionally with ZIP64 fields on every entry (so tests cover that path without
/// writing 4 GiB).
pub(super) fn write_with<W: Write + Seek>(
    state: &TorchState,
    w: &mut W,
    archive_name: &str,
    dest: &Path,
    force_zip64: bool,
) -> Result<u64> {
    write_plan(&Plan::new(state, dest)?, w, archive_name, dest, force_zip64)
}

fn write_plan<W: Write + Seek>(
    plan: &Plan<'_>,
    w: &mut W,
    archive_name: &str,
    dest: &Path,
    force_zip64: bool,
) -> Result<u64> {
    let records = plan.records(archive_name, dest)?;
    let layout = layout_of(&records, force_zip64);
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
        let crc = crc32(&bytes);
        w.write_all(&entry.local_header(crc)).at(dest)?;
        w.write_all(&bytes).at(dest)?;
        drop(bytes);
        crate::progress::tensor_written(rec.size);
        crcs.push(crc);
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

fn layout_of(records: &[RecordPlan], force_zip64: bool) -> ZipLayout {
    ZipLayout::new(records.iter().map(|r| (r.name.as_str(), r.size)), force_zip64)
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
    /// The plan of `torch.save(entry)`: the tensor itself is the pickled object.
    fn bare(name: &'a str, entry: &'a TensorEntry, dest: &Path) -> Result<Plan<'a>> {
        if let Some(n) = entry.source.known_len() {
            entry.check_len(name, n)?;
        }
        let size = entry.nbytes() as u64;
        let value = tensor_value(entry, 0, size / entry.dtype.size() as u64, 0, dest)?;
        Ok(Plan {
            pickle: pickle::dump(&value, dest)?,
            storages: vec![(StorageSource::Tensor { name, entry }, size)],
        })
    }

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

    /// Stream a record's bytes into `sink` (see [`crate::sink`]).
    fn stream(&self, content: &Content, sink: &mut crate::sink::PositionalSink<'_>) -> Result<()> {
        match content {
            Content::Pickle => sink.put(Segment::Bytes(&self.pickle)),
            Content::Text(t) => sink.put(Segment::Bytes(t)),
            Content::Storage(key) => match &self.storages[*key].0 {
                StorageSource::Range { map, offset, len } => {
                    sink.put(Segment::Mapped { map, offset: *offset, len: *len })
                }
                StorageSource::Tensor { name, entry } => entry.stream(name, &mut |seg| sink.put(seg)),
            },
        }
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
pub(super) fn ordered_entries<'a>(
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
