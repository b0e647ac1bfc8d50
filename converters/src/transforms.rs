//! Pure, lazy tensor transforms, named as inverse pairs (design rules 4 and 7).
//!
//! | forward | inverse | what |
//! |---|---|---|
//! | [`slice_rows`] / [`trim_rows`] | [`concat_rows`] / [`pad_rows`] | dim-0 ranges, zero padding |
//! | [`slice_cols`] | [`concat_cols`] | dim-1 ranges of 2-D tensors |
//! | [`fuse_qkv`] | [`split_qkv`] | per-query-group QKV interleave (formats.md §3.4) |
//! | [`fuse_glu`] | [`split_glu`] | `[gate; up]` fc1 (§3.5) |
//! | [`permute_rotary`] | [`unpermute_rotary`] | Meta interleaved ⇄ HF rotate-half rows (§3.6) |
//!
//! Every function validates shapes up front, so a bad shape is an error while the plan is built,
//! before any byte moves, and returns a [`TensorEntry`] whose bytes are produced on demand from its
//! inputs. Nothing looks at values: rows (or runs of elements) move by byte size, so every dtype
//! works. Casts live on [`TensorEntry::cast`].
//!
//! Internally each transform is a *gather plan*: a list of byte runs taken from the inputs, plus
//! runs of zeros. Turning a plan into a source
//!
//! * keeps a single contiguous range of a memory-mapped input as a `Mapped` range (no copy at
//!   all), also when ranges become contiguous again (concatenating the TP slices of one mapped
//!   tensor gives back the mapped original), and passes a whole input through unchanged;
//! * otherwise allocates exactly the output once per read, reading mapped and owned inputs in
//!   place and materialising each `Derived` input once, dropped as soon as its last run is copied.
//!
//! Plans hold one entry per run of rows, not per row (strided runs cover row permutations), so
//! planning a whole 70B model stays small.
//!
//! Plans compose: a contiguous range taken from an input that is itself a plan is planned from
//! that plan's inputs (`Gather::run`), so slicing one layer out of a layer-stacked array that
//! `gather_boxes` assembles from chunk files (distributed checkpoints) reads that layer's
//! chunks only, and a slice of a concatenation of mapped tensors is a mapped range again.

use crate::checkpoint::{ByteSource, Produce, Segment, TensorEntry};
use crate::error::{Error, Result};
use crate::DType;
use memmap2::Mmap;
use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;

// ------------------------------------------------------------------------------------------------
// Gather plans

/// Where the bytes of a run come from, resolved when the plan is built.
#[derive(Clone)]
enum Src {
    /// A file mapping; run offsets are absolute within the map.
    Map(Arc<Mmap>),
    /// Bytes in memory; offsets are within the buffer.
    Owned(Arc<[u8]>),
    /// A computed tensor; offsets are within its bytes. `label` names it in length errors.
    Derived { label: String, entry: TensorEntry },
}

impl Src {
    /// Whether two sources are the same bytes (so their runs may coalesce and a derived input is
    /// materialised once).
    fn same(&self, other: &Src) -> bool {
        match (self, other) {
            (Src::Map(a), Src::Map(b)) => Arc::ptr_eq(a, b),
            (Src::Owned(a), Src::Owned(b)) => Arc::ptr_eq(a, b),
            (Src::Derived { entry: a, .. }, Src::Derived { entry: b, .. }) => match (&a.source, &b.source) {
                (ByteSource::Derived(f), ByteSource::Derived(g)) => {
                    Arc::ptr_eq(f, g) && a.nbytes() == b.nbytes()
                }
                _ => false,
            },
            _ => false,
        }
    }

    /// The source's bytes: borrowed for maps and owned buffers, computed (and length-checked)
    /// for derived inputs.
    fn bytes(&self) -> Result<Cow<'_, [u8]>> {
        match self {
            Src::Map(map) => Ok(Cow::Borrowed(&map[..])),
            Src::Owned(b) => Ok(Cow::Borrowed(b)),
            Src::Derived { label, entry } => entry.bytes(label),
        }
    }
}

/// `len` bytes at `start` of source `src`, repeated every `stride` bytes (see [`Piece::Zip`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    src: usize,
    start: usize,
    len: usize,
    stride: usize,
}

/// One stretch of output bytes.
#[derive(Clone, Debug)]
enum Piece {
    /// This many zero bytes.
    Zeros(usize),
    /// For `step` in `0..count`, for each run: bytes `[start + step·stride, +len)` of its source.
    /// One run with `count = 1` is a plain contiguous copy; several runs zip rows together
    /// (column concatenation, rotary interleave).
    Zip { count: usize, runs: Vec<Run> },
}

impl Piece {
    fn len(&self) -> usize {
        match self {
            Piece::Zeros(n) => *n,
            Piece::Zip { count, runs } => count * runs.iter().map(|r| r.len).sum::<usize>(),
        }
    }
}

/// A gather plan under construction.
#[derive(Default)]
struct Gather {
    srcs: Vec<Src>,
    pieces: Vec<Piece>,
}

impl Gather {
    /// Register input `t` (`label` of output `name`, e.g. `q` of `layers.0.qkv`). Returns its
    /// source index and the offset of its first byte within that source. Inputs with a known
    /// length are length-checked here; derived ones when read.
    fn input(&mut self, name: &str, label: &str, t: &TensorEntry) -> Result<(usize, usize)> {
        let label = format!("{name} ({label})");
        let label = label.as_str();
        let (src, base) = match &t.source {
            ByteSource::Mapped { map, offset, len } => {
                t.check_len(label, *len)?;
                (Src::Map(map.clone()), *offset)
            }
            ByteSource::Owned(b) => {
                t.check_len(label, b.len())?;
                (Src::Owned(b.clone()), 0)
            }
            ByteSource::Derived(_) => (Src::Derived { label: label.to_string(), entry: t.clone() }, 0),
        };
        Ok((self.add(src), base))
    }

    /// The index of `src`, registered once.
    fn add(&mut self, src: Src) -> usize {
        if let Some(i) = self.srcs.iter().position(|s| s.same(&src)) {
            return i;
        }
        self.srcs.push(src);
        self.srcs.len() - 1
    }

    /// Append a contiguous run. A run of an input that is itself a gather plan is planned from
    /// that plan's inputs where its pieces allow ([`Plan::sub_range`]): slicing one layer out of
    /// a layer-stacked array assembled from chunk files then reads those files' ranges, instead
    /// of producing the whole array for every layer.
    fn run(&mut self, src: usize, start: usize, len: usize) {
        if let Src::Derived { entry, .. } = &self.srcs[src] {
            if let ByteSource::Derived(producer) = &entry.source {
                let producer = producer.clone();
                let inner = producer.as_any().and_then(|a| a.downcast_ref::<Plan>());
                if let Some((inner, pieces)) = inner.and_then(|p| Some((p, p.sub_range(start, len)?))) {
                    let mut index = vec![None; inner.srcs.len()];
                    for piece in pieces {
                        let piece = match piece {
                            Piece::Zip { count, runs } => {
                                let runs = runs
                                    .into_iter()
                                    .map(|r| {
                                        let src = *index[r.src]
                                            .get_or_insert_with(|| self.add(inner.srcs[r.src].clone()));
                                        Run { src, ..r }
                                    })
                                    .collect();
                                Piece::Zip { count, runs }
                            }
                            zeros => zeros,
                        };
                        self.push(piece);
                    }
                    return;
                }
            }
        }
        self.push(Piece::Zip { count: 1, runs: vec![Run { src, start, len, stride: len }] });
    }

