//! `shardsmith convert / reshard / plan / diff` on the fixtures: bit-exact round trips through
//! every NeMo layout and TP/PP, refusals before any write, and the plan.

mod common;

use common::{copy_fixture, edit_config, fixture, ok, refused, s, shardsmith};
use shardsmith::commands::synth::{synthetic_tensors, LlamaShape};
use shardsmith_converters::formats::{self, hf_dir};
use shardsmith_converters::{Checkpoint, Flavour, Meta, ModelConfig, Parallelism};
use std::path::Path;
use std::process::Command;

/// HF → .nemo (tp, pp, layout) → HF must give back every tensor bit for bit.
fn round_trip(src: &Path, work: &Path, tp: usize, pp: usize, layout: &str) {
    let tag = format!("{}-{tp}-{pp}-{layout}", src.file_name().unwrap().to_string_lossy());
    let nemo = work.join(format!("{tag}.nemo"));
    let back = work.join(format!("{tag}-hf"));
    ok(&["convert", s(src), s(&nemo), "--tp", &tp.to_string(), "--pp", &pp.to_string(), "--layout", layout]);
    let c = formats::open(&nemo).unwrap();
    assert_eq!(c.meta.parallel, Parallelism { tp, pp }, "{tag}");
    assert_eq!(c.shards.len(), tp * pp, "{tag}");
    ok(&["convert", s(&nemo), s(&back)]);
    let report = ok(&["diff", s(src), s(&back)]);
    assert!(report.contains("MATCH") && report.contains("0 differ in value"), "{tag}: {report}");
}

#[test]
fn fixtures_round_trip_bit_exactly_through_every_layout() {
    let work = tempfile::tempdir().unwrap();
    for (tp, pp, layout) in
        [(1, 1, "mcore"), (2, 2, "mcore"), (4, 2, "mcore"), (4, 1, "legacy"), (2, 2, "legacy")]
    {
        round_trip(&fixture("llama-mha"), work.path(), tp, pp, layout);
    }
    for (tp, pp) in [(1, 1), (2, 1), (2, 3), (1, 3)] {
        round_trip(&fixture("llama-gqa"), work.path(), tp, pp, "mcore");
    }
    // The exported safetensors file is the very file transformers wrote: same order, same header.
    let back = work.path().join("llama-mha-2-2-mcore-hf");
    assert!(
        std::fs::read(back.join("model.safetensors")).unwrap()
            == std::fs::read(fixture("llama-mha/model.safetensors")).unwrap()
    );
    // And the tokenizer made the trip: the SentencePiece model, the fast tokenizer (which the
    // .nemo keeps for this) and the settings that change how text is split.
    let gqa_back = work.path().join("llama-gqa-2-3-mcore-hf");
    for (back, model) in [(&back, "llama-mha"), (&gqa_back, "llama-gqa")] {
        for file in ["tokenizer.model", "tokenizer.json"] {
            let source = fixture(model).join(file);
            assert_eq!(std::fs::read(back.join(file)).ok(), std::fs::read(&source).ok(), "{model}: {file}");
        }
        let config = |dir: &Path| {
            serde_json::from_slice::<serde_json::Value>(
                &std::fs::read(dir.join("tokenizer_config.json")).unwrap(),
            )
            .unwrap()
        };
        let (ours, theirs) = (config(back), config(&fixture(model)));
        for key in
            ["legacy", "add_bos_token", "add_eos_token", "clean_up_tokenization_spaces", "padding_side"]
        {
            assert_eq!(ours[key], theirs[key], "{model}: tokenizer_config.json {key}");
        }
    }
}

