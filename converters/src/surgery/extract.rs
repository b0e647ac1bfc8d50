//! Take one part out of a multimodal checkpoint, in the format its own ecosystem loads:
//!
//! * `llm`: an HF LLaMA directory (`config.json` from `text_config`, tokenizer files copied);
//! * `vision`: an HF `CLIPVisionModel` directory (`config.json` from `vision_config`,
//!   `preprocessor_config.json` copied);
//! * `projector`: `mm_projector.safetensors` with liuhaotian LLaVA keys (`model.mm_projector.0.weight`),
//!   as LLaVA's pre-training stage saves it — a bare file, or a directory with a LLaVA-style
//!   `config.json` naming the projector type and sizes.
//!
//! Tensors are passed through byte for byte under their canonical names ([`super::parts`]). A
//! NeVA `.nemo` is read into canonical form instead ([`super::neva`]).

use super::parts::{Bundle, Part};
use super::plan::{Action, Change, Edit, Plan, WriteAs};
use crate::checkpoint::{
    Artifact, ByteSource, Checkpoint, Flavour, Meta, ModelConfig, Parallelism, TensorMap,
};
use crate::convert::llama;
use crate::error::{Error, Result};
use crate::formats::hf_dir::WeightFormat;
use serde_json::{json, Value as Json};

/// Companion files that belong to the language model's tokenizer.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
];

/// The vision tower buffer older files store; `CLIPVisionModel` recomputes it.
const POSITION_IDS: &str = "vision_model.embeddings.position_ids";

/// Extract `part` of a multimodal checkpoint. `as_file` writes the projector as a bare
/// `.safetensors` file (otherwise a directory with `mm_projector.safetensors` + `config.json`).
pub fn extract(src: &Checkpoint, part: Part, as_file: bool) -> Result<Edit> {
    if super::neva::is_neva(src) {
        return super::neva::extract_neva(src, part, as_file);
    }
    let path = &src.meta.path;
    let bundle = Bundle::split(src)?;
    let mut plan = Plan::new(&format!("extract --part {}", part.name()), path);
    let dtype_name = |t: &TensorMap| t.values().next().map_or("float32", |t| t.dtype.torch_name());
    let (tensors, config, artifacts, write_as) = match part {
        Part::Llm => {
            let mut cfg = bundle.sub_config("text_config", path)?;
            let tensors = bundle.part(Part::Llm);
            fill_llm_config(&mut cfg, &bundle.config, dtype_name(&tensors));
            // Proves every LLaMA tensor is there with its shape, and orders them canonically.
            let c = llama::from_hf_parts(&cfg, tensors, path)?;
            let artifacts = src
                .meta
                .artifacts
                .iter()
                .filter(|a| TOKENIZER_FILES.contains(&a.name.as_str()))
                .map(strip_processor_class)
                .collect::<Result<Vec<_>>>()?;
            (c.tensors, Some(cfg), artifacts, WriteAs::HfDir(WeightFormat::Safetensors))
        }
        Part::Vision => {
            let mut cfg = bundle.sub_config("vision_config", path)?;
            let mut tensors = bundle.part(Part::Vision);
            if let Some(t) = tensors.shift_remove(POSITION_IDS) {
                plan.push(
                    Change::new(POSITION_IDS, Action::Dropped, &t)
                        .detail("buffer CLIPVisionModel recomputes"),
                );
            }
            if tensors.is_empty() {
                return Err(Error::missing(path, "vision tower tensors (vision_tower.*)"));
            }
            let o = cfg.as_object_mut().expect("sub_config returns objects");
            o.insert("architectures".into(), json!(["CLIPVisionModel"]));
            o.insert("model_type".into(), json!("clip_vision_model"));
            o.entry("torch_dtype").or_insert(json!(dtype_name(&tensors)));
            let artifacts = src
                .meta
                .artifacts
                .iter()
                .filter(|a| a.name == "preprocessor_config.json")
                .map(strip_processor_class)
                .collect::<Result<Vec<_>>>()?;
            (tensors, Some(cfg), artifacts, WriteAs::HfDir(WeightFormat::Safetensors))
        }
        Part::Projector => {
            let tensors: TensorMap =
                bundle.part(Part::Projector).into_iter().map(|(n, t)| (format!("model.{n}"), t)).collect();
            if tensors.is_empty() {
                return Err(Error::missing(path, "projector tensors (multi_modal_projector.*)"));
            }
            let act = bundle.config.get("projector_hidden_act").and_then(Json::as_str).unwrap_or("gelu");
            if act != "gelu" {
                return Err(Error::invalid(
                    path,
                    format!("config.json: projector_hidden_act '{act}' has no LLaVA projector type (expected 'gelu')"),
                ));
            }
            let text = bundle.sub_config("text_config", path)?;
            let vision = bundle.sub_config("vision_config", path)?;
            let cfg = projector_config(
                "mlp2x_gelu",
                vision.get("hidden_size").cloned().unwrap_or(Json::Null),
                text.get("hidden_size").cloned().unwrap_or(Json::Null),
                bundle.config.get("vision_feature_layer").cloned().unwrap_or(json!(-2)),
                bundle.config.get("vision_feature_select_strategy").and_then(Json::as_str) == Some("full"),
            );
            let write_as = if as_file { WriteAs::SafetensorsFile } else { WriteAs::ProjectorDir };
            (tensors, (!as_file).then_some(cfg), Vec::new(), write_as)
        }
    };
    for t in &bundle.tensors {
        if t.part != part {
            plan.push(
                Change::new(&t.stored, Action::Dropped, &t.entry).detail(format!("{} part", t.part.name())),
            );
        }
    }
    for (name, t) in &tensors {
        let stored = bundle.tensors.iter().find(|p| p.part == part && out_name(part, &p.canonical) == *name);
        let change = match stored {
            Some(p) if p.stored != *name => {
                Change { from: Some(p.stored.clone()), ..Change::new(name, Action::Renamed, t) }
            }
            _ => Change::new(name, Action::Kept, t),
        };
        plan.push(change);
    }
    if !artifacts.is_empty() {
        plan.files.push(format!(
            "copied: {}",
            artifacts.iter().map(|a| a.name.as_str()).collect::<Vec<_>>().join(", ")
        ));
    }
    let flavour = match write_as {
        WriteAs::SafetensorsFile => Flavour::SafetensorsFile,
        _ => Flavour::HfSafetensorsDir { sharded: false },
    };
    let meta = Meta {
        path: path.clone(),
        flavour,
        parallel: Parallelism::default(),
        config: config.map(ModelConfig::HfJson),
        artifacts,
    };
    Ok(Edit::new(Checkpoint::single(meta, tensors), write_as, plan))
}

