use super::*;
use crate::formats::nemo::{read, read_tar_bytes};
use crate::{Checkpoint, DType};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/nemo-dist").join(name)
}

const SHARDED: &str = "llama-mha-torch_dist.nemo";
const PLAIN_BF16: &str = "llama-mha-torch_dist-bf16.nemo";
const QKV: &str = "model.decoder.layers.self_attention.linear_qkv.weight";

fn chunk(offsets: &[usize], sizes: &[usize]) -> ChunkMeta {
    ChunkMeta { offsets: offsets.to_vec(), sizes: sizes.to_vec() }
}

/// The whole fixture extracted into `dir`, as NeMo's `model_extracted_dir` would be.
fn extract(name: &str, dir: &Path) -> PathBuf {
    let out = dir.join(name.trim_end_matches(".nemo"));
    let bytes = std::fs::read(fixture(name)).unwrap();
    ::tar::Archive::new(&bytes[..]).unpack(&out).unwrap();
    out
}

fn all_bytes(c: &Checkpoint) -> Vec<(String, Vec<u8>)> {
    c.tensors().unwrap().iter().map(|(k, t)| (k.clone(), t.bytes(k).unwrap().into_owned())).collect()
}

#[test]
fn tiling_accepts_megatron_grids_and_names_gaps_and_overlaps() {
    // [2 layers, 8 rows] in layer × half-row chunks, listed out of order.
    let grid =
        [chunk(&[1, 4], &[1, 4]), chunk(&[0, 0], &[1, 4]), chunk(&[1, 0], &[1, 4]), chunk(&[0, 4], &[1, 4])];
    check_tiling(&[2, 8], &grid).unwrap();
    check_tiling(&[], &[chunk(&[], &[])]).unwrap();
    check_tiling(&[0, 3], &[]).unwrap();
    check_tiling(&[4], &[chunk(&[0], &[4]), chunk(&[2], &[0])]).unwrap(); // empty chunks are harmless

    let gap = check_tiling(&[2, 8], &grid[..3]).unwrap_err();
    assert!(gap.contains("cover 12 of its 16 elements"), "{gap}");
    let overlap = check_tiling(&[8], &[chunk(&[0], &[5]), chunk(&[4], &[4])]).unwrap_err();
    assert!(overlap.contains("overlap"), "{overlap}");
    // A gap and an overlap of equal size still add up to the volume: the overlap is what shows.
    let both =
        check_tiling(&[2, 4], &[chunk(&[0, 0], &[1, 4]), chunk(&[0, 2], &[1, 2]), chunk(&[1, 2], &[1, 2])])
            .unwrap_err();
    assert!(both.contains("overlap"), "{both}");
    let outside = check_tiling(&[2, 4], &[chunk(&[1, 2], &[1, 4])]).unwrap_err();
    assert!(outside.contains("outside the global shape"), "{outside}");
    let huge = check_tiling(&[4], &[chunk(&[usize::MAX], &[2])]).unwrap_err();
    assert!(huge.contains("outside"), "{huge}");
    let rank = check_tiling(&[2, 4], &[chunk(&[0], &[8])]).unwrap_err();
    assert!(rank.contains("2 dimensions"), "{rank}");
    let scalars = check_tiling(&[], &[chunk(&[], &[]), chunk(&[], &[])]).unwrap_err();
    assert!(scalars.contains("scalar"), "{scalars}");
    assert!(check_tiling(&[usize::MAX, 4], &[]).unwrap_err().contains("overflow"));
}

fn u16_piece(values: &[u16], shape: &[usize], offsets: &[usize], sizes: &[usize]) -> Piece {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let origin: Arc<Path> = Arc::from(Path::new("chunk"));
    Piece {
        tensor: TensorEntry::new(DType::I16, shape.to_vec(), ByteSource::owned(bytes), origin),
        offsets: offsets.to_vec(),
        sizes: sizes.to_vec(),
    }
}

