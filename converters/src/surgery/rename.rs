//! Rename tensors by regular expression, drop them by glob: name-level edits of any checkpoint
//! (every format, every rank), with the bytes passed through untouched.
//!
//! Names are the ones the format stores (run `inspect` to see them). A rename rule is
//! `REGEX=REPLACEMENT`, split at the first `=`; the replacement may use `$1` / `${name}` capture
//! groups. Rules apply in order, each to the result of the previous one, and each replaces the
//! first match only (anchor with `^…$` to be exact). Keys NeMo stores as `None`
//! (`…_extra_state`) follow the same rules as tensors.

use super::plan::{Action, Change, Edit, Plan, WriteAs};
use crate::checkpoint::{Checkpoint, Shard, TensorMap};
use crate::error::{Error, Result};
use regex::Regex;
use std::collections::HashMap;

/// One `REGEX=REPLACEMENT` rule.
#[derive(Clone, Debug)]
pub struct RenameRule {
    /// The pattern.
    pub pattern: Regex,
    /// The replacement, with `$1` / `${name}` references.
    pub replacement: String,
    /// The rule as written, for messages.
    pub text: String,
}

impl RenameRule {
    /// Parse `REGEX=REPLACEMENT`.
    pub fn parse(rule: &str) -> Result<Self> {
        let arg = format!("--rule '{rule}'");
        let (pattern, replacement) = rule
            .split_once('=')
            .ok_or_else(|| Error::argument(&arg, "expected REGEX=REPLACEMENT (no '=' found)"))?;
        if pattern.is_empty() {
            return Err(Error::argument(&arg, "empty regular expression"));
        }
        let pattern = Regex::new(pattern).map_err(|e| Error::argument(&arg, e.to_string()))?;
        if let Some(group) = unknown_groups(&pattern, replacement).into_iter().next() {
            return Err(Error::argument(
                &arg,
                format!("the replacement uses ${group}, a group the expression does not have (it would expand to nothing)"),
            ));
        }
        Ok(RenameRule { pattern, replacement: replacement.to_string(), text: rule.to_string() })
    }

    fn apply(&self, name: &str) -> Option<String> {
        self.pattern
            .is_match(name)
            .then(|| self.pattern.replace(name, self.replacement.as_str()).into_owned())
    }
}

/// The `$1` / `$name` / `${name}` references of `replacement` (regex's syntax: `$$` is a literal
/// `$`, a bare name is the longest run of `[_0-9A-Za-z]`) that `pattern` has no group for: the
/// regex crate expands those to nothing, silently.
fn unknown_groups(pattern: &Regex, replacement: &str) -> Vec<String> {
    let names: Vec<&str> = pattern.capture_names().flatten().collect();
    let known = |g: &str| match g.parse::<usize>() {
        Ok(i) => i < pattern.captures_len(),
        Err(_) => names.contains(&g),
    };
    let mut unknown = Vec::new();
    let mut rest = replacement;
    while let Some(at) = rest.find('$') {
        let after = &rest[at + 1..];
        if let Some(literal) = after.strip_prefix('$') {
            rest = literal; // `$$`
            continue;
        }
        let (group, len) = if let Some(braced) = after.strip_prefix('{') {
            match braced.find('}') {
                Some(end) => (&braced[..end], end + 2),
                None => ("", 0), // not a reference: kept literally
            }
        } else {
            let end = after.find(|c: char| !(c == '_' || c.is_ascii_alphanumeric())).unwrap_or(after.len());
            (&after[..end], end)
        };
        if !group.is_empty() && !known(group) {
            unknown.push(group.to_string());
        }
        rest = &after[len..];
    }
    unknown
}

fn rank_label(ckpt: &Checkpoint, s: &Shard) -> String {
    if ckpt.shards.len() > 1 {
        format!("{} (tp={} pp={})", ckpt.meta.path.display(), s.rank.tp, s.rank.pp)
    } else {
        ckpt.meta.path.display().to_string()
    }
}

fn change_at(ckpt: &Checkpoint, s: &Shard, c: Change) -> Change {
    if ckpt.shards.len() > 1 {
        c.at_rank(s.rank.tp, s.rank.pp)
    } else {
        c
    }
}

