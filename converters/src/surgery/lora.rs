//! Merge a PEFT LoRA adapter into a LLaMA: `W' = W + scale · B·A`, computed in f32 and cast back
//! to W's dtype (round to nearest-even).
//!
//! An adapter directory holds `adapter_config.json` and `adapter_model.safetensors` (or
//! `adapter_model.bin`), with keys such as
//! `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` ([r, in]) and `…lora_B.weight`
//! ([out, r]); an adapter name (`lora_A.default.weight`) is accepted too. The scale is
//! `lora_alpha / r`, or `lora_alpha / √r` with `use_rslora`, with per-module `rank_pattern` /
//! `alpha_pattern` overrides matched the way PEFT matches them (`(^|.*\.)KEY$`). `fan_in_fan_out`
//! is ignored: it describes GPT-2's `Conv1D` ([in, out] weights), and PEFT itself turns it off for
//! `nn.Linear` targets, which every LLaMA projection is. Embedding adapters
//! (`lora_embedding_A` [r, V], `lora_embedding_B` [H, r]) add `(B·A)ᵀ`. Full tensors the adapter
//! saves (`modules_to_save`) replace the base's. DoRA is refused.
//!
//! The product sums over r in a fixed order, so merging twice gives identical bytes. NeMo's own
//! LoRA adapter `.nemo` files are merged by [`super::lora_nemo`].

use super::model::{ConfigEdits, LlamaModel};
use super::numeric::{derived_f32, to_f32};
use super::plan::{Action, Change, Edit, Plan};
use crate::checkpoint::{Checkpoint, TensorEntry, TensorMap};
use crate::error::{Error, IoContext, Result};
use crate::formats::{safetensors, torch_zip};
use regex::Regex;
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What `adapter_config.json` says about scaling and targets.
#[derive(Clone, Debug)]
pub struct LoraConfig {
    /// Default rank.
    pub r: usize,
    /// Default alpha.
    pub alpha: f64,
    /// `alpha / sqrt(r)` instead of `alpha / r`.
    pub rslora: bool,
    /// `target_modules`: a list of module-name suffixes, or one regex (full match).
    pub targets: Targets,
    /// Per-module rank overrides.
    pub rank_pattern: Vec<(String, usize)>,
    /// Per-module alpha overrides.
    pub alpha_pattern: Vec<(String, f64)>,
}

/// PEFT's `target_modules`.
#[derive(Clone, Debug)]
pub enum Targets {
    /// Module names or suffixes (`q_proj` matches `….q_proj`).
    List(Vec<String>),
    /// A regular expression matched against the whole module name.
    Regex(String),
    /// `all-linear`, or absent: not checked.
    Any,
}

impl LoraConfig {
    /// Parse `adapter_config.json`.
    pub fn parse(v: &Json, path: &Path) -> Result<Self> {
        let bad = |what: String| Error::invalid(path, what);
        if let Some(t) = v.get("peft_type").and_then(Json::as_str) {
            if t != "LORA" {
                return Err(bad(format!("peft_type is '{t}'; only LORA adapters can be merged")));
            }
        }
        // A flag PEFT would read as true must not be read as false here.
        let flag = |key: &str| match v.get(key) {
            None | Some(Json::Null) => Ok(false),
            Some(Json::Bool(b)) => Ok(*b),
            Some(other) => Err(bad(format!("{key} should be true or false, found {other}"))),
        };
        if flag("use_dora")? {
            return Err(bad("use_dora: DoRA adapters (magnitude vectors) are not supported".into()));
        }
        let r = match v.get("r") {
            None => 8,
            Some(r) => r
                .as_u64()
                .filter(|r| *r > 0)
                .ok_or_else(|| bad(format!("'r' must be a positive integer, got {r}")))?
                as usize,
        };
        let alpha = match v.get("lora_alpha") {
            None => 8.0,
            Some(a) => a.as_f64().ok_or_else(|| bad(format!("'lora_alpha' must be a number, got {a}")))?,
        };
        let targets = match v.get("target_modules") {
            Some(Json::Array(a)) => {
                Targets::List(a.iter().filter_map(Json::as_str).map(String::from).collect())
            }
            Some(Json::String(s)) if s == "all-linear" => Targets::Any,
            Some(Json::String(s)) => Targets::Regex(s.clone()),
            _ => Targets::Any,
        };
        let patterns = |key: &str| -> Vec<(String, Json)> {
            v.get(key)
                .and_then(Json::as_object)
                .map_or_else(Vec::new, |m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        };
        let rank_pattern = patterns("rank_pattern")
            .into_iter()
            .map(|(k, r)| {
                r.as_u64()
                    .filter(|r| *r > 0)
                    .map(|r| (k.clone(), r as usize))
                    .ok_or_else(|| bad(format!("rank_pattern '{k}': {r} is not a rank")))
            })
            .collect::<Result<_>>()?;
        let alpha_pattern = patterns("alpha_pattern")
            .into_iter()
            .map(|(k, a)| {
                a.as_f64()
                    .map(|a| (k.clone(), a))
                    .ok_or_else(|| bad(format!("alpha_pattern '{k}': {a} is not a number")))
            })
            .collect::<Result<_>>()?;
        Ok(LoraConfig { r, alpha, rslora: flag("use_rslora")?, targets, rank_pattern, alpha_pattern })
    }

    /// (rank, alpha, scale) for `module`.
    pub fn scaling(&self, module: &str) -> Result<(usize, f64, f64)> {
        let r = pattern_value(&self.rank_pattern, module)?.unwrap_or(self.r);
        let alpha = pattern_value(&self.alpha_pattern, module)?.unwrap_or(self.alpha);
        let scale = if self.rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 };
        Ok((r, alpha, scale))
    }

