//! Training records: LLaVA's JSON array and NeMo's SteerLM-style `.jsonl` (formats.md §9.1).
//!
//! A file that is not JSON at all is one error with its line and column. Inside a valid file each
//! record is checked on its own, and a record of the wrong shape (a number where a string belongs,
//! a missing `conversations`, an unknown speaker) becomes a [`BadRecord`] naming its `id`, so the
//! caller can skip it or stop. Checks that need the template or the tokenizer (alternation, the
//! `<image>` marker, masking) happen later, in `example.rs`.

use std::path::Path;

use serde_json::Value;

use super::{BadReason, BadRecord};
use crate::infer::template::IMAGE_PLACEHOLDER;
use crate::{Error, Result};

/// Who said a turn (`from`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaker {
    /// `human` (also `user`, any case).
    Human,
    /// `gpt` (also `assistant`, any case).
    Gpt,
}

impl std::fmt::Display for Speaker {
    /// LLaVA's spelling (`from`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Speaker::Human => "human",
            Speaker::Gpt => "gpt",
        })
    }
}

/// One turn of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    /// The speaker.
    pub from: Speaker,
    /// The text, `<image>` marker included.
    pub value: String,
    /// NeMo nvgpt/SteerLM per-assistant-turn attribute line (`quality:4,…`), if given.
    pub label: Option<String>,
}

/// One parsed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Position in the file (0-based; for `.jsonl` the record number, not the line).
    pub index: usize,
    /// The record's `id` (a number is written in decimal); `#<index>` when it has none.
    pub id: String,
    /// Image file relative to the image folder (a one-element list is unwrapped).
    pub image: Option<String>,
    /// Per-record system prompt (NeMo nvgpt).
    pub system: Option<String>,
    /// The turns as written (a leading `gpt` turn is kept here and dropped when rendering).
    pub turns: Vec<Turn>,
}

/// The records of a data file, each parsed or rejected. `.jsonl` is read as NeMo's one record
/// per line; anything else as a LLaVA JSON array.
pub fn read_records(path: &Path) -> Result<Vec<std::result::Result<Record, BadRecord>>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("jsonl")) {
        Ok(parse_jsonl(&text))
    } else {
        parse_json_array(&text, path)
    }
}

/// A LLaVA JSON array. Not JSON, or not an array, is an error for the whole file.
pub fn parse_json_array(text: &str, origin: &Path) -> Result<Vec<std::result::Result<Record, BadRecord>>> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        Error::config(origin, format!("not valid JSON at line {} column {}: {e}", e.line(), e.column()))
    })?;
    let Value::Array(items) = value else {
        return Err(Error::config(
            origin,
            format!(
                "expected a JSON array of records ({{\"id\", \"image\", \"conversations\"}}), got {}",
                kind(&value)
            ),
        ));
    };
    Ok(items.iter().enumerate().map(|(i, v)| parse_record(i, v, ImageSyntax::Field)).collect())
}

