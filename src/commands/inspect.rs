//! `shardsmith inspect PATH`: format, layout, architecture, tensor table and totals, from headers.

use anyhow::{Context, Result};
use serde::Serialize;
use shardsmith_converters::describe::{describe, Architecture};
use shardsmith_converters::{formats, Checkpoint, DType, Parallelism};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// One row of the tensor table.
#[derive(Serialize)]
pub struct TensorRow {
    /// Tensor name as the format stores it.
    pub name: String,
    /// `tp.pp` rank for sharded checkpoints.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rank: Option<[usize; 2]>,
    /// Element type.
    pub dtype: DType,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Size in bytes.
    pub bytes: usize,
}

/// Totals over the listed tensors.
#[derive(Serialize, Default)]
pub struct Totals {
    /// Number of tensors.
    pub tensors: usize,
    /// Number of elements.
    pub params: usize,
    /// Bytes.
    pub bytes: usize,
    /// Elements per dtype.
    pub params_by_dtype: BTreeMap<String, usize>,
}

/// Everything `inspect` reports.
#[derive(Serialize)]
pub struct Report {
    /// The inspected path.
    pub path: String,
    /// Container format and weight layout in words.
    pub format: String,
    /// Tensor-parallel size.
    pub tp: usize,
    /// Pipeline-parallel size.
    pub pp: usize,
    /// What model it is.
    pub architecture: Architecture,
    /// Non-tensor files carried along (tokenizer, generation config, ...).
    pub artifacts: Vec<String>,
    /// Listed tensors (after `--filter`).
    pub tensors: Vec<TensorRow>,
    /// Totals over the listed tensors.
    pub totals: Totals,
}

/// Build the report for an opened checkpoint.
pub fn report(ckpt: &Checkpoint, filter: Option<&str>) -> Result<Report> {
    let matcher = filter
        .map(|g| {
            globset::Glob::new(g)
                .map(|g| g.compile_matcher())
                .with_context(|| format!("bad --filter glob '{g}'"))
        })
        .transpose()?;
    let sharded = ckpt.shards.len() > 1;
    let mut rows = Vec::new();
    let mut totals = Totals::default();
    for shard in &ckpt.shards {
        for (name, t) in &shard.tensors {
            if matcher.as_ref().is_some_and(|m| !m.is_match(name)) {
                continue;
            }
            totals.tensors += 1;
            totals.params += t.numel();
            totals.bytes += t.nbytes();
            *totals.params_by_dtype.entry(t.dtype.to_string()).or_default() += t.numel();
            rows.push(TensorRow {
                name: name.clone(),
                rank: sharded.then_some([shard.rank.tp, shard.rank.pp]),
                dtype: t.dtype,
                shape: t.shape.clone(),
                bytes: t.nbytes(),
            });
        }
    }
    let Parallelism { tp, pp } = ckpt.saved_parallelism()?;
    Ok(Report {
        path: ckpt.meta.path.display().to_string(),
        format: ckpt.meta.flavour.to_string(),
        tp,
        pp,
        architecture: describe(ckpt),
        artifacts: ckpt.meta.artifacts.iter().map(|a| a.name.clone()).collect(),
        tensors: rows,
        totals,
    })
}

/// Render the human-readable form.
pub fn render(r: &Report) -> String {
    let mut s = String::new();
    let a = &r.architecture;
    let opt = |v: Option<usize>| v.map_or("?".to_string(), |v| v.to_string());
    let family = a.family.map_or("unknown".to_string(), |f| format!("{f:?}").to_lowercase());
    let _ = writeln!(s, "path          {}", r.path);
    let _ = writeln!(s, "format        {}", r.format);
    let _ = writeln!(s, "parallelism   tp={} pp={}", r.tp, r.pp);
    let _ = writeln!(
        s,
        "architecture  {family} (from {}): layers {}, hidden {}, heads {}, query groups {}, ffn {}, vocab {}, padded vocab {}",
        a.source,
        opt(a.layers),
        opt(a.hidden),
        opt(a.heads),
        opt(a.query_groups),
        opt(a.ffn),
        opt(a.vocab),
        opt(a.padded_vocab),
    );
    if !r.artifacts.is_empty() {
        let _ = writeln!(s, "artifacts     {}", r.artifacts.join(", "));
    }
    let name_w = r.tensors.iter().map(|t| t.name.len()).max().unwrap_or(4).max(4);
    let with_rank = r.tensors.iter().any(|t| t.rank.is_some());
    let _ = writeln!(s);
    let rank_head = if with_rank { "tp.pp  " } else { "" };
    let _ = writeln!(s, "{rank_head}{:<name_w$}  {:<5}  {:<22}  {:>14}", "name", "dtype", "shape", "bytes");
    for t in &r.tensors {
        let rank = t.rank.map_or(String::new(), |[tp, pp]| format!("{tp:>2}.{pp:<3} "));
        let shape = format!("{:?}", t.shape);
        let _ = writeln!(
            s,
            "{rank}{:<name_w$}  {:<5}  {:<22}  {:>14}",
            t.name,
            t.dtype.to_string(),
            shape,
            t.bytes
        );
    }
    let by_dtype: Vec<String> = r.totals.params_by_dtype.iter().map(|(d, n)| format!("{d}: {n}")).collect();
    let _ = writeln!(
        s,
        "\ntotal         {} tensors, {} parameters ({}), {} bytes ({:.2} GiB)",
        r.totals.tensors,
        r.totals.params,
        by_dtype.join(", "),
        r.totals.bytes,
        r.totals.bytes as f64 / (1u64 << 30) as f64
    );
    s
}

/// The command: open, describe, print.
pub fn run(path: &Path, filter: Option<&str>, json: bool) -> Result<()> {
    let ckpt = formats::open(&crate::hub::resolve(path)?)?;
    let report = report(&ckpt, filter)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}