    /// Whether `target_modules` covers `module`.
    pub fn targets(&self, module: &str) -> Result<bool> {
        Ok(match &self.targets {
            Targets::Any => true,
            Targets::List(l) => l.iter().any(|t| module == t || module.ends_with(&format!(".{t}"))),
            Targets::Regex(re) => Regex::new(&format!("^(?:{re})$"))
                .map_err(|e| Error::argument(format!("target_modules '{re}'"), e.to_string()))?
                .is_match(module),
        })
    }
}

fn pattern_value<T: Copy>(patterns: &[(String, T)], module: &str) -> Result<Option<T>> {
    for (key, v) in patterns {
        let re = Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
            .map_err(|e| Error::argument(format!("pattern '{key}'"), e.to_string()))?;
        if re.is_match(module) {
            return Ok(Some(*v));
        }
    }
    Ok(None)
}

/// An adapter read from its directory.
#[derive(Clone, Debug)]
pub struct Adapter {
    /// The directory.
    pub dir: PathBuf,
    /// Its config.
    pub config: LoraConfig,
    /// Its tensors, as stored.
    pub tensors: TensorMap,
}

impl Adapter {
    /// Read `adapter_config.json` and `adapter_model.safetensors` (or `.bin`) from `dir`.
    pub fn read(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read(&cfg_path).at(&cfg_path)?;
        let v: Json =
            serde_json::from_slice(&text).map_err(|e| Error::malformed(&cfg_path, "json", e.to_string()))?;
        let config = LoraConfig::parse(&v, &cfg_path)?;
        let st = dir.join("adapter_model.safetensors");
        let bin = dir.join("adapter_model.bin");
        let tensors = if st.is_file() {
            safetensors::read_file(&st)?
        } else if bin.is_file() {
            torch_zip::read_file(&bin)?.tensors
        } else {
            return Err(Error::missing(dir, "adapter_model.safetensors (or adapter_model.bin)"));
        };
        Ok(Adapter { dir: dir.to_path_buf(), config, tensors })
    }
}

/// The two halves of one module's adapter.
#[derive(Default)]
struct Pair {
    a: Option<(String, TensorEntry)>,
    b: Option<(String, TensorEntry)>,
    embedding: bool,
}

