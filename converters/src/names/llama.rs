//! LLaMA-2: hyper-parameters read from and written to each dialect's config, and the tensor name
//! table (formats.md §3) with each NeMo tensor's shard rule (§4.1) and pipeline placement (§4.4).

use super::yaml::{self, Node};
use crate::error::{Error, Result};
use crate::formats::nemo::NemoConfig;
use crate::DType;
use serde_json::{json, Value as Json};
use std::path::Path;

/// The NeMo key dialects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NemoDialect {
    /// Megatron-core names (`model.decoder.layers.{L}.self_attention.linear_qkv.weight`), NeMo's default.
    Mcore,
    /// Legacy names (`model.language_model.encoder.layers.{L}...query_key_value.weight`); no GQA.
    Legacy,
}

/// LLaMA-2 hyper-parameters, the meeting point of HF `config.json` and NeMo `model_config.yaml`.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaHparams {
    /// Decoder layers.
    pub layers: usize,
    /// Hidden size H.
    pub hidden: usize,
    /// MLP inner size F.
    pub ffn: usize,
    /// Attention heads.
    pub heads: usize,
    /// Key/value heads (query groups).
    pub groups: usize,
    /// Per-head size d.
    pub head_dim: usize,
    /// Tokenizer vocabulary V (unpadded).
    pub vocab: usize,
    /// Context length.
    pub max_positions: usize,
    /// Rotary base (`rope_theta` / `rotary_base`).
    pub rope_theta: f64,
    /// Linear RoPE scaling factor (`rope_scaling.factor` / `seq_len_interpolation_factor`).
    pub rope_linear_factor: Option<f64>,
    /// RMSNorm epsilon.
    pub norm_eps: f64,
    /// Initialiser standard deviation.
    pub init_std: f64,
    /// Embedding and output head share one matrix.
    pub tied: bool,
    /// Begin-of-sequence token id.
    pub bos: Option<i64>,
    /// End-of-sequence token id.
    pub eos: Option<i64>,
}

fn need_usize(v: &Json, key: &str, path: &Path) -> Result<usize> {
    v.get(key)
        .and_then(Json::as_u64)
        .map(|x| x as usize)
        .ok_or_else(|| Error::invalid(path, format!("config.json: missing or non-integer '{key}'")))
}

/// An optional `config.json` value of one JSON type: `None` when absent or null, an error naming
/// the key when present as anything else (a `"500000"` string must not read as the default).
fn opt<T>(
    v: &Json,
    key: &str,
    path: &Path,
    what: &str,
    get: impl Fn(&Json) -> Option<T>,
) -> Result<Option<T>> {
    match v.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(x) => get(x)
            .map(Some)
            .ok_or_else(|| Error::invalid(path, format!("config.json: '{key}' should be {what}, found {x}"))),
    }
}

fn opt_f64(v: &Json, key: &str, path: &Path) -> Result<Option<f64>> {
    opt(v, key, path, "a number", |x| x.as_f64().filter(|f| f.is_finite()))
}

fn opt_u64(v: &Json, key: &str, path: &Path) -> Result<Option<u64>> {
    opt(v, key, path, "a non-negative integer", Json::as_u64)
}

fn opt_bool(v: &Json, key: &str, path: &Path) -> Result<Option<bool>> {
    opt(v, key, path, "true or false", Json::as_bool)
}

