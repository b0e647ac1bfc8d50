//! The one value every format reads into and writes from: named lazy tensors plus metadata.
//!
//! A [`Checkpoint`] holds one [`Shard`] per (tensor-parallel, pipeline-parallel) rank; formats
//! without parallelism have exactly one. A [`TensorEntry`] is dtype + shape + a [`ByteSource`]:
//! no tensor bytes are read until a writer (or the compute core) asks for them.

use crate::error::{Error, Result};
use crate::DType;
use indexmap::IndexMap;
use memmap2::Mmap;
use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A lazily produced byte buffer: little-endian, C-contiguous tensor data.
#[derive(Clone)]
pub enum ByteSource {
    /// A range of a memory-mapped file (safetensors, stored zip entries, members of a plain tar).
    Mapped {
        /// The whole mapping, shared by every tensor of the file.
        map: Arc<Mmap>,
        /// Start of the tensor's bytes.
        offset: usize,
        /// Length in bytes.
        len: usize,
    },
    /// Bytes already in memory (small tensors, test data, decompressed members).
    Owned(Arc<[u8]>),
    /// Bytes computed on demand from other sources (casts, byte swaps, strided gathers,
    /// resharding transforms). The computation must be deterministic.
    Derived(Arc<dyn Produce>),
}

/// A deterministic computation of a tensor's bytes (see [`ByteSource::Derived`]).
pub trait Produce: Send + Sync {
    /// All the bytes, in one buffer.
    fn produce(&self) -> Result<Vec<u8>>;

    /// The same bytes as consecutive [`Segment`]s, for writers that stream them to a file. The
    /// default hands over [`Produce::produce`]'s buffer; gather plans override it to pass mapped
    /// ranges through untouched and assemble only strided runs, a bounded chunk at a time.
    fn stream(&self, emit: &mut dyn FnMut(Segment<'_>) -> Result<()>) -> Result<()> {
        emit(Segment::Bytes(&self.produce()?))
    }

    /// The producer as `Any`, for producers that others may look inside (gather plans compose:
    /// a slice of a plan is planned from the plan's own inputs instead of its whole output).
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }
}

/// One stretch of a tensor's bytes handed to a streaming writer.
#[derive(Clone, Copy, Debug)]
pub enum Segment<'a> {
    /// `map[offset..offset + len]`: a writer may copy it file to file without touching it.
    Mapped {
        /// The file mapping.
        map: &'a Arc<Mmap>,
        /// Start within the mapping.
        offset: usize,
        /// Length in bytes.
        len: usize,
    },
    /// Bytes in memory.
    Bytes(&'a [u8]),
    /// This many zero bytes.
    Zeros(usize),
}

impl<'a> Segment<'a> {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Segment::Mapped { len, .. } => *len,
            Segment::Bytes(b) => b.len(),
            Segment::Zeros(n) => *n,
        }
    }

    /// Whether the segment is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes of a `Mapped` or `Bytes` segment; `None` for zeros and for a mapped range that
    /// lies outside its mapping.
    pub fn as_slice(&self) -> Option<&'a [u8]> {
        match *self {
            Segment::Mapped { map, offset, len } => {
                offset.checked_add(len).and_then(|end| map.get(offset..end))
            }
            Segment::Bytes(b) => Some(b),
            Segment::Zeros(_) => None,
        }
    }
}

/// A closure as a [`Produce`].
struct FnProduce<F>(F);

impl<F: Fn() -> Result<Vec<u8>> + Send + Sync> Produce for FnProduce<F> {
    fn produce(&self) -> Result<Vec<u8>> {
        (self.0)()
    }
}

impl ByteSource {
    /// A source over owned bytes.
    pub fn owned(bytes: impl Into<Arc<[u8]>>) -> Self {
        ByteSource::Owned(bytes.into())
    }

    /// A source computed by `f` when read.
    pub fn derived(f: impl Fn() -> Result<Vec<u8>> + Send + Sync + 'static) -> Self {
        ByteSource::Derived(Arc::new(FnProduce(f)))
    }