/// Merge `adapter` into the LLaMA `base` (HF directory or `.nemo`); the output keeps the base's
/// container, config and dtypes.
pub fn merge_lora(base: &Checkpoint, adapter: &Adapter) -> Result<Edit> {
    let model = LlamaModel::open(base)?;
    let mut c = model.canonical.clone();
    let apath = adapter.dir.join("adapter_model.safetensors");
    // Linear adapters are `….lora_A[.<adapter>].weight`; embedding ones bare `….lora_embedding_A[.<adapter>]`.
    let linear_re = Regex::new(r"^(.+)\.lora_(A|B)(?:\.[^.]+)?\.weight$").expect("constant regex");
    let embedding_re = Regex::new(r"^(.+)\.lora_embedding_(A|B)(?:\.[^.]+)?$").expect("constant regex");
    let mut pairs: BTreeMap<String, Pair> = BTreeMap::new();
    let mut replace: Vec<(String, String, TensorEntry)> = Vec::new();
    for (key, t) in &adapter.tensors {
        let rest = key.strip_prefix("base_model.model.").ok_or_else(|| {
            Error::invalid(
                &apath,
                format!("tensor '{key}': expected a PEFT key starting with 'base_model.model.'"),
            )
        })?;
        if rest.contains("lora_magnitude_vector") {
            return Err(Error::invalid(
                &apath,
                format!("tensor '{key}': DoRA magnitude vectors are not supported"),
            ));
        }
        let found = linear_re
            .captures(rest)
            .map(|m| (m, false))
            .or_else(|| embedding_re.captures(rest).map(|m| (m, true)));
        if let Some((m, embedding)) = found {
            let p = pairs.entry(m[1].to_string()).or_default();
            if p.embedding != embedding && (p.a.is_some() || p.b.is_some()) {
                return Err(Error::invalid(
                    &apath,
                    format!("module '{}': mixes linear and embedding LoRA weights", &m[1]),
                ));
            }
            p.embedding = embedding;
            let slot = if &m[2] == "A" { &mut p.a } else { &mut p.b };
            if slot.replace((key.clone(), t.clone())).is_some() {
                return Err(Error::invalid(
                    &apath,
                    format!("module '{}': two LoRA {} weights", &m[1], &m[2]),
                ));
            }
        } else if c.tensors.contains_key(rest) {
            replace.push((rest.to_string(), key.clone(), t.clone()));
        } else {
            return Err(Error::invalid(
                &apath,
                format!(
                    "tensor '{key}': neither a LoRA A/B weight nor a tensor of the base model ('{rest}')"
                ),
            ));
        }
    }
    if pairs.is_empty() && replace.is_empty() {
        return Err(Error::missing(&apath, "LoRA weights (…lora_A.weight / …lora_B.weight)"));
    }
    let mut plan = Plan::new("merge-lora", &base.meta.path);
    plan.notes.push(format!("adapter {}", adapter.dir.display()));
    let mut changed: BTreeMap<String, String> = BTreeMap::new();
    for (module, p) in pairs {
        let (Some((ka, a)), Some((kb, b))) = (p.a, p.b) else {
            return Err(Error::missing(
                &apath,
                format!("module '{module}': lora_A or lora_B (both are needed)"),
            ));
        };
        if !adapter.config.targets(&module)? {
            return Err(Error::invalid(
                adapter.dir.join("adapter_config.json"),
                format!("module '{module}' has LoRA weights but target_modules does not name it"),
            ));
        }
        let target = format!("{module}.weight");
        let w = c.tensors.get(&target).cloned().ok_or_else(|| {
            Error::invalid(
                &apath,
                format!("module '{module}': the base has no tensor '{target}' to merge into"),
            )
        })?;
        let (r, alpha, scale) = adapter.config.scaling(&module)?;
        let [ar, an] = dims2(&ka, &a, &apath)?;
        let [bm, br] = dims2(&kb, &b, &apath)?;
        if ar != r || br != r {
            return Err(Error::invalid(
                &apath,
                format!("module '{module}': expected rank {r} from adapter_config.json, got lora_A {:?}, lora_B {:?}", a.shape, b.shape),
            ));
        }
        // The product B·A is [bm, an]; it is added transposed for embeddings.
        let transpose = p.embedding;
        let want = if transpose { vec![an, bm] } else { vec![bm, an] };
        if w.shape != want {
            return Err(Error::invalid(
                &apath,
                format!(
                    "module '{module}': B·A{} has shape {want:?}, base '{target}' has {:?}",
                    if transpose { "ᵀ" } else { "" },
                    w.shape
                ),
            ));
        }
        if !w.dtype.is_float() {
            return Err(Error::InvalidCast { tensor: target, from: w.dtype, to: crate::DType::F32 });
        }
        let merged = merged_entry(&target, w, a, b, scale as f32, transpose);
        let how = format!(
            "W + {alpha}/{}{r} · B·A{} (lora r={r})",
            if adapter.config.rslora { "√" } else { "" },
            if transpose { "ᵀ" } else { "" }
        );
        changed.insert(target.clone(), how);
        c.tensors.insert(target, merged);
    }
    for (name, key, t) in replace {
        let old = &c.tensors[&name];
        if old.shape != t.shape {
            return Err(Error::invalid(
                &apath,
                format!("tensor '{key}': shape {:?}, base '{name}' has {:?}", t.shape, old.shape),
            ));
        }
        let t = if old.dtype.is_float() && t.dtype.is_float() { t.cast(&name, old.dtype)? } else { t };
        if t.dtype != old.dtype {
            return Err(Error::InvalidCast { tensor: name, from: t.dtype, to: old.dtype });
        }
        changed.insert(name.clone(), format!("replaced by adapter tensor '{key}'"));
        c.tensors.insert(name, t);
    }
    for (n, t) in &c.tensors {
        plan.push(match changed.get(n) {
            Some(how) => Change::new(n, Action::Modified, t).detail(how.clone()),
            None => Change::new(n, Action::Kept, t),
        });
    }
    let (output, write_as, lines) = model.emit(&c, &ConfigEdits::default(), base.meta.artifacts.clone())?;
    plan.config.extend(lines);
    Ok(Edit::new(output, write_as, plan))
}

