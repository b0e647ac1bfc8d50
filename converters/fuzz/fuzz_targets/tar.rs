//! Arbitrary bytes as a `.nemo` tar: listing members and reading the checkpoint must return Ok or
//! a named error, never panic, hang or blow memory; every tensor and artifact of an accepted
//! checkpoint yields its bytes or a named error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardsmith_converters::formats::nemo::{list_members, read_tar_bytes};
use std::path::Path;

/// See the `torch_zip` target: huge lazily assembled tensors are legitimate, so not pulled.
const MAX_PULL: usize = 64 << 20;

fuzz_target!(|data: &[u8]| {
    if let Ok(members) = list_members(data, Path::new("fuzz")) {
        for m in &members {
            assert!(m.offset.checked_add(m.len).is_some_and(|end| end <= data.len()), "{m:?}");
        }
    }
    let Ok(ckpt) = read_tar_bytes(data) else { return };
    for shard in &ckpt.shards {
        for (name, t) in &shard.tensors {
            if t.nbytes() <= MAX_PULL {
                if let Ok(bytes) = t.bytes(name) {
                    assert_eq!(bytes.len(), t.nbytes(), "tensor '{name}'");
                }
            }
        }
    }
    for a in &ckpt.meta.artifacts {
        let _ = a.source.bytes();
    }
});
