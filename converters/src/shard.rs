//! Tensor parallelism declared per tensor ([`ShardSpec`]), and the two functions that reshard:
//! [`split`] and [`merge`], inverses of each other (formats.md §4.1–§4.2). Pipeline parallelism is
//! a renumbering of layers ([`stage_of_layer`], [`global_layer`], §4.4).
//!
//! Both functions are plans: they validate shapes at once (a dimension that does not divide by
//! tp is an error before any byte moves) and return lazy entries built from
//! [`crate::transforms`] gathers, so a contiguous slice of a mapped file stays a mapped range.

use crate::checkpoint::TensorEntry;
use crate::error::{Error, Result};
use crate::transforms::{bad, concat_cols, concat_rows, slice_cols, slice_rows, RowPlan};
use serde::Serialize;

/// How one tensor is divided over `tp` tensor-parallel ranks (formats.md §4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ShardSpec {
    /// The full tensor on every rank (norms, `inv_freq`, the NeVA projector).
    Replicated,
    /// Contiguous dim-0 pieces: column-parallel weights, and fused QKV, where the per-group
    /// interleave makes each piece whole query groups.
    SplitRows,
    /// Contiguous dim-1 pieces of a 2-D weight: row-parallel (`linear_proj`, `linear_fc2`).
    SplitCols,
    /// GLU fc1 `[gate; up]` `[2F, H]`: rank `t` holds `[gate_t; up_t]` `[2F/tp, H]`, so its local
    /// `silu(first half) · second half` stays correct.
    GluHalves,
    /// Vocab-parallel dim 0 (embedding, output layer), padded with zero rows to `padded` rows
    /// before splitting and trimmed back to `rows` after merging.
    Vocab {
        /// The true vocabulary size V (rows kept by [`merge`]).
        rows: usize,
        /// Vp for the TP size in use ([`padded_vocab`]); must divide by tp.
        padded: usize,
    },
}

/// The padded vocabulary Vp = ⌈V / (m·tp)⌉ · (m·tp) (formats.md §4.2), with
/// `m = make_vocab_size_divisible_by`. A zero `m` or `tp` counts as 1.
pub fn padded_vocab(vocab: usize, divisible_by: usize, tp: usize) -> usize {
    let multiple = divisible_by.max(1) * tp.max(1);
    vocab.div_ceil(multiple) * multiple
}

/// `make_vocab_size_divisible_by` the HF → NeMo converter picks: the largest power of two ≤ 128
/// dividing the HF `vocab_size` (formats.md §3.8; 32000 → 128, 32008 → 8).
pub fn divisible_by_for_hf_vocab(vocab: usize) -> usize {
    [128, 64, 32, 16, 8, 4, 2].into_iter().find(|m| vocab % m == 0).unwrap_or(1)
}

/// Error unless `size` (dim `dim` of `t`) divides by `tp`.
fn check_divides(name: &str, t: &TensorEntry, dim: usize, size: usize, tp: usize) -> Result<usize> {
    if size % tp != 0 {
        return Err(bad(
            &t.origin,
            name,
            format!(
                "dim {dim} of size {size} (shape {:?}) does not divide by tp={tp} (expected a multiple of {tp}, got {size})",
                t.shape
            ),
        ));
    }
    Ok(size / tp)
}

/// Rows of a tensor that must have at least one dimension.
fn rows(name: &str, t: &TensorEntry, spec: ShardSpec) -> Result<usize> {
    t.shape
        .first()
        .copied()
        .ok_or_else(|| bad(&t.origin, name, format!("is a scalar; {spec:?} needs at least 1 dimension")))
}

/// `(rows, cols)` of a 2-D tensor.
fn dims2(name: &str, t: &TensorEntry, spec: ShardSpec) -> Result<(usize, usize)> {
    match t.shape[..] {
        [r, c] => Ok((r, c)),
        _ => {
            Err(bad(&t.origin, name, format!("has shape {:?}; {spec:?} needs 2 dimensions [R, C]", t.shape)))
        }
    }
}

