use super::read::LEGACY_MAGIC;
use super::write::{ordered_entries, write_with};
use super::zip::ZipLayout;
use super::{
    encoded_len, read_checkpoint, read_mapped, read_mapped_tensor, write_file, write_to, Skipped, TorchState,
    FORMAT,
};
use crate::checkpoint::{ByteSource, Flavour, TensorEntry, TensorMap};
use crate::error::{Error, Result};
use crate::formats::pickle::build::P;
use crate::formats::pickle::{self, Value};
use crate::DType;
use memmap2::Mmap;
use proptest::prelude::*;
use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

fn origin() -> Arc<Path> {
    Arc::from(Path::new("t.pt"))
}

fn mmap_of(bytes: &[u8]) -> Arc<Mmap> {
    let mut m = memmap2::MmapMut::map_anon(bytes.len().max(1)).unwrap();
    m[..bytes.len()].copy_from_slice(bytes);
    Arc::new(m.make_read_only().unwrap())
}

fn read_bytes(bytes: &[u8]) -> Result<TorchState> {
    read_mapped(mmap_of(bytes), 0, bytes.len(), origin())
}

fn entry(dtype: DType, shape: Vec<usize>, seed: u8) -> TensorEntry {
    let n = shape.iter().product::<usize>() * dtype.size();
    let bytes: Vec<u8> = (0..n).map(|i| (i as u8).wrapping_mul(37).wrapping_add(seed)).collect();
    TensorEntry::new(dtype, shape, ByteSource::owned(bytes), origin())
}

fn write_vec(state: &TorchState) -> Vec<u8> {
    let mut cur = Cursor::new(Vec::new());
    let n = write_to(state, &mut cur, "archive").unwrap();
    assert_eq!(n, cur.get_ref().len() as u64);
    cur.into_inner()
}

/// A stored zip of arbitrary records, laid out by the writer's own layout code.
fn zip_of(records: &[(&str, &[u8])]) -> Vec<u8> {
    let layout = ZipLayout::new(records.iter().map(|(n, b)| (*n, b.len() as u64)), false);
    let mut out = Vec::new();
    let mut crcs = Vec::new();
    for ((_, bytes), e) in records.iter().zip(&layout.entries) {
        let mut crc = flate2::Crc::new();
        crc.update(bytes);
        out.extend(e.local_header(crc.sum()));
        out.extend_from_slice(bytes);
        crcs.push(crc.sum());
    }
    for (e, crc) in layout.entries.iter().zip(crcs) {
        out.extend(e.central_header(crc));
    }
    out.extend(layout.end_records());
    assert_eq!(out.len() as u64, layout.total);
    out
}

/// `_rebuild_tensor_v2` of storage `key` (class of `dtype`, `numel` elements).
fn view(dtype: DType, key: &str, numel: i64, offset: i64, size: &[i64], stride: &[i64]) -> Value {
    let ints = |v: &[i64]| Value::Tuple(v.iter().map(|&i| Value::Int(i)).collect());
    Value::call(
        Value::global("torch._utils", "_rebuild_tensor_v2"),
        vec![
            Value::PersistentId(Box::new(Value::Tuple(vec![
                Value::Str("storage".into()),
                Value::global("torch", dtype.torch_storage()),
                Value::Str(key.into()),
                Value::Str("cpu".into()),
                Value::Int(numel),
            ]))),
            Value::Int(offset),
            ints(size),
            ints(stride),
            Value::Bool(false),
            Value::Dict(Vec::new()),
        ],
    )
}

fn pkl(entries: Vec<(&str, Value)>) -> Vec<u8> {
    let dict = Value::Dict(entries.into_iter().map(|(k, v)| (Value::Str(k.into()), v)).collect());
    pickle::dump(&dict, Path::new("x")).unwrap()
}

fn f32_bytes(v: impl IntoIterator<Item = f32>) -> Vec<u8> {
    v.into_iter().flat_map(f32::to_le_bytes).collect()
}

