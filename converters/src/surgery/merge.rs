//! Linear merge of two checkpoints of one architecture: `wa·A + wb·B` per tensor, in f32, cast to
//! A's dtype, written in A's container with A's config and companion files.
//!
//! LLaMA checkpoints are compared after canonical mapping, so an HF directory merges with a
//! `.nemo` at any TP/PP; anything else is compared by stored name. Names, shapes and (for LLaMA)
//! the shape-defining hyper-parameters must agree; every difference is listed before refusing.
//! Integer tensors (buffers such as position ids) must be identical and are copied from A. Two
//! NeVA `.nemo` files merge part by part ([`super::neva::merge_neva`]).

use super::model::{ConfigEdits, LlamaModel};
use super::numeric::{derived_f32, to_f32};
use super::plan::{Action, Change, Edit, Plan, WriteAs};
use crate::checkpoint::{ByteSource, Checkpoint, TensorEntry, TensorMap};
use crate::error::{Error, Result};

/// Merge `a` and `b` as `wa·A + wb·B`.
pub fn merge(a: &Checkpoint, b: &Checkpoint, wa: f32, wb: f32) -> Result<Edit> {
    if !wa.is_finite() || !wb.is_finite() {
        return Err(Error::argument("--weights", format!("weights must be finite numbers, got {wa}, {wb}")));
    }
    let path = &a.meta.path;
    let mut plan = Plan::new(&format!("merge {wa}·A + {wb}·B"), path);
    plan.notes.push(format!("A = {}, B = {}", a.meta.path.display(), b.meta.path.display()));
    match (super::neva::is_neva(a), super::neva::is_neva(b)) {
        (true, true) => return super::neva::merge_neva(a, b, wa, wb, plan),
        (false, false) => {}
        (na, _) => {
            return Err(Error::invalid(
                path,
                format!(
                    "{} is a NeVA .nemo and {} is not; merge needs the same architecture (convert the other to NeVA first)",
                    if na { "A" } else { "B" },
                    if na { "B" } else { "A" }
                ),
            ))
        }
    }
    match (is_llama(a), is_llama(b)) {
        (true, true) => {
            let (ma, mb) = (LlamaModel::open(a)?, LlamaModel::open(b)?);
            check_same_llama(&ma.canonical.hparams, &mb.canonical.hparams, &mut plan, path)?;
            let tensors = merge_maps(&ma.canonical.tensors, &mb.canonical.tensors, wa, wb, &mut plan, path)?;
            let mut c = ma.canonical.clone();
            c.tensors = tensors;
            let (output, write_as, lines) = ma.emit(&c, &ConfigEdits::default(), a.meta.artifacts.clone())?;
            plan.config.extend(lines);
            Ok(Edit::new(output, write_as, plan))
        }
        (false, false) => {
            let tensors = merge_maps(a.tensors()?, b.tensors()?, wa, wb, &mut plan, path)?;
            let mut out = a.clone();
            out.shards[0].tensors = tensors;
            plan.notes.push("compared by stored tensor name (not a LLaMA checkpoint)".into());
            Ok(Edit::new(out, WriteAs::like(&a.meta.flavour), plan))
        }
        (la, _) => Err(Error::invalid(
            path,
            format!(
                "{} is a LLaMA checkpoint and {} is not; merge needs the same architecture",
                if la { "A" } else { "B" },
                if la { "B" } else { "A" }
            ),
        )),
    }
}

