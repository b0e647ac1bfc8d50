//! `shardsmith diff A B`: compare two checkpoints of any formats after mapping both to canonical
//! names. Reports missing, unexpected and shape-mismatched tensors (with "did you mean"), and per
//! tensor either bit-identity or the max abs/rel difference. Exit status says whether they match.

use anyhow::Result;
use serde::Serialize;
use shardsmith_converters::convert::llama;
use shardsmith_converters::{formats, Checkpoint, DType, Flavour, ModelConfig, TensorEntry, TensorMap};
use std::path::Path;

/// How one tensor compares.
#[derive(Serialize, Debug, PartialEq)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Verdict {
    /// Same dtype, shape and bytes.
    Identical,
    /// Same shape; values differ (or dtypes differ) by at most these amounts.
    Differs {
        /// max |a − b|.
        max_abs: f64,
        /// max |a − b| / max(|a|, |b|) over elements where either is non-zero.
        max_rel: f64,
        /// Dtypes of A and B.
        dtypes: [DType; 2],
    },
    /// Shapes differ.
    ShapeMismatch {
        /// Shape in A.
        a: Vec<usize>,
        /// Shape in B.
        b: Vec<usize>,
    },
    /// In A only.
    MissingInB {
        /// Closest name in B.
        did_you_mean: Option<String>,
    },
    /// In B only.
    MissingInA {
        /// Closest name in A.
        did_you_mean: Option<String>,
    },
}

/// One row of the report.
#[derive(Serialize, Debug)]
pub struct Row {
    /// Canonical tensor name.
    pub name: String,
    /// The comparison.
    #[serde(flatten)]
    pub verdict: Verdict,
}

/// The whole comparison.
#[derive(Serialize, Debug)]
pub struct Report {
    /// Whether A and B hold the same tensors within tolerance.
    pub matches: bool,
    /// Absolute tolerance used.
    pub atol: f64,
    /// Rows, A's order then B-only names.
    pub tensors: Vec<Row>,
}

/// Tensors under canonical names: LLaMA checkpoints (HF or NeMo, any TP/PP) are mapped;
/// anything else is compared under its own names.
pub fn canonical(c: &Checkpoint) -> Result<TensorMap> {
    // NeVA, llava-hf and original LLaVA map to canonical names (the vision tower included when
    // it resolves). An original LLaVA with its own image tokens in the vocabulary, which the
    // converters do not read, still compares, under its own names.
    use shardsmith_converters::convert::{llava, neva};
    match &c.meta.config {
        Some(ModelConfig::NemoYaml(cfg)) if neva::is_neva(cfg) => return Ok(neva::canonical_tensors(c)?),
        Some(ModelConfig::HfJson(cfg)) if llava::is_llava_hf(cfg) => return Ok(neva::canonical_tensors(c)?),
        Some(ModelConfig::HfJson(cfg)) if llava::is_llava_original(cfg) => {
            let own_image_tokens = ["mm_use_im_start_end", "mm_use_im_patch_token"]
                .iter()
                .any(|k| cfg.get(*k).and_then(serde_json::Value::as_bool) == Some(true));
            if !own_image_tokens {
                return Ok(neva::canonical_tensors(c)?);
            }
        }
        _ => {}
    }
    Ok(match (&c.meta.flavour, &c.meta.config) {
        (Flavour::Nemo { .. }, _) => llama::from_nemo(c, None)?.tensors,
        (_, Some(ModelConfig::HfJson(v)))
            if v.get("model_type").and_then(|t| t.as_str()) == Some("llama") =>
        {
            llama::from_hf(c)?.tensors
        }
        _ => c.tensors()?.clone(),
    })
}

fn element(bytes: &[u8], dtype: DType, i: usize) -> f64 {
    let s = dtype.size();
    let b = &bytes[i * s..(i + 1) * s];
    match dtype {
        DType::F64 => f64::from_le_bytes(b.try_into().expect("8 bytes")),
        DType::F32 => f32::from_le_bytes(b.try_into().expect("4 bytes")) as f64,
        DType::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f64(),
        DType::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f64(),
        DType::I64 => i64::from_le_bytes(b.try_into().expect("8 bytes")) as f64,
        DType::I32 => i32::from_le_bytes(b.try_into().expect("4 bytes")) as f64,
        DType::I16 => i16::from_le_bytes([b[0], b[1]]) as f64,
        DType::I8 => b[0] as i8 as f64,
        DType::U8 | DType::Bool => b[0] as f64,
    }
}

