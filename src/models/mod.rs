//! The candle models. Each loads by canonical (HF) tensor name through a `VarBuilder`
//! ([`crate::weights`]), so any checkpoint format the converters crate reads can feed it.

pub mod clip;
pub mod llama;
pub mod neva;
pub mod projector;
pub mod tower;
pub mod tp;

use crate::weights::TensorMapBackend;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use clip::{ClipVisionConfig, ClipVisionModel};
use llama::LlamaOutput;
use neva::{ImageTokens, Neva};
use projector::{Projector, ProjectorKind};
use shardsmith_converters::convert::llava::{self, CanonicalLlava, ImageTokenScheme};
use shardsmith_converters::convert::{llama as llama_convert, neva as neva_convert};
use shardsmith_converters::{Checkpoint, Flavour, ModelConfig};
use std::path::{Path, PathBuf};
use tp::ParallelLlama;

/// How to instantiate a model.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Tensor-parallel size to run at (`None`: the checkpoint's own, 1 for HF).
    pub tp: Option<usize>,
    /// Compute dtype.
    pub dtype: DType,
    /// Where the weights live.
    pub device: Device,
    /// An HF CLIP directory for a vision tower the checkpoint only references.
    pub vision: Option<PathBuf>,
}

/// The CUDA ordinal a device name stands for (`None` for `cpu`): `cpu`, `cuda` (GPU 0) or
/// `cuda:N`, anything else an error. Only the syntax: nothing is opened.
pub fn device_ordinal(spec: &str) -> Result<Option<usize>> {
    match spec {
        "cpu" => Ok(None),
        "cuda" => Ok(Some(0)),
        s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(Some(n)),
            _ => Err(Error::Usage(format!("unknown device '{spec}' (expected cpu, cuda or cuda:N)"))),
        },
    }
}

/// The device a `--device` argument names ([`device_ordinal`]). Without the `cuda` feature a
/// CUDA device is an error that says how to build with it.
pub fn parse_device(spec: &str) -> Result<Device> {
    let Some(ordinal) = device_ordinal(spec)? else { return Ok(Device::Cpu) };
    if !cfg!(feature = "cuda") {
        return Err(Error::Usage(format!(
            "device '{spec}': this shardsmith was built without CUDA (cargo build --release --features cuda)"
        )));
    }
    let dev = Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = &dev {
        crate::ops::keep_pool_memory(cuda)?;
        crate::ops::quiet_event_tracking(cuda);
    }
    Ok(dev)
}

/// A loaded model of any supported family.
pub enum Model {
    /// A text-only LLaMA-2.
    Llama(ParallelLlama),
    /// A vision-language model (llava-hf, NeVA).
    Neva(Box<Neva>),
}

/// Facts about a loaded model the commands need.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    /// `llama` or `llava`.
    pub family: &'static str,
    /// The checkpoint path.
    pub path: PathBuf,
    /// The TP size it runs at.
    pub tp: usize,
    /// Image side in pixels (vision models).
    pub image_size: Option<usize>,
    /// Features per image N (vision models).
    pub image_tokens: Option<usize>,
    /// The chat template the checkpoint records (NeVA's `data.conv_template`).
    pub template: Option<String>,
    /// The image aspect mode the checkpoint records (`pad`, `square`, `keep`).
    pub aspect: Option<String>,
    /// The vision tower's `preprocessor_config.json`, when the checkpoint carries one.
    pub preprocessor: Option<serde_json::Value>,
    /// For a NeVA converted from llava-hf, or an original LLaVA: llava-hf's image token id, so
    /// prompts written for that form (e.g. its golden outputs) can be respelled with the model's
    /// own image span or placeholder.
    pub source_image_token: Option<u32>,
}

impl ModelInfo {
    fn text(family: &'static str, path: PathBuf, tp: usize) -> Self {
        ModelInfo {
            family,
            path,
            tp,
            image_size: None,
            image_tokens: None,
            template: None,
            aspect: None,
            preprocessor: None,
            source_image_token: None,
        }
    }
}

impl Model {
    /// The language model.
    pub fn llm(&mut self) -> &mut ParallelLlama {
        match self {
            Model::Llama(m) => m,
            Model::Neva(m) => &mut m.llm,
        }
    }

    /// Forward ids [B, T] (u32), with images for a vision model's prefill.
    pub fn forward(
        &mut self,
        ids: &Tensor,
        pixel_values: Option<&Tensor>,
        last_only: bool,
        hidden_states: bool,
    ) -> Result<LlamaOutput> {
        match (self, pixel_values) {
            (Model::Llama(m), None) => m.forward(ids, &[], last_only, hidden_states),
            (Model::Llama(_), Some(_)) => {
                Err(Error::Usage("this is a text-only LLaMA model; it takes no image".into()))
            }
            (Model::Neva(m), pixels) => m.forward(ids, pixels, last_only, hidden_states),
        }
    }
}

