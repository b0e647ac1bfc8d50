//! The candle core against transformers' golden outputs: LLaMA (MHA and GQA) from HF and from
//! `.nemo` in every layout and TP/PP, run at simulated TP 1/2/4; f32 and bf16 tiers; greedy
//! decoding token for token; `validate --against`; and the CLI's exit status.

mod common;

use candle_core::{DType, Device, Tensor};
use common::fixture;
use shardsmith::models::{self, LoadOptions};
use shardsmith::validate::{self, Report};
use std::path::Path;
use std::process::Command;

fn validate_golden(ckpt: &Path, golden: &str, tp: Option<usize>, dtype: DType) -> Report {
    let (mut model, info) = models::load(ckpt, &LoadOptions { tp, dtype, device: Device::Cpu, vision: None })
        .unwrap_or_else(|e| panic!("loading {}: {e}", ckpt.display()));
    let report = validate::against_golden(&mut model, &info, &fixture(golden)).unwrap();
    assert!(report.passed, "{}", validate::render(&report));
    report
}

fn convert(src: &Path, dst: &Path, extra: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_shardsmith"))
        .arg("convert")
        .arg(src)
        .arg(dst)
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "convert failed: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn hf_llama_matches_transformers_at_every_tp() {
    for (name, tps) in [("llama-mha", &[1usize, 2, 4][..]), ("llama-gqa", &[1, 2][..])] {
        for &tp in tps {
            let r = validate_golden(&fixture(name), name, Some(tp), DType::F32);
            assert_eq!(r.tp, tp);
            for c in &r.cases {
                assert!(c.logits.rel_to_max <= 1e-5, "{name} tp={tp}: {}", c.logits.rel_to_max);
                assert_eq!(c.greedy_match, Some(true), "{name} tp={tp} {}", c.name);
                assert_eq!(c.first_divergent_layer, None);
            }
        }
    }
}

#[test]
fn pytorch_bin_checkpoint_matches_too() {
    validate_golden(&fixture("llama-gqa-bin"), "llama-gqa", None, DType::F32);
}

#[test]
fn nemo_checkpoints_run_at_their_own_parallelism() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &[&str], usize)] = &[
        ("llama-mha", &["--tp", "2", "--pp", "2"], 2),
        ("llama-mha", &["--tp", "4", "--layout", "legacy"], 4),
        ("llama-gqa", &["--tp", "2", "--pp", "3"], 2),
        ("llama-gqa", &["--dtype", "bf16"], 1),
    ];
    for (i, (name, args, tp)) in cases.iter().enumerate() {
        let nemo = dir.path().join(format!("{i}.nemo"));
        convert(&fixture(name), &nemo, args);
        let dtype = if args.contains(&"bf16") { DType::BF16 } else { DType::F32 };
        let r = validate_golden(&nemo, name, None, dtype);
        assert_eq!(r.tp, *tp, "{name} {args:?}");
    }
    // NeMo's distributed checkpoints (zarr and torch_dist), at a simulated TP the file never had.
    for f in ["llama-mha-zarr.nemo", "llama-mha-torch_dist.nemo"] {
        validate_golden(&fixture(&format!("nemo-dist/{f}")), "llama-mha", Some(2), DType::F32);
    }
}

#[test]
fn bf16_agrees_on_every_top1() {
    for name in ["llama-mha", "llama-gqa"] {
        let r = validate_golden(&fixture(name), name, Some(2), DType::BF16);
        assert!(r.cases.iter().all(|c| c.logits.top1_agreement == 1.0));
    }
}

#[test]
fn resharded_checkpoint_agrees_with_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let nemo = dir.path().join("gqa.nemo");
    convert(&fixture("llama-gqa"), &nemo, &["--tp", "2"]);
    let o = |tp| LoadOptions { tp, dtype: DType::F32, device: Device::Cpu, vision: None };
    let (mut a, ia) = models::load(&nemo, &o(None)).unwrap();
    let (mut b, ib) = models::load(&fixture("llama-gqa"), &o(Some(1))).unwrap();
    let r = validate::against_model((&mut a, &ia), (&mut b, &ib)).unwrap();
    assert!(r.passed, "{}", validate::render(&r));
    assert_eq!((r.tp, r.cases.len()), (2, 2));
}

#[test]
fn cli_validate_reports_and_sets_the_exit_status() {
    let bin = env!("CARGO_BIN_EXE_shardsmith");
    let ok = Command::new(bin)
        .args(["validate", "--json", "--tp", "2", "--reference"])
        .arg(fixture("llama-mha"))
        .arg(fixture("llama-mha"))
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let report: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(report["passed"], true);
    assert_eq!(report["tp"], 2);
    // The wrong model's golden: a clear failure, exit status 1, not a crash.
    let bad = Command::new(bin)
        .args(["validate", "--reference"])
        .arg(fixture("llama-mha"))
        .arg(fixture("llama-gqa"))
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1), "{}", String::from_utf8_lossy(&bad.stderr));
    assert!(!bad.stderr.is_empty() || String::from_utf8_lossy(&bad.stdout).contains("FAIL"));
    // A TP the model cannot divide into: a named refusal.
    let tp3 = Command::new(bin)
        .args(["validate", "--tp", "3", "--reference"])
        .arg(fixture("llama-mha"))
        .arg(fixture("llama-mha"))
        .output()
        .unwrap();
    assert!(!tp3.status.success());
    let err = String::from_utf8_lossy(&tp3.stderr);
    assert!(err.contains("tp=3"), "{err}");
}

