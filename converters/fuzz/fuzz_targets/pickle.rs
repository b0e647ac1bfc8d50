//! Arbitrary bytes as a pickle under torch's allow-list: decoding must return Ok or a named error,
//! never panic, hang or blow memory. Whatever decodes must encode again (unless it holds an
//! object with keyword arguments, which protocol 2 cannot express), and decode back to the same
//! value.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shardsmith_converters_fuzz::pickle(data));