/// NeMo `.jsonl`: one record per non-empty line. A line that is not JSON is a bad record (the
/// other lines stand on their own), named by its line number.
pub fn parse_jsonl(text: &str) -> Vec<std::result::Result<Record, BadRecord>> {
    let mut out = Vec::new();
    for (line_no, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let index = out.len();
        let record = match serde_json::from_str::<Value>(line) {
            Ok(v) => parse_record(index, &v, ImageSyntax::InlineImgTags),
            Err(e) => Err(BadRecord {
                index,
                id: format!("line {}", line_no + 1),
                reason: BadReason::Invalid(format!(
                    "line {} is not valid JSON (column {}): {e}",
                    line_no + 1,
                    e.column()
                )),
            }),
        };
        out.push(record);
    }
    out
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ImageSyntax {
    /// LLaVA: `"image": "x.jpg"` (or `["x.jpg"]`).
    Field,
    /// NeMo `.jsonl`: `<img src="/any/dir/x.jpg">` in the text, replaced by `<image>`; the file
    /// is the basename under the image folder. Without tags the `image` field is used.
    InlineImgTags,
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn parse_record(index: usize, v: &Value, syntax: ImageSyntax) -> std::result::Result<Record, BadRecord> {
    let id = match v.get("id") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => format!("#{index}"),
    };
    let bad = |why: String| BadRecord { index, id: id.clone(), reason: BadReason::Invalid(why) };
    let Value::Object(obj) = v else {
        return Err(bad(format!("a record must be an object, got {}", kind(v))));
    };
    match obj.get("id") {
        None | Some(Value::String(_) | Value::Number(_)) => {}
        Some(other) => return Err(bad(format!("`id` must be a string or a number, got {}", kind(other)))),
    }
    let mut image = match obj.get("image") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(list)) => match list.as_slice() {
            [] => None,
            [Value::String(s)] => Some(s.clone()),
            [other] => return Err(bad(format!("`image` list holds {}, not a file name", kind(other)))),
            many => {
                return Err(BadRecord { index, id: id.clone(), reason: BadReason::TooManyImages(many.len()) })
            }
        },
        Some(other) => return Err(bad(format!("`image` must be a file name, got {}", kind(other)))),
    };
    let system = match obj.get("system") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => return Err(bad(format!("`system` must be a string, got {}", kind(other)))),
    };
    let turns_json = match obj.get("conversations") {
        Some(Value::Array(t)) => t,
        Some(other) => return Err(bad(format!("`conversations` must be an array, got {}", kind(other)))),
        None => return Err(bad("no `conversations`".into())),
    };
    let mut turns = Vec::with_capacity(turns_json.len());
    let mut inline_images = Vec::new();
    for (t, turn) in turns_json.iter().enumerate() {
        let field = |key: &str| turn.get(key);
        let from = match field("from") {
            Some(Value::String(s)) => match s.to_ascii_lowercase().as_str() {
                "human" | "user" => Speaker::Human,
                "gpt" | "assistant" => Speaker::Gpt,
                _ => return Err(bad(format!("turn {t}: unknown speaker {s:?} (human or gpt)"))),
            },
            Some(other) => {
                return Err(bad(format!("turn {t}: `from` must be a string, got {}", kind(other))))
            }
            None => return Err(bad(format!("turn {t}: no `from`"))),
        };
        let mut value = match field("value") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(bad(format!("turn {t}: `value` must be a string, got {}", kind(other))))
            }
            None => return Err(bad(format!("turn {t}: no `value`"))),
        };
        let label = match field("label") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                return Err(bad(format!("turn {t}: `label` must be a string, got {}", kind(other))))
            }
        };
        if syntax == ImageSyntax::InlineImgTags {
            value = replace_img_tags(&value, &mut inline_images);
        }
        turns.push(Turn { from, value, label });
    }
    if !inline_images.is_empty() {
        if inline_images.len() > 1 {
            return Err(BadRecord { index, id, reason: BadReason::TooManyImages(inline_images.len()) });
        }
        image = inline_images.pop();
    }
    Ok(Record { index, id, image, system, turns })
}

