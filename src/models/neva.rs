//! NeVA / LLaVA assembly: CLIP vision features → projector → written over the image-token
//! positions of the LLaMA embeddings (formats.md §6.5–§6.6).
//!
//! Only the prefill carries pixels; decode steps are plain text (as in transformers' and
//! NeMo's generation), so an image id produced later is embedded as the token it is.

use crate::models::clip::ClipVisionModel;
use crate::models::llama::LlamaOutput;
use crate::models::projector::Projector;
use crate::models::tp::{ImageSpan, ParallelLlama};
use crate::{Error, Result};
use candle_core::Tensor;

/// The id an original-LLaVA image position holds in a prompt ([`ImageTokens::Placeholder`]).
pub const PLACEHOLDER_ID: u32 = u32::MAX;

/// How a prompt marks where image features go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageTokens {
    /// Original LLaVA: `<image>` is no token but the placeholder −200 (`IMAGE_TOKEN_INDEX`),
    /// which no vocabulary row stands for; here its N positions hold [`PLACEHOLDER_ID`], outside
    /// every vocabulary, and are embedded as token 0 before the features overwrite them.
    Placeholder,
    /// llava-hf: N copies of one id (`image_token_index`), each taking the next feature row.
    Repeated {
        /// The image token id.
        id: u32,
    },
    /// NeVA: `<extra_id_4>` start … `<extra_id_5>` end. Without `keep_markers`
    /// (`use_im_start_end: false`) the N positions start…end inclusive are overwritten; with it
    /// the N positions between the markers are.
    NevaSpan {
        /// `<extra_id_4>`.
        start_id: u32,
        /// `<extra_id_3>`, the patch placeholder.
        patch_id: u32,
        /// `<extra_id_5>`.
        end_id: u32,
        /// `use_im_start_end`.
        keep_markers: bool,
    },
}

impl ImageTokens {
    /// The token run that stands for one image of `n` features in a prompt.
    pub fn expand(&self, n: usize) -> Vec<u32> {
        match *self {
            ImageTokens::Repeated { id } => vec![id; n],
            ImageTokens::Placeholder => vec![PLACEHOLDER_ID; n],
            ImageTokens::NevaSpan { start_id, patch_id, end_id, keep_markers } => {
                let patches = if keep_markers { n } else { n.saturating_sub(2) };
                let mut run = vec![start_id];
                run.extend(std::iter::repeat_n(patch_id, patches));
                run.push(end_id);
                run
            }
        }
    }

    /// Start positions of the image spans of length `n` in one sequence, in order.
    pub fn spans(&self, ids: &[u32], n: usize) -> Result<Vec<usize>> {
        match *self {
            ImageTokens::Placeholder => ImageTokens::Repeated { id: PLACEHOLDER_ID }.spans(ids, n),
            ImageTokens::Repeated { id } => {
                let positions: Vec<usize> = ids.iter().enumerate().filter(|(_, &t)| t == id).map(|(i, _)| i).collect();
                if !positions.len().is_multiple_of(n) {
                    return Err(Error::Usage(format!(
                        "the prompt has {} image tokens (id {id}); each image needs exactly {n}",
                        positions.len()
                    )));
                }
                positions
                    .chunks(n)
                    .map(|run| {
                        if run[n - 1] - run[0] + 1 != n {
                            return Err(Error::Usage(format!(
                                "image tokens (id {id}) from position {} are not {n} consecutive positions",
                                run[0]
                            )));
                        }
                        Ok(run[0])
                    })
                    .collect()
            }
            ImageTokens::NevaSpan { start_id, end_id, keep_markers, .. } => ids
                .iter()
                .enumerate()
                .filter(|(_, &t)| t == end_id)
                .map(|(end, _)| {
                    let (marker, first) = if keep_markers {
                        (end.checked_sub(n + 1), end.checked_sub(n))
                    } else {
                        (end.checked_sub(n - 1), end.checked_sub(n - 1))
                    };
                    match (marker, first) {
                        (Some(m), Some(f)) if ids[m] == start_id => Ok(f),
                        _ => Err(Error::Usage(format!(
                            "image end token {end_id} at position {end} is not preceded by its start token {start_id} {} positions earlier",
                            if keep_markers { n + 1 } else { n - 1 }
                        ))),
                    }
                })
                .collect(),
        }
    }
}

