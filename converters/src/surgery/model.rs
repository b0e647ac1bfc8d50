//! A LLaMA checkpoint in canonical form, plus what it takes to write it back into the container
//! it came from: an HF directory keeps its `config.json` (edited key by key), a `.nemo` is
//! re-emitted at its own TP, PP and key dialect with its yaml edited line by line.

use super::plan::WriteAs;
use crate::checkpoint::{Artifact, Checkpoint, Flavour, Meta, ModelConfig, NemoLayout, Parallelism};
use crate::convert::llama::{self, CanonicalLlama};
use crate::error::{Error, Result};
use crate::formats::nemo::NemoConfig;
use crate::names::llama::{self as names, NemoDialect};
use crate::DType;
use serde_json::Value as Json;

/// Where a LLaMA model was read from, with what re-emitting it needs.
#[derive(Clone, Debug)]
pub enum Store {
    /// An HF LLaMA directory with this `config.json`.
    Hf(Json),
    /// A `.nemo`.
    Nemo {
        /// Its yaml.
        cfg: NemoConfig,
        /// Key dialect of the stored names.
        dialect: NemoDialect,
        /// Tensor-parallel size.
        tp: usize,
        /// Pipeline-parallel size.
        pp: usize,
        /// `make_vocab_size_divisible_by`.
        divisible_by: usize,
        /// Read from a `model_weights/` distributed checkpoint (written back per rank).
        distributed: bool,
    },
}

/// A LLaMA checkpoint opened for surgery.
#[derive(Clone, Debug)]
pub struct LlamaModel {
    /// The model in canonical form (HF names, one rank, unpadded vocabulary).
    pub canonical: CanonicalLlama,
    /// The checkpoint as read.
    pub source: Checkpoint,
    /// How to write it back.
    pub store: Store,
}

