//! `shardsmith surgery …`: edit checkpoints — rename / drop tensors, extract a multimodal part,
//! resize the vocabulary, keep the first layers, merge a LoRA adapter, merge two checkpoints,
//! swap a multimodal bundle's language model.
//!
//! Each subcommand builds the edit from headers (`shardsmith_converters::surgery`), then either
//! prints the plan (`--dry-run`) or writes atomically in the input's own container and prints a
//! short report. `--json` makes either machine-readable.

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use shardsmith_converters::formats;
use shardsmith_converters::formats::nemo::DistWeights;
use shardsmith_converters::surgery::WriteAs;
use shardsmith_converters::surgery::{
    self, extract, layers, lora, lora_nemo, merge, parts::Part, rename, swap, vocab, Edit, WriteOptions,
};
use shardsmith_converters::Checkpoint;

use super::convert::DistFormat;
use std::path::{Path, PathBuf};

/// `shardsmith surgery`.
#[derive(Args, Debug)]
pub struct SurgeryArgs {
    #[command(subcommand)]
    command: SurgeryCommand,
}

/// Where and how an edit is written.
#[derive(Args, Debug)]
pub struct OutArgs {
    /// Output path (a directory for HF output, a .nemo path for .nemo input).
    #[arg(short, long)]
    out: PathBuf,
    /// Print the plan (tensors kept / renamed / dropped / added / modified, shapes, bytes) and
    /// write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the plan or report as JSON.
    #[arg(long)]
    json: bool,
    /// Replace an existing output.
    #[arg(long)]
    force: bool,
    /// Write a .nemo output as a Megatron distributed checkpoint (model_weights/) with this
    /// backend, instead of per rank (mp_rank_XX/).
    #[arg(long, value_enum)]
    dist_ckpt: Option<DistFormat>,
}

