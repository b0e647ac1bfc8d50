//! HF CLIP vision towers in and out (formats.md §7.3): a `CLIPVisionModel` directory (or a full
//! `CLIPModel`, whose vision half is the same `vision_model.*` tensors) with safetensors or
//! `pytorch_model.bin` weights, read into canonical `vision_model.*` tensors + its
//! `CLIPVisionConfig`, and written back as a `CLIPVisionModel` directory.

use crate::checkpoint::{
    Artifact, ByteSource, Checkpoint, Flavour, Meta, ModelConfig, Parallelism, TensorMap,
};
use crate::error::{Error, Result};
use crate::formats;
use crate::DType;
use serde_json::{json, Value as Json};
use std::path::{Path, PathBuf};

/// A vision tower: canonical tensors, config and (when the source had one) the image processor.
#[derive(Clone, Debug)]
pub struct ClipVision {
    /// `vision_model.*` tensors in `CLIPVisionModel.state_dict()` order.
    pub tensors: TensorMap,
    /// The `CLIPVisionConfig` object.
    pub config: Json,
    /// `preprocessor_config.json`, if the source had one.
    pub preprocessor: Option<ByteSource>,
    /// Where it was read.
    pub origin: PathBuf,
}

/// The vision-tower hyper-parameters of HF's `CLIPVisionConfig`. The converters and the model
/// loader read a config through [`ClipVisionConfig::from_vision_config`], so a conversion never
/// writes a tower the model refuses, and the model never runs one the converters would refuse.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipVisionConfig {
    /// Residual width C (1024 for ViT-L/14).
    pub hidden_size: usize,
    /// MLP inner width (4096 for ViT-L/14).
    pub intermediate_size: usize,
    /// Encoder layers L.
    pub num_hidden_layers: usize,
    /// Attention heads; `hidden_size` is a multiple of it.
    pub num_attention_heads: usize,
    /// Side P of the square patches (the conv kernel and stride).
    pub patch_size: usize,
    /// Side S of the square input image; a multiple of `patch_size`.
    pub image_size: usize,
    /// Input channels (3).
    pub num_channels: usize,
    /// Epsilon of every layer norm.
    pub layer_norm_eps: f64,
    /// MLP activation.
    pub hidden_act: ClipActivation,
}

/// The MLP activations HF CLIP checkpoints use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipActivation {
    /// `x·sigmoid(1.702x)`, the OpenAI CLIP towers.
    QuickGelu,
    /// Exact erf GELU (HF `"gelu"`).
    Gelu,
}

impl ClipVisionConfig {
    /// The fields that differ from `other`, as `name self vs other`.
    pub fn differences(&self, other: &ClipVisionConfig) -> Vec<String> {
        let fields = |c: &ClipVisionConfig| {
            [
                ("hidden_size", c.hidden_size.to_string()),
                ("intermediate_size", c.intermediate_size.to_string()),
                ("num_hidden_layers", c.num_hidden_layers.to_string()),
                ("num_attention_heads", c.num_attention_heads.to_string()),
                ("patch_size", c.patch_size.to_string()),
                ("image_size", c.image_size.to_string()),
                ("num_channels", c.num_channels.to_string()),
                ("layer_norm_eps", c.layer_norm_eps.to_string()),
                ("hidden_act", format!("{:?}", c.hidden_act)),
            ]
        };
        fields(self)
            .into_iter()
            .zip(fields(other))
            .filter(|((_, a), (_, b))| a != b)
            .map(|((name, a), (_, b))| format!("{name} {a} vs {b}"))
            .collect()
    }
}

impl Default for ClipVisionConfig {
    /// HF `CLIPVisionConfig()` defaults (ViT-B/32), used for keys a config omits.
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            patch_size: 32,
            image_size: 224,
            num_channels: 3,
            layer_norm_eps: 1e-5,
            hidden_act: ClipActivation::QuickGelu,
        }
    }
}

impl ClipVisionConfig {
    /// Most encoder layers accepted (ViT-L has 24; the bound keeps a corrupt value from building
    /// a tensor list until memory runs out).
    pub const MAX_LAYERS: usize = 1 << 10;
    /// Largest width, head count or image side accepted.
    pub const MAX_DIM: usize = 1 << 20;
    /// Most input channels accepted.
    pub const MAX_CHANNELS: usize = 64;