/// NeMo's `re.sub('<img src="([^"]+)">', '<image>', …)`, collecting each file's basename.
fn replace_img_tags(text: &str, images: &mut Vec<String>) -> String {
    const OPEN: &str = "<img src=\"";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        let after = &rest[start + OPEN.len()..];
        // `[^"]+` then `">`: a non-empty path, a quote, a closing bracket.
        match after.find('"') {
            Some(q) if q > 0 && after[q + 1..].starts_with('>') => {
                let src = &after[..q];
                images.push(src.rsplit('/').next().unwrap_or(src).to_owned());
                out.push_str(&rest[..start]);
                out.push_str(IMAGE_PLACEHOLDER);
                rest = &after[q + 2..];
            }
            _ => {
                out.push_str(&rest[..start + OPEN.len()]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Vec<std::result::Result<Record, BadRecord>> {
        parse_json_array(text, Path::new("d.json")).unwrap()
    }

    #[test]
    fn llava_records() {
        let recs = parse(
            r#"[{"id": "a", "image": "x.jpg", "conversations": [
                  {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
                {"id": 7, "image": ["y.png"], "conversations": [{"from": "Human", "value": "q"}]},
                {"conversations": [], "image": []}]"#,
        );
        let a = recs[0].as_ref().unwrap();
        assert_eq!((a.id.as_str(), a.image.as_deref(), a.turns.len()), ("a", Some("x.jpg"), 2));
        assert_eq!(a.turns[1].from, Speaker::Gpt);
        let b = recs[1].as_ref().unwrap();
        assert_eq!((b.id.as_str(), b.image.as_deref()), ("7", Some("y.png")));
        let c = recs[2].as_ref().unwrap();
        assert_eq!((c.id.as_str(), c.index, c.image.as_deref()), ("#2", 2, None));
    }

    #[test]
    fn whole_file_errors_name_line_and_column() {
        let err = parse_json_array("[\n {\"id\": 1,\n  oops}\n]", Path::new("d.json")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("d.json") && msg.contains("line 3 column 3"), "{msg}");
        let err = parse_json_array("{\"id\": 1}", Path::new("d.json")).unwrap_err().to_string();
        assert!(err.contains("expected a JSON array") && err.contains("an object"), "{err}");
    }

    #[test]
    fn wrong_field_types_are_bad_records() {
        let recs = parse(
            r#"[{"id": "ok", "conversations": [{"from": "human", "value": "q"}]},
                {"id": "v", "conversations": [{"from": "human", "value": 3}]},
                {"id": "f", "conversations": [{"from": "robot", "value": "q"}]},
                {"id": "c", "conversations": "hi"},
                {"id": "i", "image": 5, "conversations": []},
                {"id": "two", "image": ["a", "b"], "conversations": []},
                {"id": {"x": 1}, "conversations": []},
                "string record"]"#,
        );
        assert!(recs[0].is_ok());
        let reasons: Vec<String> = recs[1..].iter().map(|r| r.as_ref().unwrap_err().to_string()).collect();
        assert!(reasons[0].contains("record \"v\"") && reasons[0].contains("`value` must be a string"));
        assert!(reasons[1].contains("unknown speaker \"robot\""), "{}", reasons[1]);
        assert!(reasons[2].contains("`conversations` must be an array"));
        assert!(reasons[3].contains("`image` must be a file name"));
        assert!(reasons[4].contains("2 images"), "{}", reasons[4]);
        assert!(reasons[5].contains("#6") && reasons[5].contains("`id` must be"), "{}", reasons[5]);
        assert!(reasons[6].contains("#7") && reasons[6].contains("must be an object"));
    }

    #[test]
    fn nemo_jsonl_inline_images() {
        let text = concat!(
            r#"{"id": "n1", "system": "S", "conversations": [{"from": "User", "value": "Look <img src=\"/data/imgs/cat.jpg\"> now"}, {"from": "Assistant", "value": "cat", "label": "quality:4"}]}"#,
            "\n\n",
            "{not json\n",
            r#"{"id": "n3", "conversations": [{"from": "User", "value": "<img src=\"a.png\"><img src=\"b.png\">"}]}"#,
            "\n",
        );
        let recs = parse_jsonl(text);
        assert_eq!(recs.len(), 3);
        let r = recs[0].as_ref().unwrap();
        assert_eq!(r.image.as_deref(), Some("cat.jpg"));
        assert_eq!(r.turns[0].value, "Look <image> now");
        assert_eq!(r.turns[1].label.as_deref(), Some("quality:4"));
        assert_eq!(r.system.as_deref(), Some("S"));
        let bad = recs[1].as_ref().unwrap_err().to_string();
        assert!(bad.contains("line 3") && bad.contains("not valid JSON"), "{bad}");
        assert!(recs[2].as_ref().unwrap_err().to_string().contains("2 images"));
        // An unterminated tag stays text.
        let mut imgs = vec![];
        assert_eq!(replace_img_tags("<img src=\"x", &mut imgs), "<img src=\"x");
        assert!(imgs.is_empty());
    }
}