/// Write a synthetic HF LLaMA checkpoint of `shape` to `out` (with `tokenizer` when given).
fn synthetic_hf(shape: &LlamaShape, seed: u64, out: &Path, tokenizer: Option<&Path>, max_shard_bytes: u64) {
    let artifacts = tokenizer
        .map(|t| shardsmith_converters::Artifact {
            name: "tokenizer.model".into(),
            source: shardsmith_converters::ByteSource::owned(std::fs::read(t).unwrap()),
        })
        .into_iter()
        .collect();
    let meta = Meta {
        path: out.to_path_buf(),
        flavour: Flavour::HfSafetensorsDir { sharded: false },
        parallel: Parallelism::default(),
        config: Some(ModelConfig::HfJson(shape.config_json())),
        artifacts,
    };
    let opts = hf_dir::WriteOptions { max_shard_bytes, ..Default::default() };
    hf_dir::write(&Checkpoint::single(meta, synthetic_tensors(shape, seed)), out, &opts).unwrap();
}

/// A GQA model big enough for TP-8: 16 heads in 8 groups, 4 layers, vocab 333 (padded per TP).
fn tp8_model(dir: &Path) -> std::path::PathBuf {
    let shape = LlamaShape { layers: 4, hidden: 64, ffn: 96, heads: 16, kv_heads: 8, vocab: 333 };
    let out = dir.join("tp8-src");
    synthetic_hf(&shape, 7, &out, Some(&fixture("llama-gqa/tokenizer.model")), 100_000);
    out
}

#[test]
fn tp8_pp2_reshards_back_to_tp1_bit_exactly() {
    let work = tempfile::tempdir().unwrap();
    let src = tp8_model(work.path());
    let nemo8 = work.path().join("tp8pp2.nemo");
    ok(&["convert", s(&src), s(&nemo8), "--tp", "8", "--pp", "2"]);
    let c8 = formats::open(&nemo8).unwrap();
    // Vocabulary 333 with make_vocab_size_divisible_by 1 pads to 336 at tp 8: 42 rows per rank.
    let emb = &c8.shards[0].tensors["model.embedding.word_embeddings.weight"];
    assert_eq!(emb.shape, [42, 64]);
    let nemo1 = work.path().join("tp1.nemo");
    ok(&["reshard", s(&nemo8), "-o", s(&nemo1), "--tp", "1", "--pp", "1"]);
    let c1 = formats::open(&nemo1).unwrap();
    assert_eq!(c1.meta.parallel, Parallelism { tp: 1, pp: 1 });
    let Some(ModelConfig::NemoYaml(cfg)) = &c1.meta.config else { panic!() };
    assert_eq!(cfg.get_usize("tensor_model_parallel_size"), Some(1));
    assert_eq!(cfg.get_usize("num_query_groups"), Some(8), "other keys survive the reshard");
    assert!(ok(&["diff", s(&nemo8), s(&nemo1)]).contains("MATCH"));
    let back = work.path().join("back");
    ok(&["convert", s(&nemo1), s(&back)]);
    assert!(ok(&["diff", s(&src), s(&back)]).contains("MATCH"));
    // Legacy MHA at TP-8 as well (8 heads = 8 groups).
    let mha = LlamaShape { layers: 2, hidden: 64, ffn: 64, heads: 8, kv_heads: 8, vocab: 256 };
    let mha_dir = work.path().join("mha");
    synthetic_hf(&mha, 3, &mha_dir, None, 5 << 30);
    let legacy = work.path().join("legacy8.nemo");
    let tok = work.path().join("tokenizer-256.model");
    std::fs::write(&tok, shardsmith::commands::synth::sentencepiece_model(256)).unwrap();
    ok(&[
        "convert",
        s(&mha_dir),
        s(&legacy),
        "--tp",
        "8",
        "--pp",
        "2",
        "--layout",
        "legacy",
        "--tokenizer",
        s(&tok),
    ]);
    let back = work.path().join("legacy-back");
    ok(&["convert", s(&legacy), s(&back), "--vocab-size", "256"]);
    assert!(ok(&["diff", s(&mha_dir), s(&back)]).contains("MATCH"));
    // Fewer rows than the tokenizer has pieces would leave ids without an embedding row.
    let err = refused(&["convert", s(&legacy), s(&work.path().join("short")), "--vocab-size", "200"]);
    assert!(err.contains("--vocab-size 200 is below the tokenizer's 256 pieces"), "{err}");
}