fn compare(name: &str, a: &TensorEntry, b: &TensorEntry) -> Result<Verdict> {
    if a.shape != b.shape {
        return Ok(Verdict::ShapeMismatch { a: a.shape.clone(), b: b.shape.clone() });
    }
    let (ba, bb) = (a.bytes(name)?, b.bytes(name)?);
    if a.dtype == b.dtype && ba == bb {
        return Ok(Verdict::Identical);
    }
    let (mut max_abs, mut max_rel) = (0f64, 0f64);
    for i in 0..a.numel() {
        let (x, y) = (element(&ba, a.dtype, i), element(&bb, b.dtype, i));
        let d = (x - y).abs();
        let d = if d.is_nan() && !(x.is_nan() && y.is_nan()) {
            f64::INFINITY
        } else if d.is_nan() {
            0.0
        } else {
            d
        };
        max_abs = max_abs.max(d);
        let scale = x.abs().max(y.abs());
        if scale > 0.0 {
            max_rel = max_rel.max(d / scale);
        }
    }
    Ok(Verdict::Differs { max_abs, max_rel, dtypes: [a.dtype, b.dtype] })
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

fn closest(name: &str, candidates: &TensorMap, exclude: &TensorMap) -> Option<String> {
    candidates
        .keys()
        .filter(|c| !exclude.contains_key(*c))
        .map(|c| (edit_distance(name, c), c))
        .filter(|(d, c)| *d <= name.len().max(c.len()) / 3)
        .min()
        .map(|(_, c)| c.clone())
}

/// `atol` when it is finite and non-negative: NaN against a number differs by +inf, so an
/// infinite tolerance would call NaN weights a match.
pub fn check_tolerance(atol: f64) -> Result<f64> {
    if atol.is_finite() && atol >= 0.0 {
        Ok(atol)
    } else {
        anyhow::bail!("tolerance {atol} is not a finite number >= 0")
    }
}

/// Compare two tensor maps.
pub fn diff(a: &TensorMap, b: &TensorMap, atol: f64) -> Result<Report> {
    check_tolerance(atol)?;
    let mut rows = Vec::new();
    let mut matches = true;
    for (name, ta) in a {
        let verdict = match b.get(name) {
            Some(tb) => compare(name, ta, tb)?,
            None => Verdict::MissingInB { did_you_mean: closest(name, b, a) },
        };
        matches &= match &verdict {
            Verdict::Identical => true,
            Verdict::Differs { max_abs, .. } => *max_abs <= atol && atol > 0.0,
            _ => false,
        };
        rows.push(Row { name: name.clone(), verdict });
    }
    for name in b.keys().filter(|n| !a.contains_key(*n)) {
        matches = false;
        rows.push(Row {
            name: name.clone(),
            verdict: Verdict::MissingInA { did_you_mean: closest(name, a, b) },
        });
    }
    Ok(Report { matches, atol, tensors: rows })
}

/// Human-readable report.
pub fn render(r: &Report) -> String {
    let mut s = String::new();
    let w = r.tensors.iter().map(|t| t.name.len()).max().unwrap_or(4);
    let (mut same, mut close) = (0, 0);
    for row in &r.tensors {
        let text = match &row.verdict {
            Verdict::Identical => {
                same += 1;
                continue;
            }
            Verdict::Differs { max_abs, max_rel, dtypes } => {
                close += 1;
                format!(
                    "differs: max abs {max_abs:.3e}, max rel {max_rel:.3e} ({} vs {})",
                    dtypes[0], dtypes[1]
                )
            }
            Verdict::ShapeMismatch { a, b } => format!("shape {a:?} in A, {b:?} in B"),
            Verdict::MissingInB { did_you_mean } => format!("only in A{}", hint(did_you_mean)),
            Verdict::MissingInA { did_you_mean } => format!("only in B{}", hint(did_you_mean)),
        };
        s.push_str(&format!("{:<w$}  {text}\n", row.name));
    }
    s.push_str(&format!(
        "{} tensors: {same} bit-identical, {close} differ in value, {} missing or mismatched — {}\n",
        r.tensors.len(),
        r.tensors.len() - same - close,
        if r.matches { "MATCH" } else { "DIFFERENT" }
    ));
    s
}

fn hint(d: &Option<String>) -> String {
    d.as_ref().map_or(String::new(), |n| format!(" (did you mean '{n}'?)"))
}

/// The command; returns whether the checkpoints match.
pub fn run(a: &Path, b: &Path, atol: f64, json: bool) -> Result<bool> {
    let (ca, cb) = (formats::open(&crate::hub::resolve(a)?)?, formats::open(&crate::hub::resolve(b)?)?);
    let (mut ta, mut tb) = (canonical(&ca)?, canonical(&cb)?);
    let unresolved = drop_unmatched_tower(&mut ta, &mut tb).map(|side| if side { a } else { b });
    let report = diff(&ta, &tb, atol)?;
    let note = unresolved.map(|p| {
        format!(
            "note: {} only names its vision tower (not a local directory), so the towers are not compared\n",
            p.display()
        )
    });
    if json {
        let mut v = serde_json::to_value(&report)?;
        v["vision_not_compared"] = serde_json::json!(unresolved);
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}{}", note.unwrap_or_default(), render(&report));
    }
    Ok(report.matches)
}

/// Two vision-language checkpoints of which only one has its tower's weights at hand (the other
/// only names it, as original LLaVA and a frozen NeVA do): that tower is left out, since there
/// is nothing to compare it with. Returns which side only named its tower (`true`: A).
fn drop_unmatched_tower(a: &mut TensorMap, b: &mut TensorMap) -> Option<bool> {
    let has = |m: &TensorMap, prefix: &str| m.keys().any(|k| k.starts_with(prefix));
    let vision_language = |m: &TensorMap| has(m, "mm_projector.");
    if !(vision_language(a) && vision_language(b)) {
        return None;
    }
    let (tower_a, tower_b) = (has(a, "vision_model."), has(b, "vision_model."));
    if tower_a == tower_b {
        return None;
    }
    let holder = if tower_a { a } else { b };
    holder.retain(|k, _| !k.starts_with("vision_model."));
    Some(tower_b)
}
