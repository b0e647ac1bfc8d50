//! `shardsmith`: one binary to inspect, convert, reshard and verify LLaMA-2 / CLIP / NeVA
//! checkpoints. This file only parses arguments and dispatches; each command is a short function
//! in `shardsmith::commands`.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "shardsmith", version, about = "Convert, reshard and verify LLaMA-2 / CLIP / NeVA checkpoints")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Name a checkpoint's format, layout and architecture and list its tensors (headers only).
    Inspect {
        /// A safetensors file, HF directory, PyTorch checkpoint, .nemo file or extracted .nemo directory.
        path: PathBuf,
        /// Only list tensors whose name matches this glob (e.g. '*layers.0.*').
        #[arg(long)]
        filter: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a synthetic HF LLaMA-2 checkpoint with real tensor shapes and random bf16 values.
    Synth {
        /// llama2-7b, llama2-13b or llama2-70b.
        #[arg(long)]
        preset: String,
        /// Keep only this many decoder layers (e.g. a 70B-shaped model with 2 layers).
        #[arg(long)]
        layers: Option<usize>,
        /// Seed for the values.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output directory.
        #[arg(short, long)]
        out: PathBuf,
        /// Replace an existing output.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect { path, filter, json } => {
            shardsmith::commands::inspect::run(&path, filter.as_deref(), json)
        }
        Command::Synth { preset, layers, seed, out, force } => {
            shardsmith::commands::synth::run(&preset, layers, seed, &out, force)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, skipping a cause whose text the message above already contains
/// (our errors embed their I/O cause, anyhow contexts do not).
fn error_chain(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
    }
    text
}