    /// Reads a `CLIPVisionConfig` object (a `clip_vision_model` config.json, or the
    /// `vision_config` of a `clip`/`llava` one), with HF's defaults for absent keys, and checks
    /// it for what the tower needs to run: sizes in range, C a multiple of the heads, S of P, a
    /// positive norm epsilon and an activation we implement. `path` names the file in errors.
    pub fn from_vision_config(cfg: &Json, path: &Path) -> Result<Self> {
        let bad = |detail: String| Error::invalid(path, format!("CLIP vision config: {detail}"));
        let d = Self::default();
        let size = |key: &str, default: usize, max: usize| -> Result<usize> {
            match cfg.get(key) {
                None | Some(Json::Null) => Ok(default),
                Some(v) => v
                    .as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .filter(|n| (1..=max).contains(n))
                    .ok_or_else(|| bad(format!("{key} is {v}, expected an integer from 1 to {max}"))),
            }
        };
        let layer_norm_eps = match cfg.get("layer_norm_eps") {
            None | Some(Json::Null) => d.layer_norm_eps,
            Some(v) => v
                .as_f64()
                .filter(|e| *e > 0.0)
                .ok_or_else(|| bad(format!("layer_norm_eps is {v}, expected a positive number")))?,
        };
        let hidden_act = match cfg.get("hidden_act") {
            None | Some(Json::Null) => d.hidden_act,
            Some(Json::String(a)) if a == "quick_gelu" => ClipActivation::QuickGelu,
            Some(Json::String(a)) if a == "gelu" => ClipActivation::Gelu,
            Some(other) => {
                return Err(bad(format!("hidden_act {other} is not supported (quick_gelu, gelu)")))
            }
        };
        let (dim, layers, channels) = (Self::MAX_DIM, Self::MAX_LAYERS, Self::MAX_CHANNELS);
        let c = Self {
            hidden_size: size("hidden_size", d.hidden_size, dim)?,
            intermediate_size: size("intermediate_size", d.intermediate_size, dim)?,
            num_hidden_layers: size("num_hidden_layers", d.num_hidden_layers, layers)?,
            num_attention_heads: size("num_attention_heads", d.num_attention_heads, dim)?,
            patch_size: size("patch_size", d.patch_size, dim)?,
            image_size: size("image_size", d.image_size, dim)?,
            num_channels: size("num_channels", d.num_channels, channels)?,
            layer_norm_eps,
            hidden_act,
        };
        let multiples = [
            ("image_size", c.image_size, "patch_size", c.patch_size),
            ("hidden_size", c.hidden_size, "num_attention_heads", c.num_attention_heads),
        ];
        for (key, n, of, by) in multiples {
            if n % by != 0 {
                return Err(bad(format!("{key} {n} is not a multiple of {of} {by}")));
            }
        }
        Ok(c)
    }

    /// Reads the vision config out of an HF config: a standalone `clip_vision_model` config, or
    /// the `vision_config` object of a `clip` (`CLIPModel`) or `llava` (llava-hf) config, then
    /// [`Self::from_vision_config`]. `path` only names the file in errors.
    pub fn from_json(json: &Json, path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let model_type = json.get("model_type").and_then(Json::as_str);
        let vision = match (model_type, json.get("vision_config")) {
            (Some("clip_vision_model"), _) => json,
            (Some("clip" | "llava" | "llava_next"), Some(v)) | (None, Some(v)) => v,
            (Some(t @ ("clip" | "llava" | "llava_next")), None) => {
                // liuhaotian LLaVA configs only name the tower; its own config has to be read.
                let tower = json.get("mm_vision_tower").and_then(Json::as_str);
                return Err(Error::invalid(
                    path,
                    format!(
                        "'{t}' config has no vision_config (mm_vision_tower: {})",
                        tower.unwrap_or("absent")
                    ),
                ));
            }
            (None, None) => json,
            (Some(other), _) => {
                return Err(Error::invalid(
                    path,
                    format!(
                        "model_type '{other}' is not a CLIP vision config (supported: \
                         clip_vision_model, clip, llava with vision_config)"
                    ),
                ))
            }
        };
        match vision.get("model_type").and_then(Json::as_str) {
            None | Some("clip_vision_model") => Self::from_vision_config(vision, path),
            Some(t) => Err(Error::invalid(
                path,
                format!("vision_config.model_type '{t}' is not supported (clip_vision_model)"),
            )),
        }
    }

