//! `hf://org/name[@revision]` sources resolve through a HuggingFace cache laid out as the hub
//! tools lay it out, and fail with a clear message when the files are neither cached nor
//! downloadable.

mod common;

use std::path::Path;
use std::process::Command;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn fake_cache(root: &Path, repo_folder: &str, src: &Path, files: Option<&[&str]>) {
    let base = root.join(repo_folder);
    let snap = base.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(base.join("refs")).unwrap();
    std::fs::write(base.join("refs/main"), COMMIT).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        if entry.path().is_file() && files.is_none_or(|f| f.contains(&name.as_str())) {
            std::fs::copy(entry.path(), snap.join(name)).unwrap();
        }
    }
}

fn run(cache: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shardsmith"))
        .args(args)
        .env("HF_HUB_CACHE", cache)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn hub_references_resolve_in_the_local_cache() {
    let cache = tempfile::tempdir().unwrap();
    fake_cache(cache.path(), "models--org--tiny-gqa", &common::fixture("llama-gqa"), None);
    for reference in ["hf://org/tiny-gqa", "hf://org/tiny-gqa@main", &format!("hf://org/tiny-gqa@{COMMIT}")] {
        let (ok, out, err) = run(cache.path(), &["inspect", reference]);
        assert!(ok, "{reference}: {err}");
        assert!(
            out.contains("HF safetensors directory (sharded)") && out.contains("query groups 2"),
            "{out}"
        );
    }
    let out_dir = tempfile::tempdir().unwrap();
    let nemo = out_dir.path().join("m.nemo");
    let (ok, _, err) =
        run(cache.path(), &["convert", "hf://org/tiny-gqa", nemo.to_str().unwrap(), "--tp", "2"]);
    assert!(ok, "{err}");
    let (ok, out, _) = run(cache.path(), &["diff", "hf://org/tiny-gqa", nemo.to_str().unwrap()]);
    assert!(ok && out.contains("MATCH"), "{out}");
}

#[test]
fn missing_or_partial_hub_checkpoints_fail_clearly() {
    let cache = tempfile::tempdir().unwrap();
    let (ok, _, err) = run(cache.path(), &["inspect", "hf://org/absent"]);
    assert!(!ok && err.contains("org/absent@main is not (completely) in the HuggingFace cache"), "{err}");
    // A download that stopped after two of four shards is not a checkpoint.
    let partial = ["config.json", "model.safetensors.index.json", "model-00001-of-00004.safetensors"];
    fake_cache(cache.path(), "models--org--partial", &common::fixture("llama-gqa"), Some(&partial));
    let (ok, _, err) = run(cache.path(), &["inspect", "hf://org/partial"]);
    assert!(!ok && err.contains("org/partial@main is not (completely)"), "{err}");
    let (ok, _, err) = run(cache.path(), &["inspect", "hf://justaname"]);
    assert!(!ok && err.contains("bad hub reference"), "{err}");
}
