//! Keep the first N decoder layers, byte for byte: tiny test fixtures cut from big models.
//!
//! HF directories (LLaMA, and llava-hf's language model) are cut by stored name, so every kept
//! tensor keeps its name, dtype and bytes, and the result is proven complete by reading it back as
//! the model it claims to be. A `.nemo` is canonicalised, cut and re-emitted at its own TP, PP
//! and dialect; PP must still divide the layer count (the layers live on stages), otherwise the
//! cut is refused with what to do instead. A NeVA `.nemo` is cut the same way in its language
//! model, projector and tower kept ([`super::neva::keep_layers_neva`]).

use super::model::{ConfigEdits, LlamaModel};
use super::plan::{Action, Change, Edit, Plan, WriteAs};
use crate::checkpoint::{Checkpoint, Flavour, ModelConfig, TensorMap};
use crate::convert::{llama, llava};
use crate::error::{Error, Result};
use regex::Regex;
use serde_json::{json, Value as Json};

/// Decoder-layer names of the HF LLaMA spellings: plain, llava-hf published, llava-hf nested.
const LAYER_NAME: &str = r"^(?:model|language_model\.model|model\.language_model)\.layers\.(\d+)\.";

/// Keep layers `0..first` of a LLaMA (HF or `.nemo`) or llava-hf checkpoint.
pub fn keep_layers(src: &Checkpoint, first: usize) -> Result<Edit> {
    let path = &src.meta.path;
    if first == 0 {
        return Err(Error::argument("--first 0", "keep at least one layer"));
    }
    match (&src.meta.flavour, &src.meta.config) {
        (Flavour::Nemo { .. }, _) if super::neva::is_neva(src) => {
            let re = Regex::new(LAYER_NAME).expect("constant regex");
            super::neva::keep_layers_neva(src, first, |name| !beyond(&re, name, first))
        }
        (Flavour::Nemo { .. }, _) => keep_nemo(src, first),
        (_, Some(ModelConfig::HfJson(cfg))) => keep_hf(src, cfg, first),
        _ => Err(Error::missing(
            path,
            "config.json or model_config.yaml (keep-layers needs to know the model)",
        )),
    }
}

fn keep_hf(src: &Checkpoint, cfg: &Json, first: usize) -> Result<Edit> {
    let path = &src.meta.path;
    let llava = llava::is_llava_hf(cfg);
    let (cfg_key, layers) = if llava {
        ("text_config.num_hidden_layers", cfg.pointer("/text_config/num_hidden_layers"))
    } else {
        ("num_hidden_layers", cfg.get("num_hidden_layers"))
    };
    let layers = layers
        .and_then(Json::as_u64)
        .ok_or_else(|| Error::missing(path, format!("config.json: '{cfg_key}'")))? as usize;
    check_first(path, first, layers)?;
    let re = Regex::new(LAYER_NAME).expect("constant regex");
    let mut plan = Plan::new(&format!("keep-layers --first {first}"), path);
    let mut tensors = TensorMap::new();
    for (name, t) in src.tensors()? {
        if beyond(&re, name, first) {
            plan.push(Change::new(name, Action::Dropped, t));
        } else {
            plan.push(Change::new(name, Action::Kept, t));
            tensors.insert(name.clone(), t.clone());
        }
    }
    let mut new_cfg = cfg.clone();
    let slot = if llava {
        &mut new_cfg["text_config"]["num_hidden_layers"]
    } else {
        &mut new_cfg["num_hidden_layers"]
    };
    *slot = json!(first);
    plan.config.push(format!("{cfg_key}: {layers} -> {first}"));
    let mut out = src.clone();
    out.meta.config = Some(ModelConfig::HfJson(new_cfg));
    out.shards[0].tensors = tensors;
    // Prove the cut is a complete model of its kind (every tensor there, nothing left over).
    if llava {
        llava::from_llava_hf(&out)?;
    } else {
        llama::from_hf(&out)?;
    }
    Ok(Edit::new(out, WriteAs::like(&src.meta.flavour), plan))
}

fn keep_nemo(src: &Checkpoint, first: usize) -> Result<Edit> {
    let path = &src.meta.path;
    let model = LlamaModel::open(src)?;
    let mut c = model.canonical.clone();
    let layers = c.hparams.layers;
    let pp = match model.store {
        super::model::Store::Nemo { pp, .. } => pp,
        _ => 1,
    };
    check_cut(path, first, layers, pp)?;
    let re = Regex::new(LAYER_NAME).expect("constant regex");
    let mut plan = Plan::new(&format!("keep-layers --first {first}"), path);
    let mut kept = TensorMap::new();
    for (name, t) in &c.tensors {
        if beyond(&re, name, first) {
            plan.push(Change::new(name, Action::Dropped, t));
        } else {
            plan.push(Change::new(name, Action::Kept, t));
            kept.insert(name.clone(), t.clone());
        }
    }
    c.tensors = kept;
    c.hparams.layers = first;
    let edits = ConfigEdits { hf: vec![], nemo: vec![("num_layers", serde_yaml::Value::from(first as u64))] };
    let (output, write_as, lines) = model.emit(&c, &edits, src.meta.artifacts.clone())?;
    plan.config.extend(lines);
    plan.notes.push(
        "tensors are listed by canonical (HF) name; the .nemo is re-emitted at its own tp/pp and dialect"
            .into(),
    );
    Ok(Edit::new(output, write_as, plan))
}

/// Whether `name` is a decoder layer's tensor at or past layer `first` (cut away).
fn beyond(layer_name: &Regex, name: &str, first: usize) -> bool {
    layer_name.captures(name).and_then(|c| c[1].parse::<usize>().ok()).is_some_and(|l| l >= first)
}

fn check_first(path: &std::path::Path, first: usize, layers: usize) -> Result<()> {
    if first > layers {
        return Err(Error::invalid(path, format!("--first {first}: the model has only {layers} layers")));
    }
    Ok(())
}

/// Keeping `first` of `layers` layers of a `.nemo` stored over `pp` pipeline stages: there must
/// be that many, and they must still split over the stages.
pub(super) fn check_cut(path: &std::path::Path, first: usize, layers: usize, pp: usize) -> Result<()> {
    check_first(path, first, layers)?;
    if first % pp != 0 {
        return Err(Error::invalid(
            path,
            format!(
                "keeping {first} layers at pp={pp}: {first} layers do not split over {pp} pipeline stages; \
                 reshard first (shardsmith reshard SRC -o OUT --pp P with P dividing {first}) or keep a \
                 multiple of {pp} layers"
            ),
        ));
    }
    Ok(())
}