    /// Append a piece, normalising it (empty pieces vanish, a strided run without gaps becomes
    /// contiguous) and coalescing it with the previous piece where the bytes are adjacent.
    fn push(&mut self, piece: Piece) {
        let piece = match piece {
            Piece::Zeros(0) => return,
            Piece::Zeros(n) => Piece::Zeros(n),
            Piece::Zip { count, mut runs } => {
                runs.retain(|r| r.len > 0);
                if count == 0 || runs.is_empty() {
                    return;
                }
                if count == 1 && runs.len() > 1 {
                    for r in runs {
                        self.run(r.src, r.start, r.len);
                    }
                    return;
                }
                match runs.as_slice() {
                    [r] if count == 1 || r.len == r.stride => {
                        let len = r.len * count;
                        Piece::Zip {
                            count: 1,
                            runs: vec![Run { src: r.src, start: r.start, len, stride: len }],
                        }
                    }
                    _ => Piece::Zip { count, runs },
                }
            }
        };
        match (self.pieces.last_mut(), &piece) {
            (Some(Piece::Zeros(a)), Piece::Zeros(b)) => {
                *a += b;
                return;
            }
            (Some(Piece::Zip { count: 1, runs: prev }), Piece::Zip { count: 1, runs: next }) => {
                if let ([p], [n]) = (prev.as_mut_slice(), next.as_slice()) {
                    if p.src == n.src && p.start + p.len == n.start {
                        p.len += n.len;
                        p.stride = p.len;
                        return;
                    }
                }
            }
            _ => {}
        }
        self.pieces.push(piece);
    }

    /// The finished tensor. Zero-copy where the plan allows it, a `Derived` gather otherwise.
    fn finish(self, name: &str, dtype: DType, shape: Vec<usize>, origin: Arc<Path>) -> TensorEntry {
        let len: usize = self.pieces.iter().map(Piece::len).sum();
        debug_assert_eq!(len, shape.iter().product::<usize>() * dtype.size(), "plan for '{name}'");
        let direct = match self.pieces.as_slice() {
            [] => Some(ByteSource::owned(Vec::new())),
            [Piece::Zip { count: 1, runs }] => match runs.as_slice() {
                [r] => match &self.srcs[r.src] {
                    Src::Map(map) => Some(ByteSource::mapped(map.clone(), r.start, r.len)),
                    Src::Owned(b) if r.start == 0 && r.len == b.len() => Some(ByteSource::Owned(b.clone())),
                    Src::Derived { entry, .. } if r.start == 0 && r.len == entry.nbytes() => {
                        Some(entry.source.clone())
                    }
                    _ => None,
                },
                _ => None,
            },
            _ => None,
        };
        let source = match direct {
            Some(source) => source,
            None => {
                let mut last_use = vec![0; self.srcs.len()];
                for (i, piece) in self.pieces.iter().enumerate() {
                    if let Piece::Zip { runs, .. } = piece {
                        for r in runs {
                            last_use[r.src] = i;
                        }
                    }
                }
                let plan = Plan {
                    name: name.to_string(),
                    origin: origin.clone(),
                    srcs: self.srcs,
                    pieces: self.pieces,
                    last_use,
                    len,
                };
                ByteSource::produced(plan)
            }
        };
        TensorEntry::new(dtype, shape, source, origin)
    }
}

/// A finished gather plan, run each time the output's bytes are asked for.
struct Plan {
    name: String,
    origin: Arc<Path>,
    srcs: Vec<Src>,
    pieces: Vec<Piece>,
    /// Index of the last piece that reads each source; derived inputs are dropped after it.
    last_use: Vec<usize>,
    /// Output length in bytes.
    len: usize,
}

impl Plan {
    /// Bytes `start..start + len` of the output as pieces over this plan's own inputs, where the
    /// range cuts no strided piece mid-step; `None` otherwise (the caller then reads the output).
    fn sub_range(&self, start: usize, len: usize) -> Option<Vec<Piece>> {
        let end = start.checked_add(len).filter(|&e| e <= self.len)?;
        let mut out = Vec::new();
        let mut at = 0;
        for piece in &self.pieces {
            let (from, to) = (at, at + piece.len());
            at = to;
            if to <= start || from >= end {
                continue;
            }
            let (s, e) = (start.max(from) - from, end.min(to) - from);
            match piece {
                Piece::Zeros(_) => out.push(Piece::Zeros(e - s)),
                Piece::Zip { count: 1, runs } if runs.len() == 1 => {
                    let r = runs[0];
                    out.push(Piece::Zip {
                        count: 1,
                        runs: vec![Run { start: r.start + s, len: e - s, stride: e - s, ..r }],
                    });
                }
                Piece::Zip { runs, .. } => {
                    let step: usize = runs.iter().map(|r| r.len).sum();
                    if step == 0 || s % step != 0 || e % step != 0 {
                        return None;
                    }
                    let skip = s / step;
                    let runs = runs.iter().map(|r| Run { start: r.start + skip * r.stride, ..*r }).collect();
                    out.push(Piece::Zip { count: (e - s) / step, runs });
                }
            }
        }
        Some(out)
    }

    fn internal(&self, what: &str) -> Error {
        Error::invalid(&*self.origin, format!("tensor '{}': internal gather error: {what}", self.name))
    }

    fn run(&self) -> Result<Vec<u8>> {
        // A sub-range of one derived input: reuse its buffer instead of copying out of it.
        if let [Piece::Zip { count: 1, runs }] = self.pieces.as_slice() {
            if let [r] = runs.as_slice() {
                if let Src::Derived { label, entry } = &self.srcs[r.src] {
                    let mut v = entry.bytes(label)?.into_owned();
                    if r.start + r.len > v.len() {
                        return Err(self.internal("run past the end of its input"));
                    }
                    v.truncate(r.start + r.len);
                    v.drain(..r.start);
                    return Ok(v);
                }
            }
        }
        let mut out = Vec::with_capacity(self.len);
        let mut held: Vec<Option<Cow<'_, [u8]>>> = vec![None; self.srcs.len()];
        for (i, piece) in self.pieces.iter().enumerate() {
            match piece {
                Piece::Zeros(n) => out.resize(out.len() + n, 0),
                Piece::Zip { count, runs } => {
                    for r in runs {
                        if held[r.src].is_none() {
                            held[r.src] = Some(self.srcs[r.src].bytes()?);
                        }
                    }
                    let mut bufs = Vec::with_capacity(runs.len());
                    for r in runs {
                        bufs.push(held[r.src].as_deref().ok_or_else(|| self.internal("input not loaded"))?);
                    }
                    for step in 0..*count {
                        for (r, buf) in runs.iter().zip(&bufs) {
                            let at = r.start + step * r.stride;
                            let chunk = buf
                                .get(at..at + r.len)
                                .ok_or_else(|| self.internal("run past the end of its input"))?;
                            out.extend_from_slice(chunk);
                        }
                    }
                    for r in runs {
                        if self.last_use[r.src] == i {
                            held[r.src] = None;
                        }
                    }
                }
            }
        }
        if out.len() != self.len {
            return Err(self.internal(&format!("produced {} bytes, expected {}", out.len(), self.len)));
        }
        Ok(out)
    }
}

/// Bytes a strided gather assembles before handing them on: big enough that a writer's syscalls
/// are few, small enough to stay in cache and never to matter for peak memory. Tests use a tiny
/// chunk so that their small tensors cross chunk boundaries.
const STREAM_CHUNK: usize = if cfg!(test) { 7 } else { 4 << 20 };