#[test]
fn shared_storage_offsets_and_transposed_views() {
    let data = f32_bytes((0..12).map(|i| i as f32));
    let pickle = pkl(vec![
        ("a", view(DType::F32, "0", 12, 0, &[3, 4], &[4, 1])),
        ("b", view(DType::F32, "0", 12, 4, &[4], &[1])),
        ("t", view(DType::F32, "0", 12, 0, &[4, 3], &[1, 4])),
        ("s", view(DType::F32, "0", 12, 11, &[], &[])),
        ("e", view(DType::F32, "0", 12, 12, &[0, 5], &[5, 1])),
    ]);
    let zip = zip_of(&[("m/data.pkl", &pickle), ("m/data/0", &data), ("m/version", b"3\n")]);
    let state = read_bytes(&zip).unwrap();
    let got = |k: &str| state.tensors[k].bytes(k).unwrap().into_owned();
    assert_eq!(got("a"), data);
    assert_eq!(got("b"), f32_bytes([4.0, 5.0, 6.0, 7.0]));
    assert_eq!(got("t"), f32_bytes([0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11].map(|i| i as f32)));
    assert_eq!(got("s"), f32_bytes([11.0]));
    assert!(got("e").is_empty());
    assert!(matches!(state.tensors["b"].source, ByteSource::Mapped { .. }), "contiguous views are zero-copy");

    // Written back: a and b overlap in the mapping and share one storage; t is its own.
    let out = write_vec(&state);
    let mut z = zip::ZipArchive::new(Cursor::new(&out)).unwrap();
    let storages =
        z.file_names().filter(|n| n.as_ref().is_ok_and(|n| n.starts_with("archive/data/"))).count();
    assert_eq!(storages, 3, "a+b+s (s lies inside a), t, and the empty e");
    z.validate_header_consistency().unwrap();
    let back = read_bytes(&out).unwrap();
    for k in ["a", "b", "t", "s", "e"] {
        assert_eq!(back.tensors[k].bytes(k).unwrap(), state.tensors[k].bytes(k).unwrap(), "{k}");
        assert_eq!(back.tensors[k].shape, state.tensors[k].shape);
    }
}

#[test]
fn identical_mapped_tensors_are_written_once() {
    let data = f32_bytes((0..8).map(|i| i as f32));
    let map = mmap_of(&data);
    let mut tensors = TensorMap::new();
    for (name, offset, len) in [("embed", 0, 32), ("lm_head", 0, 32), ("tail", 16, 16)] {
        let shape = vec![len / 4];
        tensors.insert(
            name.into(),
            TensorEntry::new(DType::F32, shape, ByteSource::mapped(map.clone(), offset, len), origin()),
        );
    }
    let state = TorchState::new(tensors, vec![]);
    let out = write_vec(&state);
    let z = zip::ZipArchive::new(Cursor::new(&out)).unwrap();
    assert_eq!(z.file_names().filter(|n| n.as_ref().is_ok_and(|n| n.contains("/data/"))).count(), 1);
    let back = read_bytes(&out).unwrap();
    assert_eq!(back.tensors["tail"].bytes("tail").unwrap(), &data[16..]);
    assert_eq!(back.tensors["lm_head"].bytes("lm_head").unwrap(), &data[..]);
}

#[test]
fn arc_clones_of_owned_and_derived_sources_are_written_once() {
    let owned = entry(DType::BF16, vec![4, 2], 9);
    let cast = owned.cast("w", DType::F32).unwrap();
    let mut tensors = TensorMap::new();
    for (name, e) in [("a", &owned), ("b", &owned), ("c", &cast), ("d", &cast)] {
        tensors.insert(name.into(), e.clone());
    }
    let out = write_vec(&TorchState::new(tensors.clone(), vec![]));
    let z = zip::ZipArchive::new(Cursor::new(&out)).unwrap();
    assert_eq!(z.file_names().filter(|n| n.as_ref().is_ok_and(|n| n.contains("/data/"))).count(), 2);
    let back = read_bytes(&out).unwrap();
    for (k, t) in &tensors {
        assert_eq!(back.tensors[k].bytes(k).unwrap(), t.bytes(k).unwrap(), "{k}");
    }
}

