//! `shardsmith train --config train.yaml [--resume [DIR] | --force] [--set key=value]…` and
//! `shardsmith demo-data -o DIR`: finetuning and the data of the end-to-end demo.

use crate::train::run::{self, RunOptions};
use anyhow::Result;
use std::path::{Path, PathBuf};

/// Train; print the summary.
pub fn train(
    config: &Path,
    resume: Option<Option<PathBuf>>,
    overrides: Vec<String>,
    force: bool,
    json: bool,
) -> Result<()> {
    let summary = run::run(config, &RunOptions { resume, overrides, force })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        let first = summary.losses.first().copied().unwrap_or(f64::NAN);
        let last = summary.losses.last().copied().unwrap_or(f64::NAN);
        println!(
            "trained to step {} (loss {first:.4} -> {last:.4}); checkpoint {}; metrics {}; plot {}{}",
            summary.steps,
            summary.checkpoint.display(),
            summary.metrics.display(),
            summary.plot.display(),
            if summary.skipped_records > 0 {
                format!("; {} bad records skipped", summary.skipped_records)
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

/// Write the coloured-shapes VQA set.
pub fn demo_data(out: &Path, train: usize, test: usize, size: u32, seed: u64, force: bool) -> Result<()> {
    let (tr, te) = crate::train::demo::write(out, train, test, size, seed, force)?;
    println!(
        "wrote {} training and {} held-out images ({} and {} question records) to {}",
        tr.len(),
        te.len(),
        tr.len() * crate::train::demo::QUESTIONS.len(),
        te.len() * crate::train::demo::QUESTIONS.len(),
        out.display()
    );
    Ok(())
}
