//! Arbitrary text as training records, both LLaVA's JSON array and NeMo's `.jsonl`: a file-level
//! error or one verdict per record (parsed, or a bad record naming why), never a panic; a
//! `.jsonl` verdict per non-empty line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardsmith::train::data::{parse_json_array, parse_jsonl};
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let records = parse_jsonl(text);
    assert_eq!(records.len(), text.lines().filter(|l| !l.trim().is_empty()).count());
    let _ = parse_json_array(text, Path::new("fuzz.json"));
});
