//! `model_config.yaml` (formats.md §5): the exact text plus a parsed view.
//!
//! The text is the truth. It is written back verbatim, so OmegaConf `${…}` interpolations, key
//! order, comments and keys we have never heard of survive a round trip byte for byte. The
//! parsed [`serde_yaml::Value`] exists only to read fields. Edits ([`NemoConfig::set_scalar`])
//! rewrite a single line of the text and then prove, by re-parsing, that nothing but the target
//! changed; anything the small line editor cannot handle safely is an error, never a guess.

use crate::error::{Error, Result};
use serde_yaml::{Mapping, Value};
use std::path::{Path, PathBuf};

/// The key NeMo strips when a config arrives wrapped as `model: {…}` (formats.md §1.2).
const WRAPPER: &str = "model";

/// `model_config.yaml`, kept verbatim plus a parsed view.
#[derive(Clone, Debug)]
pub struct NemoConfig {
    /// The file's exact text.
    pub raw: String,
    /// Parsed view for reading fields (the model section: a top-level `model:` wrapper, if the
    /// file has one, is already stripped as NeMo does).
    pub value: serde_yaml::Value,
    /// Where it was read (`x.nemo:model_config.yaml`), for errors about its values.
    pub origin: PathBuf,
}

impl NemoConfig {
    /// Parse `raw`; `origin` names the file in errors.
    pub fn parse(raw: String, origin: &Path) -> Result<Self> {
        let doc = parse_doc(&raw, origin)?;
        let value = strip_wrapper(doc);
        Ok(NemoConfig { raw, value, origin: origin.to_path_buf() })
    }

    /// The value at a dotted path such as `tokenizer.model` or `num_layers`.
    pub fn get(&self, key_path: &str) -> Option<&Value> {
        lookup(&self.value, key_path)
    }

    /// A non-negative integer field; `None` when absent, null or not an integer.
    pub fn get_usize(&self, key_path: &str) -> Option<usize> {
        self.get(key_path)?.as_u64().and_then(|n| usize::try_from(n).ok())
    }

    /// A floating-point (or integer) field.
    pub fn get_f64(&self, key_path: &str) -> Option<f64> {
        self.get(key_path)?.as_f64()
    }

    /// A boolean field.
    pub fn get_bool(&self, key_path: &str) -> Option<bool> {
        self.get(key_path)?.as_bool()
    }

    /// A string field.
    pub fn get_str(&self, key_path: &str) -> Option<&str> {
        self.get(key_path)?.as_str()
    }