    /// A source computed (and possibly streamed) by `p`.
    pub fn produced(p: impl Produce + 'static) -> Self {
        ByteSource::Derived(Arc::new(p))
    }

    /// A range of a mapping; the caller has checked it lies inside the map.
    pub fn mapped(map: Arc<Mmap>, offset: usize, len: usize) -> Self {
        debug_assert!(offset + len <= map.len());
        ByteSource::Mapped { map, offset, len }
    }

    /// The bytes: borrowed for mapped and owned sources, computed for derived ones.
    pub fn bytes(&self) -> Result<Cow<'_, [u8]>> {
        Ok(match self {
            ByteSource::Mapped { map, offset, len } => Cow::Borrowed(&map[*offset..*offset + *len]),
            ByteSource::Owned(b) => Cow::Borrowed(b),
            ByteSource::Derived(f) => Cow::Owned(f.produce()?),
        })
    }

    /// Hand the bytes to `emit` as consecutive segments (see [`Produce::stream`]).
    pub fn stream(&self, emit: &mut dyn FnMut(Segment<'_>) -> Result<()>) -> Result<()> {
        match self {
            ByteSource::Mapped { map, offset, len } => {
                emit(Segment::Mapped { map, offset: *offset, len: *len })
            }
            ByteSource::Owned(b) => emit(Segment::Bytes(b)),
            ByteSource::Derived(f) => f.stream(emit),
        }
    }

    /// The length without producing the bytes, where it is known up front.
    pub fn known_len(&self) -> Option<usize> {
        match self {
            ByteSource::Mapped { len, .. } => Some(*len),
            ByteSource::Owned(b) => Some(b.len()),
            ByteSource::Derived(_) => None,
        }
    }
}

impl fmt::Debug for ByteSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ByteSource::Mapped { offset, len, .. } => write!(f, "Mapped({offset}..{})", offset + len),
            ByteSource::Owned(b) => write!(f, "Owned({} bytes)", b.len()),
            ByteSource::Derived(_) => f.write_str("Derived"),
        }
    }
}

/// One tensor: what it is (dtype, shape), where its bytes come from, and where it was read.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    /// Element type.
    pub dtype: DType,
    /// Dimensions, outermost first; `[]` is a scalar.
    pub shape: Vec<usize>,
    /// How to get the bytes.
    pub source: ByteSource,
    /// The file (or `archive:member`) the tensor was read from, for error messages.
    pub origin: Arc<Path>,
}

impl TensorEntry {
    /// A tensor over the given source.
    pub fn new(dtype: DType, shape: Vec<usize>, source: ByteSource, origin: Arc<Path>) -> Self {
        TensorEntry { dtype, shape, source, origin }
    }

    /// Number of elements (1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes implied by dtype and shape.
    pub fn nbytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }

    /// The tensor's bytes, checked against dtype × shape.
    pub fn bytes(&self, name: &str) -> Result<Cow<'_, [u8]>> {
        let bytes = self.source.bytes()?;
        self.check_len(name, bytes.len())?;
        Ok(bytes)
    }

    /// Stream the tensor's bytes to `emit` (see [`Produce::stream`]); checked against dtype × shape
    /// once the last segment is out, so a short producer is an error, never a short write.
    pub fn stream(&self, name: &str, emit: &mut dyn FnMut(Segment<'_>) -> Result<()>) -> Result<()> {
        let mut total = 0usize;
        let expected = self.nbytes();
        self.source.stream(&mut |seg| {
            total += seg.len();
            if total > expected {
                return self.check_len(name, total);
            }
            emit(seg)
        })?;
        self.check_len(name, total)
    }

    /// Fail with [`Error::TensorSize`] unless `got` equals [`TensorEntry::nbytes`].
    pub fn check_len(&self, name: &str, got: usize) -> Result<()> {
        if got != self.nbytes() {
            return Err(Error::TensorSize {
                path: self.origin.to_path_buf(),
                tensor: name.to_string(),
                dtype: self.dtype,
                shape: self.shape.clone(),
                expected: self.nbytes(),
                got,
            });
        }
        Ok(())
    }

    /// The same tensor converted to `to` lazily (identity when the dtype already matches).
    pub fn cast(&self, name: &str, to: DType) -> Result<TensorEntry> {
        if self.dtype == to {
            return Ok(self.clone());
        }
        if !self.dtype.is_float() || !to.is_float() {
            return Err(Error::InvalidCast { tensor: name.to_string(), from: self.dtype, to });
        }
        Ok(TensorEntry {
            dtype: to,
            shape: self.shape.clone(),
            source: ByteSource::produced(Cast { src: self.clone(), name: name.to_string(), to }),
            origin: self.origin.clone(),
        })
    }
}