impl LlamaHparams {
    /// Read an HF LLaMA `config.json` (2023 and 2024+ spellings, including `rope_parameters`).
    pub fn from_hf(v: &Json, path: &Path) -> Result<Self> {
        let model_type = v.get("model_type").and_then(Json::as_str).unwrap_or("");
        if model_type != "llama" {
            return Err(Error::invalid(
                path,
                format!("config.json: model_type is '{model_type}', expected 'llama'"),
            ));
        }
        let heads = need_usize(v, "num_attention_heads", path)?;
        let hidden = need_usize(v, "hidden_size", path)?;
        let object = |key: &str| match v.get(key) {
            None | Some(Json::Null) => Ok(None),
            Some(o) if o.is_object() => Ok(Some(o)),
            Some(o) => {
                Err(Error::invalid(path, format!("config.json: '{key}' should be an object, found {o}")))
            }
        };
        let rope = object("rope_parameters")?;
        let scaling = object("rope_scaling")?.or(rope);
        let rope_linear_factor = match scaling {
            Some(s) => {
                let kind = s.get("rope_type").or(s.get("type")).and_then(Json::as_str).unwrap_or("default");
                match kind {
                    "default" => None,
                    "linear" => {
                        Some(s.get("factor").and_then(Json::as_f64).filter(|f| f.is_finite()).ok_or_else(
                            || {
                                Error::invalid(
                                    path,
                                    format!(
                                        "config.json: linear rope scaling needs a number 'factor', found {s}"
                                    ),
                                )
                            },
                        )?)
                    }
                    other => {
                        return Err(Error::invalid(
                            path,
                            format!(
                                "config.json: rope scaling '{other}' has no NeMo equivalent (only 'linear')"
                            ),
                        ))
                    }
                }
            }
            None => None,
        };
        let rope_theta = match opt_f64(v, "rope_theta", path)? {
            Some(t) => Some(t),
            None => rope.map(|r| opt_f64(r, "rope_theta", path)).transpose()?.flatten(),
        }
        .unwrap_or(10000.0);
        // What LLaMA computes; anything else would convert and then run as if it were LLaMA.
        // transformers' ACT2CLS maps both names to nn.SiLU.
        if let Some(act) = v.get("hidden_act").filter(|a| !a.is_null()) {
            if !matches!(act.as_str(), Some("silu" | "swish")) {
                return Err(Error::invalid(
                    path,
                    format!("config.json: hidden_act is {act}, LLaMA's SwiGLU needs \"silu\""),
                ));
            }
        }
        // Partial rotary embedding (rotating only part of each head), read by transformers'
        // default RoPE for any model; LLaMA rotates whole heads.
        let partial = match opt_f64(v, "partial_rotary_factor", path)? {
            Some(f) => Some(f),
            None => rope.map(|r| opt_f64(r, "partial_rotary_factor", path)).transpose()?.flatten(),
        };
        if let Some(f) = partial.filter(|&f| f != 1.0) {
            return Err(Error::invalid(
                path,
                format!("config.json: partial_rotary_factor is {f}; LLaMA rotates whole heads (1.0)"),
            ));
        }
        for key in ["attention_bias", "mlp_bias"] {
            if opt_bool(v, key, path)? == Some(true) {
                return Err(Error::invalid(path, format!("config.json: {key} is true; LLaMA has no biases")));
            }
        }
        let head_dim = opt_u64(v, "head_dim", path)?.map_or(hidden / heads.max(1), |d| d as usize);
        Ok(LlamaHparams {
            layers: need_usize(v, "num_hidden_layers", path)?,
            hidden,
            ffn: need_usize(v, "intermediate_size", path)?,
            heads,
            groups: opt_u64(v, "num_key_value_heads", path)?.map_or(heads, |g| g as usize),
            head_dim,
            vocab: need_usize(v, "vocab_size", path)?,
            max_positions: opt_u64(v, "max_position_embeddings", path)?.unwrap_or(4096) as usize,
            rope_theta,
            rope_linear_factor,
            norm_eps: opt_f64(v, "rms_norm_eps", path)?.unwrap_or(1e-6),
            init_std: opt_f64(v, "initializer_range", path)?.unwrap_or(0.02),
            tied: opt_bool(v, "tie_word_embeddings", path)?.unwrap_or(false),
            bos: v.get("bos_token_id").and_then(Json::as_i64),
            eos: v.get("eos_token_id").and_then(Json::as_i64),
        })
    }

    /// Read a NeMo GPT `model_config.yaml`; `vocab` comes from the tokenizer (the yaml has none).
    pub fn from_nemo(cfg: &NemoConfig, vocab: usize, path: &Path) -> Result<Self> {
        let need = |k: &str| {
            cfg.get_usize(k).ok_or_else(|| {
                Error::invalid(path, format!("model_config.yaml: missing or non-integer '{k}'"))
            })
        };
        let heads = need("num_attention_heads")?;
        let hidden = need("hidden_size")?;
        let groups = match cfg.get("num_query_groups") {
            None | Some(serde_yaml::Value::Null) => heads,
            Some(_) => need("num_query_groups")?,
        };
        let head_dim = match cfg.get("kv_channels") {
            None | Some(serde_yaml::Value::Null) => hidden / heads.max(1),
            Some(_) => need("kv_channels")?,
        };
        for (key, want) in [("normalization", "rmsnorm"), ("position_embedding_type", "rope")] {
            if let Some(got) = cfg.get_str(key) {
                if got != want {
                    return Err(Error::invalid(
                        path,
                        format!("model_config.yaml: {key} is '{got}', LLaMA needs '{want}'"),
                    ));
                }
            }
        }
        if cfg.bool_opt("bias")? == Some(true) {
            return Err(Error::invalid(path, "model_config.yaml: bias is true; LLaMA has no biases"));
        }
        if let Some(p) = cfg.f64_opt("rotary_percentage")?.filter(|&p| p != 1.0) {
            return Err(Error::invalid(
                path,
                format!("model_config.yaml: rotary_percentage is {p}; LLaMA rotates whole heads (1.0)"),
            ));
        }
        if let Some(act) = cfg.get_str("activation") {
            if act != "fast-swiglu" && act != "swiglu" {
                return Err(Error::invalid(
                    path,
                    format!("model_config.yaml: activation '{act}' is not SwiGLU"),
                ));
            }
        }
        Ok(LlamaHparams {
            layers: need("num_layers")?,
            hidden,
            ffn: need("ffn_hidden_size")?,
            heads,
            groups,
            head_dim,
            vocab,
            max_positions: cfg
                .get_usize("max_position_embeddings")
                .or(cfg.get_usize("encoder_seq_length"))
                .unwrap_or(4096),
            rope_theta: cfg.f64_opt("rotary_base")?.unwrap_or(10000.0),
            rope_linear_factor: cfg.f64_opt("seq_len_interpolation_factor")?,
            norm_eps: cfg.f64_opt("layernorm_epsilon")?.unwrap_or(1e-5),
            init_std: cfg.f64_opt("init_method_std")?.unwrap_or(0.02),
            tied: cfg.bool_opt("share_embeddings_and_output_weights")?.unwrap_or(false),
            bos: None,
            eos: None,
        })
    }

