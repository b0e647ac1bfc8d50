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
        let norm = opt.clip_grad_norm(&grads, Some(1.0)).unwrap();
        opt.step(&grads, r.lrs[s]).unwrap();
        assert!(rel(loss, want_loss[s] as f64) < 1e-4, "{key} step {s}: loss {loss} vs {}", want_loss[s]);
        worst_loss = worst_loss.max(rel(loss, want_loss[s] as f64));
        assert!(
            rel(norm, want_norm[s] as f64) < 1e-3,
            "{key} step {s}: grad norm {norm} vs {}",
            want_norm[s]
        );
    }
    // Final parameters: within 1e-4 of each tensor's largest magnitude, plus 2 % of Σ lr.
    // AdamW normalises every element's gradient, so an element whose gradient is at f32
    // rounding level (where summation order decides its sign) moves by about ±lr per step in
    // any correct f32 implementation; Σ lr is the most AdamW can move an element. The step
    // losses above (1e-4, targets.md) are what catch a wrong gradient.
    let slack = 0.02 * r.lrs.iter().sum::<f64>();
    let mut worst = 0f64;
    for (name, v) in model.params() {
        let want = &r.tensors[&format!("final.{key}.{name}")];
        let d = (v.as_tensor() - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        let scale =
            want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap() as f64;
        let d = d.to_scalar::<f32>().unwrap() as f64;
        assert!(d <= 1e-4 * scale + slack, "{key}: {name} differs by {d:e} (largest |value| {scale:e})");
        worst = worst.max(d / scale.max(1e-6));
    }
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

fn shardsmith(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_shardsmith")).args(args).output().unwrap()
}

/// `train` on the train-tiny config, writing under `dir/out`, with `--set` overrides.
fn tiny_run(dir: &std::path::Path, sets: &[&str]) -> std::process::Output {
    let config = fixture("train-tiny/train.yaml");
    let out_dir = format!("output.dir={}", dir.join("out").display());
    let mut args = vec!["train", "--config", config.to_str().unwrap(), "--set", &out_dir];
    for s in sets {
        // Flags pass through as they are; the rest are config overrides.
        if s.starts_with("--") {
            args.push(s);
        } else {
            args.extend(["--set", s]);
        }
    }
    shardsmith(&args)
}

fn losses(metrics: &std::path::Path) -> Vec<(f64, f64)> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["loss"].as_f64().unwrap(), v["grad_norm"].as_f64().unwrap())
        })
        .collect()
}

#[test]
fn resume_continues_with_identical_losses() {
    let dir = tempfile::tempdir().unwrap();
    let config = fixture("train-tiny/train.yaml");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let set = |out: &std::path::Path| {
        vec![
            "--set".to_string(),
            format!("output.dir={}", out.display()),
            "--set".into(),
            "trainer.max_steps=6".into(),
            "--set".into(),
            "trainer.save_every_n_steps=3".into(),
            "--set".into(),
            "mm_cfg.llm.freeze=false".into(), // stage 2: the LLM trains too
            "--set".into(),
            "model.activations_checkpointing=true".into(),
        ]
    };
    let run = |out: &std::path::Path, extra: &[&str]| {
        let mut args = vec!["train".to_string(), "--config".into(), config.display().to_string()];
        args.extend(set(out));
        args.extend(extra.iter().map(|s| s.to_string()));
        let o = shardsmith(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    run(&a, &[]);
    // An interrupted run: only the step-3 checkpoint survived, and the log has a torn line.
    run(&b, &[]);
    std::fs::remove_dir_all(b.join("checkpoints/step-000006")).unwrap();
    let log = b.join("metrics.jsonl");
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::write(
        &log,
        format!("{}{{\"step\":4,\"lo", text.lines().take(3).collect::<Vec<_>>().join("\n") + "\n"),
    )
    .unwrap();
    run(&b, &["--resume"]);
    assert_eq!(losses(&a.join("metrics.jsonl")), losses(&log), "losses after resume differ");
    let (oa, ob) =
        ("checkpoints/step-000006/optimizer.safetensors", "checkpoints/step-000006/optimizer.safetensors");
    assert_eq!(std::fs::read(a.join(oa)).unwrap(), std::fs::read(b.join(ob)).unwrap());
    // Both saved formats hold the same model, which `validate` can run.
    let ck = a.join("checkpoints/step-000006");
    let o = shardsmith(&[
        "validate",
        ck.join("model.nemo").to_str().unwrap(),
        "--against",
        ck.join("hf").to_str().unwrap(),
    ]);
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(a.join("loss.png").is_file());
}

/// A fresh run into an output.dir holding an earlier run is refused (a later `--resume` would
/// take the earlier run's further checkpoint); `--force` removes that run's files first.
#[test]
fn a_fresh_run_does_not_mix_with_an_earlier_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let first = tiny_run(dir.path(), &["trainer.max_steps=4", "trainer.save_every_n_steps=2"]);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let again = tiny_run(dir.path(), &["trainer.max_steps=2"]);
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success(), "a second fresh run was accepted");
    assert!(
        err.contains("output.dir holds an earlier run's checkpoints: pass --resume to continue it, --force"),
        "{err}"
    );
    assert!(out.join("checkpoints/step-000004").is_dir(), "the refused run touched the earlier one");
    let forced = tiny_run(dir.path(), &["trainer.max_steps=2", "--force"]);
    assert!(forced.status.success(), "{}", String::from_utf8_lossy(&forced.stderr));
    let steps: Vec<String> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(steps, ["step-000002"]);
    assert_eq!(losses(&out.join("metrics.jsonl")).len(), 2);
    // --force never removes the checkpoint it trains from.
    let from = format!("model.checkpoint={}", out.join("checkpoints/step-000002/hf").display());
    let own = tiny_run(dir.path(), &["trainer.max_steps=2", &from, "--force"]);
    let err = String::from_utf8_lossy(&own.stderr);
    assert!(!own.status.success() && err.contains("which --force would remove; train from a copy"), "{err}");
    assert!(out.join("checkpoints/step-000002/hf").is_dir());
    // A run that died before its first checkpoint (metrics.jsonl, no step-*) does not block a retry.
    std::fs::remove_dir_all(out.join("checkpoints")).unwrap();
    let retry = tiny_run(dir.path(), &["trainer.max_steps=2"]);
    assert!(retry.status.success(), "{}", String::from_utf8_lossy(&retry.stderr));
}

