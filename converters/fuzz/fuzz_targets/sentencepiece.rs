//! Arbitrary bytes as a SentencePiece `ModelProto` (a `.nemo`'s `tokenizer.model` artifact):
//! parsing and counting return Ok or a named error, never panic; an accepted model takes NeVA's
//! `<extra_id_*>` pieces (unless it has one already) and gives back exactly its own bytes when
//! they are removed again.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shardsmith_converters_fuzz::sentencepiece(data));