#[test]
fn records_follow_torch_order_and_alignment() {
    let mut tensors = TensorMap::new();
    tensors.insert("w".into(), entry(DType::BF16, vec![3, 5], 1));
    tensors.insert("b".into(), entry(DType::I64, vec![7], 2));
    let out = write_vec(&TorchState::new(tensors, vec![]));
    let mut z = zip::ZipArchive::new(Cursor::new(&out)).unwrap();
    let names: Vec<String> = z.file_names().map(|n| n.unwrap().into_owned()).collect();
    assert_eq!(
        names,
        ["archive/data.pkl", "archive/byteorder", "archive/data/0", "archive/data/1", "archive/version"]
    );
    for i in 0..z.len() {
        let f = z.by_index_raw(i).unwrap();
        assert_eq!(f.data_start().unwrap() % 64, 0, "{}", f.name().unwrap());
    }
}

#[test]
fn forced_zip64_is_readable() {
    let mut tensors = TensorMap::new();
    tensors.insert("w".into(), entry(DType::F16, vec![4, 4], 3));
    let state = TorchState::new(tensors, vec!["w_extra._extra_state".into()]);
    let mut cur = Cursor::new(Vec::new());
    let n = write_with(&state, &mut cur, "archive", Path::new("x"), true).unwrap();
    let out = cur.into_inner();
    assert_eq!(n as usize, out.len());
    assert!(out.windows(4).any(|w| w == b"PK\x06\x06"), "zip64 end record present");
    let back = read_bytes(&out).unwrap();
    assert_eq!(back.tensors["w"].bytes("w").unwrap(), state.tensors["w"].bytes("w").unwrap());
    assert_eq!(back.none_keys, state.none_keys);
}

#[test]
fn none_keys_sit_where_torch_puts_extra_state() {
    let mut tensors = TensorMap::new();
    for k in ["m.qkv.weight", "m.qkv.bias", "m.proj.weight", "m.core.inner.weight"] {
        tensors.insert(k.into(), entry(DType::F32, vec![1], 0));
    }
    let none = ["m.core._extra_state", "m.qkv._extra_state", "top", "m.proj._extra_state"];
    let state = TorchState::new(tensors, none.iter().map(|s| s.to_string()).collect());
    let order: Vec<&str> =
        ordered_entries(&state, Path::new("x")).unwrap().into_iter().map(|(k, _)| k).collect();
    assert_eq!(
        order,
        [
            "m.qkv.weight",
            "m.qkv.bias",
            "m.qkv._extra_state",
            "m.proj.weight",
            "m.proj._extra_state",
            "m.core._extra_state",
            "m.core.inner.weight",
            "top"
        ]
    );
    let back = read_bytes(&write_vec(&state)).unwrap();
    assert_eq!(back.none_keys, ["m.qkv._extra_state", "m.proj._extra_state", "m.core._extra_state", "top"]);
    let dup = TorchState::new(state.tensors.clone(), vec!["m.qkv.bias".into()]);
    assert!(matches!(encoded_len(&dup, "a"), Err(Error::Invalid { .. })));
}

#[test]
fn non_tensor_values_are_skipped_and_extra_state_is_kept_as_none() {
    let bytes_io = Value::Object {
        class: Box::new(Value::global("_io", "BytesIO")),
        args: Box::new(Value::Tuple(vec![])),
        kwargs: None,
        state: Some(Box::new(Value::Tuple(vec![Value::Bytes(vec![1, 2]), Value::Int(0), Value::None]))),
    };
    let pickle = pkl(vec![
        ("w", view(DType::U8, "0", 2, 0, &[2], &[1])),
        ("x._extra_state", bytes_io),
        ("step", Value::Int(7)),
        ("name", Value::Str("llama".into())),
    ]);
    let zip = zip_of(&[("m/data.pkl", &pickle), ("m/data/0", &[9, 8]), ("m/.data/version", b"6\n")]);
    let state = read_bytes(&zip).unwrap();
    assert_eq!(state.tensors.len(), 1);
    assert_eq!(state.none_keys, ["x._extra_state"]);
    assert_eq!(
        state.skipped,
        [
            Skipped { key: "step".into(), what: "int 7".into() },
            Skipped { key: "name".into(), what: "str \"llama\"".into() }
        ]
    );
}

