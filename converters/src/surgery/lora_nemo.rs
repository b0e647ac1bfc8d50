//! Merge a NeMo LoRA adapter `.nemo` (what `megatron_gpt_finetuning` with `peft_scheme: lora`
//! saves: only the adapter weights) into a base `.nemo` of the same TP and PP, rank by rank:
//! `W_t' = W_t + (alpha / dim) · linear_out · linear_in`, in f32, cast back to W's dtype.
//!
//! | base weight (mcore / legacy) | adapter under `…adapter_layer.` | base split |
//! |---|---|---|
//! | `linear_qkv` / `query_key_value` | `lora_kqv_adapter` | column |
//! | `linear_proj` / `dense` | `lora_dense_attention_adapter` | row |
//! | `linear_fc1` / `dense_h_to_4h` | `lora_hto4h_adapter` | column |
//! | `linear_fc2` / `dense_4h_to_h` | `lora_4htoh_adapter` | row |
//!
//! Column-parallel base weights: `linear_in` is split over ranks along its rank dim, so it is
//! concatenated back (`[dim, H]`), and rank t's `linear_out` (`[rows_t, dim]`) gives rank t's
//! delta. Row-parallel: rank t's `linear_in` (`[dim, cols_t]`) and the concatenated `linear_out`
//! (`[H, dim]`). This is NeMo's `scripts/nlp_language_modeling/merge_lora_weights/merge.py`, plus
//! the `alpha / dim` factor the adapter applies in its forward pass (`peft.lora_tuning.alpha`,
//! which defaults to `adapter_dim`, i.e. a factor of 1; that script leaves it out). Adapters with
//! an activation or a norm (`peft.lora_tuning.activation` other than `identity`,
//! `norm_position` set) are not linear maps and are refused.
//!
//! Full tensors the adapter also saves under a name the base has on the same rank replace the
//! base's (cast to its dtype): what NeMo's PEFT trains besides the LoRA weights — NeVA's
//! projector (`…mm_projector_adapter.mm_projector.*`, trained with the LoRA in NeVA PEFT), or
//! `tunable_base_param_names`. Any other tensor is refused by name.

use super::lora::merged_entry;
use super::plan::{Action, Change, Edit, Plan, WriteAs};
use crate::checkpoint::{Checkpoint, Flavour, ModelConfig, NemoLayout, Rank, TensorEntry};
use crate::error::{Error, Result};
use crate::transforms;
use regex::Regex;
use std::collections::{BTreeMap, BTreeSet};

/// Adapter module → (base weight suffix in the same layer, column-parallel base).
const ADAPTERS: &[(&str, &str, &str, bool)] = &[
    // (adapter, mcore base, legacy base, column-parallel)
    (
        "self_attention.adapter_layer.lora_kqv_adapter",
        "self_attention.linear_qkv.weight",
        "self_attention.query_key_value.weight",
        true,
    ),
    (
        "self_attention.adapter_layer.lora_dense_attention_adapter",
        "self_attention.linear_proj.weight",
        "self_attention.dense.weight",
        false,
    ),
    ("mlp.adapter_layer.lora_hto4h_adapter", "mlp.linear_fc1.weight", "mlp.dense_h_to_4h.weight", true),
    ("mlp.adapter_layer.lora_4htoh_adapter", "mlp.linear_fc2.weight", "mlp.dense_4h_to_h.weight", false),
];

/// Whether `ckpt` is a NeMo checkpoint holding LoRA adapter weights.
pub fn is_nemo_lora(ckpt: &Checkpoint) -> bool {
    matches!(ckpt.meta.flavour, Flavour::Nemo { .. })
        && ckpt.shards.iter().flat_map(|s| s.tensors.keys()).any(|k| k.contains(".adapter_layer.lora_"))
}

/// Whether `base` holds a tensor `name` on `rank`.
fn base_holds(base: &Checkpoint, rank: Rank, name: &str) -> bool {
    base.shards.iter().any(|s| s.rank == rank && s.tensors.contains_key(name))
}