fn dims2(name: &str, t: &TensorEntry, path: &Path) -> Result<[usize; 2]> {
    match t.shape[..] {
        [a, b] if t.dtype.is_float() => Ok([a, b]),
        _ => Err(Error::invalid(
            path,
            format!("tensor '{name}': expected a 2-D float matrix, got {} {:?}", t.dtype, t.shape),
        )),
    }
}

/// `W + scale · (B·A)` (or its transpose), lazily. B·A sums over the rank in order, in f32.
/// Shapes are the caller's to check: A `[r, n]`, B `[m, r]`, W `[m, n]` (`[n, m]` transposed).
pub(crate) fn merged_entry(
    name: &str,
    w: TensorEntry,
    a: TensorEntry,
    b: TensorEntry,
    scale: f32,
    transpose: bool,
) -> TensorEntry {
    let (dtype, shape, origin) = (w.dtype, w.shape.clone(), w.origin.clone());
    let name = name.to_string();
    derived_f32(dtype, shape, origin, move || {
        let (r, n) = (a.shape[0], a.shape[1]);
        let m = b.shape[0];
        let (av, bv) = (to_f32(&format!("{name} (lora_A)"), &a)?, to_f32(&format!("{name} (lora_B)"), &b)?);
        let mut out = to_f32(&name, &w)?;
        let mut row = vec![0f32; n];
        for i in 0..m {
            row.iter_mut().for_each(|x| *x = 0.0);
            for k in 0..r {
                let bik = bv[i * r + k];
                for (x, akj) in row.iter_mut().zip(&av[k * n..(k + 1) * n]) {
                    *x += bik * akj;
                }
            }
            for (j, p) in row.iter().enumerate() {
                let at = if transpose { j * m + i } else { i * n + j };
                out[at] += scale * p;
            }
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::ByteSource;
    use crate::surgery::numeric::from_f32;
    use crate::DType;
    use serde_json::json;
    use std::sync::Arc;

    fn m(rows: usize, cols: usize, vals: &[f32], dtype: DType) -> TensorEntry {
        TensorEntry::new(
            dtype,
            vec![rows, cols],
            ByteSource::owned(from_f32(vals, dtype)),
            Arc::from(Path::new("m")),
        )
    }

    #[test]
    fn merge_matches_hand_computation_and_transposes() {
        // W [2, 3], A [1, 3], B [2, 1]: B·A = [[1, 2, 3], [2, 4, 6]].
        let w = m(2, 3, &[0.; 6], DType::F32);
        let a = m(1, 3, &[1., 2., 3.], DType::F32);
        let b = m(2, 1, &[1., 2.], DType::F32);
        let out = merged_entry("w", w, a.clone(), b.clone(), 0.5, false);
        assert_eq!(to_f32("w", &out).unwrap(), [0.5, 1., 1.5, 1., 2., 3.]);
        let wt = m(3, 2, &[1.; 6], DType::BF16);
        let out = merged_entry("w", wt, a, b, 1.0, true);
        assert_eq!(out.dtype, DType::BF16);
        assert_eq!(to_f32("w", &out).unwrap(), [2., 3., 3., 5., 4., 7.]);
    }

    #[test]
    fn config_scaling_and_patterns() {
        let v = json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
                       "rank_pattern": {"layers.1.self_attn.q_proj": 4}, "alpha_pattern": {"v_proj": 4}});
        let c = LoraConfig::parse(&v, Path::new("c")).unwrap();
        assert_eq!(c.scaling("model.layers.0.self_attn.q_proj").unwrap(), (8, 16.0, 2.0));
        assert_eq!(c.scaling("model.layers.1.self_attn.q_proj").unwrap(), (4, 16.0, 4.0));
        assert_eq!(
            c.scaling("model.layers.11.self_attn.q_proj").unwrap(),
            (8, 16.0, 2.0),
            "no partial-segment match"
        );
        assert_eq!(c.scaling("model.layers.0.self_attn.v_proj").unwrap(), (8, 4.0, 0.5));
        assert!(c.targets("model.layers.0.self_attn.q_proj").unwrap());
        assert!(!c.targets("model.layers.0.self_attn.k_proj").unwrap());
        let rs = LoraConfig::parse(&json!({"r": 16, "lora_alpha": 8, "use_rslora": true}), Path::new("c"))
            .unwrap();
        assert_eq!(rs.scaling("x").unwrap().2, 2.0);
        for bad in [json!({"use_rslora": "yes"}), json!({"use_dora": "true"})] {
            let err = LoraConfig::parse(&bad, Path::new("c")).unwrap_err().to_string();
            assert!(err.contains("should be true or false"), "{bad}: {err}");
        }
        assert!(LoraConfig::parse(&json!({"use_dora": true}), Path::new("c"))
            .unwrap_err()
            .to_string()
            .contains("DoRA"));
    }
}
