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

fn need(cfg: &Json, key: &str, path: &Path) -> Result<usize> {
    cfg.get(key)
        .and_then(Json::as_u64)
        .map(|v| v as usize)
        .ok_or_else(|| Error::invalid(path, format!("CLIP vision config: missing or non-integer '{key}'")))
}

/// Canonical tensor names and shapes for a `CLIPVisionConfig`, in `state_dict()` order. The
/// config is checked for what the tower needs to run (the same rules as the model's loader), so
/// a conversion does not write a tower nothing can load.
pub fn clip_shapes(cfg: &Json, path: &Path) -> Result<Vec<(String, Vec<usize>)>> {
    let (c, inter, layers) = (
        need(cfg, "hidden_size", path)?,
        need(cfg, "intermediate_size", path)?,
        need(cfg, "num_hidden_layers", path)?,
    );
    let (image, patch) = (need(cfg, "image_size", path)?, need(cfg, "patch_size", path)?);
    let channels = cfg.get("num_channels").and_then(Json::as_u64).unwrap_or(3) as usize;
    // HF's CLIPVisionConfig defaults where a key is absent.
    let heads = cfg.get("num_attention_heads").and_then(Json::as_u64).unwrap_or(12) as usize;
    const MAX_LAYERS: usize = 1 << 10;
    const MAX_DIM: usize = 1 << 20;
    let sizes = [
        ("num_hidden_layers", layers, MAX_LAYERS),
        ("hidden_size", c, MAX_DIM),
        ("intermediate_size", inter, MAX_DIM),
        ("num_attention_heads", heads, MAX_DIM),
        ("image_size", image, MAX_DIM),
        ("patch_size", patch, MAX_DIM),
        ("num_channels", channels, 64),
    ];
    for (key, n, max) in sizes {
        if !(1..=max).contains(&n) {
            return Err(Error::invalid(
                path,
                format!("CLIP vision config: {key} is {n}, expected 1 to {max}"),
            ));
        }
    }
    for (key, n, of, by) in
        [("image_size", image, "patch_size", patch), ("hidden_size", c, "num_attention_heads", heads)]
    {
        if n % by != 0 {
            return Err(Error::invalid(
                path,
                format!("CLIP vision config: {key} {n} is not a multiple of {of} {by}"),
            ));
        }
    }
    match cfg.get("hidden_act") {
        None | Some(Json::Null) => {}
        Some(Json::String(a)) if a == "quick_gelu" || a == "gelu" => {}
        Some(other) => {
            return Err(Error::invalid(
                path,
                format!("CLIP vision config: hidden_act {other} is not supported (quick_gelu, gelu)"),
            ))
        }
    }
    let positions = (image / patch).pow(2) + 1;
    let e = "vision_model.embeddings";
    let mut out = vec![
        (format!("{e}.class_embedding"), vec![c]),
        (format!("{e}.patch_embedding.weight"), vec![c, channels, patch, patch]),
        (format!("{e}.position_embedding.weight"), vec![positions, c]),
        ("vision_model.pre_layrnorm.weight".into(), vec![c]),
        ("vision_model.pre_layrnorm.bias".into(), vec![c]),
    ];
    for l in 0..layers {
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
    Ok(out)
}

/// Refuse a feature layer the tower does not have: `hidden_states` has `layers + 1` entries, and
/// a negative index counts from the end as in Python (LLaVA-1.5's −2).
pub fn check_feature_layer(layer: isize, cfg: &Json, key: &str, path: &Path) -> Result<()> {
    // HF's CLIPVisionConfig default when the key is absent.
    let layers = cfg.get("num_hidden_layers").and_then(Json::as_u64).unwrap_or(12);
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
    let image = need(&config, "image_size", &vision.origin)?;
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
