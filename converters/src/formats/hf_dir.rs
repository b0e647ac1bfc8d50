//! HuggingFace model directories: `config.json`, weights as safetensors or `pytorch_model*.bin`
//! (single file or sharded with an index), and tokenizer / generation files carried as artifacts.

use crate::checkpoint::{Artifact, ByteSource, Checkpoint, Flavour, Meta, ModelConfig, Parallelism, TensorMap};
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
                    format!("tensor '{name}' appears in both {} and {}", prev.origin.display(), path.display()),
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
            artifacts.push(Artifact { name: name.to_string(), source: ByteSource::owned(std::fs::read(&p).at(&p)?) });
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
            None => return Err(Error::missing(&index, format!("tensor '{name}' (index says it is in {file})"))),
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