/// A float tensor converted to another float dtype (round to nearest, ties to even).
struct Cast {
    src: TensorEntry,
    name: String,
    to: DType,
}

/// Input bytes converted per step when a cast is streamed.
const CAST_CHUNK: usize = if cfg!(test) { 6 } else { 1 << 20 };

impl Produce for Cast {
    fn produce(&self) -> Result<Vec<u8>> {
        let bytes = self.src.bytes(&self.name)?;
        Ok(crate::dtype::cast_bytes(&bytes, self.src.dtype, self.to).expect("float dtypes checked by cast"))
    }

    /// The input streamed and converted [`CAST_CHUNK`] bytes at a time; an element cut by a
    /// segment boundary waits in a carry for the rest of its bytes.
    fn stream(&self, emit: &mut dyn FnMut(Segment<'_>) -> Result<()>) -> Result<()> {
        let mut conv = Converter { from: self.src.dtype, to: self.to, carry: Vec::new() };
        self.src.stream(&self.name, &mut |seg| match seg {
            Segment::Mapped { .. } => {
                let bytes = seg.as_slice().ok_or_else(|| {
                    Error::invalid(
                        &*self.src.origin,
                        format!("tensor '{}': range outside its file", self.name),
                    )
                })?;
                conv.feed(bytes, emit)
            }
            Segment::Bytes(b) => conv.feed(b, emit),
            // +0.0 is all zero bits in every float dtype.
            Segment::Zeros(n) if conv.carry.is_empty() && n % conv.from.size() == 0 => {
                emit(Segment::Zeros(n / conv.from.size() * conv.to.size()))
            }
            Segment::Zeros(mut n) => {
                const ZEROS: [u8; 64] = [0; 64];
                while n > 0 {
                    let k = n.min(ZEROS.len());
                    conv.feed(&ZEROS[..k], emit)?;
                    n -= k;
                }
                Ok(())
            }
        })
        // The length check in `TensorEntry::stream` guarantees whole elements: nothing is left
        // in the carry here.
    }
}

/// Float conversion of a byte stream cut at arbitrary points.
struct Converter {
    from: DType,
    to: DType,
    /// The first bytes of an element whose rest has not arrived yet.
    carry: Vec<u8>,
}

impl Converter {
    fn feed(&mut self, mut bytes: &[u8], emit: &mut dyn FnMut(Segment<'_>) -> Result<()>) -> Result<()> {
        let size = self.from.size();
        let cast =
            |b: &[u8]| crate::dtype::cast_bytes(b, self.from, self.to).expect("float dtypes checked by cast");
        if !self.carry.is_empty() {
            let take = (size - self.carry.len()).min(bytes.len());
            self.carry.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.carry.len() < size {
                return Ok(());
            }
            emit(Segment::Bytes(&cast(&self.carry)))?;
            self.carry.clear();
        }
        let whole = bytes.len() / size * size;
        for piece in bytes[..whole].chunks(CAST_CHUNK.div_ceil(size) * size) {
            emit(Segment::Bytes(&cast(piece)))?;
        }
        self.carry.extend_from_slice(&bytes[whole..]);
        Ok(())
    }
}

/// Name → tensor, in the order the format stored them.
pub type TensorMap = IndexMap<String, TensorEntry>;

/// A model-parallel rank position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Rank {
    /// Tensor-parallel rank.
    pub tp: usize,
    /// Pipeline-parallel rank.
    pub pp: usize,
}

/// The tensors held by one rank.
#[derive(Clone, Debug, Default)]
pub struct Shard {
    /// Which rank these tensors belong to.
    pub rank: Rank,
    /// The tensors, keyed by the format's own names.
    pub tensors: TensorMap,
    /// Keys stored with the value `None` (NeMo's `<module>._extra_state`): no data, but strict
    /// loaders expect the key, so they travel with the rank.
    pub none_keys: Vec<String>,
}

impl Shard {
    /// A rank's tensors with no `None` entries.
    pub fn new(rank: Rank, tensors: TensorMap) -> Self {
        Shard { rank, tensors, none_keys: Vec::new() }
    }
}

/// Tensor- and pipeline-parallel sizes of a checkpoint as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parallelism {
    /// Tensor-parallel size.
    pub tp: usize,
    /// Pipeline-parallel size.
    pub pp: usize,
}

