//! Writing `.nemo` archives and extracted directories.
//!
//! The member set is planned and validated first (config present, ranks form the tp×pp grid,
//! yaml agrees with it, artifact names are safe and collide with nothing), so a bad request fails
//! before a byte is written. Then each member is written in Python `tarfile.add(dir, ".")` order:
//! names sorted per directory, depth first, `./` prefixed, directories with a trailing `/`.
//!
//! A rank's `model_weights.ckpt` is never staged: its exact length comes from
//! [`torch_zip::encoded_len`], the tar header is written with that size, and the zip writer then
//! streams into a [`Window`] of the output file that starts at the member's data. Memory stays
//! bounded by the largest tensor. All outputs go through [`AtomicFile`]/[`AtomicDir`], so an
//! error leaves nothing at the destination.

use super::distributed::{self, DistBackend, DistItem, DistMember, DistWeights};
use super::tar::{dir_header, file_header, normalize, padding, trailer};
use super::{torch_zip, NemoConfig, CONFIG, DIST_DIR, WEIGHTS};
use crate::atomic::{AtomicDir, AtomicFile};
use crate::checkpoint::{ByteSource, Checkpoint, ModelConfig, NemoLayout, Parallelism, Rank, TensorEntry};
use crate::error::{Error, IoContext, Result};
use std::borrow::Cow;
use std::fs::File;
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::path::Path;

/// The name `torch.save` gives the top directory inside the zip (the saved file's stem).
const ZIP_ARCHIVE_NAME: &str = "model_weights";

/// How to write a `.nemo`.
#[derive(Clone, Debug, Default)]
pub struct WriteOptions {
    /// Weights layout; `None` means the one NeMo opens for the checkpoint's tp/pp
    /// ([`NemoLayout::for_parallelism`]). Any other choice is refused, since NeMo would not load it.
    pub layout: Option<NemoLayout>,
    /// Gzip the tar (what NeMo < 1.7 wrote; current NeMo reads both).
    pub gzip: bool,
    /// Write an extracted directory instead of a tar.
    pub extracted: bool,
    /// Replace an existing destination.
    pub overwrite: bool,
}

/// Write `ckpt` as a `.nemo` tar (or extracted directory) at `dest`, atomically.
///
/// The checkpoint must carry a [`ModelConfig::NemoYaml`] whose `tensor_model_parallel_size` /
/// `pipeline_model_parallel_size` match its shards (edit them with [`NemoConfig::set_scalar`]
/// when resharding). Only tensors are written into each rank's `model_weights.ckpt`.
pub fn write(ckpt: &Checkpoint, dest: &Path, opts: &WriteOptions) -> Result<()> {
    write_nemo(ckpt, dest, opts, None)
}

/// Write `ckpt` as a `.nemo` whose weights are the `model_weights/` distributed checkpoint
/// `weights` in `backend` (formats.md §1.6) instead of its shards, atomically. The yaml's tp/pp
/// must match `ckpt.meta.parallel` as for [`write()`]; the shards themselves are not written.
pub fn write_distributed(
    ckpt: &Checkpoint,
    weights: &DistWeights,
    backend: DistBackend,
    dest: &Path,
    opts: &WriteOptions,
) -> Result<()> {
    write_nemo(ckpt, dest, opts, Some((weights, backend)))
}

fn write_nemo(
    ckpt: &Checkpoint,
    dest: &Path,
    opts: &WriteOptions,
    dist: Option<(&DistWeights, DistBackend)>,
) -> Result<()> {
    if opts.gzip && opts.extracted {
        return Err(Error::invalid(dest, "gzip applies to a .nemo tar, not to an extracted directory"));
    }
    let items = plan(ckpt, dest, opts, dist)?;
    if opts.extracted {
        write_dir(&items, dest, opts.overwrite)
    } else {
        write_tar(&items, dest, opts)
    }
}