    /// Heads per query group.
    pub fn heads_per_group(&self) -> usize {
        self.heads / self.groups.max(1)
    }

    /// The most decoder layers a config may have (see [`LlamaHparams::validate`]).
    pub const MAX_LAYERS: usize = 1 << 14;
    /// The largest width, head count or vocabulary a config may have.
    pub const MAX_DIM: usize = 1 << 24;
    /// The longest context a config may state (past it, a yaml integer or a rotary table would
    /// overflow before anything useful happened).
    pub const MAX_POSITIONS: usize = 1 << 30;

    /// Check internal consistency (heads divide into groups, hidden = heads·d is not required by
    /// LLaMA, but q/k/v shapes follow from these numbers) and bounds.
    pub fn validate(&self, path: &Path) -> Result<()> {
        // Generous bounds (LLaMA-3-405B: 126 layers, hidden 16384, vocab 128256) that keep every
        // shape product far inside u64 and a typo'd layer count from listing 10^12 tensors.
        let sizes = [
            ("layers", self.layers, Self::MAX_LAYERS),
            ("hidden size", self.hidden, Self::MAX_DIM),
            ("ffn hidden size", self.ffn, Self::MAX_DIM),
            ("attention heads", self.heads, Self::MAX_DIM),
            ("query groups", self.groups, Self::MAX_DIM),
            ("head size (head_dim / kv_channels, else hidden / heads)", self.head_dim, Self::MAX_DIM),
            ("vocabulary size", self.vocab, Self::MAX_DIM),
            ("context length (max_position_embeddings)", self.max_positions, Self::MAX_POSITIONS),
        ];
        for (what, n, max) in sizes {
            if !(1..=max).contains(&n) {
                return Err(Error::invalid(path, format!("LLaMA {what} is {n}, expected 1 to {max}")));
            }
        }
        if self.head_dim % 2 != 0 {
            return Err(Error::invalid(
                path,
                format!(
                    "LLaMA head size {} is odd; rotary embedding rotates pairs of channels",
                    self.head_dim
                ),
            ));
        }
        if self.heads % self.groups != 0 {
            return Err(Error::invalid(
                path,
                format!("{} attention heads do not divide into {} query groups", self.heads, self.groups),
            ));
        }
        let positive = [
            ("rotary base (rope_theta / rotary_base)", Some(self.rope_theta)),
            ("RMSNorm epsilon (rms_norm_eps / layernorm_epsilon)", Some(self.norm_eps)),
            ("linear RoPE scaling factor", self.rope_linear_factor),
        ];
        for (what, value) in positive {
            if let Some(v) = value.filter(|v| !(v.is_finite() && *v > 0.0)) {
                return Err(Error::invalid(path, format!("{what} is {v}, expected a positive number")));
            }
        }
        Ok(())
    }