/// Even row count of a GLU fc1 `[2F, …]`; returns F.
fn glu_half(name: &str, t: &TensorEntry, rows: usize, what: &str) -> Result<usize> {
    if rows % 2 != 0 {
        return Err(bad(
            &t.origin,
            name,
            format!("{what} has {rows} rows (shape {:?}), expected an even count [gate; up]", t.shape),
        ));
    }
    Ok(rows / 2)
}

/// Divide `t` over `tp` ranks according to `spec`; element `i` is rank `i`'s local tensor.
///
/// Local shapes: `Replicated` `[…]`; `SplitRows` `[R, …] → [R/tp, …]`; `SplitCols`
/// `[R, C] → [R, C/tp]`; `GluHalves` `[2F, …] → [2F/tp, …]` = `[gate_t; up_t]`;
/// `Vocab { rows: V, padded: Vp }` `[R ≥ V, …] → [Vp/tp, …]`: the first V rows, zero rows up to
/// Vp, then dim-0 pieces. Rows of `t` past V are vocabulary padding, whose contents are
/// unspecified (formats.md §4.2); they are replaced by zeros.
pub fn split(name: &str, t: &TensorEntry, spec: &ShardSpec, tp: usize) -> Result<Vec<TensorEntry>> {
    let spec = *spec;
    if tp == 0 {
        return Err(bad(&t.origin, name, "tp must be at least 1, got 0"));
    }
    match spec {
        ShardSpec::Replicated => Ok(vec![t.clone(); tp]),
        ShardSpec::SplitRows => {
            let local = check_divides(name, t, 0, rows(name, t, spec)?, tp)?;
            (0..tp).map(|r| slice_rows(name, t, r * local, (r + 1) * local)).collect()
        }
        ShardSpec::SplitCols => {
            let (_, cols) = dims2(name, t, spec)?;
            let local = check_divides(name, t, 1, cols, tp)?;
            (0..tp).map(|r| slice_cols(name, t, r * local, (r + 1) * local)).collect()
        }
        ShardSpec::GluHalves => {
            let f = glu_half(name, t, rows(name, t, spec)?, "glu fc1")?;
            let local = check_divides(name, t, 0, f, tp).map_err(|_| {
                bad(
                    &t.origin,
                    name,
                    format!(
                        "glu halves of {f} rows (shape {:?}) do not divide by tp={tp} (expected F a multiple of {tp}, got {f})",
                        t.shape
                    ),
                )
            })?;
            (0..tp)
                .map(|r| {
                    let mut plan = RowPlan::like(name, "input", t)?;
                    plan.rows("input", t, r * local, (r + 1) * local)?; // gate_r
                    plan.rows("input", t, f + r * local, f + (r + 1) * local)?; // up_r
                    Ok(plan.finish())
                })
                .collect()
        }
        ShardSpec::Vocab { rows: vocab, padded } => {
            let have = rows(name, t, spec)?;
            if have < vocab || padded < vocab {
                return Err(bad(
                    &t.origin,
                    name,
                    format!(
                        "vocab-parallel split needs V ≤ rows and V ≤ Vp; got V={vocab}, {have} rows (shape {:?}), Vp={padded}",
                        t.shape
                    ),
                ));
            }
            let local = if padded % tp == 0 {
                padded / tp
            } else {
                return Err(bad(
                    &t.origin,
                    name,
                    format!("padded vocab Vp={padded} does not divide by tp={tp} (expected a multiple of {tp}, got {padded})"),
                ));
            };
            (0..tp)
                .map(|r| {
                    // global rows [r·local, (r+1)·local): real rows below V, zeros above
                    let (lo, hi) = (r * local, (r + 1) * local);
                    let (real_lo, real_hi) = (lo.min(vocab), hi.min(vocab));
                    let mut plan = RowPlan::like(name, "input", t)?;
                    plan.rows("input", t, real_lo, real_hi)?;
                    plan.zeros((hi - lo) - (real_hi - real_lo));
                    Ok(plan.finish())
                })
                .collect()
        }
    }
}

