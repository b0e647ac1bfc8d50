//! Arbitrary bytes as a `.nemo` tar: listing members and reading the checkpoint must return Ok or
//! a named error, never panic, hang or blow memory; every tensor and artifact of an accepted
//! checkpoint yields its bytes or a named error.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shardsmith_converters_fuzz::tar(data));