    /// HF `config.json` for these parameters, stored in `dtype`.
    pub fn hf_config(&self, dtype: DType) -> Json {
        let rope_scaling = self
            .rope_linear_factor
            .map_or(Json::Null, |f| json!({"type": "linear", "rope_type": "linear", "factor": f}));
        let mut v = json!({
            "architectures": ["LlamaForCausalLM"],
            "attention_bias": false,
            "bos_token_id": self.bos.unwrap_or(1),
            "eos_token_id": self.eos.unwrap_or(2),
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "initializer_range": self.init_std,
            "intermediate_size": self.ffn,
            "max_position_embeddings": self.max_positions,
            "mlp_bias": false,
            "model_type": "llama",
            "num_attention_heads": self.heads,
            "num_hidden_layers": self.layers,
            "num_key_value_heads": self.groups,
            "pretraining_tp": 1,
            "rms_norm_eps": self.norm_eps,
            "rope_scaling": rope_scaling,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tied,
            "torch_dtype": dtype.torch_name(),
            "use_cache": true,
            "vocab_size": self.vocab,
        });
        if self.head_dim * self.heads == self.hidden {
            v.as_object_mut().expect("object").remove("head_dim");
        }
        v
    }

    /// NeMo `model_config.yaml` text for these parameters (formats.md §3.8, §5.1).
    pub fn nemo_yaml(&self, o: &NemoYamlOptions) -> String {
        yaml::emit(&self.nemo_yaml_map(o))
    }

    /// The mapping [`LlamaHparams::nemo_yaml`] writes, in NeMo's key order, for callers (NeVA)
    /// that add sections before emitting it.
    pub fn nemo_yaml_map(&self, o: &NemoYamlOptions) -> Vec<(String, Node)> {
        let mcore = o.dialect == NemoDialect::Mcore;
        let precision: Node = match o.dtype {
            DType::BF16 => "bf16".into(),
            DType::F16 => Node::Int(16),
            _ => Node::Int(32),
        };
        let tokenizer = Node::Map(vec![
            ("library".into(), "sentencepiece".into()),
            ("type".into(), Node::Null),
            ("model".into(), o.tokenizer_model.clone().into()),
            ("vocab_file".into(), Node::Null),
            ("merge_file".into(), Node::Null),
            ("delimiter".into(), Node::Null),
            ("sentencepiece_legacy".into(), false.into()),
        ]);
        let kv_channels: Node =
            if self.head_dim * self.heads == self.hidden { Node::Null } else { self.head_dim.into() };
        vec![
            ("mcore_gpt".into(), mcore.into()),
            ("transformer_engine".into(), mcore.into()),
            ("precision".into(), precision),
            ("megatron_amp_O2".into(), false.into()),
            ("micro_batch_size".into(), 1usize.into()),
            ("global_batch_size".into(), (o.tp * o.pp).max(1).into()),
            ("tensor_model_parallel_size".into(), o.tp.into()),
            ("pipeline_model_parallel_size".into(), o.pp.into()),
            ("virtual_pipeline_model_parallel_size".into(), Node::Null),
            ("encoder_seq_length".into(), self.max_positions.into()),
            ("max_position_embeddings".into(), self.max_positions.into()),
            ("num_layers".into(), self.layers.into()),
            ("hidden_size".into(), self.hidden.into()),
            ("ffn_hidden_size".into(), self.ffn.into()),
            ("num_attention_heads".into(), self.heads.into()),
            ("num_query_groups".into(), self.groups.into()),
            ("kv_channels".into(), kv_channels),
            ("init_method_std".into(), self.init_std.into()),
            ("normalization".into(), "rmsnorm".into()),
            ("layernorm_epsilon".into(), self.norm_eps.into()),
            ("make_vocab_size_divisible_by".into(), o.divisible_by.into()),
            ("bias".into(), false.into()),
            ("activation".into(), "fast-swiglu".into()),
            ("position_embedding_type".into(), "rope".into()),
            ("rotary_percentage".into(), 1.0.into()),
            ("rotary_base".into(), self.rope_theta.into()),
            ("seq_len_interpolation_factor".into(), self.rope_linear_factor.into()),
            ("share_embeddings_and_output_weights".into(), self.tied.into()),
            ("hidden_dropout".into(), 0.0.into()),
            ("attention_dropout".into(), 0.0.into()),
            ("ffn_dropout".into(), 0.0.into()),
            ("apply_query_key_layer_scaling".into(), false.into()),
            ("use_cpu_initialization".into(), false.into()),
            ("tokenizer".into(), tokenizer),
            (
                "target".into(),
                "nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel".into(),
            ),
            ("nemo_version".into(), "1.23.0".into()),
        ]
    }
}

/// What [`LlamaHparams::nemo_yaml`] needs beyond the hyper-parameters.
#[derive(Clone, Debug)]
pub struct NemoYamlOptions {
    /// Key dialect (decides `mcore_gpt` / `transformer_engine`).
    pub dialect: NemoDialect,
    /// Stored dtype (decides `precision`).
    pub dtype: DType,
    /// Tensor-parallel size.
    pub tp: usize,
    /// Pipeline-parallel size.
    pub pp: usize,
    /// `make_vocab_size_divisible_by`.
    pub divisible_by: usize,
    /// `tokenizer.model` value, e.g. `nemo:<32hex>_tokenizer.model`.
    pub tokenizer_model: Option<String>,
}