/// The LLaVA-style `config.json` beside an extracted `mm_projector.safetensors` (what LLaVA's
/// pre-training stage writes); `cls_patch`: the CLS feature is kept.
pub(crate) fn projector_config(
    kind: &str,
    mm_hidden: Json,
    hidden: Json,
    select_layer: Json,
    cls_patch: bool,
) -> Json {
    json!({
        "mm_projector_type": kind,
        "mm_hidden_size": mm_hidden,
        "hidden_size": hidden,
        "mm_vision_select_layer": select_layer,
        "mm_vision_select_feature": if cls_patch { "cls_patch" } else { "patch" },
    })
}

fn out_name(part: Part, canonical: &str) -> String {
    match part {
        Part::Projector => format!("model.{canonical}"),
        _ => canonical.to_string(),
    }
}

/// A LLaMA `config.json` from llava-hf's `text_config`: the keys `LlamaForCausalLM` reads at the
/// top level of a llava-hf config move down (tying, dtype), and the architecture is named.
fn fill_llm_config(cfg: &mut Json, top: &Json, dtype: &str) {
    let o = cfg.as_object_mut().expect("sub_config returns objects");
    o.insert("architectures".into(), json!(["LlamaForCausalLM"]));
    o.insert("model_type".into(), json!("llama"));
    if !o.contains_key("tie_word_embeddings") {
        o.insert(
            "tie_word_embeddings".into(),
            top.get("tie_word_embeddings").cloned().unwrap_or(json!(false)),
        );
    }
    if !o.contains_key("torch_dtype") && !o.contains_key("dtype") {
        o.insert("torch_dtype".into(), json!(dtype));
    }
}

/// Drop `processor_class` (it names the multimodal processor the part no longer has).
fn strip_processor_class(a: &Artifact) -> Result<Artifact> {
    if !a.name.ends_with(".json") {
        return Ok(a.clone());
    }
    let bytes = a.source.bytes()?;
    let Ok(mut v) = serde_json::from_slice::<Json>(&bytes) else { return Ok(a.clone()) };
    match v.as_object_mut().and_then(|o| o.remove("processor_class")) {
        Some(_) => Ok(Artifact { name: a.name.clone(), source: ByteSource::owned(json_bytes(&v)) }),
        None => Ok(a.clone()),
    }
}

/// JSON as Python's `json.dump(indent=2)` writes it, with a final newline.
pub(crate) fn json_bytes(v: &Json) -> Vec<u8> {
    let mut b = serde_json::to_vec_pretty(v).expect("JSON values serialise");
    b.push(b'\n');
    b
}
