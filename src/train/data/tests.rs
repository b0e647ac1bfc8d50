//! Tests across the data pipeline: masking goldens from the reference preprocessors, bad-record
//! policy, image stores, deterministic order, resume and prefetching.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use super::*;
use crate::infer::template::{Flavour, ImageSpan, ImageTokens, Template};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn tokenizer(rel: &str) -> Tokenizer {
    Tokenizer::from_file(fixtures().join(rel)).unwrap()
}

fn neva_tokenizer() -> Tokenizer {
    let mut tok = tokenizer("llama-gqa/tokenizer.model");
    let extra: Vec<String> = (0..8).map(|i| format!("<extra_id_{i}>")).collect();
    tok.add_special_tokens(&extra.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    tok
}

fn records_by_id(rel: &str) -> Vec<Record> {
    read_records(&fixtures().join("train-tiny").join(rel)).unwrap().into_iter().map(|r| r.unwrap()).collect()
}

fn ids_of(v: &Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

/// A placeholder id that cannot collide with the tiny vocabularies (LLaVA's −200 has no u32).
const PLACEHOLDER_ID: u32 = 1_000_000;

#[test]
fn masking_matches_the_reference_preprocessors() {
    let text = std::fs::read_to_string(fixtures().join("train-tiny/golden/masking.json")).unwrap();
    let golden: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(golden["ignore_index"], IGNORE_INDEX);
    let cases = golden["cases"].as_array().unwrap();
    assert!(cases.len() >= 50, "{}", cases.len());
    let (mut compared, mut mismatches) = (0, 0);
    for case in cases {
        let what = format!(
            "{} {} {} {}",
            case["flavour"],
            case["template"],
            case["tokenizer"],
            case["record"].as_str().unwrap()
        );
        let records = records_by_id(case["records"].as_str().unwrap());
        let record = records.iter().find(|r| r.id == case["record"].as_str().unwrap()).unwrap();
        let nemo = case["flavour"] == "nemo";
        let tok = if nemo { neva_tokenizer() } else { tokenizer(case["tokenizer"].as_str().unwrap()) };
        let cfg = ExampleConfig {
            template: Template::parse(case["template"].as_str().unwrap()).unwrap(),
            flavour: if nemo { Flavour::Nemo } else { Flavour::Llava },
            image_tokens: if nemo {
                ImageTokens::Neva {
                    n: case["neva_image_tokens"].as_u64().unwrap() as usize,
                    use_im_start_end: false,
                }
            } else {
                ImageTokens::Llava { placeholder_id: PLACEHOLDER_ID, n: 1 }
            },
            max_len: 100_000,
            legacy_tokenizer: case["legacy"].as_bool().unwrap_or(false),
        };
        cfg.validate(&tok).unwrap();
        let got = build_example(&tok, &cfg, record);
        if let Some(m) = case["mismatch"].as_array() {
            let (computed, actual) = (m[0].as_u64().unwrap() as usize, m[1].as_u64().unwrap() as usize);
            assert_eq!(got, Err(BadReason::LengthMismatch { computed, actual }), "{what}");
            mismatches += 1;
            continue;
        }
        let ex = got.unwrap_or_else(|e| panic!("{what}: {e}"));
        let want_ids: Vec<i64> = ids_of(&case["ids"])
            .into_iter()
            .map(|i| if i == -200 { PLACEHOLDER_ID as i64 } else { i })
            .collect();
        let got_ids: Vec<i64> = ex.ids.iter().map(|&i| i as i64).collect();
        assert_eq!(got_ids, want_ids, "{what}: ids\n{}", case["text"]);
        assert_eq!(ex.labels, ids_of(&case["labels"]), "{what}: labels");
        assert_eq!(ex.image_spans.len(), usize::from(record.image.is_some()), "{what}");
        compared += 1;
    }
    assert!(compared >= 50 && mismatches >= 3, "{compared} compared, {mismatches} mismatches");
}

#[test]
fn llava_hf_expands_each_image_into_n_masked_tokens() {
    let tok = tokenizer("llava-tiny/tokenizer.json");
    let record = &records_by_id("data.json")[0];
    let cfg = |image_tokens| ExampleConfig {
        template: Template::VicunaV1,
        flavour: Flavour::Llava,
        image_tokens,
        max_len: 4096,
        legacy_tokenizer: false,
    };
    let one = build_example(&tok, &cfg(ImageTokens::Llava { placeholder_id: 256, n: 1 }), record).unwrap();
    let hf = build_example(&tok, &cfg(ImageTokens::LlavaHf { image_token_id: 256, n: 16 }), record).unwrap();
    let at = one.ids.iter().position(|&i| i == 256).unwrap();
    assert_eq!(hf.image_spans, vec![ImageSpan { start: at, len: 16 }]);
    assert_eq!(hf.ids.len(), one.ids.len() + 15);
    assert_eq!(&hf.ids[..at], &one.ids[..at]);
    assert!(hf.ids[at..at + 16].iter().all(|&i| i == 256));
    assert!(hf.labels[at..at + 16].iter().all(|&l| l == IGNORE_INDEX));
    assert_eq!(&hf.ids[at + 16..], &one.ids[at + 1..]);
    assert_eq!(&hf.labels[at + 16..], &one.labels[at + 1..]);
    assert_eq!(hf.labels[0], IGNORE_INDEX); // BOS
}

fn record(id: &str, image: Option<&str>, turns: &[(&str, &str)]) -> Value {
    let mut r = serde_json::json!({
        "id": id,
        "conversations": turns.iter().map(|(f, v)| serde_json::json!({"from": f, "value": v})).collect::<Vec<_>>(),
    });
    if let Some(image) = image {
        r["image"] = Value::String(image.into());
    }
    r
}

fn good(id: &str, image: Option<&str>) -> Value {
    let q = if image.is_some() { "<image>\nWhat is the model?" } else { "What is the model?" };
    record(id, image, &[("human", q), ("gpt", "The model renames the checkpoint.")])
}

/// A temp dir with `data.json` (the given records) and the two fixture images.
fn data_dir(records: &[Value]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("images")).unwrap();
    for name in ["wide.png", "tall.png"] {
        std::fs::copy(fixtures().join("train-tiny/images").join(name), dir.path().join("images").join(name))
            .unwrap();
    }
    std::fs::write(dir.path().join("images/broken.png"), b"\x89PNG\r\n\x1a\nthis is not a png").unwrap();
    std::fs::write(dir.path().join("data.json"), serde_json::to_string_pretty(records).unwrap()).unwrap();
    dir
}

fn config(data_path: PathBuf, image_folder: Option<PathBuf>, on_bad_record: OnBadRecord) -> DatasetConfig {
    DatasetConfig {
        data_path,
        image_folder,
        example: ExampleConfig {
            template: Template::VicunaV1,
            flavour: Flavour::Llava,
            image_tokens: ImageTokens::LlavaHf { image_token_id: 256, n: 16 },
            max_len: 256,
            legacy_tokenizer: false,
        },
        preprocess: PreprocessConfig::from_dir(fixtures().join("llava-tiny")).unwrap(),
        aspect: AspectMode::Pad,
        on_bad_record,
        check_images: true,
    }
}

fn open(dir: &Path, on_bad_record: OnBadRecord) -> Result<Dataset> {
    let cfg = config(dir.join("data.json"), Some(dir.join("images")), on_bad_record);
    Dataset::open(cfg, tokenizer("llava-tiny/tokenizer.json"))
}

fn bad_records() -> Vec<Value> {
    vec![
        good("ok-image", Some("wide.png")),
        good("missing", Some("nope.png")),
        good("broken", Some("broken.png")),
        record("no-answer", None, &[("human", "What is the model?")]),
        record("not-alternating", None, &[("human", "q"), ("human", "q"), ("gpt", "a")]),
        record("no-marker", Some("tall.png"), &[("human", "What is the model?"), ("gpt", "The model.")]),
        record("two-markers", Some("tall.png"), &[("human", "<image> and <image>"), ("gpt", "The model.")]),
        record("marker-no-image", None, &[("human", "<image>\nq"), ("gpt", "The model.")]),
        record("marker-in-answer", Some("tall.png"), &[("human", "<image>q"), ("gpt", "<image>")]),
        serde_json::json!({"id": "wrong-types", "conversations": [{"from": "human", "value": ["q"]}]}),
        serde_json::json!({"id": "two-images", "image": ["wide.png", "tall.png"], "conversations": []}),
        good("ok-text", None),
    ]
}

#[test]
fn bad_records_are_reported_with_their_ids_when_skipping() {
    let dir = data_dir(&bad_records());
    let ds = open(dir.path(), OnBadRecord::Skip).unwrap();
    let report = ds.report();
    assert_eq!((report.records, report.usable, ds.len()), (12, 3, 3));
    let bad: Vec<(&str, String)> = report.bad.iter().map(|b| (b.id.as_str(), b.reason.to_string())).collect();
    let expect = [
        ("missing", "does not exist"),
        ("broken", "cannot be read"),
        ("no-answer", "no assistant (gpt) turn"),
        ("not-alternating", "turn 1 breaks the human/gpt alternation"),
        ("two-markers", "2 <image> markers"),
        ("marker-no-image", "no image"),
        ("marker-in-answer", "<image> in an assistant turn"),
        ("wrong-types", "`value` must be a string"),
        ("two-images", "2 images"),
    ];
    assert_eq!(bad.len(), expect.len(), "{bad:#?}");
    for ((id, reason), (want_id, want)) in bad.iter().zip(expect) {
        assert_eq!(*id, want_id);
        assert!(reason.contains(want), "{id}: {reason}");
    }
    let usable: Vec<&str> = (0..ds.len()).map(|i| ds.record(i).id.as_str()).collect();
    assert_eq!(usable, ["ok-image", "no-marker", "ok-text"]);
    // The missing marker was inserted at the front of the first human turn, and remarked.
    assert_eq!(
        report.remarks,
        vec![RecordRemark { index: 5, id: "no-marker".into(), remark: Remark::ImageMarkerInserted }]
    );
    let ex = ds.example(1).unwrap();
    assert_eq!(ex.image_spans.len(), 1);
    assert!(serde_json::to_string(report).unwrap().contains("\"kind\":\"missing_image\""));
}

#[test]
fn bad_records_stop_the_run_naming_the_record() {
    let dir = data_dir(&bad_records());
    let err = open(dir.path(), OnBadRecord::Error).unwrap_err().to_string();
    assert!(err.contains("record \"missing\" (#1)") && err.contains("nope.png"), "{err}");
    assert!(err.contains("data.json"), "{err}");
    // A file that is not JSON at all names line and column whatever the policy.
    std::fs::write(dir.path().join("data.json"), "[\n  {\"id\": \"a\",,}\n]").unwrap();
    let err = open(dir.path(), OnBadRecord::Skip).unwrap_err().to_string();
    assert!(err.contains("line 2 column"), "{err}");
}

#[test]
fn unreadable_images_found_while_loading_follow_the_policy() {
    let records = vec![good("a", Some("wide.png")), good("broken", Some("broken.png")), good("b", None)];
    let dir = data_dir(&records);
    for workers in [0, 2] {
        let mut cfg =
            config(dir.path().join("data.json"), Some(dir.path().join("images")), OnBadRecord::Skip);
        cfg.check_images = false; // headers not checked: the failure surfaces in the loader
        let ds = Arc::new(Dataset::open(cfg.clone(), tokenizer("llava-tiny/tokenizer.json")).unwrap());
        assert_eq!(ds.len(), 3);
        let opts = LoaderOptions { shuffle: false, workers, ..LoaderOptions::new(1) };
        let mut loader = DataLoader::new(Arc::clone(&ds), opts.clone()).unwrap();
        let batch = loader.next_batch(2).unwrap();
        assert_eq!(batch.record_ids, ["a", "b"]);
        let skipped = loader.take_skipped();
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].to_string().contains("record \"broken\""), "{}", skipped[0]);
        assert_eq!(loader.state().position, 0); // 3 positions consumed = one epoch

        cfg.on_bad_record = OnBadRecord::Error;
        let ds = Arc::new(Dataset::open(cfg, tokenizer("llava-tiny/tokenizer.json")).unwrap());
        let mut loader = DataLoader::new(ds, opts).unwrap();
        let err = loader.next_batch(2).unwrap_err().to_string();
        assert!(err.contains("record \"broken\" (#1)") && err.contains("broken.png"), "{err}");
    }
}

