//! Bytes as a run's metrics log reopened for a resume: kept as whole lines up to the step or
//! refused by name with the file untouched, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shardsmith_converters_fuzz::metrics_log(data));