#[test]
fn assemble_places_pieces_at_their_offsets() {
    // Global [2, 3] of u16 (element (r, c) = 10r + c) as three pieces, given out of order: row 1
    // stored with an extra leading axis, then the [1, 2] head and [1, 1] tail of row 0.
    let row1 = u16_piece(&[10, 11, 12], &[1, 1, 3], &[1, 0], &[1, 3]);
    let head = u16_piece(&[0, 1], &[2], &[0, 0], &[1, 2]);
    let tail = u16_piece(&[2], &[1, 1], &[0, 2], &[1, 1]);
    let out = assemble(&[2, 3], 2, &[row1, head.clone(), tail], Path::new("m"), "t").unwrap();
    let got: Vec<u16> = out.chunks(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
    assert_eq!(got, [0, 1, 2, 10, 11, 12]);

    // A column piece of a [2, 2] tensor: one element per row.
    let col = |c: usize, v: [u16; 2]| u16_piece(&v, &[2, 1], &[0, c], &[2, 1]);
    let out = assemble(&[2, 2], 2, &[col(1, [1, 11]), col(0, [0, 10])], Path::new("m"), "t").unwrap();
    let got: Vec<u16> = out.chunks(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
    assert_eq!(got, [0, 1, 10, 11]);

    // A piece whose bytes do not match its stored shape is an error naming the tensor, not a panic.
    let short =
        Piece { tensor: TensorEntry { source: ByteSource::owned(vec![0u8; 3]), ..head.tensor }, ..head };
    let err = assemble(&[1, 2], 2, &[short], Path::new("m"), "t").unwrap_err();
    assert!(matches!(&err, Error::TensorSize { tensor, .. } if tensor == "t"), "{err}");
}

#[test]
fn allow_list_admits_dcp_metadata_classes_only() {
    let allow = AllowList::DistMetadata;
    for (m, n) in [
        ("torch.distributed.checkpoint.metadata", "Metadata"),
        ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "TensorProperties"),
        ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
        ("torch.distributed.checkpoint.metadata", "StorageMeta"),
        ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.distributed._shard.sharded_tensor.metadata", "TensorProperties"),
        ("torch", "Size"),
        ("torch", "bfloat16"),
        ("torch", "strided"),
        ("torch", "contiguous_format"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
        ("pathlib", "PosixPath"),
    ] {
        assert!(allow.allows(m, n), "{m}.{n}");
    }
    for (m, n) in [
        ("os", "system"),
        ("posix", "system"),
        ("builtins", "eval"),
        ("builtins", "getattr"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch", "load"),
        ("torch.distributed.checkpoint.filesystem", "FileSystemReader"),
        ("pathlib", "Path.unlink"),
        ("_io", "BytesIO"),
    ] {
        assert!(!allow.allows(m, n), "{m}.{n}");
    }
    // Persistent ids have no place in `.metadata`.
    let pid = b"\x80\x04\x8c\x07storage\x85Q.";
    let err = pickle::load(pid, allow, Path::new(".metadata")).unwrap_err().to_string();
    assert!(err.contains("persistent id"), "{err}");
}

#[test]
fn sharded_fixture_has_tp_chunks_assembled_lazily() {
    let c = read(&fixture(SHARDED)).unwrap();
    let t = c.tensors().unwrap();
    assert_eq!(t.len(), 9, "bytes items (_extra_state) are not tensors: {:?}", t.keys());
    let qkv = &t[QKV];
    assert_eq!((qkv.dtype, &qkv.shape), (DType::F32, &vec![2, 192, 64]));
    assert!(matches!(qkv.source, ByteSource::Derived(_)), "4 chunks are assembled on demand");
    assert_eq!(qkv.bytes(QKV).unwrap().len(), 2 * 192 * 64 * 4);
    let norm = "model.decoder.final_layernorm.weight";
    assert!(matches!(t[norm].source, ByteSource::Mapped { .. }), "a one-chunk tensor is a range of the tar");
}

#[test]
fn plain_fixture_is_zero_copy_and_extracted_directory_reads_the_same() {
    let from_tar = read(&fixture(PLAIN_BF16)).unwrap();
    for (name, t) in from_tar.tensors().unwrap() {
        assert_eq!(t.dtype, DType::BF16, "{name}");
        assert!(matches!(t.source, ByteSource::Mapped { .. }), "{name} should be a range of the tar");
    }
    let dir = tempfile::tempdir().unwrap();
    for name in [SHARDED, PLAIN_BF16] {
        let from_tar = read(&fixture(name)).unwrap();
        let extracted = read(&extract(name, dir.path())).unwrap();
        assert!(matches!(extracted.meta.flavour, crate::Flavour::Nemo { extracted: true, .. }));
        assert_eq!(all_bytes(&from_tar), all_bytes(&extracted), "{name}");
    }
}

/// Rewrite one file of an extracted copy of the sharded fixture and return the read error.
fn broken(edit: impl FnOnce(&Path)) -> Error {
    let dir = tempfile::tempdir().unwrap();
    let root = extract(SHARDED, dir.path());
    edit(&root.join("model_weights"));
    match read(&root) {
        Ok(c) => {
            // Problems inside chunk data surface when the bytes are read.
            for (name, t) in c.tensors().unwrap() {
                if let Err(e) = t.bytes(name) {
                    return e;
                }
            }
            panic!("the broken checkpoint read cleanly")
        }
        Err(e) => e,
    }
}

#[test]
fn forbidden_global_in_metadata_is_refused() {
    // `os.system("echo pwned")` as protocol 4 writes it.
    let evil = b"\x80\x04\x95\x26\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c\x06system\x94\x93\x94\x8c\x0aecho pwned\x94\x85\x94R\x94.";
    let err = broken(|w| std::fs::write(w.join(".metadata"), evil).unwrap());
    assert!(
        matches!(&err, Error::ForbiddenGlobal { module, name, .. } if module == "posix" && name == "system"),
        "{err}"
    );
    // The same call deep inside a real Metadata: `StorageMeta.checkpoint_id = PosixPath(...)`
    // turned into `posix.system(...)`. (Frame lengths go stale; they only group opcodes.)
    let err = broken(|w| {
        let meta = std::fs::read(w.join(METADATA)).unwrap();
        let (from, to) =
            (&b"\x8c\x07pathlib\x94\x8c\x09PosixPath"[..], &b"\x8c\x05posix\x94\x8c\x06system"[..]);
        let at = meta.windows(from.len()).position(|x| x == from).expect("the fixture pickles a PosixPath");
        let evil = [&meta[..at], to, &meta[at + from.len()..]].concat();
        std::fs::write(w.join(METADATA), evil).unwrap();
    });
    assert!(matches!(&err, Error::ForbiddenGlobal { module, .. } if module == "posix"), "{err}");
}

#[test]
fn truncated_and_missing_files_are_named() {
    let err = broken(|w| {
        let f = w.join("__0_1.distcp");
        let len = std::fs::metadata(&f).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&f).unwrap().set_len(len - 100).unwrap();
    });
    let msg = err.to_string();
    assert!(matches!(err, Error::Malformed { .. }) && msg.contains("__0_1.distcp"), "{msg}");
    assert!(msg.contains("past the end"), "{msg}");

    let err = broken(|w| std::fs::remove_file(w.join("__0_0.distcp")).unwrap());
    assert!(
        matches!(&err, Error::Missing { what, .. } if what.contains("model_weights/__0_0.distcp")),
        "{err}"
    );

    let err = broken(|w| std::fs::remove_file(w.join(".metadata")).unwrap());
    assert!(matches!(&err, Error::Missing { what, .. } if what.contains(".metadata")), "{err}");

    let err = broken(|w| std::fs::write(w.join(".metadata"), b"\x80\x04N.").unwrap());
    assert!(err.to_string().contains("expected a Metadata object"), "{err}");
}

#[test]
fn corrupt_chunk_bytes_are_named() {
    // The last item of a file is a tensor chunk: break its zip's end-of-central-directory record.
    let err = broken(|w| {
        let f = w.join("__0_1.distcp");
        let mut b = std::fs::read(&f).unwrap();
        let n = b.len();
        b[n - 22..].fill(0);
        std::fs::write(&f, b).unwrap();
    });
    let msg = err.to_string();
    assert!(matches!(err, Error::Malformed { format: "zip", .. }) && msg.contains("__0_1.distcp@"), "{msg}");

    // A chunk whose zip magic is gone.
    let err = broken(|w| {
        let meta = std::fs::read(w.join(METADATA)).unwrap();
        let root = pickle::load(&meta, AllowList::DistMetadata, Path::new(METADATA)).unwrap();
        let index = Index::decode(&root, Path::new(METADATA)).unwrap();
        let at = &index.storage[&(QKV.to_string(), vec![1, 96, 0])];
        let f = w.join(&at.file);
        let mut b = std::fs::read(&f).unwrap();
        b[at.offset..at.offset + 4].copy_from_slice(b"XXXX");
        std::fs::write(&f, b).unwrap();
    });
    assert!(err.to_string().contains("expected a zip local header"), "{err}");
}

/// Mutated archives give an error or a checkpoint whose reads fail cleanly, never a panic.
#[test]
fn mutations_never_panic() {
    let original = std::fs::read(fixture(SHARDED)).unwrap();
    let metadata_at = original.windows(3).position(|w| w == b"\x80\x04\x95").unwrap_or(0);
    assert!(metadata_at > 0, "the fixture's .metadata pickle is where mutations are aimed");
    let mut state = 0x853c_49e6_748f_ea9bu64;
    let mut rand = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for i in 0..200 {
        let mut b = original.clone();
        for _ in 0..(rand() % 6 + 1) {
            // Half of the mutations hit the `.metadata` pickle, the rest anywhere.
            let at = if i % 2 == 0 && metadata_at > 0 {
                metadata_at + (rand() % 7000) as usize
            } else {
                (rand() % b.len() as u64) as usize
            };
            if let Some(x) = b.get_mut(at) {
                *x = rand() as u8;
            }
        }
        if let Ok(c) = read_tar_bytes(&b) {
            for s in &c.shards {
                for (name, t) in &s.tensors {
                    let _ = t.bytes(name);
                }
            }
        }
    }
}