    /// An integer field that defaults to `default` when absent or null, and is an error when
    /// present with any other type (a yaml that says `tensor_model_parallel_size: two` must not
    /// be read as 1).
    pub fn usize_or(&self, key_path: &str, default: usize) -> Result<usize> {
        match self.get(key_path) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_u64().and_then(|n| usize::try_from(n).ok()).ok_or_else(|| {
                Error::invalid(
                    &self.origin,
                    format!("'{key_path}' should be a non-negative integer, found {}", render_inline(v)),
                )
            }),
        }
    }

    /// A number that is `None` when absent or null and an error when present as anything else;
    /// a string holding a number (`'1e-5'`, which YAML 1.1 readers leave a string) is read as it.
    pub fn f64_opt(&self, key_path: &str) -> Result<Option<f64>> {
        match self.get(key_path) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .or_else(|| v.as_str().and_then(|s| s.trim().parse::<f64>().ok()))
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| {
                    Error::invalid(
                        &self.origin,
                        format!("'{key_path}' should be a number, found {}", render_inline(v)),
                    )
                }),
        }
    }

    /// A boolean that is `None` when absent or null and an error when present as anything else.
    pub fn bool_opt(&self, key_path: &str) -> Result<Option<bool>> {
        match self.get(key_path) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| {
                Error::invalid(
                    &self.origin,
                    format!("'{key_path}' should be true or false, found {}", render_inline(v)),
                )
            }),
        }
    }

    /// Set the scalar at `key_path` (dotted, relative to the model section) to `value`, in both
    /// the text and the parsed view.
    ///
    /// The text is edited at line level: the one `key: value` line is rewritten, keeping its
    /// indentation and any trailing comment; every other byte stays as it was. A key that does not
    /// exist yet is inserted as the first child of its (block-style) parent mapping, or appended
    /// at the end for a top-level key. The edit is verified by re-parsing: if the result differs
    /// from the old document anywhere but the target, nothing is changed and an error says why.
    pub fn set_scalar(&mut self, key_path: &str, value: impl Into<Value>) -> Result<()> {
        let value = value.into();
        let err = |detail: String| Error::invalid(&self.origin, format!("cannot set '{key_path}': {detail}"));
        if !matches!(value, Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_)) {
            return Err(err("only scalars (null, bool, number, string) can be set".into()));
        }
        if matches!(&value, Value::String(s) if s.contains(['\n', '\r'])) {
            return Err(err("multi-line strings are not supported".into()));
        }
        let segments: Vec<&str> = key_path.split('.').collect();
        if segments.iter().any(|s| s.is_empty()) {
            return Err(err("empty path segment".into()));
        }
        let origin = self.origin.clone();
        let origin = origin.as_path();
        let old_doc = parse_doc(&self.raw, origin)?;
        let wrapped = is_wrapped(&old_doc);
        let mut full: Vec<&str> = Vec::with_capacity(segments.len() + 1);
        if wrapped {
            full.push(WRAPPER);
        }
        full.extend(&segments);

        let mut expected = old_doc.clone();
        let present = set_in(&mut expected, &full, value.clone()).map_err(err)?;
        let rendered = render_inline(&value);
        let new_raw = if present {
            replace_line(&self.raw, &full, &rendered).map_err(err)?
        } else {
            insert_line(&self.raw, &full, &rendered).map_err(err)?
        };
        let new_doc = parse_doc(&new_raw, origin)?;
        if new_doc != expected {
            return Err(err(
                "the line edit did not produce the expected document (unusual yaml layout here?); \
                 edit the file by hand"
                    .into(),
            ));
        }
        self.raw = new_raw;
        self.value = strip_wrapper(new_doc);
        Ok(())
    }
}

fn parse_doc(raw: &str, origin: &Path) -> Result<Value> {
    let doc: Value =
        serde_yaml::from_str(raw).map_err(|e| Error::malformed(origin, "yaml", e.to_string()))?;
    if !doc.is_mapping() {
        return Err(Error::invalid(
            origin,
            format!("model_config.yaml must be a mapping, found {}", kind_name(&doc)),
        ));
    }
    Ok(doc)
}

fn is_wrapped(doc: &Value) -> bool {
    doc.get(WRAPPER).is_some_and(Value::is_mapping)
}

fn strip_wrapper(doc: Value) -> Value {
    match doc {
        Value::Mapping(mut m) if m.get(WRAPPER).is_some_and(Value::is_mapping) => {
            m.remove(WRAPPER).unwrap_or(Value::Null)
        }
        other => other,
    }
}

fn kind_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

fn lookup<'a>(v: &'a Value, key_path: &str) -> Option<&'a Value> {
    key_path.split('.').try_fold(v, |v, seg| v.as_mapping()?.get(seg))
}

