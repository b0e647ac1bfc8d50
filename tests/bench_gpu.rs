//! The GPU benchmark subcommands (`bench gpu-layer | attention | decode | neva-step`, run by
//! bench/gpu.sh at 7B sizes on a GPU) at toy sizes on the CPU: each runs and prints the JSON
//! line the script's table reads, so nothing fails on the device for a trivial reason; and `bench
//! forward`, the CPU forward benchmark.

use serde_json::Value;
use std::process::Command;

const LLAMA: &[&str] =
    &["--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--ffn", "172", "--vocab", "300"];
const COMMON: &[&str] = &["--device", "cpu", "--runs", "1", "--warmup", "1"];

fn bench(args: &[&str]) -> Vec<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_shardsmith")).arg("bench").args(args).output().unwrap();
    assert!(out.status.success(), "bench {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn positive(v: &Value, key: &str) -> f64 {
    let x = v[key].as_f64().unwrap_or_else(|| panic!("no number '{key}' in {v}"));
    assert!(x.is_finite() && x > 0.0, "{key} = {x} in {v}");
    x
}

#[test]
fn gpu_layer_and_attention_run_at_toy_sizes() {
    for dtype in ["f32", "bf16"] {
        for composed in [false, true] {
            let mut args =
                [&["gpu-layer"], LLAMA, COMMON, &["--dtype", dtype, "--batch", "2", "--seq", "16"]].concat();
            if composed {
                args.push("--composed");
            }
            let rows = bench(&args);
            assert_eq!(rows.len(), 1);
            assert_eq!(rows[0]["bench"], "gpu_layer");
            assert_eq!(rows[0]["dtype"], dtype);
            assert_eq!(rows[0]["layer_nodes"], !composed);
            assert_eq!(rows[0]["masters"], dtype);
            positive(&rows[0], "step_ms");
            positive(&rows[0], "tflops");
        }
    }
    // f32 master weights under bf16 compute, as `train` keeps them.
    let rows = bench(
        &[
            &["gpu-layer"],
            LLAMA,
            COMMON,
            &["--dtype", "bf16", "--batch", "2", "--seq", "16", "--f32-masters"],
        ]
        .concat(),
    );
    assert_eq!((&rows[0]["dtype"], &rows[0]["masters"]), (&"bf16".into(), &"f32".into()));
    positive(&rows[0], "step_ms");
    let args = [
        &["attention"],
        COMMON,
        &["--batch", "1", "--heads", "4", "--kv-heads", "2", "--seq", "16", "--head-dim", "16"],
    ]
    .concat();
    let rows = bench(&args);
    for key in ["fwd_ms", "fwd_bwd_ms", "tflops_fwd", "tflops_fwd_bwd"] {
        positive(&rows[0], key);
    }
    // --phases profiles the wgmma kernels: elsewhere a named error before anything is timed.
    let out = Command::new(env!("CARGO_BIN_EXE_shardsmith"))
        .arg("bench")
        .args(&args)
        .arg("--phases")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && out.stdout.is_empty(), "{err}");
    assert!(
        err.contains("--phases profiles the wgmma attention kernels") && err.contains("head dim 16"),
        "{err}"
    );
}

#[test]
fn decode_prints_one_line_per_batch_size() {
    let args =
        [&["decode"], LLAMA, COMMON, &["--batch", "1,3", "--prompt-len", "5", "--steps", "4"]].concat();
    let rows = bench(&args);
    assert_eq!(rows.iter().map(|r| r["batch"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 3]);
    for r in &rows {
        positive(r, "tokens_per_s");
        positive(r, "prefill_ms");
    }
}

#[test]
fn neva_step_trains_the_projector_at_toy_sizes() {
    let vision = [
        "--vision-layers",
        "2",
        "--vision-hidden",
        "32",
        "--vision-heads",
        "2",
        "--vision-intermediate",
        "64",
    ];
    let args = [
        &["neva-step"],
        LLAMA,
        COMMON,
        &vision,
        &["--image-size", "28", "--patch", "14", "--batch", "2", "--seq", "12", "--dtype", "bf16"],
    ]
    .concat();
    for composed in [false, true] {
        let rows = bench(&[&args[..], if composed { &["--composed"] } else { &[] }].concat());
        assert_eq!(rows[0]["stage"], "1");
        assert_eq!(rows[0]["layer_nodes"], !composed);
        positive(&rows[0], "loss");
        for key in ["step_ms", "fwd_bwd_ms", "vision_projector_ms"] {
            positive(&rows[0], key);
        }
    }
}

#[test]
fn too_short_a_sequence_for_the_image_is_an_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_shardsmith"))
        .args(["bench", "neva-step"])
        .args(LLAMA)
        .args(COMMON)
        .args([
            "--vision-layers",
            "1",
            "--vision-hidden",
            "32",
            "--vision-heads",
            "2",
            "--vision-intermediate",
            "64",
        ])
        .args(["--image-size", "28", "--patch", "14", "--seq", "5"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("too short"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `bench forward` (bench/forward.sh's line) on a fixture: a rate when it decoded, and null decode
/// fields, not an infinite rate, for `--decode 0`.
#[test]
fn forward_reports_decode_only_when_it_decoded() {
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/llama-gqa");
    let common = ["forward", model, "--prompt-len", "8", "--runs", "1"];
    let rows = bench(&[&common[..], &["--decode", "3"]].concat());
    positive(&rows[0], "prefill_ms");
    positive(&rows[0], "tokens_per_s");
    let rows = bench(&[&common[..], &["--decode", "0"]].concat());
    positive(&rows[0], "prefill_ms");
    assert!(rows[0]["tokens_per_s"].is_null() && rows[0]["decode_ms_per_token"].is_null(), "{}", rows[0]);
}
