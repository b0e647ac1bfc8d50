//! Arbitrary text as every spec a user types on the command line or in a config field (rename
//! rules, drop globs, init and token lists, devices, hub references, projector, template, part
//! and dtype names): parsed or refused by name, never a panic; what parses applies or is refused.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shardsmith_converters_fuzz::cli_specs(data));
