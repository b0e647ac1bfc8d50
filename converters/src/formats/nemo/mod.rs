//! `.nemo` archives (formats.md §1): a tar (plain, or gzip for NeMo < 1.7) or its extracted
//! directory, holding `model_config.yaml`, the weights (one `model_weights.ckpt` per model-parallel
//! rank, or a `model_weights/` distributed checkpoint) and hashed artifact files.
//!
//! Nothing is extracted to disk. A plain tar is memory-mapped and each member becomes a byte range
//! of the mapping, so every rank's `model_weights.ckpt` is parsed in place by
//! [`torch_zip`] and tensors stay zero-copy. A gzip tar is inflated once into an
//! anonymous temporary file (under `$TMPDIR`) that is mapped the same way, which keeps RAM bounded.
//! Member order never matters: members are indexed by their normalised name first, then the
//! layout is decided from the whole set and cross-checked against the yaml.
//!
//! Writing ([`write()`]) produces what NeMo's `tarfile` call produces: an uncompressed PAX tar with
//! `./`-prefixed names in sorted depth-first order, each rank's zip streamed straight into its
//! member with no temporary copy. [`write_distributed`] writes the weights as a
//! `model_weights/` distributed checkpoint instead (zarr or torch_dist, `distributed`), chunks
//! streamed the same way.

mod config;
mod distributed;
mod tar;
mod torch_dist;
mod write;
mod zarr;

pub use self::config::NemoConfig;
pub use self::distributed::{DistArray, DistBackend, DistWeights};
pub use self::tar::{list_members, MemberKind, TarMember};
pub use self::write::{write, write_distributed, WriteOptions};

use super::torch_zip;
use crate::checkpoint::{
    Artifact, ByteSource, Checkpoint, Flavour, Meta, ModelConfig, NemoLayout, Parallelism, Rank, Shard,
};
use crate::error::{Error, IoContext, Result};
use memmap2::Mmap;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The config member.
const CONFIG: &str = "model_config.yaml";
/// The weights file name, at the root or in a rank directory.
const WEIGHTS: &str = "model_weights.ckpt";
/// The distributed-checkpoint directory.
const DIST_DIR: &str = "model_weights";
const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
/// How deep an extracted directory is walked (zarr chunks with `/` separators sit ~5 deep).
const MAX_DIR_DEPTH: usize = 16;

/// Read a `.nemo` tar (plain or gzip) or an extracted `.nemo` directory, headers only.
pub fn read(path: &Path) -> Result<Checkpoint> {
    let meta = std::fs::metadata(path).at(path)?;
    if meta.is_dir() {
        return Store::from_dir(path)?.into_checkpoint();
    }
    let map = super::map_file(path)?;
    if map.starts_with(GZIP_MAGIC) {
        let map = gunzip(path, &map)?;
        Store::from_tar(path, map, true)?.into_checkpoint()
    } else {
        Store::from_tar(path, map, false)?.into_checkpoint()
    }
}

/// Read a `.nemo` tar image held in memory (entry point for fuzzing; never panics, always
/// terminates). The bytes are copied into an anonymous mapping so the same zero-copy reader runs.
pub fn read_tar_bytes(bytes: &[u8]) -> Result<Checkpoint> {
    let origin = Path::new("<memory>");
    if bytes.is_empty() {
        return Err(Error::malformed(origin, "tar", "empty file"));
    }
    let mut map = memmap2::MmapMut::map_anon(bytes.len()).at(origin)?;
    map.copy_from_slice(bytes);
    let map = Arc::new(map.make_read_only().at(origin)?);
    Store::from_tar(origin, map, false)?.into_checkpoint()
}

/// The artifact a config value such as `tokenizer.model` refers to (formats.md §1.4):
/// `nemo:<name>` names an archive member; any other value (an old absolute path, an
/// `/artifacts/…` path) matches by its basename.
pub fn resolve_artifact<'a>(ckpt: &'a Checkpoint, config_value: &str) -> Option<&'a Artifact> {
    let value = config_value.trim();
    let name = match value.strip_prefix("nemo:") {
        Some(rest) => rest.trim_start_matches("./"),
        None => value.rsplit(['/', '\\']).next().unwrap_or(value),
    };
    if name.is_empty() {
        return None;
    }
    ckpt.meta.artifacts.iter().find(|a| a.name == name)
}

