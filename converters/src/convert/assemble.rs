//! Assemble a NeVA starting checkpoint from its parts: an HF LLaMA (or LLaMA `.nemo`), an HF CLIP
//! vision tower, and a projector that is either LLaVA's pre-training output (`mm_projector.bin`
//! or a safetensors file with `model.mm_projector.*` keys) or freshly initialised from a seed
//! ([`super::init`]). The result is a [`CanonicalLlava`] that [`super::neva::to_neva`] writes:
//! it appends NeVA's `<extra_id_0..7>` to the tokenizer and grows the embedding and head by the
//! mean rule ([`super::vocab`]).

use crate::checkpoint::{ByteSource, Checkpoint, Flavour, ModelConfig, TensorMap};
use crate::convert::clip::ClipVision;
use crate::convert::init;
use crate::convert::llama;
use crate::convert::llava::{self, CanonicalLlava, ImageTokenScheme, VisionSource};
use crate::convert::tokenizer;
use crate::error::{Error, Result};
use crate::formats;
use crate::names::neva::{self as names, ProjectorType, Template};
use crate::DType;
use std::path::Path;

/// Where the projector comes from.
#[derive(Clone, Debug)]
pub enum ProjectorSource {
    /// Freshly initialised from this seed (PyTorch `nn.Linear` default distribution).
    Seed(u64),
    /// A file holding LLaVA projector weights (`mm_projector.bin`, `.safetensors`, `.pt`).
    File(std::path::PathBuf),
}

/// What [`assemble`] needs besides the parts.
#[derive(Clone, Debug)]
pub struct AssembleOptions {
    /// Projector architecture (with a file: checked against the file's tensors; default there is
    /// what the file holds, otherwise `mlp2x_gelu`).
    pub projector_type: Option<ProjectorType>,
    /// Conversation template.
    pub template: Template,
    /// `vision_feature_layer` / `vision_select_layer`.
    pub select_layer: isize,
    /// `image_aspect_ratio`.
    pub image_aspect_ratio: String,
    /// A SentencePiece model to use instead of the LLM's.
    pub tokenizer: Option<ByteSource>,
}

impl Default for AssembleOptions {
    fn default() -> Self {
        AssembleOptions {
            projector_type: None,
            template: Template::VicunaV1,
            select_layer: -2,
            image_aspect_ratio: "pad".into(),
            tokenizer: None,
        }
    }
}

/// Read projector weights from a file, under LLaVA's names (`model.mm_projector.*`, as LLaVA's
/// pre-training stage saves them, or bare `mm_projector.*`). Anything else in the file is an
/// error naming it.
pub fn read_projector_file(path: &Path) -> Result<TensorMap> {
    let ckpt = formats::open(path)?;
    let mut out = TensorMap::new();
    let mut other = Vec::new();
    for (name, t) in ckpt.tensors()? {
        match names::llava_projector_canonical(name) {
            Some(c) => {
                out.insert(c, t.clone());
            }
            None => other.push(name.clone()),
        }
    }
    if !other.is_empty() {
        return Err(Error::invalid(
            path,
            format!(
                "tensors that are not LLaVA projector weights (model.mm_projector.*): {}",
                other.join(", ")
            ),
        ));
    }
    if out.is_empty() {
        return Err(Error::missing(path, "projector tensors (model.mm_projector.*)"));
    }
    Ok(out)
}

/// The LLM, tokenizer and parts → a bundle ready for [`super::neva::to_neva`].
pub fn assemble(
    llm_ckpt: &Checkpoint,
    vision: ClipVision,
    projector: &ProjectorSource,
    o: &AssembleOptions,
) -> Result<CanonicalLlava> {
    let path = &llm_ckpt.meta.path;
    let (llm, tokenizer) = match (&llm_ckpt.meta.flavour, &llm_ckpt.meta.config) {
        (Flavour::Nemo { .. }, Some(ModelConfig::NemoYaml(cfg))) => (
            llama::from_nemo(llm_ckpt, None)?,
            // A tokenizer given instead makes the archive's irrelevant, even a missing one.
            match &o.tokenizer {
                Some(_) => None,
                None => tokenizer::nemo_tokenizer_model(llm_ckpt, cfg)?.map(|a| a.source.clone()),
            },
        ),
        _ => {
            let llm = llama::from_hf(llm_ckpt)?;
            // Tokens HF added after the pieces keep their ids as user-defined pieces; llava-hf's
            // <image> and <pad> give their rows to NeVA's first <extra_id_*>, as convert does.
            let tokenizer = match llm_ckpt.meta.artifacts.iter().find(|a| a.name == "tokenizer.model") {
                Some(a) if o.tokenizer.is_none() => Some(
                    tokenizer::sentencepiece_with_hf_added(
                        llm_ckpt,
                        a,
                        llm.hparams.vocab,
                        &tokenizer::LLAVA_HF_TOKENS,
                    )?
                    .source,
                ),
                a => a.map(|a| a.source.clone()),
            };
            (llm, tokenizer)
        }
    };
    let width = vision
        .config
        .get("hidden_size")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| Error::missing(&vision.origin, "CLIP config: 'hidden_size'"))?
        as usize;
    let hidden = llm.hparams.hidden;
    let dtype = llm.tensors.get("model.embed_tokens.weight").map_or(DType::F32, |t| t.dtype);
    let (kind, projector, origin) = match projector {
        ProjectorSource::Seed(seed) => {
            let kind = o.projector_type.unwrap_or(ProjectorType::MlpGelu { depth: 2 });
            (kind, init::init_projector(kind, width, hidden, *seed, dtype), path.as_path())
        }
        ProjectorSource::File(file) => {
            let found = read_projector_file(file)?;
            let kind = llava::projector_type_of(&found, file)?;
            if let Some(want) = o.projector_type.filter(|w| *w != kind) {
                return Err(Error::invalid(
                    file,
                    format!(
                        "--projector-type {} but the file holds a {} projector",
                        want.name(),
                        kind.name()
                    ),
                ));
            }
            (kind, found, file.as_path())
        }
    };
    let projector = llava::check_projector(kind, width, hidden, projector, origin)?;
    let (llm_tokenizer_json, tokenizer_config) = tokenizer::hf_tokenizer_files(llm_ckpt);
    Ok(CanonicalLlava {
        llm,
        vision: vision.tensors,
        vision_config: vision.config,
        projector,
        projector_type: kind.name(),
        image_token: u32::MAX,
        vision_feature_layer: o.select_layer,
        drop_cls: true,
        origin: path.clone(),
        vision_source: VisionSource::Directory(vision.origin),
        image_tokens: ImageTokenScheme::Placeholder,
        image_aspect_ratio: Some(o.image_aspect_ratio.clone()),
        template: Some(o.template),
        tokenizer: o.tokenizer.clone().or(tokenizer),
        // Written back only while it describes the tokenizer (`--tokenizer` may be another).
        tokenizer_json: llm_tokenizer_json,
        tokenizer_config,
        preprocessor: vision.preprocessor,
        converted_from: None,
    })
}
