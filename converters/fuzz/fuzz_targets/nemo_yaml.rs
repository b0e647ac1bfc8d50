//! Arbitrary text as a `.nemo`'s `model_config.yaml`: parsed or refused by name, with the LLaMA
//! hyper-parameters and NeVA's conversion record in it; the line editor's scalar edits either
//! land exactly (text and parsed view agree) or are refused with nothing changed.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shardsmith_converters_fuzz::nemo_yaml(data));
