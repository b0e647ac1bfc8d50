//! Where a vision-language checkpoint's CLIP tower comes from. A NeVA `.nemo` may bundle it or
//! only name it (`mm_cfg.vision_encoder.from_pretrained`, `freeze: true`); an original LLaVA
//! directory always only names it (`mm_vision_tower`). The name is a local directory or a Hub
//! id such as `openai/clip-vit-large-patch14-336`, which NeMo and LLaVA hand to
//! `CLIPVisionModel.from_pretrained`. We do the same lookup: the HuggingFace cache first, a
//! download when a network is there and `HF_HUB_OFFLINE` is not set (see [`crate::hub`]).

use crate::hub::{self, HubRef};
use crate::{Error, Result};
use shardsmith_converters::convert::clip::{read_hf_clip, ClipVision};
use shardsmith_converters::convert::llava::{CanonicalLlava, VisionSource};
use shardsmith_converters::convert::neva as neva_convert;
use shardsmith_converters::{Checkpoint, ModelConfig};
use std::path::Path;

/// A NeVA `.nemo` or an original LLaVA directory in canonical form with its tower's weights: a
/// bundled tower as it is (`vision` then only supplies a config the file lacks), else the
/// directory `vision` gives (or `hf://org/name`), else the one the config names, found locally
/// or through the Hub cache. An error names the config key when none is found.
pub fn with_tower(ckpt: &Checkpoint, vision: Option<&Path>) -> Result<CanonicalLlava> {
    let neva = matches!(&ckpt.meta.config, Some(ModelConfig::NemoYaml(cfg)) if neva_convert::is_neva(cfg));
    let read = |tower: Option<ClipVision>| -> Result<CanonicalLlava> {
        Ok(neva_convert::read_multimodal(ckpt, tower)?)
    };
    if let Some(dir) = vision {
        return read(Some(read_hf_clip(&hub::resolve(dir).map_err(|e| usage_error(dir, e))?)?));
    }
    let c = read(None)?;
    if !c.vision.is_empty() {
        return Ok(c);
    }
    let key = if neva { "mm_cfg.vision_encoder.from_pretrained" } else { "mm_vision_tower" };
    let name = match &c.vision_source {
        VisionSource::Named(n) if !n.is_empty() => n.clone(),
        _ => return Err(missing(&c, key, "nothing")),
    };
    let Some(id) = HubRef::from_repo_id(&name) else {
        return Err(missing(&c, key, &format!("'{name}', which is not a local directory or a Hub id")));
    };
    let dir = hub::resolve_ref(&id).map_err(|e| Error::Config {
        path: c.origin.clone(),
        detail: format!("the vision tower {key} names, '{name}': {e:#}; pass --vision CLIP_DIR"),
    })?;
    read(Some(read_hf_clip(&dir)?))
}

fn missing(c: &CanonicalLlava, key: &str, named: &str) -> Error {
    Error::Config {
        path: c.origin.clone(),
        detail: format!(
            "the vision tower's weights are not in the checkpoint and {key} names {named}; pass --vision CLIP_DIR"
        ),
    }
}

fn usage_error(dir: &Path, e: anyhow::Error) -> Error {
    Error::Usage(format!("--vision {}: {e:#}", dir.display()))
}