/// How a vision-language checkpoint marks image positions in its token ids, for training: the
/// data pipeline and the trainer's embedding take llava-hf's and NeVA's markers, not original
/// LLaVA's placeholder (inference takes all three, [`prompt_image_tokens_of`]).
pub fn image_tokens_of(c: &CanonicalLlava) -> Result<ImageTokens> {
    Ok(match c.image_tokens {
        ImageTokenScheme::Repeated { image, .. } => ImageTokens::Repeated { id: image },
        ImageTokenScheme::NevaSpan { start, patch, end, use_im_start_end } => ImageTokens::NevaSpan {
            start_id: start,
            patch_id: patch,
            end_id: end,
            keep_markers: use_im_start_end,
        },
        ImageTokenScheme::Placeholder => return Err(Error::config(
            &c.origin,
            "original LLaVA checkpoints mark images with the placeholder id -200, which has no embedding; \
                 convert to llava-hf or NeVA to train it (shardsmith convert)",
        )),
    })
}

/// [`image_tokens_of`], and original LLaVA's placeholder (inference: generate, evaluate,
/// validate).
pub fn prompt_image_tokens_of(c: &CanonicalLlava) -> Result<ImageTokens> {
    match c.image_tokens {
        ImageTokenScheme::Placeholder => Ok(ImageTokens::Placeholder),
        _ => image_tokens_of(c),
    }
}

/// A vision-language model from its canonical parts.
fn vision_language(
    c: &CanonicalLlava,
    family: &'static str,
    tp: usize,
    o: &LoadOptions,
) -> Result<(Model, ModelInfo)> {
    let path = c.origin.clone();
    let tokens = prompt_image_tokens_of(c)?;
    if c.vision.is_empty() {
        return Err(Error::config(
            &path,
            "the vision tower's weights are not available (pass --vision CLIP_DIR)",
        ));
    }
    // The tower's config is checked before the LLM's weights are loaded onto the device, and
    // the feature layer here, where the file can be named, not at the first image.
    let vcfg = ClipVisionConfig::from_json(&c.vision_config, &path)?;
    shardsmith_converters::convert::clip::check_feature_layer(
        c.vision_feature_layer,
        &c.vision_config,
        "vision feature layer (vision_feature_layer / mm_vision_select_layer / vision_select_layer)",
        &path,
    )?;
    let llm = ParallelLlama::load(&c.llm, tp, o.dtype, &o.device)?;
    let vb = TensorMapBackend::new(c.vision.clone(), &path).into_var_builder(o.dtype, &o.device);
    let vision = ClipVisionModel::load(vb, &vcfg)?;
    let kind = ProjectorKind::parse(&c.projector_type)?;
    let vb = TensorMapBackend::new(c.projector.clone(), &path).into_var_builder(o.dtype, &o.device);
    let projector = Projector::load(vb, kind, vcfg.hidden_size, c.llm.hparams.hidden)?;
    let grid = vcfg.image_size / vcfg.patch_size;
    let n = grid * grid + usize::from(!c.drop_cls);
    let preprocessor = match &c.preprocessor {
        Some(bytes) => Some(
            serde_json::from_slice(&bytes.bytes()?)
                .map_err(|e| Error::config(&path, format!("preprocessor_config.json: {e}")))?,
        ),
        None => None,
    };
    // An original LLaVA's references come from its llava-hf form, whose <image> is the first id
    // after the tokenizer's pieces (what `convert` gives it).
    let source_image_token = match tokens {
        ImageTokens::Placeholder => c.sentencepiece()?.map(|sp| sp.len() as u32),
        _ => c.converted_from.as_ref().and_then(|f| f.image_token_index),
    };
    let info = ModelInfo {
        family,
        path,
        tp,
        image_size: Some(vcfg.image_size),
        image_tokens: Some(n),
        template: c.template.map(|t| t.name().to_string()),
        aspect: c.image_aspect_ratio.clone(),
        preprocessor,
        source_image_token,
    };
    let model = Neva::new(llm, vision, projector, c.vision_feature_layer, c.drop_cls, tokens);
    Ok((Model::Neva(Box::new(model)), info))
}

/// Open `path` (any format the converters crate reads) and build the model it holds.
pub fn load(path: &Path, o: &LoadOptions) -> Result<(Model, ModelInfo)> {
    let ckpt = shardsmith_converters::formats::open(path)?;
    load_checkpoint(&ckpt, o)
}

