//! `validate`: run a checkpoint and compare it with reference outputs (golden files written by
//! HF transformers in `fixtures/gen/`), or with another checkpoint of the same model.
//!
//! Tolerance tiers (targets.md): an f32 run must keep max |Δlogit| ≤ 1e-4 × max |reference
//! logit|; a bf16 / f16 run must agree on the top-1 token at every position (its max |Δ| is
//! reported). Greedy continuations recorded in the reference must match token for token in f32.

use crate::models::{Model, ModelInfo};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, D};
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// f32 tier: max |Δ| relative to the reference's largest |logit|.
pub const F32_REL_TOL: f64 = 1e-4;

/// The comparison of one output tensor with its reference.
#[derive(Clone, Debug, Serialize)]
pub struct Compare {
    /// max |ours − reference|.
    pub max_abs: f64,
    /// `max_abs / max |reference|`.
    pub rel_to_max: f64,
    /// Cosine similarity of the flattened tensors.
    pub cosine: f64,
    /// Fraction of positions whose argmax over the last dimension agrees.
    pub top1_agreement: f64,
}

/// One validated input.
#[derive(Clone, Debug, Serialize)]
pub struct Case {
    /// Which input (`prompt 0`, `text`, …).
    pub name: String,
    /// Tokens in the prompt (images, for a vision tower).
    pub tokens: usize,
    /// Whether an image was part of the input.
    pub image: bool,
    /// Logits against the reference.
    pub logits: Compare,
    /// The first hidden state (0 = embeddings) whose relative difference exceeds the tier, if
    /// the reference has hidden states and one does.
    pub first_divergent_layer: Option<usize>,
    /// Relative difference per hidden state, where the reference has them.
    pub hidden_rel: Vec<f64>,
    /// Whether greedy decoding reproduced the reference continuation (`None`: none recorded or
    /// not checked in this dtype).
    pub greedy_match: Option<bool>,
    /// Whether this case meets its tier.
    pub passed: bool,
}

/// The whole validation.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The checkpoint run.
    pub checkpoint: PathBuf,
    /// The reference file or the other checkpoint.
    pub reference: PathBuf,
    /// `llama` or `llava`.
    pub family: String,
    /// Compute dtype.
    pub dtype: String,
    /// Tensor-parallel size it ran at.
    pub tp: usize,
    /// The tier applied.
    pub tier: String,
    /// Per input.
    pub cases: Vec<Case>,
    /// Projected image features against the reference's `image_features` (vision models).
    pub image_features: Option<Compare>,
    /// All cases passed.
    pub passed: bool,
}

/// The golden file for `reference`: a `.safetensors` file, or a fixture directory holding
/// `golden/golden.safetensors`.
pub fn golden_path(reference: &Path) -> Result<PathBuf> {
    let candidates = [
        reference.to_path_buf(),
        reference.join("golden/golden.safetensors"),
        reference.join("golden.safetensors"),
    ];
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        Error::config(reference, "no reference outputs here (expected a .safetensors golden file or a directory with golden/golden.safetensors)")
    })
}