/// Configuration edits, spelled for both containers (`None`: the key does not exist there).
#[derive(Clone, Debug, Default)]
pub struct ConfigEdits {
    /// HF `config.json` top-level keys.
    pub hf: Vec<(&'static str, Json)>,
    /// NeMo yaml dotted keys.
    pub nemo: Vec<(&'static str, serde_yaml::Value)>,
}

impl LlamaModel {
    /// Open an HF LLaMA directory or a LLaMA `.nemo` (any dialect, TP, PP, or distributed).
    pub fn open(ckpt: &Checkpoint) -> Result<Self> {
        let path = &ckpt.meta.path;
        match (&ckpt.meta.flavour, &ckpt.meta.config) {
            (Flavour::Nemo { .. }, Some(ModelConfig::NemoYaml(cfg))) if crate::convert::neva::is_neva(cfg) => {
                Err(Error::invalid(
                    path,
                    "a NeVA .nemo (its yaml has mm_cfg), and this edit takes a LLaMA: take the language model \
                     out (shardsmith surgery extract SRC --part llm -o DIR), edit that, and put it back \
                     (shardsmith surgery swap-llm SRC --llm DIR -o OUT)",
                ))
            }
            (Flavour::Nemo { layout, .. }, Some(ModelConfig::NemoYaml(cfg))) => {
                let canonical = llama::from_nemo(ckpt, None)?;
                let dialect = names::dialect_of(
                    Some(cfg),
                    ckpt.shards.iter().flat_map(|s| s.tensors.keys().map(String::as_str)),
                );
                let distributed = *layout == NemoLayout::Distributed;
                let Parallelism { tp, pp } = ckpt.saved_parallelism()?;
                let divisible_by = cfg.usize_or("make_vocab_size_divisible_by", 128)?;
                let store = Store::Nemo { cfg: cfg.clone(), dialect, tp, pp, divisible_by, distributed };
                Ok(LlamaModel { canonical, source: ckpt.clone(), store })
            }
            (Flavour::Nemo { .. }, _) => Err(Error::missing(path, "model_config.yaml")),
            (_, Some(ModelConfig::HfJson(cfg))) => {
                let model_type = cfg.get("model_type").and_then(Json::as_str).unwrap_or("");
                if model_type == "llava" {
                    return Err(Error::invalid(
                        path,
                        "this is a llava-hf checkpoint, not a LLaMA; take its language model out with \
                         'surgery extract --part llm' (and put it back with 'surgery swap-llm')",
                    ));
                }
                let canonical = llama::from_hf(ckpt)?;
                Ok(LlamaModel { canonical, source: ckpt.clone(), store: Store::Hf(cfg.clone()) })
            }
            _ => Err(Error::missing(
                path,
                "config.json or model_config.yaml (surgery needs to know the model)",
            )),
        }
    }

    /// Whether the model came from a `.nemo`.
    pub fn is_nemo(&self) -> bool {
        matches!(self.store, Store::Nemo { .. })
    }

    /// The embedding's dtype (the model's storage dtype).
    pub fn dtype(&self) -> DType {
        self.canonical.tensors.get("model.embed_tokens.weight").map_or(DType::F32, |t| t.dtype)
    }

    /// Write `c` back into this model's container: the same HF directory layout with `config.json`
    /// edited, or a `.nemo` at the source's TP/PP and dialect with the yaml edited. `artifacts`
    /// replaces the source's companion files. Returns the checkpoint, its container and one
    /// `key: old -> new` line per config edit.
    pub fn emit(
        &self,
        c: &CanonicalLlama,
        edits: &ConfigEdits,
        artifacts: Vec<Artifact>,
    ) -> Result<(Checkpoint, WriteAs, Vec<String>)> {
        let src = &self.source;
        let mut lines = Vec::new();
        match &self.store {
            Store::Hf(cfg) => {
                let mut cfg = cfg.clone();
                for (key, value) in &edits.hf {
                    let old = cfg.get(*key).cloned().unwrap_or(Json::Null);
                    if &old != value {
                        lines.push(format!("{key}: {old} -> {value}"));
                        cfg[*key] = value.clone();
                    }
                }
                let meta = Meta {
                    path: src.meta.path.clone(),
                    flavour: src.meta.flavour.clone(),
                    parallel: Parallelism::default(),
                    config: Some(ModelConfig::HfJson(cfg)),
                    artifacts,
                };
                Ok((Checkpoint::single(meta, c.tensors.clone()), WriteAs::like(&src.meta.flavour), lines))
            }
            Store::Nemo { cfg, dialect, tp, pp, divisible_by, distributed } => {
                let mut cfg = cfg.clone();
                for (key, value) in &edits.nemo {
                    let old = cfg.get(key).cloned().unwrap_or(serde_yaml::Value::Null);
                    if &old != value {
                        cfg.set_scalar(key, value.clone())?;
                        lines.push(format!("{key}: {} -> {}", yaml_inline(&old), yaml_inline(value)));
                    }
                }
                let shards = llama::to_nemo_shards(c, *dialect, *tp, *pp, *divisible_by)?;
                let parallel = Parallelism { tp: *tp, pp: *pp };
                let (gzip, extracted) = match src.meta.flavour {
                    Flavour::Nemo { gzip, extracted, .. } => (gzip, extracted),
                    _ => (false, false),
                };
                if *distributed {
                    lines.push(format!(
                        "weights: model_weights/ distributed checkpoint -> per-rank model_weights.ckpt (tp={tp}, pp={pp}) \
                         unless --dist-ckpt zarr|torch_dist"
                    ));
                }
                let meta = Meta {
                    path: src.meta.path.clone(),
                    flavour: Flavour::Nemo { layout: NemoLayout::for_parallelism(parallel), gzip, extracted },
                    parallel,
                    config: Some(ModelConfig::NemoYaml(cfg)),
                    artifacts,
                };
                Ok((Checkpoint { meta, shards }, WriteAs::Nemo { gzip, extracted }, lines))
            }
        }
    }
}

fn yaml_inline(v: &serde_yaml::Value) -> String {
    serde_yaml::to_string(v).map(|s| s.trim_end().to_string()).unwrap_or_else(|_| "?".into())
}
