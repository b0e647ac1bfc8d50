//! Arbitrary bytes as a PyTorch zip checkpoint: reading must return Ok or a named error, never
//! panic, hang or blow memory. Every tensor it accepts yields exactly dtype × shape bytes or a
//! named error, and an accepted state writes back to an archive of the predicted length that
//! reads back to the same tensors.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shardsmith_converters_fuzz::torch_zip(data));