/// Refuse two LLaMAs whose shapes differ (every difference listed); note the hyper-parameters
/// that differ without changing a shape (the output keeps A's).
pub(super) fn check_same_llama(
    ha: &crate::names::llama::LlamaHparams,
    hb: &crate::names::llama::LlamaHparams,
    plan: &mut Plan,
    path: &std::path::Path,
) -> Result<()> {
    let mut diffs = Vec::new();
    for (what, x, y) in [
        ("layers", ha.layers, hb.layers),
        ("hidden size", ha.hidden, hb.hidden),
        ("ffn size", ha.ffn, hb.ffn),
        ("attention heads", ha.heads, hb.heads),
        ("query groups", ha.groups, hb.groups),
        ("head dim", ha.head_dim, hb.head_dim),
        ("vocabulary", ha.vocab, hb.vocab),
        ("tied embeddings", ha.tied as usize, hb.tied as usize),
    ] {
        if x != y {
            diffs.push(format!("{what}: A {x}, B {y}"));
        }
    }
    for (what, x, y) in [
        ("rope theta", ha.rope_theta, hb.rope_theta),
        ("rms norm eps", ha.norm_eps, hb.norm_eps),
        ("max positions", ha.max_positions as f64, hb.max_positions as f64),
    ] {
        if x != y {
            plan.notes.push(format!("{what} differs (A {x}, B {y}); the output keeps A's"));
        }
    }
    if !diffs.is_empty() {
        return Err(Error::invalid(
            path,
            format!("A and B are different architectures: {}", diffs.join("; ")),
        ));
    }
    Ok(())
}

/// LLaMA checkpoints are merged by canonical name: any `.nemo`, or an HF config of `model_type` llama.
fn is_llama(c: &Checkpoint) -> bool {
    match (&c.meta.flavour, &c.meta.config) {
        (crate::Flavour::Nemo { .. }, _) => true,
        (_, Some(crate::ModelConfig::HfJson(v))) => {
            v.get("model_type").and_then(|t| t.as_str()) == Some("llama")
        }
        _ => false,
    }
}

pub(super) fn merge_maps(
    a: &TensorMap,
    b: &TensorMap,
    wa: f32,
    wb: f32,
    plan: &mut Plan,
    path: &std::path::Path,
) -> Result<TensorMap> {
    let mut problems = Vec::new();
    for (n, ta) in a {
        match b.get(n) {
            None => problems.push(format!("only in A: {n}")),
            Some(tb) if tb.shape != ta.shape => {
                problems.push(format!("{n}: shape A {:?}, B {:?}", ta.shape, tb.shape))
            }
            Some(tb) if ta.dtype.is_float() != tb.dtype.is_float() => {
                problems.push(format!("{n}: dtype A {}, B {}", ta.dtype, tb.dtype))
            }
            _ => {}
        }
    }
    problems.extend(b.keys().filter(|n| !a.contains_key(*n)).map(|n| format!("only in B: {n}")));
    if !problems.is_empty() {
        let more = problems.len().saturating_sub(12);
        let mut text = problems.into_iter().take(12).collect::<Vec<_>>().join("; ");
        if more > 0 {
            text.push_str(&format!("; and {more} more"));
        }
        return Err(Error::invalid(path, format!("A and B do not hold the same tensors: {text}")));
    }
    let mut out = TensorMap::with_capacity(a.len());
    for (n, ta) in a {
        let tb = b[n.as_str()].clone();
        let merged = if ta.dtype.is_float() {
            let (ta2, name) = (ta.clone(), n.clone());
            derived_f32(ta.dtype, ta.shape.clone(), ta.origin.clone(), move || {
                let (x, y) = (to_f32(&format!("{name} (A)"), &ta2)?, to_f32(&format!("{name} (B)"), &tb)?);
                Ok(x.iter().zip(&y).map(|(x, y)| wa * x + wb * y).collect())
            })
        } else {
            let (ta2, name, origin) = (ta.clone(), n.clone(), ta.origin.clone());
            let source = ByteSource::derived(move || {
                let (x, y) = (ta2.bytes(&name)?, tb.bytes(&name)?);
                if x != y {
                    return Err(Error::invalid(
                        &*origin,
                        format!(
                            "tensor '{name}': {} values differ between A and B and cannot be averaged",
                            ta2.dtype
                        ),
                    ));
                }
                Ok(x.into_owned())
            });
            TensorEntry::new(ta.dtype, ta.shape.clone(), source, ta.origin.clone())
        };
        let detail = if ta.dtype.is_float() {
            format!("{wa}·A + {wb}·B in f32 -> {}", ta.dtype)
        } else {
            "identical in A and B".into()
        };
        plan.push(Change::new(n, Action::Modified, &merged).detail(detail));
        out.insert(n.clone(), merged);
    }
    Ok(out)
}