#[test]
fn lora_run_saves_merged_weights_and_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lora");
    let o = shardsmith(&[
        "train",
        "--config",
        fixture("train-tiny/train.yaml").to_str().unwrap(),
        "--set",
        &format!("output.dir={}", out.display()),
        "--set",
        "trainer.max_steps=3",
        "--set",
        "peft.peft_scheme=lora",
        "--set",
        "output.save_formats=[hf]",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["steps"], 3);
    let ck = out.join("checkpoints/step-000003");
    // The adapters are a PEFT adapter directory: merged into the base LLM by `surgery merge-lora`,
    // they give the trained LLM the checkpoint holds (the trainer's f32 merge, summed in another order).
    let tokenizer_json = |d: &std::path::Path| std::fs::read(d.join("tokenizer.json")).unwrap();
    assert!(tokenizer_json(&ck.join("hf")) == tokenizer_json(&fixture("llava-tiny")), "tokenized as trained");
    let adapter = ck.join("lora_adapter");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(adapter.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((config["peft_type"].as_str(), config["r"].as_u64()), (Some("LORA"), Some(8)));
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let run = |args: &[&str]| {
        let o = shardsmith(args);
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    };
    run(&["surgery", "extract", fixture("llava-tiny").to_str().unwrap(), "--part", "llm", "-o", &p("base")]);
    run(&["surgery", "extract", ck.join("hf").to_str().unwrap(), "--part", "llm", "-o", &p("trained")]);
    run(&["surgery", "merge-lora", &p("base"), "--adapter", adapter.to_str().unwrap(), "-o", &p("merged")]);
    run(&["diff", &p("merged"), &p("trained"), "--atol", "1e-6"]);
    // The merged checkpoint differs from the base only in the LoRA targets and the projector.
    let d = shardsmith(&[
        "diff",
        fixture("llava-tiny").to_str().unwrap(),
        ck.join("hf").to_str().unwrap(),
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_slice(&d.stdout).unwrap();
    let changed: Vec<String> = report["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["status"] != "identical")
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    assert!(!changed.is_empty());
    assert!(
        changed.iter().all(|n| n.starts_with("mm_projector.") || n.contains("_proj.weight")),
        "unexpected changes: {changed:?}"
    );
}

#[test]
fn bad_records_are_skipped_or_rejected_by_flag() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.json");
    let good = std::fs::read_to_string(fixture("train-tiny/data.json")).unwrap();
    let mut records: Vec<serde_json::Value> = serde_json::from_str(&good).unwrap();
    records.push(serde_json::json!({"id": "no-image-file", "image": "missing.png",
        "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]}));
    records.push(serde_json::json!({"id": "no-answer", "conversations": [{"from": "human", "value": "hi"}]}));
    std::fs::write(&data, serde_json::to_string(&records).unwrap()).unwrap();
    let args = |policy: &str| {
        vec![
            "train".to_string(),
            "--config".into(),
            fixture("train-tiny/train.yaml").display().to_string(),
            "--set".into(),
            format!("data.data_path={}", data.display()),
            "--set".into(),
            format!("data.image_folder={}", fixture("train-tiny/images").display()),
            "--set".into(),
            format!("output.dir={}", dir.path().join(policy).display()),
            "--set".into(),
            "trainer.max_steps=3".into(),
            "--set".into(),
            format!("data.on_bad_record={policy}"),
        ]
    };
    let run = |policy: &str| shardsmith(&args(policy).iter().map(String::as_str).collect::<Vec<_>>());
    let rejected = run("error");
    assert!(!rejected.status.success());
    assert!(String::from_utf8_lossy(&rejected.stderr).contains("no-image-file"));
    let skipped = run("skip");
    assert!(skipped.status.success(), "{}", String::from_utf8_lossy(&skipped.stderr));
    assert!(String::from_utf8_lossy(&skipped.stdout).contains("2 bad records skipped"));
}

#[test]
fn bf16_o2_tracks_f32() {
    let dir = tempfile::tempdir().unwrap();
    let run = |precision: &str| {
        let out = dir.path().join(precision);
        let o = shardsmith(&[
            "train",
            "--config",
            fixture("train-tiny/train.yaml").to_str().unwrap(),
            "--set",
            &format!("output.dir={}", out.display()),
            "--set",
            &format!("model.precision={precision}"),
            "--set",
            "mm_cfg.llm.freeze=false",
            "--set",
            "trainer.max_steps=4",
            "--set",
            "output.save_formats=[hf]",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        (losses(&out.join("metrics.jsonl")), out)
    };
    let (f32_losses, _) = run("f32");
    let (bf16_losses, out) = run("bf16");
    for ((a, _), (b, _)) in f32_losses.iter().zip(&bf16_losses) {
        assert!((a - b).abs() / a < 0.02, "bf16 loss {b} vs f32 {a}");
    }
    assert_ne!(f32_losses, bf16_losses, "bf16 compute should round differently");
    // Master weights and optimizer state stay f32.
    let state = candle_core::safetensors::load(
        out.join("checkpoints/step-000004/optimizer.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert!(state.iter().filter(|(k, _)| !k.starts_with("step.")).all(|(_, t)| t.dtype() == DType::F32));
}

/// `trainer.device`: a bad name is a config error, CUDA on a build without it says how to get
/// it; either way nothing is written. (`cpu`, the default, is what every other test runs.)
#[test]
fn the_device_key_is_checked_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let run = |device: &str| tiny_run(dir.path(), &[&format!("trainer.device={device}")]);
    let bad = run("tpu");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("trainer.device: unknown device 'tpu'"));
    if !cfg!(feature = "cuda") {
        let cuda = run("cuda:0");
        assert!(!cuda.status.success());
        assert!(
            String::from_utf8_lossy(&cuda.stderr).contains("built without CUDA"),
            "{}",
            String::from_utf8_lossy(&cuda.stderr)
        );
    }
    assert!(!dir.path().join("out").exists(), "a refused run wrote output");
}

/// An `output.nemo_tp` the model does not split into is refused before the first step, not at
/// the first save after training; nothing is written.
#[test]
fn the_output_tp_is_checked_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = tiny_run(dir.path(), &["output.save_formats=[nemo]", "output.nemo_tp=3"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("train.yaml: output.nemo_tp: attention heads (4) do not divide by tp=3"), "{err}");
    assert!(!dir.path().join("out").exists(), "a refused run wrote output");
}

/// From a NeVA `.nemo` (here one `assemble` built, whose `<extra_id_*>` rows it appended), the
/// saved `hf/` is the llava-hf that `convert model.nemo` writes: one model, however it is saved.
/// A format the model cannot take is refused before the first step, with nothing written.
#[test]
fn every_saved_format_holds_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let run = |args: &[&str]| {
        let o = shardsmith(args);
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    };
    let (mha, clip) = (fixture("llama-mha"), fixture("clip-vision"));
    let assemble = |out: &str, extra: &[&str]| {
        let mut args = vec!["assemble", "--llm", mha.to_str().unwrap(), "--vision", clip.to_str().unwrap()];
        args.extend(["--init-seed", "1", "-o", out]);
        args.extend(extra);
        run(&args);
    };
    assemble(&p("start.nemo"), &[]);
    let from = format!("model.checkpoint={}", p("start.nemo"));
    let o = tiny_run(
        dir.path(),
        &["trainer.max_steps=2", &from, "mm_cfg.llm.freeze=false", "output.save_formats=[nemo, hf]"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ck = dir.path().join("out/checkpoints/step-000002");
    run(&["convert", ck.join("model.nemo").to_str().unwrap(), &p("converted")]);
    run(&["diff", ck.join("hf").to_str().unwrap(), &p("converted")]);

    assemble(&p("linear.nemo"), &["--projector-type", "linear", "--template", "llama_2"]);
    let from = format!("model.checkpoint={}", p("linear.nemo"));
    let out = dir.path().join("linear-run");
    let o = shardsmith(&[
        "train",
        "--config",
        fixture("train-tiny/train.yaml").to_str().unwrap(),
        "--set",
        &format!("output.dir={}", out.display()),
        "--set",
        &from,
        "--set",
        "mm_cfg.mm_mlp_adapter_type=linear",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("output.save_formats: ") && err.contains("mlp2x_gelu"),
        "{err}"
    );
    assert!(!out.exists(), "nothing written");
}
