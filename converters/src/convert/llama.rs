//! LLaMA-2 between HF and NeMo (both key dialects, any TP/PP), through one canonical form.
//!
//! Canonical = HF names, one rank, unpadded vocabulary. `from_hf`/`from_nemo` bring a checkpoint
//! there; `to_nemo_shards` leaves it for NeMo. Each step only composes lazy tensors, so building
//! the target checkpoint reads headers only and its tensor table is the `--dry-run` plan.

use crate::checkpoint::{
    Artifact, ByteSource, Checkpoint, Flavour, Meta, ModelConfig, NemoLayout, Parallelism, Rank, Shard,
    TensorEntry, TensorMap,
};
use crate::convert::clip::json_bytes;
use crate::convert::sentencepiece::SentencePieceModel;
use crate::convert::tokenizer;
use crate::error::{Error, Result};
use crate::formats::nemo::{self, NemoConfig};
use crate::names::llama::{
    self as names, at_layer, LlamaHparams, NemoDialect, NemoYamlOptions, Row, Source, Split, Stage, TABLE,
};
use crate::shard::{self, ShardSpec};
use crate::transforms;
use crate::DType;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A LLaMA model in canonical form.
#[derive(Clone, Debug)]
pub struct CanonicalLlama {
    /// Hyper-parameters.
    pub hparams: LlamaHparams,
    /// HF-named tensors, TP1/PP1, vocabulary rows = `hparams.vocab`, in HF save order.
    pub tensors: TensorMap,
    /// The checkpoint it came from, for error messages.
    pub origin: PathBuf,
}

/// Canonical tensor names and shapes for `hp`, in the order `LlamaForCausalLM.state_dict()` has.
pub fn canonical_shapes(hp: &LlamaHparams) -> Vec<(String, Vec<usize>)> {
    let (h, f, d) = (hp.hidden, hp.ffn, hp.head_dim);
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![hp.vocab, h])];
    for l in 0..hp.layers {
        let p = format!("model.layers.{l}");
        out.extend([
            (format!("{p}.self_attn.q_proj.weight"), vec![hp.heads * d, h]),
            (format!("{p}.self_attn.k_proj.weight"), vec![hp.groups * d, h]),
            (format!("{p}.self_attn.v_proj.weight"), vec![hp.groups * d, h]),
            (format!("{p}.self_attn.o_proj.weight"), vec![h, hp.heads * d]),
            (format!("{p}.mlp.gate_proj.weight"), vec![f, h]),
            (format!("{p}.mlp.up_proj.weight"), vec![f, h]),
            (format!("{p}.mlp.down_proj.weight"), vec![h, f]),
            (format!("{p}.input_layernorm.weight"), vec![h]),
            (format!("{p}.post_attention_layernorm.weight"), vec![h]),
        ]);
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !hp.tied {
        out.push(("lm_head.weight".to_string(), vec![hp.vocab, h]));
    }
    out
}

/// Order `found` by [`canonical_shapes`], proving every tensor is there with its shape and that
/// nothing is left over (design rule 7).
fn check_canonical(hp: &LlamaHparams, mut found: TensorMap, path: &Path) -> Result<TensorMap> {
    let mut out = TensorMap::with_capacity(found.len());
    let mut missing = Vec::new();
    for (name, shape) in canonical_shapes(hp) {
        match found.shift_remove(&name) {
            Some(t) if t.shape == shape => {
                super::require_float("tensor", &name, &t, path)?;
                out.insert(name, t);
            }
            Some(t) => {
                return Err(Error::invalid(
                    path,
                    format!("tensor '{name}': expected shape {shape:?} from the config, got {:?}", t.shape),
                ))
            }
            None => missing.push(name),
        }
    }
    if !missing.is_empty() {
        return Err(Error::missing(path, format!("{} tensors: {}", missing.len(), preview(&missing))));
    }
    // A tied checkpoint may still store the head; it is the embedding by definition.
    found.shift_remove("lm_head.weight").filter(|_| hp.tied);
    let leftover: Vec<String> = found.into_keys().filter(|n| !names::is_ignorable_hf(n)).collect();
    if !leftover.is_empty() {
        return Err(Error::invalid(path, format!("unmapped source tensors: {}", preview(&leftover))));
    }
    Ok(out)
}

