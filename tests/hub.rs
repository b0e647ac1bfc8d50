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

/// A vision tower a checkpoint only names (an original LLaVA's `mm_vision_tower`, a NeVA's
/// `from_pretrained`) is found in the cache by its Hub id, as LLaVA's and NeMo's own
/// `from_pretrained` find it; `--vision` takes an `hf://` reference too. With neither a cached
/// copy nor a network, the error names the config key, the id and the way out.
#[test]
fn named_vision_towers_resolve_in_the_local_cache() {
    let cache = tempfile::tempdir().unwrap();
    let (orig, tower) = (common::fixture("llava-orig-tiny"), common::fixture("llava-tiny-clip"));
    let image = common::fixture("llava-tiny/image.png");
    let generate = |ckpt: &Path, extra: &[&str]| {
        let mut args = vec!["generate", ckpt.to_str().unwrap(), "--prompt", "<image>\nWhat is this?"];
        args.extend(["--image", image.to_str().unwrap(), "--max-new-tokens", "4", "--json"]);
        args.extend(extra);
        let (ok, out, err) = run(cache.path(), &args);
        // The tokens, not the timings.
        let tokens = ok.then(|| {
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            (v["prompt_ids"].clone(), v["new_ids"].clone())
        });
        (ok, tokens, err)
    };
    let (ok, _, err) = generate(&orig, &[]);
    assert!(!ok, "no tower anywhere yet");
    assert!(
        err.contains("the vision tower mm_vision_tower names, 'shardsmith-fixtures/llava-tiny-clip'")
            && err.contains("HF_HUB_OFFLINE is set")
            && err.contains("pass --vision CLIP_DIR"),
        "{err}"
    );

    fake_cache(cache.path(), "models--shardsmith-fixtures--llava-tiny-clip", &tower, None);
    let (ok, want, err) = generate(&orig, &["--vision", tower.to_str().unwrap()]);
    assert!(ok, "{err}");
    for extra in [&[][..], &["--vision", "hf://shardsmith-fixtures/llava-tiny-clip"]] {
        let (ok, got, err) = generate(&orig, extra);
        assert!(ok, "{extra:?}: {err}");
        assert_eq!(got, want, "{extra:?}");
    }

    // A config written from `--vision hf://…` names the tower by its Hub id, not by this cache.
    let out = tempfile::tempdir().unwrap();
    let llava = out.path().join("llava");
    let (ok, _, err) = run(
        cache.path(),
        &["convert", common::fixture("llava-tiny").to_str().unwrap(), llava.to_str().unwrap()]
            .into_iter()
            .chain(["--to", "llava", "--vision", "hf://shardsmith-fixtures/llava-tiny-clip"])
            .collect::<Vec<_>>(),
    );
    assert!(ok, "{err}");
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(llava.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["mm_vision_tower"], "shardsmith-fixtures/llava-tiny-clip");

    // A NeVA (extracted .nemo) whose yaml names the tower by its Hub id, nothing beside it.
    let work = tempfile::tempdir().unwrap();
    let neva = work.path().join("neva");
    let (ok, _, err) = run(
        cache.path(),
        &[
            "convert",
            common::fixture("llava-tiny").to_str().unwrap(),
            neva.to_str().unwrap(),
            "--extracted",
            "--to",
            "nemo",
            "--template",
            "vicuna_v1",
        ],
    );
    assert!(ok, "{err}");
    let (ok, with_dir, err) = generate(&neva, &[]);
    assert!(ok, "{err}");
    let side = work.path().join("neva-clip");
    let yaml_path = neva.join("model_config.yaml");
    let yaml = std::fs::read_to_string(&yaml_path).unwrap();
    let named = yaml.replace(side.to_str().unwrap(), "shardsmith-fixtures/llava-tiny-clip");
    assert_ne!(named, yaml, "the yaml names the side directory");
    std::fs::write(&yaml_path, named).unwrap();
    std::fs::remove_dir_all(&side).unwrap();
    let (ok, got, err) = generate(&neva, &[]);
    assert!(ok, "{err}");
    assert_eq!(got, with_dir);
    // The trainer's loader (`bench train-step` runs it) finds it the same way.
    let (ok, out, err) = run(
        cache.path(),
        &["bench", "train-step", neva.to_str().unwrap(), "--batch", "1", "--seq", "24", "--runs", "1"],
    );
    assert!(ok && out.contains("\"step_ms\""), "{out}{err}");
}