impl Default for Parallelism {
    fn default() -> Self {
        Parallelism { tp: 1, pp: 1 }
    }
}

/// How the weights of a `.nemo` archive are laid out (formats.md §1.3, §1.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NemoLayout {
    /// `model_weights.ckpt` at the root (tp·pp = 1).
    Single,
    /// `mp_rank_XX/model_weights.ckpt` (tp > 1, pp = 1).
    MpRank,
    /// `tp_rank_XX_pp_rank_YYY/model_weights.ckpt` (pp > 1).
    TpPpRank,
    /// `model_weights/` Megatron-core distributed checkpoint (read in the conversion layer).
    Distributed,
}

impl NemoLayout {
    /// The layout NeMo writes for a given tp/pp (non-distributed).
    pub fn for_parallelism(p: Parallelism) -> Self {
        match (p.tp, p.pp) {
            (1, 1) => NemoLayout::Single,
            (_, 1) => NemoLayout::MpRank,
            _ => NemoLayout::TpPpRank,
        }
    }

    /// The archive path of one rank's `model_weights.ckpt` (formats.md §1.3).
    pub fn weights_member(self, rank: Rank) -> String {
        match self {
            NemoLayout::Single | NemoLayout::Distributed => "model_weights.ckpt".to_string(),
            NemoLayout::MpRank => format!("mp_rank_{:02}/model_weights.ckpt", rank.tp),
            NemoLayout::TpPpRank => {
                format!("tp_rank_{:02}_pp_rank_{:03}/model_weights.ckpt", rank.tp, rank.pp)
            }
        }
    }
}

/// The container a checkpoint was read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Flavour {
    /// One `.safetensors` file.
    SafetensorsFile,
    /// A HuggingFace model directory (config.json + safetensors, single or sharded).
    HfSafetensorsDir {
        /// Whether the weights are split over several files with an index.
        sharded: bool,
    },
    /// A HuggingFace model directory with `pytorch_model*.bin` weights.
    HfBinDir {
        /// Whether the weights are split over several files with an index.
        sharded: bool,
    },
    /// One PyTorch zip checkpoint (`.bin`, `.pt`, `.ckpt`).
    TorchZip,
    /// A `.nemo` archive or its extracted directory.
    Nemo {
        /// How the weights are laid out.
        layout: NemoLayout,
        /// Read from a gzip-compressed tar (NeMo < 1.7).
        gzip: bool,
        /// Read from an extracted directory rather than a tar.
        extracted: bool,
    },
}