fn preview(names: &[String]) -> String {
    let shown: Vec<&str> = names.iter().take(8).map(String::as_str).collect();
    let more = names.len().saturating_sub(shown.len());
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

/// HF LLaMA → canonical.
pub fn from_hf(ckpt: &Checkpoint) -> Result<CanonicalLlama> {
    let path = &ckpt.meta.path;
    let Some(ModelConfig::HfJson(cfg)) = &ckpt.meta.config else {
        return Err(Error::missing(path, "config.json (an HF LLaMA directory needs one)"));
    };
    from_hf_parts(cfg, ckpt.tensors()?.clone(), path)
}

/// HF-named LLaMA tensors and their `config.json` object (also the `text_config` of a LLaVA
/// checkpoint) → canonical, proving every tensor is there and nothing is left over.
pub fn from_hf_parts(cfg: &serde_json::Value, tensors: TensorMap, path: &Path) -> Result<CanonicalLlama> {
    let hparams = LlamaHparams::from_hf(cfg, path)?;
    hparams.validate(path)?;
    let tensors = check_canonical(&hparams, tensors, path)?;
    Ok(CanonicalLlama { hparams, tensors, origin: path.to_path_buf() })
}

fn spec(split: Split, vocab: usize, padded: usize) -> ShardSpec {
    match split {
        Split::Replicated => ShardSpec::Replicated,
        Split::Rows => ShardSpec::SplitRows,
        Split::Cols => ShardSpec::SplitCols,
        Split::GluHalves => ShardSpec::GluHalves,
        Split::Vocab => ShardSpec::Vocab { rows: vocab, padded },
    }
}

/// The table rows that exist for `hp`, each with its instances in NeMo's state-dict order:
/// (row, global layer or `None`).
fn instances(hp: &LlamaHparams) -> Vec<(&'static Row, Option<usize>)> {
    let rows = || TABLE.iter().filter(|r| !(hp.tied && r.source == Source::Same("lm_head.weight")));
    let mut out: Vec<_> = rows().filter(|r| r.stage == Stage::First).map(|r| (r, None)).collect();
    for l in 0..hp.layers {
        out.extend(rows().filter(|r| r.stage == Stage::Layer).map(|r| (r, Some(l))));
    }
    out.extend(rows().filter(|r| r.stage == Stage::Last).map(|r| (r, None)));
    out
}

/// The pipeline stage and stage-local name of one instance.
fn place(
    row: &Row,
    layer: Option<usize>,
    dialect: NemoDialect,
    hp: &LlamaHparams,
    pp: usize,
) -> Result<(usize, String)> {
    Ok(match (row.stage, layer) {
        (Stage::Layer, Some(l)) => {
            let (stage, local) = shard::stage_of_layer(l, hp.layers, pp)?;
            (stage, at_layer(row.name(dialect), local))
        }
        (Stage::First, _) => (0, row.name(dialect).to_string()),
        _ => (pp - 1, row.name(dialect).to_string()),
    })
}

/// NeMo (any dialect, TP, PP, or distributed) → canonical. `vocab` overrides the tokenizer's
/// vocabulary (the rows kept when trimming the padded embedding).
pub fn from_nemo(ckpt: &Checkpoint, vocab: Option<usize>) -> Result<CanonicalLlama> {
    let path = &ckpt.meta.path;
    let Some(ModelConfig::NemoYaml(cfg)) = &ckpt.meta.config else {
        return Err(Error::missing(path, "model_config.yaml"));
    };
    let distributed = matches!(ckpt.meta.flavour, Flavour::Nemo { layout: NemoLayout::Distributed, .. });
    let Parallelism { tp, pp } = ckpt.meta.parallel;
    // Names as stored, normalised (formats.md §2.3), per rank.
    let mut by_rank: BTreeMap<(usize, usize), HashMap<String, &TensorEntry>> = BTreeMap::new();
    for s in &ckpt.shards {
        let map = by_rank.entry((s.rank.pp, s.rank.tp)).or_default();
        for (name, t) in &s.tensors {
            let name = name
                .strip_prefix("model.module.")
                .map_or_else(|| name.clone(), |rest| format!("model.{rest}"));
            map.insert(name, t);
        }
    }
    let dialect = names::dialect_of(Some(cfg), by_rank.values().flat_map(|m| m.keys().map(String::as_str)));
    let embedding_rows = |name: &str| -> Option<usize> {
        by_rank
            .iter()
            .filter(|((p, _), _)| *p == 0)
            .map(|(_, m)| m.get(name).map(|t| t.shape.first().copied().unwrap_or(0)))
            .sum()
    };
    let first_row = TABLE[0].name(dialect);
    let vocab =
        vocab.or_else(|| tokenizer::nemo_vocab(ckpt, cfg)).or_else(|| embedding_rows(first_row)).ok_or_else(
            || Error::missing(path, format!("tensor '{first_row}' (needed to size the vocabulary)")),
        )?;
    let hparams = LlamaHparams::from_nemo(cfg, vocab, path)?;
    hparams.validate(path)?;

    let mut consumed: BTreeSet<(usize, usize, String)> = BTreeSet::new();
    let mut canonical = TensorMap::new();
    for (row, layer) in instances(&hparams) {
        // Each rank's part (a distributed checkpoint holds one global part).
        let (local, parts) = if distributed {
            let global = global_from_dist(&by_rank, row, layer, dialect, &mut consumed, path)?;
            (row.name(dialect).to_string(), vec![global])
        } else {
            let (stage, local) = place(row, layer, dialect, &hparams, pp)?;
            let mut parts = Vec::with_capacity(tp);
            for t in 0..tp {
                let entry = by_rank.get(&(stage, t)).and_then(|m| m.get(&local)).ok_or_else(|| {
                    Error::missing(path, format!("tensor '{local}' on rank tp={t} pp={stage}"))
                })?;
                consumed.insert((stage, t, local.clone()));
                parts.push((*entry).clone());
            }
            (local, parts)
        };
        let ranks = parts.len();
        let l = layer.unwrap_or(0);
        // Fused tensors are unfused per rank and the pieces concatenated, so every canonical
        // tensor gathers its rows straight from the stored parts.
        let unfused: Vec<(&str, Vec<TensorEntry>)> = match row.source {
            Source::Same(hf) => {
                // A vocabulary merge keeps the first `vocab` rows whatever padding the parts were
                // saved with (`padded` is not consulted), which also trims a distributed array.
                let full = shard::merge(&local, &parts, &spec(row.split, hparams.vocab, hparams.vocab))?;
                vec![(hf, vec![full])]
            }
            Source::Qkv(q, k, v) => {
                // Each rank's fused rows are, per query group, [hpg Q heads; K; V] blocks of d
                // rows (formats.md §3.4). Slicing the stored part keeps every block a zero-copy
                // range, so q, k and v each gather their rows from the parts in one pass.
                let (hpg, d) = (hparams.heads_per_group(), hparams.head_dim);
                let groups = hparams.groups / ranks;
                let (mut qs, mut ks, mut vs) = (Vec::new(), Vec::new(), Vec::new());
                for p in &parts {
                    let rows = p.shape.first().copied().unwrap_or(0);
                    if rows != groups * (hpg + 2) * d {
                        return Err(Error::invalid(
                            p.origin.to_path_buf(),
                            format!(
                                "tensor '{local}': expected {} fused QKV rows ({groups} groups × ({hpg} + 2) heads × {d}), got {rows}",
                                groups * (hpg + 2) * d
                            ),
                        ));
                    }
                    for g in 0..groups {
                        let base = g * (hpg + 2) * d;
                        qs.push(transforms::slice_rows(&local, p, base, base + hpg * d)?);
                        ks.push(transforms::slice_rows(&local, p, base + hpg * d, base + (hpg + 1) * d)?);
                        vs.push(transforms::slice_rows(
                            &local,
                            p,
                            base + (hpg + 1) * d,
                            base + (hpg + 2) * d,
                        )?);
                    }
                }
                vec![(q, qs), (k, ks), (v, vs)]
            }
            Source::Glu(g, u) => {
                let split =
                    parts.iter().map(|p| transforms::split_glu(&local, p)).collect::<Result<Vec<_>>>()?;
                let pick = |i: usize| split.iter().map(|s| s[i].clone()).collect::<Vec<_>>();
                vec![(g, pick(0)), (u, pick(1))]
            }
        };
        for (hf, pieces) in unfused {
            let name = at_layer(hf, l);
            let tensor = match pieces.as_slice() {
                [one] => one.clone(),
                _ => transforms::concat_rows(&name, &pieces)?,
            };
            canonical.insert(name, tensor);
        }
    }
    // Everything stored must have been used, apart from buffers NeMo regenerates.
    let leftover: Vec<String> = by_rank
        .iter()
        .flat_map(|(&(p, t), m)| m.keys().map(move |n| (p, t, n)))
        .filter(|(p, t, n)| !consumed.contains(&(*p, *t, n.to_string())))
        .filter(|(_, _, n)| *n != names::LEGACY_INV_FREQ && !n.ends_with("._extra_state"))
        .map(|(p, t, n)| if tp * pp > 1 { format!("{n} (tp={t} pp={p})") } else { n.clone() })
        .collect();
    if !leftover.is_empty() {
        return Err(Error::invalid(path, format!("unmapped source tensors: {}", preview(&leftover))));
    }
    let tensors = check_canonical(&hparams, canonical, path)?;
    Ok(CanonicalLlama { hparams, tensors, origin: path.clone() })
}

/// One layer's tensor from a distributed checkpoint, where layers are stacked on a leading axis
/// and the key has no layer index (formats.md §1.6).
fn global_from_dist(
    by_rank: &BTreeMap<(usize, usize), HashMap<String, &TensorEntry>>,
    row: &Row,
    layer: Option<usize>,
    dialect: NemoDialect,
    consumed: &mut BTreeSet<(usize, usize, String)>,
    path: &Path,
) -> Result<TensorEntry> {
    let all = by_rank.get(&(0, 0)).ok_or_else(|| Error::missing(path, "distributed checkpoint arrays"))?;
    let key = names::stacked(row.name(dialect));
    let t = all.get(&key).ok_or_else(|| Error::missing(path, format!("array '{key}'")))?;
    consumed.insert((0, 0, key.clone()));
    let Some(l) = layer else { return Ok((*t).clone()) };
    let [layers, rest @ ..] = t.shape.as_slice() else {
        return Err(Error::invalid(
            path,
            format!("array '{key}': expected a leading layer axis, got a scalar"),
        ));
    };
    if l >= *layers {
        return Err(Error::invalid(path, format!("array '{key}': has {layers} layers, need layer {l}")));
    }
    let one = transforms::slice_rows(&key, t, l, l + 1)?;
    Ok(TensorEntry { shape: rest.to_vec(), ..one })
}

/// Canonical → NeMo ranks: pad the vocabulary for `tp`, fuse, split per tensor rule, place layers
/// on pipeline stages with stage-local indices. Legacy adds the rotary buffer; both dialects get
/// `_extra_state: None` keys for NeMo's strict loader.
pub fn to_nemo_shards(
    c: &CanonicalLlama,
    dialect: NemoDialect,
    tp: usize,
    pp: usize,
    divisible_by: usize,
) -> Result<Vec<Shard>> {
    let hp = &c.hparams;
    let here = c.origin.as_path();
    check_parallelism(hp, dialect, tp, pp, here)?;
    let padded = shard::padded_vocab(hp.vocab, divisible_by, tp);
    let mut shards: Vec<Shard> = (0..pp)
        .flat_map(|p| (0..tp).map(move |t| Shard::new(Rank { tp: t, pp: p }, TensorMap::new())))
        .collect();
    let dtype = c.tensors.get("model.embed_tokens.weight").map_or(DType::F32, |t| t.dtype);
    if dialect == NemoDialect::Legacy {
        // NeMo casts buffers with the model, so the buffer has the weights' dtype.
        let freq: Vec<u8> =
            names::inv_freq(hp.head_dim, hp.rope_theta).iter().flat_map(|x| x.to_le_bytes()).collect();
        let buffer =
            TensorEntry::new(DType::F32, vec![hp.head_dim / 2], ByteSource::owned(freq), Arc::from(here))
                .cast(names::LEGACY_INV_FREQ, dtype)?;
        for s in &mut shards {
            s.tensors.insert(names::LEGACY_INV_FREQ.to_string(), buffer.clone());
        }
    }
    let get = |template: &str, l: usize| -> Result<&TensorEntry> {
        let name = at_layer(template, l);
        c.tensors.get(&name).ok_or_else(|| Error::missing(here, format!("canonical tensor '{name}'")))
    };
    for (row, layer) in instances(hp) {
        let (stage, local) = place(row, layer, dialect, hp, pp)?;
        let l = layer.unwrap_or(0);
        // Fused tensors are built per rank from row slices of their inputs (whole query groups,
        // GLU half slices): each output then reads only its own rows, straight from the mapped
        // source, instead of every rank re-deriving the whole fused tensor.
        let rows = |name: &str| shard::split(&local, get(name, l)?, &ShardSpec::SplitRows, tp);
        let parts = match row.source {
            Source::Same(name) => {
                shard::split(&local, get(name, l)?, &spec(row.split, hp.vocab, padded), tp)?
            }
            Source::Qkv(q, k, v) => {
                let (qs, ks, vs) = (rows(q)?, rows(k)?, rows(v)?);
                (0..tp)
                    .map(|t| {
                        transforms::fuse_qkv(&local, &qs[t], &ks[t], &vs[t], hp.heads / tp, hp.groups / tp)
                    })
                    .collect::<Result<Vec<_>>>()?
            }
            Source::Glu(g, u) => {
                let (gs, us) = (rows(g)?, rows(u)?);
                (0..tp).map(|t| transforms::fuse_glu(&local, &gs[t], &us[t])).collect::<Result<Vec<_>>>()?
            }
        };
        for (t, part) in parts.into_iter().enumerate() {
            shards[stage * tp + t].tensors.insert(local.clone(), part);
        }
    }
    let mut extra = |stage: usize, key: String| {
        for s in &mut shards[stage * tp..(stage + 1) * tp] {
            s.none_keys.push(key.clone());
        }
    };
    for l in 0..hp.layers {
        let (stage, local) = shard::stage_of_layer(l, hp.layers, pp)?;
        for module in names::extra_state_modules(dialect) {
            extra(stage, format!("{}._extra_state", at_layer(module, local)));
        }
    }
    if dialect == NemoDialect::Legacy && !hp.tied {
        extra(pp - 1, "model.language_model.output_layer._extra_state".to_string());
    }
    Ok(shards)
}

/// A per-rank mcore NeMo checkpoint (what [`to_nemo_shards`] builds) as the global arrays of the
/// Megatron-core distributed checkpoint NeMo ≥ 1.21 saves for it (formats.md §1.6): layers
/// stacked on a leading axis, one chunk per layer × TP fragment (GLU fc1 in 2·tp fragments, gate
/// halves then up halves), the vocabulary padded for the checkpoint's tp, one `_extra_state`
/// object per Transformer Engine module and layer (the four linears and both attention names,
/// [`names::DIST_ATTENTION_EXTRA_STATE`]). Every chunk is a rank's stored tensor or a
/// zero-copy half of it, so nothing is read here.
pub fn dist_weights(ckpt: &Checkpoint) -> Result<nemo::DistWeights> {
    let path = &ckpt.meta.path;
    let Some(ModelConfig::NemoYaml(cfg)) = &ckpt.meta.config else {
        return Err(Error::missing(path, "model_config.yaml"));
    };
    let Parallelism { tp, pp } = ckpt.meta.parallel;
    let rank = |stage: usize, t: usize| ckpt.shards.iter().find(|s| s.rank == Rank { tp: t, pp: stage });
    let dialect =
        names::dialect_of(Some(cfg), ckpt.shards.iter().flat_map(|s| s.tensors.keys().map(String::as_str)));
    if dialect != NemoDialect::Mcore {
        return Err(Error::invalid(
            path,
            "a distributed checkpoint holds megatron-core names; the legacy layout has none (use --layout mcore)",
        ));
    }
    let first = TABLE[0].name(dialect);
    let vocab_rows: usize = (0..tp)
        .filter_map(|t| rank(0, t)?.tensors.get(first).map(|e| e.shape.first().copied().unwrap_or(0)))
        .sum();
    let hp = LlamaHparams::from_nemo(cfg, vocab_rows, path)?;
    let part = |row: &Row, layer: Option<usize>, t: usize| -> Result<&TensorEntry> {
        let (stage, local) = place(row, layer, dialect, &hp, pp)?;
        rank(stage, t)
            .and_then(|s| s.tensors.get(&local))
            .ok_or_else(|| Error::missing(path, format!("tensor '{local}' on rank tp={t} pp={stage}")))
    };
    let mut arrays: Vec<nemo::DistArray> = Vec::new();
    for (row, layer) in instances(&hp) {
        if layer.is_some_and(|l| l > 0) {
            continue; // a layer row's array is built once, over all layers
        }
        let layers: Vec<Option<usize>> = match layer {
            Some(_) => (0..hp.layers).map(Some).collect(),
            None => vec![None],
        };
        let key = names::stacked(row.name(dialect));
        let sample = part(row, layer, 0)?;
        let local = sample.shape.clone();
        // The chunk shape within one layer and how many fragments each axis has.
        let (mut chunk, fragments): (Vec<usize>, Vec<usize>) = match (row.split, local.as_slice()) {
            (Split::Replicated, _) => (local.clone(), vec![1; local.len()]),
            (Split::Rows | Split::Vocab, [r, c]) => (vec![*r, *c], vec![tp, 1]),
            (Split::Cols, [r, c]) => (vec![*r, *c], vec![1, tp]),
            (Split::GluHalves, [r, c]) if r % 2 == 0 => (vec![r / 2, *c], vec![2 * tp, 1]),
            _ => {
                return Err(Error::invalid(
                    path,
                    format!("tensor '{key}': shape {local:?} does not fit its split rule {:?}", row.split),
                ))
            }
        };
        let mut chunks = Vec::with_capacity(layers.len() * fragments.iter().product::<usize>());
        for &l in &layers {
            let parts = (0..tp).map(|t| part(row, l, t)).collect::<Result<Vec<_>>>()?;
            if let Some(odd) = parts.iter().find(|p| p.shape != local || p.dtype != sample.dtype) {
                return Err(Error::invalid(
                    path,
                    format!(
                        "tensor '{key}': ranks disagree ({} {:?} vs {} {local:?})",
                        odd.dtype, odd.shape, sample.dtype
                    ),
                ));
            }
            match row.split {
                Split::Replicated => chunks.push(parts[0].clone()),
                Split::GluHalves => {
                    let halves =
                        parts.iter().map(|p| transforms::split_glu(&key, p)).collect::<Result<Vec<_>>>()?;
                    chunks.extend(halves.iter().map(|[g, _]| g.clone()));
                    chunks.extend(halves.iter().map(|[_, u]| u.clone()));
                }
                _ => chunks.extend(parts.into_iter().cloned()),
            }
        }
        let mut shape: Vec<usize> = chunk.iter().zip(&fragments).map(|(c, f)| c * f).collect();
        if layer.is_some() {
            shape.insert(0, hp.layers);
            chunk.insert(0, 1);
        }
        arrays.push(nemo::DistArray { key, dtype: sample.dtype, shape, chunk, chunks });
    }
    let objects = names::extra_state_modules(dialect)
        .iter()
        .chain(&names::DIST_ATTENTION_EXTRA_STATE)
        .flat_map(|m| {
            let module = names::stacked(m);
            (0..hp.layers).map(move |l| format!("{module}._extra_state/shard_{l}_{}", hp.layers))
        })
        .collect();
    Ok(nemo::DistWeights { arrays, objects })
}

/// Refuse, before any work, a TP/PP the model does not divide into (formats.md §4.1, §4.4).
pub fn check_parallelism(
    hp: &LlamaHparams,
    dialect: NemoDialect,
    tp: usize,
    pp: usize,
    path: &Path,
) -> Result<()> {
    if tp == 0 || pp == 0 {
        return Err(Error::invalid(path, "tensor and pipeline parallel sizes must be at least 1"));
    }
    if dialect == NemoDialect::Legacy && hp.groups != hp.heads {
        return Err(Error::invalid(
            path,
            format!(
                "the legacy NeMo layout has no grouped-query attention ({} heads, {} query groups); use the mcore layout",
                hp.heads, hp.groups
            ),
        ));
    }
    for (what, n, by) in [
        ("attention heads", hp.heads, tp),
        ("query groups", hp.groups, tp),
        ("ffn hidden size", hp.ffn, tp),
        ("layers", hp.layers, pp),
    ] {
        if n % by != 0 {
            let kind = if what == "layers" { "pp" } else { "tp" };
            return Err(Error::invalid(path, format!("{what} ({n}) do not divide by {kind}={by}")));
        }
    }
    Ok(())
}

/// Options for building a `.nemo` checkpoint.
#[derive(Clone, Copy, Debug)]
pub struct NemoTarget {
    /// Key dialect.
    pub dialect: NemoDialect,
    /// Tensor-parallel size.
    pub tp: usize,
    /// Pipeline-parallel size.
    pub pp: usize,
    /// Cast float tensors to this dtype (`None` keeps the source's).
    pub dtype: Option<DType>,
}

/// Apply an optional cast to every float tensor.
pub fn cast_all(tensors: &TensorMap, dtype: Option<DType>) -> Result<TensorMap> {
    let Some(to) = dtype else { return Ok(tensors.clone()) };
    tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), if t.dtype.is_float() { t.cast(n, to)? } else { t.clone() })))
        .collect()
}

