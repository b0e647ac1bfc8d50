//! `hf://org/name[@revision]` sources: resolved in the local HuggingFace cache (`HF_HUB_CACHE`,
//! else `HF_HOME/hub`, else `~/.cache/huggingface/hub`), downloaded through the `hf-hub` crate
//! when the files are not there and a network is, and a clear error when neither works.

use anyhow::{anyhow, bail, Context, Result};
use hf_hub::{Cache, Repo, RepoType};
use std::path::{Path, PathBuf};

/// The files a LLaMA / CLIP conversion needs besides weight shards.
const WANTED: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
];

/// A parsed `hf://` reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubRef {
    /// `org/name`.
    pub repo: String,
    /// Branch, tag or commit (default `main`).
    pub revision: String,
}

impl HubRef {
    /// Parse `hf://org/name[@revision]`; `None` for anything that is not an `hf://` reference.
    pub fn parse(s: &str) -> Option<Result<HubRef>> {
        let rest = s.strip_prefix("hf://")?;
        let (repo, revision) = rest.split_once('@').unwrap_or((rest, "main"));
        let valid = repo.split('/').count() == 2 && repo.split('/').all(|p| !p.is_empty() && p != "..");
        Some(if valid && !revision.is_empty() {
            Ok(HubRef { repo: repo.to_string(), revision: revision.to_string() })
        } else {
            Err(anyhow!("bad hub reference '{s}': expected hf://org/name or hf://org/name@revision"))
        })
    }

    /// A bare `org/name` repository id, as configs name a vision tower (LLaVA's `mm_vision_tower`,
    /// NeVA's `from_pretrained`), at `main`; `None` for anything else (a path, a URL, a single
    /// name). The characters are the Hub's own: letters, digits, `-`, `_`, `.`.
    pub fn from_repo_id(s: &str) -> Option<HubRef> {
        let (org, name) = s.split_once('/')?;
        let part = |p: &str| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        };
        (part(org) && part(name)).then(|| HubRef { repo: s.to_string(), revision: "main".into() })
    }
}

/// The cache directory the HF tools use.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE") {
        return dir.into();
    }
    Cache::from_env().path().clone()
}

/// A local path for `arg`: itself, or the cache snapshot of an `hf://` reference.
pub fn resolve(arg: &Path) -> Result<PathBuf> {
    let Some(parsed) = arg.to_str().and_then(HubRef::parse) else { return Ok(arg.to_path_buf()) };
    resolve_ref(&parsed?)
}

/// The cache snapshot of `r`, downloaded first when it is not (completely) there, a network is,
/// and `HF_HUB_OFFLINE` is not set.
pub fn resolve_ref(r: &HubRef) -> Result<PathBuf> {
    let cache = cache_dir();
    if let Some(dir) = cached_snapshot(&cache, r) {
        if complete(&dir) {
            return Ok(dir);
        }
    }
    if std::env::var_os("HF_HUB_OFFLINE").is_some_and(|v| v != "0") {
        bail!(
            "{}@{} is not (completely) in the HuggingFace cache at {} and HF_HUB_OFFLINE is set",
            r.repo,
            r.revision,
            cache.display()
        );
    }
    download(&cache, r).with_context(|| {
        format!(
            "{}@{} is not (completely) in the HuggingFace cache at {} and downloading it failed \
             (no network? set HF_HUB_CACHE / HF_HOME to a cache that has it)",
            r.repo,
            r.revision,
            cache.display()
        )
    })
}

fn repo(r: &HubRef) -> Repo {
    Repo::with_revision(r.repo.clone(), RepoType::Model, r.revision.clone())
}

/// `snapshots/<commit>` for the revision: a commit hash directly, else through `refs/<rev>`.
fn cached_snapshot(cache: &Path, r: &HubRef) -> Option<PathBuf> {
    let base = cache.join(repo(r).folder_name());
    let commit = if r.revision.len() == 40 && r.revision.bytes().all(|b| b.is_ascii_hexdigit()) {
        r.revision.clone()
    } else {
        std::fs::read_to_string(base.join("refs").join(&r.revision)).ok()?.trim().to_string()
    };
    let dir = base.join("snapshots").join(commit);
    dir.join("config.json").is_file().then_some(dir)
}

/// Every weight file the index names is present (a partial download is not a checkpoint).
fn complete(dir: &Path) -> bool {
    for index in ["model.safetensors.index.json", "pytorch_model.bin.index.json"] {
        if let Ok(text) = std::fs::read(dir.join(index)) {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&text) else { return false };
            let files = v["weight_map"]
                .as_object()
                .map(|m| m.values().filter_map(|f| f.as_str()).collect::<Vec<_>>());
            return files.is_some_and(|f| f.iter().all(|f| dir.join(f).is_file()));
        }
    }
    dir.join("model.safetensors").is_file() || dir.join("pytorch_model.bin").is_file()
}

fn download(cache: &Path, r: &HubRef) -> Result<PathBuf> {
    let api = hf_hub::api::sync::ApiBuilder::new()
        .with_cache_dir(cache.to_path_buf())
        .with_progress(false)
        .build()?;
    let remote = api.repo(repo(r));
    let info = remote.info()?;
    let names: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let weights = names.iter().filter(|n| {
        !n.contains('/')
            && (n.ends_with(".safetensors") || (n.starts_with("pytorch_model") && n.ends_with(".bin")))
    });
    let prefer_safetensors = names.iter().any(|n| n.ends_with(".safetensors"));
    let mut last = None;
    for name in names.iter().filter(|n| WANTED.contains(&n.as_str())).chain(weights) {
        if prefer_safetensors && name.ends_with(".bin")
            || !prefer_safetensors && name.ends_with("index.json") && name.starts_with("model.")
        {
            continue;
        }
        last = Some(remote.get(name)?);
    }
    let any = last.ok_or_else(|| anyhow!("{} has no files", r.repo))?;
    Ok(any.parent().ok_or_else(|| anyhow!("cache path without parent"))?.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_references() {
        let r = HubRef::parse("hf://meta-llama/Llama-2-7b-hf@v1").unwrap().unwrap();
        assert_eq!((r.repo.as_str(), r.revision.as_str()), ("meta-llama/Llama-2-7b-hf", "v1"));
        assert_eq!(HubRef::parse("hf://a/b").unwrap().unwrap().revision, "main");
        assert!(HubRef::parse("hf://justname").unwrap().is_err());
        assert!(HubRef::parse("hf://a/../b").unwrap().is_err());
        assert!(HubRef::parse("/local/path").is_none());
    }

    #[test]
    fn repo_ids_are_told_from_paths() {
        let r = HubRef::from_repo_id("openai/clip-vit-large-patch14-336").unwrap();
        assert_eq!((r.repo.as_str(), r.revision.as_str()), ("openai/clip-vit-large-patch14-336", "main"));
        for not_an_id in
            ["clip", "/abs/dir", "./rel/dir", "../up", "a/b/c", "a/", "/b", "a b/c", "hf://a/b", ""]
        {
            assert!(HubRef::from_repo_id(not_an_id).is_none(), "{not_an_id}");
        }
    }
}
