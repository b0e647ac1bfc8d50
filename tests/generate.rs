//! `shardsmith generate` token for token against transformers' `generate` (greedy), from the
//! chat templates with the tokenizer, an image through the CLIP preprocessing, and from a `.nemo`.

mod common;

use common::fixture;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn generate(ckpt: &Path, args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_shardsmith"))
        .arg("generate")
        .arg(ckpt)
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(out.status.success(), "generate {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn golden(model: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(fixture(&format!("{model}/golden/generate.json"))).unwrap();
    serde_json::from_str::<Value>(&text).unwrap()["cases"].as_array().unwrap().clone()
}

/// `generate` on one of llava-tiny's golden image cases (its question, image, aspect, template
/// and length), with `extra` flags.
fn generate_image_case(ckpt: &Path, case: &Value, extra: &[&str]) -> Value {
    let image = fixture("llava-tiny").join(case["image"].as_str().unwrap());
    let max = case["max_new_tokens"].to_string();
    let mut args = extra.to_vec();
    args.extend([
        "--prompt",
        case["question"].as_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--aspect",
        case["image_aspect_ratio"].as_str().unwrap(),
        "--template",
        case["template"].as_str().unwrap(),
        "--max-new-tokens",
        &max,
    ]);
    generate(ckpt, &args)
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

fn check(case: &Value, got: &Value) {
    assert_eq!(ids(&got["prompt_ids"]), ids(&case["input_ids"]), "prompt ids for {:?}", case["question"]);
    assert_eq!(ids(&got["new_ids"]), ids(&case["new_ids"]), "new ids for {:?}", case["question"]);
    if let Some(text) = case["new_text"].as_str() {
        assert_eq!(got["text"].as_str().unwrap(), text);
    }
}

#[test]
fn llava_with_an_image_matches_transformers() {
    for case in golden("llava-tiny") {
        check(&case, &generate_image_case(&fixture("llava-tiny"), &case, &[]));
    }
}

/// A llava-hf directory written from llava-hf (here `convert`, a copy in another dtype in
/// practice) keeps its `tokenizer.json` — transformers' fast tokenizer follows that file, not
/// the SentencePiece model — so it still generates transformers' golden tokens.
#[test]
fn a_converted_llava_hf_keeps_its_tokenizer_and_answers() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("copy");
    let o = Command::new(env!("CARGO_BIN_EXE_shardsmith"))
        .arg("convert")
        .arg(fixture("llava-tiny"))
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let json = |d: &Path| std::fs::read(d.join("tokenizer.json")).unwrap();
    assert!(json(&out) == json(&fixture("llava-tiny")));
    for case in golden("llava-tiny") {
        check(&case, &generate_image_case(&out, &case, &[]));
    }
}

#[test]
fn llama_chat_template_matches_transformers_at_tp_1_and_4() {
    for case in golden("llama-mha") {
        let max = case["max_new_tokens"].to_string();
        for tp in ["1", "4"] {
            let got = generate(
                &fixture("llama-mha"),
                &[
                    "--prompt",
                    case["question"].as_str().unwrap(),
                    "--template",
                    case["template"].as_str().unwrap(),
                    "--system",
                    case["system"].as_str().unwrap(),
                    "--max-new-tokens",
                    &max,
                    "--tp",
                    tp,
                ],
            );
            check(&case, &got);
        }
    }
}

#[test]
fn a_nemo_checkpoint_generates_what_its_hf_source_does() {
    let dir = tempfile::tempdir().unwrap();
    let nemo = dir.path().join("mha.nemo");
    let out = Command::new(env!("CARGO_BIN_EXE_shardsmith"))
        .args(["convert", "--tp", "2"])
        .arg(fixture("llama-gqa"))
        .arg(&nemo)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The .nemo carries only tokenizer.model; the HF directory's tokenizer.json must agree.
    let args = ["--prompt", "The quick brown fox", "--flavour", "llava", "--max-new-tokens", "6"];
    let hf = generate(&fixture("llama-gqa"), &args);
    let from_nemo = generate(&nemo, &args);
    assert_eq!(hf["prompt_ids"], from_nemo["prompt_ids"]);
    assert_eq!(hf["new_ids"], from_nemo["new_ids"]);
    assert_eq!(hf["text"], from_nemo["text"]);
}

#[test]
fn sampling_is_reproducible_by_seed() {
    let run = |seed: &str| {
        generate(
            &fixture("llama-mha"),
            &[
                "--prompt",
                "Hello world",
                "--temperature",
                "1.5",
                "--top-p",
                "0.95",
                "--seed",
                seed,
                "--max-new-tokens",
                "12",
            ],
        )["new_ids"]
            .clone()
    };
    assert_eq!(run("7"), run("7"));
    assert!((1..6).any(|s| run(&s.to_string()) != run("7")), "different seeds should sample differently");
}

#[test]
fn an_image_for_a_text_model_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_shardsmith"))
        .arg("generate")
        .arg(fixture("llama-mha"))
        .args(["--prompt", "hi", "--image"])
        .arg(fixture("llava-tiny/image.png"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("text-only"));
}

/// `--vision` supplies a tower to a checkpoint that only names one; where no checkpoint takes it
/// (a llava-hf directory bundles its tower, a LLaMA has none) it is refused by name rather than
/// silently unused, in `generate` and in `validate` (either side of `--against`).
#[test]
fn a_vision_tower_nothing_takes_is_refused() {
    use common::{refused, s};
    let tower = fixture("llava-tiny-clip");
    for ckpt in ["llava-tiny", "llama-mha"] {
        let err = refused(&["generate", s(&fixture(ckpt)), "--prompt", "hi", "--vision", s(&tower)]);
        assert!(
            err.contains(&format!("--vision {}", tower.display()))
                && err.contains(&format!("{} takes no vision tower", fixture(ckpt).display())),
            "{err}"
        );
    }
    let err = refused(&[
        "validate",
        s(&fixture("llava-tiny")),
        "--against",
        s(&fixture("llava-tiny")),
        "--vision",
        s(&tower),
    ]);
    assert!(err.contains("takes no vision tower") && err.contains(" nor "), "{err}");
    // A CLIP tower validated against its golden outputs takes none either.
    let err = refused(&[
        "validate",
        s(&fixture("clip-vision")),
        "--reference",
        s(&fixture("clip-vision")),
        "--vision",
        s(&tower),
    ]);
    assert!(err.contains("takes no vision tower"), "{err}");
}

/// `--device cpu` is the default path; an unknown device (and CUDA in a build without it) is a
/// clear error rather than a silent CPU run.
#[test]
fn the_device_flag_is_honoured_or_refused() {
    let base = generate(&fixture("llama-mha"), &["--prompt", "Hello world", "--max-new-tokens", "6"]);
    let cpu = generate(
        &fixture("llama-mha"),
        &["--prompt", "Hello world", "--max-new-tokens", "6", "--device", "cpu"],
    );
    assert_eq!(base["new_ids"], cpu["new_ids"]);
    let refused = |device: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_shardsmith"))
            .arg("generate")
            .arg(fixture("llama-mha"))
            .args(["--prompt", "hi", "--device", device])
            .output()
            .unwrap();
        assert!(!out.status.success(), "--device {device} should fail");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    assert!(refused("tpu").contains("unknown device 'tpu'"));
    #[cfg(not(feature = "cuda"))]
    assert!(refused("cuda").contains("--features cuda"));
}

/// An original LLaVA directory (liuhaotian layout: `<image>` is the placeholder −200, no token)
/// runs as itself: with its tower given by `--vision`, it generates what transformers generated
/// from the same weights as llava-hf (llava-tiny's golden cases; llava-orig-tiny is llava-tiny
/// without the <image>/<pad> rows), its prompt holding the placeholder where llava-hf has N
/// image tokens. Without a tower (none cached under the name it gives) it says which flag gives one.
#[test]
fn original_llava_generates_what_llava_hf_does() {
    let tower = fixture("llava-tiny-clip");
    for case in golden("llava-tiny") {
        let got =
            generate_image_case(&fixture("llava-orig-tiny"), &case, &["--vision", tower.to_str().unwrap()]);
        // LLaVA's IMAGE_TOKEN_INDEX.
        let placeholder = -200;
        let signed =
            |v: &Value| -> Vec<i64> { v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect() };
        let want: Vec<i64> = signed(&case["input_ids"])
            .into_iter()
            .map(|id| if id == 256 { placeholder } else { id })
            .collect();
        assert!(want.contains(&placeholder), "the case has an image");
        assert_eq!(signed(&got["prompt_ids"]), want, "prompt ids for {:?}", case["question"]);
        assert_eq!(ids(&got["new_ids"]), ids(&case["new_ids"]), "new ids for {:?}", case["question"]);
    }
    let empty_cache = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_shardsmith"))
        .args(["generate", fixture("llava-orig-tiny").to_str().unwrap(), "--prompt", "hi"])
        .env("HF_HUB_CACHE", empty_cache.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(
            "llava-orig-tiny: the vision tower mm_vision_tower names, 'shardsmith-fixtures/llava-tiny-clip'"
        ) && err.contains("pass --vision CLIP_DIR"),
        "{err}"
    );
    // And `validate --against` its llava-hf twin, each spelling the image its own way: the same
    // logits on the shared columns.
    let out = Command::new(env!("CARGO_BIN_EXE_shardsmith"))
        .args(["validate", fixture("llava-orig-tiny").to_str().unwrap(), "--vision", tower.to_str().unwrap()])
        .args(["--against", fixture("llava-tiny").to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["passed"], true, "{report}");
    assert!(report["cases"].as_array().unwrap().iter().all(|c| c["image"] == true), "{report}");
    // And `validate --reference` llava-tiny's golden file, whose prompts spell the image with
    // llava-hf's id: respelled as placeholders.
    let out = Command::new(env!("CARGO_BIN_EXE_shardsmith"))
        .args(["validate", fixture("llava-orig-tiny").to_str().unwrap(), "--vision", tower.to_str().unwrap()])
        .args(["--reference", fixture("llava-tiny").to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("result: PASS"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Embedding rows past the tokenizer's ids (here a smaller tokenizer than the LLM's embedding)
/// stand for no text and are never generated, as NeMo's generation masks them.
#[test]
fn rows_past_the_tokenizer_are_never_generated() {
    let work = tempfile::tempdir().unwrap();
    let (nemo, hf) = (work.path().join("a.nemo"), work.path().join("hf"));
    common::ok(&[
        "assemble",
        "--llm",
        fixture("llama-gqa").to_str().unwrap(),
        "--tokenizer",
        fixture("llama-mha/tokenizer.model").to_str().unwrap(),
        "--vision",
        fixture("clip-vision").to_str().unwrap(),
        "--init-seed",
        "1",
        "-o",
        nemo.to_str().unwrap(),
    ]);
    common::ok(&["convert", nemo.to_str().unwrap(), hf.to_str().unwrap()]);
    // llama-mha's 256 pieces, <image> and <pad>; llama-gqa's embedding has 333 rows.
    for ckpt in [&nemo, &hf] {
        let got = generate(ckpt, &["--prompt", "hi", "--max-new-tokens", "12"]);
        let new = got["new_ids"].as_array().unwrap();
        assert_eq!(new.len(), 12, "{got}");
        assert!(new.iter().all(|id| id.as_u64().unwrap() < 264), "{got}");
    }
}
