//! Arbitrary text as a `train --config` YAML, with and without a `--set` override: Ok or a named
//! error (unknown key, bad value), never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shardsmith_converters_fuzz::train_config(data));
