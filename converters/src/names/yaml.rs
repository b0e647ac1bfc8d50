//! A small YAML emitter for the configs we generate (NeMo `model_config.yaml`).
//!
//! Written by hand rather than through serde_yaml because NeMo's configs are read by PyYAML
//! (YAML 1.1): a float must carry a dot and a signed exponent (`1.0e-05`, not `1e-5`, which PyYAML
//! reads as a string), and the key order should follow NeMo's own files so diffs stay readable.

use std::fmt::Write as _;

/// A YAML scalar or nested mapping.
#[derive(Clone, Debug, PartialEq)]
pub enum Node {
    /// `null`.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A float, always written with a dot.
    Float(f64),
    /// A string, quoted when YAML would read it as something else.
    Str(String),
    /// A nested mapping in insertion order.
    Map(Vec<(String, Node)>),
    /// A sequence of scalars, written in flow style (`[336, 336]`).
    Seq(Vec<Node>),
}

impl From<bool> for Node {
    fn from(v: bool) -> Self {
        Node::Bool(v)
    }
}
impl From<usize> for Node {
    fn from(v: usize) -> Self {
        Node::Int(v as i64)
    }
}
impl From<f64> for Node {
    fn from(v: f64) -> Self {
        Node::Float(v)
    }
}
impl From<&str> for Node {
    fn from(v: &str) -> Self {
        Node::Str(v.to_string())
    }
}
impl From<i64> for Node {
    fn from(v: i64) -> Self {
        Node::Int(v)
    }
}
impl From<String> for Node {
    fn from(v: String) -> Self {
        Node::Str(v)
    }
}
impl<T: Into<Node>> From<Option<T>> for Node {
    fn from(v: Option<T>) -> Self {
        v.map_or(Node::Null, Into::into)
    }
}

/// Format a float the way PyYAML writes and reads it (`0.02`, `10000.0`, `1.0e-05`).
pub fn float(x: f64) -> String {
    if x.is_nan() {
        return ".nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { ".inf".into() } else { "-.inf".into() };
    }
    if x == 0.0 || (1e-4..1e16).contains(&x.abs()) {
        let s = format!("{x}");
        return if s.contains('.') { s } else { format!("{s}.0") };
    }
    let s = format!("{x:e}"); // e.g. "1e-5", "1.5e20"
    let (mantissa, exp) = s.split_once('e').expect("{:e} always has an exponent");
    let mantissa = if mantissa.contains('.') { mantissa.to_string() } else { format!("{mantissa}.0") };
    let (sign, digits) = exp.strip_prefix('-').map_or(("+", exp), |d| ("-", d));
    format!("{mantissa}e{sign}{digits:0>2}")
}

fn scalar(node: &Node) -> String {
    match node {
        Node::Null => "null".into(),
        Node::Bool(b) => b.to_string(),
        Node::Int(i) => i.to_string(),
        Node::Float(f) => float(*f),
        Node::Str(s) => string(s, false),
        Node::Seq(items) => format!("[{}]", items.iter().map(flow_item).collect::<Vec<_>>().join(", ")),
        Node::Map(_) => unreachable!("maps are written as blocks"),
    }
}

/// An item of a flow sequence: as [`scalar`], except that braces, which are syntax inside
/// `[...]`, keep a string from being plain.
fn flow_item(node: &Node) -> String {
    match node {
        Node::Str(s) => string(s, true),
        other => scalar(other),
    }
}

/// A string as a YAML scalar that PyYAML (YAML 1.1) and YAML 1.2 readers both read back as that
/// string: plain when it is a name or path that reads as nothing else (`bf16`,
/// `nemo:abc_tokenizer.model`, `${model.x}` outside a flow sequence), single-quoted when it would
/// read as a number, a bool, null or syntax, double-quoted with escapes when it holds a character
/// single quotes cannot carry (a line break, which they fold into a space, or a non-printable
/// character). `flow`: inside `[...]`, where braces are syntax too.
fn string(s: &str, flow: bool) -> String {
    let plain = s.starts_with(|c: char| c.is_ascii_alphabetic() || "_/$".contains(c))
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/:$".contains(c) || (!flow && "{}".contains(c)))
        && !s.ends_with(':')
        && !matches!(
            s.to_ascii_lowercase().as_str(),
            "null" | "true" | "false" | "yes" | "no" | "on" | "off" | "y" | "n"
        );
    if plain {
        return s.to_string();
    }
    // YAML's printable set, less the line breaks YAML 1.1 adds (NEL, LS, PS) and the BOM.
    let printable = |c: char| {
        matches!(c, '\t' | '\u{20}'..='\u{7e}' | '\u{a0}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}' | '\u{10000}'..)
            && !matches!(c, '\u{2028}' | '\u{2029}' | '\u{feff}')
    };
    if s.chars().all(printable) {
        return format!("'{}'", s.replace('\'', "''"));
    }
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if printable(c) => out.push(c),
            c if (c as u32) <= 0xff => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if (c as u32) <= 0xffff => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => {
                let _ = write!(out, "\\U{:08x}", c as u32);
            }
        }
    }
    out.push('"');
    out
}

