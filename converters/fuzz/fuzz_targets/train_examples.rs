//! Arbitrary text as `.jsonl` training records, each made a sample under LLaVA's and NeMo's
//! flavours of every template: a sample or a named bad-record reason, never a panic; a sample
//! has as many labels as ids, at most the context length, labels that are their own id or
//! ignored, and its image spans inside the ids, ignored.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    shardsmith_converters_fuzz::train_examples(data);
});