#[derive(Subcommand, Debug)]
enum SurgeryCommand {
    /// Rename tensors by regular expression: --rule 'REGEX=REPLACEMENT' (capture groups as $1,
    /// rules applied in order, first match each); refuses two tensors landing on one name.
    Rename {
        /// Any checkpoint (HF directory, safetensors, PyTorch file, .nemo).
        src: PathBuf,
        /// A rename rule; repeat for several.
        #[arg(long = "rule", required = true)]
        rules: Vec<String>,
        #[command(flatten)]
        out: OutArgs,
    },
    /// Drop tensors whose stored name matches a glob ('*' also matches dots).
    Drop {
        /// Any checkpoint.
        src: PathBuf,
        /// A glob; repeat for several.
        #[arg(long = "pattern", required = true)]
        patterns: Vec<String>,
        #[command(flatten)]
        out: OutArgs,
    },
    /// Take the LLM (HF LLaMA dir), vision tower (HF CLIPVisionModel dir) or projector
    /// (mm_projector.safetensors, LLaVA keys) out of a llava-hf directory or a NeVA .nemo (whose
    /// LLM keeps NeVA's tokenizer, <extra_id_*> included, with the embedding cut to it).
    Extract {
        /// A llava-hf directory or a NeVA .nemo.
        src: PathBuf,
        /// llm, vision or projector.
        #[arg(long, value_parser = parse_part)]
        part: Part,
        #[command(flatten)]
        out: OutArgs,
    },
    /// Grow or shrink a LLaMA's vocabulary (HF or .nemo): embedding, head, config, tokenizer.
    ResizeVocab {
        /// HF LLaMA directory or .nemo.
        src: PathBuf,
        /// Comma-separated tokens to add (they get the ids after the tokenizer's last one).
        #[arg(long, required_unless_present = "to", conflicts_with = "to")]
        add_tokens: Option<String>,
        /// Make the vocabulary exactly N rows.
        #[arg(long)]
        to: Option<usize>,
        /// New rows: mean (of the token rows), zeros, or seeded:SEED.
        #[arg(long, default_value = "mean")]
        init: String,
        #[command(flatten)]
        out: OutArgs,
    },
    /// Keep the first N decoder layers (HF LLaMA and llava-hf byte for byte; LLaMA and NeVA .nemo
    /// files at any TP/PP, re-emitted per rank at their own TP/PP and key layout).
    KeepLayers {
        /// HF LLaMA / llava-hf directory or .nemo.
        src: PathBuf,
        /// How many layers to keep.
        #[arg(long)]
        first: usize,
        #[command(flatten)]
        out: OutArgs,
    },
    /// Merge a LoRA adapter into a LLaMA: W + scale·B·A in f32, cast back to W's dtype. PEFT
    /// adapters (adapter_config.json + adapter_model.safetensors) into HF or .nemo bases; NeMo
    /// LoRA .nemo adapters into a .nemo base of the same TP/PP.
    MergeLora {
        /// HF LLaMA directory or .nemo.
        base: PathBuf,
        /// The PEFT adapter directory, or a NeMo LoRA .nemo.
        #[arg(long)]
        adapter: PathBuf,
        #[command(flatten)]
        out: OutArgs,
    },
    /// Weighted merge of two checkpoints of one architecture, in f32, cast to A's dtype.
    Merge {
        /// Checkpoint A (its container, config and dtypes are kept).
        a: PathBuf,
        /// Checkpoint B.
        b: PathBuf,
        /// Interpolate: (1 - W)·A + W·B (default 0.5).
        #[arg(long, conflicts_with = "weights")]
        weight: Option<f32>,
        /// Explicit weights WA,WB: WA·A + WB·B.
        #[arg(long, value_delimiter = ',', num_args = 1)]
        weights: Option<Vec<f32>>,
        #[command(flatten)]
        out: OutArgs,
    },
    /// Replace the language model of a llava-hf bundle or NeVA .nemo with another LLaMA of the
    /// same hidden size; vision tower and projector stay byte-exact. A NeVA .nemo is written at
    /// its own TP/PP/dialect, the new tokenizer extended with <extra_id_0..7> as convert does.
    SwapLlm {
        /// The llava-hf directory or NeVA .nemo.
        bundle: PathBuf,
        /// The new language model (HF LLaMA directory or .nemo).
        #[arg(long)]
        llm: PathBuf,
        #[command(flatten)]
        out: OutArgs,
    },
}

fn parse_part(s: &str) -> Result<Part, String> {
    Part::parse(s).ok_or_else(|| format!("'{s}' is not one of llm, vision, projector"))
}

fn open(p: &Path) -> Result<Checkpoint> {
    Ok(formats::open(&crate::hub::resolve(p)?)?)
}