/// What one member holds.
enum Body<'a> {
    Dir,
    Bytes(Cow<'a, [u8]>),
    Source(&'a ByteSource),
    /// Written in place at its offset in the output, by a streaming writer.
    Placed(Placed<'a>),
}

/// A member whose exact length is known from headers and whose writer fills it in place (so
/// neither the member nor the tensors in it are ever held whole).
enum Placed<'a> {
    /// A rank's `model_weights.ckpt` zip.
    Weights(torch_zip::TorchState),
    /// A tensor's raw bytes (a zarr chunk); the `&str` names it in errors.
    Tensor(&'a str, &'a TensorEntry),
    /// A `.distcp` file's items, `u64` bytes in all.
    Items(Vec<DistItem<'a>>, u64),
}

impl Placed<'_> {
    /// The member's length.
    fn len(&self) -> Result<u64> {
        Ok(match self {
            Placed::Weights(state) => torch_zip::encoded_len(state, ZIP_ARCHIVE_NAME)?,
            Placed::Tensor(_, entry) => entry.nbytes() as u64,
            Placed::Items(_, len) => *len,
        })
    }

    /// Write the member at byte `at` of `file` (`dest` in errors); returns the bytes written as
    /// its writer counts them, which the caller checks against [`Placed::len`] and the file.
    fn write(&self, file: &File, at: u64, dest: &Path) -> Result<u64> {
        match self {
            Placed::Weights(state) => torch_zip::write_at(state, file, at, ZIP_ARCHIVE_NAME, dest),
            Placed::Tensor(name, entry) => {
                crate::sink::write_tensor_at(file, dest, at, name, entry, false)?;
                let len = entry.nbytes() as u64;
                crate::progress::tensor_written(len);
                Ok(len)
            }
            Placed::Items(parts, _) => distributed::write_distcp(parts, file, at, dest),
        }
    }
}

/// One member to write, by normalised name (no `./`, no trailing `/`; `""` is the root).
struct Item<'a> {
    name: String,
    body: Body<'a>,
}

impl Item<'_> {
    /// The name as stored in the tar, the way Python's `tarfile.add(dir, arcname=".")` spells it.
    fn tar_name(&self) -> String {
        match (&self.body, self.name.is_empty()) {
            (Body::Dir, true) => "./".to_string(),
            (Body::Dir, false) => format!("./{}/", self.name),
            _ => format!("./{}", self.name),
        }
    }
}

