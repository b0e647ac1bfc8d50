//! Resize a LLaMA's vocabulary: the embedding and (untied) output head change together, the
//! config follows, and the tokenizer gets the added tokens.
//!
//! * `--add-tokens a,b`: the tokens get the ids right after the tokenizer's last one. Rows that
//!   did not hold a token before (new rows, or padding rows a padded vocabulary already had) are
//!   initialised; the vocabulary grows only as far as the new ids need.
//! * `--to N`: grow (new rows initialised) or shrink (rows past N dropped; refused while the
//!   tokenizer or the config still uses an id ≥ N). A `.nemo`'s embedding size follows its
//!   tokenizer (padded for TP), so there `--to` can only restate it; use `--add-tokens`.
//!
//! Initialisation is a pure function of the existing rows that hold tokens: their per-column mean
//! (default), zeros, or `seeded:SEED` — the mean plus per-column standard deviation times
//! standard normal samples from a fixed generator seeded by SEED and the tensor name (the
//! diagonal of the Gaussian fit transformers uses). Running twice gives identical bytes.

use super::model::{ConfigEdits, LlamaModel};
use super::numeric::{column_stats, derived_f32, to_f32, SplitMix64};
use super::plan::{Action, Change, Edit, Plan};
use super::tokens::{add_tokens, TokenizerView};
use crate::checkpoint::{Checkpoint, TensorEntry};
use crate::error::{Error, Result};
use crate::names::llama::LlamaHparams;
use crate::transforms;
use serde_json::json;
use std::ops::Range;

/// What to do to the vocabulary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VocabChange {
    /// Add these tokens to the tokenizer (and rows for them).
    AddTokens(Vec<String>),
    /// Make the vocabulary exactly this many rows.
    To(usize),
}

/// How new rows are filled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Init {
    /// Per-column mean of the rows that hold tokens.
    Mean,
    /// Zeros.
    Zeros,
    /// Mean + std · N(0, 1) per column, from this seed.
    Seeded(u64),
}

impl Init {
    /// Parse `mean`, `zeros` or `seeded:SEED`.
    pub fn parse(s: &str) -> Result<Init> {
        match s {
            "mean" => Ok(Init::Mean),
            "zeros" => Ok(Init::Zeros),
            _ => match s.strip_prefix("seeded:").map(str::parse::<u64>) {
                Some(Ok(seed)) => Ok(Init::Seeded(seed)),
                _ => Err(Error::argument(
                    format!("--init '{s}'"),
                    "expected mean, zeros or seeded:SEED (SEED a non-negative integer)",
                )),
            },
        }
    }

    fn describe(self) -> String {
        match self {
            Init::Mean => "mean of the token rows".into(),
            Init::Zeros => "zeros".into(),
            Init::Seeded(s) => format!("seeded:{s} Gaussian fit of the token rows"),
        }
    }
}

/// Split `--add-tokens 'a,b'`: trimmed, non-empty, no duplicates.
pub fn parse_token_list(s: &str) -> Result<Vec<String>> {
    let tokens: Vec<String> = s.split(',').map(|t| t.trim().to_string()).collect();
    let arg = format!("--add-tokens '{s}'");
    if tokens.iter().any(String::is_empty) {
        return Err(Error::argument(arg, "empty token (tokens are comma-separated)"));
    }
    for (i, t) in tokens.iter().enumerate() {
        if tokens[..i].contains(t) {
            return Err(Error::argument(arg, format!("token '{t}' is given twice")));
        }
    }
    Ok(tokens)
}