#[test]
fn lightning_state_dict_is_flattened() {
    let inner = Value::Dict(vec![(Value::Str("layer.w".into()), view(DType::I8, "0", 3, 0, &[3], &[1]))]);
    let pickle = pkl(vec![("epoch", Value::Int(1)), ("state_dict", inner)]);
    let zip = zip_of(&[("ckpt/data.pkl", &pickle), ("ckpt/data/0", &[1, 2, 3]), ("ckpt/version", b"3\n")]);
    let state = read_bytes(&zip).unwrap();
    assert_eq!(state.tensors.keys().collect::<Vec<_>>(), ["layer.w"]);
    assert_eq!(state.skipped, [Skipped { key: "epoch".into(), what: "int 1".into() }]);
}

#[test]
fn big_endian_files_are_swapped_lazily() {
    let data: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|f| f.to_be_bytes()).collect();
    let pickle = pkl(vec![("w", view(DType::F32, "0", 2, 0, &[2], &[1]))]);
    let zip = zip_of(&[
        ("m/data.pkl", &pickle),
        ("m/byteorder", b"big"),
        ("m/data/0", &data),
        ("m/version", b"3\n"),
    ]);
    let state = read_bytes(&zip).unwrap();
    assert_eq!(state.tensors["w"].bytes("w").unwrap(), f32_bytes([1.5, -2.0]));
}

#[test]
fn bare_tensor_files_read_like_state_dict_entries() {
    // `torch.save(t.T)` of a [2, 3] f32 written big-endian, behind 5 bytes of other data (as a
    // chunk sits inside a `.distcp` file).
    let data: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_be_bytes()).collect();
    let pickle = pickle::dump(&view(DType::F32, "0", 6, 0, &[3, 2], &[1, 3]), Path::new("x")).unwrap();
    let zip = zip_of(&[
        ("c/data.pkl", &pickle),
        ("c/byteorder", b"big"),
        ("c/data/0", &data),
        ("c/version", b"3\n"),
    ]);
    let file = [&b"junk!"[..], &zip].concat();
    let t = read_mapped_tensor(mmap_of(&file), 5, zip.len(), origin()).unwrap();
    assert_eq!((t.dtype, &t.shape), (DType::F32, &vec![3, 2]));
    assert!(matches!(t.source, ByteSource::Derived(_)), "strided and big-endian: gathered lazily");
    assert_eq!(t.bytes("t").unwrap(), f32_bytes([0, 3, 1, 4, 2, 5].map(|i| i as f32)));

    // A contiguous little-endian one is a range of the mapping.
    let pickle = pickle::dump(&view(DType::F32, "0", 6, 2, &[4], &[1]), Path::new("x")).unwrap();
    let data = f32_bytes((0..6).map(|i| i as f32));
    let zip = zip_of(&[("c/data.pkl", &pickle), ("c/data/0", &data), ("c/version", b"3\n")]);
    let t = read_mapped_tensor(mmap_of(&zip), 0, zip.len(), origin()).unwrap();
    assert!(matches!(t.source, ByteSource::Mapped { .. }));
    assert_eq!(t.bytes("t").unwrap(), f32_bytes([2.0, 3.0, 4.0, 5.0]));

    // A state dict is not a bare tensor, and the storage checks of state dicts apply.
    let dict = pkl(vec![("w", view(DType::F32, "0", 6, 0, &[6], &[1]))]);
    let zip = zip_of(&[("c/data.pkl", &dict), ("c/data/0", &data), ("c/version", b"3\n")]);
    let err = read_mapped_tensor(mmap_of(&zip), 0, zip.len(), origin()).unwrap_err();
    assert!(err.to_string().contains("top-level object is a dict"), "{err}");
    let past = pickle::dump(&view(DType::F32, "0", 6, 4, &[3], &[1]), Path::new("x")).unwrap();
    let zip = zip_of(&[("c/data.pkl", &past), ("c/data/0", &data), ("c/version", b"3\n")]);
    let err = read_mapped_tensor(mmap_of(&zip), 0, zip.len(), origin()).unwrap_err();
    assert!(err.to_string().contains("reaches past storage"), "{err}");
}