fn plan<'a>(
    ckpt: &'a Checkpoint,
    dest: &Path,
    opts: &WriteOptions,
    dist: Option<(&'a DistWeights, DistBackend)>,
) -> Result<Vec<Item<'a>>> {
    let config: &NemoConfig = match &ckpt.meta.config {
        Some(ModelConfig::NemoYaml(c)) => c,
        _ => {
            return Err(Error::missing(
                dest,
                format!(
                    "NeMo {CONFIG}: the checkpoint carries no NeMo config; build one before writing a .nemo"
                ),
            ));
        }
    };
    let parallel = if dist.is_some() { ckpt.meta.parallel } else { check_grid(ckpt, dest)? };
    let nemo_layout =
        if dist.is_some() { NemoLayout::Distributed } else { NemoLayout::for_parallelism(parallel) };
    let layout = opts.layout.unwrap_or(nemo_layout);
    if layout == NemoLayout::Distributed && dist.is_none() {
        return Err(Error::invalid(
            dest,
            format!(
                "a {DIST_DIR}/ distributed checkpoint is written from its global arrays (write_distributed)"
            ),
        ));
    }
    if layout != nemo_layout {
        return Err(Error::invalid(
            dest,
            format!(
                "layout {layout:?} requested, but for tp={}, pp={} NeMo opens {nemo_layout:?} ({}); \
                 it would not load the file",
                parallel.tp,
                parallel.pp,
                nemo_layout.weights_member(Rank::default())
            ),
        ));
    }
    let yaml_tp = config.usize_or("tensor_model_parallel_size", 1)?;
    let yaml_pp = config.usize_or("pipeline_model_parallel_size", 1)?;
    if (yaml_tp, yaml_pp) != (parallel.tp, parallel.pp) {
        return Err(Error::invalid(
            dest,
            format!(
                "{CONFIG} says tensor_model_parallel_size={yaml_tp}, pipeline_model_parallel_size={yaml_pp} \
                 but the checkpoint has tp={}, pp={}; update the yaml first (NemoConfig::set_scalar)",
                parallel.tp, parallel.pp
            ),
        ));
    }

    let mut items =
        vec![Item { name: CONFIG.to_string(), body: Body::Bytes(Cow::Borrowed(config.raw.as_bytes())) }];
    match dist {
        Some((weights, backend)) => {
            for member in distributed::members(weights, backend, dest)? {
                let (name, body) = match member {
                    DistMember::Bytes(name, bytes) => (name, Body::Bytes(Cow::Owned(bytes))),
                    DistMember::Chunk(name, key, chunk) => (name, Body::Placed(Placed::Tensor(key, chunk))),
                    DistMember::Items(name, parts, len) => (name, Body::Placed(Placed::Items(parts, len))),
                };
                items.push(Item { name: format!("{DIST_DIR}/{name}"), body });
            }
        }
        None => {
            for shard in &ckpt.shards {
                let state = torch_zip::TorchState::new(shard.tensors.clone(), shard.none_keys.clone());
                items.push(Item {
                    name: layout.weights_member(shard.rank),
                    body: Body::Placed(Placed::Weights(state)),
                });
            }
        }
    }
    let reserved: Vec<String> = items.iter().map(|i| i.name.clone()).collect();
    for artifact in &ckpt.meta.artifacts {
        let name = normalize(artifact.name.as_bytes(), dest)?;
        let clash = name.is_empty()
            || reserved.iter().any(|r| {
                *r == name || r.starts_with(&format!("{name}/")) || name.starts_with(&format!("{r}/"))
            })
            || name == DIST_DIR
            || name.starts_with(&format!("{DIST_DIR}/"))
            || name == WEIGHTS
            || name.ends_with(&format!("/{WEIGHTS}"));
        if clash {
            return Err(Error::invalid(
                dest,
                format!("artifact '{}' would collide with the config or weights members", artifact.name),
            ));
        }
        if items.iter().any(|i| i.name == name) {
            return Err(Error::invalid(dest, format!("two artifacts are named '{name}'")));
        }
        items.push(Item { name, body: Body::Source(&artifact.source) });
    }
    // Directory entries for every parent, as `tarfile.add` walking the folder would record them.
    let mut dirs = std::collections::BTreeSet::from([String::new()]);
    for item in &items {
        let mut at = item.name.as_str();
        while let Some((parent, _)) = at.rsplit_once('/') {
            dirs.insert(parent.to_string());
            at = parent;
        }
    }
    if let Some(both) = items.iter().find(|i| dirs.contains(&i.name)) {
        return Err(Error::invalid(
            dest,
            format!("artifact '{}' would be both a file and a directory", both.name),
        ));
    }
    items.extend(dirs.into_iter().map(|name| Item { name, body: Body::Dir }));
    // Sorting component lists gives sorted-children depth-first order with each directory first.
    items.sort_by(|a, b| {
        a.name.split('/').filter(|s| !s.is_empty()).cmp(b.name.split('/').filter(|s| !s.is_empty()))
    });
    Ok(items)
}

/// The shards must be exactly the (tp, pp) grid of `meta.parallel`, each rank once.
fn check_grid(ckpt: &Checkpoint, dest: &Path) -> Result<Parallelism> {
    let p = ckpt.meta.parallel;
    let ranks: Vec<String> =
        ckpt.shards.iter().map(|s| format!("(tp {}, pp {})", s.rank.tp, s.rank.pp)).collect();
    let bad = || {
        Error::invalid(
            dest,
            format!("checkpoint declares tp={}, pp={} but holds ranks [{}]", p.tp, p.pp, ranks.join(", ")),
        )
    };
    if p.tp == 0 || p.pp == 0 || p.tp.checked_mul(p.pp) != Some(ckpt.shards.len()) {
        return Err(bad());
    }
    let mut seen = std::collections::HashSet::new();
    for s in &ckpt.shards {
        if s.rank.tp >= p.tp || s.rank.pp >= p.pp || !seen.insert(s.rank) {
            return Err(bad());
        }
    }
    Ok(p)
}

