//! `shardsmith generate CKPT --prompt TEXT [--image PATH]`: chat-templated generation with the
//! KV cache, tokens streamed to stdout, speed reported on stderr.

use crate::infer::generate::{generate, Generation, Stop};
use crate::infer::image::{preprocess_file, AspectMode, PreprocessConfig};
use crate::infer::sampling::Sampler;
use crate::infer::template::{self, Conversation, Flavour, Template, IMAGE_PLACEHOLDER};
use crate::infer::tokenizer::Tokenizer;
use crate::models::neva::ImageTokens;
use crate::models::{self, LoadOptions, Model, ModelInfo};
use anyhow::{bail, Result};
use candle_core::{DType, Device};
use shardsmith_converters::convert::tokenizer::require_nemo_tokenizer_model;
use shardsmith_converters::{Checkpoint, Flavour as FileFlavour, ModelConfig};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Everything `generate` takes besides the checkpoint.
pub struct Options {
    /// The user's message.
    pub prompt: String,
    /// An image for a vision model.
    pub image: Option<PathBuf>,
    /// Chat template name, or `raw` for the prompt as given (default: `vicuna_v1` for vision
    /// models, `raw` for text models).
    pub template: Option<String>,
    /// `llava` or `nemo` spelling of the template (default: from the checkpoint format).
    pub flavour: Option<String>,
    /// System prompt (`None`: the template's; empty: none).
    pub system: Option<String>,
    /// Image aspect handling: `pad` (LLaVA-1.5, default), `square`, `keep`.
    pub aspect: Option<String>,
    /// Tokenizer file or directory (default: the checkpoint's).
    pub tokenizer: Option<PathBuf>,
    /// HF CLIP directory for a vision tower the checkpoint only references by name.
    pub vision: Option<PathBuf>,
    /// Tokens to generate at most.
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    /// Nucleus sampling mass.
    pub top_p: Option<f64>,
    /// Sampling seed.
    pub seed: u64,
    /// Simulated tensor-parallel size.
    pub tp: Option<usize>,
    /// Compute dtype.
    pub dtype: DType,
    /// Where the model runs.
    pub device: Device,
    /// Print one JSON object (ids, text, timings) instead of streaming text.
    pub json: bool,
}

/// The tokenizer a checkpoint carries: `tokenizer.json`/`tokenizer.model` beside HF weights, or
/// the SentencePiece artifact a `.nemo` references.
fn checkpoint_tokenizer(ckpt: &Checkpoint) -> Result<Tokenizer> {
    if let (FileFlavour::Nemo { .. }, Some(ModelConfig::NemoYaml(cfg))) =
        (&ckpt.meta.flavour, &ckpt.meta.config)
    {
        let artifact = require_nemo_tokenizer_model(ckpt, cfg)?;
        return Ok(Tokenizer::from_sentencepiece_bytes(
            &artifact.source.bytes()?,
            ckpt.meta.path.join(&artifact.name),
        )?);
    }
    let dir =
        if ckpt.meta.path.is_dir() { ckpt.meta.path.clone() } else { ckpt.meta.path.with_file_name("") };
    Ok(Tokenizer::from_dir(&dir)?)
}

/// A loaded model with everything needed to turn a user message (and image) into prompt ids.
pub struct Chat {
    /// The model.
    pub model: Model,
    /// What the loader found out about it.
    pub info: ModelInfo,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    flavour: Flavour,
    template_name: String,
    system: Option<String>,
    aspect: Option<String>,
    path: PathBuf,
}

impl Chat {
    /// Load the checkpoint and its tokenizer, and settle the template and flavour.
    pub fn open(path: &Path, o: &Options) -> Result<Self> {
        let path = crate::hub::resolve(path)?;
        let ckpt = shardsmith_converters::formats::open(&path)?;
        models::check_vision_option(o.vision.as_deref(), &[&ckpt])?;
        let (model, info) = models::load_checkpoint(
            &ckpt,
            &LoadOptions { tp: o.tp, dtype: o.dtype, device: o.device.clone(), vision: o.vision.clone() },
        )?;
        let tokenizer = match &o.tokenizer {
            Some(p) if p.is_dir() => Tokenizer::from_dir(p)?,
            Some(p) => Tokenizer::from_file(p)?,
            None => checkpoint_tokenizer(&ckpt)?,
        };
        let is_nemo = matches!(ckpt.meta.flavour, FileFlavour::Nemo { .. });
        let flavour = match &o.flavour {
            Some(f) => Flavour::parse(f)?,
            None if is_nemo => Flavour::Nemo,
            None => Flavour::Llava,
        };
        let vision = matches!(model, Model::Neva(_));
        let template_name = o.template.clone().or(info.template.clone()).unwrap_or_else(|| {
            if vision {
                "vicuna_v1".into()
            } else {
                "raw".into()
            }
        });
        Ok(Chat {
            model,
            info,
            tokenizer,
            flavour,
            template_name,
            system: o.system.clone(),
            aspect: o.aspect.clone(),
            path,
        })
    }

    /// The template in use (`raw`: none).
    pub fn template_name(&self) -> &str {
        &self.template_name
    }