    /// Patches per image N = (S/P)² (576 for ViT-L/14-336).
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }

    /// Sequence length N + 1 (the CLS token first).
    pub fn num_positions(&self) -> usize {
        self.num_patches() + 1
    }

    /// Per-head width C / heads.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Canonical tensor names and shapes, in `CLIPVisionModel.state_dict()` order.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (c, inter, patch) = (self.hidden_size, self.intermediate_size, self.patch_size);
        let e = "vision_model.embeddings";
        let mut out = vec![
            (format!("{e}.class_embedding"), vec![c]),
            (format!("{e}.patch_embedding.weight"), vec![c, self.num_channels, patch, patch]),
            (format!("{e}.position_embedding.weight"), vec![self.num_positions(), c]),
            ("vision_model.pre_layrnorm.weight".into(), vec![c]),
            ("vision_model.pre_layrnorm.bias".into(), vec![c]),
        ];
        for l in 0..self.num_hidden_layers {
            let p = format!("vision_model.encoder.layers.{l}");
            for proj in ["k_proj", "v_proj", "q_proj", "out_proj"] {
                out.push((format!("{p}.self_attn.{proj}.weight"), vec![c, c]));
                out.push((format!("{p}.self_attn.{proj}.bias"), vec![c]));
            }
            out.extend([
                (format!("{p}.layer_norm1.weight"), vec![c]),
                (format!("{p}.layer_norm1.bias"), vec![c]),
                (format!("{p}.mlp.fc1.weight"), vec![inter, c]),
                (format!("{p}.mlp.fc1.bias"), vec![inter]),
                (format!("{p}.mlp.fc2.weight"), vec![c, inter]),
                (format!("{p}.mlp.fc2.bias"), vec![c]),
                (format!("{p}.layer_norm2.weight"), vec![c]),
                (format!("{p}.layer_norm2.bias"), vec![c]),
            ]);
        }
        out.extend([
            ("vision_model.post_layernorm.weight".into(), vec![c]),
            ("vision_model.post_layernorm.bias".into(), vec![c]),
        ]);
        out
    }
}

/// A bundle's tower config as HF reads it ([`ClipVisionConfig::from_vision_config`]), or `None`
/// where there is none (`null`: a tower known only by a hub id).
pub fn tower_dims(cfg: &Json, path: &Path) -> Result<Option<ClipVisionConfig>> {
    cfg.is_object().then(|| ClipVisionConfig::from_vision_config(cfg, path)).transpose()
}

/// Canonical tensor names and shapes for a `CLIPVisionConfig` object, in `state_dict()` order,
/// after [`ClipVisionConfig::from_vision_config`]'s checks.
pub fn clip_shapes(cfg: &Json, path: &Path) -> Result<Vec<(String, Vec<usize>)>> {
    Ok(ClipVisionConfig::from_vision_config(cfg, path)?.tensor_shapes())
}

/// Refuse a feature layer the tower does not have: `hidden_states` has `layers + 1` entries, and
/// a negative index counts from the end as in Python (LLaVA-1.5's −2).
pub fn check_feature_layer(layer: isize, cfg: &Json, key: &str, path: &Path) -> Result<()> {
    let default = ClipVisionConfig::default().num_hidden_layers as u64;
    let layers = cfg.get("num_hidden_layers").and_then(Json::as_u64).unwrap_or(default);
    let count = isize::try_from(layers).unwrap_or(isize::MAX - 1) + 1;
    if !(-count..count).contains(&layer) {
        return Err(Error::invalid(
            path,
            format!(
                "{key} {layer} is out of range for a tower with {} layers (valid {}..={})",
                count - 1,
                -count,
                count - 1
            ),
        ));
    }
    Ok(())
}

/// Order `found` by [`clip_shapes`], proving every tensor is there with its shape and nothing is
/// left over (the `position_ids` buffer of older files is dropped: it is recomputed).
pub fn check_clip(cfg: &Json, mut found: TensorMap, path: &Path) -> Result<TensorMap> {
    found.shift_remove("vision_model.embeddings.position_ids");
    let mut out = TensorMap::with_capacity(found.len());
    let mut missing = Vec::new();
    for (name, shape) in clip_shapes(cfg, path)? {
        match found.shift_remove(&name) {
            Some(t) if t.shape == shape => {
                super::require_float("vision tensor", &name, &t, path)?;
                out.insert(name, t);
            }
            Some(t) => {
                return Err(Error::invalid(
                    path,
                    format!(
                        "vision tensor '{name}': expected shape {shape:?} from the CLIP config, got {:?}",
                        t.shape
                    ),
                ))
            }
            None => missing.push(name),
        }
    }
    if !missing.is_empty() {
        return Err(Error::missing(path, format!("{} vision tensors: {}", missing.len(), preview(&missing))));
    }
    if !found.is_empty() {
        let left: Vec<String> = found.into_keys().collect();
        return Err(Error::invalid(path, format!("unmapped vision tensors: {}", preview(&left))));
    }
    Ok(out)
}

