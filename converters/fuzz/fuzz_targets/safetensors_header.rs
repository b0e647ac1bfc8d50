//! Arbitrary bytes as a safetensors file: reading must return Ok or a named error, never panic,
//! and every tensor it accepts must have exactly dtype × shape bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shardsmith_converters_fuzz::safetensors_header(data));