/// Rename tensors by `rules`. Refuses a rule that matches nothing, and any two tensors (or a
/// renamed tensor and an untouched one) ending up under one name, naming both.
pub fn rename(src: &Checkpoint, rules: &[RenameRule]) -> Result<Edit> {
    if rules.is_empty() {
        return Err(Error::argument("--rule", "give at least one REGEX=REPLACEMENT rule"));
    }
    refuse_distributed(src)?;
    let mut used = vec![false; rules.len()];
    let mut plan = Plan::new("rename", &src.meta.path);
    let mut out = src.clone();
    let new_name = |name: &str, used: &mut Vec<bool>| -> String {
        let mut n = name.to_string();
        for (i, r) in rules.iter().enumerate() {
            if let Some(m) = r.apply(&n) {
                used[i] = true;
                n = m;
            }
        }
        n
    };
    for (shard, out_shard) in src.shards.iter().zip(out.shards.iter_mut()) {
        let label = rank_label(src, shard);
        // target name -> the source name that claimed it
        let mut claimed: HashMap<String, String> = HashMap::new();
        let mut claim = |target: &str, from: &str| -> Result<()> {
            if let Some(first) = claimed.insert(target.to_string(), from.to_string()) {
                if first != from {
                    return Err(Error::Collision {
                        path: label.clone().into(),
                        first,
                        second: from.to_string(),
                        target: target.to_string(),
                    });
                }
            }
            Ok(())
        };
        let mut tensors = TensorMap::with_capacity(shard.tensors.len());
        for (name, t) in &shard.tensors {
            let to = new_name(name, &mut used);
            claim(&to, name)?;
            let change = if &to == name {
                Change::new(&to, Action::Kept, t)
            } else {
                Change { from: Some(name.clone()), ..Change::new(&to, Action::Renamed, t) }
            };
            plan.push(change_at(src, shard, change));
            tensors.insert(to, t.clone());
        }
        let mut none_keys = Vec::with_capacity(shard.none_keys.len());
        for key in &shard.none_keys {
            let to = new_name(key, &mut used);
            claim(&to, key)?;
            none_keys.push(to);
        }
        out_shard.tensors = tensors;
        out_shard.none_keys = none_keys;
    }
    if let Some(i) = used.iter().position(|u| !u) {
        return Err(Error::argument(
            format!("--rule '{}'", rules[i].text),
            format!("matches no tensor name in {} (see 'shardsmith inspect')", src.meta.path.display()),
        ));
    }
    let write_as = WriteAs::like(&src.meta.flavour);
    Ok(Edit::new(out, write_as, plan))
}

/// Compile `--pattern` globs (`*` also matches `.`).
pub fn globs(patterns: &[String]) -> Result<Vec<(String, globset::GlobMatcher)>> {
    patterns
        .iter()
        .map(|p| {
            let g = globset::GlobBuilder::new(p)
                .literal_separator(false)
                .build()
                .map_err(|e| Error::argument(format!("--pattern '{p}'"), e.to_string()))?;
            Ok((p.clone(), g.compile_matcher()))
        })
        .collect()
}

/// Drop every tensor (and `None` key) whose name matches one of `patterns`. Refuses a pattern
/// that matches nothing, and dropping everything.
pub fn drop(src: &Checkpoint, patterns: &[String]) -> Result<Edit> {
    if patterns.is_empty() {
        return Err(Error::argument("--pattern", "give at least one glob"));
    }
    refuse_distributed(src)?;
    let matchers = globs(patterns)?;
    let mut used = vec![false; matchers.len()];
    let mut hit = |name: &str| -> bool {
        let mut any = false;
        for (i, (_, m)) in matchers.iter().enumerate() {
            if m.is_match(name) {
                used[i] = true;
                any = true;
            }
        }
        any
    };
    let mut plan = Plan::new("drop", &src.meta.path);
    let mut out = src.clone();
    for (shard, out_shard) in src.shards.iter().zip(out.shards.iter_mut()) {
        let mut tensors = TensorMap::with_capacity(shard.tensors.len());
        for (name, t) in &shard.tensors {
            let action = if hit(name) { Action::Dropped } else { Action::Kept };
            plan.push(change_at(src, shard, Change::new(name, action.clone(), t)));
            if action == Action::Kept {
                tensors.insert(name.clone(), t.clone());
            }
        }
        out_shard.none_keys = shard.none_keys.iter().filter(|k| !hit(k)).cloned().collect();
        out_shard.tensors = tensors;
    }
    if let Some(i) = used.iter().position(|u| !u) {
        return Err(Error::argument(
            format!("--pattern '{}'", matchers[i].0),
            format!("matches no tensor name in {} (see 'shardsmith inspect')", src.meta.path.display()),
        ));
    }
    if out.tensor_count() == 0 {
        return Err(Error::argument("--pattern", "these patterns drop every tensor; nothing would be left"));
    }
    let write_as = WriteAs::like(&src.meta.flavour);
    Ok(Edit::new(out, write_as, plan))
}

