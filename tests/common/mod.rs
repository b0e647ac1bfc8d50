//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test binary uses its own subset

use shardsmith_converters::formats::{self, nemo};
use shardsmith_converters::{
    ByteSource, Checkpoint, Flavour, Meta, ModelConfig, NemoLayout, Parallelism, Rank, Shard, TensorMap,
};
use std::path::{Path, PathBuf};

/// Run the `shardsmith` binary: (success, stdout, stderr).
pub fn shardsmith(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shardsmith"))
        .args(args)
        .output()
        .expect("run shardsmith");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// Run a command that must succeed; returns its stdout.
pub fn ok(args: &[&str]) -> String {
    let (ok, out, err) = shardsmith(args);
    assert!(ok, "shardsmith {args:?} failed: {err}");
    out
}

/// Run a command that must fail; returns its stderr.
pub fn refused(args: &[&str]) -> String {
    let (ok, out, err) = shardsmith(args);
    assert!(!ok, "shardsmith {args:?} should have failed: {out}");
    err
}

/// A path as the `&str` a command line takes.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// A path under `fixtures/`.
pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(rel)
}

/// A copy of the files of fixture `rel` (not its subdirectories) in `dir`, to edit.
pub fn copy_fixture(rel: &str, dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for f in std::fs::read_dir(fixture(rel)).unwrap() {
        let f = f.unwrap().path();
        if f.is_file() {
            std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
        }
    }
    dir.to_path_buf()
}

/// Edit the `config.json` of a checkpoint directory.
pub fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

/// Assert two tensor maps hold the same names, dtypes, shapes and bytes (order may differ).
pub fn assert_same_tensors(a: &TensorMap, b: &TensorMap, what: &str) {
    let mut names_a: Vec<&String> = a.keys().collect();
    let mut names_b: Vec<&String> = b.keys().collect();
    names_a.sort();
    names_b.sort();
    assert_eq!(names_a, names_b, "{what}: tensor names differ");
    for (name, ta) in a {
        let tb = &b[name.as_str()];
        assert_eq!(ta.dtype, tb.dtype, "{what}: {name} dtype");
        assert_eq!(ta.shape, tb.shape, "{what}: {name} shape");
        assert!(ta.bytes(name).unwrap() == tb.bytes(name).unwrap(), "{what}: {name} bytes differ");
    }
}

/// The reference Python (with torch and transformers), if set up.
///
/// `tests/run.sh` (the README's test command, and CI) always sets `SHARDSMITH_PYTHON`; a bare
/// `cargo test` without the venv skips the interop checks with a note. Under CI a missing
/// interpreter is a failure, never a silent skip.
pub fn reference_python() -> Option<PathBuf> {
    let candidate = std::env::var_os("SHARDSMITH_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| fixture("gen/.venv/bin/python"));
    if candidate.is_file() {
        return Some(candidate);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must run interop tests: no Python at {}",
        candidate.display()
    );
    eprintln!("skipping: no reference Python at {} (run bash tests/run.sh)", candidate.display());
    None
}

/// Run a checker from `tests/interop/`, asserting success and returning its stdout.
pub fn run_checker(python: &Path, script: &str, args: &[&Path]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop").join(script);
    let out = std::process::Command::new(python).arg(&script).args(args).output().expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{} failed:\n{stdout}\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

pub fn nemo_yaml(tp: usize, pp: usize) -> ModelConfig {
    let raw = format!(
        "# written by the test\nmcore_gpt: true\nnum_layers: 2\nhidden_size: 64\nnum_attention_heads: 4\n\
         tensor_model_parallel_size: {tp}\npipeline_model_parallel_size: {pp}\ntokenizer:\n  library: sentencepiece\n  \
         model: nemo:0123456789abcdef0123456789abcdef_tokenizer.model\nprecision: ${{trainer.precision}}\n"
    );
    ModelConfig::NemoYaml(nemo::NemoConfig::parse(raw, Path::new("test.yaml")).unwrap())
}

/// A .nemo-shaped checkpoint holding the llama-mha fixture's tensors, dealt round-robin to ranks.
pub fn nemo_checkpoint(tp: usize, pp: usize) -> Checkpoint {
    let hf = formats::open(&fixture("llama-mha")).unwrap();
    let tokenizer = std::fs::read(fixture("llama-mha/tokenizer.model")).unwrap();
    let mut shards: Vec<Shard> = (0..pp)
        .flat_map(|p| (0..tp).map(move |t| Shard::new(Rank { tp: t, pp: p }, TensorMap::new())))
        .collect();
    let n = shards.len();
    for (i, (name, t)) in hf.tensors().unwrap().iter().enumerate() {
        shards[i % n].tensors.insert(name.clone(), t.clone());
    }
    let meta = Meta {
        path: "memory".into(),
        flavour: Flavour::Nemo {
            layout: NemoLayout::for_parallelism(Parallelism { tp, pp }),
            gzip: false,
            extracted: false,
        },
        parallel: Parallelism { tp, pp },
        config: Some(nemo_yaml(tp, pp)),
        artifacts: vec![shardsmith_converters::Artifact {
            name: "0123456789abcdef0123456789abcdef_tokenizer.model".into(),
            source: ByteSource::owned(tokenizer),
        }],
    };
    Checkpoint { meta, shards }
}
