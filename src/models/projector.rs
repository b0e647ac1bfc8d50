//! The NeVA/LLaVA multimodal projector: vision features `[B, N, C_vision]` → LLM embeddings
//! `[B, N, H]` (formats.md §6.1).
//!
//! The model asks for the liuhaotian/NeVA suffixes under `mm_projector`: `weight`/`bias` for
//! `linear`, `{2k}.weight`/`{2k}.bias` for `mlpNx_gelu` (odd indices are the parameter-free
//! GELUs of the `nn.Sequential`). Other dialects are renamed by the loader; [`llava_hf_name`]
//! is the llava-hf row of that table.

use std::fmt;
use std::path::Path;

use candle_core::{Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use serde_json::Value;

use super::clip::get_weight;
use crate::{Error, Result};
// The deepest `mlpNx_gelu` accepted, shared with the converters: LLaVA uses 2; far deeper is a
// typo, not a projector.
use shardsmith_converters::names::neva::MAX_MLP_DEPTH;

/// The projector architectures of `mm_mlp_adapter_type` / `mm_projector_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProjectorKind {
    /// One `Linear(C_vision → H)`.
    Linear,
    /// `depth` linears with exact GELU between: `Linear(C_vision → H)`, then `depth − 1` ×
    /// (GELU, `Linear(H → H)`). `mlp2x_gelu` is depth 2.
    MlpGelu {
        /// Number of linear layers (the N of `mlpNx_gelu`, ≥ 1).
        depth: usize,
    },
    /// No parameters; needs C_vision = H.
    Identity,
}

const VALID_FORMS: &str = "linear, mlp2x_gelu (any mlpNx_gelu with N >= 1), identity";

impl ProjectorKind {
    /// Parses the config string: `linear`, `mlpNx_gelu` (e.g. `mlp2x_gelu`) or `identity`.
    pub fn parse(s: &str) -> Result<Self> {
        let depth = s.strip_prefix("mlp").and_then(|r| r.strip_suffix("x_gelu"));
        match (s, depth) {
            ("linear", _) => Ok(Self::Linear),
            ("identity", _) => Ok(Self::Identity),
            // Digits only, like LLaVA's `^mlp(\d+)x_gelu$` (so no sign or spaces slip through).
            (_, Some(n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                match n.parse::<usize>() {
                    Ok(depth) if (1..=MAX_MLP_DEPTH).contains(&depth) => Ok(Self::MlpGelu { depth }),
                    _ => Err(Error::Usage(format!(
                        "projector type '{s}': depth must be 1 to {MAX_MLP_DEPTH} (valid: {VALID_FORMS})"
                    ))),
                }
            }
            _ => Err(Error::Usage(format!("unknown projector type '{s}' (valid: {VALID_FORMS})"))),
        }
    }

    /// The projector of a llava-hf `LlavaForConditionalGeneration` config: always
    /// `multi_modal_projector.linear_1` · act · `linear_2`, i.e. `mlp2x_gelu` when
    /// `projector_hidden_act` is `"gelu"` (HF's default). `path` names the file in errors.
    pub fn from_llava_hf_config(cfg: &Value, path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        match cfg.get("projector_hidden_act") {
            None | Some(Value::Null) => {}
            Some(Value::String(act)) if act == "gelu" => {}
            Some(other) => {
                return Err(Error::config(
                    path,
                    format!("projector_hidden_act {other} is not supported (gelu)"),
                ))
            }
        }
        // Newer llava-hf configs can drop the projector biases; the canonical names need them.
        if cfg.get("multimodal_projector_bias") == Some(&Value::Bool(false)) {
            return Err(Error::config(path, "multimodal_projector_bias false is not supported"));
        }
        Ok(Self::MlpGelu { depth: 2 })
    }
}

impl fmt::Display for ProjectorKind {
    /// The config spelling [`ProjectorKind::parse`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Linear => f.write_str("linear"),
            Self::MlpGelu { depth } => write!(f, "mlp{depth}x_gelu"),
            Self::Identity => f.write_str("identity"),
        }
    }
}

/// Maps a canonical projector name to llava-hf's: `mm_projector.0.*` →
/// `multi_modal_projector.linear_1.*`, `mm_projector.2.*` → `multi_modal_projector.linear_2.*`.
/// `None` for anything llava-hf has no tensor for (a `linear` projector, deeper MLPs).
pub fn llava_hf_name(canonical: &str) -> Option<String> {
    let rest = canonical.strip_prefix("mm_projector.")?;
    let (index, param) = rest.split_once('.')?;
    let layer = match index {
        "0" => "linear_1",
        "2" => "linear_2",
        _ => return None,
    };
    matches!(param, "weight" | "bias").then(|| format!("multi_modal_projector.{layer}.{param}"))
}