impl Produce for Plan {
    fn produce(&self) -> Result<Vec<u8>> {
        self.run()
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    /// Contiguous runs go out as they are (a mapped run as a [`Segment::Mapped`], which a writer
    /// can copy file to file); strided runs are assembled [`STREAM_CHUNK`] bytes at a time. So
    /// streaming a plan never holds the whole output, unlike [`Plan::run`].
    fn stream(&self, emit: &mut dyn FnMut(Segment<'_>) -> Result<()>) -> Result<()> {
        let mut chunk: Vec<u8> = Vec::new();
        let mut held: Vec<Option<Cow<'_, [u8]>>> = vec![None; self.srcs.len()];
        let flush = |chunk: &mut Vec<u8>, emit: &mut dyn FnMut(Segment<'_>) -> Result<()>| {
            if !chunk.is_empty() {
                emit(Segment::Bytes(chunk))?;
                chunk.clear();
            }
            Ok::<(), Error>(())
        };
        let mut sent = 0usize;
        for (i, piece) in self.pieces.iter().enumerate() {
            match piece {
                Piece::Zeros(n) => {
                    flush(&mut chunk, emit)?;
                    emit(Segment::Zeros(*n))?;
                }
                Piece::Zip { count, runs } => {
                    for r in runs {
                        if held[r.src].is_none() && !matches!(self.srcs[r.src], Src::Map(_)) {
                            held[r.src] = Some(self.srcs[r.src].bytes()?);
                        }
                    }
                    let slice = |r: &Run, step: usize| -> Result<&[u8]> {
                        let at = r.start + step * r.stride;
                        let buf: &[u8] = match (&self.srcs[r.src], &held[r.src]) {
                            (Src::Map(map), _) => map,
                            (_, Some(b)) => b,
                            (_, None) => return Err(self.internal("input not loaded")),
                        };
                        buf.get(at..at + r.len).ok_or_else(|| self.internal("run past the end of its input"))
                    };
                    if let ([r], 1) = (runs.as_slice(), *count) {
                        flush(&mut chunk, emit)?;
                        let bytes = slice(r, 0)?;
                        match &self.srcs[r.src] {
                            Src::Map(map) => {
                                emit(Segment::Mapped { map, offset: r.start, len: bytes.len() })?
                            }
                            _ => emit(Segment::Bytes(bytes))?,
                        }
                    } else {
                        if chunk.capacity() == 0 {
                            chunk.reserve_exact(STREAM_CHUNK.min(self.len));
                        }
                        for step in 0..*count {
                            for r in runs {
                                chunk.extend_from_slice(slice(r, step)?);
                            }
                            if chunk.len() >= STREAM_CHUNK {
                                flush(&mut chunk, emit)?;
                            }
                        }
                    }
                    for r in runs {
                        if self.last_use[r.src] == i {
                            held[r.src] = None;
                        }
                    }
                }
            }
            sent += piece.len();
        }
        flush(&mut chunk, emit)?;
        if sent != self.len {
            return Err(self.internal(&format!("streamed {sent} bytes, expected {}", self.len)));
        }
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------------
// Row plans: every output row has the same trailing dims and dtype.

/// `[*, a, b]`-style rendering of "any dim 0, these trailing dims".
fn any_rows(trailing: &[usize]) -> String {
    let mut s = String::from("[*");
    for d in trailing {
        s.push_str(&format!(", {d}"));
    }
    s.push(']');
    s
}

/// An error about tensor `name`, attributed to `origin`.
pub(crate) fn bad(origin: &Path, name: &str, detail: impl std::fmt::Display) -> Error {
    Error::invalid(origin, format!("tensor '{name}': {detail}"))
}

/// Rows (dim 0) of `t`; an error naming `label` for a scalar.
fn rows_of(name: &str, label: &str, t: &TensorEntry) -> Result<usize> {
    match t.shape.first() {
        Some(&rows) => Ok(rows),
        None => Err(bad(&t.origin, name, format!("{label} is a scalar; expected at least 1 dimension"))),
    }
}

/// Builds a tensor row block by row block: rows of inputs that share its dtype and trailing dims,
/// and zero rows.
pub(crate) struct RowPlan<'a> {
    name: &'a str,
    dtype: DType,
    /// Dims after dim 0, shared by every input.
    trailing: Vec<usize>,
    /// Bytes per row.
    row_bytes: usize,
    origin: Arc<Path>,
    /// Rows planned so far.
    rows: usize,
    gather: Gather,
}

impl<'a> RowPlan<'a> {
    /// An empty plan for tensor `name` whose rows look like the rows of `like` (rank ≥ 1).
    pub(crate) fn like(name: &'a str, label: &str, like: &TensorEntry) -> Result<Self> {
        rows_of(name, label, like)?;
        let trailing = like.shape[1..].to_vec();
        let row_bytes = trailing.iter().product::<usize>() * like.dtype.size();
        Ok(RowPlan {
            name,
            dtype: like.dtype,
            trailing,
            row_bytes,
            origin: like.origin.clone(),
            rows: 0,
            gather: Gather::default(),
        })
    }

    /// Register `t`, checking dtype and trailing dims; returns (source, base offset, rows of t).
    fn input(&mut self, label: &str, t: &TensorEntry) -> Result<(usize, usize, usize)> {
        let rows = rows_of(self.name, label, t)?;
        if t.dtype != self.dtype || t.shape[1..] != self.trailing[..] {
            return Err(bad(
                &t.origin,
                self.name,
                format!(
                    "{label} is {} {:?}, expected {} {}",
                    t.dtype,
                    t.shape,
                    self.dtype,
                    any_rows(&self.trailing)
                ),
            ));
        }
        let (src, base) = self.gather.input(self.name, label, t)?;
        Ok((src, base, rows))
    }

    /// Append rows `start..end` of `t`.
    pub(crate) fn rows(&mut self, label: &str, t: &TensorEntry, start: usize, end: usize) -> Result<()> {
        let (src, base, rows) = self.input(label, t)?;
        if start > end || end > rows {
            return Err(bad(
                &t.origin,
                self.name,
                format!(
                    "rows {start}..{end} are out of range for {label} with {rows} rows (shape {:?})",
                    t.shape
                ),
            ));
        }
        self.gather.run(src, base + start * self.row_bytes, (end - start) * self.row_bytes);
        self.rows += end - start;
        Ok(())
    }

    /// Append every row of `t`.
    pub(crate) fn all_rows(&mut self, label: &str, t: &TensorEntry) -> Result<()> {
        let rows = rows_of(self.name, label, t)?;
        self.rows(label, t, 0, rows)
    }

    /// Append `rows` zero rows.
    pub(crate) fn zeros(&mut self, rows: usize) {
        self.gather.push(Piece::Zeros(rows * self.row_bytes));
        self.rows += rows;
    }

    /// Append `count · starts.len()` single rows of `t`: for step `s`, for each `start` in
    /// `starts`, row `start + s·step` (row permutations without one plan entry per row).
    fn zip_rows(
        &mut self,
        label: &str,
        t: &TensorEntry,
        count: usize,
        starts: &[usize],
        step: usize,
    ) -> Result<()> {
        let (src, base, rows) = self.input(label, t)?;
        if let Some(&max) = starts.iter().max() {
            if count > 0 && max + (count - 1) * step >= rows {
                return Err(bad(&t.origin, self.name, format!("row gather past the {rows} rows of {label}")));
            }
        }
        let rb = self.row_bytes;
        let runs =
            starts.iter().map(|&s| Run { src, start: base + s * rb, len: rb, stride: step * rb }).collect();
        self.gather.push(Piece::Zip { count, runs });
        self.rows += count * starts.len();
        Ok(())
    }

    /// The planned tensor, `[rows, trailing…]`.
    pub(crate) fn finish(self) -> TensorEntry {
        let mut shape = Vec::with_capacity(1 + self.trailing.len());
        shape.push(self.rows);
        shape.extend_from_slice(&self.trailing);
        self.gather.finish(self.name, self.dtype, shape, self.origin)
    }
}

// ------------------------------------------------------------------------------------------------
// Chunked arrays

/// Step a C-order odometer `index` over the box `dims` (last axis fastest). Returns `false` when
/// it wrapped back to all zeros, i.e. every index has been visited (at once for no axes).
pub(crate) fn advance(index: &mut [usize], dims: &[usize]) -> bool {
    for d in (0..index.len()).rev() {
        index[d] += 1;
        if index[d] < dims[d] {
            return true;
        }
        index[d] = 0;
    }
    false
}

/// One stored chunk of a chunked array (zarr, torch_dist): where it sits in the array, how much
/// of it lies inside (zarr stores edge chunks full size), and its own C-order shape.
pub(crate) struct Placed<'a> {
    /// Index of the chunk's first element in the array.
    pub offsets: &'a [usize],
    /// Elements of the chunk inside the array, per axis.
    pub extent: &'a [usize],
    /// The chunk's stored shape (≥ `extent`), whose C-order strides address its bytes.
    pub storage: &'a [usize],
    /// The chunk's bytes (element count = the product of `storage`).
    pub tensor: &'a TensorEntry,
}

/// Arrays whose plan would take more than this many (index, chunk) visits fall back to
/// assembling in memory: it bounds planning work and plan size for absurd shapes.
const MAX_BOX_WORK: usize = 1 << 22;

/// A C-order array of `shape` from chunks that tile it (checked by the caller), as a gather plan:
/// per index of the axes before the last two and per band of rows of the second-to-last axis,
/// one strided piece that zips the chunks side by side along the last axis. Slices of the result
/// (one layer of a layer-stacked array) are planned from the chunks directly ([`Gather::run`]).
/// `None` when planning would exceed [`MAX_BOX_WORK`] or the chunks leave a gap in a band; the
/// caller then assembles the array.
pub(crate) fn gather_boxes(
    name: &str,
    dtype: DType,
    shape: &[usize],
    boxes: &[Placed<'_>],
    origin: Arc<Path>,
) -> Result<Option<TensorEntry>> {
    let es = dtype.size();
    // Arrays of rank < 2 are one band of one row.
    let pad = 2usize.saturating_sub(shape.len());
    let lift = |fill: usize, v: &[usize]| -> Vec<usize> {
        std::iter::repeat_n(fill, pad).chain(v.iter().copied()).collect()
    };
    let full = lift(1, shape);
    let n = full.len();
    let (band_axis, last) = (n - 2, n - 1);
    let outer: usize = full[..band_axis].iter().product();
    if outer.saturating_mul(boxes.len().max(1)) > MAX_BOX_WORK || full.contains(&0) {
        return Ok(None);
    }
    let mut gather = Gather::default();
    let mut placed = Vec::with_capacity(boxes.len());
    for b in boxes {
        let (src, base) = gather.input(name, "chunk", b.tensor)?;
        let (offsets, extent, storage) = (lift(0, b.offsets), lift(1, b.extent), lift(1, b.storage));
        let mut stride = vec![es; n];
        for d in (0..n - 1).rev() {
            stride[d] = stride[d + 1] * storage[d + 1];
        }
        placed.push((src, base, offsets, extent, stride));
    }
    let mut idx = vec![0usize; band_axis];
    for _ in 0..outer {
        let here: Vec<_> = placed
            .iter()
            .filter(|(_, _, o, e, _)| (0..band_axis).all(|d| o[d] <= idx[d] && idx[d] < o[d] + e[d]))
            .collect();
        let mut cuts: Vec<usize> =
            here.iter().flat_map(|(_, _, o, e, _)| [o[band_axis], o[band_axis] + e[band_axis]]).collect();
        cuts.push(0);
        cuts.push(full[band_axis]);
        cuts.sort_unstable();
        cuts.dedup();
        for w in cuts.windows(2) {
            let (r0, r1) = (w[0], w[1]);
            let mut row: Vec<_> = here
                .iter()
                .filter(|(_, _, o, e, _)| o[band_axis] <= r0 && r1 <= o[band_axis] + e[band_axis])
                .collect();
            row.sort_by_key(|(_, _, o, _, _)| o[last]);
            let mut col = 0;
            let mut runs = Vec::with_capacity(row.len());
            for (src, base, o, e, stride) in row {
                if o[last] != col {
                    return Ok(None);
                }
                col += e[last];
                let at: usize = (0..band_axis).map(|d| (idx[d] - o[d]) * stride[d]).sum::<usize>()
                    + (r0 - o[band_axis]) * stride[band_axis];
                runs.push(Run { src: *src, start: base + at, len: e[last] * es, stride: stride[band_axis] });
            }
            if col != full[last] {
                return Ok(None);
            }
            gather.push(Piece::Zip { count: r1 - r0, runs });
        }
        advance(&mut idx, &full[..band_axis]);
    }
    Ok(Some(gather.finish(name, dtype, shape.to_vec(), origin)))
}

// ------------------------------------------------------------------------------------------------
// Row and column primitives

/// Rows `start..end` of `t` (dim 0; any rank ≥ 1): `[R, …] → [end − start, …]`.
///
/// A range of a `Mapped` tensor is another `Mapped` range (no copy); the whole range returns
/// `t`'s own source.
pub fn slice_rows(name: &str, t: &TensorEntry, start: usize, end: usize) -> Result<TensorEntry> {
    let mut plan = RowPlan::like(name, "input", t)?;
    plan.rows("input", t, start, end)?;
    Ok(plan.finish())
}

/// The first `rows` rows of `t`: `[R, …] → [rows, …]`, `rows ≤ R` (inverse of [`pad_rows`]).
pub fn trim_rows(name: &str, t: &TensorEntry, rows: usize) -> Result<TensorEntry> {
    slice_rows(name, t, 0, rows)
}

/// `t` followed by zero rows up to `rows`: `[R, …] → [rows, …]`, `rows ≥ R` (inverse of
/// [`trim_rows`]). The zeros are produced on read, not stored.
pub fn pad_rows(name: &str, t: &TensorEntry, rows: usize) -> Result<TensorEntry> {
    let have = rows_of(name, "input", t)?;
    if rows < have {
        return Err(bad(
            &t.origin,
            name,
            format!("cannot pad {have} rows to {rows} (expected a target of at least {have}; use trim_rows to cut)"),
        ));
    }
    let mut plan = RowPlan::like(name, "input", t)?;
    plan.all_rows("input", t)?;
    plan.zeros(rows - have);
    Ok(plan.finish())
}

/// Parts stacked along dim 0: `[R₀, …] ++ [R₁, …] ++ … → [ΣRᵢ, …]` (same dtype and trailing
/// dims; inverse of [`slice_rows`]). Adjacent ranges of one mapping coalesce back into a single
/// `Mapped` range.
pub fn concat_rows(name: &str, parts: &[TensorEntry]) -> Result<TensorEntry> {
    let Some(first) = parts.first() else {
        return Err(Error::invalid(format!("tensor '{name}'"), "no parts to concatenate"));
    };
    let mut plan = RowPlan::like(name, "part 0", first)?;
    for (i, part) in parts.iter().enumerate() {
        plan.all_rows(&format!("part {i}"), part)?;
    }
    Ok(plan.finish())
}

/// `(rows, cols)` of a 2-D tensor; an error naming `label` otherwise.
fn dims2(name: &str, label: &str, t: &TensorEntry) -> Result<(usize, usize)> {
    match t.shape[..] {
        [r, c] => Ok((r, c)),
        _ => Err(bad(
            &t.origin,
            name,
            format!("{label} has shape {:?}, expected 2 dimensions [R, C]", t.shape),
        )),
    }
}

/// Columns `start..end` of a 2-D tensor: `[R, C] → [R, end − start]` (a strided gather; the
/// full range returns `t`'s own source).
pub fn slice_cols(name: &str, t: &TensorEntry, start: usize, end: usize) -> Result<TensorEntry> {
    let (rows, cols) = dims2(name, "input", t)?;
    if start > end || end > cols {
        return Err(bad(
            &t.origin,
            name,
            format!(
                "columns {start}..{end} are out of range for input with {cols} columns (shape {:?})",
                t.shape
            ),
        ));
    }
    let es = t.dtype.size();
    let mut gather = Gather::default();
    let (src, base) = gather.input(name, "input", t)?;
    let run = Run { src, start: base + start * es, len: (end - start) * es, stride: cols * es };
    gather.push(Piece::Zip { count: rows, runs: vec![run] });
    Ok(gather.finish(name, t.dtype, vec![rows, end - start], t.origin.clone()))
}

/// Parts side by side along dim 1: `[R, C₀] ++ [R, C₁] ++ … → [R, ΣCᵢ]` (same dtype and rows;
/// inverse of [`slice_cols`]).
pub fn concat_cols(name: &str, parts: &[TensorEntry]) -> Result<TensorEntry> {
    let Some(first) = parts.first() else {
        return Err(Error::invalid(format!("tensor '{name}'"), "no parts to concatenate"));
    };
    let (rows, _) = dims2(name, "part 0", first)?;
    let es = first.dtype.size();
    let mut gather = Gather::default();
    let mut runs = Vec::with_capacity(parts.len());
    let mut total = 0;
    for (i, part) in parts.iter().enumerate() {
        let label = format!("part {i}");
        let (r, c) = dims2(name, &label, part)?;
        if r != rows || part.dtype != first.dtype {
            return Err(bad(
                &part.origin,
                name,
                format!("{label} is {} {:?}, expected {} [{rows}, *]", part.dtype, part.shape, first.dtype),
            ));
        }
        let (src, base) = gather.input(name, &label, part)?;
        runs.push(Run { src, start: base, len: c * es, stride: c * es });
        total += c;
    }
    gather.push(Piece::Zip { count: rows, runs });
    Ok(gather.finish(name, first.dtype, vec![rows, total], first.origin.clone()))
}

// ------------------------------------------------------------------------------------------------
// QKV (formats.md §3.4)

/// Check `heads`/`groups` and return heads per group.
fn heads_per_group(origin: &Path, name: &str, heads: usize, groups: usize) -> Result<usize> {
    if heads == 0 || groups == 0 || heads % groups != 0 {
        return Err(bad(
            origin,
            name,
            format!("{heads} attention heads do not split into {groups} query groups (expected heads a positive multiple of groups)"),
        ));
    }
    Ok(heads / groups)
}

/// Fuse HF `q`, `k`, `v` into the Megatron per-query-group layout.
///
/// Shapes (`nh` = `heads`, `ng` = `groups`, `hpg = nh / ng`, `d` = head dim, inferred from `q`):
/// q `[nh·d, …]`, k and v `[ng·d, …]` → `[(nh + 2·ng)·d, …]`. For each group `g` the output
/// holds `q` heads `g·hpg .. (g+1)·hpg`, then `k` head `g`, then `v` head `g`, `d` rows per
/// head. Works for weights `[·, H]` and 1-D biases alike. Inverse: [`split_qkv`].
pub fn fuse_qkv(
    name: &str,
    q: &TensorEntry,
    k: &TensorEntry,
    v: &TensorEntry,
    heads: usize,
    groups: usize,
) -> Result<TensorEntry> {
    let hpg = heads_per_group(&q.origin, name, heads, groups)?;
    let q_rows = rows_of(name, "q", q)?;
    if q_rows == 0 || q_rows % heads != 0 {
        return Err(bad(
            &q.origin,
            name,
            format!(
                "q has {q_rows} rows, expected a positive multiple of {heads} heads (shape {:?})",
                q.shape
            ),
        ));
    }
    let d = q_rows / heads; // head dim
    let trailing = &q.shape[1..];
    for (label, t) in [("k", k), ("v", v)] {
        if t.shape.first() != Some(&(groups * d)) || t.shape[1..] != *trailing || t.dtype != q.dtype {
            let mut want = vec![groups * d];
            want.extend_from_slice(trailing);
            return Err(bad(
                &t.origin,
                name,
                format!(
                    "{label} is {} {:?}, expected {} {want:?} ({groups} groups × head dim {d}, like q {:?})",
                    t.dtype, t.shape, q.dtype, q.shape
                ),
            ));
        }
    }
    let mut plan = RowPlan::like(name, "q", q)?;
    for g in 0..groups {
        plan.rows("q", q, g * hpg * d, (g + 1) * hpg * d)?; // hpg query heads
        plan.rows("k", k, g * d, (g + 1) * d)?;
        plan.rows("v", v, g * d, (g + 1) * d)?;
    }
    Ok(plan.finish())
}

/// Split a Megatron fused QKV back into HF `[q, k, v]` (inverse of [`fuse_qkv`]).
///
/// `[(nh + 2·ng)·d, …] → [nh·d, …], [ng·d, …], [ng·d, …]`; `d` is inferred from the row count.
pub fn split_qkv(name: &str, qkv: &TensorEntry, heads: usize, groups: usize) -> Result<[TensorEntry; 3]> {
    let hpg = heads_per_group(&qkv.origin, name, heads, groups)?;
    let rows = rows_of(name, "fused qkv", qkv)?;
    let blocks = heads + 2 * groups;
    if rows == 0 || rows % blocks != 0 {
        return Err(bad(
            &qkv.origin,
            name,
            format!(
                "fused qkv has {rows} rows, expected a positive multiple of {blocks} head blocks ({heads} q + 2 × {groups} kv; shape {:?})",
                qkv.shape
            ),
        ));
    }
    let d = rows / blocks; // head dim
    let stride = (hpg + 2) * d; // rows per group
    let mut q = RowPlan::like(name, "fused qkv", qkv)?;
    let mut k = RowPlan::like(name, "fused qkv", qkv)?;
    let mut v = RowPlan::like(name, "fused qkv", qkv)?;
    for g in 0..groups {
        let at = g * stride;
        q.rows("fused qkv", qkv, at, at + hpg * d)?;
        k.rows("fused qkv", qkv, at + hpg * d, at + (hpg + 1) * d)?;
        v.rows("fused qkv", qkv, at + (hpg + 1) * d, at + stride)?;
    }
    Ok([q.finish(), k.finish(), v.finish()])
}

// ------------------------------------------------------------------------------------------------
// GLU fc1 (formats.md §3.5)

/// `[gate; up]`: gate `[F, …]` and up `[F, …]` → fc1 `[2F, …]` (inverse: [`split_glu`]).
pub fn fuse_glu(name: &str, gate: &TensorEntry, up: &TensorEntry) -> Result<TensorEntry> {
    if gate.shape != up.shape || gate.dtype != up.dtype {
        return Err(bad(
            &up.origin,
            name,
            format!("up is {} {:?}, expected {} {:?} like gate", up.dtype, up.shape, gate.dtype, gate.shape),
        ));
    }
    concat_rows(name, &[gate.clone(), up.clone()])
}

/// fc1 `[2F, …]` → `[gate [F, …], up [F, …]]` (inverse of [`fuse_glu`]); mapped halves stay
/// mapped.
pub fn split_glu(name: &str, fc1: &TensorEntry) -> Result<[TensorEntry; 2]> {
    let rows = rows_of(name, "fc1", fc1)?;
    if rows % 2 != 0 {
        return Err(bad(
            &fc1.origin,
            name,
            format!("glu fc1 has {rows} rows, expected an even count [gate; up] (shape {:?})", fc1.shape),
        ));
    }
    let f = rows / 2;
    Ok([slice_rows(name, fc1, 0, f)?, slice_rows(name, fc1, f, rows)?])
}

// ------------------------------------------------------------------------------------------------
// Rotary layout (formats.md §3.6)

/// Check a `[heads·d, …]` weight with even `d` and return `d`.
fn rotary_head_dim(name: &str, w: &TensorEntry, heads: usize) -> Result<usize> {
    let rows = rows_of(name, "input", w)?;
    if heads == 0 || rows % heads != 0 || (rows / heads) % 2 != 0 {
        return Err(bad(
            &w.origin,
            name,
            format!(
                "{rows} rows do not split into {heads} heads of even size (expected a multiple of 2·{heads}; shape {:?})",
                w.shape
            ),
        ));
    }
    Ok(rows / heads)
}

/// Meta interleaved → HF rotate-half, per head: `[heads·d, …] → [heads·d, …]` where new row
/// `j·(d/2) + i` of a head is old row `2i + j` (`i < d/2`, `j ∈ {0, 1}`). Apply to `wq` with
/// `heads = n_heads` and to `wk` with `heads = n_kv_heads`; never to `wv`/`wo`. Inverse:
/// [`unpermute_rotary`].
pub fn permute_rotary(name: &str, w: &TensorEntry, heads: usize) -> Result<TensorEntry> {
    let d = rotary_head_dim(name, w, heads)?;
    let mut plan = RowPlan::like(name, "input", w)?;
    for h in 0..heads {
        for j in 0..2 {
            // rows h·d + j, h·d + j + 2, … (d/2 of them)
            plan.zip_rows("input", w, d / 2, &[h * d + j], 2)?;
        }
    }
    Ok(plan.finish())
}

/// HF rotate-half → Meta interleaved, per head (inverse of [`permute_rotary`]): new row `2i + j`
/// of a head is old row `j·(d/2) + i`.
pub fn unpermute_rotary(name: &str, w: &TensorEntry, heads: usize) -> Result<TensorEntry> {
    let d = rotary_head_dim(name, w, heads)?;
    let mut plan = RowPlan::like(name, "input", w)?;
    for h in 0..heads {
        // rows h·d + i and h·d + d/2 + i, for i < d/2
        plan.zip_rows("input", w, d / 2, &[h * d, h * d + d / 2], 1)?;
    }
    Ok(plan.finish())
}

// ------------------------------------------------------------------------------------------------

#[cfg(test)]
pub(crate) mod testing {
    //! Tensor builders shared by the transform and shard tests.

    use super::*;
    use proptest::prelude::*;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// How a test tensor's bytes are held.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) enum Kind {
        Owned,
        Derived,
        Mapped,
    }

    pub(crate) fn kind() -> impl Strategy<Value = Kind> {
        prop_oneof![Just(Kind::Owned), Just(Kind::Derived), Just(Kind::Mapped)]
    }

    pub(crate) fn dtype() -> impl Strategy<Value = DType> {
        proptest::sample::select(DType::ALL.to_vec())
    }

    pub(crate) fn origin() -> Arc<Path> {
        Arc::from(PathBuf::from("test.safetensors"))
    }

    /// Deterministic distinct-looking bytes.
    pub(crate) fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    /// An anonymous read-only map holding `pad` junk bytes, then `bytes`, then junk.
    pub(crate) fn anon_map(bytes: &[u8], pad: usize) -> Arc<Mmap> {
        let mut m = memmap2::MmapMut::map_anon(bytes.len() + 2 * pad + 1).expect("anonymous map");
        m.fill(0xAB);
        m[pad..pad + bytes.len()].copy_from_slice(bytes);
        Arc::new(m.make_read_only().expect("read-only map"))
    }

    pub(crate) fn entry(dtype: DType, shape: Vec<usize>, bytes: Vec<u8>, kind: Kind) -> TensorEntry {
        assert_eq!(bytes.len(), shape.iter().product::<usize>() * dtype.size());
        let source = match kind {
            Kind::Owned => ByteSource::owned(bytes),
            Kind::Derived => {
                let bytes: Arc<[u8]> = bytes.into();
                ByteSource::derived(move || Ok(bytes.to_vec()))
            }
            Kind::Mapped => {
                let len = bytes.len();
                ByteSource::mapped(anon_map(&bytes, 24), 24, len)
            }
        };
        TensorEntry::new(dtype, shape, source, origin())
    }

    pub(crate) fn random(dtype: DType, shape: Vec<usize>, seed: u64, kind: Kind) -> TensorEntry {
        let len = shape.iter().product::<usize>() * dtype.size();
        entry(dtype, shape, noise(seed, len), kind)
    }

    /// A derived tensor that counts how often its bytes are produced.
    pub(crate) fn counted(dtype: DType, shape: Vec<usize>, seed: u64) -> (TensorEntry, Arc<AtomicUsize>) {
        let len = shape.iter().product::<usize>() * dtype.size();
        let bytes = noise(seed, len);
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let source = ByteSource::derived(move || {
            c.fetch_add(1, Ordering::SeqCst);
            Ok(bytes.clone())
        });
        (TensorEntry::new(dtype, shape, source, origin()), calls)
    }

    /// The tensor's bytes, produced whole once (for tests that count reads).
    pub(crate) fn produced(t: &TensorEntry) -> Vec<u8> {
        t.bytes("test").expect("bytes").into_owned()
    }

    /// The tensor's bytes, asserting that streaming them (what writers do) gives the same bytes
    /// as producing them whole, so every transform test also covers [`Produce::stream`].
    pub(crate) fn bytes(t: &TensorEntry) -> Vec<u8> {
        let whole = t.bytes("test").expect("bytes").into_owned();
        let mut streamed = Vec::new();
        t.stream("test", &mut |seg| {
            match seg {
                Segment::Zeros(n) => streamed.resize(streamed.len() + n, 0),
                _ => streamed.extend_from_slice(seg.as_slice().expect("mapped range inside its map")),
            }
            Ok(())
        })
        .expect("stream");
        assert!(whole == streamed, "streamed bytes differ from produced bytes");
        whole
    }

    /// Whether two entries hold the same dtype, shape and bytes.
    pub(crate) fn same(a: &TensorEntry, b: &TensorEntry) -> bool {
        a.dtype == b.dtype && a.shape == b.shape && bytes(a) == bytes(b)
    }

    pub(crate) fn is_mapped(t: &TensorEntry) -> bool {
        matches!(t.source, ByteSource::Mapped { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use proptest::prelude::*;
    use std::sync::atomic::Ordering;

    /// Row `r` of a `[rows, …]` byte buffer with `rb` bytes per row.
    fn row(b: &[u8], r: usize, rb: usize) -> &[u8] {
        &b[r * rb..(r + 1) * rb]
    }

    /// §3.4 straight from the index table: output block `g·(hpg+2) + j` is q head `g·hpg + j`
    /// for `j < hpg`, k head `g` for `j = hpg`, v head `g` for `j = hpg + 1`.
    fn naive_fuse(q: &[u8], k: &[u8], v: &[u8], heads: usize, groups: usize, d: usize, rb: usize) -> Vec<u8> {
        let hpg = heads / groups;
        let mut out = Vec::new();
        for r in 0..(heads + 2 * groups) * d {
            let (block, within) = (r / d, r % d);
            let (g, j) = (block / (hpg + 2), block % (hpg + 2));
            let src = if j < hpg {
                row(q, (g * hpg + j) * d + within, rb)
            } else if j == hpg {
                row(k, g * d + within, rb)
            } else {
                row(v, g * d + within, rb)
            };
            out.extend_from_slice(src);
        }
        out
    }

    fn qkv_case() -> impl Strategy<Value = (usize, usize, usize, usize, DType, u64, Kind)> {
        (1usize..=4, 1usize..=4, 1usize..=4, 0usize..=3, dtype(), any::<u64>(), kind())
            .prop_map(|(groups, hpg, d, h, dt, seed, k)| (groups * hpg, groups, d, h, dt, seed, k))
    }

    /// Trailing dims: `h = 0` is a 1-D bias, otherwise `[·, h]`.
    fn trailing(h: usize) -> Vec<usize> {
        if h == 0 {
            vec![]
        } else {
            vec![h]
        }
    }

    fn shape(rows: usize, h: usize) -> Vec<usize> {
        let mut s = vec![rows];
        s.extend(trailing(h));
        s
    }

    proptest! {
        #[test]
        fn fuse_qkv_matches_reference_and_splits_back(
            (heads, groups, d, h, dt, seed, k) in qkv_case()
        ) {
            let q = random(dt, shape(heads * d, h), seed, k);
            let kk = random(dt, shape(groups * d, h), seed ^ 1, k);
            let v = random(dt, shape(groups * d, h), seed ^ 2, k);
            let fused = fuse_qkv("qkv", &q, &kk, &v, heads, groups).unwrap();
            prop_assert_eq!(&fused.shape, &shape((heads + 2 * groups) * d, h));
            let rb = h.max(1) * dt.size();
            let want = naive_fuse(&bytes(&q), &bytes(&kk), &bytes(&v), heads, groups, d, rb);
            prop_assert_eq!(bytes(&fused), want);
            let [q2, k2, v2] = split_qkv("qkv", &fused, heads, groups).unwrap();
            prop_assert!(same(&q, &q2) && same(&kk, &k2) && same(&v, &v2));
        }

        #[test]
        fn split_qkv_then_fuse_is_identity((heads, groups, d, h, dt, seed, k) in qkv_case()) {
            let fused = random(dt, shape((heads + 2 * groups) * d, h), seed, k);
            let [q, kk, v] = split_qkv("qkv", &fused, heads, groups).unwrap();
            let back = fuse_qkv("qkv", &q, &kk, &v, heads, groups).unwrap();
            prop_assert!(same(&fused, &back));
            if k == Kind::Mapped && groups == 1 {
                // q, k, v are single mapped ranges, adjacent again: the gather collapses to the
                // original mapped range
                prop_assert!(is_mapped(&back));
            }
        }

        #[test]
        fn glu_round_trips(f in 0usize..6, h in 0usize..4, dt in dtype(), seed: u64, k in kind()) {
            let gate = random(dt, shape(f, h), seed, k);
            let up = random(dt, shape(f, h), seed ^ 7, k);
            let fc1 = fuse_glu("fc1", &gate, &up).unwrap();
            prop_assert_eq!(bytes(&fc1), [bytes(&gate), bytes(&up)].concat());
            let [g2, u2] = split_glu("fc1", &fc1).unwrap();
            prop_assert!(same(&gate, &g2) && same(&up, &u2));
            let [g3, u3] = split_glu("fc1", &fc1).unwrap();
            prop_assert!(same(&fuse_glu("fc1", &g3, &u3).unwrap(), &fc1));
        }

        #[test]
        fn rotary_round_trips_and_matches_formula(
            heads in 1usize..4, half in 1usize..5, h in 0usize..4, dt in dtype(), seed: u64, k in kind()
        ) {
            let d = 2 * half;
            let w = random(dt, shape(heads * d, h), seed, k);
            let p = permute_rotary("wq", &w, heads).unwrap();
            let (wb, pb) = (bytes(&w), bytes(&p));
            let rb = h.max(1) * dt.size();
            for hd in 0..heads {
                for i in 0..half {
                    for j in 0..2 {
                        prop_assert_eq!(row(&pb, hd * d + j * half + i, rb), row(&wb, hd * d + 2 * i + j, rb));
                    }
                }
            }
            prop_assert!(same(&unpermute_rotary("wq", &p, heads).unwrap(), &w));
            prop_assert!(same(&permute_rotary("wq", &unpermute_rotary("wq", &w, heads).unwrap(), heads).unwrap(), &w));
        }

        #[test]
        fn rows_and_cols_round_trip(
            r in 0usize..7, c in 1usize..6, cut_r in 0usize..8, cut_c in 0usize..7,
            dt in dtype(), seed: u64, k in kind()
        ) {
            let t = random(dt, vec![r, c], seed, k);
            let cut_r = cut_r.min(r);
            let cut_c = cut_c.min(c);
            let top = slice_rows("t", &t, 0, cut_r).unwrap();
            let bottom = slice_rows("t", &t, cut_r, r).unwrap();
            prop_assert!(same(&concat_rows("t", &[top, bottom]).unwrap(), &t));
            let left = slice_cols("t", &t, 0, cut_c).unwrap();
            let right = slice_cols("t", &t, cut_c, c).unwrap();
            prop_assert_eq!(&left.shape, &vec![r, cut_c]);
            let tb = bytes(&t);
            let lb = bytes(&left);
            let es = dt.size();
            for i in 0..r {
                prop_assert_eq!(&lb[i * cut_c * es..(i + 1) * cut_c * es], &tb[i * c * es..(i * c + cut_c) * es]);
            }
            prop_assert!(same(&concat_cols("t", &[left, right]).unwrap(), &t));
            let padded = pad_rows("t", &t, r + cut_r).unwrap();
            let pb = bytes(&padded);
            prop_assert_eq!(&pb[..tb.len()], &tb[..]);
            prop_assert!(pb[tb.len()..].iter().all(|&b| b == 0));
            prop_assert!(same(&trim_rows("t", &padded, r).unwrap(), &t));
        }
    }

    proptest! {
        /// A cast over a strided gather with zero rows: streamed (7-byte chunks in tests, so
        /// elements are cut between segments) it gives the same bytes as produced whole.
        #[test]
        fn casts_stream_like_they_produce(
            r in 0usize..6, c in 1usize..6, cut in 0usize..6, pad in 0usize..3,
            from in dtype().prop_filter("float", |d| d.is_float()),
            to in dtype().prop_filter("float", |d| d.is_float()),
            seed: u64, k in kind()
        ) {
            let t = random(from, vec![r, c], seed, k);
            let cut = cut.min(c);
            let swapped = concat_cols("t", &[slice_cols("t", &t, cut, c).unwrap(), slice_cols("t", &t, 0, cut).unwrap()]).unwrap();
            let g = pad_rows("t", &swapped, r + pad).unwrap();
            let cast = g.cast("t", to).unwrap();
            prop_assert_eq!(bytes(&cast), crate::dtype::cast_bytes(&bytes(&g), from, to).unwrap());
        }
    }

    #[test]
    fn fuse_qkv_hand_checked() {
        // nh = 4, ng = 2 (hpg = 2), d = 1, H = 1: [q0 q1 k0 v0 | q2 q3 k1 v1]
        let q = entry(DType::U8, vec![4, 1], vec![10, 11, 12, 13], Kind::Owned);
        let k = entry(DType::U8, vec![2, 1], vec![20, 21], Kind::Owned);
        let v = entry(DType::U8, vec![2, 1], vec![30, 31], Kind::Owned);
        let fused = fuse_qkv("qkv", &q, &k, &v, 4, 2).unwrap();
        assert_eq!(fused.shape, vec![8, 1]);
        assert_eq!(bytes(&fused), vec![10, 11, 20, 30, 12, 13, 21, 31]);
        // MHA (ng = nh) is the per-head [q, k, v] interleave of the legacy layout
        let k4 = entry(DType::U8, vec![4], vec![20, 21, 22, 23], Kind::Owned);
        let v4 = entry(DType::U8, vec![4], vec![30, 31, 32, 33], Kind::Owned);
        let q4 = entry(DType::U8, vec![4], vec![10, 11, 12, 13], Kind::Owned);
        let mha = fuse_qkv("qkv", &q4, &k4, &v4, 4, 4).unwrap();
        assert_eq!(bytes(&mha), vec![10, 20, 30, 11, 21, 31, 12, 22, 32, 13, 23, 33]);
    }

    #[test]
    fn fuse_qkv_70b_like_layout() {
        // 70B: ng = 8, hpg = 8 → q blocks 0–7, 10–17, …; k 8, 18, …, 78; v 9, 19, …, 79.
        let (heads, groups, d) = (64, 8, 2);
        let q = random(DType::BF16, vec![heads * d, 3], 1, Kind::Mapped);
        let k = random(DType::BF16, vec![groups * d, 3], 2, Kind::Mapped);
        let v = random(DType::BF16, vec![groups * d, 3], 3, Kind::Mapped);
        let fused = fuse_qkv("qkv", &q, &k, &v, heads, groups).unwrap();
        assert_eq!(fused.shape, vec![80 * d, 3]);
        let (fb, qb, kb, vb) = (bytes(&fused), bytes(&q), bytes(&k), bytes(&v));
        let rb = 3 * 2;
        let block = |b: &[u8], i: usize| b[i * d * rb..(i + 1) * d * rb].to_vec();
        for g in 0..groups {
            assert_eq!(block(&fb, g * 10 + 8), block(&kb, g));
            assert_eq!(block(&fb, g * 10 + 9), block(&vb, g));
            for j in 0..8 {
                assert_eq!(block(&fb, g * 10 + j), block(&qb, g * 8 + j));
            }
        }
        assert_eq!(fb, naive_fuse(&qb, &kb, &vb, heads, groups, d, rb));
    }

    #[test]
    fn slices_of_plans_read_the_plans_inputs() {
        // Two separate mappings stacked: the stack is a plan, and slicing one part back out
        // plans from that part's mapping (zero-copy) instead of producing the whole stack.
        let (a, b) = (noise(1, 3 * 4 * 2), noise(2, 2 * 4 * 2));
        let ta = TensorEntry::new(
            DType::F16,
            vec![3, 4],
            ByteSource::mapped(anon_map(&a, 8), 8, a.len()),
            origin(),
        );
        let tb = TensorEntry::new(
            DType::F16,
            vec![2, 4],
            ByteSource::mapped(anon_map(&b, 8), 8, b.len()),
            origin(),
        );
        let stack = concat_rows("s", &[ta, tb]).unwrap();
        assert!(matches!(stack.source, ByteSource::Derived(_)));
        let back = slice_rows("s", &stack, 3, 5).unwrap();
        assert!(is_mapped(&back), "{:?}", back.source);
        assert_eq!(bytes(&back), b);
        // A slice across both parts, and one of a strided plan cut at whole rows, read the
        // inputs without producing the stack; a counted derived input shows it.
        let (c, calls) = counted(DType::F16, vec![4, 2], 3);
        let wide = concat_cols("w", &[c.clone(), c]).unwrap();
        let rows = concat_rows("r", &[wide.clone(), wide]).unwrap();
        let cut = slice_rows("r", &rows, 2, 6).unwrap();
        let want = produced(&rows)[2 * 8..6 * 8].to_vec();
        calls.store(0, Ordering::SeqCst);
        assert_eq!(produced(&cut), want);
        assert_eq!(calls.load(Ordering::SeqCst), 1, "the derived input is produced once, not via the stack");
        // A cut in the middle of a strided step cannot be planned from inputs; it still works.
        let part = random(DType::U8, vec![3, 3], 4, Kind::Owned);
        let odd = slice_cols("o", &concat_cols("w", &[part.clone(), part]).unwrap(), 1, 5).unwrap();
        let flat = TensorEntry { shape: vec![12], ..odd.clone() };
        assert_eq!(bytes(&slice_rows("f", &flat, 1, 7).unwrap()), produced(&odd)[1..7].to_vec());
    }

    proptest! {
        /// A chunked array planned by [`gather_boxes`] (zarr-style grid, edge chunks stored full
        /// size) holds every element at its place, as a whole and slice by slice of dim 0.
        #[test]
        fn gather_boxes_places_every_chunk(
            shape in proptest::collection::vec(1usize..5, 1..4),
            chunk_seed in any::<u64>(),
            k in kind(),
        ) {
            let n = shape.len();
            let chunks: Vec<usize> =
                shape.iter().enumerate().map(|(d, &s)| 1 + (chunk_seed as usize >> (4 * d)) % s).collect();
            let grid: Vec<usize> = shape.iter().zip(&chunks).map(|(s, c)| s.div_ceil(*c)).collect();
            let total: usize = shape.iter().product();
            // Element i of the array holds value i (u16), so any misplacement shows.
            let mut tensors = Vec::new();
            let mut placed = Vec::new();
            let mut coord = vec![0usize; n];
            for _ in 0..grid.iter().product::<usize>() {
                let offsets: Vec<usize> = coord.iter().zip(&chunks).map(|(g, c)| g * c).collect();
                let extent: Vec<usize> =
                    offsets.iter().zip(&chunks).zip(&shape).map(|((o, c), s)| (*c).min(s - o)).collect();
                let mut data = Vec::new();
                let mut local = vec![0usize; n];
                for _ in 0..chunks.iter().product::<usize>() {
                    let inside = (0..n).all(|d| local[d] < extent[d]);
                    let flat = (0..n).fold(0, |acc, d| acc * shape[d] + offsets[d] + local[d]);
                    data.extend_from_slice(&(if inside { flat as u16 } else { 0xFFFF }).to_le_bytes());
                    for d in (0..n).rev() {
                        local[d] += 1;
                        if local[d] < chunks[d] { break; }
                        local[d] = 0;
                    }
                }
                tensors.push(entry(DType::I16, chunks.clone(), data, k));
                placed.push((offsets, extent));
                for d in (0..n).rev() {
                    coord[d] += 1;
                    if coord[d] < grid[d] { break; }
                    coord[d] = 0;
                }
            }
            let boxes: Vec<Placed<'_>> = placed
                .iter()
                .zip(&tensors)
                .map(|((offsets, extent), tensor)| Placed { offsets, extent, storage: &chunks, tensor })
                .collect();
            let array = gather_boxes("a", DType::I16, &shape, &boxes, origin()).unwrap().expect("planned");
            let want: Vec<u8> = (0..total).flat_map(|i| (i as u16).to_le_bytes()).collect();
            prop_assert_eq!(bytes(&array), want.clone());
            let per = 2 * total / shape[0];
            for i in 0..shape[0] {
                let s = slice_rows("a", &array, i, i + 1).unwrap();
                prop_assert_eq!(bytes(&s), want[i * per..(i + 1) * per].to_vec());
            }
        }
    }

    #[test]
    fn mapped_slices_stay_mapped() {
        let data = noise(5, 6 * 4 * 2);
        let map = anon_map(&data, 40);
        let t = TensorEntry::new(
            DType::F16,
            vec![6, 4],
            ByteSource::mapped(map.clone(), 40, data.len()),
            origin(),
        );
        let s = slice_rows("t", &t, 2, 5).unwrap();
        match &s.source {
            ByteSource::Mapped { map: m, offset, len } => {
                assert!(Arc::ptr_eq(m, &map));
                assert_eq!((*offset, *len), (40 + 2 * 8, 3 * 8));
            }
            other => panic!("expected a mapped slice, got {other:?}"),
        }
        assert_eq!(bytes(&s), data[16..40].to_vec());
        let [gate, up] = split_glu("fc1", &t).unwrap();
        assert!(is_mapped(&gate) && is_mapped(&up));
        // the pieces of one mapping concatenate back into one mapped range
        let back = concat_rows("t", &[gate, up]).unwrap();
        assert!(matches!(back.source, ByteSource::Mapped { offset: 40, len: 48, .. }));
        // a slice of owned bytes is derived (copies only the slice when read)
        let owned = entry(DType::F16, vec![6, 4], data.clone(), Kind::Owned);
        let s = slice_rows("t", &owned, 1, 2).unwrap();
        assert!(matches!(s.source, ByteSource::Derived(_)));
        assert_eq!(bytes(&s), data[8..16].to_vec());
        // the whole range is the input's own source
        assert!(matches!(slice_rows("t", &owned, 0, 6).unwrap().source, ByteSource::Owned(_)));
    }

    #[test]
    fn derived_inputs_are_lazy_and_read_once_per_output() {
        let (qkv, calls) = counted(DType::F32, vec![(8 + 2 * 2) * 3, 5], 9);
        let [q, k, v] = split_qkv("qkv", &qkv, 8, 2).unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 0, "planning must not read bytes");
        let _ = produced(&q);
        assert_eq!(calls.load(Ordering::SeqCst), 1, "q gathers 2 groups from one read");
        let back = fuse_qkv("qkv", &q, &k, &v, 8, 2).unwrap();
        let _ = produced(&back);
        // q, k and v are plans over the input, so fusing them back plans from it: one read
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        let (w, calls) = counted(DType::BF16, vec![4 * 8, 3], 10);
        let p = permute_rotary("wq", &w, 4).unwrap();
        let _ = produced(&p);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn bad_shapes_fail_at_plan_time_naming_the_tensor() {
        let (t, calls) = counted(DType::F32, vec![10, 3], 1);
        let k = random(DType::F32, vec![4, 3], 2, Kind::Owned);
        let err = fuse_qkv("layers.0.qkv", &t, &k, &k, 4, 3).unwrap_err().to_string();
        assert!(err.contains("layers.0.qkv") && err.contains("4 attention heads"), "{err}");
        let err = fuse_qkv("layers.0.qkv", &t, &k, &k, 5, 1).unwrap_err().to_string();
        assert!(err.contains("k is f32 [4, 3], expected f32 [2, 3]"), "{err}");
        let err = split_qkv("layers.0.qkv", &t, 4, 2).unwrap_err().to_string();
        assert!(err.contains("10 rows") && err.contains("8 head blocks"), "{err}");
        let odd = random(DType::F32, vec![7, 3], 3, Kind::Owned);
        let err = split_glu("fc1", &odd).unwrap_err().to_string();
        assert!(err.contains("'fc1'") && err.contains("7 rows"), "{err}");
        let err = permute_rotary("wq", &odd, 1).unwrap_err().to_string();
        assert!(err.contains("7 rows"), "{err}");
        let err = slice_rows("t", &t, 3, 11).unwrap_err().to_string();
        assert!(err.contains("rows 3..11") && err.contains("10 rows"), "{err}");
        let other = random(DType::F16, vec![2, 3], 4, Kind::Owned);
        let err = concat_rows("t", &[t.clone(), other]).unwrap_err().to_string();
        assert!(err.contains("part 1 is f16 [2, 3], expected f32 [*, 3]"), "{err}");
        let err = pad_rows("t", &t, 4).unwrap_err().to_string();
        assert!(err.contains("cannot pad 10 rows to 4"), "{err}");
        assert!(concat_cols("t", &[]).is_err());
        assert!(slice_cols("t", &random(DType::F32, vec![3], 1, Kind::Owned), 0, 1).is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        // a mapped or owned input whose byte length disagrees with its shape is caught up front
        let short = TensorEntry::new(DType::F32, vec![2, 3], ByteSource::owned(vec![0u8; 20]), origin());
        match slice_rows("t", &short, 0, 1) {
            Err(Error::TensorSize { tensor, expected: 24, got: 20, .. }) => assert_eq!(tensor, "t (input)"),
            other => panic!("expected a size error, got {other:?}"),
        }
        // a derived one is checked when read
        let lying =
            TensorEntry::new(DType::F32, vec![2, 3], ByteSource::derived(|| Ok(vec![0u8; 20])), origin());
        let s = slice_rows("t", &lying, 0, 1).unwrap();
        assert!(matches!(s.source.bytes(), Err(Error::TensorSize { got: 20, .. })));
    }
}