/// Compare `ours` with `reference` (same shape; last dimension = classes for top-1).
pub fn compare(ours: &Tensor, reference: &Tensor) -> Result<Compare> {
    if ours.dims() != reference.dims() {
        return Err(Error::Usage(format!(
            "output shape {:?} differs from the reference's {:?}",
            ours.dims(),
            reference.dims()
        )));
    }
    let a = ours.to_dtype(DType::F64)?;
    let b = reference.to_dtype(DType::F64)?;
    let max_abs = (&a - &b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    let max_ref = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    let dot = (&a * &b)?.sum_all()?.to_scalar::<f64>()?;
    let na = a.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let nb = b.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let top_a = a.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?;
    let top_b = b.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?;
    let agree = top_a.iter().zip(&top_b).filter(|(x, y)| x == y).count();
    Ok(Compare {
        max_abs,
        rel_to_max: if max_ref > 0.0 { max_abs / max_ref } else { max_abs },
        cosine: if na > 0.0 && nb > 0.0 { dot / (na * nb) } else { 1.0 },
        top1_agreement: agree as f64 / top_a.len().max(1) as f64,
    })
}

/// Greedy continuation of `prompt` [1, T] for `steps` tokens with the KV cache, choosing among
/// the first `vocab` ids only (the reference's vocabulary).
pub fn greedy(
    model: &mut Model,
    prompt: &Tensor,
    pixels: Option<&Tensor>,
    steps: usize,
    vocab: usize,
) -> Result<Vec<u32>> {
    model.llm().reset();
    let mut out = Vec::with_capacity(steps);
    let mut logits = model.forward(prompt, pixels, true, false)?.logits;
    for step in 0..steps {
        let next = greedy_token(&logits, vocab)?;
        out.push(next);
        if step + 1 < steps {
            let ids = Tensor::new(&[[next]], prompt.device())?;
            logits = model.forward(&ids, None, true, false)?.logits;
        }
    }
    Ok(out)
}

/// The id of the largest of the last position's first `vocab` logits ([.., V'] with V' ≥ 1). Rows
/// past the reference's vocabulary (a NeMo embedding's padding to a multiple of 128·TP, zero or
/// random) stand for no token and are never chosen, as NeMo's own generation masks them; a
/// padded row scoring highest would otherwise end the comparison with a token the reference
/// cannot produce.
fn greedy_token(logits: &Tensor, vocab: usize) -> Result<u32> {
    let width = logits.dim(D::Minus1)?;
    let flat = logits.flatten_all()?;
    let last = flat.narrow(0, flat.dim(0)? - width, vocab.clamp(1, width))?;
    Ok(last.argmax(0)?.to_scalar::<u32>()?)
}

fn tier(dtype: DType) -> &'static str {
    if dtype == DType::F32 {
        "f32: max|Δlogit| <= 1e-4 x max|logit|, greedy tokens identical"
    } else {
        "reduced precision: top-1 agreement 100%"
    }
}

fn get<'a>(golden: &'a HashMap<String, Tensor>, key: &str, path: &Path) -> Result<&'a Tensor> {
    golden.get(key).ok_or_else(|| Error::config(path, format!("reference has no '{key}'")))
}

/// A golden prompt as u32 ids: integer [B, T] with T ≥ 1 and every id in 0..2³², checked
/// because a float or out-of-range id would otherwise be converted silently.
fn prompt_ids(t: &Tensor, key: &str, path: &Path) -> Result<Tensor> {
    let bad = |detail: String| Error::config(path, format!("reference '{key}': {detail}"));
    if !t.dtype().is_int() {
        return Err(bad(format!("expected integer token ids, got {:?}", t.dtype())));
    }
    match t.dims() {
        [b, n] if *b >= 1 && *n >= 1 => {}
        dims => return Err(bad(format!("expected ids [batch, tokens] with both at least 1, got {dims:?}"))),
    }
    let wide = t.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
    if let Some(id) = wide.iter().find(|&&id| u32::try_from(id).is_err()) {
        return Err(bad(format!("token id {id} is not a vocabulary index")));
    }
    Ok(t.to_dtype(DType::U32)?)
}

/// Golden prompts of a llava-hf model spell an image as N copies of its image id; a NeVA
/// converted from it spells it with its own span of the same length, an original LLaVA with N
/// placeholders. Respell when the model knows the llava-hf id.
fn respell_images(model: &Model, info: &ModelInfo, ids: &Tensor) -> Result<Tensor> {
    let (Model::Neva(neva), Some(src), Some(n)) = (model, info.source_image_token, info.image_tokens) else {
        return Ok(ids.clone());
    };
    let run = neva.image_tokens().expand(n);
    if run.len() != n {
        return Ok(ids.clone());
    }
    let (b, t) = ids.dims2()?;
    let mut rows = ids.to_vec2::<u32>()?;
    for row in &mut rows {
        let mut i = 0;
        while i + n <= row.len() {
            if row[i..i + n].iter().all(|&x| x == src) {
                row[i..i + n].copy_from_slice(&run);
                i += n;
            } else {
                i += 1;
            }
        }
    }
    Ok(Tensor::from_vec(rows.concat(), (b, t), ids.device())?)
}