/// The adapter's `alpha / dim` from its yaml; `dim` is the adapter rank seen in the weights.
fn scale(adapter: &Checkpoint, dim: usize) -> Result<(f64, String)> {
    let path = &adapter.meta.path;
    let Some(ModelConfig::NemoYaml(cfg)) = &adapter.meta.config else {
        return Err(Error::missing(path, "model_config.yaml"));
    };
    for (key, linear) in [
        ("peft.lora_tuning.activation", &["identity"][..]),
        ("peft.lora_tuning.norm_position", &["none"][..]),
    ] {
        match cfg.get_str(key) {
            Some(v) if !linear.contains(&v) => {
                return Err(Error::invalid(
                    path,
                    format!("{key} is '{v}': such an adapter is not a linear map and cannot be merged"),
                ));
            }
            _ => {}
        }
    }
    if let Some(d) = cfg.get_usize("peft.lora_tuning.adapter_dim") {
        if d != dim {
            return Err(Error::invalid(
                path,
                format!("peft.lora_tuning.adapter_dim is {d}, the weights have rank {dim}"),
            ));
        }
    }
    Ok(match cfg.get_f64("peft.lora_tuning.alpha") {
        Some(alpha) => (alpha / dim as f64, format!("alpha {alpha} / dim {dim}")),
        None => (1.0, format!("alpha unset = dim {dim}")),
    })
}