fn cast_shards(mut shards: Vec<Shard>, dtype: Option<DType>) -> Result<Vec<Shard>> {
    for s in &mut shards {
        s.tensors = cast_all(&s.tensors, dtype)?;
    }
    Ok(shards)
}

/// A `.nemo` checkpoint (plain tar, NeMo's rank layout for `parallel`) derived from `src`.
fn nemo_checkpoint(
    src: &Checkpoint,
    parallel: Parallelism,
    cfg: NemoConfig,
    artifacts: Vec<Artifact>,
    shards: Vec<Shard>,
) -> Checkpoint {
    let meta = Meta {
        path: src.meta.path.clone(),
        flavour: Flavour::Nemo {
            layout: NemoLayout::for_parallelism(parallel),
            gzip: false,
            extracted: false,
        },
        parallel,
        config: Some(ModelConfig::NemoYaml(cfg)),
        artifacts,
    };
    Checkpoint { meta, shards }
}

/// HF directory checkpoint → `.nemo` checkpoint (yaml derived from `config.json`, tokenizer as a
/// `nemo:` artifact). `tokenizer_model` is the SentencePiece file to register. The source's
/// `tokenizer.json` and `tokenizer_config.json` are kept beside it for converting back
/// ([`tokenizer::hf_tokenizer_files`]; the first only while it describes the model then).
pub fn hf_to_nemo(
    src: &Checkpoint,
    target: &NemoTarget,
    tokenizer_model: Option<&Artifact>,
) -> Result<Checkpoint> {
    let c = from_hf(src)?;
    let divisible_by = shard::divisible_by_for_hf_vocab(c.hparams.vocab);
    // Cast after splitting, so each rank's piece is converted once, from its own rows.
    let shards =
        cast_shards(to_nemo_shards(&c, target.dialect, target.tp, target.pp, divisible_by)?, target.dtype)?;
    let mut artifacts = Vec::new();
    let tokenizer_ref = match tokenizer_model {
        Some(a) => {
            let name = tokenizer::artifact_name("tokenizer.model", &a.source.bytes()?);
            artifacts.push(Artifact { name: name.clone(), source: a.source.clone() });
            Some(format!("nemo:{name}"))
        }
        None => None,
    };
    if tokenizer_ref.is_some() {
        let (json, config) = tokenizer::hf_tokenizer_files(src);
        artifacts.extend(tokenizer::kept_members(json.as_ref(), config.as_ref()));
    }
    let dtype =
        target.dtype.unwrap_or(c.tensors.get("model.embed_tokens.weight").map_or(DType::F32, |t| t.dtype));
    let yaml = c.hparams.nemo_yaml(&NemoYamlOptions {
        dialect: target.dialect,
        dtype,
        tp: target.tp,
        pp: target.pp,
        divisible_by,
        tokenizer_model: tokenizer_ref,
    });
    let cfg = NemoConfig::parse(yaml, Path::new("model_config.yaml"))?;
    Ok(nemo_checkpoint(src, Parallelism { tp: target.tp, pp: target.pp }, cfg, artifacts, shards))
}