/// Resize the vocabulary of a LLaMA checkpoint (HF directory or `.nemo`).
pub fn resize_vocab(src: &Checkpoint, change: &VocabChange, init: Init) -> Result<Edit> {
    let path = &src.meta.path;
    let model = LlamaModel::open(src)?;
    let mut c = model.canonical.clone();
    let v = c.hparams.vocab;
    let view = TokenizerView::read(&model)?;
    let t_len = view.len();
    if t_len > v {
        return Err(Error::invalid(
            path,
            format!("the tokenizer uses {t_len} ids but the embedding has only {v} rows; fix the checkpoint first"),
        ));
    }
    let mut plan = Plan::new("resize-vocab", path);
    let mut artifacts = src.meta.artifacts.clone();
    let mut edits = ConfigEdits::default();
    // (new vocabulary, rows to initialise)
    let (new_v, fresh): (usize, Range<usize>) = match change {
        VocabChange::AddTokens(tokens) => {
            if tokens.is_empty() {
                return Err(Error::argument("--add-tokens", "no tokens given"));
            }
            if !view.found() {
                return Err(Error::missing(
                    path,
                    "a tokenizer to add tokens to (use --to N to resize the matrices only)",
                ));
            }
            if let Some((t, id)) = tokens.iter().find_map(|t| view.id_of(t).map(|id| (t, id))) {
                return Err(Error::argument(
                    format!("--add-tokens '{t}'"),
                    format!("the tokenizer already has '{t}' (id {id})"),
                ));
            }
            let added = add_tokens(&model, tokens, t_len as u32)?;
            artifacts = added.artifacts;
            plan.files.extend(added.lines);
            if let Some(r) = added.nemo_tokenizer_ref {
                edits.nemo.push(("tokenizer.model", serde_yaml::Value::from(r)));
            }
            (v.max(t_len + tokens.len()), t_len..t_len + tokens.len())
        }
        VocabChange::To(n) => {
            let n = *n;
            if n == 0 {
                return Err(Error::argument("--to 0", "a vocabulary needs at least one row"));
            }
            if n > LlamaHparams::MAX_DIM {
                return Err(Error::argument(
                    format!("--to {n}"),
                    format!(
                        "at most {} rows (the largest size a LLaMA config may have)",
                        LlamaHparams::MAX_DIM
                    ),
                ));
            }
            if model.is_nemo() && n != v {
                return Err(Error::invalid(
                    path,
                    format!(
                        "a .nemo's vocabulary follows its tokenizer ({v} ids, padded per tp by \
                         make_vocab_size_divisible_by); --to {n} would disagree with it — use --add-tokens"
                    ),
                ));
            }
            if n < v {
                refuse_used_ids(&model, &view, n)?;
            }
            (n, v.min(n)..n)
        }
    };
    let stat_rows = if t_len > 0 { t_len.min(v) } else { v };
    if stat_rows == 0 && init != Init::Zeros && !fresh.is_empty() {
        return Err(Error::invalid(path, "no token rows to take statistics from; use --init zeros"));
    }
    let mut names = vec!["model.embed_tokens.weight"];
    if !c.hparams.tied {
        names.push("lm_head.weight");
    }
    for name in names {
        let t = c.tensors.get(name).ok_or_else(|| Error::missing(path, format!("tensor '{name}'")))?.clone();
        let resized = resize_rows(name, &t, new_v, fresh.clone(), stat_rows, init)?;
        let detail = if new_v < v {
            format!("rows {v} -> {new_v}: rows {new_v}.. dropped")
        } else {
            format!("rows {v} -> {new_v}: rows {}..{} = {}", fresh.start, fresh.end, init.describe())
        };
        plan.push(Change::new(name, Action::Modified, &resized).detail(detail));
        c.tensors.insert(name.to_string(), resized);
    }
    for (n, t) in &c.tensors {
        if n != "model.embed_tokens.weight" && n != "lm_head.weight" {
            plan.push(Change::new(n, Action::Kept, t));
        }
    }
    c.hparams.vocab = new_v;
    edits.hf.push(("vocab_size", json!(new_v)));
    let (output, write_as, lines) = model.emit(&c, &edits, artifacts)?;
    plan.config.extend(lines);
    if new_v == v && fresh.is_empty() {
        plan.notes.push(format!("the vocabulary already has {v} rows; nothing to do"));
    }
    Ok(Edit::new(output, write_as, plan))
}

/// Refuse shrinking below an id the tokenizer or config still uses, naming the highest ones.
fn refuse_used_ids(model: &LlamaModel, view: &TokenizerView, n: usize) -> Result<()> {
    let mut used: Vec<(u32, String)> =
        view.ids.range(n as u32..).rev().take(4).map(|(id, t)| (*id, format!("'{t}'"))).collect();
    if let super::model::Store::Hf(cfg) = &model.store {
        for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
            if let Some(id) = cfg.get(key).and_then(serde_json::Value::as_u64).filter(|id| *id as usize >= n)
            {
                used.push((id as u32, format!("config.json {key}")));
            }
        }
    }
    if used.is_empty() {
        return Ok(());
    }
    let shown: Vec<String> = used.iter().map(|(id, what)| format!("{id} ({what})")).collect();
    Err(Error::invalid(
        &model.source.meta.path,
        format!(
            "cannot shrink the vocabulary to {n}: ids still in use: {}{}",
            shown.join(", "),
            if view.len() > n { format!("; the tokenizer has {} ids", view.len()) } else { String::new() }
        ),
    ))
}

