//! The candle models. Each loads by canonical (HF) tensor name through a `VarBuilder`
//! ([`crate::weights`]), so any checkpoint format the converters crate reads can feed it.

pub mod clip;
pub mod llama;
pub mod neva;
pub mod projector;
pub mod tp;

use crate::weights::TensorMapBackend;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use clip::{ClipVisionConfig, ClipVisionModel};
use llama::LlamaOutput;
use neva::{ImageTokens, Neva};
use projector::{Projector, ProjectorKind};
use shardsmith_converters::convert::{llama as llama_convert, llava};
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
}

/// A loaded model of any supported family.
pub enum Model {
    /// A text-only LLaMA-2.
    Llama(ParallelLlama),
    /// A vision-language model (llava-hf, NeVA).
    Neva(Neva),
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

/// Open `path` (any format the converters crate reads) and build the model it holds.
pub fn load(path: &Path, o: &LoadOptions) -> Result<(Model, ModelInfo)> {
    let ckpt = shardsmith_converters::formats::open(path)?;
    load_checkpoint(&ckpt, o)
}

/// Build the model a checkpoint holds.
pub fn load_checkpoint(ckpt: &Checkpoint, o: &LoadOptions) -> Result<(Model, ModelInfo)> {
    let path = ckpt.meta.path.clone();
    let stored_tp = ckpt.meta.parallel.tp;
    match (&ckpt.meta.flavour, &ckpt.meta.config) {
        (Flavour::Nemo { .. }, _) => {
            let c = llama_convert::from_nemo(ckpt, None)?;
            let tp = o.tp.unwrap_or(stored_tp);
            let llm = ParallelLlama::load(&c, tp, o.dtype, &o.device)?;
            let info = ModelInfo { family: "llama", path, tp, image_size: None, image_tokens: None };
            Ok((Model::Llama(llm), info))
        }
        (_, Some(ModelConfig::HfJson(cfg))) if llava::is_llava_hf(cfg) => {
            let c = llava::from_llava_hf(ckpt)?;
            let tp = o.tp.unwrap_or(1);
            let llm = ParallelLlama::load(&c.llm, tp, o.dtype, &o.device)?;
            let vcfg = ClipVisionConfig::from_json(&c.vision_config, &path)?;
            let vb = TensorMapBackend::new(c.vision.clone(), &path).into_var_builder(o.dtype, &o.device);
            let vision = ClipVisionModel::load(vb, &vcfg)?;
            let kind = ProjectorKind::parse(&c.projector_type)?;
            let vb = TensorMapBackend::new(c.projector.clone(), &path).into_var_builder(o.dtype, &o.device);
            let projector = Projector::load(vb, kind, vcfg.hidden_size, c.llm.hparams.hidden)?;
            let grid = vcfg.image_size / vcfg.patch_size;
            let n = grid * grid + usize::from(!c.drop_cls);
            let info = ModelInfo {
                family: "llava",
                path,
                tp,
                image_size: Some(vcfg.image_size),
                image_tokens: Some(n),
            };
            let tokens = ImageTokens::Repeated { id: c.image_token };
            let model = Neva::new(llm, vision, projector, c.vision_feature_layer, c.drop_cls, tokens);
            Ok((Model::Neva(model), info))
        }
        (_, Some(ModelConfig::HfJson(_))) => {
            let c = llama_convert::from_hf(ckpt)?;
            let tp = o.tp.unwrap_or(1);
            let llm = ParallelLlama::load(&c, tp, o.dtype, &o.device)?;
            Ok((
                Model::Llama(llm),
                ModelInfo { family: "llama", path, tp, image_size: None, image_tokens: None },
            ))
        }
        _ => Err(Error::config(
            &path,
            "no model config found (expected an HF config.json or a .nemo model_config.yaml)",
        )),
    }
}