/// `.nemo` checkpoint → `.nemo` checkpoint at another TP/PP (same dialect unless asked), the yaml
/// updated in place so every other key survives.
pub fn reshard_nemo(
    src: &Checkpoint,
    tp: usize,
    pp: usize,
    dialect: Option<NemoDialect>,
    dtype: Option<DType>,
) -> Result<Checkpoint> {
    let Some(ModelConfig::NemoYaml(cfg)) = &src.meta.config else {
        return Err(Error::missing(&src.meta.path, "model_config.yaml"));
    };
    let c = from_nemo(src, None)?;
    let stored =
        names::dialect_of(Some(cfg), src.shards.iter().flat_map(|s| s.tensors.keys().map(String::as_str)));
    let dialect = dialect.unwrap_or(stored);
    let divisible_by = cfg.get_usize("make_vocab_size_divisible_by").unwrap_or(128);
    let shards = cast_shards(to_nemo_shards(&c, dialect, tp, pp, divisible_by)?, dtype)?;
    let mut cfg = cfg.clone();
    cfg.set_scalar("tensor_model_parallel_size", serde_yaml::Value::from(tp as u64))?;
    cfg.set_scalar("pipeline_model_parallel_size", serde_yaml::Value::from(pp as u64))?;
    if dialect != stored {
        let mcore = dialect == NemoDialect::Mcore;
        cfg.set_scalar("mcore_gpt", serde_yaml::Value::from(mcore))?;
        cfg.set_scalar("transformer_engine", serde_yaml::Value::from(mcore))?;
    }
    if let Some(d) = dtype {
        let precision = match d {
            DType::BF16 => serde_yaml::Value::from("bf16"),
            DType::F16 => serde_yaml::Value::from(16u64),
            _ => serde_yaml::Value::from(32u64),
        };
        cfg.set_scalar("precision", precision)?;
    }
    Ok(nemo_checkpoint(src, Parallelism { tp, pp }, cfg, src.meta.artifacts.clone(), shards))
}

