//! Arbitrary bytes as an HF `tokenizer.json` and as each file that lists added tokens: read or
//! refused by name, never a panic; a tokenizer that loads encodes, decodes and streams text alike.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // shardsmith turns a panic of the tokenizers crate into an error naming the file (the
    // tokenizer's `guarded`); libfuzzer-sys's panic hook would abort before the unwind gets
    // there, so it is replaced by one that only prints. A panic nothing catches still aborts:
    // libfuzzer-sys aborts when this closure panics.
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| std::panic::set_hook(Box::new(|info| eprintln!("{info}"))));
    shardsmith_converters_fuzz::tokenizer_json(data)
});