/// The pixel values a golden file's image prompts were made with.
fn golden_pixels(golden: &HashMap<String, Tensor>) -> Option<&Tensor> {
    ["pixel_values_pad", "pixel_values"].iter().find_map(|k| golden.get(*k))
}

/// Validate `model` against the golden file at `reference`.
pub fn against_golden(model: &mut Model, info: &ModelInfo, reference: &Path) -> Result<Report> {
    let path = golden_path(reference)?;
    // Our reader first: its errors name the file and the tensor (candle's name neither).
    shardsmith_converters::formats::safetensors::read_file(&path)?;
    let golden = candle_core::safetensors::load(&path, &Device::Cpu)
        .map_err(|e| Error::config(&path, format!("reading the reference: {e}")))?;
    let dtype = model.llm().dtype();
    let device = model.llm().device().clone();
    let f32_run = dtype == DType::F32;
    let mut names: Vec<String> =
        golden.keys().filter_map(|k| k.strip_prefix("input_ids_").map(str::to_string)).collect();
    names.sort();
    if names.is_empty() {
        return Err(Error::config(&path, "reference has no 'input_ids_*' prompts"));
    }
    let mut cases = Vec::new();
    for name in names {
        let ids = prompt_ids(
            get(&golden, &format!("input_ids_{name}"), &path)?,
            &format!("input_ids_{name}"),
            &path,
        )?;
        let ids = respell_images(model, info, &ids)?.to_device(&device)?;
        let ref_logits = get(&golden, &format!("logits_{name}"), &path)?;
        let has_image = info.image_tokens.is_some() && name != "text";
        let pixels = if has_image {
            let p = golden_pixels(&golden)
                .ok_or_else(|| Error::config(&path, "reference has no pixel values"))?;
            Some(p.to_device(&device)?)
        } else {
            None
        };
        model.llm().reset();
        let out = model.forward(&ids, pixels.as_ref(), false, true)?;
        // Reduced precision is judged against the same-precision reference when there is one.
        let target = if f32_run {
            ref_logits
        } else {
            golden.get(&format!("logits_bf16_{name}")).unwrap_or(ref_logits)
        };
        // A NeVA converted from the reference's model keeps its rows but may have fewer tokenizer
        // pieces: compare the shared columns.
        let shared = out.logits.dim(D::Minus1)?.min(target.dim(D::Minus1)?);
        let logits =
            compare(&out.logits.narrow(D::Minus1, 0, shared)?, &target.narrow(D::Minus1, 0, shared)?)?;
        let mut hidden_rel = Vec::new();
        let mut first_divergent_layer = None;
        for (k, ours) in out.hidden_states.iter().enumerate() {
            let Some(r) = golden.get(&format!("hidden_{name}_layer_{k}")) else { break };
            let c = compare(ours, r)?;
            if first_divergent_layer.is_none()
                && c.rel_to_max > F32_REL_TOL.max(if f32_run { 0.0 } else { 2e-2 })
            {
                first_divergent_layer = Some(k);
            }
            hidden_rel.push(c.rel_to_max);
        }
        let greedy_match = match golden.get(&format!("generated_{name}")) {
            Some(g) if f32_run => {
                let want = g.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()?;
                let t = ids.dim(1)?;
                if want[t..].iter().any(|&x| x as usize >= shared) {
                    None // the continuation leaves the shared vocabulary: not comparable
                } else {
                    let got = greedy(model, &ids, pixels.as_ref(), want.len().saturating_sub(t), shared)?;
                    Some(got == want[t..])
                }
            }
            _ => None,
        };
        let passed = if f32_run {
            logits.rel_to_max <= F32_REL_TOL && greedy_match != Some(false)
        } else {
            logits.top1_agreement == 1.0
        };
        cases.push(Case {
            name: if name.chars().all(|c| c.is_ascii_digit()) { format!("prompt {name}") } else { name },
            tokens: ids.dim(1)?,
            image: pixels.is_some(),
            logits,
            first_divergent_layer,
            hidden_rel,
            greedy_match,
            passed,
        });
    }
    let image_features = match (&*model, golden.get("image_features"), golden_pixels(&golden)) {
        (Model::Neva(neva), Some(want), Some(pixels)) => {
            Some(compare(&neva.image_features(&pixels.to_device(&device)?)?.to_dtype(DType::F32)?, want)?)
        }
        _ => None,
    };
    let features_ok = image_features.as_ref().is_none_or(|c| {
        if f32_run {
            c.rel_to_max <= F32_REL_TOL
        } else {
            c.cosine > 0.999
        }
    });
    let passed = cases.iter().all(|c| c.passed) && features_ok;
    Ok(Report {
        image_features,
        checkpoint: info.path.clone(),
        reference: path,
        family: info.family.into(),
        dtype: format!("{dtype:?}").to_lowercase(),
        tp: info.tp,
        tier: tier(dtype).into(),
        cases,
        passed,
    })
}

