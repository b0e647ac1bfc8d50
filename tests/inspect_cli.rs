//! `shardsmith inspect` as a user runs it: text and JSON output, filters, and clear failures.

mod common;

use common::{fixture, shardsmith};
use shardsmith_converters::formats::safetensors;
use shardsmith_converters::{ByteSource, DType, TensorEntry, TensorMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn tiny_llama_safetensors(dir: &Path) -> PathBuf {
    let mut t = TensorMap::new();
    let mut add = |name: &str, shape: Vec<usize>| {
        let n = shape.iter().product::<usize>() * 2;
        t.insert(
            name.into(),
            TensorEntry::new(DType::BF16, shape, ByteSource::owned(vec![0u8; n]), Arc::from(Path::new("t"))),
        );
    };
    add("model.embed_tokens.weight", vec![300, 16]);
    for l in 0..3 {
        add(&format!("model.layers.{l}.self_attn.q_proj.weight"), vec![16, 16]);
    }
    let path = dir.join("tiny.safetensors");
    safetensors::write_file(&t, &path, false).unwrap();
    path
}

#[test]
fn inspect_describes_a_safetensors_file_from_its_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_llama_safetensors(dir.path());
    let (ok, out, err) = shardsmith(&["inspect", path.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("format        safetensors file"), "{out}");
    assert!(out.contains("llama (from tensors): layers 3, hidden 16"), "{out}");
    assert!(out.contains("padded vocab 300"), "{out}");
    assert!(out.contains("total         4 tensors, 5568 parameters (bf16: 5568), 11136 bytes"), "{out}");
}

#[test]
fn inspect_json_and_filter() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_llama_safetensors(dir.path());
    let (ok, out, err) =
        shardsmith(&["inspect", path.to_str().unwrap(), "--json", "--filter", "*layers.1.*"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["tensors"].as_array().unwrap().len(), 1);
    assert_eq!(v["tensors"][0]["name"], "model.layers.1.self_attn.q_proj.weight");
    assert_eq!(v["tensors"][0]["dtype"], "bf16");
    assert_eq!(v["tensors"][0]["shape"], serde_json::json!([16, 16]));
    assert_eq!(v["totals"]["bytes"], 512);
    assert_eq!(v["architecture"]["family"], "llama");
}

#[test]
fn inspect_refuses_unknown_and_missing_input_with_a_named_error() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.bin");
    std::fs::write(&junk, b"definitely not a checkpoint").unwrap();
    let (ok, _, err) = shardsmith(&["inspect", junk.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("junk.bin") && err.contains("cannot tell the checkpoint format"), "{err}");
    assert!(err.contains("supported:"), "{err}");

    let (ok, _, err) = shardsmith(&["inspect", dir.path().join("absent").to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("absent") && err.contains("No such file"), "{err}");
}

#[test]
fn inspect_rejects_a_corrupt_safetensors_header() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_llama_safetensors(dir.path());
    let mut bytes = std::fs::read(&path).unwrap();
    // Point the first tensor's end offset past the buffer: keep the JSON valid, break the layout.
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let at =
        text.find("\"data_offsets\":[0,").expect("first tensor at offset 0") + "\"data_offsets\":[0,".len();
    bytes[at] = b'9';
    std::fs::write(&path, &bytes).unwrap();
    let (ok, _, err) = shardsmith(&["inspect", path.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("tiny.safetensors: malformed safetensors"), "{err}");
}

#[test]
fn inspect_names_the_bundled_fixtures() {
    for (rel, format, family) in [
        ("llama-mha", "HF safetensors directory (single file)", "llama"),
        ("llama-gqa", "HF safetensors directory (sharded)", "llama"),
        ("clip-vision", "HF safetensors directory (single file)", "clipvision"),
    ] {
        let (ok, out, err) = shardsmith(&["inspect", fixture(rel).to_str().unwrap()]);
        assert!(ok, "{rel}: {err}");
        assert!(out.contains(format), "{rel}: {out}");
        assert!(out.contains(&format!("architecture  {family} (from config)")), "{rel}: {out}");
    }
}

/// `shardsmith inspect X | head -1`: the reader goes away after one line. The listing must end the
/// way `cat`'s does (killed by SIGPIPE, nothing on stderr), not with a panic inside `println!`.
#[cfg(unix)]
#[test]
fn inspect_into_a_closed_pipe_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_shardsmith"))
        .args(["inspect", fixture("llama-gqa").to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader is gone before the first line is written
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}: {err}", out.status);
    assert!(err.is_empty(), "{err}");
}
