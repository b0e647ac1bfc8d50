//! HF `CLIPVisionModel` (the NeVA/LLaVA vision tower) in candle.
//!
//! Loads by the HF names of formats.md §7.3 under a `VarBuilder` rooted where `vision_model.`
//! lives, and reproduces HF's forward exactly: `hidden_states[0]` is the encoder input after
//! `pre_layrnorm`, `hidden_states[k]` the output of layer k−1, and `post_layernorm` touches only
//! the pooled CLS vector. [`ClipVisionModel::features`] is the NeVA/LLaVA path of §6.6.

use candle_core::{DType, IndexOp, Module, Tensor};
use candle_nn::{LayerNorm, VarBuilder};

use crate::{ops, Error, Result};

pub use shardsmith_converters::convert::clip::{ClipActivation, ClipVisionConfig};

/// The MLP activation applied to x.
fn activate(act: ClipActivation, x: &Tensor) -> candle_core::Result<Tensor> {
    match act {
        ClipActivation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
        ClipActivation::Gelu => x.gelu_erf(),
    }
}

/// Fetches `vb.<name>` with `shape`, reporting a missing or misshapen tensor as
/// [`Error::Weight`] with its full name. The first `get` goes through untouched so backends that
/// initialise absent tensors (a `VarMap` for training) keep working.
pub(crate) fn get_weight<S: Into<candle_core::Shape>>(
    vb: &VarBuilder,
    shape: S,
    name: &str,
) -> Result<Tensor> {
    let shape = shape.into();
    match vb.get(shape.clone(), name) {
        Ok(t) => Ok(t),
        Err(err) => {
            let prefix = vb.prefix();
            let tensor = if prefix.is_empty() { name.to_string() } else { format!("{prefix}.{name}") };
            let expected = format!("{:?}", shape.dims());
            if !vb.contains_tensor(name) {
                return Err(Error::Weight { tensor, expected, got: "missing".into() });
            }
            match vb.get_unchecked(name) {
                Ok(t) if t.dims() != shape.dims() => {
                    Err(Error::Weight { tensor, expected, got: format!("{:?}", t.dims()) })
                }
                _ => Err(err.into()),
            }
        }
    }
}

/// `y = x·Wᵀ (+ b)` over the rows of x [.., in] as one 2-D GEMM ([`crate::ops::matmul`]).
/// candle_nn's `Linear` broadcasts W over the leading dim into a batched GEMM, 2.5× slower on
/// an H100 at [4, 577, 1024] → 4096 (0.276 against 0.111 ms, `bench_layer_parts`).
#[derive(Debug, Clone)]
struct Linear {
    /// [out, in].
    weight: Tensor,
    /// [out].
    bias: Option<Tensor>,
}

impl Linear {
    fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight, bias }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, None, None)
    }

    /// act(x·Wᵀ + b) (+ residual): the bias, a quick GELU and the residual follow the GEMM as
    /// one pass outside autograd ([`ops::epilogue::bias_act`]); the erf GELU runs after the bias.
    fn forward_with(
        &self,
        x: &Tensor,
        act: Option<ClipActivation>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        use ops::epilogue::{bias_act, Act};
        let y = ops::matmul(x, &self.weight.t()?)?;
        let y = match (&self.bias, act) {
            (Some(b), None) => return Ok(bias_act(&y, b, Act::Identity, residual)?),
            (Some(b), Some(ClipActivation::QuickGelu)) => {
                return Ok(bias_act(&y, b, Act::QuickGelu, residual)?)
            }
            (Some(b), Some(a)) => activate(a, &bias_act(&y, b, Act::Identity, None)?)?,
            (None, Some(a)) => activate(a, &y)?,
            (None, None) => y,
        };
        Ok(match residual {
            Some(r) => (r + y)?,
            None => y,
        })
    }
}