#[test]
fn impossible_layouts_are_refused_before_anything_is_written() {
    let work = tempfile::tempdir().unwrap();
    let dst = work.path().join("out.nemo");
    let gqa = fixture("llama-gqa");
    for (args, want) in [
        (vec!["--tp", "4"], "query groups (2) do not divide by tp=4"),
        (vec!["--pp", "2"], "layers (3) do not divide by pp=2"),
        (vec!["--layout", "legacy"], "no grouped-query attention"),
    ] {
        let mut full = vec!["convert", s(&gqa), s(&dst)];
        full.extend(args);
        let (success, _, err) = shardsmith(&full);
        assert!(!success && err.contains(want), "{full:?}: {err}");
        assert!(err.contains("llama-gqa"), "the error names the source: {err}");
    }
    assert_eq!(std::fs::read_dir(work.path()).unwrap().count(), 0, "nothing written");
}

#[test]
fn dry_run_prints_the_plan_and_writes_nothing() {
    let work = tempfile::tempdir().unwrap();
    let dst = work.path().join("plan.nemo");
    let out = ok(&["convert", s(&fixture("llama-gqa")), s(&dst), "--tp", "2", "--dry-run"]);
    assert!(out.contains("plan: write"), "{out}");
    assert!(out.contains("vocab: 333 tokenizer rows, padded to 334"), "{out}");
    assert!(out.contains(" 1.0   model.decoder.layers.2.mlp.linear_fc1.weight"), "{out}");
    assert!(!dst.exists());
    let plan = ok(&["plan", s(&fixture("llama-gqa")), s(&dst), "--tp", "2", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&plan).unwrap();
    assert_eq!(v["plan"]["tp"], 2);
    assert_eq!(v["plan"]["architecture"]["padded_vocab"], 334);
    assert_eq!(v["destination_exists"], false);
    assert!(!dst.exists());
    // A destination already there: the plan says what the conversion would do about it.
    std::fs::write(&dst, b"old").unwrap();
    let out = ok(&["plan", s(&fixture("llama-gqa")), s(&dst)]);
    assert!(out.contains("(it exists: the real run would refuse without --force)"), "{out}");
    let out = ok(&["plan", s(&fixture("llama-gqa")), s(&dst), "--force"]);
    assert!(out.contains("(it exists: --force replaces it)"), "{out}");
    let plan = ok(&["plan", s(&fixture("llama-gqa")), s(&dst), "--json"]);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&plan).unwrap()["destination_exists"], true);
    assert_eq!(std::fs::read(&dst).unwrap(), b"old");
    // Two outputs (a llava-hf tower written beside the .nemo): one JSON document, an array.
    let neva = work.path().join("neva.nemo");
    let plan = ok(&["plan", s(&fixture("llava-tiny")), s(&neva), "--template", "vicuna_v1", "--json"]);
    let plans: Vec<serde_json::Value> = serde_json::from_str(&plan).unwrap();
    let dests: Vec<_> = plans.iter().map(|p| p["destination"].as_str().unwrap().to_string()).collect();
    assert_eq!(dests, [s(&work.path().join("neva-clip")), s(&neva)]);
    assert!(!neva.exists());
}