/// Set `path` in `doc` to `value`. Returns whether the key existed. Every parent must be a
/// mapping and an existing target must be a scalar.
fn set_in(doc: &mut Value, path: &[&str], value: Value) -> std::result::Result<bool, String> {
    let (last, parents) = path.split_last().ok_or("empty path")?;
    let mut cur = doc;
    for (i, seg) in parents.iter().enumerate() {
        let map =
            cur.as_mapping_mut().ok_or_else(|| format!("'{}' is not a mapping", path[..i].join(".")))?;
        cur = map.get_mut(*seg).ok_or_else(|| format!("parent '{}' does not exist", path[..=i].join(".")))?;
    }
    let where_ = parents.join(".");
    let map: &mut Mapping = cur.as_mapping_mut().ok_or_else(|| format!("'{where_}' is not a mapping"))?;
    let present = match map.get(*last) {
        None => false,
        Some(Value::Mapping(_) | Value::Sequence(_) | Value::Tagged(_)) => {
            return Err("the existing value is not a scalar".into());
        }
        Some(_) => true,
    };
    map.insert(Value::String((*last).to_string()), value);
    Ok(present)
}

/// A scalar as a single line of yaml (`2`, `true`, `null`, `abc`, `'2'`).
fn render_inline(v: &Value) -> String {
    match serde_yaml::to_string(v) {
        Ok(s) => s.trim_end_matches('\n').to_string(),
        Err(_) => "?".to_string(),
    }
}

/// One line of the file: byte range (without the line break) and the text.
struct Line<'a> {
    start: usize,
    text: &'a str,
}

fn lines(raw: &str) -> Vec<Line<'_>> {
    let mut out = Vec::new();
    let mut start = 0;
    for piece in raw.split_inclusive('\n') {
        let text = piece.strip_suffix('\n').unwrap_or(piece);
        let text = text.strip_suffix('\r').unwrap_or(text);
        out.push(Line { start, text });
        start += piece.len();
    }
    out
}

/// What the block-structure scanner sees on one line.
enum Shape<'a> {
    /// Blank, comment or document marker: no structure.
    Nothing,
    /// `key:` with optional inline value; `value_at` is the byte offset (within the line) where
    /// the text after the colon starts.
    Key { indent: usize, key: String, value_at: usize, inline: &'a str },
    /// A `- ` sequence item (its contents are not addressable by dotted paths).
    Item { indent: usize },
    /// Anything else (continuation of a multi-line scalar, flow collection, ...).
    Other { indent: usize },
}

fn shape(text: &str) -> Shape<'_> {
    let body = text.trim_start_matches(' ');
    let indent = text.len() - body.len();
    if body.is_empty() || body.starts_with('#') {
        return Shape::Nothing;
    }
    if indent == 0 && (body.starts_with("---") || body.starts_with("...")) {
        return Shape::Nothing;
    }
    if body == "-" || body.starts_with("- ") {
        return Shape::Item { indent };
    }
    let (key, after) = match body.as_bytes()[0] {
        q @ (b'\'' | b'"') => {
            let q = q as char;
            let Some(close) = body[1..].find(q) else { return Shape::Other { indent } };
            (body[1..1 + close].to_string(), &body[close + 2..])
        }
        _ => {
            // A plain key ends at the first ": " or at a ':' that ends the line.
            let bytes = body.as_bytes();
            let colon = (0..bytes.len())
                .find(|&i| bytes[i] == b':' && (i + 1 == bytes.len() || bytes[i + 1] == b' '));
            let Some(colon) = colon else { return Shape::Other { indent } };
            if body[..colon].contains(" #") {
                return Shape::Other { indent };
            }
            (body[..colon].trim_end().to_string(), &body[colon..])
        }
    };
    let Some(rest) = after.strip_prefix(':') else { return Shape::Other { indent } };
    if !(rest.is_empty() || rest.starts_with(' ')) {
        return Shape::Other { indent };
    }
    let value_at = text.len() - rest.len();
    Shape::Key { indent, key, value_at, inline: strip_comment(rest).trim() }
}

/// The value part of `rest` without a trailing ` # comment` (quotes respected).
fn strip_comment(rest: &str) -> &str {
    let mut quote: Option<char> = None;
    let mut prev = ' ';
    for (i, c) in rest.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if (c == '\'' || c == '"') && prev == ' ' => quote = Some(c),
            None if c == '#' && prev == ' ' => return &rest[..i],
            None => {}
        }
        prev = c;
    }
    rest
}