fn train_tiny_with(opts: LoaderOptions) -> DataLoader {
    let dir = fixtures().join("train-tiny");
    let cfg = config(dir.join("data.json"), Some(dir.join("images")), OnBadRecord::Error);
    let ds = Arc::new(Dataset::open(cfg, tokenizer("llava-tiny/tokenizer.json")).unwrap());
    DataLoader::new(ds, opts).unwrap()
}

fn train_tiny(workers: usize, seed: u64) -> DataLoader {
    train_tiny_with(LoaderOptions { workers, prefetch_batches: 1, pad_id: 257, ..LoaderOptions::new(seed) })
}

/// Everything a batch holds, as plain values.
#[derive(Debug, PartialEq)]
struct Flat {
    ids: Vec<Vec<u32>>,
    labels: Vec<Vec<i64>>,
    mask: Vec<Vec<u8>>,
    pixels: Option<Vec<f32>>,
    has_image: Vec<bool>,
    spans: Vec<Vec<ImageSpan>>,
    record_ids: Vec<String>,
    epoch: u64,
}

fn flat(b: &Batch) -> Flat {
    Flat {
        ids: b.ids.to_vec2().unwrap(),
        labels: b.labels.to_vec2().unwrap(),
        mask: b.attention_mask.to_vec2().unwrap(),
        pixels: b.pixel_values.as_ref().map(|p| p.flatten_all().unwrap().to_vec1().unwrap()),
        has_image: b.has_image.clone(),
        spans: b.image_spans.clone(),
        record_ids: b.record_ids.clone(),
        epoch: b.epoch,
    }
}

