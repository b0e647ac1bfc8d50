//! The fuzz targets' checks (`converters/fuzz/src/lib.rs`, included here as a module) on their
//! committed seeds (`converters/fuzz/seeds/<target>/`), each seed whole, cut short at eight
//! lengths, and with one byte flipped at eight places: a regression net for the parsers that
//! runs with every test run, where libFuzzer (converters/fuzz/README.md) explores further on
//! demand. A failure names the target, the seed and the variant.

#[path = "../converters/fuzz/src/lib.rs"]
mod checks;

use std::path::Path;

/// The seed whole, its prefixes of k/8 of its length (k = 0..8), and copies with the byte at
/// k/8 of its length inverted.
fn variants(data: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = vec![("whole".to_string(), data.to_vec())];
    for k in 0..8 {
        let at = data.len() * k / 8;
        out.push((format!("first {at} bytes"), data[..at].to_vec()));
        if at < data.len() {
            let mut flipped = data.to_vec();
            flipped[at] ^= 0xff;
            out.push((format!("byte {at} inverted"), flipped));
        }
    }
    out
}

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("converters/fuzz/seeds").join(target);
    let mut seeds: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    for seed in seeds {
        let data = std::fs::read(&seed).unwrap();
        for (variant, input) in variants(&data) {
            if std::panic::catch_unwind(|| check(&input)).is_err() {
                panic!(
                    "fuzz target {target}: {} ({variant}) broke its check (message above)",
                    seed.display()
                );
            }
        }
    }
}

#[test]
fn safetensors_header_seeds() {
    replay("safetensors_header", checks::safetensors_header);
}

#[test]
fn pickle_seeds() {
    replay("pickle", checks::pickle);
}

#[test]
fn torch_zip_seeds() {
    replay("torch_zip", checks::torch_zip);
}

#[test]
fn tar_seeds() {
    replay("tar", checks::tar);
}

#[test]
fn sentencepiece_seeds() {
    replay("sentencepiece", checks::sentencepiece);
}

#[test]
fn tokenizer_model_seeds() {
    replay("tokenizer_model", checks::tokenizer_model);
}

#[test]
fn train_records_seeds() {
    replay("train_records", checks::train_records);
}

#[test]
fn train_config_seeds() {
    replay("train_config", checks::train_config);
}

#[test]
fn train_examples_seeds() {
    replay("train_examples", |data| drop(checks::train_examples(data)));
    // The seed records make samples under every setup, so the sample checks are reached.
    let seed =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("converters/fuzz/seeds/train_examples/records.jsonl");
    let made = checks::train_examples(&std::fs::read(seed).unwrap());
    assert!(made.iter().all(|&n| n > 0), "samples made by each setup: {made:?}");
}

#[test]
fn hf_config_seeds() {
    replay("hf_config", checks::hf_config);
}

#[test]
fn nemo_yaml_seeds() {
    replay("nemo_yaml", checks::nemo_yaml);
}

#[test]
fn tokenizer_json_seeds() {
    replay("tokenizer_json", checks::tokenizer_json);
}

#[test]
fn image_seeds() {
    replay("image", checks::image);
}

#[test]
fn cli_specs_seeds() {
    replay("cli_specs", checks::cli_specs);
}

/// Every target in the fuzz crate has seeds and a replay above.
#[test]
fn every_target_is_replayed() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("converters/fuzz");
    let mut targets: Vec<String> = std::fs::read_dir(root.join("fuzz_targets"))
        .unwrap()
        .map(|e| e.unwrap().path().file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    targets.sort();
    let this = std::fs::read_to_string(file!()).unwrap_or_else(|_| {
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_seeds.rs")).unwrap()
    });
    for t in &targets {
        assert!(this.contains(&format!("replay(\"{t}\",")), "target {t} is not replayed here");
        assert!(root.join("seeds").join(t).is_dir(), "target {t} has no seeds");
    }
}

#[test]
fn metrics_log_seeds() {
    replay("metrics_log", checks::metrics_log);
}