/// How a NeMo tensor is built from canonical (HF) tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A plain rename.
    Same(&'static str),
    /// Q, K and V interleaved by query group (formats.md §3.4).
    Qkv(&'static str, &'static str, &'static str),
    /// `[gate; up]` (formats.md §3.5).
    Glu(&'static str, &'static str),
}

/// How a NeMo tensor is split over tensor-parallel ranks (formats.md §4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Same on every rank.
    Replicated,
    /// Contiguous split of dim 0 (column-parallel; QKV by whole query groups).
    Rows,
    /// Contiguous split of dim 1 (row-parallel).
    Cols,
    /// Each GLU half split along dim 0.
    GluHalves,
    /// Vocabulary-parallel rows, padded to Vp.
    Vocab,
}

/// Which pipeline stages hold a tensor (formats.md §4.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Stage 0 only.
    First,
    /// The last stage only.
    Last,
    /// The stage owning the layer `{L}` (names use stage-local layer indices).
    Layer,
}

/// One row of the name table.
#[derive(Clone, Copy, Debug)]
pub struct Row {
    /// Megatron-core name.
    pub mcore: &'static str,
    /// Legacy NeMo name.
    pub legacy: &'static str,
    /// Canonical source.
    pub source: Source,
    /// TP rule.
    pub split: Split,
    /// PP placement.
    pub stage: Stage,
}

impl Row {
    /// The name in `dialect`.
    pub fn name(&self, dialect: NemoDialect) -> &'static str {
        match dialect {
            NemoDialect::Mcore => self.mcore,
            NemoDialect::Legacy => self.legacy,
        }
    }
}

/// The layer placeholder in table names.
pub const LAYER: &str = "{L}";

/// Every LLaMA-2 tensor (formats.md §3.2, §3.3); the output head is absent when embeddings are tied.
pub const TABLE: &[Row] = &[
    Row {
        mcore: "model.embedding.word_embeddings.weight",
        legacy: "model.language_model.embedding.word_embeddings.weight",
        source: Source::Same("model.embed_tokens.weight"),
        split: Split::Vocab,
        stage: Stage::First,
    },
    Row {
        mcore: "model.decoder.layers.{L}.self_attention.linear_qkv.layer_norm_weight",
        legacy: "model.language_model.encoder.layers.{L}.input_layernorm.weight",
        source: Source::Same("model.layers.{L}.input_layernorm.weight"),
        split: Split::Replicated,
        stage: Stage::Layer,
    },
    Row {
        mcore: "model.decoder.layers.{L}.self_attention.linear_qkv.weight",
        legacy: "model.language_model.encoder.layers.{L}.self_attention.query_key_value.weight",
        source: Source::Qkv(
            "model.layers.{L}.self_attn.q_proj.weight",
            "model.layers.{L}.self_attn.k_proj.weight",
            "model.layers.{L}.self_attn.v_proj.weight",
        ),
        split: Split::Rows,
        stage: Stage::Layer,
    },
    Row {
        mcore: "model.decoder.layers.{L}.self_attention.linear_proj.weight",
        legacy: "model.language_model.encoder.layers.{L}.self_attention.dense.weight",
        source: Source::Same("model.layers.{L}.self_attn.o_proj.weight"),
        split: Split::Cols,
        stage: Stage::Layer,
    },
    Row {
        mcore: "model.decoder.layers.{L}.mlp.linear_fc1.layer_norm_weight",
        legacy: "model.language_model.encoder.layers.{L}.post_attention_layernorm.weight",
        source: Source::Same("model.layers.{L}.post_attention_layernorm.weight"),
        split: Split::Replicated,
        stage: Stage::Layer,
    },
    Row {
        mcore: "model.decoder.layers.{L}.mlp.linear_fc1.weight",
        legacy: "model.language_model.encoder.layers.{L}.mlp.dense_h_to_4h.weight",
        source: Source::Glu("model.layers.{L}.mlp.gate_proj.weight", "model.layers.{L}.mlp.up_proj.weight"),
        split: Split::GluHalves,
        stage: Stage::Layer,
    },
    Row {
        mcore: "model.decoder.layers.{L}.mlp.linear_fc2.weight",
        legacy: "model.language_model.encoder.layers.{L}.mlp.dense_4h_to_h.weight",
        source: Source::Same("model.layers.{L}.mlp.down_proj.weight"),
        split: Split::Cols,
        stage: Stage::Layer,
    },
    Row {
        mcore: "model.decoder.final_layernorm.weight",
        legacy: "model.language_model.encoder.final_layernorm.weight",
        source: Source::Same("model.norm.weight"),
        split: Split::Replicated,
        stage: Stage::Last,
    },
    Row {
        mcore: "model.output_layer.weight",
        legacy: "model.language_model.output_layer.weight",
        source: Source::Same("lm_head.weight"),
        split: Split::Vocab,
        stage: Stage::Last,
    },
];