    /// The prompt for one user message, and the image's pixel values. `system` replaces the
    /// chat's system prompt (a record's own, in evaluation).
    pub fn prompt(&self, message: &str, image: Option<&Path>, system: Option<&str>) -> Result<Prompt> {
        let vision = matches!(self.model, Model::Neva(_));
        if image.is_some() && !vision {
            bail!(
                "{} is a text-only model; --image needs a vision model (llava-hf or NeVA)",
                self.path.display()
            );
        }
        let mut user = message.to_string();
        if image.is_some() && !user.contains(IMAGE_PLACEHOLDER) {
            user = format!("{IMAGE_PLACEHOLDER}\n{user}");
        }
        let (text, template) = if self.template_name == "raw" {
            (user, None)
        } else {
            let t = Template::parse(&self.template_name)?;
            let system = system.map(str::to_owned).or_else(|| self.system.clone());
            let conv = Conversation { system, ..Conversation::single(user) };
            (t.generation_prompt(&conv, self.flavour)?, Some(t))
        };
        let image_tokens = match (&self.model, self.info.image_tokens) {
            (Model::Neva(neva), Some(n)) => Some(match neva.image_tokens() {
                ImageTokens::Repeated { id } => template::ImageTokens::LlavaHf { image_token_id: id, n },
                ImageTokens::Placeholder => {
                    template::ImageTokens::Llava { placeholder_id: crate::models::neva::PLACEHOLDER_ID, n }
                }
                ImageTokens::NevaSpan { keep_markers, .. } => {
                    template::ImageTokens::Neva { n, use_im_start_end: keep_markers }
                }
            }),
            _ => None,
        };
        let images = image.and(image_tokens.as_ref());
        // Raw prompts use Plain only for its (absent) id remapping: the tokenizer's own BOS rule
        // for HF, none for NeMo (its text_to_ids).
        let ids = template::tokenize_prompt(
            &self.tokenizer,
            &text,
            template.unwrap_or(Template::Plain),
            self.flavour,
            images,
        )?
        .ids;
        let pixels = match image {
            Some(img) => {
                let side = self.info.image_size.unwrap_or(336);
                let path = &self.path;
                let dir = if path.is_dir() { path.clone() } else { path.with_file_name("") };
                let cfg = match &self.info.preprocessor {
                    // A directory's own file; a .nemo's comes from its tower.
                    Some(json) if path.is_dir() => {
                        PreprocessConfig::from_json(json, &path.join("preprocessor_config.json"))?
                    }
                    Some(json) => PreprocessConfig::from_json(json, path)?,
                    None if dir.join("preprocessor_config.json").is_file() => {
                        PreprocessConfig::from_dir(&dir)?
                    }
                    None => PreprocessConfig::clip_with_size(side as u32),
                };
                let mode = AspectMode::parse(
                    self.aspect.as_deref().or(self.info.aspect.as_deref()).unwrap_or("pad"),
                )?;
                cfg.check_tower_size(side as u32, mode, path)?;
                Some(preprocess_file(img, &cfg, mode)?.to_tensor(&Device::Cpu)?)
            }
            None => None,
        };
        Ok(Prompt { text, ids, pixels })
    }

    /// The id generation stops at.
    pub fn eos(&mut self) -> Option<u32> {
        self.tokenizer.eos_id().or(self.model.llm().hparams().eos.map(|e| e as u32))
    }
}

/// One rendered prompt.
pub struct Prompt {
    /// The template's text, `<image>` where the image goes.
    pub text: String,
    /// Its token ids, the image's tokens expanded.
    pub ids: Vec<u32>,
    /// The preprocessed image, `[1, 3, side, side]`.
    pub pixels: Option<candle_core::Tensor>,
}

/// Run `generate`.
pub fn run(path: &Path, o: &Options) -> Result<()> {
    let mut chat = Chat::open(path, o)?;
    let Prompt { text: prompt_text, ids: prompt, pixels } =
        chat.prompt(&o.prompt, o.image.as_deref(), None)?;
    let template_name = chat.template_name().to_string();
    let eos = chat.eos();
    let Chat { model, tokenizer, .. } = &mut chat;
    let mut sampler = Sampler::new(o.temperature, o.top_p, o.seed)?;
    let stdout = std::io::stdout();
    let json = o.json;
    let out: Generation = generate(
        model,
        tokenizer,
        &prompt,
        pixels.as_ref(),
        &mut sampler,
        Stop { max_new_tokens: o.max_new_tokens, eos },
        |piece| {
            if !json {
                let mut lock = stdout.lock();
                let _ = lock.write_all(piece.as_bytes());
                let _ = lock.flush();
            }
        },
    )?;
    if json {
        let mut v = serde_json::to_value(&out)?;
        v["tokens_per_s"] = out.tokens_per_s().into();
        // Original LLaVA's image positions hold a placeholder no vocabulary row stands for:
        // shown as LLaVA spells it (IMAGE_TOKEN_INDEX, -200), not as our internal id.
        v["prompt_ids"] =
            out.prompt_ids
                .iter()
                .map(|&id| {
                    if id == crate::models::neva::PLACEHOLDER_ID {
                        serde_json::json!(-200)
                    } else {
                        id.into()
                    }
                })
                .collect();
        v["template"] = template_name.into();
        v["prompt"] = prompt_text.into();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!();
        eprintln!(
            "[{} prompt tokens in {:.2} s; {} new tokens, {:.1} tokens/s{}]",
            out.prompt_ids.len(),
            out.prefill_s,
            out.new_ids.len(),
            out.tokens_per_s(),
            if out.stopped_at_eos { "; stopped at EOS" } else { "" }
        );
    }
    Ok(())
}