/// Merge the NeMo LoRA `adapter` into `base` (both per-rank `.nemo`, same TP and PP).
pub fn merge_nemo_lora(base: &Checkpoint, adapter: &Checkpoint) -> Result<Edit> {
    let path = &base.meta.path;
    let per_rank = |c: &Checkpoint| matches!(c.meta.flavour, Flavour::Nemo { layout, .. } if layout != NemoLayout::Distributed);
    if !per_rank(base) {
        return Err(Error::invalid(
            path,
            "a NeMo LoRA adapter merges into a per-rank .nemo base (not HF, not model_weights/ distributed)",
        ));
    }
    if !per_rank(adapter) {
        return Err(Error::invalid(&adapter.meta.path, "expected a per-rank .nemo LoRA adapter"));
    }
    let (bp, ap) = (base.meta.parallel, adapter.meta.parallel);
    if bp != ap {
        return Err(Error::invalid(
            &adapter.meta.path,
            format!("adapter saved at tp={} pp={}, base at tp={} pp={}; reshard the base to the adapter's layout first", ap.tp, ap.pp, bp.tp, bp.pp),
        ));
    }
    let key_re = Regex::new(r"^(.*\.layers\.\d+\.)(.+)\.linear_(in|out)\.weight$").expect("constant regex");
    // (pp, layer prefix, adapter index) → per tp rank: (in, out)
    type Halves = BTreeMap<usize, (Option<TensorEntry>, Option<TensorEntry>)>;
    let mut groups: BTreeMap<(usize, String, usize), Halves> = BTreeMap::new();
    // Full tensors that replace the base's: (rank, name, tensor).
    let mut replacements: Vec<(Rank, String, TensorEntry)> = Vec::new();
    for s in &adapter.shards {
        for (key, t) in &s.tensors {
            let found = key_re.captures(key).and_then(|m| {
                let i = ADAPTERS.iter().position(|a| a.0 == &m[2])?;
                Some((m[1].to_string(), i, &m[3] == "in"))
            });
            let Some((prefix, i, is_in)) = found else {
                if base_holds(base, s.rank, key) {
                    replacements.push((s.rank, key.clone(), t.clone()));
                    continue;
                }
                return Err(Error::invalid(
                    &adapter.meta.path,
                    format!(
                        "tensor '{key}' (tp={} pp={}) is neither a NeMo LoRA linear_in/linear_out weight this \
                         merge knows nor a tensor the base has on that rank",
                        s.rank.tp, s.rank.pp
                    ),
                ));
            };
            let slot = groups.entry((s.rank.pp, prefix, i)).or_default().entry(s.rank.tp).or_default();
            let half = if is_in { &mut slot.0 } else { &mut slot.1 };
            *half = Some(t.clone());
        }
    }
    if groups.is_empty() {
        return Err(Error::missing(
            &adapter.meta.path,
            "LoRA adapter weights (…adapter_layer.lora_*_adapter.linear_in.weight)",
        ));
    }
    let mcore = base.shards.iter().flat_map(|s| s.tensors.keys()).any(|k| k.starts_with("model.decoder."));
    let mut out = base.clone();
    let mut plan = Plan::new("merge-lora", path);
    plan.notes.push(format!("NeMo LoRA adapter {}", adapter.meta.path.display()));
    let mut modified: BTreeSet<(usize, usize, String)> = BTreeSet::new();
    let mut replaced: BTreeSet<(usize, usize, String)> = BTreeSet::new();
    let mut how = String::new();
    for ((pp, prefix, i), ranks) in &groups {
        let (name, base_suffix, legacy_suffix, column) = ADAPTERS[*i];
        let target = format!("{prefix}{}", if mcore { base_suffix } else { legacy_suffix });
        let mut ins = Vec::with_capacity(bp.tp);
        let mut outs = Vec::with_capacity(bp.tp);
        for t in 0..bp.tp {
            let (a, b) = ranks.get(&t).cloned().unwrap_or_default();
            let missing = |half: &str| {
                Error::missing(
                    &adapter.meta.path,
                    format!("tensor '{prefix}{name}.linear_{half}.weight' on tp={t} pp={pp}"),
                )
            };
            ins.push(a.ok_or_else(|| missing("in"))?);
            outs.push(b.ok_or_else(|| missing("out"))?);
        }
        // The half split over ranks along the adapter's output rows, joined back.
        let (joined, dim) = if column {
            let j = transforms::concat_rows(&format!("{prefix}{name}.linear_in.weight"), &ins)?;
            let dim = j.shape.first().copied().unwrap_or(0);
            (j, dim)
        } else {
            let j = transforms::concat_rows(&format!("{prefix}{name}.linear_out.weight"), &outs)?;
            let dim = j.shape.get(1).copied().unwrap_or(0);
            (j, dim)
        };
        let (factor, text) = scale(adapter, dim)?;
        how = text;
        for t in 0..bp.tp {
            let (a, b) =
                if column { (joined.clone(), outs[t].clone()) } else { (ins[t].clone(), joined.clone()) };
            let shard = out
                .shards
                .iter_mut()
                .find(|s| s.rank.tp == t && s.rank.pp == *pp)
                .ok_or_else(|| Error::missing(path, format!("rank tp={t} pp={pp}")))?;
            let w = shard.tensors.get(&target).cloned().ok_or_else(|| {
                Error::missing(
                    path,
                    format!("tensor '{target}' on tp={t} pp={pp} (the adapter has {prefix}{name})"),
                )
            })?;
            let ([ar, an], [bm, br]) = match (&a.shape[..], &b.shape[..]) {
                ([ar, an], [bm, br]) => ([*ar, *an], [*bm, *br]),
                _ => {
                    return Err(Error::invalid(
                        &adapter.meta.path,
                        format!(
                            "'{prefix}{name}': linear_in/linear_out must be 2-D, got {:?} and {:?}",
                            a.shape, b.shape
                        ),
                    ))
                }
            };
            if ar != br
                || w.shape != [bm, an]
                || !w.dtype.is_float()
                || !a.dtype.is_float()
                || !b.dtype.is_float()
            {
                return Err(Error::invalid(
                    &adapter.meta.path,
                    format!(
                        "'{prefix}{name}' on tp={t} pp={pp}: linear_out·linear_in is {:?}·{:?}, base '{target}' is {} {:?}",
                        b.shape, a.shape, w.dtype, w.shape
                    ),
                ));
            }
            let merged = merged_entry(&target, w, a, b, factor as f32, false);
            shard.tensors.insert(target.clone(), merged);
            modified.insert((t, *pp, target.clone()));
        }
    }
    // A tensor replaced on one rank is replaced on every rank holding it (the projector is a copy
    // per TP rank): a partial save would leave the ranks disagreeing.
    for (rank, name, _) in &replacements {
        for s in base.shards.iter().filter(|s| s.tensors.contains_key(name)) {
            if !replacements.iter().any(|(r, n, _)| *r == s.rank && n == name) {
                return Err(Error::missing(
                    &adapter.meta.path,
                    format!(
                        "tensor '{name}' on tp={} pp={} (the adapter saves it whole on tp={} pp={}, and \
                         the base holds it there too)",
                        s.rank.tp, s.rank.pp, rank.tp, rank.pp
                    ),
                ));
            }
        }
    }
    for (rank, name, t) in replacements {
        let Some(shard) = out.shards.iter_mut().find(|s| s.rank == rank && s.tensors.contains_key(&name))
        else {
            continue; // base_holds found it on this rank, so there is such a shard
        };
        let old = &shard.tensors[&name];
        if modified.contains(&(rank.tp, rank.pp, name.clone())) {
            return Err(Error::invalid(
                &adapter.meta.path,
                format!(
                    "tensor '{name}' (tp={} pp={}) is both LoRA-adapted and saved whole",
                    rank.tp, rank.pp
                ),
            ));
        }
        if old.shape != t.shape || !t.dtype.is_float() || !old.dtype.is_float() {
            return Err(Error::invalid(
                &adapter.meta.path,
                format!(
                    "tensor '{name}' (tp={} pp={}): the adapter's is {} {:?}, the base's {} {:?}",
                    rank.tp, rank.pp, t.dtype, t.shape, old.dtype, old.shape
                ),
            ));
        }
        let t = t.cast(&name, old.dtype)?;
        shard.tensors.insert(name.clone(), t);
        replaced.insert((rank.tp, rank.pp, name));
    }
    let multi = base.shards.len() > 1;
    for s in &out.shards {
        for (n, t) in &s.tensors {
            let at = (s.rank.tp, s.rank.pp, n.clone());
            let c = if modified.contains(&at) {
                Change::new(n, Action::Modified, t).detail(format!("W + linear_out·linear_in ({how})"))
            } else if replaced.contains(&at) {
                Change::new(n, Action::Modified, t)
                    .detail("replaced by the adapter's (trained alongside the LoRA)")
            } else {
                Change::new(n, Action::Kept, t)
            };
            plan.push(if multi { c.at_rank(s.rank.tp, s.rank.pp) } else { c });
        }
    }
    Ok(Edit::new(out, WriteAs::like(&base.meta.flavour), plan))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{ByteSource, Meta, Parallelism, Rank, Shard, TensorMap};
    use crate::convert::llama;
    use crate::formats::nemo::NemoConfig;
    use crate::names::llama::{LlamaHparams, NemoDialect, NemoYamlOptions};
    use crate::shard::{self, ShardSpec};
    use crate::surgery::numeric::{from_f32, to_f32, SplitMix64};
    use crate::DType;
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    fn random(shape: Vec<usize>, rng: &mut SplitMix64) -> TensorEntry {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        TensorEntry::new(
            DType::F32,
            shape,
            ByteSource::owned(from_f32(&v, DType::F32)),
            Arc::from(Path::new("syn")),
        )
    }

    fn hp() -> LlamaHparams {
        LlamaHparams {
            layers: 2,
            hidden: 8,
            ffn: 12,
            heads: 4,
            groups: 2,
            head_dim: 2,
            vocab: 16,
            max_positions: 32,
            rope_theta: 10000.0,
            rope_linear_factor: None,
            norm_eps: 1e-5,
            init_std: 0.02,
            tied: false,
            bos: None,
            eos: None,
        }
    }

    fn nemo(shards: Vec<Shard>, tp: usize, extra_yaml: &str) -> Checkpoint {
        let mut yaml = hp().nemo_yaml(&NemoYamlOptions {
            dialect: NemoDialect::Mcore,
            dtype: DType::F32,
            tp,
            pp: 1,
            divisible_by: 1,
            tokenizer_model: None,
        });
        yaml.push_str(extra_yaml);
        let parallel = Parallelism { tp, pp: 1 };
        let meta = Meta {
            path: PathBuf::from(format!("tp{tp}.nemo")),
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

    /// A TP1 base and adapter, and the same split for TP2 the way NeMo shards them.
    #[test]
    fn tp2_merge_equals_tp1_merge_and_the_formula() {
        let mut rng = SplitMix64::new(3);
        let origin = PathBuf::from("syn");
        let tensors: TensorMap =
            llama::canonical_shapes(&hp()).into_iter().map(|(n, s)| (n, random(s, &mut rng))).collect();
        let c = llama::CanonicalLlama { hparams: hp(), tensors, origin };
        let dim = 4;
        let pre = "model.decoder.layers.1.";
        // Full adapters: qkv (column, out rows = fused QKV rows), fc2 (row).
        let qkv_rows = (4 + 2 * 2) * 2;
        let (kin, kout) = (random(vec![dim, 8], &mut rng), random(vec![qkv_rows, dim], &mut rng));
        let (fin, fout) = (random(vec![dim, 12], &mut rng), random(vec![8, dim], &mut rng));
        let adapter = |tp: usize| -> Checkpoint {
            let kin_p = shard::split("kin", &kin, &ShardSpec::SplitRows, tp).unwrap();
            let kout_p = shard::split("kout", &kout, &ShardSpec::SplitRows, tp).unwrap();
            let fin_p = shard::split("fin", &fin, &ShardSpec::SplitCols, tp).unwrap();
            let fout_p = shard::split("fout", &fout, &ShardSpec::SplitRows, tp).unwrap();
            let shards = (0..tp)
                .map(|t| {
                    let mut m = TensorMap::new();
                    m.insert(
                        format!("{pre}self_attention.adapter_layer.lora_kqv_adapter.linear_in.weight"),
                        kin_p[t].clone(),
                    );
                    m.insert(
                        format!("{pre}self_attention.adapter_layer.lora_kqv_adapter.linear_out.weight"),
                        kout_p[t].clone(),
                    );
                    m.insert(
                        format!("{pre}mlp.adapter_layer.lora_4htoh_adapter.linear_in.weight"),
                        fin_p[t].clone(),
                    );
                    m.insert(
                        format!("{pre}mlp.adapter_layer.lora_4htoh_adapter.linear_out.weight"),
                        fout_p[t].clone(),
                    );
                    Shard::new(Rank { tp: t, pp: 0 }, m)
                })
                .collect();
            nemo(shards, tp, "peft:\n  peft_scheme: lora\n  lora_tuning:\n    adapter_dim: 4\n    alpha: 8\n")
        };
        let merged = |tp: usize| {
            let base = nemo(llama::to_nemo_shards(&c, NemoDialect::Mcore, tp, 1, 1).unwrap(), tp, "");
            let e = merge_nemo_lora(&base, &adapter(tp)).unwrap();
            assert_eq!(e.plan.summary.modified, 2 * tp);
            llama::from_nemo(&e.output, Some(16)).unwrap().tensors
        };
        let (one, two) = (merged(1), merged(2));
        for (n, t) in &one {
            assert!(
                t.bytes(n).unwrap() == two[n.as_str()].bytes(n).unwrap(),
                "{n}: tp1 and tp2 merges differ"
            );
        }
        // TP1 fc2: W + (8/4) · out·in, summed over the rank in order.
        let name = "model.layers.1.mlp.down_proj.weight";
        let (w, a, b) = (
            to_f32(name, &c.tensors[name]).unwrap(),
            to_f32("a", &fin).unwrap(),
            to_f32("b", &fout).unwrap(),
        );
        let got = to_f32(name, &one[name]).unwrap();
        for i in 0..8 {
            for j in 0..12 {
                let mut p = 0f32;
                for k in 0..dim {
                    p += b[i * dim + k] * a[k * 12 + j];
                }
                assert_eq!(got[i * 12 + j], w[i * 12 + j] + 2.0 * p, "({i}, {j})");
            }
        }
        assert!(
            one["model.layers.0.mlp.down_proj.weight"].bytes("x").unwrap()
                == c.tensors["model.layers.0.mlp.down_proj.weight"].bytes("x").unwrap()
        );
        // A different layout is refused.
        let base2 = nemo(llama::to_nemo_shards(&c, NemoDialect::Mcore, 2, 1, 1).unwrap(), 2, "");
        let err = merge_nemo_lora(&base2, &adapter(1)).unwrap_err().to_string();
        assert!(err.contains("adapter saved at tp=1 pp=1, base at tp=2 pp=1"), "{err}");
    }
}