/// Emit a mapping as block YAML with two-space indentation.
pub fn emit(map: &[(String, Node)]) -> String {
    fn go(out: &mut String, map: &[(String, Node)], indent: usize) {
        for (k, v) in map {
            match v {
                // Keys quoted as values are: an HF config's `id2label` has keys like "0".
                Node::Map(inner) if !inner.is_empty() => {
                    let _ = writeln!(out, "{:indent$}{}:", "", string(k, false));
                    go(out, inner, indent + 2);
                }
                Node::Map(_) => {
                    let _ = writeln!(out, "{:indent$}{}: {{}}", "", string(k, false));
                }
                _ => {
                    let _ = writeln!(out, "{:indent$}{}: {}", "", string(k, false), scalar(v));
                }
            }
        }
    }
    let mut out = String::new();
    go(&mut out, map, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_read_back_as_floats() {
        for (x, s) in
            [(1e-5, "1.0e-05"), (0.02, "0.02"), (10000.0, "10000.0"), (2.5e-7, "2.5e-07"), (0.0, "0.0")]
        {
            assert_eq!(float(x), s);
            let v: serde_yaml::Value = serde_yaml::from_str(&format!("a: {s}")).unwrap();
            assert_eq!(v["a"].as_f64(), Some(x), "{s}");
        }
    }

    proptest::proptest! {
        /// Any string (paths and ids a user passes end up in the yaml: a tower's directory, a
        /// hub id; an HF vision config's keys and string lists) reads back as itself, whatever
        /// characters it holds, as a value, a key or an item of a flow sequence.
        #[test]
        fn any_string_reads_back_as_itself(text in "\\PC*|[a-z:/ .#'\"\n\t\r\\{}\\[\\],&*!|>%@`-]{0,12}") {
            // As a value, an item of a flow sequence, and a key.
            proptest::prop_assume!(!["k", "s", "after"].contains(&text.as_str()));
            let seq = Node::Seq(vec![Node::Str(text.clone()), Node::Int(2)]);
            let doc = emit(&[("k".into(), Node::Str(text.clone())), ("s".into(), seq), (text.clone(), Node::Int(3)), ("after".into(), Node::Int(1))]);
            let v: serde_yaml::Value = serde_yaml::from_str(&doc).map_err(|e| proptest::test_runner::TestCaseError::fail(format!("{doc:?}: {e}")))?;
            proptest::prop_assert_eq!(v["k"].as_str(), Some(text.as_str()), "{:?}", doc);
            proptest::prop_assert_eq!(v["s"][0].as_str(), Some(text.as_str()), "{:?}", doc);
            proptest::prop_assert_eq!(v["s"][1].as_i64(), Some(2));
            proptest::prop_assert_eq!(v.get(text.as_str()).and_then(serde_yaml::Value::as_i64), Some(3), "{:?}", doc);
            proptest::prop_assert_eq!(v["after"].as_i64(), Some(1));
        }
    }

    #[test]
    fn strings_that_look_like_other_types_are_quoted() {
        let text = emit(&[
            ("a".into(), "bf16".into()),
            ("b".into(), "16".into()),
            ("c".into(), "null".into()),
            ("d".into(), Node::Map(vec![("e".into(), "nemo:abc_tokenizer.model".into())])),
        ]);
        assert_eq!(text, "a: bf16\nb: '16'\nc: 'null'\nd:\n  e: nemo:abc_tokenizer.model\n");
        // A trailing colon or a leading brace is syntax; a line break needs double quotes (single
        // quotes fold it into a space). Checked against PyYAML 6 too.
        assert_eq!(string("dir:", false), "'dir:'");
        assert_eq!(string("{}", false), "'{}'");
        assert_eq!(string("a\nb\\", false), "\"a\\nb\\\\\"");
        assert_eq!(string("x\u{85}", false), "\"x\\x85\"");
        // Braces are syntax in a flow sequence; a key reads as a string like a value does.
        let text =
            emit(&[("s".into(), Node::Seq(vec!["${a}".into(), "b".into()])), ("0".into(), "x".into())]);
        assert_eq!(text, "s: ['${a}', b]\n'0': x\n");
    }
}