fn write_tar(items: &[Item<'_>], dest: &Path, opts: &WriteOptions) -> Result<()> {
    let mut out = AtomicFile::create(dest, opts.overwrite)?;
    if opts.gzip {
        // The weights need a seekable target, so the tar is staged uncompressed next to the
        // destination (same filesystem the user sized for the output), then compressed.
        let dir = match dest.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        let mut staged = tempfile::tempfile_in(&dir).at(&dir)?;
        write_tar_to(items, &mut staged, dest)?;
        staged.seek(SeekFrom::Start(0)).at(dest)?;
        let mut enc =
            flate2::write::GzEncoder::new(BufWriter::with_capacity(1 << 20, out.file()), Default::default());
        io::copy(&mut io::BufReader::with_capacity(1 << 20, staged), &mut enc).at(dest)?;
        enc.finish().at(dest)?.flush().at(dest)?;
    } else {
        write_tar_to(items, out.file(), dest)?;
    }
    out.commit()
}

/// The tar being written, with its current length.
struct TarOut<'f> {
    file: &'f mut File,
    pos: u64,
    dest: &'f Path,
}

impl TarOut<'_> {
    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.file.write_all(bytes).at(self.dest)?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    fn member(&mut self, tar_name: &str, bytes: &[u8]) -> Result<()> {
        let len = bytes.len() as u64;
        self.put(&file_header(tar_name, len))?;
        self.put(bytes)?;
        self.put(&vec![0; padding(len)])
    }

    /// A placed member, written straight into its data region.
    fn placed(&mut self, tar_name: &str, body: &Placed<'_>) -> Result<()> {
        let dest = self.dest;
        let len = body.len()?;
        self.put(&file_header(tar_name, len))?;
        let start = self.pos;
        let written = body.write(self.file, start, dest)?;
        let end = self.file.seek(SeekFrom::End(0)).at(dest)?;
        if written != len || end != start + len {
            return Err(Error::invalid(
                dest,
                format!(
                    "member {tar_name}: its writer announced {len} bytes but wrote {written} \
                     (the file now ends {} bytes past the member start)",
                    end.saturating_sub(start)
                ),
            ));
        }
        self.pos = end;
        self.put(&vec![0; padding(len)])
    }
}

fn write_tar_to(items: &[Item<'_>], file: &mut File, dest: &Path) -> Result<()> {
    let mut out = TarOut { file, pos: 0, dest };
    for item in items {
        let tar_name = item.tar_name();
        match &item.body {
            Body::Dir => out.put(&dir_header(&tar_name))?,
            Body::Bytes(b) => out.member(&tar_name, b)?,
            Body::Source(src) => out.member(&tar_name, &src.bytes()?)?,
            Body::Placed(body) => out.placed(&tar_name, body)?,
        }
    }
    let end = trailer(out.pos);
    out.put(&end)
}

fn write_dir(items: &[Item<'_>], dest: &Path, overwrite: bool) -> Result<()> {
    let out = AtomicDir::create(dest, overwrite)?;
    for item in items {
        let path = out.path().join(&item.name);
        match &item.body {
            Body::Dir => std::fs::create_dir_all(&path).at(&path)?,
            Body::Bytes(b) => std::fs::write(&path, b).at(&path)?,
            Body::Source(src) => std::fs::write(&path, src.bytes()?).at(&path)?,
            Body::Placed(body) => {
                let len = body.len()?;
                let file = File::create(&path).at(&path)?;
                let written = body.write(&file, 0, &path)?;
                let size = file.metadata().at(&path)?.len();
                if written != len || size != len {
                    return Err(Error::invalid(
                        &path,
                        format!("its writer announced {len} bytes but wrote {written} (the file has {size})"),
                    ));
                }
                file.sync_all().at(&path)?;
            }
        }
    }
    out.commit()
}