fn linear(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Linear> {
    let weight = get_weight(&vb, (out_dim, in_dim), "weight")?;
    let bias = get_weight(&vb, out_dim, "bias")?;
    Ok(Linear::new(weight, Some(bias)))
}

fn layer_norm(vb: VarBuilder, cfg: &ClipVisionConfig) -> Result<LayerNorm> {
    let weight = get_weight(&vb, cfg.hidden_size, "weight")?;
    let bias = get_weight(&vb, cfg.hidden_size, "bias")?;
    Ok(LayerNorm::new(weight, bias, cfg.layer_norm_eps))
}

/// `vision_model.embeddings`: patches, CLS token and learned positions.
#[derive(Debug, Clone)]
pub struct ClipVisionEmbeddings {
    class_embedding: Tensor, // [C]
    /// The Conv2d weight [C, ch, P, P] viewed as a linear map [C, ch·P·P], no bias.
    patch_embedding: Linear,
    position_embedding: Tensor, // [N+1, C]
    num_channels: usize,
    image_size: usize,
    patch_size: usize,
}

impl ClipVisionEmbeddings {
    /// Loads under `vision_model.embeddings` (never asks for the `position_ids` buffer).
    pub fn load(vb: VarBuilder, cfg: &ClipVisionConfig) -> Result<Self> {
        let (c, ch, p) = (cfg.hidden_size, cfg.num_channels, cfg.patch_size);
        let class_embedding = get_weight(&vb, c, "class_embedding")?;
        let conv = get_weight(&vb.pp("patch_embedding"), (c, ch, p, p), "weight")?;
        let patch_embedding = Linear::new(conv.reshape((c, ch * p * p))?, None);
        let position_embedding =
            get_weight(&vb.pp("position_embedding"), (cfg.num_positions(), c), "weight")?;
        Ok(Self {
            class_embedding,
            patch_embedding,
            position_embedding,
            num_channels: ch,
            image_size: cfg.image_size,
            patch_size: p,
        })
    }

    /// `[B, ch, S, S]` → `[B, N+1, C]` (CLS first, then patches row-major over the grid).
    ///
    /// A Conv2d with kernel = stride = P and no padding sees each P×P patch exactly once, so it
    /// equals cutting the image into patches, flattening each in the weight's (ch, ky, kx) order
    /// and one matmul with the flattened kernel; that avoids im2col on CPU. Patches are ordered
    /// (gy, gx) row-major, which is HF's `flatten(2).transpose(1, 2)` of the conv output.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, ch, h, w) = pixel_values.dims4()?;
        if ch != self.num_channels || h != self.image_size || w != self.image_size {
            return Err(Error::Usage(format!(
                "pixel values {:?} do not fit the vision tower: expected [B, {}, {}, {}]",
                pixel_values.dims(),
                self.num_channels,
                self.image_size,
                self.image_size
            )));
        }
        let (p, g) = (self.patch_size, self.image_size / self.patch_size);
        let patches = pixel_values
            .reshape((b, ch, g, p, g, p))? // [B, ch, gy, ky, gx, kx]
            .permute((0, 2, 4, 1, 3, 5))? // [B, gy, gx, ch, ky, kx]
            .reshape((b, g * g, ch * p * p))?; // [B, N, ch·P·P]
        let patch_embeds = self.patch_embedding.forward(&patches)?; // [B, N, C]
        let c = self.class_embedding.dim(0)?;
        let cls = self.class_embedding.reshape((1, 1, c))?.broadcast_as((b, 1, c))?;
        let embeddings = Tensor::cat(&[&cls.to_dtype(patch_embeds.dtype())?, &patch_embeds], 1)?;
        Ok(embeddings.broadcast_add(&self.position_embedding)?) // [B, N+1, C]
    }
}