/// Deterministic prompt ids in `[3, vocab)` (a 64-bit LCG: the same on every platform).
pub fn seeded_prompt(len: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut out = vec![1u32];
    while out.len() < len {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        out.push(3 + ((state >> 33) % (vocab as u64 - 3)) as u32);
    }
    out
}

/// Validate `a` against `b`, another checkpoint of the same model: both run the same seeded
/// prompts (with a seeded image for vision models) and must agree within the tier of `a`'s dtype.
pub fn against_model(a: (&mut Model, &ModelInfo), b: (&mut Model, &ModelInfo)) -> Result<Report> {
    let (ma, ia) = a;
    let (mb, ib) = b;
    let (ha, hb) = (ma.llm().hparams().clone(), mb.llm().hparams().clone());
    let vision = |m: &Model| matches!(m, Model::Neva(_));
    if (ha.hidden, ha.layers) != (hb.hidden, hb.layers) || vision(ma) != vision(mb) {
        return Err(Error::Usage(format!(
            "{} ({} layers, hidden {}, vocab {}) and {} ({} layers, hidden {}, vocab {}) are not the same model",
            ia.path.display(),
            ha.layers,
            ha.hidden,
            ha.vocab,
            ib.path.display(),
            hb.layers,
            hb.hidden,
            hb.vocab
        )));
    }
    // Vocabularies may differ in their tail (NeVA's <extra_id_*> vs llava-hf's <image>/<pad>):
    // prompts use ids below every special image id, logits are compared on the shared columns.
    let shared = ha.vocab.min(hb.vocab);
    let special = |m: &Model| match m {
        Model::Neva(n) => n.image_tokens().expand(3).into_iter().min().map(|id| id as usize),
        Model::Llama(_) => None,
    };
    let text_limit = [Some(shared), special(ma), special(mb)].into_iter().flatten().min().unwrap_or(shared);
    let dtype = ma.llm().dtype();
    let device = ma.llm().device().clone();
    let mut cases = Vec::new();
    for (i, len) in [7usize, 16].into_iter().enumerate() {
        let text = seeded_prompt(len, text_limit, 17 + i as u64);
        let at = text.len() / 2;
        let (side, n) = (ia.image_size.unwrap_or(0), ia.image_tokens.unwrap_or(0));
        // One image's tokens in the middle of the prompt (each model spells them its own way),
        // with seeded pixels in [-1, 1).
        let with_image = |m: &Model| -> Vec<u32> {
            let mut ids = text.clone();
            if let Model::Neva(neva) = m {
                ids.splice(at..at, neva.image_tokens().expand(n));
            }
            ids
        };
        let (ids_a, ids_b) = (with_image(ma), with_image(mb));
        let pixels = if vision(ma) {
            let values: Vec<f32> = seeded_prompt(3 * side * side + 1, 1 << 20, 99 + i as u64)[1..]
                .iter()
                .map(|&v| v as f32 / (1 << 19) as f32 - 1.0)
                .collect();
            Some(Tensor::from_vec(values, (1, 3, side, side), &device)?)
        } else {
            None
        };
        if ids_a.len() != ids_b.len() {
            return Err(Error::Usage(format!(
                "the two models spell an image with different numbers of tokens ({} vs {})",
                ids_a.len(),
                ids_b.len()
            )));
        }
        let t = ids_a.len();
        let ids_a = Tensor::from_vec(ids_a, (1, t), &device)?;
        let ids_b = Tensor::from_vec(ids_b, (1, t), &device)?;
        ma.llm().reset();
        mb.llm().reset();
        let oa = ma.forward(&ids_a, pixels.as_ref(), false, true)?;
        let ob = mb.forward(&ids_b, pixels.as_ref(), false, true)?;
        let logits =
            compare(&oa.logits.narrow(D::Minus1, 0, shared)?, &ob.logits.narrow(D::Minus1, 0, shared)?)?;
        let mut hidden_rel = Vec::new();
        let mut first_divergent_layer = None;
        for (k, (x, y)) in oa.hidden_states.iter().zip(&ob.hidden_states).enumerate() {
            let c = compare(x, y)?;
            if first_divergent_layer.is_none() && c.rel_to_max > F32_REL_TOL {
                first_divergent_layer = Some(k);
            }
            hidden_rel.push(c.rel_to_max);
        }
        let passed =
            if dtype == DType::F32 { logits.rel_to_max <= F32_REL_TOL } else { logits.top1_agreement == 1.0 };
        cases.push(Case {
            name: format!("seeded prompt {i}"),
            tokens: t,
            image: pixels.is_some(),
            logits,
            first_divergent_layer,
            hidden_rel,
            greedy_match: None,
            passed,
        });
    }
    let passed = cases.iter().all(|c| c.passed);
    Ok(Report {
        image_features: None,
        checkpoint: ia.path.clone(),
        reference: ib.path.clone(),
        family: ia.family.into(),
        dtype: format!("{dtype:?}").to_lowercase(),
        tp: ia.tp,
        tier: tier(dtype).into(),
        cases,
        passed,
    })
}

