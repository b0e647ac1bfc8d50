//! The end-to-end demo at reduced size (README "Demo"): a tiny NeVA assembled from the fixtures
//! learns the synthetic coloured-shapes set and answers held-out questions with `generate`.
//! The full-size demo (600 steps, 400 images) reaches ~98% exact match; here 120 steps on 120
//! images must at least learn the colours of unseen images.

mod common;

use common::fixture;
use std::process::Command;

fn run(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_shardsmith")).args(args).output().unwrap();
    assert!(out.status.success(), "shardsmith {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_tiny_neva_learns_to_answer_about_unseen_images() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = |rel: &str| d.join(rel).display().to_string();
    run(&["demo-data", "-o", &p("data"), "--train", "120", "--test", "12", "--seed", "3"]);
    run(&[
        "assemble",
        "--llm",
        fixture("llama-mha").to_str().unwrap(),
        "--vision",
        fixture("clip-vision").to_str().unwrap(),
        "--init-seed",
        "1",
        "-o",
        &p("start.nemo"),
    ]);
    let sets = [
        format!("model.checkpoint={}", p("start.nemo")),
        format!("data.data_path={}", p("data/train.json")),
        format!("data.image_folder={}", p("data/images")),
        format!("output.dir={}", p("run")),
        "trainer.max_steps=120".into(),
        "trainer.save_every_n_steps=1000".into(),
    ];
    let mut args =
        vec!["train", "--config", fixture("demo/train.yaml").to_str().unwrap().to_owned().leak(), "--json"];
    for s in &sets {
        args.extend(["--set", s.as_str()]);
    }
    let summary: serde_json::Value = serde_json::from_str(&run(&args)).unwrap();
    let losses: Vec<f64> =
        summary["losses"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert!(losses[losses.len() - 1] < losses[0] / 10.0, "loss did not fall: {losses:?}");
    let score: serde_json::Value = serde_json::from_str(&run(&[
        "evaluate",
        &p("run/checkpoints/step-000120/model.nemo"),
        "--data",
        &p("data/test.json"),
        "--image-folder",
        &p("data/images"),
        "--json",
    ]))
    .unwrap();
    let colour = &score["by_question"]["What color is the shape?"];
    assert!(colour[0].as_u64().unwrap() >= 11, "colours of held-out images: {score}");
    assert!(score["correct"].as_u64().unwrap() >= 18, "held-out exact matches: {score}");
}
