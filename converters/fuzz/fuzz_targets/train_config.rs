//! Arbitrary text as a `train --config` YAML, with and without a `--set` override: Ok or a named
//! error (unknown key, bad value), never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardsmith::train::config::TrainConfig;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (origin, base) = (Path::new("fuzz.yaml"), Path::new("."));
    let _ = TrainConfig::parse(text, origin, base, &[]);
    let _ = TrainConfig::parse(text, origin, base, &["trainer.max_steps=3".to_string()]);
});