#[test]
fn hostile_and_broken_archives_are_named_errors() {
    // A data.pkl that calls os.system.
    let evil = P::new().global("os", "system").str("echo pwned").raw(b"\x85R").stop();
    let zip = zip_of(&[("m/data.pkl", &evil), ("m/version", b"3\n")]);
    match read_bytes(&zip) {
        Err(Error::ForbiddenGlobal { module, name, .. }) => {
            assert_eq!((module.as_str(), name.as_str()), ("os", "system"))
        }
        other => panic!("expected ForbiddenGlobal, got {other:?}"),
    }

    // Storage record missing.
    let pickle = pkl(vec![("w", view(DType::F32, "7", 4, 0, &[4], &[1]))]);
    let zip = zip_of(&[("m/data.pkl", &pickle), ("m/version", b"3\n")]);
    let err = read_bytes(&zip).unwrap_err();
    assert!(
        matches!(&err, Error::Missing { what, .. } if what.contains("m/data/7") && what.contains("'w'")),
        "{err}"
    );

    // View beyond its storage, and storage beyond its record.
    let data = f32_bytes([0.0; 4]);
    for (v, needle) in [
        (view(DType::F32, "0", 4, 2, &[3], &[1]), "reaches past storage"),
        (view(DType::F32, "0", 4, 0, &[2, 2], &[1, 3]), "reaches past storage"),
        (view(DType::F32, "0", 5, 0, &[4], &[1]), "holds 16 bytes"),
    ] {
        let pickle = pkl(vec![("w", v)]);
        let zip = zip_of(&[("m/data.pkl", &pickle), ("m/data/0", &data), ("m/version", b"3\n")]);
        let err = read_bytes(&zip).unwrap_err().to_string();
        assert!(err.contains("tensor 'w'") && err.contains(needle), "{err}");
    }

    // Truncated archive.
    let mut tensors = TensorMap::new();
    tensors.insert("w".into(), entry(DType::F32, vec![8], 5));
    let good = write_vec(&TorchState::new(tensors, vec![]));
    for cut in [good.len() - 1, good.len() / 2, 10] {
        let err = read_bytes(&good[..cut]).unwrap_err();
        assert!(matches!(err, Error::Malformed { format: "zip", .. }), "cut {cut}: {err}");
    }

    // Corrupted pickle bytes fail the CRC check.
    let mut bad = good.clone();
    let at = bad.windows(2).position(|w| w == [0x80, 0x02]).unwrap();
    bad[at + 2] ^= 0xff;
    assert!(read_bytes(&bad).unwrap_err().to_string().contains("CRC-32"));

    // A compressed entry (method 8 patched into both headers).
    let mut deflated = good.clone();
    for sig in [&b"PK\x03\x04"[..], b"PK\x01\x02"] {
        let at = deflated.windows(4).position(|w| w == sig).unwrap();
        let method = at + if sig[2] == 3 { 8 } else { 10 };
        deflated[method] = 8;
    }
    let err = read_bytes(&deflated).unwrap_err().to_string();
    assert!(err.contains("compressed") || err.contains("zip"), "{err}");

    // Legacy torch.save and non-zip input.
    let mut legacy = LEGACY_MAGIC.to_vec();
    legacy.extend_from_slice(&[0x50, 0x19, b'.']);
    assert!(matches!(read_bytes(&legacy), Err(Error::LegacyTorchFile { .. })));
    assert!(matches!(read_bytes(b"hello"), Err(Error::Malformed { format: FORMAT, .. })));

    // No version record; TorchScript archive.
    let pickle = pkl(vec![]);
    assert!(matches!(read_bytes(&zip_of(&[("m/data.pkl", &pickle)])), Err(Error::Missing { .. })));
    let ts = zip_of(&[("m/data.pkl", &pickle), ("m/constants.pkl", &pickle), ("m/version", b"3\n")]);
    assert!(read_bytes(&ts).unwrap_err().to_string().contains("TorchScript"));
}

