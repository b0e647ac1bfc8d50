//! Arbitrary bytes as an HF `tokenizer.json` and as each file that lists added tokens: read or
//! refused by name, never a panic; a tokenizer that loads encodes, decodes and streams text alike.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shardsmith_converters_fuzz::tokenizer_json(data));