#[test]
fn llava_hf_image_and_text_paths_match_transformers() {
    for tp in [1, 2] {
        let r = validate_golden(&fixture("llava-tiny"), "llava-tiny", Some(tp), DType::F32);
        assert_eq!(r.family, "llava");
        assert_eq!(r.cases.iter().filter(|c| c.image).count(), 2, "two image prompts");
        assert!(r.cases.iter().all(|c| c.greedy_match == Some(true)));
        let features = r.image_features.as_ref().expect("image features compared");
        assert!(features.rel_to_max <= 1e-5, "{}", features.rel_to_max);
    }
    let r = validate_golden(&fixture("llava-tiny"), "llava-tiny", Some(2), DType::BF16);
    assert!(r.cases.iter().all(|c| c.logits.top1_agreement == 1.0));
}

#[test]
fn clip_vision_tower_matches_transformers() {
    let ckpt = shardsmith_converters::formats::open(&fixture("clip-vision")).unwrap();
    assert!(validate::is_clip(&ckpt));
    for dtype in [DType::F32, DType::BF16] {
        let r = validate::clip_against_golden(&ckpt, &fixture("clip-vision"), dtype).unwrap();
        assert!(r.passed, "{}", validate::render(&r));
        assert_eq!(r.cases.len(), 2);
    }
}

#[test]
fn a_text_model_refuses_an_image() {
    let (mut model, _) = models::load(
        &fixture("llama-mha"),
        &LoadOptions { tp: None, dtype: DType::F32, device: Device::Cpu, vision: None },
    )
    .unwrap();
    let ids = candle_core::Tensor::new(&[[1u32, 5, 6]], &Device::Cpu).unwrap();
    let pixels = candle_core::Tensor::zeros((1, 3, 32, 32), DType::F32, &Device::Cpu).unwrap();
    let err = model.forward(&ids, Some(&pixels), true, false).unwrap_err();
    assert!(err.to_string().contains("text-only"), "{err}");
}

#[test]
fn image_count_must_match_the_prompt() {
    let (mut model, info) = models::load(
        &fixture("llava-tiny"),
        &LoadOptions { tp: None, dtype: DType::F32, device: Device::Cpu, vision: None },
    )
    .unwrap();
    let n = info.image_tokens.unwrap();
    let side = info.image_size.unwrap();
    let pixels = candle_core::Tensor::zeros((1, 3, side, side), DType::F32, &Device::Cpu).unwrap();
    // No image tokens in the prompt, but an image given.
    let ids = candle_core::Tensor::new(&[[1u32, 5, 6]], &Device::Cpu).unwrap();
    let err = model.forward(&ids, Some(&pixels), true, false).unwrap_err();
    assert!(err.to_string().contains("image span"), "{err}");
    // Too few image tokens.
    let mut short = vec![1u32];
    short.extend(std::iter::repeat_n(256, n - 1));
    let ids = candle_core::Tensor::new(short.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let err = model.forward(&ids, Some(&pixels), true, false).unwrap_err();
    assert!(err.to_string().contains("image tokens"), "{err}");
}

#[test]
fn neva_converted_from_llava_hf_matches_transformers_at_tp_1_and_2() {
    let dir = tempfile::tempdir().unwrap();
    for (i, args) in [&["--tp", "1"][..], &["--tp", "2", "--vision", "bundle"][..]].into_iter().enumerate() {
        let nemo = dir.path().join(format!("neva{i}.nemo"));
        let mut all = vec!["--template", "vicuna_v1"];
        all.extend_from_slice(args);
        convert(&fixture("llava-tiny"), &nemo, &all);
        // The golden prompts spell the image with llava-hf's id; the NeVA file records it, so
        // validate respells them with NeVA's <extra_id_4/3/5> span.
        let r = validate_golden(&nemo, "llava-tiny", None, DType::F32);
        assert_eq!(r.family, "neva");
        assert_eq!(r.cases.iter().filter(|c| c.image).count(), 2);
        assert!(r.image_features.as_ref().is_some_and(|f| f.rel_to_max <= 1e-5));
    }
}

/// A golden file whose prompt is not integer ids [B, T] in range, or that is cut short: a named
/// refusal (file, key, what was expected), never a conversion that reads other tokens.
#[test]
fn a_malformed_reference_is_named() {
    let golden = fixture("llama-mha/golden/golden.safetensors");
    let tensors = candle_core::safetensors::load(&golden, &Device::Cpu).unwrap();
    let key = tensors.keys().find(|k| k.starts_with("input_ids_")).unwrap().clone();
    let ids = tensors[&key].clone();
    let dir = tempfile::tempdir().unwrap();
    let refusal = |reference: &Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_shardsmith"))
            .args(["validate", "--reference"])
            .arg(reference)
            .arg(fixture("llama-mha"))
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let run = |edit: Tensor, name: &str| {
        let mut t = tensors.clone();
        t.insert(key.clone(), edit);
        let path = dir.path().join(name);
        candle_core::safetensors::save(&t, &path).unwrap();
        refusal(&path)
    };
    let as_f64 = run(ids.to_dtype(DType::F64).unwrap(), "f64.safetensors");
    assert!(
        as_f64.contains(&format!("f64.safetensors: reference '{key}': expected integer token ids, got F64")),
        "{as_f64}"
    );
    let flat = run(ids.flatten_all().unwrap(), "flat.safetensors");
    assert!(flat.contains("expected ids [batch, tokens] with both at least 1, got ["), "{flat}");
    let huge = Tensor::new(&[[1i64 << 40]], &Device::Cpu).unwrap();
    let huge = run(huge, "huge.safetensors");
    assert!(huge.contains("token id 1099511627776 is not a vocabulary index"), "{huge}");

    let cut = dir.path().join("cut.safetensors");
    let bytes = std::fs::read(&golden).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
    let err = refusal(&cut);
    assert!(
        err.contains("cut.safetensors: malformed safetensors") && err.contains("truncated by 10 bytes"),
        "{err}"
    );
}
