//! The trainable NeVA / LLaVA model: which parameters train in each stage, f32 master weights
//! with bf16 (or f32) compute, the loss, and its gradients — through the whole graph, or layer
//! by layer with activation checkpointing (each decoder layer recomputed in the backward pass).
//!
//! Trainable parameters are candle `Var`s holding f32 master weights; the forward casts them to
//! the compute dtype, so gradients flow back through the cast into f32 (NeMo's "BF16 O2").
//! Frozen parameters are plain tensors: candle records no gradient for them.

use crate::models::clip::{ClipVisionConfig, ClipVisionModel};
use crate::models::llama::{canonical_shard_spec, Llama, RankLayout};
use crate::models::neva::{ImageTokens, Neva};
use crate::models::projector::{Projector, ProjectorKind};
use crate::models::tp::{ImageSpan, ParallelLlama};
use crate::parallel::Solo;
use crate::weights::{rank_tensors, TensorMapBackend};
use crate::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use shardsmith_converters::convert::llava::CanonicalLlava;
use shardsmith_converters::names::llama::LlamaHparams;
use shardsmith_converters::shard;
use std::collections::HashMap;

/// Label value of positions that do not count in the loss (HF's `ignore_index`).
pub const IGNORE: i64 = -100;

/// What trains.
#[derive(Clone, Debug, PartialEq)]
pub enum Stage {
    /// Stage 1: the projector only (LLM and vision tower frozen).
    Projector,
    /// Stage 2: projector and LLM (vision tower frozen).
    ProjectorAndLlm,
    /// Projector and LoRA adapters on the LLM's linear layers (LLM frozen).
    Lora(LoraSpec),
}

/// LoRA hyper-parameters (PEFT's `r`, `lora_alpha`, `target_modules`).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    /// Rank r.
    pub rank: usize,
    /// `lora_alpha`; the update is scaled by alpha / r.
    pub alpha: f64,
    /// Projection names: `q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`.
    pub targets: Vec<String>,
    /// Seed of the `lora_A` init (PEFT: Kaiming-uniform, bound 1/√in; `lora_B` zeros).
    pub seed: u64,
}

/// One micro-batch.
pub struct Batch {
    /// [B, T] u32 token ids.
    pub ids: Tensor,
    /// [B, T] i64 labels, `IGNORE` where masked; not shifted (the loss shifts).
    pub labels: Tensor,
    /// [I, 3, S, S] f32: one image per sample that has one, in batch order.
    pub pixel_values: Option<Tensor>,
}

/// The model being trained.
pub struct TrainModel {
    neva: Neva,
    /// Trainable parameters, canonical names, f32.
    params: Vec<(String, Var)>,
    /// Activation dtype.
    compute: DType,
    /// `alpha / r` of the LoRA adapters, when training them.
    lora_scale: Option<f64>,
}

/// The result of one forward/backward.
pub struct StepOutput {
    /// Mean cross-entropy over the counted tokens.
    pub loss: f64,
    /// Tokens counted in the loss.
    pub tokens: usize,
    /// Gradients of the trainable parameters (only those).
    pub grads: GradStore,
}

/// A portable seeded uniform stream in [-bound, bound) (24 random bits each), for LoRA init.
fn uniform(seed: u64, n: usize, bound: f32) -> Vec<f32> {
    let mut rng = crate::rng::SplitMix64::new(seed);
    (0..n).map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * bound).collect()
}

impl TrainModel {
    /// Build from a canonical LLaVA / NeVA checkpoint (TP 1, CPU).
    pub fn from_llava(c: &CanonicalLlava, stage: Stage, compute: DType) -> Result<Self> {
        Self::from_llava_on(c, stage, compute, &Device::Cpu)
    }