fn preview(names: &[String]) -> String {
    let shown: Vec<&str> = names.iter().take(6).map(String::as_str).collect();
    match names.len().saturating_sub(shown.len()) {
        0 => shown.join(", "),
        more => format!("{} and {more} more", shown.join(", ")),
    }
}

/// Read an HF CLIP directory: `CLIPVisionModel` (`model_type: clip_vision_model`) or a full
/// `CLIPModel` (`model_type: clip`: its `vision_config` and `vision_model.*` tensors; the text
/// tower, the projections and `logit_scale` are not part of a vision tower).
pub fn read_hf_clip(path: &Path) -> Result<ClipVision> {
    let ckpt = formats::open(path)?;
    let Some(ModelConfig::HfJson(cfg)) = &ckpt.meta.config else {
        return Err(Error::missing(path, "config.json (an HF CLIP vision directory needs one)"));
    };
    let model_type = cfg.get("model_type").and_then(Json::as_str).unwrap_or("");
    let (config, full) = match model_type {
        "clip_vision_model" => (cfg.clone(), false),
        "clip" => {
            let v = cfg.get("vision_config").filter(|v| v.is_object()).cloned();
            (v.ok_or_else(|| Error::missing(path, "config.json: 'vision_config'"))?, true)
        }
        other => {
            return Err(Error::invalid(
                path,
                format!(
                "config.json: model_type '{other}' is not a CLIP vision tower (clip_vision_model or clip)"
            ),
            ))
        }
    };
    let mut tensors = TensorMap::new();
    for (name, t) in ckpt.tensors()? {
        let text_half = name.starts_with("text_model.")
            || matches!(name.as_str(), "text_projection.weight" | "visual_projection.weight" | "logit_scale");
        if full && text_half {
            continue;
        }
        tensors.insert(name.clone(), t.clone());
    }
    let mut config = config;
    if let Some(obj) = config.as_object_mut() {
        obj.insert("model_type".into(), json!("clip_vision_model"));
    }
    let tensors = check_clip(&config, tensors, path)?;
    let preprocessor =
        ckpt.meta.artifacts.iter().find(|a| a.name == "preprocessor_config.json").map(|a| a.source.clone());
    Ok(ClipVision { tensors, config, preprocessor, origin: path.to_path_buf() })
}

/// OpenAI CLIP's normalisation (formats.md §9.4).
const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// The `CLIPImageProcessor` config transformers pairs with a tower of this image size: shortest
/// edge resize (bicubic) and centre crop to the image size, OpenAI mean and std.
pub fn default_preprocessor(image_size: usize) -> Json {
    json!({
        "crop_size": {"height": image_size, "width": image_size},
        "do_center_crop": true,
        "do_convert_rgb": true,
        "do_normalize": true,
        "do_rescale": true,
        "do_resize": true,
        "image_mean": CLIP_MEAN,
        "image_processor_type": "CLIPImageProcessor",
        "image_std": CLIP_STD,
        "resample": 3,
        "rescale_factor": 1.0 / 255.0,
        "size": {"shortest_edge": image_size}
    })
}

/// JSON text with a final newline, as `json.dump(indent=2)` writes it.
pub(crate) fn json_bytes(v: &Json) -> Vec<u8> {
    let mut b = serde_json::to_vec_pretty(v).expect("JSON values serialise");
    b.push(b'\n');
    b
}