/// Name-level edits write the names as stored; a distributed checkpoint cannot be written back.
fn refuse_distributed(src: &Checkpoint) -> Result<()> {
    if matches!(src.meta.flavour, crate::Flavour::Nemo { layout: crate::NemoLayout::Distributed, .. }) {
        return Err(Error::invalid(
            &src.meta.path,
            "renaming or dropping inside a model_weights/ distributed checkpoint is not supported \
             (it cannot be written back); convert it to a per-rank .nemo or HF first",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn replacements_may_only_name_groups_the_expression_has() {
        use super::RenameRule;
        for ok in [r"a\.(\d+)=b.$1", r"(?P<x>w)=${x}_$x", r"w=$$9 costs", r"w=plain", r"w=$"] {
            assert!(RenameRule::parse(ok).is_ok(), "{ok}");
        }
        for (bad, group) in [(r"model\.norm\.weight=$9", "9"), (r"(?P<x>w)=a.$x.$y", "y"), (r"(w)=${2}", "2")]
        {
            let err = RenameRule::parse(bad).unwrap_err().to_string();
            assert!(
                err.contains(&format!("uses ${group}, a group the expression does not have")),
                "{bad}: {err}"
            );
        }
    }

    use super::*;
    use crate::checkpoint::{ByteSource, Flavour, Meta, Parallelism, TensorEntry};
    use crate::DType;
    use std::path::Path;
    use std::sync::Arc;

    fn ckpt(names: &[&str]) -> Checkpoint {
        let tensors = names
            .iter()
            .map(|n| {
                let t = TensorEntry::new(
                    DType::F32,
                    vec![1],
                    ByteSource::owned(vec![0u8; 4]),
                    Arc::from(Path::new("x")),
                );
                (n.to_string(), t)
            })
            .collect();
        let meta = Meta {
            path: "mem.safetensors".into(),
            flavour: Flavour::SafetensorsFile,
            parallel: Parallelism::default(),
            config: None,
            artifacts: vec![],
        };
        Checkpoint::single(meta, tensors)
    }

    #[test]
    fn renames_with_capture_groups_in_order() {
        let c = ckpt(&["model.layers.0.w", "model.layers.1.w", "lm_head.weight"]);
        let rules = [
            RenameRule::parse(r"^model\.layers\.(\d+)\.=blocks.$1.").unwrap(),
            RenameRule::parse("^blocks=b").unwrap(),
        ];
        let e = rename(&c, &rules).unwrap();
        let names: Vec<&String> = e.output.tensors().unwrap().keys().collect();
        assert_eq!(names, ["b.0.w", "b.1.w", "lm_head.weight"]);
        assert_eq!(e.plan.summary.renamed, 2);
        assert_eq!(e.plan.tensors[0].from.as_deref(), Some("model.layers.0.w"));
    }

    #[test]
    fn collisions_name_both_tensors() {
        let c = ckpt(&["a.x", "b.x", "c"]);
        let err = rename(&c, &[RenameRule::parse(r"^[ab]\.x$=y").unwrap()]).unwrap_err().to_string();
        assert!(err.contains("'a.x' and 'b.x' would both be named 'y'"), "{err}");
        let err = rename(&c, &[RenameRule::parse("^a.x$=c").unwrap()]).unwrap_err().to_string();
        assert!(err.contains("'a.x' and 'c' would both be named 'c'"), "{err}");
    }

    #[test]
    fn bad_rules_and_unused_patterns_are_refused() {
        assert!(RenameRule::parse("noequals").unwrap_err().to_string().contains("no '=' found"));
        assert!(RenameRule::parse("a(=b").is_err());
        let c = ckpt(&["a", "b"]);
        let err = rename(&c, &[RenameRule::parse("zzz=y").unwrap()]).unwrap_err().to_string();
        assert!(err.contains("matches no tensor"), "{err}");
        let err = drop(&c, &["q*".into()]).unwrap_err().to_string();
        assert!(err.contains("--pattern 'q*'") && err.contains("matches no tensor"), "{err}");
        assert!(drop(&c, &["*".into()]).unwrap_err().to_string().contains("every tensor"));
    }

    #[test]
    fn drop_by_glob_crosses_dots() {
        let c = ckpt(&["model.layers.0.self_attn.rotary_emb.inv_freq", "model.layers.0.w", "lm_head.weight"]);
        let e = drop(&c, &["*rotary_emb*".into()]).unwrap();
        assert_eq!(e.output.tensors().unwrap().len(), 2);
        assert_eq!(e.plan.summary.dropped, 1);
        assert_eq!(e.plan.summary.kept, 2);
    }
}