/// Human-readable report.
pub fn render(r: &Report) -> String {
    let mut s = format!(
        "validate {} ({}, {}, tp={}) against {}\ntier: {}\n",
        r.checkpoint.display(),
        r.family,
        r.dtype,
        r.tp,
        r.reference.display(),
        r.tier
    );
    for c in &r.cases {
        s += &format!(
            "  {:<16} {:>4} {}{}  max|Δ| {:.3e}  rel {:.3e}  cos {:.8}  top-1 {:.1}%{}{}  {}\n",
            c.name,
            c.tokens,
            if r.family == "clip" { "images" } else { "tokens" },
            if c.image && r.family != "clip" { " +image" } else { "" },
            c.logits.max_abs,
            c.logits.rel_to_max,
            c.logits.cosine,
            100.0 * c.logits.top1_agreement,
            match c.greedy_match {
                Some(true) => "  greedy ok",
                Some(false) => "  greedy DIFFERS",
                None => "",
            },
            match c.first_divergent_layer {
                Some(k) => format!("  first divergent hidden state: {k}"),
                None => String::new(),
            },
            if c.passed { "PASS" } else { "FAIL" }
        );
    }
    if let Some(c) = &r.image_features {
        s += &format!(
            "  image features          max|Δ| {:.3e}  rel {:.3e}  cos {:.8}\n",
            c.max_abs, c.rel_to_max, c.cosine
        );
    }
    s += if r.passed { "result: PASS\n" } else { "result: FAIL\n" };
    s
}

/// Whether `ckpt` holds a CLIP vision tower (or a full CLIP model) rather than a language model.
pub fn is_clip(ckpt: &shardsmith_converters::Checkpoint) -> bool {
    matches!(&ckpt.meta.config, Some(shardsmith_converters::ModelConfig::HfJson(cfg))
        if matches!(cfg.get("model_type").and_then(|t| t.as_str()), Some("clip_vision_model" | "clip")))
}