/// The legacy rotary buffer, present on every stage of a legacy checkpoint (recomputed on write,
/// dropped on read: formats.md §2.2).
pub const LEGACY_INV_FREQ: &str = "model.language_model.rotary_pos_emb.inv_freq";

/// Modules that get an `_extra_state: None` entry so NeMo ≥ 1.23 strict loading finds every key
/// (formats.md §2.2). `{L}` is the stage-local layer.
pub fn extra_state_modules(dialect: NemoDialect) -> &'static [&'static str] {
    match dialect {
        NemoDialect::Legacy => &[
            "model.language_model.encoder.layers.{L}.self_attention.query_key_value",
            "model.language_model.encoder.layers.{L}.self_attention.dense",
            "model.language_model.encoder.layers.{L}.mlp.dense_h_to_4h",
            "model.language_model.encoder.layers.{L}.mlp.dense_4h_to_h",
        ],
        NemoDialect::Mcore => &[
            "model.decoder.layers.{L}.self_attention.linear_qkv",
            "model.decoder.layers.{L}.self_attention.linear_proj",
            "model.decoder.layers.{L}.mlp.linear_fc1",
            "model.decoder.layers.{L}.mlp.linear_fc2",
        ],
    }
}

/// Transformer Engine's attention modules with extra state, which a distributed checkpoint also
/// carries as ShardedObjects: Megatron asks for whatever TE's `state_dict` has, which is
/// `core_attention._extra_state` from TE 1.8 and `core_attention.fused_attention._extra_state` in
/// TE 1.6–1.7 (none before). A loader only opens the objects it asks for, so both are written.
pub const DIST_ATTENTION_EXTRA_STATE: [&str; 2] = [
    "model.decoder.layers.{L}.self_attention.core_attention",
    "model.decoder.layers.{L}.self_attention.core_attention.fused_attention",
];

/// Substitute the layer index into a table name.
pub fn at_layer(template: &str, layer: usize) -> String {
    template.replace(LAYER, &layer.to_string())
}

/// A table name without its layer index: the key of the layer-stacked array (or object) that a
/// distributed checkpoint stores for all layers at once (formats.md §1.6).
pub fn stacked(template: &str) -> String {
    template.replace(&format!(".{LAYER}."), ".")
}

/// HF tensors that carry no information and are dropped on import (old rotary buffers).
pub fn is_ignorable_hf(name: &str) -> bool {
    name.ends_with(".rotary_emb.inv_freq")
}

/// The dialect a NeMo config declares (`mcore_gpt`), or what its tensor names show.
pub fn dialect_of<'a>(cfg: Option<&NemoConfig>, mut names: impl Iterator<Item = &'a str>) -> NemoDialect {
    match cfg.and_then(|c| c.get_bool("mcore_gpt")) {
        Some(true) => NemoDialect::Mcore,
        Some(false) => NemoDialect::Legacy,
        None => {
            if names.any(|n| n.starts_with("model.language_model.")) {
                NemoDialect::Legacy
            } else {
                NemoDialect::Mcore
            }
        }
    }
}

/// Rotary inverse frequencies `1 / theta^(2k/d)`, k < d/2, as NeMo's legacy buffer holds them.
pub fn inv_freq(head_dim: usize, theta: f64) -> Vec<f32> {
    (0..head_dim / 2).map(|k| (1.0 / theta.powf((2 * k) as f64 / head_dim as f64)) as f32).collect()
}