#[test]
fn the_train_tiny_fixture_is_fully_usable() {
    let loader = train_tiny(0, 1);
    let report = loader.dataset().report();
    assert_eq!((report.records, report.usable, report.with_image), (6, 6, 4));
    assert!(report.bad.is_empty() && report.remarks.is_empty() && report.truncated == 0);
}

#[test]
fn batches_are_padded_and_masked() {
    let mut loader = train_tiny(0, 1);
    for _ in 0..3 {
        let b = loader.next_batch(2).unwrap();
        let f = flat(&b);
        let (rows, t) = b.ids.dims2().unwrap();
        assert_eq!((rows, b.labels.dims2().unwrap()), (2, (2, t)));
        assert_eq!(b.ids.dtype(), candle_core::DType::U32);
        assert_eq!(b.labels.dtype(), candle_core::DType::I64);
        assert_eq!(t, *b.lengths.iter().max().unwrap());
        let mut targets = 0;
        for row in 0..2 {
            let n = b.lengths[row];
            assert!(f.ids[row][n..].iter().all(|&i| i == 257));
            assert!(f.labels[row][n..].iter().all(|&l| l == IGNORE_INDEX));
            assert_eq!(f.mask[row].iter().map(|&m| m as usize).sum::<usize>(), n);
            assert_eq!(f.labels[row][0], IGNORE_INDEX);
            targets += f.labels[row][1..].iter().filter(|&&l| l != IGNORE_INDEX).count();
            if let Some(span) = f.spans[row].first() {
                assert!(f.ids[row][span.start..span.start + span.len].iter().all(|&i| i == 256));
            }
        }
        assert_eq!(targets, b.num_targets);
        let images = f.has_image.iter().filter(|&&h| h).count();
        match &b.pixel_values {
            Some(p) => assert_eq!(p.dims4().unwrap(), (images, 3, 32, 32)),
            None => assert_eq!(images, 0),
        }
    }
    let opts = LoaderOptions { workers: 0, pad_to_multiple_of: Some(64), ..LoaderOptions::new(1) };
    let b = train_tiny_with(opts).next_batch(2).unwrap();
    assert_eq!(b.ids.dims2().unwrap().1 % 64, 0);
}

