//! The generation loop: prefill the prompt (with its image), then one token at a time through the
//! KV cache, sampling each next token and streaming its text.

use crate::infer::sampling::Sampler;
use crate::infer::tokenizer::Tokenizer;
use crate::models::Model;
use crate::Result;
use candle_core::Tensor;
use std::time::Instant;

/// What one generation produced.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Generation {
    /// The prompt's token ids.
    pub prompt_ids: Vec<u32>,
    /// The generated ids (the stop token included when it was produced).
    pub new_ids: Vec<u32>,
    /// The generated text (special tokens skipped).
    pub text: String,
    /// Whether generation ended at the stop token.
    pub stopped_at_eos: bool,
    /// Seconds for the prompt forward pass.
    pub prefill_s: f64,
    /// Seconds for the remaining steps.
    pub decode_s: f64,
}

impl Generation {
    /// Decode speed in tokens per second (the prefill token excluded).
    pub fn tokens_per_s(&self) -> f64 {
        let steps = self.new_ids.len().saturating_sub(1);
        if steps == 0 || self.decode_s == 0.0 {
            0.0
        } else {
            steps as f64 / self.decode_s
        }
    }
}

/// When generation stops.
#[derive(Clone, Copy, Debug)]
pub struct Stop {
    /// Most new tokens.
    pub max_new_tokens: usize,
    /// The end-of-sequence id (generation ends after producing it).
    pub eos: Option<u32>,
}

/// The most new positions reserved before decoding: LLaMA-2's context length.
const UPFRONT_NEW_TOKENS: usize = 4096;

/// Generate after `prompt` (with `pixels` for a vision model's image) until `stop`; every new
/// piece of text is passed to `on_text` as soon as it is known.
pub fn generate(
    model: &mut Model,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    pixels: Option<&Tensor>,
    sampler: &mut Sampler,
    stop: Stop,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    let Stop { max_new_tokens, eos } = stop;
    let device = model.llm().device().clone();
    model.llm().reset();
    // The whole sequence's KV cache at once: decode steps write into it in place. A budget past
    // LLaMA-2's context ("until end of sequence") reserves that much; the cache doubles beyond.
    let expected_new = max_new_tokens.min(UPFRONT_NEW_TOKENS);
    model.llm().reserve(prompt.len() + expected_new);
    let pixels = pixels.map(|p| p.to_device(&device)).transpose()?;
    let pixels = pixels.as_ref();
    let mut stream = tokenizer.stream(true);
    let mut text = String::new();
    let mut new_ids = Vec::with_capacity(expected_new);
    let ids = Tensor::from_slice(prompt, (1, prompt.len()), &device)?;
    let t0 = Instant::now();
    let mut logits = model.forward(&ids, pixels, true, false)?.logits; // [1, 1, V]
    let prefill_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut stopped_at_eos = false;
    while new_ids.len() < max_new_tokens {
        // Rows past the tokenizer's ids (vocabulary padding, or a tokenizer smaller than the
        // embedding) stand for no text: never sampled, as NeMo's generation masks them.
        let scores = logits.flatten_all()?.to_vec1::<f32>()?;
        let next = sampler.sample(&scores[..tokenizer.vocab_size().clamp(1, scores.len())])?;
        new_ids.push(next);
        if Some(next) == eos {
            stopped_at_eos = true;
            break;
        }
        let piece = stream.next_token(next)?;
        on_text(&piece);
        text.push_str(&piece);
        if new_ids.len() == max_new_tokens {
            break;
        }
        let step = Tensor::new(&[[next]], &device)?;
        logits = model.forward(&step, None, true, false)?.logits;
    }
    let tail = stream.finish()?;
    on_text(&tail);
    text.push_str(&tail);
    Ok(Generation {
        prompt_ids: prompt.to_vec(),
        new_ids,
        text,
        stopped_at_eos,
        prefill_s,
        decode_s: t1.elapsed().as_secs_f64(),
    })
}