/// `t` with `rows` rows: rows in `fresh` initialised, the others kept (or dropped past `rows`).
fn resize_rows(
    name: &str,
    t: &TensorEntry,
    rows: usize,
    fresh: Range<usize>,
    stat_rows: usize,
    init: Init,
) -> Result<TensorEntry> {
    let [v, h] = t.shape[..] else {
        return Err(Error::invalid(
            &*t.origin,
            format!("tensor '{name}': expected 2 dims, got {:?}", t.shape),
        ));
    };
    if rows <= v && fresh.is_empty() {
        return transforms::trim_rows(name, t, rows);
    }
    if !t.dtype.is_float() {
        return Err(Error::InvalidCast { tensor: name.to_string(), from: t.dtype, to: crate::DType::F32 });
    }
    let mut parts = Vec::new();
    if fresh.start > 0 {
        parts.push(transforms::slice_rows(name, t, 0, fresh.start)?);
    }
    let count = fresh.len();
    let src = t.clone();
    let label = name.to_string();
    let origin = t.origin.clone();
    let fill = derived_f32(t.dtype, vec![count, h], t.origin.clone(), move || {
        // The new rows are computed whole: a named error, not an abort, when they do not fit.
        let mut out: Vec<f32> = Vec::new();
        out.try_reserve_exact(count * h).map_err(|_| {
            Error::invalid(
                &*origin,
                format!(
                    "tensor '{label}': cannot allocate {count} new rows × {h} in f32 ({} bytes)",
                    count * h * 4
                ),
            )
        })?;
        if init == Init::Zeros {
            out.resize(count * h, 0.0);
            return Ok(out);
        }
        let values = to_f32(&label, &src)?;
        let (mean, std) = column_stats(&values, h, stat_rows);
        match init {
            Init::Seeded(seed) => {
                let mut rng = SplitMix64::new(seed ^ fnv(&label));
                for _ in 0..count {
                    out.extend(mean.iter().zip(&std).map(|(m, s)| (m + s * rng.normal()) as f32));
                }
            }
            _ => {
                for _ in 0..count {
                    out.extend(mean.iter().map(|m| *m as f32));
                }
            }
        }
        Ok(out)
    });
    parts.push(fill);
    if fresh.end < v {
        parts.push(transforms::slice_rows(name, t, fresh.end, v)?);
    }
    debug_assert_eq!(parts.iter().map(|p| p.shape[0]).sum::<usize>(), rows);
    transforms::concat_rows(name, &parts)
}

/// FNV-1a, so embedding and head draw different samples from one seed.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::ByteSource;
    use crate::DType;
    use std::path::Path;
    use std::sync::Arc;

    fn matrix(rows: usize, cols: usize) -> TensorEntry {
        let vals: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        TensorEntry::new(
            DType::F32,
            vec![rows, cols],
            ByteSource::owned(super::super::numeric::from_f32(&vals, DType::F32)),
            Arc::from(Path::new("m")),
        )
    }

    #[test]
    fn grows_with_mean_rows_and_keeps_padding_rows() {
        // 4 rows, the tokenizer uses 2: ids 2, 3 get new tokens (re-initialised), row 4 is new.
        let t = matrix(4, 2);
        let out = resize_rows("e", &t, 5, 2..5, 2, Init::Mean).unwrap();
        assert_eq!(out.shape, [5, 2]);
        assert_eq!(to_f32("e", &out).unwrap(), [0., 1., 2., 3., 1., 2., 1., 2., 1., 2.]);
        // Re-initialising rows inside the matrix keeps the rows after them.
        let out = resize_rows("e", &t, 4, 2..3, 2, Init::Zeros).unwrap();
        assert_eq!(to_f32("e", &out).unwrap(), [0., 1., 2., 3., 0., 0., 6., 7.]);
    }

    #[test]
    fn shrinking_is_a_zero_copy_trim_and_seeded_is_reproducible() {
        let t = matrix(4, 2);
        let out = resize_rows("e", &t, 3, 3..3, 4, Init::Mean).unwrap();
        assert_eq!(to_f32("e", &out).unwrap(), [0., 1., 2., 3., 4., 5.]);
        let a = resize_rows("e", &t, 6, 4..6, 4, Init::Seeded(9)).unwrap();
        let b = resize_rows("e", &t, 6, 4..6, 4, Init::Seeded(9)).unwrap();
        assert!(a.bytes("e").unwrap() == b.bytes("e").unwrap());
        let c = resize_rows("f", &t, 6, 4..6, 4, Init::Seeded(9)).unwrap();
        assert!(a.bytes("e").unwrap() != c.bytes("f").unwrap(), "tensor name enters the seed");
    }

    #[test]
    fn parses_arguments() {
        assert_eq!(Init::parse("seeded:42").unwrap(), Init::Seeded(42));
        assert!(Init::parse("seeded:x").is_err());
        assert_eq!(parse_token_list("<a>, <b>").unwrap(), ["<a>", "<b>"]);
        assert!(parse_token_list("<a>,,<b>").is_err());
        assert!(parse_token_list("<a>,<a>").is_err());
    }
}