    /// [`TrainModel::from_llava`] with the weights (and so the whole step) on `dev`. On CUDA the
    /// decoder runs the fused kernels (attention, SwiGLU, RMSNorm, rope) and the loss the fused
    /// cross-entropy.
    pub fn from_llava_on(c: &CanonicalLlava, stage: Stage, compute: DType, dev: &Device) -> Result<Self> {
        let dev = dev.clone();
        let hp = &c.llm.hparams;
        let padded_vocab = shard::padded_vocab(hp.vocab, shard::divisible_by_for_hf_vocab(hp.vocab), 1);
        let train_llm = stage == Stage::ProjectorAndLlm;
        let mut params = Vec::new();
        // Every tensor in f32; the trainable ones become Vars (the model reads their tensors).
        let mut materialise = |tensors: &shardsmith_converters::checkpoint::TensorMap,
                               trainable: bool|
         -> Result<HashMap<String, Tensor>> {
            let backend = TensorMapBackend::new(tensors.clone(), &c.origin);
            let mut out = HashMap::new();
            for name in tensors.keys() {
                let t = backend.load(name, DType::F32, &dev)?;
                let t = if trainable {
                    let v = Var::from_tensor(&t)?;
                    let t = v.as_tensor().clone();
                    params.push((name.clone(), v));
                    t
                } else {
                    t
                };
                out.insert(name.clone(), t);
            }
            Ok(out)
        };
        let llm_tensors =
            rank_tensors(&c.llm.tensors, 1, 0, |n| canonical_shard_spec(n, hp.vocab, padded_vocab))?;
        let llm_map = materialise(&llm_tensors, train_llm)?;
        let projector_map = materialise(&c.projector, true)?;
        let vision_map = materialise(&c.vision, false)?;
        // Frozen weights need no f32 master: on CUDA they are held in the compute dtype (half
        // the memory, bf16 GEMMs). On the CPU everything stays f32, as the goldens were made.
        let frozen = if dev.is_cuda() { compute } else { DType::F32 };
        let vb = |m: HashMap<String, Tensor>, dt: DType| VarBuilder::from_tensors(m, dt, &dev);
        let llm_dt = if train_llm { DType::F32 } else { frozen };
        let mut llama = Llama::load(vb(llm_map, llm_dt), hp, RankLayout { tp: 1, rank: 0, padded_vocab })?;
        llama.set_use_cache(false);
        if let Stage::Lora(spec) = &stage {
            let mut made = Vec::new();
            let adapters =
                llama.attach_lora(&spec.targets, spec.alpha / spec.rank as f64, |name, out, inp| {
                    // One stream per adapter: the seed mixed with an FNV-1a hash of the weight name.
                    let seed = spec.seed
                        ^ name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
                        });
                    let a = Var::from_vec(
                        uniform(seed, spec.rank * inp, 1.0 / (inp as f32).sqrt()),
                        (spec.rank, inp),
                        &dev,
                    )?;
                    let b = Var::zeros((out, spec.rank), DType::F32, &dev)?;
                    made.push((a.clone(), b.clone()));
                    Ok((a.as_tensor().clone(), b.as_tensor().clone()))
                })?;
            for ((name, _), var) in adapters.iter().zip(made.iter().flat_map(|(a, b)| [a.clone(), b.clone()]))
            {
                params.push((name.clone(), var));
            }
        }
        let vcfg = ClipVisionConfig::from_json(&c.vision_config, &c.origin)?;
        let vision = ClipVisionModel::load(vb(vision_map, frozen), &vcfg)?;
        let kind = ProjectorKind::parse(&c.projector_type)?;
        let projector = Projector::load(vb(projector_map, DType::F32), kind, vcfg.hidden_size, hp.hidden)?;
        let llm = ParallelLlama::from_rank(llama, hp.clone());
        let tokens = crate::models::image_tokens_of(c)?;
        let neva = Neva::new(llm, vision, projector, c.vision_feature_layer, c.drop_cls, tokens);
        let lora_scale = match &stage {
            Stage::Lora(spec) => Some(spec.alpha / spec.rank as f64),
            _ => None,
        };
        Ok(TrainModel { neva, params, compute, lora_scale })
    }

    /// A stage-1 model (projector trains; LLM and vision tower frozen in `compute`), or with
    /// `train_llm` stage 2 (the LLM trains too, in f32 masters), with random weights made on
    /// `dev`, for benchmarks and device tests at real sizes without a checkpoint: `hp` LLaMA,
    /// `vcfg` CLIP tower (features of layer −2, CLS dropped, as LLaVA-1.5), a `kind` projector
    /// in f32 masters; image positions marked by `image_token` repeated (llava-hf).
    pub fn synthetic(
        hp: &LlamaHparams,
        vcfg: &ClipVisionConfig,
        kind: ProjectorKind,
        image_token: u32,
        train_llm: bool,
        compute: DType,
        dev: &Device,
    ) -> Result<Self> {
        use crate::weights::RandomBackend;
        use std::sync::Arc;
        let padded_vocab = shard::padded_vocab(hp.vocab, shard::divisible_by_for_hf_vocab(hp.vocab), 1);
        let frozen = Arc::new(RandomBackend::new(0.02, false));
        let trained = Arc::new(RandomBackend::new(0.02, true));
        let llm_vb =
            if train_llm { trained.var_builder(DType::F32, dev) } else { frozen.var_builder(compute, dev) };
        let mut llama = Llama::load(llm_vb, hp, RankLayout { tp: 1, rank: 0, padded_vocab })?;
        llama.set_use_cache(false);
        let vision = ClipVisionModel::load(frozen.var_builder(compute, dev).pp("vision_tower"), vcfg)?;
        let projector =
            Projector::load(trained.var_builder(DType::F32, dev), kind, vcfg.hidden_size, hp.hidden)?;
        let params = trained.vars();
        let llm = ParallelLlama::from_rank(llama, hp.clone());
        let tokens = ImageTokens::Repeated { id: image_token };
        let neva = Neva::new(llm, vision, projector, -2, true, tokens);
        Ok(TrainModel { neva, params, compute, lora_scale: None })
    }

    /// Run the LLM's decoder layers and head as one graph node each (the default) or as
    /// candle's composed ops (comparisons: [`crate::models::llama::Llama::set_layer_nodes`]).
    pub fn set_layer_nodes(&mut self, on: bool) {
        for llama in self.neva.llm.ranks_mut() {
            llama.set_layer_nodes(on);
        }
    }

    /// Decoder layers and heads run as one node so far, over every rank
    /// ([`crate::models::llama::Llama::node_forwards`]).
    pub fn node_forwards(&self) -> usize {
        self.neva.llm.ranks().iter().map(|l| l.node_forwards()).sum()
    }

    /// The projected image features [I, N, H] of `pixels` [I, 3, S, S] (vision tower and
    /// projector forward; benchmarks time it on its own).
    pub fn image_features(&self, pixels: &Tensor) -> Result<Tensor> {
        self.neva.image_features(pixels)
    }

    /// `alpha / r` of the LoRA adapters, when training them.
    pub fn lora_scale(&self) -> Option<f64> {
        self.lora_scale
    }

    /// Trainable parameters (canonical names, f32 masters), in a fixed order.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// Replace a LoRA adapter's or any trainable parameter's value (tests: same init as a reference).
    pub fn set_param(&self, name: &str, value: &Tensor) -> Result<()> {
        let (_, v) = self
            .params
            .iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| Error::Usage(format!("'{name}' is not a trainable parameter")))?;
        Ok(v.set(&value.to_dtype(DType::F32)?)?)
    }

    /// Embeddings of the batch with image features written over the image tokens, in the
    /// compute dtype: [B, T, H].
    fn embeddings(&mut self, batch: &Batch) -> Result<Tensor> {
        let spans = match &batch.pixel_values {
            Some(pixels) => {
                let features = self.neva.image_features(pixels)?; // [I, N, H]
                let (images, n, _) = features.dims3()?;
                let tokens = self.neva.image_tokens();
                let mut spans = Vec::new();
                for (b, row) in batch.ids.to_vec2::<u32>()?.iter().enumerate() {
                    for start in tokens.spans(row, n)? {
                        if spans.len() == images {
                            return Err(Error::Usage("more image spans in the batch than images".into()));
                        }
                        spans.push(ImageSpan { batch: b, start, features: features.get(spans.len())? });
                    }
                }
                if spans.len() != images {
                    return Err(Error::Usage(format!(
                        "{images} image(s) in the batch but {} image span(s) in its tokens",
                        spans.len()
                    )));
                }
                spans
            }
            None => Vec::new(),
        };
        let llama = self.neva.llm.single_mut()?;
        let mut x = llama.embed(&batch.ids, &Solo)?;
        for s in &spans {
            let (n, h) = s.features.dims2()?;
            let (_, t, _) = x.dims3()?;
            if s.start + n > t {
                return Err(Error::Usage(format!("image span at {} overruns {t} tokens", s.start)));
            }
            x = x.slice_assign(
                &[s.batch..s.batch + 1, s.start..s.start + n, 0..h],
                &s.features.unsqueeze(0)?,
            )?;
        }
        Ok(crate::ops::cast(&x, self.compute)?)
    }

    /// Loss and gradients of one micro-batch. With `checkpointing`, only each layer's input is
    /// kept from the forward pass and the layer is recomputed during the backward pass.
    pub fn forward_backward(&mut self, batch: &Batch, checkpointing: bool) -> Result<StepOutput> {
        let dev = self.device().clone();
        let moved;
        let batch = if batch.ids.device().same_device(&dev) {
            batch
        } else {
            moved = Batch {
                ids: batch.ids.to_device(&dev)?,
                labels: batch.labels.to_device(&dev)?,
                pixel_values: batch.pixel_values.as_ref().map(|p| p.to_device(&dev)).transpose()?,
            };
            &moved
        };
        let x0 = self.embeddings(batch)?;
        let (_, t, _) = x0.dims3()?;
        let llama = self.neva.llm.single_mut()?;
        let seq = llama.sequence_inputs(t, x0.dtype(), x0.device())?;
        let layers = llama.num_layers();
        let mut grads = GradStore::default();
        let (loss, tokens) = if !checkpointing {
            let x = llama.layers(&x0, &seq, &Solo)?;
            let (loss, tokens) = masked_cross_entropy(&llama.head_native(&x, &Solo)?, &batch.labels)?;
            self.collect(&mut grads, loss.backward()?)?;
            (loss, tokens)
        } else {
            // Forward without keeping activations: each layer's input, detached.
            let mut inputs = vec![x0.detach()];
            for i in 0..layers {
                let y = llama.layer(i, &inputs[i], &seq, &Solo)?.detach();
                inputs.push(y);
            }
            // Head: from the last layer's output as a leaf, to get dL/dx there.
            let last = Var::from_tensor(&inputs[layers])?;
            let (loss, tokens) =
                masked_cross_entropy(&llama.head_native(last.as_tensor(), &Solo)?, &batch.labels)?;
            let mut g_all = loss.backward()?;
            let mut g = g_all
                .remove(last.as_tensor())
                .ok_or_else(|| Error::Usage("no gradient reached the decoder".into()))?;
            let mut layer_grads = vec![g_all];
            // Layers in reverse: recompute with the input as a leaf, backprop the incoming grad.
            for i in (0..layers).rev() {
                let x_in = Var::from_tensor(&inputs[i])?;
                let y = llama.layer(i, x_in.as_tensor(), &seq, &Solo)?;
                let mut gi = (y * &g)?.sum_all()?.backward()?;
                g = gi
                    .remove(x_in.as_tensor())
                    .ok_or_else(|| Error::Usage(format!("no gradient reached layer {i}")))?;
                layer_grads.push(gi);
            }
            // The embedding and the projector, from the gradient at the decoder's input.
            layer_grads.push((x0 * g)?.sum_all()?.backward()?);
            for gi in layer_grads {
                self.collect(&mut grads, gi)?;
            }
            (loss, tokens)
        };
        Ok(StepOutput { loss: loss.to_scalar::<f32>()? as f64, tokens, grads })
    }

    /// The device the model (and its step) runs on.
    pub fn device(&self) -> &Device {
        self.neva.llm.device()
    }

    /// Multiply every trainable parameter's gradient in `grads` by `factor` (e.g. 1/micro-batches).
    pub fn scale_grads(&self, grads: &mut GradStore, factor: f64) -> Result<()> {
        for (_, v) in &self.params {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), (g * factor)?);
            }
        }
        Ok(())
    }

    /// Move the trainable parameters' gradients from `from` into `into` (summing): gradient
    /// accumulation over micro-batches.
    pub fn collect(&self, into: &mut GradStore, mut from: GradStore) -> Result<()> {
        // Gradients the one-node decoder layers computed outside candle's graph.
        for llama in self.neva.llm.ranks() {
            llama.take_param_grads(&mut from)?;
        }
        for (_, v) in &self.params {
            if let Some(g) = from.remove(v.as_tensor()) {
                let g = match into.remove(v.as_tensor()) {
                    Some(prev) => (prev + g)?,
                    None => g,
                };
                into.insert(v.as_tensor(), g);
            }
        }
        Ok(())
    }

    /// The trained values under canonical names (LLM, projector, LoRA adapters), f32.
    pub fn trained(&self) -> Vec<(String, Tensor)> {
        self.params.iter().map(|(n, v)| (n.clone(), v.as_tensor().detach())).collect()
    }
}