/// A key line located by path: its line index and parsed shape fields.
struct Found {
    line: usize,
    indent: usize,
    value_at: usize,
}

/// Find the block-mapping line whose dotted key path is `path`.
fn find(lines: &[Line<'_>], path: &[&str]) -> Option<Found> {
    // Stack of open block-mapping keys (indent, key); `None` marks a sequence item, below which
    // nothing is addressable.
    let mut stack: Vec<(usize, Option<String>)> = Vec::new();
    // While inside the continuation of a multi-line value, lines deeper than this are skipped.
    let mut continuation: Option<usize> = None;
    for (i, line) in lines.iter().enumerate() {
        let sh = shape(line.text);
        let indent = match &sh {
            Shape::Nothing => continue,
            Shape::Key { indent, .. } | Shape::Item { indent } | Shape::Other { indent } => *indent,
        };
        if let Some(c) = continuation {
            if indent > c {
                continue;
            }
            continuation = None;
        }
        while stack.last().is_some_and(|(ind, _)| *ind >= indent) {
            stack.pop();
        }
        match sh {
            Shape::Key { indent, key, value_at, inline } => {
                let addressable = stack.iter().all(|(_, k)| k.is_some());
                if addressable
                    && stack.len() + 1 == path.len()
                    && stack.iter().zip(path).all(|((_, k), p)| k.as_deref() == Some(*p))
                    && key == path[stack.len()]
                {
                    return Some(Found { line: i, indent, value_at });
                }
                if inline.is_empty() {
                    stack.push((indent, Some(key)));
                } else {
                    continuation = Some(indent);
                }
            }
            Shape::Item { indent } => stack.push((indent, None)),
            Shape::Other { indent } => continuation = Some(indent),
            Shape::Nothing => {}
        }
    }
    None
}

fn replace_line(raw: &str, path: &[&str], rendered: &str) -> std::result::Result<String, String> {
    let ls = lines(raw);
    let found = find(&ls, path).ok_or("key not found as a block-style 'key: value' line")?;
    let line = &ls[found.line];
    let rest = &line.text[found.value_at..];
    let value_part = strip_comment(rest);
    let v = value_part.trim();
    if v.starts_with(['|', '>', '&', '*', '!', '[', '{']) {
        return Err(format!(
            "the current value '{v}' is a block scalar, anchor, alias, tag or flow collection"
        ));
    }
    let comment = &rest[value_part.len()..];
    let lead = &value_part[..value_part.len() - value_part.trim_start().len()];
    let lead = if lead.is_empty() { " " } else { lead };
    let tail = if comment.is_empty() {
        String::new()
    } else {
        // Keep the gap before the comment as it was.
        let gap = &value_part[value_part.trim_end().len()..];
        format!("{}{comment}", if gap.is_empty() { " " } else { gap })
    };
    let new_text = format!("{}{lead}{rendered}{tail}", &line.text[..found.value_at]);
    let start = line.start;
    let end = start + line.text.len();
    Ok(format!("{}{}{}", &raw[..start], new_text, &raw[end..]))
}

fn insert_line(raw: &str, path: &[&str], rendered: &str) -> std::result::Result<String, String> {
    let (last, parents) = path.split_last().ok_or("empty path")?;
    let key = plain_key(last)?;
    if parents.is_empty() {
        let sep = if raw.is_empty() || raw.ends_with('\n') { "" } else { "\n" };
        return Ok(format!("{raw}{sep}{key}: {rendered}\n"));
    }
    let ls = lines(raw);
    let parent = find(&ls, parents).ok_or("parent mapping not found as a block-style key")?;
    if !strip_comment(&ls[parent.line].text[parent.value_at..]).trim().is_empty() {
        return Err("the parent mapping is written in flow style".into());
    }
    let child_indent = ls[parent.line + 1..]
        .iter()
        .find_map(|l| match shape(l.text) {
            Shape::Nothing => None,
            Shape::Key { indent, .. } | Shape::Item { indent } | Shape::Other { indent } => Some(indent),
        })
        .filter(|&i| i > parent.indent)
        .unwrap_or(parent.indent + 2);
    let newline = if ls[parent.line].text.len() + ls[parent.line].start < raw.len()
        && raw[ls[parent.line].start + ls[parent.line].text.len()..].starts_with("\r\n")
    {
        "\r\n"
    } else {
        "\n"
    };
    let at = ls.get(parent.line + 1).map_or(raw.len(), |l| l.start);
    let sep = if at == raw.len() && !raw.ends_with('\n') { newline } else { "" };
    Ok(format!("{}{sep}{}{key}: {rendered}{newline}{}", &raw[..at], " ".repeat(child_indent), &raw[at..]))
}

/// A key that can be written unquoted.
fn plain_key(key: &str) -> std::result::Result<&str, String> {
    let ok = key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') && !key.starts_with('-');
    if ok {
        Ok(key)
    } else {
        Err(format!("cannot insert a new key '{key}' (only plain [A-Za-z0-9_-] keys)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = "\
# top comment
mcore_gpt: true
precision: bf16   # stored dtype
tensor_model_parallel_size: 1
pipeline_model_parallel_size: 1 # pp
num_layers: 2
data:
  seq: ${model.encoder_seq_length}
  list:
  - name: tensor_model_parallel_size
    tensor_model_parallel_size: 7
  nested:
    deep: 3
note: |
  tensor_model_parallel_size: 9
tokenizer:
  library: sentencepiece
  model: nemo:0123456789abcdef0123456789abcdef_tokenizer.model
  vocab_file: null
encoder_seq_length: 4096
";

    fn cfg(text: &str) -> NemoConfig {
        NemoConfig::parse(text.to_string(), Path::new("t.yaml")).unwrap()
    }

    #[test]
    fn getters_follow_dotted_paths() {
        let c = cfg(YAML);
        assert_eq!(c.get_usize("num_layers"), Some(2));
        assert_eq!(c.get_usize("data.nested.deep"), Some(3));
        assert_eq!(
            c.get_str("tokenizer.model"),
            Some("nemo:0123456789abcdef0123456789abcdef_tokenizer.model")
        );
        assert_eq!(c.get_str("data.seq"), Some("${model.encoder_seq_length}"));
        assert_eq!(c.get_bool("mcore_gpt"), Some(true));
        assert_eq!(c.get("tokenizer.vocab_file"), Some(&Value::Null));
        assert_eq!(c.get("tokenizer.nope"), None);
        assert_eq!(c.usize_or("virtual_pipeline_model_parallel_size", 1).unwrap(), 1);
        let err = c.usize_or("precision", 1).unwrap_err().to_string();
        assert!(err.starts_with("t.yaml: 'precision' should be a non-negative integer"), "{err}");
        let inside = NemoConfig::parse(
            "tensor_model_parallel_size: -1\n".into(),
            Path::new("m.nemo:model_config.yaml"),
        )
        .unwrap();
        let err = inside.usize_or("tensor_model_parallel_size", 1).unwrap_err().to_string();
        assert!(err.starts_with("m.nemo:model_config.yaml: 'tensor_model_parallel_size'"), "{err}");
    }

    #[test]
    fn set_scalar_edits_one_line_and_keeps_everything_else() {
        let mut c = cfg(YAML);
        c.set_scalar("tensor_model_parallel_size", 4u64).unwrap();
        c.set_scalar("pipeline_model_parallel_size", 2u64).unwrap();
        c.set_scalar("precision", "16").unwrap();
        c.set_scalar("tokenizer.vocab_file", "x.txt").unwrap();
        c.set_scalar("data.nested.deep", Value::Null).unwrap();
        let expected = YAML
            .replace("tensor_model_parallel_size: 1\n", "tensor_model_parallel_size: 4\n")
            .replace("pipeline_model_parallel_size: 1 # pp", "pipeline_model_parallel_size: 2 # pp")
            .replace("precision: bf16   # stored dtype", "precision: '16'   # stored dtype")
            .replace("vocab_file: null", "vocab_file: x.txt")
            .replace("deep: 3", "deep: null");
        assert_eq!(c.raw, expected);
        assert_eq!(c.get_usize("tensor_model_parallel_size"), Some(4));
        assert_eq!(c.get_str("precision"), Some("16"));
        // The look-alike keys inside the list and the block scalar were left alone.
        assert!(c.raw.contains("    tensor_model_parallel_size: 7\n"));
        assert!(c.raw.contains("  tensor_model_parallel_size: 9\n"));
    }

    #[test]
    fn set_scalar_inserts_missing_keys() {
        let mut c = cfg(YAML);
        c.set_scalar("virtual_pipeline_model_parallel_size", Value::Null).unwrap();
        c.set_scalar("tokenizer.sentencepiece_legacy", false).unwrap();
        assert!(c.raw.ends_with("encoder_seq_length: 4096\nvirtual_pipeline_model_parallel_size: null\n"));
        assert!(c.raw.contains("tokenizer:\n  sentencepiece_legacy: false\n  library: sentencepiece\n"));
        assert_eq!(c.get_bool("tokenizer.sentencepiece_legacy"), Some(false));
    }

    #[test]
    fn set_scalar_refuses_what_it_cannot_do_safely() {
        let mut c = cfg(YAML);
        let before = c.raw.clone();
        assert!(c.set_scalar("data", 1u64).is_err(), "not a scalar");
        assert!(c.set_scalar("data.list.name", 1u64).is_err(), "parent is a list");
        assert!(c.set_scalar("missing.child", 1u64).is_err(), "no parent");
        assert!(c.set_scalar("note", "x").is_err(), "block scalar");
        assert!(c.set_scalar("precision", "a\nb").is_err(), "multi-line");
        assert_eq!(c.raw, before);
    }

    #[test]
    fn model_wrapper_is_stripped_and_edited_inside() {
        let text = "model:\n  tensor_model_parallel_size: 2\n  tokenizer:\n    model: a.model\ntrainer:\n  devices: 1\n";
        let mut c = cfg(text);
        assert_eq!(c.get_usize("tensor_model_parallel_size"), Some(2));
        assert_eq!(c.get_str("tokenizer.model"), Some("a.model"));
        c.set_scalar("tensor_model_parallel_size", 1u64).unwrap();
        assert_eq!(c.raw, text.replace("size: 2", "size: 1"));
        c.set_scalar("pipeline_model_parallel_size", 1u64).unwrap();
        assert!(c.raw.starts_with("model:\n  pipeline_model_parallel_size: 1\n"));
        assert_eq!(c.get_usize("pipeline_model_parallel_size"), Some(1));
    }

    #[test]
    fn crlf_and_missing_final_newline() {
        let text = "a: 1\r\nb:\r\n  c: 2";
        let mut c = cfg(text);
        c.set_scalar("b.c", 3u64).unwrap();
        assert_eq!(c.raw, "a: 1\r\nb:\r\n  c: 3");
        c.set_scalar("b.d", 4u64).unwrap();
        assert_eq!(c.raw, "a: 1\r\nb:\r\n  d: 4\r\n  c: 3");
        c.set_scalar("e", 5u64).unwrap();
        assert_eq!(c.raw, "a: 1\r\nb:\r\n  d: 4\r\n  c: 3\ne: 5\n");
    }

    #[test]
    fn non_mapping_yaml_is_an_error() {
        assert!(NemoConfig::parse("- a\n".into(), Path::new("x")).is_err());
        assert!(NemoConfig::parse("".into(), Path::new("x")).is_err());
        assert!(NemoConfig::parse("a: [\n".into(), Path::new("x")).is_err());
    }
}
