//! `shardsmith bench forward`: CPU (or CUDA) forward timing — prefill of a prompt and per-token
//! decode with the KV cache — printed as one JSON line in the same shape as
//! `bench/pytorch_forward.py`, so `bench/forward.sh` can put both in one table.

use crate::models::{self, LoadOptions, Model};
use crate::validate::seeded_prompt;
use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use std::path::Path;
use std::time::Instant;

/// What to time.
pub struct Options {
    /// Prompt tokens for the prefill.
    pub prompt_len: usize,
    /// Decode steps timed after the prefill.
    pub decode: usize,
    /// Timed repetitions (after one warm-up); medians are reported.
    pub runs: usize,
    /// Compute dtype.
    pub dtype: DType,
    /// Tensor-parallel size (simulated in-process).
    pub tp: Option<usize>,
    /// Feed an image (vision models): the prompt gets one image's tokens.
    pub image: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One prefill + decode; returns (prefill seconds, seconds per decoded token).
fn once(model: &mut Model, ids: &Tensor, pixels: Option<&Tensor>, decode: usize) -> Result<(f64, f64)> {
    model.llm().reset();
    let t0 = Instant::now();
    let mut logits = model.forward(ids, pixels, true, false)?.logits;
    let mut next = logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()?;
    let prefill = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    for _ in 0..decode {
        let step = Tensor::new(&[[next]], ids.device())?;
        logits = model.forward(&step, None, true, false)?.logits;
        next = logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()?;
    }
    Ok((prefill, t1.elapsed().as_secs_f64() / decode.max(1) as f64))
}

/// Time `path` and print the JSON line.
pub fn forward(path: &Path, o: &Options) -> Result<()> {
    ensure!(o.runs >= 1 && o.prompt_len >= 2, "need --runs >= 1 and --prompt-len >= 2");
    let device = Device::Cpu;
    let (mut model, info) =
        models::load(path, &LoadOptions { tp: o.tp, dtype: o.dtype, device: device.clone(), vision: None })?;
    let hp = model.llm().hparams().clone();
    let mut ids = seeded_prompt(o.prompt_len, hp.vocab, 7);
    let pixels = match (&model, o.image, info.image_tokens, info.image_size) {
        (Model::Neva(neva), true, Some(n), Some(side)) => {
            ids.splice(1..1 + n.min(ids.len() - 1), neva.image_tokens().expand(n));
            Some(Tensor::zeros((1, 3, side, side), DType::F32, &device)?)
        }
        (_, true, _, _) => anyhow::bail!("{} is not a vision model; drop --image", path.display()),
        _ => None,
    };
    let t = ids.len();
    let ids = Tensor::from_vec(ids, (1, t), &device)?;
    once(&mut model, &ids, pixels.as_ref(), o.decode.min(2))?; // warm-up
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for _ in 0..o.runs {
        let (p, d) = once(&mut model, &ids, pixels.as_ref(), o.decode)?;
        prefill.push(p);
        decode.push(d);
    }
    let params: usize = hp.layers
        * (hp.hidden * (hp.heads + 2 * hp.groups) * hp.head_dim
            + hp.hidden * hp.heads * hp.head_dim
            + 3 * hp.hidden * hp.ffn
            + 2 * hp.hidden)
        + hp.vocab * hp.hidden * if hp.tied { 1 } else { 2 }
        + hp.hidden;
    let decode_s = median(decode);
    let line = json!({
        "impl": "shardsmith",
        "model": path.display().to_string(),
        "family": info.family,
        "params": params,
        "threads": rayon_threads(),
        "dtype": format!("{:?}", o.dtype).to_lowercase(),
        "tp": info.tp,
        "prompt_len": t,
        "prefill_ms": median(prefill) * 1e3,
        "decode_ms_per_token": decode_s * 1e3,
        "tokens_per_s": 1.0 / decode_s,
    });
    println!("{line}");
    Ok(())
}

/// Threads candle's CPU kernels use (`RAYON_NUM_THREADS`, else the core count).
fn rayon_threads() -> usize {
    candle_core::utils::get_num_threads()
}
