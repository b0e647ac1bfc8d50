//! `shardsmith synth`: a synthetic HF LLaMA-2 checkpoint with the real tensor shapes of a preset
//! and seeded random bf16 values, so benchmarks need no download.
//!
//! Values are a deterministic function of (seed, tensor name), generated lazily while the
//! safetensors writer streams, so memory stays at one tensor whatever the model size.

use anyhow::{bail, Result};
use shardsmith_converters::atomic::AtomicDir;
use shardsmith_converters::convert::llama::canonical_shapes;
use shardsmith_converters::formats::hf_dir;
use shardsmith_converters::names::llama::LlamaHparams;
use shardsmith_converters::{ByteSource, DType, TensorEntry, TensorMap};
use std::path::Path;
use std::sync::Arc;

/// LLaMA-2 hyper-parameters (formats.md notation table).
#[derive(Clone, Copy, Debug)]
pub struct LlamaShape {
    /// Layers.
    pub layers: usize,
    /// Hidden size.
    pub hidden: usize,
    /// MLP inner size.
    pub ffn: usize,
    /// Attention heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Vocabulary.
    pub vocab: usize,
}

impl LlamaShape {
    /// A named preset.
    pub fn preset(name: &str) -> Result<Self> {
        let (layers, hidden, ffn, heads, kv_heads) = match name {
            "llama2-7b" => (32, 4096, 11008, 32, 32),
            "llama2-13b" => (40, 5120, 13824, 40, 40),
            "llama2-70b" => (80, 8192, 28672, 64, 8),
            other => bail!("unknown preset '{other}' (choose llama2-7b, llama2-13b or llama2-70b)"),
        };
        Ok(LlamaShape { layers, hidden, ffn, heads, kv_heads, vocab: 32000 })
    }

    /// The hyper-parameters these shapes stand for.
    pub fn hparams(&self) -> LlamaHparams {
        LlamaHparams {
            layers: self.layers,
            hidden: self.hidden,
            ffn: self.ffn,
            heads: self.heads,
            groups: self.kv_heads,
            head_dim: self.hidden / self.heads,
            vocab: self.vocab,
            max_positions: 4096,
            rope_theta: 10000.0,
            rope_linear_factor: None,
            norm_eps: 1e-5,
            init_std: 0.02,
            tied: false,
            bos: Some(1),
            eos: Some(2),
        }
    }

    /// HF tensor names and shapes in `save_pretrained` order.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        canonical_shapes(&self.hparams())
    }

    /// The matching HF `config.json`.
    pub fn config_json(&self) -> serde_json::Value {
        self.hparams().hf_config(DType::BF16)
    }
}

/// Seeded bf16 noise of roughly N(0, 0.02²) shape (sum of uniforms), cheap to generate.
fn noise(seed: u64, numel: usize) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(numel * 2);
    for _ in 0..numel {
        // xorshift64*: fast, deterministic, good enough for synthetic weights.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let r = state.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let u = ((r >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.07;
        out.extend_from_slice(&half::bf16::from_f32(u).to_le_bytes());
    }
    out
}

fn seed_for(seed: u64, name: &str) -> u64 {
    // FNV-1a over the name, mixed with the user seed.
    name.bytes().fold(0xcbf2_9ce4_8422_2325 ^ seed, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// The synthetic tensors for `shape`, lazily generated.
pub fn synthetic_tensors(shape: &LlamaShape, seed: u64) -> TensorMap {
    let origin: Arc<Path> = Arc::from(Path::new("<synth>"));
    shape
        .tensors()
        .into_iter()
        .map(|(name, dims)| {
            let numel: usize = dims.iter().product();
            let s = seed_for(seed, &name);
            let source = ByteSource::derived(move || Ok(noise(s, numel)));
            let entry = TensorEntry::new(DType::BF16, dims, source, origin.clone());
            (name, entry)
        })
        .collect()
}

/// A SentencePiece `ModelProto` with `vocab` pieces (`<unk>`, `<s>`, `</s>`, then `▁tok<i>`), so
/// a synthetic checkpoint carries a tokenizer of the right size. Protobuf written by hand: three
/// fields of one repeated message do not justify a protobuf dependency.
pub fn sentencepiece_model(vocab: usize) -> Vec<u8> {
    use shardsmith_converters::formats::protobuf::put_varint as varint;
    let mut out = Vec::new();
    for i in 0..vocab {
        let (piece, kind) = match i {
            0 => ("<unk>".to_string(), 2u64), // UNKNOWN
            1 => ("<s>".to_string(), 3),      // CONTROL
            2 => ("</s>".to_string(), 3),
            _ => (format!("\u{2581}tok{i}"), 1), // NORMAL
        };
        let mut msg = Vec::new();
        msg.push(0x0a); // field 1 (piece), length-delimited
        varint(&mut msg, piece.len() as u64);
        msg.extend_from_slice(piece.as_bytes());
        msg.push(0x15); // field 2 (score), fixed32
        msg.extend_from_slice(&(-(i as f32)).to_le_bytes());
        msg.push(0x18); // field 3 (type), varint
        varint(&mut msg, kind);
        out.push(0x0a); // ModelProto field 1 (pieces)
        varint(&mut out, msg.len() as u64);
        out.extend_from_slice(&msg);
    }
    out
}

/// The command.
pub fn run(preset: &str, layers: Option<usize>, seed: u64, out: &Path, force: bool) -> Result<()> {
    let mut shape = LlamaShape::preset(preset)?;
    if let Some(l) = layers {
        let n = shape.layers;
        if !(1..=n).contains(&l) {
            bail!("--layers {l}: the {preset} preset has {n} layers; keep 1 to {n}");
        }
        shape.layers = l;
    }
    let tensors = synthetic_tensors(&shape, seed);
    let dir = AtomicDir::create(out, force)?;
    std::fs::write(dir.path().join("config.json"), serde_json::to_vec_pretty(&shape.config_json())?)?;
    std::fs::write(dir.path().join("tokenizer.model"), sentencepiece_model(shape.vocab))?;
    let files = hf_dir::write_weights(&tensors, dir.path(), &hf_dir::WriteOptions::default())?;
    dir.commit()?;
    let bytes: usize = tensors.values().map(TensorEntry::nbytes).sum();
    eprintln!(
        "wrote {} ({} files, {:.2} GiB, {} layers)",
        out.display(),
        files.len(),
        bytes as f64 / (1u64 << 30) as f64,
        shape.layers
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_beyond_the_preset_are_refused_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("s");
        for layers in [0, 33, usize::MAX] {
            let err = run("llama2-7b", Some(layers), 0, &out, false).unwrap_err().to_string();
            assert!(
                err.contains(&format!("--layers {layers}: the llama2-7b preset has 32 layers; keep 1 to 32")),
                "{err}"
            );
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