/// The projector module; its linears sit at `mm_projector` (linear) or `mm_projector.{2k}`.
#[derive(Debug, Clone)]
pub struct Projector {
    kind: ProjectorKind,
    /// The `nn.Sequential`'s linears in order (empty for identity).
    mm_projector: Vec<Linear>,
}

impl Projector {
    /// Loads the projector under `vb.pp("mm_projector")` (so `vb` is rooted where
    /// `mm_projector.` lives), mapping `in_dim` (vision hidden size) to `out_dim` (LLM H).
    pub fn load(vb: VarBuilder, kind: ProjectorKind, in_dim: usize, out_dim: usize) -> Result<Self> {
        let vb = vb.pp("mm_projector");
        let linear = |vb: VarBuilder, i: usize| -> Result<Linear> {
            let weight = get_weight(&vb, (out_dim, i), "weight")?;
            Ok(Linear::new(weight, Some(get_weight(&vb, out_dim, "bias")?)))
        };
        let mm_projector = match kind {
            ProjectorKind::Linear => vec![linear(vb, in_dim)?],
            ProjectorKind::MlpGelu { depth } => (0..depth)
                .map(|k| linear(vb.pp(2 * k), if k == 0 { in_dim } else { out_dim }))
                .collect::<Result<Vec<_>>>()?,
            ProjectorKind::Identity if in_dim == out_dim => Vec::new(),
            ProjectorKind::Identity => {
                return Err(Error::Usage(format!(
                    "identity projector needs equal widths, got vision {in_dim} and LLM {out_dim}"
                )))
            }
        };
        Ok(Self { kind, mm_projector })
    }

    /// The weights' dtype (none for the identity).
    pub fn dtype(&self) -> Option<candle_core::DType> {
        self.mm_projector.first().map(|l| l.weight().dtype())
    }

    /// The architecture loaded.
    pub fn kind(&self) -> ProjectorKind {
        self.kind
    }