/// Validate a CLIP vision tower against its golden file: every hidden state and the pooled
/// output on the reference's pixels, and the last hidden state on its preprocessed image.
pub fn clip_against_golden(
    ckpt: &shardsmith_converters::Checkpoint,
    reference: &Path,
    dtype: DType,
) -> Result<Report> {
    use crate::models::clip::{ClipVisionConfig, ClipVisionModel};
    use crate::weights::TensorMapBackend;
    let Some(shardsmith_converters::ModelConfig::HfJson(cfg)) = &ckpt.meta.config else {
        return Err(Error::config(&ckpt.meta.path, "no config.json"));
    };
    let vcfg = ClipVisionConfig::from_json(cfg, &ckpt.meta.path)?;
    let vb =
        TensorMapBackend::new(ckpt.tensors()?.clone(), &ckpt.meta.path).into_var_builder(dtype, &Device::Cpu);
    let model = ClipVisionModel::load(vb, &vcfg)?;
    let path = golden_path(reference)?;
    let golden = candle_core::safetensors::load(&path, &Device::Cpu)?;
    let f32_run = dtype == DType::F32;
    let judge = |c: &Compare| if f32_run { c.rel_to_max <= F32_REL_TOL } else { c.cosine >= 0.999 };
    let mut cases = Vec::new();
    for (name, pixels_key, hidden_prefix, last_key) in [
        ("pixels", "pixel_values", Some("hidden_states_"), "last_hidden_state"),
        ("image", "image_pixel_values", None, "image_last_hidden_state"),
    ] {
        let (Some(pixels), Some(want)) = (golden.get(pixels_key), golden.get(last_key)) else { continue };
        let out = model.forward(pixels, hidden_prefix.is_some())?;
        let logits = compare(&out.last_hidden_state.to_dtype(DType::F32)?, want)?;
        let mut hidden_rel = Vec::new();
        let mut first_divergent_layer = None;
        if let Some(prefix) = hidden_prefix {
            for (k, ours) in out.hidden_states.iter().enumerate() {
                let Some(r) = golden.get(&format!("{prefix}{k}")) else { break };
                let c = compare(&ours.to_dtype(DType::F32)?, r)?;
                if first_divergent_layer.is_none() && !judge(&c) {
                    first_divergent_layer = Some(k);
                }
                hidden_rel.push(c.rel_to_max);
            }
        }
        let pooled_ok = match (hidden_prefix, golden.get("pooler_output")) {
            (Some(_), Some(p)) => judge(&compare(&out.pooler_output.to_dtype(DType::F32)?, p)?),
            _ => true,
        };
        let (images, _, _, _) = pixels.dims4()?;
        cases.push(Case {
            name: name.into(),
            tokens: images,
            image: true,
            passed: judge(&logits) && pooled_ok && first_divergent_layer.is_none(),
            logits,
            first_divergent_layer,
            hidden_rel,
            greedy_match: None,
        });
    }
    if cases.is_empty() {
        return Err(Error::config(
            &path,
            "reference has no CLIP outputs ('pixel_values' + 'last_hidden_state')",
        ));
    }
    let passed = cases.iter().all(|c| c.passed);
    Ok(Report {
        image_features: None,
        checkpoint: ckpt.meta.path.clone(),
        reference: path,
        family: "clip".into(),
        dtype: format!("{dtype:?}").to_lowercase(),
        tp: 1,
        tier: if f32_run {
            "f32: max|Δ| <= 1e-4 x max|reference| for every hidden state".into()
        } else {
            "reduced precision: cosine >= 0.999 for every hidden state".into()
        },
        cases,
        passed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_never_picks_a_padded_row() {
        // [1, 2, 6]: two positions, vocabulary 4 padded to 6; the padding scores highest.
        let logits =
            Tensor::new(&[[[9f32, 0., 0., 0., 0., 0.], [-3., -1., -2., -5., 0., 7.]]], &Device::Cpu).unwrap();
        assert_eq!(greedy_token(&logits, 4).unwrap(), 1, "the last position, among ids 0..4");
        assert_eq!(greedy_token(&logits, 6).unwrap(), 5);
        assert_eq!(greedy_token(&logits, 100).unwrap(), 5, "a wider vocabulary is the whole row");
        assert_eq!(greedy_token(&logits, 0).unwrap(), 0, "at least one id");
    }
}