#[test]
fn diff_reports_what_differs_and_exits_nonzero() {
    let work = tempfile::tempdir().unwrap();
    // Same weights in bf16: values differ, names and shapes agree.
    let bf16 = work.path().join("bf16");
    ok(&["convert", s(&fixture("llama-mha")), s(&bf16), "--dtype", "bf16"]);
    let (same, out, _) = shardsmith(&["diff", s(&fixture("llama-mha")), s(&bf16)]);
    assert!(!same && out.contains("differs: max abs") && out.contains("(f32 vs bf16)"), "{out}");
    let (same, _, _) = shardsmith(&["diff", s(&fixture("llama-mha")), s(&bf16), "--atol", "0.05"]);
    assert!(same, "bf16 rounding is within 0.05 on these weights (|w| < 4)");
    // A renamed tensor: reported on both sides, with a suggestion.
    let original = fixture("llama-mha/model.safetensors");
    let mut tensors = shardsmith_converters::formats::safetensors::read_file(&original).unwrap();
    let head = tensors.shift_remove("lm_head.weight").unwrap();
    tensors.insert("lm_head.weights".into(), head);
    let renamed = work.path().join("renamed.safetensors");
    shardsmith_converters::formats::safetensors::write_file(&tensors, &renamed, false).unwrap();
    let (same, out, _) = shardsmith(&["diff", s(&original), s(&renamed), "--json"]);
    assert!(!same);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["matches"], false);
    let row =
        |name: &str| v["tensors"].as_array().unwrap().iter().find(|t| t["name"] == name).unwrap().clone();
    assert_eq!(row("lm_head.weight")["status"], "missing_in_b");
    assert_eq!(row("lm_head.weight")["did_you_mean"], "lm_head.weights");
    assert_eq!(row("lm_head.weights")["status"], "missing_in_a");
    assert_eq!(row("model.norm.weight")["status"], "identical");
    // A NaN weight differs from any number by +inf, so no tolerance may be infinite.
    let mut tensors = shardsmith_converters::formats::safetensors::read_file(&original).unwrap();
    let norm = &tensors["model.norm.weight"];
    let mut bytes = norm.bytes("model.norm.weight").unwrap().to_vec();
    bytes[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    let nan = shardsmith_converters::TensorEntry::new(
        norm.dtype,
        norm.shape.clone(),
        shardsmith_converters::ByteSource::owned(bytes),
        std::sync::Arc::from(std::path::Path::new("nan")),
    );
    tensors.insert("model.norm.weight".into(), nan);
    let with_nan = work.path().join("nan.safetensors");
    shardsmith_converters::formats::safetensors::write_file(&tensors, &with_nan, false).unwrap();
    let (same, out, _) = shardsmith(&["diff", s(&original), s(&with_nan), "--atol", "1e30"]);
    assert!(!same && out.contains("max abs inf"), "{out}");
    for atol in ["inf", "NaN", "-1"] {
        let err = refused(&["diff", s(&original), s(&with_nan), &format!("--atol={atol}")]);
        assert!(err.contains(&format!("'{atol}' is not a finite tolerance >= 0")), "{err}");
    }
}

#[test]
fn a_killed_conversion_leaves_nothing_that_looks_complete_and_a_rerun_succeeds() {
    let work = tempfile::tempdir().unwrap();
    // ~100 MB of weights: long enough to be caught mid-write.
    let shape = LlamaShape { layers: 2, hidden: 1024, ffn: 4096, heads: 8, kv_heads: 8, vocab: 8000 };
    let src = work.path().join("src");
    synthetic_hf(&shape, 1, &src, None, 5 << 30);
    let out_dir = work.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let dst = out_dir.join("m.nemo");
    let tok = work.path().join("tokenizer.model");
    std::fs::write(&tok, shardsmith::commands::synth::sentencepiece_model(shape.vocab)).unwrap();
    let args = ["convert", s(&src), s(&dst), "--tp", "2", "--tokenizer", s(&tok)];
    let mut child = Command::new(env!("CARGO_BIN_EXE_shardsmith")).args(args).spawn().unwrap();
    // Kill it as soon as its temporary output exists.
    let started = std::time::Instant::now();
    while std::fs::read_dir(&out_dir).unwrap().count() == 0 && started.elapsed().as_secs() < 20 {
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "the conversion was meant to be killed mid-write");
    assert!(!dst.exists(), "a killed run must not leave the destination");
    for e in std::fs::read_dir(&out_dir).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        assert!(name.starts_with(".m.nemo.tmp-"), "only a hidden temporary may remain, found {name}");
    }
    ok(&args);
    assert!(ok(&["diff", s(&src), s(&dst)]).contains("MATCH"));
}

