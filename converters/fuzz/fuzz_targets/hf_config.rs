//! Arbitrary text as an HF `config.json`: LLaMA's hyper-parameters and a CLIP tower's config are
//! read or refused by name, never a panic; hyper-parameters that validate write back to a
//! config.json and a model_config.yaml that read back to themselves.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shardsmith_converters_fuzz::hf_config(data));