/// Check that `parts` is non-empty and every part has part 0's dtype and shape.
fn check_parts<'p>(name: &str, parts: &'p [TensorEntry]) -> Result<&'p TensorEntry> {
    let Some(first) = parts.first() else {
        return Err(Error::invalid(format!("tensor '{name}'"), "no ranks to merge (got 0 parts)"));
    };
    for (i, p) in parts.iter().enumerate().skip(1) {
        if p.dtype != first.dtype || p.shape != first.shape {
            return Err(bad(
                &p.origin,
                name,
                format!(
                    "rank {i} is {} {:?}, expected {} {:?} like rank 0 (mismatched tensor-parallel parts)",
                    p.dtype, p.shape, first.dtype, first.shape
                ),
            ));
        }
    }
    Ok(first)
}

/// Join the local tensors of every rank (rank order) into the full tensor; the inverse of
/// [`split`]. The tp size is `parts.len()`; all parts must share dtype and shape.
///
/// `Replicated` returns rank 0's tensor without comparing bytes (see [`merge_checked`]).
/// `Vocab { rows: V, .. }` concatenates and keeps the first V rows; the parts may come from a
/// checkpoint saved with a different padding (its `padded` is not consulted), so only
/// Σ rows ≥ V is required.
pub fn merge(name: &str, parts: &[TensorEntry], spec: &ShardSpec) -> Result<TensorEntry> {
    let spec = *spec;
    let first = check_parts(name, parts)?;
    match spec {
        ShardSpec::Replicated => Ok(first.clone()),
        ShardSpec::SplitRows => {
            rows(name, first, spec)?;
            concat_rows(name, parts)
        }
        ShardSpec::SplitCols => {
            dims2(name, first, spec)?;
            concat_cols(name, parts)
        }
        ShardSpec::GluHalves => {
            let local = glu_half(name, first, rows(name, first, spec)?, "local glu fc1")?;
            let mut plan = RowPlan::like(name, "rank 0", first)?;
            for (i, p) in parts.iter().enumerate() {
                plan.rows(&format!("rank {i}"), p, 0, local)?; // gate_i
            }
            for (i, p) in parts.iter().enumerate() {
                plan.rows(&format!("rank {i}"), p, local, 2 * local)?; // up_i
            }
            Ok(plan.finish())
        }
        ShardSpec::Vocab { rows: vocab, .. } => {
            let local = rows(name, first, spec)?;
            let total = local * parts.len();
            if total < vocab {
                return Err(bad(
                    &first.origin,
                    name,
                    format!(
                        "{} ranks of {local} rows hold {total} rows, expected at least the vocab size {vocab}",
                        parts.len()
                    ),
                ));
            }
            let mut plan = RowPlan::like(name, "rank 0", first)?;
            let mut left = vocab;
            for (i, p) in parts.iter().enumerate() {
                let take = left.min(local);
                plan.rows(&format!("rank {i}"), p, 0, take)?;
                left -= take;
            }
            Ok(plan.finish())
        }
    }
}

/// Whether two entries certainly hold the same bytes without reading them.
fn same_source(a: &TensorEntry, b: &TensorEntry) -> bool {
    use crate::checkpoint::ByteSource::*;
    match (&a.source, &b.source) {
        (Mapped { map: m, offset: o, len: l }, Mapped { map: n, offset: p, len: k }) => {
            std::sync::Arc::ptr_eq(m, n) && o == p && l == k
        }
        (Owned(x), Owned(y)) => std::sync::Arc::ptr_eq(x, y),
        (Derived(f), Derived(g)) => std::sync::Arc::ptr_eq(f, g),
        _ => false,
    }
}

/// [`merge`], and for `Replicated` tensors also compare every rank's bytes with rank 0's, failing
/// on the first disagreement (which rank, which element). This reads the replicated parts now,
/// two at a time; other specs have no redundant copies and merge lazily as in [`merge`].
pub fn merge_checked(name: &str, parts: &[TensorEntry], spec: &ShardSpec) -> Result<TensorEntry> {
    let spec = *spec;
    let merged = merge(name, parts, &spec)?;
    if let (ShardSpec::Replicated, Some(first)) = (spec, parts.first()) {
        let reference = first.bytes(&format!("{name} (rank 0)"))?;
        for (i, p) in parts.iter().enumerate().skip(1) {
            if same_source(first, p) {
                continue;
            }
            let other = p.bytes(&format!("{name} (rank {i})"))?;
            if let Some(at) = reference.iter().zip(other.iter()).position(|(a, b)| a != b) {
                let es = first.dtype.size();
                return Err(bad(
                    &p.origin,
                    name,
                    format!(
                        "replicated on every rank, but rank {i} differs from rank 0 at element {} of {} ({} {:?})",
                        at / es,
                        first.numel(),
                        first.dtype,
                        first.shape
                    ),
                ));
            }
        }
    }
    Ok(merged)
}