#[test]
fn write_file_names_the_archive_after_the_stem() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("model_weights.ckpt");
    let mut tensors = TensorMap::new();
    tensors.insert("w".into(), entry(DType::BF16, vec![2, 3], 4));
    write_file(&TorchState::new(tensors.clone(), vec![]), &dest, false).unwrap();
    let mut z = zip::ZipArchive::new(std::fs::File::open(&dest).unwrap()).unwrap();
    assert_eq!(z.by_index(0).unwrap().name().unwrap(), "model_weights/data.pkl");
    let ckpt = read_checkpoint(&dest).unwrap();
    assert_eq!(ckpt.meta.flavour, Flavour::TorchZip);
    assert_eq!(ckpt.tensors().unwrap()["w"].bytes("w").unwrap(), tensors["w"].bytes("w").unwrap());
    assert!(matches!(write_file(&TorchState::default(), &dest, false), Err(Error::OutputExists { .. })));
}

fn dtype() -> impl Strategy<Value = DType> {
    prop::sample::select(DType::ALL.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    // read ∘ write = id for every dtype, scalars and empty tensors included; the written
    // length is what encoded_len predicted, also when the image starts mid-stream.
    #[test]
    fn write_then_read_is_identity(
        specs in prop::collection::vec((dtype(), prop::collection::vec(0usize..4, 0..4), any::<u8>()), 0..8),
        n_none in 0usize..3,
        lead in 0usize..700,
    ) {
        let mut tensors = TensorMap::new();
        for (i, (d, shape, seed)) in specs.into_iter().enumerate() {
            tensors.insert(format!("layer.{i}.weight"), entry(d, shape, seed));
        }
        let none: Vec<String> = (0..n_none).map(|j| format!("layer.{}._extra_state", j * 3)).collect();
        let state = TorchState::new(tensors, none);
        let predicted = encoded_len(&state, "archive").unwrap();
        let mut cur = Cursor::new(vec![0xAA; lead]);
        cur.set_position(lead as u64);
        let written = write_to(&state, &mut cur, "archive").unwrap();
        let buf = cur.into_inner();
        prop_assert_eq!(written, predicted);
        prop_assert_eq!(buf.len() as u64, lead as u64 + written);
        let back = read_mapped(mmap_of(&buf), lead, written as usize, origin()).unwrap();
        prop_assert_eq!(back.tensors.keys().collect::<Vec<_>>(), state.tensors.keys().collect::<Vec<_>>());
        for (name, t) in &state.tensors {
            let b = &back.tensors[name];
            prop_assert_eq!(b.dtype, t.dtype);
            prop_assert_eq!(&b.shape, &t.shape);
            prop_assert_eq!(b.bytes(name).unwrap(), t.bytes(name).unwrap());
        }
        prop_assert_eq!(&back.none_keys, &state.none_keys);
        prop_assert!(back.skipped.is_empty());
    }

    #[test]
    fn corrupted_archives_never_panic(at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut tensors = TensorMap::new();
        tensors.insert("a".into(), entry(DType::F32, vec![2, 3], 1));
        tensors.insert("b".into(), entry(DType::I64, vec![], 2));
        let mut buf = write_vec(&TorchState::new(tensors, vec!["c._extra_state".into()]));
        let i = at.index(buf.len());
        buf[i] = byte;
        if let Ok(state) = read_bytes(&buf) {
            for (name, t) in &state.tensors {
                let _ = t.bytes(name);
            }
        }
    }
}

#[test]
fn expanded_views_too_large_to_allocate_are_named_errors() {
    // A stride-0 (expand) view of one byte declaring 2^60 elements: readable, never allocatable.
    let pickle = pkl(vec![("w", view(DType::U8, "0", 1, 0, &[1 << 40, 1 << 20], &[0, 0]))]);
    let zip = zip_of(&[("m/data.pkl", &pickle), ("m/data/0", &[5]), ("m/version", b"3\n")]);
    let state = read_bytes(&zip).unwrap();
    let err = state.tensors["w"].bytes("w").unwrap_err().to_string();
    assert!(err.contains("tensor 'w'") && err.contains("cannot be allocated"), "{err}");
}