/// A vision-language model: vision tower + projector + a (tensor-parallel) LLaMA.
pub struct Neva {
    /// The language model.
    pub llm: ParallelLlama,
    vision: ClipVisionModel,
    projector: Projector,
    /// `vision_select_layer` / `vision_feature_layer` (−2).
    select_layer: isize,
    /// Drop the CLS token (`class_token_length` 1 / strategy `default`).
    drop_cls: bool,
    tokens: ImageTokens,
}

impl Neva {
    /// Assemble the parts.
    pub fn new(
        llm: ParallelLlama,
        vision: ClipVisionModel,
        projector: Projector,
        select_layer: isize,
        drop_cls: bool,
        tokens: ImageTokens,
    ) -> Self {
        Neva { llm, vision, projector, select_layer, drop_cls, tokens }
    }

    /// How prompts mark image positions.
    pub fn image_tokens(&self) -> ImageTokens {
        self.tokens
    }

    /// pixel_values [I, 3, S, S] → projected features [I, N, H] in the LLM's dtype.
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let patches = self.vision.features(pixel_values, self.select_layer, self.drop_cls)?; // [I, N, C]
                                                                                             // The projector may hold f32 masters over a bf16 LLM (training on CUDA).
        let dtype = self.projector.dtype().unwrap_or(self.llm.dtype());
        let projected = self.projector.forward(&patches.to_dtype(dtype)?)?;
        Ok(projected.to_dtype(self.llm.dtype())?)
    }

    /// ids [B, T] after the cached tokens; with `pixel_values` [I, 3, S, S] the I images fill the
    /// prompt's image spans in order (across the batch, row by row).
    pub fn forward(
        &mut self,
        ids: &Tensor,
        pixel_values: Option<&Tensor>,
        last_only: bool,
        hidden_states: bool,
    ) -> Result<LlamaOutput> {
        let Some(pixels) = pixel_values else {
            return self.llm.forward(ids, &[], last_only, hidden_states);
        };
        let features = self.image_features(pixels)?; // [I, N, H]
        let (images, n, _) = features.dims3()?;
        let mut spans = Vec::new();
        for (batch, row) in ids.to_vec2::<u32>()?.iter().enumerate() {
            for start in self.tokens.spans(row, n)? {
                let image = spans.len();
                if image >= images {
                    return Err(Error::Usage(format!(
                        "the prompt has more image spans than the {images} image(s) given"
                    )));
                }
                spans.push(ImageSpan { batch, start, features: features.get(image)? });
            }
        }
        if spans.len() != images {
            return Err(Error::Usage(format!(
                "{images} image(s) given but the prompt has {} image span(s) of {n} tokens",
                spans.len()
            )));
        }
        if self.tokens == ImageTokens::Placeholder {
            // The placeholder has no embedding row: embed token 0 there; the features replace it.
            let (b, t) = ids.dims2()?;
            let mut flat = ids.flatten_all()?.to_vec1::<u32>()?;
            flat.iter_mut().filter(|id| **id == PLACEHOLDER_ID).for_each(|id| *id = 0);
            let ids = Tensor::from_vec(flat, (b, t), ids.device())?;
            return self.llm.forward(&ids, &spans, last_only, hidden_states);
        }
        self.llm.forward(ids, &spans, last_only, hidden_states)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_image_tokens_make_consecutive_spans() {
        let t = ImageTokens::Repeated { id: 9 };
        assert_eq!(t.spans(&[1, 9, 9, 9, 4, 9, 9, 9], 3).unwrap(), vec![1, 5]);
        assert!(t.spans(&[1, 9, 9, 4, 9], 3).unwrap_err().to_string().contains("consecutive"));
        assert!(t.spans(&[1, 9, 9], 3).unwrap_err().to_string().contains("2 image tokens"));
    }

    #[test]
    fn neva_spans_follow_use_im_start_end() {
        // N = 4: start, patch, patch, end → positions 1..=4 overwritten.
        let t = ImageTokens::NevaSpan { start_id: 4, patch_id: 3, end_id: 5, keep_markers: false };
        assert_eq!(t.expand(4), vec![4, 3, 3, 5]);
        assert_eq!(t.spans(&[1, 4, 3, 3, 5, 7], 4).unwrap(), vec![1]);
        // With markers kept: start, 4 patches, end → positions 2..=5.
        let t = ImageTokens::NevaSpan { start_id: 4, patch_id: 3, end_id: 5, keep_markers: true };
        assert_eq!(t.expand(4), vec![4, 3, 3, 3, 3, 5]);
        assert_eq!(t.spans(&[1, 4, 3, 3, 3, 3, 5], 4).unwrap(), vec![2]);
        assert!(t.spans(&[1, 3, 3, 3, 3, 3, 5], 4).is_err());
    }
}