impl fmt::Display for Flavour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Flavour::SafetensorsFile => f.write_str("safetensors file"),
            Flavour::HfSafetensorsDir { sharded } => {
                write!(f, "HF safetensors directory ({})", if *sharded { "sharded" } else { "single file" })
            }
            Flavour::HfBinDir { sharded } => {
                write!(
                    f,
                    "HF pytorch_model.bin directory ({})",
                    if *sharded { "sharded" } else { "single file" }
                )
            }
            Flavour::TorchZip => f.write_str("PyTorch zip checkpoint"),
            Flavour::Nemo { layout, gzip, extracted } => {
                let container = if *extracted {
                    "extracted .nemo directory"
                } else if *gzip {
                    ".nemo (gzip tar)"
                } else {
                    ".nemo (tar)"
                };
                let layout = match layout {
                    NemoLayout::Single => "model_weights.ckpt",
                    NemoLayout::MpRank => "mp_rank_XX/",
                    NemoLayout::TpPpRank => "tp_rank_XX_pp_rank_YYY/",
                    NemoLayout::Distributed => "model_weights/ distributed checkpoint",
                };
                write!(f, "{container}, weights in {layout}")
            }
        }
    }
}

/// A model configuration as the source stored it, kept verbatim so writing it back loses nothing.
#[derive(Clone, Debug)]
pub enum ModelConfig {
    /// HuggingFace `config.json`.
    HfJson(serde_json::Value),
    /// NeMo `model_config.yaml`.
    NemoYaml(crate::formats::nemo::NemoConfig),
}

/// A non-tensor file that travels with a checkpoint (tokenizer, generation config, ...).
#[derive(Clone, Debug)]
pub struct Artifact {
    /// File name as stored (for `.nemo`, the hashed `<32hex>_<basename>` member name).
    pub name: String,
    /// Its bytes.
    pub source: ByteSource,
}

/// Everything about a checkpoint that is not a tensor.
#[derive(Clone, Debug)]
pub struct Meta {
    /// The path it was read from.
    pub path: PathBuf,
    /// Which container format.
    pub flavour: Flavour,
    /// Model-parallel sizes as stored.
    pub parallel: Parallelism,
    /// The model configuration, when the container has one.
    pub config: Option<ModelConfig>,
    /// Tokenizer files and other companions.
    pub artifacts: Vec<Artifact>,
}

/// A checkpoint: metadata plus one tensor map per rank.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// Non-tensor information.
    pub meta: Meta,
    /// One entry per rank, ordered by (pp, tp).
    pub shards: Vec<Shard>,
}

impl Checkpoint {
    /// A checkpoint with a single rank.
    pub fn single(meta: Meta, tensors: TensorMap) -> Self {
        Checkpoint { meta, shards: vec![Shard::new(Rank::default(), tensors)] }
    }

    /// The tensor/pipeline parallelism the checkpoint was saved at: its ranks' for per-rank
    /// files, the yaml's for a distributed checkpoint (whose arrays are global: one shard).
    pub fn saved_parallelism(&self) -> Result<Parallelism> {
        match (&self.meta.flavour, &self.meta.config) {
            (Flavour::Nemo { layout: NemoLayout::Distributed, .. }, Some(ModelConfig::NemoYaml(cfg))) => {
                let size = |key: &str| match cfg.usize_or(key, 1)? {
                    0 => Err(Error::invalid(&self.meta.path, format!("model_config.yaml: '{key}' is 0"))),
                    n => Ok(n),
                };
                Ok(Parallelism {
                    tp: size("tensor_model_parallel_size")?,
                    pp: size("pipeline_model_parallel_size")?,
                })
            }
            _ => Ok(self.meta.parallel),
        }
    }

    /// The tensors of an unsharded checkpoint; an error naming the layout otherwise.
    pub fn tensors(&self) -> Result<&TensorMap> {
        match self.shards.as_slice() {
            [only] => Ok(&only.tensors),
            _ => Err(Error::invalid(
                &self.meta.path,
                format!(
                    "checkpoint has {} ranks (tp={}, pp={}); merge them before use",
                    self.shards.len(),
                    self.meta.parallel.tp,
                    self.meta.parallel.pp
                ),
            )),
        }
    }

    /// Total tensor bytes over all ranks.
    pub fn total_bytes(&self) -> usize {
        self.shards.iter().flat_map(|s| s.tensors.values()).map(TensorEntry::nbytes).sum()
    }

    /// Total tensor count over all ranks.
    pub fn tensor_count(&self) -> usize {
        self.shards.iter().map(|s| s.tensors.len()).sum()
    }
}