/// `self_attn`: non-causal multi-head attention with biased q/k/v/out projections.
#[derive(Debug, Clone)]
pub struct ClipAttention {
    /// q, k and v as one projection: weight [3C, C] (q's rows, then k's, then v's), bias [3C].
    qkv: Linear,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl ClipAttention {
    /// Loads `self_attn.{q,k,v,out}_proj`; q, k and v are fused into one projection (one GEMM
    /// and one bias pass instead of three each).
    pub fn load(vb: VarBuilder, cfg: &ClipVisionConfig) -> Result<Self> {
        let c = cfg.hidden_size;
        let [q, k, v] = ["q_proj", "k_proj", "v_proj"].map(|n| linear(vb.pp(n), c, c));
        let (q, k, v) = (q?, k?, v?);
        let bias = |l: &Linear| l.bias.clone().expect("CLIP projections have biases");
        let qkv = Linear::new(
            Tensor::cat(&[&q.weight, &k.weight, &v.weight], 0)?,
            Some(Tensor::cat(&[bias(&q), bias(&k), bias(&v)], 0)?),
        );
        Ok(Self {
            qkv,
            out_proj: linear(vb.pp("out_proj"), c, c)?,
            num_heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
        })
    }

    /// `[B, T, C]` → `[B, T, C]`: softmax(QKᵀ·d^−½)V per head, plus `residual` when given
    /// (added in the output projection's epilogue).
    pub fn forward(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let (h, d) = (self.num_heads, self.head_dim);
        // [B, T, 3, H, d] → [3, B, H, T, d] in one copy; q, k and v are contiguous views of it.
        let qkv = self.qkv.forward_with(x, None, None)?.reshape((b, t, 3, h, d))?;
        let qkv = qkv.permute((2, 0, 3, 1, 4))?.contiguous()?;
        let (q, k, v) = (qkv.i(0)?, qkv.i(1)?, qkv.i(2)?);
        let scale = (d as f64).powf(-0.5);
        // softmax(QKᵀ·scale)V, the softmax in f32 as HF runs it (a fused kernel on CUDA in bf16).
        let y = ops::attention::full_attention(&q, &k, &v, scale)?; // [B, H, T, d]
        let y = y.transpose(1, 2)?.reshape((b, t, c))?; // [B, T, C]
        self.out_proj.forward_with(&y, None, residual)
    }
}

/// `mlp`: fc1 → activation → fc2.
#[derive(Debug, Clone)]
pub struct ClipMlp {
    fc1: Linear,
    fc2: Linear,
    act: ClipActivation,
}

impl ClipMlp {
    /// Loads `mlp.fc1` [I, C] and `mlp.fc2` [C, I].
    pub fn load(vb: VarBuilder, cfg: &ClipVisionConfig) -> Result<Self> {
        Ok(Self {
            fc1: linear(vb.pp("fc1"), cfg.hidden_size, cfg.intermediate_size)?,
            fc2: linear(vb.pp("fc2"), cfg.intermediate_size, cfg.hidden_size)?,
            act: cfg.hidden_act,
        })
    }

    /// `[B, T, C]` → `[B, T, C]`, plus `residual` when given (in fc2's epilogue).
    pub fn forward(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let h = self.fc1.forward_with(x, Some(self.act), None)?; // [B, T, I]
        self.fc2.forward_with(&h, None, residual)
    }
}

/// `encoder.layers.{i}`: a pre-LN transformer block.
#[derive(Debug, Clone)]
pub struct ClipEncoderLayer {
    self_attn: ClipAttention,
    layer_norm1: LayerNorm,
    mlp: ClipMlp,
    layer_norm2: LayerNorm,
}

impl ClipEncoderLayer {
    /// Loads one `encoder.layers.{i}`.
    pub fn load(vb: VarBuilder, cfg: &ClipVisionConfig) -> Result<Self> {
        Ok(Self {
            self_attn: ClipAttention::load(vb.pp("self_attn"), cfg)?,
            layer_norm1: layer_norm(vb.pp("layer_norm1"), cfg)?,
            mlp: ClipMlp::load(vb.pp("mlp"), cfg)?,
            layer_norm2: layer_norm(vb.pp("layer_norm2"), cfg)?,
        })
    }

    /// `x + attn(LN1(x))`, then `+ mlp(LN2(·))`; `[B, T, C]` → `[B, T, C]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.self_attn.forward(&self.layer_norm1.forward(x)?, Some(x))?;
        self.mlp.forward(&self.layer_norm2.forward(&x)?, Some(&x))
    }
}

/// What [`ClipVisionModel::forward`] returns, as HF's `BaseModelOutputWithPooling`.
#[derive(Debug, Clone)]
pub struct ClipOutput {
    /// Output of the last layer, no post-layernorm: `[B, N+1, C]`.
    pub last_hidden_state: Tensor,
    /// `post_layernorm(last_hidden_state[:, 0])`: `[B, C]`.
    pub pooler_output: Tensor,
    /// L+1 entries of `[B, N+1, C]` when asked for (index 0 = after `pre_layrnorm`, k = output
    /// of layer k−1), otherwise empty.
    pub hidden_states: Vec<Tensor>,
}

/// HF `CLIPVisionModel`. The `vision_model.` level is folded into this struct: its fields are
/// the segments below it.
#[derive(Debug, Clone)]
pub struct ClipVisionModel {
    embeddings: ClipVisionEmbeddings,
    pre_layrnorm: LayerNorm,
    /// `encoder.layers`
    layers: Vec<ClipEncoderLayer>,
    post_layernorm: LayerNorm,
    dtype: DType,
    device: candle_core::Device,
}