/// Where a member's bytes live.
#[derive(Clone)]
enum Blob {
    /// A range of a mapped tar image.
    Range { map: Arc<Mmap>, offset: usize, len: usize },
    /// A file of an extracted directory.
    File(PathBuf),
}

/// The members of an archive or extracted directory, indexed by normalised name.
struct Store {
    root: PathBuf,
    gzip: bool,
    extracted: bool,
    files: BTreeMap<String, Blob>,
    dirs: BTreeSet<String>,
}

impl Store {
    fn from_tar(root: &Path, map: Arc<Mmap>, gzip: bool) -> Result<Store> {
        let members = list_members(&map, root)?;
        let mut store = Store::empty(root, gzip, false);
        for m in members {
            match m.kind {
                MemberKind::Dir => store.add_dir(&m.name),
                MemberKind::File => {
                    store.add_parents(&m.name);
                    store
                        .files
                        .insert(m.name, Blob::Range { map: map.clone(), offset: m.offset, len: m.len });
                }
            }
        }
        Ok(store)
    }

    fn from_dir(root: &Path) -> Result<Store> {
        let mut store = Store::empty(root, false, true);
        store.walk(root, "", 0)?;
        Ok(store)
    }

    fn empty(root: &Path, gzip: bool, extracted: bool) -> Store {
        Store { root: root.to_path_buf(), gzip, extracted, files: BTreeMap::new(), dirs: BTreeSet::new() }
    }