#[test]
fn the_order_is_a_seeded_permutation_per_epoch() {
    let epoch_ids = |seed: u64, shuffle: bool| -> Vec<Vec<String>> {
        let mut loader = train_tiny_with(LoaderOptions { workers: 0, shuffle, ..LoaderOptions::new(seed) });
        (0..3).map(|_| loader.next_batch(6).unwrap().record_ids).collect()
    };
    let a = epoch_ids(1234, true);
    assert_eq!(a, epoch_ids(1234, true));
    assert_ne!(a, epoch_ids(1235, true));
    assert_ne!(a[0], a[1], "epochs must reshuffle");
    let file_order = ["wide-model", "tall-formats", "text-box", "wide-ranks", "tall-dog", "text-fox"];
    for epoch in &a {
        let mut sorted = epoch.clone();
        sorted.sort();
        let mut all = file_order.to_vec();
        all.sort();
        assert_eq!(sorted, all);
    }
    // Pinned: the permutation of 6 for seed 1234, epoch 0 (see rng.rs).
    let perm = rng::permutation(6, 1234, 0);
    assert_eq!(a[0], perm.iter().map(|&i| file_order[i as usize].to_owned()).collect::<Vec<_>>());
    assert!(epoch_ids(1234, false).iter().all(|e| e == &file_order));
}