impl ClipVisionModel {
    /// Loads `vision_model.*` from `vb` (rooted where `vision_model.` lives), in `vb`'s dtype.
    pub fn load(vb: VarBuilder, cfg: &ClipVisionConfig) -> Result<Self> {
        let vm = vb.pp("vision_model");
        let layers_vb = vm.pp("encoder").pp("layers");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipEncoderLayer::load(layers_vb.pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeddings: ClipVisionEmbeddings::load(vm.pp("embeddings"), cfg)?,
            pre_layrnorm: layer_norm(vm.pp("pre_layrnorm"), cfg)?,
            layers,
            post_layernorm: layer_norm(vm.pp("post_layernorm"), cfg)?,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// Number of encoder layers L.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The dtype the tower computes in (that of its weights).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Embeddings + `pre_layrnorm` = `hidden_states[0]`; pixels are cast to the weight dtype
    /// and device first, as NeVA does.
    fn encoder_input(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let px = pixel_values.to_device(&self.device)?.to_dtype(self.dtype)?;
        Ok(self.pre_layrnorm.forward(&self.embeddings.forward(&px)?)?)
    }

    /// HF's forward on `[B, ch, S, S]` pixel values.
    pub fn forward(&self, pixel_values: &Tensor, output_hidden_states: bool) -> Result<ClipOutput> {
        let mut x = self.encoder_input(pixel_values)?; // [B, N+1, C]
        let mut hidden_states = Vec::new();
        for layer in &self.layers {
            if output_hidden_states {
                hidden_states.push(x.clone());
            }
            x = layer.forward(&x)?;
        }
        if output_hidden_states {
            hidden_states.push(x.clone());
        }
        let cls = x.i((.., 0, ..))?.contiguous()?; // [B, C]
        let pooler_output = self.post_layernorm.forward(&cls)?;
        Ok(ClipOutput { last_hidden_state: x, pooler_output, hidden_states })
    }

    /// The NeVA/LLaVA image features: `hidden_states[select_layer]` (negative counts from the
    /// end as in Python, −2 = the input of the last layer), without the CLS token when
    /// `drop_cls`: `[B, N, C]` (or `[B, N+1, C]`). Layers after the selected one are not run.
    pub fn features(&self, pixel_values: &Tensor, select_layer: isize, drop_cls: bool) -> Result<Tensor> {
        let count = self.layers.len() as isize + 1; // entries of hidden_states
        let index = if select_layer < 0 { select_layer + count } else { select_layer };
        if !(0..count).contains(&index) {
            return Err(Error::Usage(format!(
                "vision select layer {select_layer} is out of range for a tower with {} layers \
                 (valid {}..={})",
                self.layers.len(),
                -count,
                count - 1
            )));
        }
        let mut x = self.encoder_input(pixel_values)?;
        for layer in &self.layers[..index as usize] {
            x = layer.forward(&x)?;
        }
        if drop_cls {
            let t = x.dim(1)?;
            x = x.narrow(1, 1, t - 1)?.contiguous()?; // [B, N, C]
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarBuilder;

    use std::path::Path;

    use serde_json::Value;

    use super::*;

    fn fixture(rel: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/clip-vision").join(rel)
    }

    fn fixture_config() -> ClipVisionConfig {
        let path = fixture("config.json");
        let json: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        ClipVisionConfig::from_json(&json, path).unwrap()
    }

    fn setup(dtype: DType) -> (ClipVisionModel, HashMap<String, Tensor>) {
        let cfg = fixture_config();
        let weights =
            candle_core::safetensors::load(fixture("model.safetensors"), &Device::Cpu).expect("weights");
        let model = ClipVisionModel::load(VarBuilder::from_tensors(weights, dtype, &Device::Cpu), &cfg)
            .expect("load");
        let golden = candle_core::safetensors::load(fixture("golden/golden.safetensors"), &Device::Cpu)
            .expect("golden");
        (model, golden)
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap();
        d.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn f32_matches_hf_golden() {
        let (model, golden) = setup(DType::F32);
        let out = model.forward(&golden["pixel_values"], true).unwrap();
        assert_eq!(out.hidden_states.len(), 3);
        let mut worst = 0f32;
        for (k, h) in out.hidden_states.iter().enumerate() {
            worst = worst.max(max_abs(h, &golden[&format!("hidden_states_{k}")]));
        }
        worst = worst.max(max_abs(&out.last_hidden_state, &golden["last_hidden_state"]));
        worst = worst.max(max_abs(&out.pooler_output, &golden["pooler_output"]));
        let image = model.forward(&golden["image_pixel_values"], false).unwrap();
        assert!(image.hidden_states.is_empty());
        worst = worst.max(max_abs(&image.last_hidden_state, &golden["image_last_hidden_state"]));
        eprintln!("clip f32 max abs vs HF: {worst:e}");
        assert!(worst <= 1e-5, "max abs {worst}");
    }

    #[test]
    fn features_select_layer_and_drop_cls() {
        let (model, golden) = setup(DType::F32);
        let px = &golden["pixel_values"];
        let f = model.features(px, -2, true).unwrap();
        assert_eq!(f.dims(), &[2, 16, 48]);
        let want = golden["hidden_states_1"].narrow(1, 1, 16).unwrap();
        let err = max_abs(&f, &want);
        eprintln!("clip features(-2) max abs vs HF: {err:e}");
        assert!(err <= 1e-5);
        let last = model.features(px, -1, false).unwrap();
        assert!(max_abs(&last, &golden["last_hidden_state"]) <= 1e-5);
        let first = model.features(px, 0, false).unwrap();
        assert!(max_abs(&first, &golden["hidden_states_0"]) <= 1e-5);
        for bad in [-4, 3] {
            let err = model.features(px, bad, true).unwrap_err().to_string();
            assert!(err.contains("out of range"), "{err}");
        }
    }

    /// Poison the last layer: features(−2) must not touch it, forward must.
    #[test]
    fn features_stop_before_unneeded_layers() {
        let cfg = fixture_config();
        let mut w = candle_core::safetensors::load(fixture("model.safetensors"), &Device::Cpu).unwrap();
        let name = "vision_model.encoder.layers.1.mlp.fc2.weight";
        w.insert(name.into(), (w[name].ones_like().unwrap() * f64::NAN).unwrap());
        let vb = VarBuilder::from_tensors(w, DType::F32, &Device::Cpu);
        let model = ClipVisionModel::load(vb, &cfg).unwrap();
        let golden =
            candle_core::safetensors::load(fixture("golden/golden.safetensors"), &Device::Cpu).unwrap();
        let f = model.features(&golden["pixel_values"], -2, true).unwrap();
        assert!(max_abs(&f, &golden["hidden_states_1"].narrow(1, 1, 16).unwrap()) <= 1e-5);
        let out = model.forward(&golden["pixel_values"], false).unwrap();
        assert!(out.last_hidden_state.to_vec3::<f32>().unwrap()[0][0][0].is_nan());
    }

    #[test]
    fn bf16_stays_close() {
        let (model, golden) = setup(DType::BF16);
        // f32 pixels go in; the model casts them to its weight dtype.
        let out = model.forward(&golden["pixel_values"], true).unwrap();
        assert_eq!(out.last_hidden_state.dtype(), DType::BF16);
        let err = max_abs(&out.last_hidden_state, &golden["last_hidden_state"]);
        let f = model.features(&golden["pixel_values"], -2, true).unwrap();
        let ferr = max_abs(&f, &golden["hidden_states_1"].narrow(1, 1, 16).unwrap());
        eprintln!("clip bf16 max abs vs HF f32: last {err:e}, features(-2) {ferr:e}");
        assert!(err <= 0.15 && ferr <= 0.15, "{err} {ferr}");
    }

    #[test]
    fn missing_and_misshapen_weights_are_named() {
        let cfg = fixture_config();
        let base = candle_core::safetensors::load(fixture("model.safetensors"), &Device::Cpu).unwrap();
        let name = "vision_model.encoder.layers.1.self_attn.k_proj.bias";
        let mut w = base.clone();
        w.remove(name);
        let vb = VarBuilder::from_tensors(w, DType::F32, &Device::Cpu);
        let err = ClipVisionModel::load(vb, &cfg).unwrap_err();
        assert!(
            matches!(&err, Error::Weight { tensor, got, .. } if tensor == name && got == "missing"),
            "{err}"
        );
        let mut w = base;
        w.insert(name.into(), Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap());
        let vb = VarBuilder::from_tensors(w, DType::F32, &Device::Cpu);
        let err = ClipVisionModel::load(vb, &cfg).unwrap_err().to_string();
        assert_eq!(err, format!("tensor '{name}': expected [48], got [7]"));
    }
}
