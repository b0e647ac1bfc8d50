//! HuggingFace model directories: `config.json`, weights as safetensors or `pytorch_model*.bin`
//! (single file or sharded with an index), and tokenizer / generation files carried as artifacts.

use crate::checkpoint::{
    Artifact, ByteSource, Checkpoint, Flavour, Meta, ModelConfig, Parallelism, TensorMap,
};
use crate::error::{Error, IoContext, Result};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const ST_SINGLE: &str = "model.safetensors";
const ST_INDEX: &str = "model.safetensors.index.json";
const BIN_SINGLE: &str = "pytorch_model.bin";
const BIN_INDEX: &str = "pytorch_model.bin.index.json";

/// Companion files copied along with the weights when present.
pub const COMPANION_FILES: &[&str] = &[
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
    "chat_template.jinja",
];

/// Where a directory's weights live.
#[derive(Debug, Clone, PartialEq, Eq)]
enum WeightFiles {
    Safetensors(Vec<PathBuf>, bool),
    Bin(Vec<PathBuf>, bool),
}

/// Whether `dir` holds HF-style weights (safetensors or `pytorch_model*.bin`).
pub fn has_weights(dir: &Path) -> Result<bool> {
    Ok(weight_files(dir)?.is_some())
}

fn weight_files(dir: &Path) -> Result<Option<WeightFiles>> {
    if dir.join(ST_INDEX).is_file() {
        return Ok(Some(WeightFiles::Safetensors(index_files(&dir.join(ST_INDEX))?, true)));
    }
    if dir.join(ST_SINGLE).is_file() {
        return Ok(Some(WeightFiles::Safetensors(vec![dir.join(ST_SINGLE)], false)));
    }
    let mut loose: Vec<PathBuf> = std::fs::read_dir(dir)
        .at(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    if !loose.is_empty() {
        loose.sort();
        let sharded = loose.len() > 1;
        return Ok(Some(WeightFiles::Safetensors(loose, sharded)));
    }
    if dir.join(BIN_INDEX).is_file() {
        return Ok(Some(WeightFiles::Bin(index_files(&dir.join(BIN_INDEX))?, true)));
    }
    if dir.join(BIN_SINGLE).is_file() {
        return Ok(Some(WeightFiles::Bin(vec![dir.join(BIN_SINGLE)], false)));
    }
    Ok(None)
}

/// The index's `weight_map` as (tensor, file) pairs.
fn read_index(index: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read(index).at(index)?;
    let v: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| Error::malformed(index, "index json", e.to_string()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::malformed(index, "index json", "no \"weight_map\" object"))?;
    map.iter()
        .map(|(k, f)| match f.as_str() {
            Some(f) if !f.contains('/') && !f.contains('\\') && f != ".." => Ok((k.clone(), f.to_string())),
            _ => Err(Error::malformed(index, "index json", format!("tensor '{k}': bad file name {f}"))),
        })
        .collect()
}

fn index_files(index: &Path) -> Result<Vec<PathBuf>> {
    let dir = index.parent().unwrap_or(Path::new("."));
    let files: BTreeSet<String> = read_index(index)?.into_iter().map(|(_, f)| f).collect();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Read an HF directory, headers only.
pub fn read(dir: &Path) -> Result<Checkpoint> {
    let Some(files) = weight_files(dir)? else {
        return Err(Error::missing(dir, "HF weights (model.safetensors, pytorch_model.bin or an index)"));
    };
    let (paths, sharded, flavour) = match files {
        WeightFiles::Safetensors(p, s) => (p, s, Flavour::HfSafetensorsDir { sharded: s }),
        WeightFiles::Bin(p, s) => (p, s, Flavour::HfBinDir { sharded: s }),
    };
    let mut tensors = TensorMap::new();
    for path in &paths {
        if !path.is_file() {
            return Err(Error::missing(dir, format!("weight file {} named by the index", path.display())));
        }
        let part = match flavour {
            Flavour::HfSafetensorsDir { .. } => super::safetensors::read_file(path)?,
            _ => super::torch_zip::read_file(path)?.tensors,
        };
        for (name, t) in part {
            if let Some(prev) = tensors.get(&name) {
                return Err(Error::invalid(
                    dir,
                    format!(
                        "tensor '{name}' appears in both {} and {}",
                        prev.origin.display(),
                        path.display()
                    ),
                ));
            }
            tensors.insert(name, t);
        }
    }
    if sharded {
        check_index_agrees(dir, &flavour, &tensors)?;
    }
    let config = match std::fs::read(dir.join("config.json")) {
        Ok(bytes) => Some(ModelConfig::HfJson(
            serde_json::from_slice(&bytes)
                .map_err(|e| Error::malformed(dir.join("config.json"), "json", e.to_string()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::Io { path: dir.join("config.json"), source: e }),
    };
    let mut artifacts = Vec::new();
    for name in COMPANION_FILES {
        let p = dir.join(name);
        if p.is_file() {
            artifacts.push(Artifact {
                name: name.to_string(),
                source: ByteSource::owned(std::fs::read(&p).at(&p)?),
            });
        }
    }
    let meta = Meta { path: dir.to_path_buf(), flavour, parallel: Parallelism::default(), config, artifacts };
    Ok(Checkpoint::single(meta, tensors))
}

/// Every tensor the index names must be in the file it names, and every tensor found must be
/// indexed: a mismatch usually means an interrupted download.
fn check_index_agrees(dir: &Path, flavour: &Flavour, tensors: &TensorMap) -> Result<()> {
    let index = dir.join(match flavour {
        Flavour::HfSafetensorsDir { .. } => ST_INDEX,
        _ => BIN_INDEX,
    });
    if !index.is_file() {
        return Ok(()); // loose safetensors files without an index
    }
    let entries = read_index(&index)?;
    for (name, file) in &entries {
        match tensors.get(name) {
            None => {
                return Err(Error::missing(&index, format!("tensor '{name}' (index says it is in {file})")))
            }
            Some(t) if t.origin.file_name().is_none_or(|f| f != file.as_str()) => {
                return Err(Error::invalid(
                    &index,
                    format!("tensor '{name}': index says {file}, found in {}", t.origin.display()),
                ))
            }
            Some(_) => {}
        }
    }
    if entries.len() != tensors.len() {
        let indexed: BTreeSet<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
        let extra: Vec<&str> = tensors.keys().map(String::as_str).filter(|n| !indexed.contains(n)).collect();
        return Err(Error::invalid(&index, format!("tensors missing from the index: {extra:?}")));
    }
    Ok(())
}

/// Which weight files an HF directory gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    /// `model.safetensors` / `model-0000i-of-0000n.safetensors`.
    Safetensors,
    /// `pytorch_model.bin` / `pytorch_model-0000i-of-0000n.bin`.
    Bin,
}

impl WeightFormat {
    fn file_name(self, i: usize, n: usize) -> String {
        let (stem, ext) = match self {
            WeightFormat::Safetensors => ("model", "safetensors"),
            WeightFormat::Bin => ("pytorch_model", "bin"),
        };
        if n == 1 {
            format!("{stem}.{ext}")
        } else {
            format!("{stem}-{:05}-of-{n:05}.{ext}", i + 1)
        }
    }

    fn index_name(self) -> &'static str {
        match self {
            WeightFormat::Safetensors => ST_INDEX,
            WeightFormat::Bin => BIN_INDEX,
        }
    }
}

/// Options for [`write()`].
#[derive(Clone, Copy, Debug)]
pub struct WriteOptions {
    /// Weight file format.
    pub weights: WeightFormat,
    /// Largest shard in bytes (HF's `max_shard_size`); a bigger tensor gets a shard of its own.
    pub max_shard_bytes: u64,
    /// Replace an existing destination.
    pub overwrite: bool,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions { weights: WeightFormat::Safetensors, max_shard_bytes: 5 << 30, overwrite: false }
    }
}

/// Split `tensors`, in order, into groups of at most `max_bytes` each (a tensor larger than the
/// cap gets a group of its own), the way HF's `save_pretrained` shards.
pub fn plan_shards(tensors: &TensorMap, max_bytes: u64) -> Vec<Vec<&str>> {
    let mut groups: Vec<Vec<&str>> = Vec::new();
    let mut current = 0u64;
    for (name, t) in tensors {
        let n = t.nbytes() as u64;
        if groups.is_empty() || (current + n > max_bytes && current > 0) {
            groups.push(Vec::new());
            current = 0;
        }
        groups.last_mut().expect("pushed above").push(name);
        current += n;
    }
    groups
}

/// Write `tensors` into the existing directory `dir` as HF weight files, sharded with an index
/// when more than one file results. Returns the file names written.
pub fn write_weights(tensors: &TensorMap, dir: &Path, opts: &WriteOptions) -> Result<Vec<String>> {
    let mut groups = plan_shards(tensors, opts.max_shard_bytes);
    if groups.is_empty() {
        groups.push(Vec::new());
    }
    let n = groups.len();
    let mut weight_map = std::collections::BTreeMap::new();
    let mut files = Vec::with_capacity(n + 1);
    for (i, names) in groups.iter().enumerate() {
        let file = opts.weights.file_name(i, n);
        let subset: TensorMap = names.iter().map(|k| (k.to_string(), tensors[*k].clone())).collect();
        let path = dir.join(&file);
        match opts.weights {
            WeightFormat::Safetensors => super::safetensors::write_file(&subset, &path, opts.overwrite)?,
            WeightFormat::Bin => super::torch_zip::write_file(
                &super::torch_zip::TorchState::new(subset, Vec::new()),
                &path,
                opts.overwrite,
            )?,
        }
        weight_map.extend(names.iter().map(|k| (k.to_string(), file.clone())));
        files.push(file);
    }
    if n > 1 {
        let index = serde_json::json!({
            "metadata": {
                "total_parameters": tensors.values().map(|t| t.numel() as u64).sum::<u64>(),
                "total_size": tensors.values().map(|t| t.nbytes() as u64).sum::<u64>(),
            },
            "weight_map": weight_map,
        });
        write_json(&dir.join(opts.weights.index_name()), &index, opts.overwrite)?;
        files.push(opts.weights.index_name().to_string());
    }
    Ok(files)
}

/// Write `value` as 2-space-indented JSON with a final newline (Python's `json.dump(indent=2)`).
pub fn write_json(path: &Path, value: &serde_json::Value, overwrite: bool) -> Result<()> {
    let mut text = serde_json::to_vec_pretty(value).map_err(|e| Error::invalid(path, e.to_string()))?;
    text.push(b'\n');
    let mut out = crate::atomic::AtomicFile::create(path, overwrite)?;
    std::io::Write::write_all(out.file(), &text).at(path)?;
    out.commit()
}

/// Write an unsharded checkpoint as an HF directory: weights, `config.json` (when the checkpoint
/// carries an HF config) and every artifact under its own name. Atomic as a whole.
pub fn write(ckpt: &Checkpoint, dest: &Path, opts: &WriteOptions) -> Result<Vec<String>> {
    let tensors = ckpt.tensors()?;
    let dir = crate::atomic::AtomicDir::create(dest, opts.overwrite)?;
    let mut files = write_weights(tensors, dir.path(), &WriteOptions { overwrite: false, ..*opts })?;
    if let Some(ModelConfig::HfJson(config)) = &ckpt.meta.config {
        write_json(&dir.path().join("config.json"), config, false)?;
        files.push("config.json".into());
    }
    for a in &ckpt.meta.artifacts {
        if a.name.contains('/') || a.name.contains('\\') || a.name == ".." {
            return Err(Error::invalid(dest, format!("artifact name '{}' is not a plain file name", a.name)));
        }
        let path = dir.path().join(&a.name);
        std::fs::write(&path, a.source.bytes()?).at(&path)?;
        files.push(a.name.clone());
    }
    dir.commit()?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ByteSource, DType, TensorEntry};
    use std::sync::Arc;

    fn tensors(n: usize) -> TensorMap {
        (0..n)
            .map(|i| {
                let t = TensorEntry::new(
                    DType::F32,
                    vec![16],
                    ByteSource::owned(vec![i as u8; 64]),
                    Arc::from(Path::new("t")),
                );
                (format!("layer.{i}.w"), t)
            })
            .collect()
    }

    #[test]
    fn sharding_respects_cap_and_writes_index() {
        for weights in [WeightFormat::Safetensors, WeightFormat::Bin] {
            let dir = tempfile::tempdir().unwrap();
            let opts = WriteOptions { weights, max_shard_bytes: 128, overwrite: false };
            let files = write_weights(&tensors(5), dir.path(), &opts).unwrap();
            assert_eq!(files.len(), 4, "{files:?}"); // 3 shards of ≤ 2 tensors + the index
            let index: serde_json::Value =
                serde_json::from_slice(&std::fs::read(dir.path().join(weights.index_name())).unwrap())
                    .unwrap();
            assert_eq!(index["metadata"]["total_size"], 5 * 64);
            assert_eq!(index["weight_map"]["layer.4.w"], weights.file_name(2, 3));
            let back = read(dir.path()).unwrap();
            assert_eq!(back.tensors().unwrap().len(), 5);
        }
    }
}
