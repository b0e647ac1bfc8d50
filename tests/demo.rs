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

/// `evaluate` checks every record before loading the model: roles out of order, an `<image>`
/// marker without an image, two markers for one image, or an empty file are named errors with
/// the data file and the record; they used to be scored (or give "0/0") with exit status 0.
#[test]
fn evaluate_refuses_records_it_cannot_score() {
    let dir = tempfile::tempdir().unwrap();
    let turn = |from: &str, value: &str| serde_json::json!({"from": from, "value": value});
    let cases = [
        (serde_json::json!([]), "no records to evaluate"),
        (
            serde_json::json!([{"id": "r1", "image": "image.png",
                "conversations": [turn("human", "<image>\na"), turn("human", "b")]}]),
            "record \"r1\" (#0): needs a human question followed by a gpt answer, got human then human",
        ),
        (
            serde_json::json!([{"id": "r2", "conversations": [turn("human", "<image>\nwhat?"), turn("gpt", "x")]}]),
            "record \"r2\" (#0): the question has an <image> marker but the record has no image",
        ),
        (
            serde_json::json!([{"id": "r3", "image": "image.png",
                "conversations": [turn("human", "<image> <image> what?"), turn("gpt", "x")]}]),
            "record \"r3\" (#0): the question has 2 <image> markers for one image",
        ),
        (
            serde_json::json!([{"id": "r4", "conversations": [turn("human", "q"), {"from": "gpt", "value": 7}]}]),
            "record \"r4\" (#0): turn 1: `value` must be a string, got a number",
        ),
    ];
    for (i, (records, want)) in cases.iter().enumerate() {
        let data = dir.path().join(format!("d{i}.json"));
        std::fs::write(&data, records.to_string()).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_shardsmith"))
            .args(["evaluate", fixture("llava-tiny").to_str().unwrap(), "--data", data.to_str().unwrap()])
            .args(["--image-folder", fixture("llava-tiny").to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{records}");
        assert!(err.contains(&format!("d{i}.json: {want}")), "{records}: {err}");
    }
}