/// Run a surgery subcommand.
pub fn run(args: SurgeryArgs) -> Result<()> {
    let (edit, out) = match args.command {
        SurgeryCommand::Rename { src, rules, out } => {
            let rules = rules.iter().map(|r| rename::RenameRule::parse(r)).collect::<Result<Vec<_>, _>>()?;
            (rename::rename(&open(&src)?, &rules)?, out)
        }
        SurgeryCommand::Drop { src, patterns, out } => (rename::drop(&open(&src)?, &patterns)?, out),
        SurgeryCommand::Extract { src, part, out } => {
            let as_file = out.out.extension().is_some_and(|e| e == "safetensors");
            if as_file && part != Part::Projector {
                bail!("--part {} writes a directory; give -o a directory path", part.name());
            }
            if out.out.extension().is_some_and(|e| e == "nemo") {
                bail!(
                    "--part {} writes an HF directory, not a .nemo; give -o a directory and `shardsmith convert` it to .nemo",
                    part.name()
                );
            }
            (extract::extract(&open(&src)?, part, as_file)?, out)
        }
        SurgeryCommand::ResizeVocab { src, add_tokens, to, init, out } => {
            let change = match (add_tokens, to) {
                (Some(t), None) => vocab::VocabChange::AddTokens(vocab::parse_token_list(&t)?),
                (None, Some(n)) => vocab::VocabChange::To(n),
                _ => bail!("give exactly one of --add-tokens or --to"),
            };
            (vocab::resize_vocab(&open(&src)?, &change, vocab::Init::parse(&init)?)?, out)
        }
        SurgeryCommand::KeepLayers { src, first, out } => (layers::keep_layers(&open(&src)?, first)?, out),
        SurgeryCommand::MergeLora { base, adapter, out } => {
            let base = open(&base)?;
            if adapter.join("adapter_config.json").is_file() {
                (lora::merge_lora(&base, &lora::Adapter::read(&adapter)?)?, out)
            } else {
                let nemo = open(&adapter)?;
                if !lora_nemo::is_nemo_lora(&nemo) {
                    bail!(
                        "{}: neither a PEFT adapter directory (adapter_config.json) nor a NeMo LoRA .nemo",
                        adapter.display()
                    );
                }
                (lora_nemo::merge_nemo_lora(&base, &nemo)?, out)
            }
        }
        SurgeryCommand::Merge { a, b, weight, weights, out } => {
            let (wa, wb) = match (weight, weights.as_deref()) {
                (_, Some([wa, wb])) => (*wa, *wb),
                (_, Some(w)) => bail!("--weights takes two numbers WA,WB, got {}", w.len()),
                (Some(t), None) => (1.0 - t, t),
                (None, None) => (0.5, 0.5),
            };
            (merge::merge(&open(&a)?, &open(&b)?, wa, wb)?, out)
        }
        SurgeryCommand::SwapLlm { bundle, llm, out } => (swap::swap_llm(&open(&bundle)?, &open(&llm)?)?, out),
    };
    finish(&edit, &out)
}

/// The distributed-checkpoint arrays of a `--dist-ckpt` output, planned before anything is
/// written so that what one cannot hold is refused first. Without the flag a `.nemo` is written
/// per rank (the plan's notes say so for a distributed source).
fn dist_arrays(edit: &Edit, o: &OutArgs) -> Result<Option<(DistWeights, DistFormat)>> {
    let Some(format) = o.dist_ckpt else { return Ok(None) };
    if !matches!(edit.write_as, WriteAs::Nemo { .. }) {
        bail!("--dist-ckpt applies to .nemo outputs; this edit writes a {}", edit.write_as);
    }
    Ok(Some((shardsmith_converters::convert::dist_weights(&edit.output)?, format)))
}

/// Print the plan (`--dry-run`) or write and report.
fn finish(edit: &Edit, o: &OutArgs) -> Result<()> {
    let dist = dist_arrays(edit, o)?;
    let layout = dist.as_ref().map(|(w, format)| {
        format!("layout: a distributed checkpoint ({}, {} arrays)", format.name(), w.arrays.len())
    });
    if o.dry_run {
        if o.json {
            let v = serde_json::json!({
                "destination": o.out, "destination_exists": o.out.exists(), "written": false,
                "layout": layout, "plan": edit.plan,
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            let existing = super::convert::existing_destination(&o.out, o.force);
            println!("plan (dry run, nothing written): {}{existing}", o.out.display());
            print!("{}", edit.plan.render(true));
            layout.iter().for_each(|l| println!("{l}"));
        }
        return Ok(());
    }
    let started = std::time::Instant::now();
    {
        let _bar = crate::progress::WriteProgress::start(edit.plan.summary.bytes_written as u64, "writing");
        let dist = dist.as_ref().map(|(w, format)| (w, format.backend()));
        surgery::write(edit, &o.out, &WriteOptions { overwrite: o.force, dist, ..Default::default() })?;
    }
    let secs = started.elapsed().as_secs_f64();
    if o.json {
        let v = serde_json::json!({
            "destination": o.out, "written": true, "seconds": secs, "layout": layout, "plan": edit.plan,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", edit.plan.render(false));
        layout.iter().for_each(|l| println!("{l}"));
        println!("wrote {} in {secs:.1} s", o.out.display());
    }
    Ok(())
}