/// A tokenizer that is not a SentencePiece model — given with `--tokenizer` or sitting in the
/// source directory — is refused under its own name before anything is written (it used to be
/// copied into the .nemo, or blamed on the LLM's own tokenizer).
#[test]
fn a_broken_tokenizer_is_refused_by_name() {
    let work = tempfile::tempdir().unwrap();
    let not_sp = fixture("llama-mha/config.json");
    let out = work.path().join("a.nemo");
    let err = refused(&["convert", s(&fixture("llama-mha")), s(&out), "--tokenizer", s(&not_sp)]);
    assert!(err.contains("llama-mha/config.json: malformed sentencepiece model"), "{err}");
    let err = refused(&[
        "assemble",
        "--llm",
        s(&fixture("llama-mha")),
        "--vision",
        s(&fixture("clip-vision")),
        "--init-seed",
        "1",
        "--tokenizer",
        s(&not_sp),
        "-o",
        s(&out),
    ]);
    assert!(err.contains("llama-mha/config.json: malformed sentencepiece model"), "{err}");

    let src = copy_fixture("llama-mha", &work.path().join("src"));
    std::fs::write(src.join("tokenizer.model"), b"").unwrap();
    let err = refused(&["convert", s(&src), s(&out)]);
    assert!(err.contains("src/tokenizer.model: malformed sentencepiece model"), "{err}");
    assert_eq!(std::fs::read_dir(work.path()).unwrap().count(), 1, "nothing written beside src");
}

/// Integer tensors where LLaMA has weights are refused by name (they converted and ran).
#[test]
fn integer_weights_are_refused_by_name() {
    let work = tempfile::tempdir().unwrap();
    let src = copy_fixture("llama-mha", &work.path().join("src"));
    let file = src.join("model.safetensors");
    let mut tensors = shardsmith_converters::formats::safetensors::read_file(&file).unwrap();
    let head = tensors["lm_head.weight"].clone();
    assert_eq!(head.dtype, shardsmith_converters::DType::F32);
    let bytes = head.bytes("lm_head.weight").unwrap().into_owned();
    let as_int = shardsmith_converters::TensorEntry::new(
        shardsmith_converters::DType::I32,
        head.shape.clone(),
        shardsmith_converters::ByteSource::owned(bytes),
        std::sync::Arc::from(file.as_path()),
    );
    tensors.insert("lm_head.weight".into(), as_int);
    let staged = work.path().join("m.safetensors");
    shardsmith_converters::formats::safetensors::write_file(&tensors, &staged, false).unwrap();
    std::fs::rename(&staged, &file).unwrap();
    let err = refused(&["convert", s(&src), s(&work.path().join("o.nemo"))]);
    assert!(err.contains("tensor 'lm_head.weight': expected floating-point weights, got"), "{err}");
}

/// llava-hf config values the model cannot run are refused by `convert` as they are by
/// `generate`, instead of being written into a .nemo that fails later.
#[test]
fn llava_hf_configs_that_cannot_run_are_refused() {
    let work = tempfile::tempdir().unwrap();
    // (case, config edit, what the refusal says)
    type Case = (&'static str, fn(&mut serde_json::Value), &'static str);
    let cases: [Case; 6] = [
        ("token", |v| v["image_token_index"] = 99999.into(), "image_token_index 99999 is past the"),
        (
            "negative",
            |v| v["image_token_index"] = (-1).into(),
            "image_token_index must be a token id, got -1",
        ),
        (
            "notext",
            |v| drop(v.as_object_mut().unwrap().remove("text_config")),
            "model_type 'llava' but has neither llava-hf's text_config nor original LLaVA's mm_* keys",
        ),
        (
            "layer",
            |v| v["vision_feature_layer"] = (-99).into(),
            "vision_feature_layer -99 is out of range for a tower with",
        ),
        ("act", |v| v["vision_config"]["hidden_act"] = "nope".into(), "hidden_act \"nope\" is not supported"),
        (
            "heads",
            |v| v["vision_config"]["num_attention_heads"] = 5.into(),
            "is not a multiple of num_attention_heads 5",
        ),
    ];
    for (name, edit, want) in cases {
        let src = copy_fixture("llava-tiny", &work.path().join(name));
        edit_config(&src, edit);
        let out = work.path().join(format!("{name}.nemo"));
        let err = refused(&["convert", s(&src), s(&out), "--template", "vicuna_v1"]);
        assert!(err.contains(&format!("{name}: ")) && err.contains(want), "{name}: {err}");
        assert!(!out.exists());
    }
}

