//! Arbitrary bytes as the `tokenizer.model` that `generate`, `evaluate` and `train` tokenise
//! with (the core's SentencePiece reader, not the converters' piece editor): reading returns Ok
//! or a named error; an accepted tokenizer encodes and decodes text, and streams it the same as
//! it decodes it, without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardsmith::infer::tokenizer::Tokenizer;

fuzz_target!(|data: &[u8]| {
    let Ok(tok) = Tokenizer::from_sentencepiece_bytes(data, "fuzz.model") else { return };
    for text in ["", "Hello world", "  two  spaces", "Ünïcödé 日本\n"] {
        let Ok(ids) = tok.encode(text, false) else { continue };
        let Ok(decoded) = tok.decode(&ids, true) else { continue };
        let mut stream = tok.stream(true);
        let mut streamed = String::new();
        for &id in &ids {
            streamed.push_str(&stream.next_token(id).expect("decoded above"));
        }
        streamed.push_str(&stream.finish().expect("decoded above"));
        assert_eq!(streamed, decoded, "streaming {text:?}");
    }
});