/// Whether `--vision CLIP_DIR` means anything for `ckpt`: a NeVA `.nemo` or an original LLaVA
/// directory, whose vision tower may be only named ([`tower::with_tower`]). A llava-hf directory
/// bundles its tower and a LLaMA has none; [`load_checkpoint`] ignores the option for those.
pub fn takes_vision_option(ckpt: &Checkpoint) -> bool {
    match (&ckpt.meta.flavour, &ckpt.meta.config) {
        (Flavour::Nemo { .. }, Some(ModelConfig::NemoYaml(cfg))) => neva_convert::is_neva(cfg),
        (_, Some(ModelConfig::HfJson(cfg))) => llava::is_llava_original(cfg),
        _ => false,
    }
}

/// A usage error when `--vision` was given but none of `ckpts` takes it (see
/// [`takes_vision_option`]), rather than a tower silently left unused.
pub fn check_vision_option(vision: Option<&Path>, ckpts: &[&Checkpoint]) -> Result<()> {
    match vision {
        Some(dir) if !ckpts.iter().any(|c| takes_vision_option(c)) => {
            let names: Vec<String> = ckpts.iter().map(|c| c.meta.path.display().to_string()).collect();
            Err(Error::Usage(format!(
                "--vision {}: {} takes no vision tower from outside (a llava-hf directory bundles its own, \
                 a LLaMA has none, a CLIP checkpoint is one); --vision is for a NeVA .nemo or an original LLaVA directory that only names its tower",
                dir.display(),
                names.join(" nor ")
            )))
        }
        _ => Ok(()),
    }
}

/// Build the model a checkpoint holds.
pub fn load_checkpoint(ckpt: &Checkpoint, o: &LoadOptions) -> Result<(Model, ModelInfo)> {
    let path = ckpt.meta.path.clone();
    let stored_tp = ckpt.saved_parallelism()?.tp;
    match (&ckpt.meta.flavour, &ckpt.meta.config) {
        (Flavour::Nemo { .. }, Some(ModelConfig::NemoYaml(cfg))) if neva_convert::is_neva(cfg) => {
            let c = tower::with_tower(ckpt, o.vision.as_deref())?;
            let tp = o.tp.unwrap_or(stored_tp);
            vision_language(&c, "neva", tp, o)
        }
        (Flavour::Nemo { .. }, _) => {
            let c = llama_convert::from_nemo(ckpt, None)?;
            let tp = o.tp.unwrap_or(stored_tp);
            let llm = ParallelLlama::load(&c, tp, o.dtype, &o.device)?;
            Ok((Model::Llama(llm), ModelInfo::text("llama", path, tp)))
        }
        (_, Some(ModelConfig::HfJson(cfg))) if llava::is_llava_hf(cfg) => {
            // Its tower is bundled; `--vision` does not apply ([`takes_vision_option`]: the
            // commands refuse it where no checkpoint takes it; `validate --against` loads both
            // sides with the same options).
            let c = llava::from_llava_hf(ckpt)?;
            vision_language(&c, "llava", o.tp.unwrap_or(1), o)
        }
        (_, Some(ModelConfig::HfJson(cfg))) if llava::is_llava_original(cfg) => {
            let c = tower::with_tower(ckpt, o.vision.as_deref())?;
            vision_language(&c, "llava", o.tp.unwrap_or(1), o)
        }
        (_, Some(ModelConfig::HfJson(_))) => {
            let c = llama_convert::from_hf(ckpt)?;
            let tp = o.tp.unwrap_or(1);
            let llm = ParallelLlama::load(&c, tp, o.dtype, &o.device)?;
            Ok((Model::Llama(llm), ModelInfo::text("llama", path, tp)))
        }
        _ => Err(Error::config(
            &path,
            "no model config found (expected an HF config.json or a .nemo model_config.yaml)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardsmith_converters::convert::clip::read_hf_clip;

    /// Original LLaVA's placeholder runs in inference and is refused for training, by name.
    #[test]
    fn original_llava_placeholder_is_for_inference_only() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
        let ckpt = shardsmith_converters::formats::open(&fixtures.join("llava-orig-tiny")).unwrap();
        let tower = read_hf_clip(&fixtures.join("llava-tiny-clip")).unwrap();
        let c = llava::from_llava_original(&ckpt, Some(tower)).unwrap();
        assert_eq!(prompt_image_tokens_of(&c).unwrap(), ImageTokens::Placeholder);
        let err = image_tokens_of(&c).unwrap_err().to_string();
        assert!(err.contains("placeholder id -200") && err.contains("to train it"), "{err}");
    }
}