/// How a canonical (HF-named, unfused) LLaMA tensor is divided over tensor-parallel ranks when
/// a model runs at TP = N: q/k/v and gate/up are column-parallel (whole heads, and whole query
/// groups, since HF orders query heads group by group), o/down row-parallel, the embedding and
/// head vocab-parallel over `padded` rows, norms replicated. The same rules as the NeMo table's,
/// before fusion.
pub fn canonical_shard_spec(name: &str, vocab: usize, padded: usize) -> crate::shard::ShardSpec {
    use crate::shard::ShardSpec;
    const COLUMN: [&str; 5] = [
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
    ];
    const ROW: [&str; 2] = ["self_attn.o_proj.weight", "mlp.down_proj.weight"];
    if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
        ShardSpec::Vocab { rows: vocab, padded }
    } else if COLUMN.iter().any(|s| name.ends_with(s)) {
        ShardSpec::SplitRows
    } else if ROW.iter().any(|s| name.ends_with(s)) {
        ShardSpec::SplitCols
    } else {
        ShardSpec::Replicated
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_config(name: &str) -> Json {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures").join(name).join("config.json");
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    #[test]
    fn hf_config_round_trips_through_nemo_yaml() {
        for name in ["llama-mha", "llama-gqa"] {
            let hp = LlamaHparams::from_hf(&fixture_config(name), Path::new(name)).unwrap();
            let text = hp.nemo_yaml(&NemoYamlOptions {
                dialect: NemoDialect::Mcore,
                dtype: DType::BF16,
                tp: 2,
                pp: 1,
                divisible_by: 1,
                tokenizer_model: Some("nemo:00_tokenizer.model".into()),
            });
            let cfg = NemoConfig::parse(text, Path::new("y")).unwrap();
            let back = LlamaHparams::from_nemo(&cfg, hp.vocab, Path::new("y")).unwrap();
            assert_eq!(LlamaHparams { bos: hp.bos, eos: hp.eos, ..back }, hp, "{name}");
            assert_eq!(cfg.get_str("precision"), Some("bf16"));
            assert_eq!(cfg.get_usize("tensor_model_parallel_size"), Some(2));
            // And back to config.json.
            let json = hp.hf_config(DType::F32);
            assert_eq!(LlamaHparams::from_hf(&json, Path::new("j")).unwrap(), hp, "{name}");
        }
    }

    proptest::proptest! {
        /// Any valid hyper-parameters, rotary base, RoPE scaling, epsilon, initialiser and context
        /// length included (not only the fixtures' values), survive config.json and
        /// model_config.yaml exactly, whatever their decimal spelling. config.json states LLaMA's
        /// BOS/EOS ids 1 and 2 where none are known; the yaml carries none (NeMo takes them from
        /// the tokenizer).
        #[test]
        fn hparams_round_trip_through_config_json_and_nemo_yaml(
            groups in 1usize..5, hpg in 1usize..4, half_head in 1usize..65, ffn in 1usize..5000,
            layers in 1usize..100, vocab in 1usize..200_000, max_positions in 1usize..1_000_000,
            rope_theta in 1e-3f64..1e9, factor in proptest::option::of(1e-3f64..1e3),
            norm_eps in 1e-12f64..1e-1, init_std in 1e-6f64..10.0, tied: bool,
            bos in proptest::option::of(0i64..200_000), eos in proptest::option::of(0i64..200_000),
            dialect in proptest::prop_oneof![proptest::strategy::Just(NemoDialect::Mcore), proptest::strategy::Just(NemoDialect::Legacy)],
        ) {
            let heads = groups * hpg;
            let hp = LlamaHparams {
                layers, hidden: heads * half_head * 2, ffn, heads, groups, head_dim: half_head * 2, vocab, max_positions,
                rope_theta, rope_linear_factor: factor, norm_eps, init_std, tied, bos, eos,
            };
            hp.validate(Path::new("hp")).unwrap();
            let json = hp.hf_config(DType::BF16);
            let stated = LlamaHparams { bos: Some(bos.unwrap_or(1)), eos: Some(eos.unwrap_or(2)), ..hp.clone() };
            proptest::prop_assert_eq!(&LlamaHparams::from_hf(&json, Path::new("j")).unwrap(), &stated);
            let text = hp.nemo_yaml(&NemoYamlOptions {
                dialect, dtype: DType::BF16, tp: 1, pp: 1, divisible_by: 1, tokenizer_model: None,
            });
            let cfg = NemoConfig::parse(text, Path::new("y")).unwrap();
            let back = LlamaHparams::from_nemo(&cfg, vocab, Path::new("y")).unwrap();
            proptest::prop_assert_eq!(LlamaHparams { bos, eos, ..back }, hp);
        }
    }

    #[test]
    fn gqa_fixture_reads_rope_scaling() {
        let hp = LlamaHparams::from_hf(&fixture_config("llama-gqa"), Path::new("gqa")).unwrap();
        assert_eq!((hp.heads, hp.groups, hp.rope_theta, hp.rope_linear_factor), (8, 2, 500000.0, Some(2.0)));
    }

    /// What a config must not slip past: each refusal names the value, or the field it came from.
    #[test]
    fn configs_llama_cannot_run_are_refused_by_name() {
        let read = |edit: &dyn Fn(&mut serde_json::Map<String, Json>)| {
            let mut v = fixture_config("llama-mha");
            edit(v.as_object_mut().unwrap());
            LlamaHparams::from_hf(&v, Path::new("c")).and_then(|hp| hp.validate(Path::new("c")))
        };
        assert!(read(&|_| {}).is_ok());
        assert!(
            read(&|m| drop(m.insert("hidden_act".into(), json!("swish")))).is_ok(),
            "transformers' alias"
        );
        let cases: &[(&str, Json, &str)] = &[
            (
                "num_hidden_layers",
                json!(1_000_000_000_000u64),
                "layers is 1000000000000, expected 1 to 16384",
            ),
            ("num_hidden_layers", json!(0), "layers is 0"),
            ("intermediate_size", json!(0), "ffn hidden size is 0"),
            ("vocab_size", json!(1u64 << 40), "vocabulary size is 1099511627776"),
            (
                "max_position_embeddings",
                json!(1u64 << 63),
                "context length (max_position_embeddings) is 9223372036854775808",
            ),
            ("num_key_value_heads", json!(3), "attention heads do not divide into 3 query groups"),
            ("rope_theta", json!(0.0), "rotary base (rope_theta / rotary_base) is 0"),
            ("rms_norm_eps", json!(-1e-5), "epsilon (rms_norm_eps / layernorm_epsilon) is -0.00001"),
            ("rope_scaling", json!({"type": "linear", "factor": 0.0}), "linear RoPE scaling factor is 0"),
            ("hidden_act", json!("gelu"), "hidden_act is \"gelu\", LLaMA's SwiGLU needs \"silu\""),
            ("attention_bias", json!(true), "attention_bias is true; LLaMA has no biases"),
            ("mlp_bias", json!(true), "mlp_bias is true"),
            ("partial_rotary_factor", json!(0.5), "partial_rotary_factor is 0.5; LLaMA rotates whole heads"),
            ("head_dim", json!(7), "LLaMA head size 7 is odd"),
            // Present with the wrong type: named, not read as the default.
            ("rope_theta", json!("500000"), "'rope_theta' should be a number, found \"500000\""),
            ("rms_norm_eps", json!("abc"), "'rms_norm_eps' should be a number"),
            ("tie_word_embeddings", json!("yes"), "'tie_word_embeddings' should be true or false"),
            ("num_key_value_heads", json!(2.5), "'num_key_value_heads' should be a non-negative integer"),
            ("rope_scaling", json!("linear"), "'rope_scaling' should be an object"),
            ("rope_scaling", json!({"rope_type": "linear"}), "linear rope scaling needs a number 'factor'"),
        ];
        for (key, value, want) in cases {
            let err = read(&|m| {
                m.insert(key.to_string(), value.clone());
            })
            .unwrap_err()
            .to_string();
            assert!(err.starts_with("c: ") && err.contains(want), "{key}={value}: {err}");
        }

        let hp = LlamaHparams::from_hf(&fixture_config("llama-mha"), Path::new("c")).unwrap();
        let yaml = hp.nemo_yaml(&NemoYamlOptions {
            dialect: NemoDialect::Mcore,
            dtype: DType::BF16,
            tp: 1,
            pp: 1,
            divisible_by: 1,
            tokenizer_model: None,
        });
        for (from, to, want) in [
            ("bias: false", "bias: true", "bias is true; LLaMA has no biases"),
            ("rotary_percentage: 1.0", "rotary_percentage: 0.5", "rotary_percentage is 0.5"),
            ("rotary_base: 10000.0", "rotary_base: abc", "'rotary_base' should be a number, found abc"),
            ("bias: false", "bias: 'no'", "'bias' should be true or false"),
        ] {
            assert!(yaml.contains(from), "{from} in {yaml}");
            let cfg = NemoConfig::parse(yaml.replacen(from, to, 1), Path::new("y")).unwrap();
            let err = LlamaHparams::from_nemo(&cfg, hp.vocab, Path::new("y")).unwrap_err().to_string();
            assert!(err.contains(want), "{to}: {err}");
        }
        // A number YAML 1.1 readers leave a string is read as the number.
        let cfg = NemoConfig::parse(
            yaml.replacen("rotary_base: 10000.0", "rotary_base: '500000'", 1),
            Path::new("y"),
        )
        .unwrap();
        assert_eq!(LlamaHparams::from_nemo(&cfg, hp.vocab, Path::new("y")).unwrap().rope_theta, 500000.0);
    }
}