/// A .nemo whose config names a tokenizer model the archive does not hold: `generate` and the
/// conversion to HF both say which name is missing (the conversion used to drop the tokenizer).
#[test]
fn a_dangling_tokenizer_reference_is_named() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("m");
    ok(&["convert", s(&fixture("llama-mha")), s(&dir), "--to", "nemo", "--extracted"]);
    let yaml_path = dir.join("model_config.yaml");
    let yaml = std::fs::read_to_string(&yaml_path).unwrap();
    let line =
        yaml.lines().find(|l| l.trim_start().starts_with("model: nemo:")).expect("tokenizer line").to_owned();
    std::fs::write(&yaml_path, yaml.replace(&line, "  model: nemo:nonexistent.model")).unwrap();
    let want = "missing the tokenizer model 'nemo:nonexistent.model' that model_config.yaml names";
    let err = refused(&["convert", s(&dir), s(&work.path().join("hf"))]);
    assert!(err.contains(want), "{err}");
    let err = refused(&["generate", s(&dir), "--prompt", "hi"]);
    assert!(err.contains(want) && err.contains("pass --tokenizer PATH"), "{err}");
    let out = work.path().join("x");
    let err = refused(&["surgery", "resize-vocab", s(&dir), "-o", s(&out), "--add-tokens", "<a>"]);
    assert!(err.contains(want), "{err}");
    let (clip, out) = (fixture("clip-vision"), work.path().join("x.nemo"));
    let err =
        refused(&["assemble", "--llm", s(&dir), "--vision", s(&clip), "--init-seed", "1", "-o", s(&out)]);
    assert!(err.contains(want), "{err}");
    // Supplying it converts, and the HF directory gets that tokenizer.
    let hf = work.path().join("hf");
    let tok = fixture("llama-mha/tokenizer.model");
    ok(&["convert", s(&dir), s(&hf), "--tokenizer", s(&tok)]);
    assert_eq!(std::fs::read(hf.join("tokenizer.model")).unwrap(), std::fs::read(&tok).unwrap());
    assert!(ok(&["diff", s(&fixture("llama-mha")), s(&hf)]).contains("MATCH"));
}

/// The feature layer is checked by every bundle writer, whatever the source: an original LLaVA
/// whose mm_vision_select_layer is outside its tower is refused, not written into a .nemo.
#[test]
fn every_bundle_writer_checks_the_feature_layer() {
    let work = tempfile::tempdir().unwrap();
    let src = copy_fixture("llava-orig-tiny", &work.path().join("orig"));
    edit_config(&src, |v| v["mm_vision_select_layer"] = (-99).into());
    let tower = fixture("llava-tiny-clip");
    for dst in ["o.nemo", "hf"] {
        let out = work.path().join(dst);
        let err = refused(&["convert", s(&src), s(&out), "--vision", s(&tower), "--template", "v1"]);
        assert!(err.contains("vision feature layer -99 is out of range for a tower with"), "{dst}: {err}");
        assert!(!out.exists());
    }
}