#[test]
fn resume_continues_the_same_sequence() {
    for workers in [0, 3] {
        let mut reference = train_tiny(workers, 99);
        let all: Vec<Flat> = (0..7).map(|_| flat(&reference.next_batch(4).unwrap())).collect();
        assert_eq!(all[1].epoch, 0);
        assert_eq!(all[2].epoch, 1); // batches span epochs: 4 + 4 > 6

        let mut first = train_tiny(workers, 99);
        for want in &all[..3] {
            assert_eq!(&flat(&first.next_batch(4).unwrap()), want);
        }
        let state = first.state();
        assert_eq!(state, LoaderState { seed: 99, epoch: 2, position: 0, samples_per_epoch: 6 });
        let saved = serde_json::to_string(&state).unwrap();
        drop(first);

        // A fresh loader with a different configured seed: the saved seed wins.
        let mut resumed = train_tiny(workers, 5);
        resumed.restore(serde_json::from_str(&saved).unwrap()).unwrap();
        for want in &all[3..] {
            assert_eq!(&flat(&resumed.next_batch(4).unwrap()), want);
        }
        // Restoring mid-stream (workers already running ahead) rewinds exactly.
        resumed.restore(LoaderState { seed: 99, epoch: 0, position: 4, samples_per_epoch: 6 }).unwrap();
        assert_eq!(flat(&resumed.next_batch(4).unwrap()), all[1]);

        let bad = LoaderState { samples_per_epoch: 7, ..state };
        assert!(resumed.restore(bad).unwrap_err().to_string().contains("7"));
        assert!(resumed.restore(LoaderState { position: 6, ..state }).is_err());
    }
}

#[test]
fn prefetching_workers_give_the_sequential_result() {
    let mut sequential = train_tiny(0, 7);
    let want: Vec<Flat> = (0..9).map(|i| flat(&sequential.next_batch(1 + i % 3).unwrap())).collect();
    for workers in [1, 2, 5] {
        let mut parallel = train_tiny(workers, 7);
        let got: Vec<Flat> = (0..9).map(|i| flat(&parallel.next_batch(1 + i % 3).unwrap())).collect();
        assert_eq!(got, want, "{workers} workers");
        assert_eq!(parallel.state(), sequential.state());
        // Dropping with workers blocked on full channels must not hang.
        drop(parallel);
    }
}

#[test]
fn images_from_a_tar_equal_images_from_the_folder() {
    let dir = data_dir(&[good("w", Some("wide.png")), good("t", Some("./tall.png"))]);
    let mut tar = Vec::new();
    for name in ["wide.png", "tall.png"] {
        let data = std::fs::read(dir.path().join("images").join(name)).unwrap();
        tar.extend(ustar_header(&format!("./{name}"), data.len()));
        tar.extend(&data);
        tar.resize(tar.len().next_multiple_of(512), 0);
    }
    tar.resize(tar.len() + 1024, 0);
    std::fs::write(dir.path().join("images.tar"), &tar).unwrap();

    let from_dir = open(dir.path(), OnBadRecord::Error).unwrap();
    let cfg = config(dir.path().join("data.json"), Some(dir.path().join("images.tar")), OnBadRecord::Error);
    let from_tar = Dataset::open(cfg, tokenizer("llava-tiny/tokenizer.json")).unwrap();
    for i in 0..2 {
        let (a, b) = (from_dir.load(i).unwrap(), from_tar.load(i).unwrap());
        assert!(a.pixels.is_some());
        assert_eq!(a, b);
    }
    std::fs::write(
        dir.path().join("data.json"),
        serde_json::to_string(&[good("m", Some("no.png"))]).unwrap(),
    )
    .unwrap();
    let cfg = config(dir.path().join("data.json"), Some(dir.path().join("images.tar")), OnBadRecord::Error);
    let err = Dataset::open(cfg, tokenizer("llava-tiny/tokenizer.json")).unwrap_err().to_string();
    assert!(err.contains("images.tar:no.png"), "{err}");
}