    fn walk(&mut self, dir: &Path, prefix: &str, depth: usize) -> Result<()> {
        if depth > MAX_DIR_DEPTH {
            return Err(Error::invalid(dir, format!("directory nesting deeper than {MAX_DIR_DEPTH} levels")));
        }
        for entry in std::fs::read_dir(dir).at(dir)? {
            let entry = entry.at(dir)?;
            let path = entry.path();
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                return Err(Error::invalid(&path, "file name is not UTF-8"));
            };
            let rel = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
            // Follow symlinks: an extracted directory assembled from links is still that directory.
            let meta = std::fs::metadata(&path).at(&path)?;
            if meta.is_dir() {
                self.add_dir(&rel);
                self.walk(&path, &rel, depth + 1)?;
            } else if meta.is_file() {
                self.files.insert(rel, Blob::File(path));
            }
        }
        Ok(())
    }

    fn add_dir(&mut self, name: &str) {
        if !name.is_empty() {
            self.add_parents(name);
            self.dirs.insert(name.to_string());
        }
    }

    fn add_parents(&mut self, name: &str) {
        let mut at = name;
        while let Some((parent, _)) = at.rsplit_once('/') {
            self.dirs.insert(parent.to_string());
            at = parent;
        }
    }

    /// `archive:member` for tar members, the file path for extracted ones.
    fn origin(&self, name: &str) -> Arc<Path> {
        if self.extracted {
            Arc::from(self.root.join(name))
        } else {
            Arc::from(PathBuf::from(format!("{}:{name}", self.root.display())))
        }
    }

    fn source(&self, name: &str) -> Result<ByteSource> {
        match self.files.get(name) {
            Some(Blob::Range { map, offset, len }) => Ok(ByteSource::mapped(map.clone(), *offset, *len)),
            Some(Blob::File(path)) => {
                let map = super::map_file(path)?;
                let len = map.len();
                Ok(ByteSource::mapped(map, 0, len))
            }
            None => Err(Error::missing(&self.root, format!("member {name}"))),
        }
    }

    fn read_torch(&self, name: &str) -> Result<torch_zip::TorchState> {
        match self.files.get(name) {
            Some(Blob::Range { map, offset, len }) => {
                torch_zip::read_mapped(map.clone(), *offset, *len, self.origin(name))
            }
            Some(Blob::File(path)) => torch_zip::read_file(path),
            None => Err(Error::missing(&self.root, format!("member {name}"))),
        }
    }

    fn config(&self) -> Result<NemoConfig> {
        if !self.files.contains_key(CONFIG) {
            if self.dirs.contains("weights") || self.dirs.contains("context") {
                return Err(Error::invalid(
                    &self.root,
                    "this is a NeMo 2.x checkpoint (context/ + weights/), which is out of scope; \
                     only NeMo 1.x .nemo files are supported",
                ));
            }
            return Err(Error::missing(&self.root, format!("member {CONFIG}")));
        }
        let source = self.source(CONFIG)?;
        let bytes = source.bytes()?;
        let origin = self.origin(CONFIG);
        let raw = std::str::from_utf8(&bytes)
            .map_err(|e| Error::malformed(&*origin, "yaml", format!("not UTF-8: {e}")))?
            .to_string();
        NemoConfig::parse(raw, &origin)
    }

    fn into_checkpoint(self) -> Result<Checkpoint> {
        let config = self.config()?;
        let mut ranks: BTreeMap<(usize, usize), String> = BTreeMap::new();
        let mut dist = false;
        let mut artifacts = Vec::new();
        for name in self.files.keys() {
            if name == CONFIG {
                continue;
            }
            if name.starts_with(&format!("{DIST_DIR}/")) {
                dist = true;
            } else if let Some(rank) = classify_weights(&self.root, name).transpose()? {
                ranks.insert((rank.pp, rank.tp), name.clone());
            } else {
                artifacts.push(Artifact { name: name.clone(), source: self.source(name)? });
            }
        }
        let root = &self.root;
        let (layout, parallel, shards) = if dist {
            if let Some(name) = ranks.values().next() {
                return Err(Error::invalid(
                    root,
                    format!(
                        "holds both a {DIST_DIR}/ distributed checkpoint and '{name}'; \
                         a .nemo has exactly one of the two"
                    ),
                ));
            }
            let tensors = match torch_dist::backend(&self, DIST_DIR)? {
                torch_dist::Backend::Zarr => zarr::read(&self, DIST_DIR)?,
                torch_dist::Backend::TorchDist => torch_dist::read(&self, DIST_DIR)?,
            };
            // The arrays are global (all ranks merged), so as stored this is one shard.
            let shard = Shard::new(Rank::default(), tensors);
            (NemoLayout::Distributed, Parallelism::default(), vec![shard])
        } else {
            let parallel = check_ranks(root, &config, &ranks)?;
            let mut shards = Vec::with_capacity(ranks.len());
            for (&(pp, tp), name) in &ranks {
                let state = self.read_torch(name)?;
                shards.push(Shard {
                    rank: Rank { tp, pp },
                    tensors: state.tensors,
                    none_keys: state.none_keys,
                });
            }
            (NemoLayout::for_parallelism(parallel), parallel, shards)
        };
        let meta = Meta {
            path: self.root.clone(),
            flavour: Flavour::Nemo { layout, gzip: self.gzip, extracted: self.extracted },
            parallel,
            config: Some(ModelConfig::NemoYaml(config)),
            artifacts,
        };
        Ok(Checkpoint { meta, shards })
    }
}

/// Whether `name` is a rank's weights file: `Ok(None)` for any other member, an error for a
/// weights file whose directory is not one of NeMo's rank names.
fn classify_weights(root: &Path, name: &str) -> Option<Result<Rank>> {
    if name == WEIGHTS {
        return Some(Ok(Rank::default()));
    }
    let dir = name.strip_suffix(WEIGHTS)?.strip_suffix('/')?;
    let parsed = if let Some(tp) = dir.strip_prefix("mp_rank_") {
        digits(tp).map(|tp| (NemoLayout::MpRank, Rank { tp, pp: 0 }))
    } else if let Some((tp, pp)) = dir.strip_prefix("tp_rank_").and_then(|r| r.split_once("_pp_rank_")) {
        digits(tp).zip(digits(pp)).map(|(tp, pp)| (NemoLayout::TpPpRank, Rank { tp, pp }))
    } else {
        None
    };
    // Only NeMo's exact zero-padded spelling is a rank file: it is what NeMo itself opens.
    Some(match parsed {
        Some((layout, rank)) if layout.weights_member(rank) == name => Ok(rank),
        _ => Err(Error::invalid(
            root,
            format!(
                "'{name}' is a weights file in a directory that is not a NeMo rank directory \
                 (mp_rank_XX/ or tp_rank_XX_pp_rank_YYY/, zero-padded)"
            ),
        )),
    })
}