/// Mean next-token cross-entropy: logits [B, T, V] (any float dtype) against labels [B, T]
/// shifted by one; `IGNORE` labels do not count. Returns the scalar loss and the number of counted tokens.
pub fn masked_cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
    let (b, t, v) = logits.dims3()?;
    // Position p predicts label p + 1; the last position predicts nothing (ignored). Scoring
    // every position against shifted labels keeps the logits one contiguous [B·T, V] block:
    // no narrowed copy of the logits forward and no scatter of their gradient backward.
    let shifted = Tensor::cat(
        &[
            &labels.narrow(1, 1, t - 1)?.to_dtype(DType::I64)?,
            &Tensor::full(IGNORE, (b, 1), labels.device())?,
        ],
        1,
    )?;
    // One fused op (CUDA kernel or CPU reference): per row the loss and d logits in the same
    // pass over the vocabulary, in f32 from logits of any float dtype.
    crate::ops::cross_entropy_mean(&logits.reshape((b * t, v))?, &shifted.flatten_all()?)?
        .ok_or_else(|| Error::Usage("a micro-batch with no labelled tokens".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::max_diff;
    use shardsmith_converters::convert::llava::from_llava_hf;

    fn tiny() -> CanonicalLlava {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/llava-tiny");
        from_llava_hf(&shardsmith_converters::formats::open(&dir).unwrap()).unwrap()
    }

    /// BOS, 3 text ids, 16 image tokens, 4 text ids; labels on the last 4 only.
    fn batch() -> Batch {
        let dev = Device::Cpu;
        let mut ids = vec![1u32, 40, 41, 42];
        ids.extend([256u32; 16]);
        ids.extend([50u32, 51, 52, 53]);
        let labels: Vec<i64> =
            ids.iter().enumerate().map(|(i, &t)| if i >= 20 { t as i64 } else { IGNORE }).collect();
        let t = ids.len();
        let pixels: Vec<f32> = (0..3 * 32 * 32).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
        Batch {
            ids: Tensor::from_vec(ids, (1, t), &dev).unwrap(),
            labels: Tensor::from_vec(labels, (1, t), &dev).unwrap(),
            pixel_values: Some(Tensor::from_vec(pixels, (1, 3, 32, 32), &dev).unwrap()),
        }
    }

    #[test]
    fn stages_train_the_right_parameters() {
        let c = tiny();
        let p1 = TrainModel::from_llava(&c, Stage::Projector, DType::F32).unwrap();
        assert!(p1.params().iter().all(|(n, _)| n.starts_with("mm_projector.")));
        assert_eq!(p1.params().len(), 4);
        let p2 = TrainModel::from_llava(&c, Stage::ProjectorAndLlm, DType::F32).unwrap();
        assert_eq!(p2.params().len(), 4 + c.llm.tensors.len());
        let lora = Stage::Lora(LoraSpec {
            rank: 2,
            alpha: 4.0,
            targets: vec!["q_proj".into(), "v_proj".into()],
            seed: 1,
        });
        let p3 = TrainModel::from_llava(&c, lora, DType::F32).unwrap();
        assert_eq!(p3.params().len(), 4 + 2 * 2 * c.llm.hparams.layers);
    }

    #[test]
    fn checkpointing_gives_the_same_gradients() {
        let c = tiny();
        for stage in [
            Stage::Projector,
            Stage::ProjectorAndLlm,
            Stage::Lora(LoraSpec {
                rank: 2,
                alpha: 4.0,
                targets: vec!["q_proj".into(), "down_proj".into()],
                seed: 3,
            }),
        ] {
            let mut m = TrainModel::from_llava(&c, stage.clone(), DType::F32).unwrap();
            // Non-zero LoRA B so A gets gradients too.
            for (n, v) in m.params() {
                if n.ends_with("lora_B.weight") {
                    v.set(&(v.as_tensor().ones_like().unwrap() * 0.01).unwrap()).unwrap();
                }
            }
            let plain = m.forward_backward(&batch(), false).unwrap();
            let ckpt = m.forward_backward(&batch(), true).unwrap();
            assert_eq!(plain.tokens, 4);
            assert!((plain.loss - ckpt.loss).abs() < 1e-6, "{} vs {}", plain.loss, ckpt.loss);
            for (name, v) in m.params() {
                let a = plain.grads.get(v.as_tensor()).unwrap_or_else(|| panic!("no grad for {name}"));
                let b = ckpt.grads.get(v.as_tensor()).unwrap();
                let scale = a
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    .max(1e-6);
                assert!(max_diff(a, b) / scale < 1e-5, "{name}: {}", max_diff(a, b));
            }
        }
    }

    /// Training runs each decoder layer as one graph node with a hand-written backward: the
    /// loss and every trained parameter's gradient (projector; LLM weights and norms in stage
    /// 2) are those of the composed ops.
    #[test]
    fn layer_nodes_give_the_composed_gradients() {
        let c = tiny();
        for stage in [Stage::Projector, Stage::ProjectorAndLlm] {
            for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
                let mut m = TrainModel::from_llava(&c, stage.clone(), dtype).unwrap();
                let nodes = m.forward_backward(&batch(), false).unwrap();
                // Every decoder layer and the head ran as a node, and then none did.
                let ran = m.node_forwards();
                assert_eq!(ran, m.neva.llm.single_mut().unwrap().num_layers() + 1);
                m.set_layer_nodes(false);
                let composed = m.forward_backward(&batch(), false).unwrap();
                assert_eq!(m.node_forwards(), ran);
                let what = format!("{stage:?} {dtype:?}");
                assert!(
                    (nodes.loss - composed.loss).abs() < tol * composed.loss.abs(),
                    "{what}: {} vs {}",
                    nodes.loss,
                    composed.loss
                );
                for (name, v) in m.params() {
                    let a = nodes
                        .grads
                        .get(v.as_tensor())
                        .unwrap_or_else(|| panic!("{what}: no grad for {name}"));
                    let b = composed.grads.get(v.as_tensor()).unwrap();
                    let scale =
                        b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
                    if name.contains("embed_tokens") && scale == 0.0 {
                        continue; // rows no token of the batch uses
                    }
                    assert!(scale > 0.0, "{what} {name}: zero gradient");
                    assert!(
                        max_diff(a, b) / scale < tol as f32,
                        "{what} {name}: {} of {scale}",
                        max_diff(a, b)
                    );
                }
            }
        }
    }

    #[test]
    fn gradient_matches_a_finite_difference() {
        let c = tiny();
        let m = &mut TrainModel::from_llava(&c, Stage::Projector, DType::F32).unwrap();
        let out = m.forward_backward(&batch(), false).unwrap();
        let (_, bias) = m.params().iter().find(|(n, _)| n == "mm_projector.2.bias").unwrap().clone();
        let g = out.grads.get(bias.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        let base = bias.as_tensor().to_vec1::<f32>().unwrap();
        let eps = 1e-2f32;
        for i in [0usize, 7, 33] {
            let mut plus = base.clone();
            plus[i] += eps;
            bias.set(&Tensor::new(plus.as_slice(), &Device::Cpu).unwrap()).unwrap();
            let lp = m.forward_backward(&batch(), false).unwrap().loss;
            let mut minus = base.clone();
            minus[i] -= eps;
            bias.set(&Tensor::new(minus.as_slice(), &Device::Cpu).unwrap()).unwrap();
            let lm = m.forward_backward(&batch(), false).unwrap().loss;
            let fd = (lp - lm) / (2.0 * eps as f64);
            assert!((fd - g[i] as f64).abs() < 1e-3 * (1.0 + fd.abs()), "bias[{i}]: fd {fd} vs {}", g[i]);
        }
    }
}
