//! Arbitrary bytes as the `tokenizer.model` that `generate`, `evaluate` and `train` tokenise
//! with (the core's SentencePiece reader, not the converters' piece editor): reading returns Ok
//! or a named error; an accepted tokenizer encodes and decodes text, and streams it the same as
//! it decodes it, without panicking.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shardsmith_converters_fuzz::tokenizer_model(data));