/// `.nemo` checkpoint → HF directory checkpoint: `config.json` derived from the yaml, the
/// vocabulary trimmed to the tokenizer's, the SentencePiece model (`tokenizer`, else the one the
/// yaml names) written as `tokenizer.model` with the small JSON files transformers needs to load it.
pub fn nemo_to_hf(
    src: &Checkpoint,
    vocab: Option<usize>,
    dtype: Option<DType>,
    tokenizer: Option<&Artifact>,
) -> Result<Checkpoint> {
    let Some(ModelConfig::NemoYaml(cfg)) = &src.meta.config else {
        return Err(Error::missing(&src.meta.path, "model_config.yaml"));
    };
    let mut c = from_nemo(src, vocab)?;
    c.tensors = cast_all(&c.tensors, dtype)?;
    let stored = c.tensors.get("model.embed_tokens.weight").map_or(DType::F32, |t| t.dtype);
    let (bos, eos) = (c.hparams.bos.unwrap_or(1), c.hparams.eos.unwrap_or(2));
    let mut artifacts = vec![Artifact {
        name: "generation_config.json".into(),
        source: ByteSource::owned(json_bytes(
            &serde_json::json!({"bos_token_id": bos, "eos_token_id": eos, "_from_model_config": true}),
        )),
    }];
    // A tokenizer the config names must come along: an HF directory without it is not usable.
    let model = match tokenizer {
        Some(given) => Some(given),
        None => tokenizer::nemo_tokenizer_model(src, cfg)?,
    };
    if let (Some(want), Some(model)) = (vocab, model) {
        let pieces = crate::describe::sentencepiece_pieces(&model.source.bytes()?).unwrap_or(0);
        if want < pieces {
            return Err(Error::invalid(
                &src.meta.path,
                format!("--vocab-size {want} is below the tokenizer's {pieces} pieces: ids from {want} on would have no embedding row"),
            ));
        }
    }
    let (kept_json, kept_config) = tokenizer::hf_tokenizer_files(src);
    if let Some(model) = model {
        artifacts.push(Artifact { name: "tokenizer.model".into(), source: model.source.clone() });
        let sp =
            SentencePieceModel::parse(model.source.bytes()?.into_owned(), &src.meta.path.join(&model.name))?;
        // The fast tokenizer this .nemo was converted with, while it still describes the model.
        let carried = match (tokenizer, &kept_json) {
            (None, Some(json)) => tokenizer::carry_tokenizer_json(json, &sp, &[])?,
            _ => None,
        };
        let source = tokenizer::SourceTokenizer {
            config: kept_config.as_ref(),
            model: Some(&sp),
            json_left_behind: kept_json.is_some() && carried.is_none(),
        };
        let tok_cfg = tokenizer::llama_tokenizer_config(c.hparams.max_positions, source);
        if let Some(json) = carried {
            artifacts.push(Artifact { name: "tokenizer.json".into(), source: json });
        }
        let special = tokenizer::special_tokens_map(&tok_cfg);
        for (name, v) in [("tokenizer_config.json", &tok_cfg), ("special_tokens_map.json", &special)] {
            artifacts.push(Artifact { name: name.into(), source: ByteSource::owned(json_bytes(v)) });
        }
    }
    let meta = Meta {
        path: src.meta.path.clone(),
        flavour: Flavour::HfSafetensorsDir { sharded: true },
        parallel: Parallelism::default(),
        config: Some(ModelConfig::HfJson(c.hparams.hf_config(stored))),
        artifacts,
    };
    Ok(Checkpoint::single(meta, c.tensors))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn hparams(
        heads: usize,
        groups: usize,
        head_dim: usize,
        ffn: usize,
        layers: usize,
        vocab: usize,
        tied: bool,
    ) -> LlamaHparams {
        LlamaHparams {
            layers,
            hidden: heads * head_dim,
            ffn,
            heads,
            groups,
            head_dim,
            vocab,
            max_positions: 64,
            rope_theta: 10000.0,
            rope_linear_factor: None,
            norm_eps: 1e-5,
            init_std: 0.02,
            tied,
            bos: None,
            eos: None,
        }
    }

    /// Canonical tensors whose every element is distinct, so any misplaced row shows.
    pub(crate) fn canonical(hp: &LlamaHparams) -> CanonicalLlama {
        let mut counter = 0u32;
        let origin: Arc<Path> = Arc::from(Path::new("synthetic"));
        let tensors = canonical_shapes(hp)
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let bytes: Vec<u8> = (0..n)
                    .flat_map(|_| {
                        counter += 1;
                        counter.to_le_bytes()
                    })
                    .collect();
                (name, TensorEntry::new(DType::F32, shape, ByteSource::owned(bytes), origin.clone()))
            })
            .collect();
        CanonicalLlama { hparams: hp.clone(), tensors, origin: PathBuf::from("synthetic") }
    }

    fn as_nemo(c: &CanonicalLlama, dialect: NemoDialect, tp: usize, pp: usize, m: usize) -> Checkpoint {
        let shards = to_nemo_shards(c, dialect, tp, pp, m).unwrap();
        let yaml = c.hparams.nemo_yaml(&NemoYamlOptions {
            dialect,
            dtype: DType::F32,
            tp,
            pp,
            divisible_by: m,
            tokenizer_model: None,
        });
        let parallel = Parallelism { tp, pp };
        let meta = Meta {
            path: "mem.nemo".into(),
            flavour: Flavour::Nemo {
                layout: NemoLayout::for_parallelism(parallel),
                gzip: false,
                extracted: false,
            },
            parallel,
            config: Some(ModelConfig::NemoYaml(NemoConfig::parse(yaml, Path::new("y")).unwrap())),
            artifacts: vec![],
        };
        Checkpoint { meta, shards }
    }

    pub(crate) fn assert_same(a: &TensorMap, b: &TensorMap) {
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for (n, t) in a {
            assert_eq!(t.shape, b[n.as_str()].shape, "{n}");
            assert!(t.bytes(n).unwrap() == b[n.as_str()].bytes(n).unwrap(), "{n} differs");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn nemo_round_trip_is_identity(
            groups_log in 0u32..4, hpg in prop_oneof![Just(1usize), Just(2), Just(4)], head_dim in 1usize..4,
            ffn_mult in 1usize..4, layers_per_stage in 1usize..3, vocab in 3usize..40, tied: bool,
            tp_log in 0u32..4, pp in 1usize..4, legacy: bool, m in prop_oneof![Just(1usize), Just(8)],
        ) {
            let groups = 1usize << groups_log;
            let tp = 1usize << tp_log.min(groups_log);
            let dialect = if legacy && hpg == 1 { NemoDialect::Legacy } else { NemoDialect::Mcore };
            let hp = hparams(groups * hpg, groups, head_dim * 2, ffn_mult * tp, layers_per_stage * pp, vocab, tied);
            let c = canonical(&hp);
            let nemo = as_nemo(&c, dialect, tp, pp, m);
            // Vocabulary rows are padded for tp, and every rank has a full set.
            let padded = shard::padded_vocab(vocab, m, tp);
            prop_assert_eq!(nemo.shards[0].tensors[TABLE[0].name(dialect)].shape[0], padded / tp);
            let back = from_nemo(&nemo, Some(vocab)).unwrap();
            prop_assert_eq!(&back.hparams, &hp);
            assert_same(&back.tensors, &c.tensors);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        /// Per-rank mcore ranks → distributed `.nemo` on disk (both backends) → canonical is the identity,
        /// and the arrays have Megatron's chunk grid (one chunk per layer × TP fragment).
        #[test]
        fn dist_round_trip_is_identity(
            groups_log in 0u32..3, hpg in prop_oneof![Just(1usize), Just(2)], head_dim in 1usize..3,
            ffn_mult in 1usize..3, layers_per_stage in 1usize..3, vocab in 3usize..40, tied: bool,
            tp_log in 0u32..3, pp in 1usize..3, m in prop_oneof![Just(1usize), Just(8)],
        ) {
            let groups = 1usize << groups_log;
            let tp = 1usize << tp_log.min(groups_log);
            let hp = hparams(groups * hpg, groups, head_dim * 2, ffn_mult * tp, layers_per_stage * pp, vocab, tied);
            let c = canonical(&hp);
            let ranks = as_nemo(&c, NemoDialect::Mcore, tp, pp, m);
            let weights = dist_weights(&ranks).unwrap();
            let fc1 = weights.arrays.iter().find(|a| a.key == "model.decoder.layers.mlp.linear_fc1.weight").unwrap();
            prop_assert_eq!(fc1.chunks.len(), hp.layers * 2 * tp);
            prop_assert_eq!(weights.objects.len(), 6 * hp.layers);
            let dir = tempfile::tempdir().unwrap();
            for backend in [nemo::DistBackend::Zarr, nemo::DistBackend::TorchDist] {
                let dest = dir.path().join(format!("{backend:?}.nemo"));
                nemo::write_distributed(&ranks, &weights, backend, &dest, &Default::default()).unwrap();
                let back = from_nemo(&nemo::read(&dest).unwrap(), Some(vocab)).unwrap();
                prop_assert_eq!(&back.hparams, &hp);
                assert_same(&back.tensors, &c.tensors);
            }
        }
    }

    #[test]
    fn mha_qkv_is_per_head_interleaved_and_padding_is_zero() {
        // 2 heads of d=2 over H=4: fused rows are [q0 q0 k0 k0 v0 v0 q1 q1 k1 k1 v1 v1].
        let hp = hparams(2, 2, 2, 2, 1, 3, false);
        let c = canonical(&hp);
        let shards = to_nemo_shards(&c, NemoDialect::Mcore, 1, 1, 4).unwrap();
        let qkv = &shards[0].tensors["model.decoder.layers.0.self_attention.linear_qkv.weight"];
        let rows: Vec<u32> = qkv
            .bytes("qkv")
            .unwrap()
            .chunks(16)
            .map(|r| u32::from_le_bytes(r[..4].try_into().unwrap()))
            .collect();
        let first = |n: &str| u32::from_le_bytes(c.tensors[n].bytes(n).unwrap()[..4].try_into().unwrap());
        let (q, k, v) = (
            first("model.layers.0.self_attn.q_proj.weight"),
            first("model.layers.0.self_attn.k_proj.weight"),
            first("model.layers.0.self_attn.v_proj.weight"),
        );
        assert_eq!(rows, [q, q + 4, k, k + 4, v, v + 4, q + 8, q + 12, k + 8, k + 12, v + 8, v + 12]);
        let emb = &shards[0].tensors["model.embedding.word_embeddings.weight"];
        assert_eq!(emb.shape, [4, 4]);
        assert!(emb.bytes("e").unwrap()[3 * 16..].iter().all(|b| *b == 0), "padded row is zeros");
    }

    #[test]
    fn refuses_what_does_not_divide() {
        let c = canonical(&hparams(8, 2, 2, 6, 3, 10, false));
        let err = to_nemo_shards(&c, NemoDialect::Mcore, 4, 1, 1).unwrap_err().to_string();
        assert!(err.contains("query groups (2) do not divide by tp=4"), "{err}");
        let err = to_nemo_shards(&c, NemoDialect::Mcore, 2, 2, 1).unwrap_err().to_string();
        assert!(err.contains("layers (3) do not divide by pp=2"), "{err}");
        let err = to_nemo_shards(&c, NemoDialect::Legacy, 1, 1, 1).unwrap_err().to_string();
        assert!(err.contains("no grouped-query attention"), "{err}");
    }

    #[test]
    fn leftover_and_missing_tensors_are_named() {
        let hp = hparams(2, 2, 2, 2, 2, 5, false);
        let c = canonical(&hp);
        let mut nemo = as_nemo(&c, NemoDialect::Mcore, 1, 1, 1);
        nemo.shards[0].tensors.insert("model.decoder.layers.0.mystery.weight".into(), c.tensors[0].clone());
        let err = from_nemo(&nemo, Some(5)).unwrap_err().to_string();
        assert!(err.contains("unmapped source tensors: model.decoder.layers.0.mystery.weight"), "{err}");
        nemo.shards[0].tensors.shift_remove("model.decoder.layers.0.mystery.weight");
        nemo.shards[0].tensors.shift_remove("model.decoder.layers.1.mlp.linear_fc2.weight");
        let err = from_nemo(&nemo, Some(5)).unwrap_err().to_string();
        assert!(err.contains("model.decoder.layers.1.mlp.linear_fc2.weight"), "{err}");
    }
}