fn digits(s: &str) -> Option<usize> {
    if s.is_empty() || s.len() > 6 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The rank files must be exactly the set NeMo opens for the yaml's tp/pp (formats.md §1.3).
fn check_ranks(
    root: &Path,
    config: &NemoConfig,
    ranks: &BTreeMap<(usize, usize), String>,
) -> Result<Parallelism> {
    if ranks.is_empty() {
        return Err(Error::missing(
            root,
            format!(
                "weights ({WEIGHTS}, mp_rank_XX/{WEIGHTS}, tp_rank_XX_pp_rank_YYY/{WEIGHTS} or {DIST_DIR}/)"
            ),
        ));
    }
    let tp = config.usize_or("tensor_model_parallel_size", 1)?;
    let pp = config.usize_or("pipeline_model_parallel_size", 1)?;
    let declared =
        format!("{CONFIG} declares tensor_model_parallel_size={tp}, pipeline_model_parallel_size={pp}");
    if tp == 0 || pp == 0 {
        return Err(Error::invalid(root, format!("{declared}; both must be at least 1")));
    }
    let found: Vec<&str> = ranks.values().map(String::as_str).collect();
    let layout = NemoLayout::for_parallelism(Parallelism { tp, pp });
    let expected_desc = match layout {
        NemoLayout::Single => WEIGHTS.to_string(),
        _ => format!(
            "{} .. {} ({} files)",
            layout.weights_member(Rank::default()),
            layout.weights_member(Rank { tp: tp - 1, pp: pp - 1 }),
            tp.saturating_mul(pp)
        ),
    };
    let mismatch = |detail: String| {
        Error::invalid(root, format!("{declared}, so NeMo expects {expected_desc}; {detail}"))
    };
    // Compare counts first so a huge declared size is never enumerated.
    if tp.checked_mul(pp) != Some(found.len()) {
        return Err(mismatch(format!("found {} rank file(s): {}", found.len(), list(&found))));
    }
    let expected: BTreeSet<String> =
        (0..pp).flat_map(|p| (0..tp).map(move |t| layout.weights_member(Rank { tp: t, pp: p }))).collect();
    let missing: Vec<&str> = expected.iter().map(String::as_str).filter(|e| !found.contains(e)).collect();
    let unexpected: Vec<&str> = found.iter().copied().filter(|f| !expected.contains(*f)).collect();
    if !missing.is_empty() || !unexpected.is_empty() {
        return Err(mismatch(format!("missing {}; unexpected {}", list(&missing), list(&unexpected))));
    }
    Ok(Parallelism { tp, pp })
}

/// A short human list of names.
fn list(names: &[&str]) -> String {
    const SHOW: usize = 6;
    if names.is_empty() {
        return "none".into();
    }
    let mut s = names.iter().take(SHOW).copied().collect::<Vec<_>>().join(", ");
    if names.len() > SHOW {
        s.push_str(&format!(", … ({} more)", names.len() - SHOW));
    }
    s
}

/// Inflate a gzip tar into an anonymous temporary file and map it.
fn gunzip(path: &Path, compressed: &[u8]) -> Result<Arc<Mmap>> {
    let tmp_dir = std::env::temp_dir();
    let file = tempfile::tempfile().at(&tmp_dir)?;
    {
        let mut decoder = flate2::read::MultiGzDecoder::new(compressed);
        let mut out = BufWriter::with_capacity(1 << 20, &file);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match decoder.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::malformed(path, "gzip", e.to_string())),
            };
            out.write_all(&buf[..n]).at(&tmp_dir)?;
        }
        out.flush().at(&tmp_dir)?;
    }
    // SAFETY: the file is anonymous (already unlinked) and only this process holds it.
    let map = Arc::new(unsafe { Mmap::map(&file) }.at(&tmp_dir)?);
    // File-backed (not anonymous), so its pages may be released while streaming.
    crate::progress::register_map(&map, file);
    Ok(map)
}

#[cfg(test)]
mod tests;
