//! The trainer's numerics against PyTorch (fixtures/gen/make_train_reference.py): the same
//! llava-tiny model, batches, learning rates, AdamW and clipping give the same step losses and
//! the same final parameters, for stage 1 (projector), stage 2 (projector + LLM) and LoRA.

mod common;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use common::fixture;
use shardsmith::train::model::{Batch, LoraSpec, Stage, TrainModel};
use shardsmith::train::optim::{AdamW, AdamWConfig};
use shardsmith_converters::convert::llava::from_llava_hf;
use std::collections::HashMap;

struct Reference {
    tensors: HashMap<String, Tensor>,
    lrs: Vec<f64>,
    steps: usize,
    micro: usize,
}

fn reference() -> Reference {
    let path = fixture("train-ref/golden.safetensors");
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    let lrs: Vec<f64> = serde_json::from_str(&meta["lrs"]).unwrap();
    Reference {
        tensors,
        lrs,
        steps: meta["steps"].parse().unwrap(),
        micro: meta["micro_batches"].parse().unwrap(),
    }
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

fn run(stage: Stage, key: &str) {
    let r = reference();
    let c = from_llava_hf(&shardsmith_converters::formats::open(&fixture("llava-tiny")).unwrap()).unwrap();
    let mut model = TrainModel::from_llava(&c, stage, DType::F32).unwrap();
    for (name, _) in model.params().to_vec() {
        if let Some(init) = r.tensors.get(&format!("lora_A_init.{name}")) {
            model.set_param(&name, init).unwrap();
        }
    }
    let cfg = AdamWConfig { betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.01, no_decay_patterns: vec![] };
    let mut opt = AdamW::new(model.params().to_vec(), cfg).unwrap();
    let want_loss = r.tensors[&format!("loss_{key}")].to_vec1::<f32>().unwrap();
    let want_norm = r.tensors[&format!("gradnorm_{key}")].to_vec1::<f32>().unwrap();
    let mut worst_loss = 0f64;
    for s in 0..r.steps {
        let mut grads = GradStore::default();
        let mut loss = 0.0;
        for m in 0..r.micro {
            let b = Batch {
                ids: r.tensors[&format!("ids_{s}_{m}")].to_dtype(DType::U32).unwrap(),
                labels: r.tensors[&format!("labels_{s}_{m}")].clone(),
                pixel_values: Some(r.tensors[&format!("pixels_{s}_{m}")].clone()),
            };
            let out = model.forward_backward(&b, s % 2 == 1).unwrap(); // checkpointing on odd steps
            loss += out.loss / r.micro as f64;
            model.collect(&mut grads, out.grads).unwrap();
        }
        model.scale_grads(&mut grads, 1.0 / r.micro as f64).unwrap();
        let norm = opt.clip_grad_norm(&mut grads, Some(1.0)).unwrap();
        opt.step(&grads, r.lrs[s]).unwrap();
        assert!(rel(loss, want_loss[s] as f64) < 1e-4, "{key} step {s}: loss {loss} vs {}", want_loss[s]);
        worst_loss = worst_loss.max(rel(loss, want_loss[s] as f64));
        assert!(
            rel(norm, want_norm[s] as f64) < 1e-3,
            "{key} step {s}: grad norm {norm} vs {}",
            want_norm[s]
        );
    }
    let mut worst = 0f64;
    for (name, v) in model.params() {
        let want = &r.tensors[&format!("final.{key}.{name}")];
        let d = (v.as_tensor() - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        let scale =
            want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap() as f64;
        worst = worst.max(d.to_scalar::<f32>().unwrap() as f64 / scale.max(1e-6));
    }
    assert!(worst < 1e-4, "{key}: final parameters differ by {worst:e} relative");
    eprintln!("{key}: worst step-loss difference {worst_loss:.2e} relative, final parameters {worst:.2e}");
}

#[test]
fn stage1_projector_only_matches_pytorch() {
    run(Stage::Projector, "stage1");
}

#[test]
fn stage2_projector_and_llm_match_pytorch() {
    run(Stage::ProjectorAndLlm, "stage2");
}

#[test]
fn lora_matches_pytorch() {
    let spec = LoraSpec { rank: 2, alpha: 4.0, targets: vec!["q_proj".into(), "v_proj".into()], seed: 0 };
    run(Stage::Lora(spec), "lora");
}
