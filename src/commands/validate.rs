//! `shardsmith validate CKPT --reference FIXTURE | --against OTHER`: run the model and compare.

use crate::models::{self, LoadOptions};
use crate::validate;
use anyhow::{bail, Result};
use candle_core::{DType, Device};
use std::path::Path;

/// What to compare with.
pub enum Against<'a> {
    /// Golden outputs (a fixture directory or a golden `.safetensors`).
    Reference(&'a Path),
    /// Another checkpoint of the same model.
    Checkpoint(&'a Path),
}

/// [`Against`] with a checkpoint opened.
enum Other<'a> {
    Golden(&'a Path),
    Model(&'a Path, Box<shardsmith_converters::Checkpoint>),
}

/// Run the validation; `Ok(false)` when it fails its tier.
pub fn run(
    ckpt: &Path,
    against: Against,
    tp: Option<usize>,
    other_tp: Option<usize>,
    dtype: DType,
    vision: Option<&Path>,
    json: bool,
) -> Result<bool> {
    // The tower for a checkpoint that only names its own (either side of --against).
    let opts = LoadOptions { tp, dtype, device: Device::Cpu, vision: vision.map(Path::to_path_buf) };
    let checkpoint = shardsmith_converters::formats::open(&crate::hub::resolve(ckpt)?)?;
    if validate::is_clip(&checkpoint) {
        let Against::Reference(r) = against else {
            bail!("--against compares language models; validate a CLIP tower with --reference");
        };
        models::check_vision_option(vision, &[&checkpoint])?;
        return report(validate::clip_against_golden(&checkpoint, r, dtype)?, json);
    }
    // The other side opened up front, so that --vision is checked against both.
    let other = match against {
        Against::Reference(r) => Other::Golden(r),
        Against::Checkpoint(p) => {
            Other::Model(p, Box::new(shardsmith_converters::formats::open(&crate::hub::resolve(p)?)?))
        }
    };
    let other_ckpt = match &other {
        Other::Model(_, c) => Some(&**c),
        Other::Golden(_) => None,
    };
    models::check_vision_option(vision, &std::iter::once(&checkpoint).chain(other_ckpt).collect::<Vec<_>>())?;
    let (mut model, info) = models::load_checkpoint(&checkpoint, &opts)?;
    let report_ = match &other {
        Other::Golden(r) => validate::against_golden(&mut model, &info, r)?,
        Other::Model(other, other_checkpoint) => {
            let other_opts = LoadOptions { tp: other_tp, ..opts };
            let (mut b, binfo) = models::load_checkpoint(other_checkpoint, &other_opts)?;
            if (binfo.family == "llama") != (info.family == "llama") {
                bail!(
                    "{} is a {} model but {} is a {} model",
                    ckpt.display(),
                    info.family,
                    other.display(),
                    binfo.family
                );
            }
            validate::against_model((&mut model, &info), (&mut b, &binfo))?
        }
    };
    report(report_, json)
}

fn report(r: validate::Report, json: bool) -> Result<bool> {
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", validate::render(&r));
    }
    Ok(r.passed)
}