/// Flags a command cannot honour are refused, not ignored or allocated: `reshard --to hf` (it
/// wrote a .nemo anyway), a `bench forward` sequence of billions of positions (it aborted), and
/// `.nemo`-only or export-only flags on a conversion to an HF directory (it dropped them).
#[test]
fn flags_a_command_cannot_honour_are_refused() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("o");
    let err = refused(&["reshard", s(&fixture("llama-mha")), "--out", s(&out), "--to", "hf"]);
    assert!(
        err.contains("reshard writes a .nemo; to write an HF directory use `shardsmith convert"),
        "{err}"
    );
    assert!(!out.exists());
    let err =
        refused(&["bench", "forward", s(&fixture("llama-mha")), "--prompt-len", "4000000000", "--runs", "1"]);
    assert!(err.contains("--prompt-len 4000000000 + --decode"), "{err}");
    // Flags that shape only another container (it wrote the HF copy without them).
    let dst = work.path().join("hf");
    let (tok, mha) = (fixture("llama-gqa/tokenizer.model"), fixture("llama-mha"));
    for (args, want) in [
        (vec!["--tp", "2"], "--tp does not apply when writing an HF directory"),
        (vec!["--gzip", "--pp", "2"], "--pp, --gzip do not apply"),
        (vec!["--vocab-size", "256", "--tokenizer", s(&tok)], "--vocab-size, --tokenizer do not apply"),
    ] {
        let mut full = vec!["convert", s(&mha), s(&dst)];
        full.extend(args);
        let (success, _, err) = shardsmith(&full);
        assert!(!success && err.contains(want), "{full:?}: {err}");
    }
    // From a .nemo, the export options apply; the NeMo-only ones are still refused.
    let nemo = work.path().join("m.nemo");
    ok(&["convert", s(&mha), s(&nemo)]);
    let (success, _, err) = shardsmith(&["convert", s(&nemo), s(&dst), "--layout", "legacy"]);
    assert!(!success && err.contains("--layout does not apply"), "{err}");
    assert!(!dst.exists());
    ok(&["convert", s(&nemo), s(&dst), "--vocab-size", "256"]);
    // Into a .nemo, whose vocabulary follows its tokenizer.
    let into = work.path().join("n.nemo");
    for (src, args, want) in [
        (&mha, vec!["--vocab-size", "300"], "--vocab-size does not apply when writing a .nemo"),
        (&nemo, vec!["--tokenizer", s(&tok)], "--tokenizer does not apply when writing a .nemo"),
    ] {
        let mut full = vec!["convert", s(src), s(&into)];
        full.extend(args);
        let (success, _, err) = shardsmith(&full);
        assert!(!success && err.contains(want), "{full:?}: {err}");
    }
}

