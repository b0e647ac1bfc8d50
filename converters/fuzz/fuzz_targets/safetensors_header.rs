//! Arbitrary bytes as a safetensors file: reading must return Ok or a named error, never panic,
//! and every tensor it accepts must have exactly dtype × shape bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardsmith_converters::formats::safetensors::read_mapped;
use std::path::Path;
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    let mut map = memmap2::MmapMut::map_anon(data.len().max(1)).expect("anonymous map");
    map[..data.len()].copy_from_slice(data);
    let map = Arc::new(map.make_read_only().expect("read-only"));
    if let Ok(tensors) = read_mapped(map, 0, data.len(), Arc::from(Path::new("fuzz"))) {
        for (name, t) in &tensors {
            let bytes = t.bytes(name).expect("accepted tensors have consistent sizes");
            assert_eq!(bytes.len(), t.nbytes());
        }
    }
});
