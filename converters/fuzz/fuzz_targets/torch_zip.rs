//! Arbitrary bytes as a PyTorch zip checkpoint: reading must return Ok or a named error, never
//! panic, hang or blow memory. Every tensor it accepts yields exactly dtype × shape bytes or a
//! named error, and an accepted state writes back to an archive of the predicted length that
//! reads back to the same tensors.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardsmith_converters::formats::torch_zip::{encoded_len, read_mapped, write_to};
use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

/// A stride-0 view (`expand`) of a tiny storage is a legitimate tensor of any size; pulling one
/// larger than this is left out, since materialising it is what the user asked for, not a bug.
const MAX_PULL: usize = 64 << 20;

fuzz_target!(|data: &[u8]| {
    let map = anon_map(data);
    let Ok(state) = read_mapped(map, 0, data.len(), Arc::from(Path::new("fuzz"))) else { return };
    let mut all_ok = true;
    for (name, t) in &state.tensors {
        if t.nbytes() > MAX_PULL {
            all_ok = false;
            continue;
        }
        match t.bytes(name) {
            Ok(bytes) => assert_eq!(bytes.len(), t.nbytes(), "tensor '{name}'"),
            Err(_) => all_ok = false,
        }
    }
    if !all_ok {
        return;
    }
    let predicted = encoded_len(&state, "fuzz").expect("a state read from a file has a layout");
    let mut out = Cursor::new(Vec::new());
    let written = write_to(&state, &mut out, "fuzz").expect("a readable state writes");
    assert_eq!(written, predicted);
    let out = out.into_inner();
    let back = read_mapped(anon_map(&out), 0, out.len(), Arc::from(Path::new("fuzz-back")))
        .expect("our own archive reads");
    assert_eq!(back.tensors.len(), state.tensors.len());
    for ((name, t), (name2, b)) in state.tensors.iter().zip(&back.tensors) {
        assert_eq!(name, name2);
        assert_eq!((t.dtype, &t.shape), (b.dtype, &b.shape), "tensor '{name}'");
        assert_eq!(t.bytes(name).unwrap(), b.bytes(name).unwrap(), "tensor '{name}'");
    }
    let (mut none, mut none_back) = (state.none_keys.clone(), back.none_keys.clone());
    none.sort();
    none_back.sort();
    assert_eq!(none, none_back);
});

fn anon_map(data: &[u8]) -> Arc<memmap2::Mmap> {
    let mut map = memmap2::MmapMut::map_anon(data.len().max(1)).expect("anonymous map");
    map[..data.len()].copy_from_slice(data);
    Arc::new(map.make_read_only().expect("read-only"))
}