/// Tokens an HF tokenizer added after its SentencePiece pieces (here by `resize-vocab`) become
/// user-defined pieces of the `.nemo`'s tokenizer.model — NeMo reads nothing else — so they keep
/// their ids there and their rows on the way back.
#[test]
fn hf_added_tokens_survive_the_nemo_round_trip() {
    let work = tempfile::tempdir().unwrap();
    let p = |name: &str| work.path().join(name);
    ok(&[
        "surgery",
        "resize-vocab",
        s(&fixture("llama-gqa")),
        "--add-tokens",
        "<a>,<b>",
        "-o",
        s(&p("added")),
    ]);
    ok(&["convert", s(&p("added")), s(&p("m.nemo"))]);
    ok(&["convert", s(&p("m.nemo")), s(&p("back"))]);
    ok(&["diff", s(&p("added")), s(&p("back"))]);
    // The fast tokenizer lists them as added tokens; the .nemo kept it and it describes the
    // pieces they became, so it is written back as it was.
    assert_eq!(
        std::fs::read(p("back/tokenizer.json")).unwrap(),
        std::fs::read(p("added/tokenizer.json")).unwrap()
    );
    let ids = |ckpt: &Path| {
        let out = ok(&[
            "generate",
            s(ckpt),
            "--prompt",
            "x <a> y <b>",
            "--flavour",
            "llava",
            "--max-new-tokens",
            "1",
            "--json",
        ]);
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["prompt_ids"].clone()
    };
    let nemo_ids = ids(&p("m.nemo"));
    assert!(
        nemo_ids.as_array().unwrap().iter().any(|i| i == 333)
            && nemo_ids.as_array().unwrap().contains(&334.into()),
        "{nemo_ids}"
    );
    // The directory written back tokenizes as the one converted from (its fast tokenizer puts a
    // "▁" after a special token, which NeMo's SentencePiece tokenizer does not).
    assert_eq!(ids(&p("back")), ids(&p("added")));
    // Into a NeVA too (assemble, swap-llm): NeVA's <extra_id_*> come after them, not over them.
    ok(&["assemble", "--llm", s(&p("added")), "--vision", s(&fixture("clip-vision")), "--init-seed", "1"]
        .into_iter()
        .chain(["-o", s(&p("neva.nemo"))])
        .collect::<Vec<_>>());
    ok(&["surgery", "swap-llm", s(&p("neva.nemo")), "--llm", s(&p("added")), "-o", s(&p("swapped.nemo"))]);
    for neva in ["neva.nemo", "swapped.nemo"] {
        let llm = p(&format!("{neva}-llm"));
        ok(&["surgery", "extract", s(&p(neva)), "--part", "llm", "-o", s(&llm)]);
        assert_eq!(ids(&llm), nemo_ids, "{neva}");
    }
    // Another model's larger tokenizer would index rows the embedding does not have.
    let big = fixture("llama-gqa/tokenizer.model");
    for (src, dst, extra) in [
        (fixture("llama-mha"), p("mt.nemo"), &[][..]),
        (fixture("llava-tiny"), p("lt.nemo"), &["--template", "vicuna_v1"][..]),
    ] {
        let mut args = vec!["convert", s(&src), s(&dst), "--tokenizer", s(&big)];
        args.extend(extra);
        let (success, _, err) = shardsmith(&args);
        assert!(!success && err.contains("333 pieces, but the model's embedding has"), "{err}");
        assert!(!dst.exists());
    }
    // Added ids with a gap cannot be pieces.
    let gap = p("gap");
    std::fs::create_dir(&gap).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.model"] {
        std::fs::copy(fixture("llama-mha").join(f), gap.join(f)).unwrap();
    }
    std::fs::write(gap.join("added_tokens.json"), r#"{"<a>": 256, "<c>": 258}"#).unwrap();
    let (success, _, err) = shardsmith(&["convert", s(&gap), s(&p("gap.nemo"))]);
    assert!(!success && err.contains("added token '<c>' has id 258 but would be piece 257"), "{err}");
    assert!(!p("gap.nemo").exists());
}

/// `--force` replaces a destination, but never one that is or holds a checkpoint being read:
/// the source and anything beside it stay.
#[test]
fn force_never_replaces_a_source() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("P");
    std::fs::create_dir(&dir).unwrap();
    ok(&["convert", s(&fixture("llama-mha")), s(&dir.join("src.nemo"))]);
    std::fs::write(dir.join("notes.txt"), b"mine").unwrap();
    for dst in [dir.clone(), dir.join("src.nemo")] {
        let (success, _, err) =
            shardsmith(&["convert", s(&dir.join("src.nemo")), s(&dst), "--force", "--to", "hf"]);
        assert!(!success && err.contains("which this run reads"), "{err}");
    }
    assert_eq!(std::fs::read(dir.join("notes.txt")).unwrap(), b"mine");
    ok(&["inspect", s(&dir.join("src.nemo"))]);
}

/// An HF directory without tokenizer_config.json has transformers' defaults (`legacy: true`):
/// the directory converted back through a .nemo says so, rather than our own default.
#[test]
fn a_missing_tokenizer_config_comes_back_as_transformers_defaults() {
    let work = tempfile::tempdir().unwrap();
    let p = |name: &str| work.path().join(name);
    std::fs::create_dir(p("bare")).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.model"] {
        std::fs::copy(fixture("llama-mha").join(f), p("bare").join(f)).unwrap();
    }
    let legacy = |dir: &Path| {
        let text = std::fs::read(dir.join("tokenizer_config.json")).unwrap();
        serde_json::from_slice::<serde_json::Value>(&text).unwrap()["legacy"].clone()
    };
    ok(&["convert", s(&p("bare")), s(&p("bare.nemo"))]);
    ok(&["convert", s(&p("bare.nemo")), s(&p("bare-hf"))]);
    assert_eq!(legacy(&p("bare-hf")), true);
}