    /// `[B, N, C_vision]` → `[B, N, H]` (any leading dims pass through).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = x.clone();
        for (k, linear) in self.mm_projector.iter().enumerate() {
            if k > 0 {
                // torch.nn.GELU() default is the exact erf form, not the tanh approximation.
                y = y.gelu_erf()?;
            }
            y = linear.forward(&y)?;
        }
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device};
    use serde_json::json;

    use super::*;

    /// Deterministic, irregular values in about [−1, 1].
    fn values(n: usize, seed: f64) -> Vec<f32> {
        (0..n).map(|i| ((i as f64 + 1.0) * 0.7 + seed).sin() as f32).collect()
    }

    /// erf by its Maclaurin series, which is exact to ~1e-12 for |x| ≤ 4 in f64.
    fn erf(x: f64) -> f64 {
        assert!(x.abs() <= 4.0);
        let (mut term, mut sum) = (x, x);
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    /// Plain f64 loops: y = W x + b per layer, exact GELU between layers.
    fn reference(layers: &[(Vec<f32>, Vec<f32>)], x: &[f32], in_dim: usize, out: usize) -> Vec<f64> {
        x.chunks(in_dim)
            .flat_map(|row| {
                let mut h: Vec<f64> = row.iter().map(|&v| v as f64).collect();
                for (k, (w, b)) in layers.iter().enumerate() {
                    if k > 0 {
                        h = h.iter().map(|&v| 0.5 * v * (1.0 + erf(v / 2f64.sqrt()))).collect();
                    }
                    h = (0..out)
                        .map(|o| {
                            let dot: f64 = (0..h.len()).map(|i| w[o * h.len() + i] as f64 * h[i]).sum();
                            dot + b[o] as f64
                        })
                        .collect();
                }
                h
            })
            .collect()
    }

    fn check(kind: ProjectorKind, names: &[&str], in_dim: usize, out: usize) {
        let dev = Device::Cpu;
        let mut map = HashMap::new();
        let mut layers = Vec::new();
        for (k, prefix) in names.iter().enumerate() {
            let fan_in = if k == 0 { in_dim } else { out };
            let (w, b) = (values(out * fan_in, k as f64), values(out, 10.0 + k as f64));
            map.insert(format!("{prefix}.weight"), Tensor::from_vec(w.clone(), (out, fan_in), &dev).unwrap());
            map.insert(format!("{prefix}.bias"), Tensor::from_vec(b.clone(), out, &dev).unwrap());
            layers.push((w, b));
        }
        let vb = VarBuilder::from_tensors(map, DType::F32, &dev);
        let proj = Projector::load(vb, kind, in_dim, out).unwrap();
        let x = values(2 * 3 * in_dim, 0.3);
        let y = proj.forward(&Tensor::from_vec(x.clone(), (2, 3, in_dim), &dev).unwrap()).unwrap();
        assert_eq!(y.dims(), &[2, 3, out]);
        let want = reference(&layers, &x, in_dim, out);
        let got = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let err = got.iter().zip(&want).map(|(&g, &w)| (g as f64 - w).abs()).fold(0.0, f64::max);
        eprintln!("projector {kind} max abs vs f64 reference: {err:e}");
        assert!(err <= 1e-6, "{kind}: {err}");
    }

    #[test]
    fn forward_matches_f64_reference() {
        check(ProjectorKind::Linear, &["mm_projector"], 3, 4);
        check(ProjectorKind::MlpGelu { depth: 2 }, &["mm_projector.0", "mm_projector.2"], 3, 4);
        let three = ["mm_projector.0", "mm_projector.2", "mm_projector.4"];
        check(ProjectorKind::MlpGelu { depth: 3 }, &three, 5, 2);
    }

    #[test]
    fn identity_passes_through_and_checks_widths() {
        let vb = VarBuilder::from_tensors(HashMap::new(), DType::F32, &Device::Cpu);
        let proj = Projector::load(vb.clone(), ProjectorKind::Identity, 4, 4).unwrap();
        let x = Tensor::from_vec(values(8, 1.0), (1, 2, 4), &Device::Cpu).unwrap();
        assert_eq!(proj.forward(&x).unwrap().to_vec3::<f32>().unwrap(), x.to_vec3::<f32>().unwrap());
        let err = Projector::load(vb, ProjectorKind::Identity, 4, 8).unwrap_err().to_string();
        assert!(err.contains("4") && err.contains("8"), "{err}");
    }

    #[test]
    fn missing_tensor_is_named() {
        let w = Tensor::zeros((4, 3), DType::F32, &Device::Cpu).unwrap();
        let map = HashMap::from([("mm_projector.0.weight".to_string(), w)]);
        let vb = VarBuilder::from_tensors(map, DType::F32, &Device::Cpu);
        let err = Projector::load(vb, ProjectorKind::MlpGelu { depth: 2 }, 3, 4).unwrap_err();
        assert_eq!(err.to_string(), "tensor 'mm_projector.0.bias': expected [4], got missing");
    }

    #[test]
    fn parse_forms() {
        assert_eq!(ProjectorKind::parse("linear").unwrap(), ProjectorKind::Linear);
        assert_eq!(ProjectorKind::parse("identity").unwrap(), ProjectorKind::Identity);
        assert_eq!(ProjectorKind::parse("mlp2x_gelu").unwrap(), ProjectorKind::MlpGelu { depth: 2 });
        assert_eq!(ProjectorKind::parse("mlp12x_gelu").unwrap(), ProjectorKind::MlpGelu { depth: 12 });
        for bad in [
            "mlp0x_gelu",
            "mlp65x_gelu",
            "mlp99999999999999999999x_gelu",
            "mlpx_gelu",
            "mlp+2x_gelu",
            "mlp2x_relu",
            "Linear",
            "",
        ] {
            let err = ProjectorKind::parse(bad).unwrap_err().to_string();
            assert!(err.contains("mlp2x_gelu") && err.contains("identity"), "{bad}: {err}");
        }
        for kind in [ProjectorKind::Linear, ProjectorKind::MlpGelu { depth: 3 }, ProjectorKind::Identity] {
            assert_eq!(ProjectorKind::parse(&kind.to_string()).unwrap(), kind);
        }
    }

    #[test]
    fn llava_hf_config_and_names() {
        let cfg = json!({"model_type": "llava", "projector_hidden_act": "gelu"});
        let kind = ProjectorKind::from_llava_hf_config(&cfg, "c.json").unwrap();
        assert_eq!(kind, ProjectorKind::MlpGelu { depth: 2 });
        let relu = json!({"projector_hidden_act": "relu"});
        let err = ProjectorKind::from_llava_hf_config(&relu, "hf/config.json").unwrap_err().to_string();
        assert!(err.starts_with("hf/config.json: ") && err.contains("relu"), "{err}");

        let hf = |s| llava_hf_name(s);
        assert_eq!(hf("mm_projector.0.weight").as_deref(), Some("multi_modal_projector.linear_1.weight"));
        assert_eq!(hf("mm_projector.0.bias").as_deref(), Some("multi_modal_projector.linear_1.bias"));
        assert_eq!(hf("mm_projector.2.weight").as_deref(), Some("multi_modal_projector.linear_2.weight"));
        assert_eq!(hf("mm_projector.2.bias").as_deref(), Some("multi_modal_projector.linear_2.bias"));
        for none in ["mm_projector.weight", "mm_projector.4.weight", "mm_projector.1.weight", "x.0.weight"] {
            assert_eq!(hf(none), None, "{none}");
        }
    }
}