/// Check a pipeline layout and return layers per stage.
fn layers_per_stage(layers: usize, pp: usize) -> Result<usize> {
    if pp == 0 || layers % pp != 0 {
        return Err(Error::invalid(
            "pipeline layout",
            format!("{layers} layers do not divide into pp={pp} stages (expected a multiple of {pp}, got {layers})"),
        ));
    }
    Ok(layers / pp)
}

/// Global layer `layer` → `(stage, local index)` for `layers` layers over `pp` stages
/// (non-interleaved, formats.md §4.4): stage `layer / (L/pp)`, local `layer % (L/pp)`.
pub fn stage_of_layer(layer: usize, layers: usize, pp: usize) -> Result<(usize, usize)> {
    let per = layers_per_stage(layers, pp)?;
    if layer >= layers {
        return Err(Error::invalid(
            "pipeline layout",
            format!("layer {layer} is out of range for {layers} layers (expected < {layers})"),
        ));
    }
    Ok((layer / per, layer % per))
}

/// `(stage, local index)` → global layer `stage·(L/pp) + local`; the inverse of
/// [`stage_of_layer`].
pub fn global_layer(stage: usize, local: usize, layers: usize, pp: usize) -> Result<usize> {
    let per = layers_per_stage(layers, pp)?;
    if stage >= pp || local >= per {
        return Err(Error::invalid(
            "pipeline layout",
            format!(
                "stage {stage}, local layer {local} is out of range for {layers} layers over pp={pp} (expected stage < {pp}, local < {per})"
            ),
        ));
    }
    Ok(stage * per + local)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::ByteSource;
    use crate::transforms::testing::*;
    use crate::transforms::{fuse_qkv, slice_rows};
    use crate::DType;
    use proptest::prelude::*;

    fn tp() -> impl Strategy<Value = usize> {
        proptest::sample::select(vec![1usize, 2, 4, 8])
    }

    /// Trailing dims: empty (1-D) or `[h]`.
    fn with_rows(rows: usize, h: usize) -> Vec<usize> {
        if h == 0 {
            vec![rows]
        } else {
            vec![rows, h]
        }
    }

    /// A spec, tp, and a full tensor shape that fits them.
    fn case() -> impl Strategy<Value = (ShardSpec, usize, Vec<usize>)> {
        (0usize..5, tp(), 0usize..4, 0usize..4, 1usize..40, 0usize..4).prop_map(|(which, tp, a, h, v, m)| {
            match which {
                0 => {
                    let shape = match a {
                        0 => vec![],
                        1 => vec![h + 1],
                        _ => vec![a, h],
                    };
                    (ShardSpec::Replicated, tp, shape)
                }
                1 => (ShardSpec::SplitRows, tp, with_rows(a * tp, h)),
                2 => (ShardSpec::SplitCols, tp, vec![a, (h + 1) * tp]),
                3 => (ShardSpec::GluHalves, tp, with_rows(2 * a * tp, h)),
                _ => {
                    let padded = padded_vocab(v, 1 << m, tp);
                    (ShardSpec::Vocab { rows: v, padded }, tp, with_rows(v, h))
                }
            }
        })
    }

    proptest! {
        #[test]
        fn merge_after_split_is_identity(
            (spec, tp, shape) in case(), dt in dtype(), seed: u64, k in kind()
        ) {
            let t = random(dt, shape, seed, k);
            let parts = split("w", &t, &spec, tp).unwrap();
            prop_assert_eq!(parts.len(), tp);
            let merged = merge("w", &parts, &spec).unwrap();
            prop_assert!(same(&merged, &t));
            prop_assert!(same(&merge_checked("w", &parts, &spec).unwrap(), &t));
            // and split ∘ merge on those parts
            let again = split("w", &merged, &spec, tp).unwrap();
            for (a, b) in parts.iter().zip(&again) {
                prop_assert!(same(a, b));
            }
            if let ShardSpec::Vocab { rows, padded } = spec {
                // rank t holds global rows [t·Vp/tp, (t+1)·Vp/tp); rows ≥ V are zeros
                let local = padded / tp;
                let rb = t.shape[1..].iter().product::<usize>() * dt.size();
                for (r, p) in parts.iter().enumerate() {
                    prop_assert_eq!(p.shape[0], local);
                    let pb = bytes(p);
                    for row in 0..local {
                        if r * local + row >= rows {
                            prop_assert!(pb[row * rb..(row + 1) * rb].iter().all(|&b| b == 0));
                        }
                    }
                }
            }
            if k == Kind::Mapped && matches!(spec, ShardSpec::SplitRows) && t.numel() > 0 {
                prop_assert!(parts.iter().all(is_mapped));
                prop_assert!(is_mapped(&merged));
            }
        }

        #[test]
        fn split_after_merge_is_identity(
            (spec, tp, shape) in case(), dt in dtype(), seed: u64, k in kind()
        ) {
            // arbitrary local parts (vocab parts need zero padding, so they come from a split)
            let parts: Vec<TensorEntry> = match spec {
                ShardSpec::Replicated => vec![random(dt, shape, seed, k); tp],
                ShardSpec::Vocab { .. } => split("w", &random(dt, shape, seed, k), &spec, tp).unwrap(),
                _ => {
                    let full = random(dt, shape, 0, k);
                    let local = split("w", &full, &spec, tp).unwrap()[0].shape.clone();
                    (0..tp as u64).map(|i| random(dt, local.clone(), seed ^ i, k)).collect()
                }
            };
            let merged = merge("w", &parts, &spec).unwrap();
            let again = split("w", &merged, &spec, tp).unwrap();
            prop_assert_eq!(again.len(), parts.len());
            for (a, b) in parts.iter().zip(&again) {
                prop_assert!(same(a, b));
            }
        }

        #[test]
        fn contiguous_qkv_split_gives_whole_groups(
            groups_per_rank in 1usize..3, hpg in 1usize..4, d in 1usize..4, h in 0usize..3,
            tp in tp(), dt in dtype(), seed: u64, k in kind()
        ) {
            let groups = groups_per_rank * tp;
            let heads = groups * hpg;
            let q = random(dt, with_rows(heads * d, h), seed, k);
            let kk = random(dt, with_rows(groups * d, h), seed ^ 1, k);
            let v = random(dt, with_rows(groups * d, h), seed ^ 2, k);
            let fused = fuse_qkv("qkv", &q, &kk, &v, heads, groups).unwrap();
            let parts = split("qkv", &fused, &ShardSpec::SplitRows, tp).unwrap();
            let (qh, gh) = (heads / tp, groups / tp);
            for (r, part) in parts.iter().enumerate() {
                let q_r = slice_rows("q", &q, r * qh * d, (r + 1) * qh * d).unwrap();
                let k_r = slice_rows("k", &kk, r * gh * d, (r + 1) * gh * d).unwrap();
                let v_r = slice_rows("v", &v, r * gh * d, (r + 1) * gh * d).unwrap();
                let local = fuse_qkv("qkv", &q_r, &k_r, &v_r, qh, gh).unwrap();
                prop_assert!(same(part, &local));
            }
        }
    }

    #[test]
    fn padded_vocab_worked_values() {
        for (tp, want) in [(1, 32000), (2, 32000), (4, 32256), (8, 32768)] {
            assert_eq!(padded_vocab(32000, 128, tp), want, "V=32000 tp={tp}");
        }
        for (tp, want) in [(1, 32128), (2, 32256), (4, 32256), (8, 32768)] {
            assert_eq!(padded_vocab(32008, 128, tp), want, "V=32008 tp={tp}");
        }
        assert_eq!(padded_vocab(5, 0, 0), 5);
    }

    #[test]
    fn divisible_by_for_hf_vocab_values() {
        assert_eq!(divisible_by_for_hf_vocab(32000), 128);
        assert_eq!(divisible_by_for_hf_vocab(32008), 8);
        assert_eq!(divisible_by_for_hf_vocab(32002), 2);
        assert_eq!(divisible_by_for_hf_vocab(32001), 1);
        assert_eq!(divisible_by_for_hf_vocab(32064), 64);
        assert_eq!(divisible_by_for_hf_vocab(256), 128);
    }

    #[test]
    fn glu_split_gives_gate_and_up_halves() {
        // [gate; up] with F = 4, tp = 2: rank 0 = [g0 g1 u0 u1], rank 1 = [g2 g3 u2 u3]
        let fc1 = entry(DType::U8, vec![8], vec![0, 1, 2, 3, 10, 11, 12, 13], Kind::Mapped);
        let parts = split("fc1", &fc1, &ShardSpec::GluHalves, 2).unwrap();
        assert_eq!(bytes(&parts[0]), vec![0, 1, 10, 11]);
        assert_eq!(bytes(&parts[1]), vec![2, 3, 12, 13]);
        assert!(same(&merge("fc1", &parts, &ShardSpec::GluHalves).unwrap(), &fc1));
    }

    #[test]
    fn vocab_merge_accepts_another_padding() {
        // saved at tp=4 with Vp = 64 (m = 8); merged with the true V = 40
        let emb = random(DType::BF16, vec![40, 3], 11, Kind::Mapped);
        let saved =
            split("emb", &emb, &ShardSpec::Vocab { rows: 40, padded: padded_vocab(40, 8, 4) }, 4).unwrap();
        assert_eq!(saved[0].shape, vec![16, 3]);
        // ranks 0 and 1 lie wholly inside V: still mapped ranges
        assert!(is_mapped(&saved[0]) && is_mapped(&saved[1]) && !is_mapped(&saved[2]));
        let spec_tp2 = ShardSpec::Vocab { rows: 40, padded: padded_vocab(40, 8, 2) };
        let merged = merge("emb", &saved, &spec_tp2).unwrap();
        assert!(same(&merged, &emb));
        // re-split for tp=2 and a longer (padded) input trims to V then pads zeros
        let resplit = split("emb", &pad_junk(&emb, 48), &spec_tp2, 2).unwrap();
        assert!(same(&merge("emb", &resplit, &spec_tp2).unwrap(), &emb));
        let err = merge("emb", &saved[..2], &spec_tp2).unwrap_err().to_string();
        assert!(err.contains("'emb'") && err.contains("32 rows") && err.contains("40"), "{err}");
    }

    /// `t` with extra non-zero rows, like padding left at random initialisation.
    fn pad_junk(t: &TensorEntry, rows: usize) -> TensorEntry {
        let mut b = bytes(t);
        let extra = (rows - t.shape[0]) * t.shape[1] * t.dtype.size();
        b.extend(noise(99, extra));
        entry(t.dtype, vec![rows, t.shape[1]], b, Kind::Owned)
    }

    #[test]
    fn errors_name_the_tensor_dim_size_and_tp() {
        let t = random(DType::F32, vec![6, 10], 1, Kind::Owned);
        let err = split("layers.3.linear_qkv.weight", &t, &ShardSpec::SplitRows, 4).unwrap_err().to_string();
        assert!(
            err.contains("'layers.3.linear_qkv.weight'")
                && err.contains("dim 0 of size 6")
                && err.contains("tp=4")
                && err.contains("expected a multiple of 4, got 6"),
            "{err}"
        );
        let err = split("proj", &t, &ShardSpec::SplitCols, 4).unwrap_err().to_string();
        assert!(err.contains("dim 1 of size 10") && err.contains("tp=4"), "{err}");
        let err = split("fc1", &random(DType::F32, vec![5, 2], 1, Kind::Owned), &ShardSpec::GluHalves, 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("5 rows") && err.contains("even"), "{err}");
        let err = split("fc1", &t, &ShardSpec::GluHalves, 2).unwrap_err().to_string();
        assert!(err.contains("glu halves of 3 rows") && err.contains("tp=2"), "{err}");
        let err = split("emb", &t, &ShardSpec::Vocab { rows: 6, padded: 9 }, 2).unwrap_err().to_string();
        assert!(err.contains("Vp=9") && err.contains("tp=2"), "{err}");
        assert!(split("emb", &t, &ShardSpec::Vocab { rows: 7, padded: 8 }, 2).is_err());
        assert!(split("w", &t, &ShardSpec::Replicated, 0).is_err());
        assert!(split("w", &random(DType::F32, vec![6], 1, Kind::Owned), &ShardSpec::SplitCols, 1).is_err());

        let other = random(DType::F32, vec![6, 9], 2, Kind::Owned);
        let err = merge("proj", &[t.clone(), other], &ShardSpec::SplitCols).unwrap_err().to_string();
        assert!(err.contains("rank 1 is f32 [6, 9], expected f32 [6, 10]"), "{err}");
        let half = random(DType::F16, vec![6, 10], 2, Kind::Owned);
        assert!(merge("norm", &[t.clone(), half], &ShardSpec::Replicated).is_err());
        assert!(merge("norm", &[], &ShardSpec::Replicated).is_err());
    }

    #[test]
    fn merge_checked_reports_disagreeing_ranks() {
        let a = entry(DType::F32, vec![4], vec![0; 16], Kind::Mapped);
        let mut b_bytes = vec![0; 16];
        b_bytes[9] = 1; // element 2
        let b = entry(DType::F32, vec![4], b_bytes, Kind::Owned);
        let parts = [a.clone(), a.clone(), b];
        // the unchecked merge trusts rank 0
        assert!(same(&merge("norm", &parts, &ShardSpec::Replicated).unwrap(), &a));
        let err = merge_checked("norm", &parts, &ShardSpec::Replicated).unwrap_err().to_string();
        assert!(
            err.contains("'norm'") && err.contains("rank 2 differs from rank 0 at element 2 of 4"),
            "{err}"
        );
    }

    #[test]
    fn split_is_lazy() {
        let (t, calls) = counted(DType::BF16, vec![8, 4], 3);
        for spec in [
            ShardSpec::Replicated,
            ShardSpec::SplitRows,
            ShardSpec::SplitCols,
            ShardSpec::GluHalves,
            ShardSpec::Vocab { rows: 7, padded: 8 },
        ] {
            let parts = split("w", &t, &spec, 2).unwrap();
            merge("w", &parts, &spec).unwrap();
        }
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0);
        let parts = split("w", &t, &ShardSpec::GluHalves, 2).unwrap();
        assert!(matches!(parts[0].source, ByteSource::Derived(_)));
        let _ = produced(&parts[0]);
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn pipeline_layers_renumber() {
        assert_eq!(stage_of_layer(0, 32, 4).unwrap(), (0, 0));
        assert_eq!(stage_of_layer(9, 32, 4).unwrap(), (1, 1));
        assert_eq!(stage_of_layer(31, 32, 4).unwrap(), (3, 7));
        for pp in [1, 2, 4, 8] {
            for l in 0..32 {
                let (s, local) = stage_of_layer(l, 32, pp).unwrap();
                assert_eq!(global_layer(s, local, 32, pp).unwrap(), l);
            }
        }
        let err = stage_of_layer(0, 30, 4).unwrap_err().to_string();
        assert!(err.contains("30 layers") && err.contains("pp=4"), "{err}");
        assert!(stage_of_layer(32, 32, 4).is_err());
        assert!(stage_of_layer(0, 32, 0).is_err());
        assert!(global_layer(4, 0, 32, 4).is_err());
        assert!(global_layer(0, 8, 32, 4).is_err());
    }

    #[test]
    fn spec_serialises() {
        let json = serde_json::to_string(&ShardSpec::Vocab { rows: 32000, padded: 32256 }).unwrap();
        assert_eq!(json, r#"{"vocab":{"rows":32000,"padded":32256}}"#);
        assert_eq!(serde_json::to_string(&ShardSpec::GluHalves).unwrap(), r#""glu_halves""#);
    }
}
