//! Arbitrary bytes as an image for the vision tower: decoded or refused by name, never a panic;
//! an image that decodes preprocesses under every aspect mode to the tower's input size, finite.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shardsmith_converters_fuzz::image(data));