/// A minimal POSIX ustar header for a regular file.
fn ustar_header(name: &str, size: usize) -> Vec<u8> {
    let mut h = vec![0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

#[test]
fn nemo_jsonl_with_inline_images_trains_in_the_nemo_flavour() {
    let dir = data_dir(&[]);
    let lines = [
        r#"{"id": "j1", "conversations": [{"from": "User", "value": "<img src=\"/somewhere/else/wide.png\">\nWhat is the model?"}, {"from": "Assistant", "value": "The model."}]}"#,
        r#"{"id": "j2", "conversations": [{"from": "User", "value": "What is the model?"}, {"from": "Assistant", "value": "The model.", "label": "quality:9"}]}"#,
    ];
    std::fs::write(dir.path().join("data.jsonl"), lines.join("\n")).unwrap();
    for template in [Template::Nvgpt, Template::VicunaV1, Template::Llama2] {
        let mut cfg =
            config(dir.path().join("data.jsonl"), Some(dir.path().join("images")), OnBadRecord::Error);
        cfg.example.flavour = Flavour::Nemo;
        cfg.example.template = template;
        cfg.example.image_tokens = ImageTokens::Neva { n: 16, use_im_start_end: false };
        cfg.example.max_len = 1024; // the byte-fallback tokenizer spells the system prompt long
        let ds = Dataset::open(cfg, neva_tokenizer()).unwrap();
        assert_eq!(ds.len(), 2);
        let s = ds.load(0).unwrap();
        assert_eq!(s.pixels.as_ref().map(|p| (p.height, p.width)), Some((32, 32)));
        let span = s.example.image_spans[0];
        assert_eq!(span.len, 16);
        assert!(s.example.labels[span.start..span.start + span.len].iter().all(|&l| l == IGNORE_INDEX));
        let trained: Vec<u32> = s
            .example
            .ids
            .iter()
            .zip(&s.example.labels)
            .filter(|(_, &l)| l != IGNORE_INDEX)
            .map(|(&i, _)| i)
            .collect();
        let text = ds.tokenizer().decode(&trained, false).unwrap();
        assert!(text.contains("The model."), "{template:?}: {text:?}");
        if template == Template::Nvgpt {
            // The per-turn SteerLM label is rendered and masked.
            let ex = ds.example(1).unwrap();
            let all = ds.tokenizer().decode(&ex.ids, false).unwrap();
            assert!(all.contains("<extra_id_2>quality:9\nThe model."), "{all:?}");
        }
    }
    // The llava flavour with NeVA image tokens is a configuration error, not 2 bad records.
    let mut cfg = config(dir.path().join("data.jsonl"), Some(dir.path().join("images")), OnBadRecord::Skip);
    cfg.example.image_tokens = ImageTokens::Neva { n: 16, use_im_start_end: false };
    assert!(Dataset::open(cfg, neva_tokenizer()).is_err());
}

#[test]
fn truncation_keeps_the_first_tokens() {
    let tok = tokenizer("llava-tiny/tokenizer.json");
    let rec = &records_by_id("data.json")[0];
    let mut cfg = config(PathBuf::new(), None, OnBadRecord::Error).example;
    let full = build_example(&tok, &cfg, rec).unwrap();
    let first_target = full.labels.iter().position(|&l| l != IGNORE_INDEX).unwrap();
    let span = full.image_spans[0];

    cfg.max_len = first_target + 1;
    let cut = build_example(&tok, &cfg, rec).unwrap();
    assert!(cut.truncated && !full.truncated);
    assert_eq!(cut.ids, full.ids[..first_target + 1]);
    assert_eq!(cut.labels, full.labels[..first_target + 1]);

    cfg.max_len = first_target;
    assert_eq!(build_example(&tok, &cfg, rec), Err(BadReason::AssistantTruncated { max_len: first_target }));
    cfg.max_len = span.start + 3;
    assert_eq!(
        build_example(&tok, &cfg, rec),
        Err(BadReason::ImageTruncated { max_len: span.start + 3, len: full.ids.len() })
    );
}