/// A `CLIPVisionModel` directory checkpoint for `vision` (`config.json`, weights,
/// `preprocessor_config.json`), stored in `dtype` (the tensors' own when `None`).
pub fn clip_checkpoint(vision: &ClipVision, dtype: Option<DType>) -> Result<Checkpoint> {
    let tensors = crate::convert::llama::cast_all(&vision.tensors, dtype)?;
    let stored = tensors.values().next().map_or(DType::F32, |t| t.dtype);
    let mut config = vision.config.clone();
    if let Some(obj) = config.as_object_mut() {
        obj.insert("architectures".into(), json!(["CLIPVisionModel"]));
        obj.insert("model_type".into(), json!("clip_vision_model"));
        obj.insert("torch_dtype".into(), json!(stored.torch_name()));
    }
    let image = ClipVisionConfig::from_vision_config(&config, &vision.origin)?.image_size;
    let preprocessor = match &vision.preprocessor {
        Some(p) => p.clone(),
        None => ByteSource::owned(json_bytes(&default_preprocessor(image))),
    };
    let meta = Meta {
        path: vision.origin.clone(),
        flavour: Flavour::HfSafetensorsDir { sharded: false },
        parallel: Parallelism::default(),
        config: Some(ModelConfig::HfJson(config)),
        artifacts: vec![Artifact { name: "preprocessor_config.json".into(), source: preprocessor }],
    };
    Ok(Checkpoint::single(meta, tensors))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures").join(name)
    }

    #[test]
    fn config_sources_and_defaults() {
        let fixture_cfg = read_hf_clip(&fixture("clip-vision")).unwrap().config;
        let fixture_cfg = ClipVisionConfig::from_json(&fixture_cfg, "clip-vision").unwrap();
        assert_eq!((fixture_cfg.hidden_size, fixture_cfg.num_positions()), (48, 17));
        assert_eq!(fixture_cfg.hidden_act, ClipActivation::QuickGelu);
        // llava-hf 1.5 stores only the non-default keys of its tower.
        let llava = json!({"model_type": "llava", "projector_hidden_act": "gelu", "vision_config": {
            "hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
            "model_type": "clip_vision_model", "num_attention_heads": 16,
            "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768}});
        let cfg = ClipVisionConfig::from_json(&llava, "llava/config.json").unwrap();
        assert_eq!((cfg.num_patches(), cfg.head_dim(), cfg.num_channels), (576, 64, 3));
        assert_eq!((cfg.layer_norm_eps, cfg.hidden_act), (1e-5, ClipActivation::QuickGelu));
        let clip = json!({"model_type": "clip", "text_config": {}, "vision_config": {"hidden_act": "gelu"}});
        let cfg = ClipVisionConfig::from_json(&clip, "clip/config.json").unwrap();
        assert_eq!(cfg, ClipVisionConfig { hidden_act: ClipActivation::Gelu, ..Default::default() });
        let liuhaotian =
            json!({"model_type": "llava", "mm_vision_tower": "openai/clip-vit-large-patch14-336"});
        let err = ClipVisionConfig::from_json(&liuhaotian, "lv/config.json").unwrap_err().to_string();
        assert!(err.starts_with("lv/config.json: ") && err.contains("clip-vit-large-patch14-336"), "{err}");
    }

    /// Every rule of the one reader the converters and the model share, each named in its
    /// refusal with the file.
    #[test]
    fn configs_the_tower_cannot_run_are_refused() {
        let cases = [
            (json!({"image_size": 30, "patch_size": 8}), "image_size 30 is not a multiple of patch_size 8"),
            (
                json!({"hidden_size": 40, "num_attention_heads": 6}),
                "hidden_size 40 is not a multiple of num_attention_heads 6",
            ),
            (json!({"hidden_act": "relu"}), "hidden_act \"relu\" is not supported (quick_gelu, gelu)"),
            (
                json!({"num_hidden_layers": 1u64 << 40}),
                "num_hidden_layers is 1099511627776, expected an integer from 1 to 1024",
            ),
            (json!({"num_channels": 0}), "num_channels is 0, expected an integer from 1 to 64"),
            (json!({"patch_size": "14"}), "patch_size is \"14\", expected an integer"),
            (json!({"layer_norm_eps": -1e-5}), "layer_norm_eps is -0.00001, expected a positive number"),
            (
                json!({"model_type": "siglip_vision_model"}),
                "'siglip_vision_model' is not a CLIP vision config",
            ),
            (
                json!({"model_type": "llava", "vision_config": {"model_type": "siglip_vision_model"}}),
                "vision_config.model_type 'siglip_vision_model' is not supported",
            ),
        ];
        for (cfg, want) in cases {
            let err = ClipVisionConfig::from_json(&cfg, "dir/config.json").unwrap_err().to_string();
            assert!(err.starts_with("dir/config.json: ") && err.contains(want), "{cfg}: {err}");
        }
    }

    #[test]
    fn reads_the_fixture_towers_completely() {
        for name in ["clip-vision", "llava-tiny-clip"] {
            let v = read_hf_clip(&fixture(name)).unwrap();
            let layers = v.config["num_hidden_layers"].as_u64().unwrap() as usize;
            assert_eq!(v.tensors.len(), 5 + 16 * layers + 2, "{name}");
            assert!(v.preprocessor.is_some());
        }
    }

    #[test]
    fn a_missing_tensor_is_named() {
        let v = read_hf_clip(&fixture("clip-vision")).unwrap();
        let mut t = v.tensors.clone();
        t.shift_remove("vision_model.encoder.layers.1.mlp.fc2.bias");
        let err = check_clip(&v.config, t, Path::new("x")).unwrap_err().to_string();
        assert!(err.contains("vision_model.encoder.layers.1.mlp.fc2.bias"), "{err}");
    }
}
