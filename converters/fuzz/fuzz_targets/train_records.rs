//! Arbitrary text as training records, both LLaVA's JSON array and NeMo's `.jsonl`: a file-level
//! error or one verdict per record (parsed, or a bad record naming why), never a panic; a
//! `.jsonl` verdict per non-empty line.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shardsmith_converters_fuzz::train_records(data));
