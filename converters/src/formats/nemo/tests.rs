//! Round trips and failure modes of the `.nemo` reader and writer, on tiny archives built in
//! temporary directories (by the writer, or byte by byte where the writer would refuse).

use super::tar::{dir_header, file_header, padding, trailer};
use super::*;
use crate::checkpoint::{TensorEntry, TensorMap};
use crate::DType;
use std::io::Cursor;

const TOKENIZER: &str = "0123456789abcdef0123456789abcdef_tokenizer.model";

fn yaml(tp: usize, pp: usize) -> String {
    format!(
        "# written by a test\nmcore_gpt: false\nprecision: bf16\ntensor_model_parallel_size: {tp}\n\
         pipeline_model_parallel_size: {pp}\nnum_layers: 2\nseq: ${{model.encoder_seq_length}}\n\
         tokenizer:\n  library: sentencepiece\n  model: nemo:{TOKENIZER}\n  unknown_key: [1, 2]\n"
    )
}

fn entry(dtype: DType, shape: Vec<usize>, seed: u8) -> TensorEntry {
    let n: usize = shape.iter().product::<usize>() * dtype.size();
    let bytes: Vec<u8> = (0..n).map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed)).collect();
    TensorEntry::new(dtype, shape, ByteSource::owned(bytes), Arc::from(Path::new("<test>")))
}

fn tensors(seed: u8) -> TensorMap {
    let mut t = TensorMap::new();
    t.insert("model.embedding.word_embeddings.weight".into(), entry(DType::BF16, vec![8, 4], seed));
    t.insert("model.decoder.final_layernorm.weight".into(), entry(DType::F32, vec![4], seed + 1));
    t.insert("model.step".into(), entry(DType::I64, vec![], seed + 2));
    t
}

fn checkpoint(tp: usize, pp: usize) -> Checkpoint {
    let config = NemoConfig::parse(yaml(tp, pp), Path::new("t.yaml")).unwrap();
    let mut shards = Vec::new();
    for p in 0..pp {
        for t in 0..tp {
            shards.push(Shard::new(Rank { tp: t, pp: p }, tensors((p * tp + t) as u8 * 10)));
        }
    }
    let meta = Meta {
        path: "mem".into(),
        flavour: Flavour::Nemo {
            layout: NemoLayout::for_parallelism(Parallelism { tp, pp }),
            gzip: false,
            extracted: false,
        },
        parallel: Parallelism { tp, pp },
        config: Some(ModelConfig::NemoYaml(config)),
        artifacts: vec![
            Artifact { name: TOKENIZER.into(), source: ByteSource::owned(b"sentencepiece bytes".to_vec()) },
            Artifact {
                name: format!("{}_vocab.json", "v".repeat(120)),
                source: ByteSource::owned(b"{}".to_vec()),
            },
        ],
    };
    Checkpoint { meta, shards }
}

fn config_of(c: &Checkpoint) -> &NemoConfig {
    match &c.meta.config {
        Some(ModelConfig::NemoYaml(y)) => y,
        other => panic!("no nemo config: {other:?}"),
    }
}

fn assert_same(a: &Checkpoint, b: &Checkpoint) {
    assert_eq!(a.meta.parallel, b.meta.parallel);
    assert_eq!(config_of(a).raw, config_of(b).raw);
    let names = |c: &Checkpoint| c.meta.artifacts.iter().map(|x| x.name.clone()).collect::<BTreeSet<_>>();
    assert_eq!(names(a), names(b));
    for art in &a.meta.artifacts {
        let other = b.meta.artifacts.iter().find(|x| x.name == art.name).unwrap();
        assert_eq!(art.source.bytes().unwrap(), other.source.bytes().unwrap(), "{}", art.name);
    }
    assert_eq!(a.shards.len(), b.shards.len());
    for (x, y) in a.shards.iter().zip(&b.shards) {
        assert_eq!(x.rank, y.rank);
        assert_eq!(x.tensors.len(), y.tensors.len());
        for (name, t) in &x.tensors {
            let u = &y.tensors[name.as_str()];
            assert_eq!((t.dtype, &t.shape), (u.dtype, &u.shape), "{name}");
            assert_eq!(t.bytes(name).unwrap(), u.bytes(name).unwrap(), "{name}");
        }
    }
}

/// A tar image from (archive name, data or `None` for a directory), in the given order.
fn tar_of(members: &[(&str, Option<Vec<u8>>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in members {
        match data {
            None => out.extend(dir_header(name)),
            Some(d) => {
                out.extend(file_header(name, d.len() as u64));
                out.extend(d);
                out.resize(out.len() + padding(d.len() as u64), 0);
            }
        }
    }
    let t = trailer(out.len() as u64);
    out.extend(t);
    out
}

fn zip_bytes(seed: u8) -> Vec<u8> {
    let state = torch_zip::TorchState::new(tensors(seed), Vec::new());
    let mut c = Cursor::new(Vec::new());
    torch_zip::write_to(&state, &mut c, "model_weights").unwrap();
    c.into_inner()
}

fn read_bytes(dir: &Path, bytes: &[u8]) -> Result<Checkpoint> {
    let path = dir.join("x.nemo");
    std::fs::write(&path, bytes).unwrap();
    read(&path)
}

#[test]
fn tar_round_trip_for_every_layout() {
    for (tp, pp, layout, first) in [
        (1, 1, NemoLayout::Single, "model_weights.ckpt"),
        (2, 1, NemoLayout::MpRank, "mp_rank_00/model_weights.ckpt"),
        (2, 2, NemoLayout::TpPpRank, "tp_rank_00_pp_rank_000/model_weights.ckpt"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = checkpoint(tp, pp);
        let a = dir.path().join("a.nemo");
        write(&ckpt, &a, &WriteOptions::default()).unwrap();
        let back = read(&a).unwrap();
        assert_eq!(back.meta.flavour, Flavour::Nemo { layout, gzip: false, extracted: false });
        assert_same(&ckpt, &back);
        let names: Vec<String> =
            list_members(&std::fs::read(&a).unwrap(), &a).unwrap().into_iter().map(|m| m.name).collect();
        assert!(names.contains(&first.to_string()), "{names:?}");
        // Writing what was read reproduces the file byte for byte.
        let b = dir.path().join("b.nemo");
        write(&back, &b, &WriteOptions::default()).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap(), "tp={tp} pp={pp}");
        // Shards are ordered by (pp, tp).
        let ranks: Vec<(usize, usize)> = back.shards.iter().map(|s| (s.rank.pp, s.rank.tp)).collect();
        let mut sorted = ranks.clone();
        sorted.sort();
        assert_eq!(ranks, sorted);
    }
}

#[test]
fn gzip_and_extracted_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(2, 1);
    let gz = dir.path().join("g.nemo");
    write(&ckpt, &gz, &WriteOptions { gzip: true, ..Default::default() }).unwrap();
    assert_eq!(&std::fs::read(&gz).unwrap()[..2], GZIP_MAGIC);
    let back = read(&gz).unwrap();
    assert_eq!(back.meta.flavour, Flavour::Nemo { layout: NemoLayout::MpRank, gzip: true, extracted: false });
    assert_same(&ckpt, &back);

    let ex = dir.path().join("extracted");
    write(&back, &ex, &WriteOptions { extracted: true, ..Default::default() }).unwrap();
    assert!(ex.join("mp_rank_01/model_weights.ckpt").is_file());
    assert_eq!(std::fs::read_to_string(ex.join(CONFIG)).unwrap(), yaml(2, 1));
    let back2 = read(&ex).unwrap();
    assert_eq!(
        back2.meta.flavour,
        Flavour::Nemo { layout: NemoLayout::MpRank, gzip: false, extracted: true }
    );
    assert_same(&ckpt, &back2);
    // And back to a plain tar, identical to writing the original directly.
    let t1 = dir.path().join("t1.nemo");
    let t2 = dir.path().join("t2.nemo");
    write(&back2, &t1, &WriteOptions::default()).unwrap();
    write(&ckpt, &t2, &WriteOptions::default()).unwrap();
    assert_eq!(std::fs::read(&t1).unwrap(), std::fs::read(&t2).unwrap());
    assert!(matches!(write(&ckpt, &t1, &WriteOptions::default()), Err(Error::OutputExists { .. })));
    write(&ckpt, &t1, &WriteOptions { overwrite: true, ..Default::default() }).unwrap();
}

#[test]
fn member_order_and_dot_prefix_do_not_matter() {
    let dir = tempfile::tempdir().unwrap();
    // Reverse order, no "./" prefix, no directory entries.
    let bytes = tar_of(&[
        ("mp_rank_01/model_weights.ckpt", Some(zip_bytes(10))),
        (TOKENIZER, Some(b"sp".to_vec())),
        ("mp_rank_00/model_weights.ckpt", Some(zip_bytes(0))),
        ("model_config.yaml", Some(yaml(2, 1).into_bytes())),
    ]);
    let c = read_bytes(dir.path(), &bytes).unwrap();
    assert_eq!(c.meta.parallel, Parallelism { tp: 2, pp: 1 });
    assert_eq!(c.shards[1].rank, Rank { tp: 1, pp: 0 });
    let emb = &c.shards[1].tensors["model.embedding.word_embeddings.weight"];
    assert_eq!(
        emb.bytes("e").unwrap(),
        tensors(10)["model.embedding.word_embeddings.weight"].bytes("e").unwrap()
    );
    assert_eq!(c.meta.artifacts.len(), 1);
    // Tensors of a plain tar are ranges of the mapping: nothing was copied.
    assert!(matches!(c.meta.artifacts[0].source, ByteSource::Mapped { .. }));
}

#[test]
fn unsafe_member_paths_are_refused_and_nothing_is_written() {
    for evil in ["../evil", "/etc/passwd", "./ok/../../evil"] {
        let dir = tempfile::tempdir().unwrap();
        let inner = dir.path().join("inner");
        std::fs::create_dir(&inner).unwrap();
        let bytes = tar_of(&[
            ("./", None),
            ("./model_config.yaml", Some(yaml(1, 1).into_bytes())),
            ("./model_weights.ckpt", Some(zip_bytes(0))),
            (evil, Some(b"pwned".to_vec())),
        ]);
        let err = read_bytes(&inner, &bytes).unwrap_err();
        assert!(matches!(err, Error::UnsafeMemberPath { ref member, .. } if member == evil), "{evil}: {err}");
        assert!(read_tar_bytes(&bytes).is_err());
        // Only the archive we put there exists, in and around the working directory.
        assert_eq!(std::fs::read_dir(&inner).unwrap().count(), 1);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}

#[test]
fn truncated_archive_is_a_named_error() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.nemo");
    write(&checkpoint(1, 1), &a, &WriteOptions::default()).unwrap();
    let bytes = std::fs::read(&a).unwrap();
    let members = list_members(&bytes, &a).unwrap();
    let weights = members.iter().find(|m| m.name == WEIGHTS).unwrap();
    for cut in
        [100, 512, weights.offset + 7, weights.offset + weights.len, weights.offset + weights.len + 512]
    {
        let err = read_bytes(dir.path(), &bytes[..cut]).unwrap_err();
        assert!(matches!(err, Error::Malformed { format: "tar", .. }), "cut {cut}: {err}");
        assert!(err.to_string().contains("x.nemo"), "{err}");
    }
}

#[test]
fn rank_files_must_match_the_yaml() {
    type Members<'a> = Vec<(&'a str, Option<Vec<u8>>)>;
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(String, Members<'_>, &str)> = vec![
        // yaml says tp=2, archive has a single file
        (yaml(2, 1), vec![(WEIGHTS, Some(zip_bytes(0)))], "found 1 rank file(s): model_weights.ckpt"),
        // a rank is missing
        (yaml(2, 1), vec![("mp_rank_00/model_weights.ckpt", Some(zip_bytes(0)))], "found 1 rank file(s)"),
        // right count, wrong names (pp=2 needs tp_rank_XX_pp_rank_YYY)
        (
            yaml(1, 2),
            vec![
                ("mp_rank_00/model_weights.ckpt", Some(zip_bytes(0))),
                ("mp_rank_01/model_weights.ckpt", Some(zip_bytes(0))),
            ],
            "missing tp_rank_00_pp_rank_000/model_weights.ckpt, tp_rank_00_pp_rank_001/model_weights.ckpt",
        ),
        // yaml without the keys means tp=pp=1
        (
            "a: 1\n".into(),
            vec![("mp_rank_00/model_weights.ckpt", Some(zip_bytes(0)))],
            "unexpected mp_rank_00",
        ),
    ];
    for (y, mut files, needle) in cases {
        files.push((CONFIG, Some(y.into_bytes())));
        let err = read_bytes(dir.path(), &tar_of(&files)).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, Error::Invalid { .. }) && msg.contains("NeMo expects") && msg.contains(needle),
            "{msg}"
        );
    }
    let odd = tar_of(&[
        (CONFIG, Some(yaml(2, 1).into_bytes())),
        ("mp_rank_1/model_weights.ckpt", Some(zip_bytes(0))),
    ]);
    let msg = read_bytes(dir.path(), &odd).unwrap_err().to_string();
    assert!(msg.contains("'mp_rank_1/model_weights.ckpt'") && msg.contains("zero-padded"), "{msg}");
}

#[test]
fn missing_config_weights_and_nemo2_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = read_bytes(dir.path(), &tar_of(&[(WEIGHTS, Some(zip_bytes(0)))])).unwrap_err();
    assert!(matches!(err, Error::Missing { ref what, .. } if what.contains(CONFIG)), "{err}");
    let err = read_bytes(dir.path(), &tar_of(&[(CONFIG, Some(yaml(1, 1).into_bytes()))])).unwrap_err();
    assert!(matches!(err, Error::Missing { ref what, .. } if what.contains("weights")), "{err}");
    let nemo2 =
        tar_of(&[("./context/model.yaml", Some(b"x: 1".to_vec())), ("./weights/common.pt", Some(vec![]))]);
    let msg = read_bytes(dir.path(), &nemo2).unwrap_err().to_string();
    assert!(msg.contains("NeMo 2.x"), "{msg}");
    let ex = dir.path().join("ex");
    std::fs::create_dir(&ex).unwrap();
    assert!(matches!(read(&ex), Err(Error::Missing { .. })));
}

#[test]
fn artifacts_resolve_by_nemo_prefix_or_basename() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.nemo");
    write(&checkpoint(1, 1), &a, &WriteOptions::default()).unwrap();
    let c = read(&a).unwrap();
    let value = config_of(&c).get_str("tokenizer.model").unwrap().to_string();
    assert_eq!(resolve_artifact(&c, &value).unwrap().name, TOKENIZER);
    assert_eq!(resolve_artifact(&c, &format!("/old/abs/path/{TOKENIZER}")).unwrap().name, TOKENIZER);
    assert_eq!(resolve_artifact(&c, &format!("/artifacts/{TOKENIZER}")).unwrap().name, TOKENIZER);
    assert!(resolve_artifact(&c, "nemo:nope.model").is_none());
    assert!(resolve_artifact(&c, "nemo:").is_none());
    assert!(resolve_artifact(&c, "dir/").is_none());
}

#[test]
fn writer_refuses_inconsistent_checkpoints_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("out.nemo");
    let opts = WriteOptions::default();

    let mut c = checkpoint(2, 1);
    if let Some(ModelConfig::NemoYaml(y)) = &mut c.meta.config {
        y.set_scalar("tensor_model_parallel_size", 4u64).unwrap();
    }
    let msg = write(&c, &dest, &opts).unwrap_err().to_string();
    assert!(msg.contains("tensor_model_parallel_size=4") && msg.contains("tp=2"), "{msg}");

    let c = checkpoint(2, 1);
    let msg = write(&c, &dest, &WriteOptions { layout: Some(NemoLayout::TpPpRank), ..Default::default() })
        .unwrap_err()
        .to_string();
    assert!(msg.contains("NeMo opens MpRank"), "{msg}");
    assert!(write(&c, &dest, &WriteOptions { layout: Some(NemoLayout::Distributed), ..Default::default() })
        .is_err());

    let mut c = checkpoint(1, 1);
    c.meta.artifacts.push(Artifact { name: "../x".into(), source: ByteSource::owned(vec![1u8]) });
    assert!(matches!(write(&c, &dest, &opts), Err(Error::UnsafeMemberPath { .. })));
    let mut c = checkpoint(1, 1);
    c.meta.artifacts.push(Artifact { name: CONFIG.into(), source: ByteSource::owned(vec![1u8]) });
    assert!(write(&c, &dest, &opts).unwrap_err().to_string().contains("collide"));

    let mut c = checkpoint(2, 1);
    c.shards.pop();
    assert!(write(&c, &dest, &opts).unwrap_err().to_string().contains("holds ranks"));
    let mut c = checkpoint(1, 1);
    c.meta.config = None;
    assert!(matches!(write(&c, &dest, &opts), Err(Error::Missing { .. })));

    // A failure in the middle of writing (an artifact whose bytes cannot be produced).
    for opts in [
        WriteOptions::default(),
        WriteOptions { gzip: true, ..Default::default() },
        WriteOptions { extracted: true, ..Default::default() },
    ] {
        let mut c = checkpoint(1, 1);
        c.meta.artifacts.push(Artifact {
            name: "zzz_late.bin".into(),
            source: ByteSource::derived(|| Err(Error::invalid("late", "source failed"))),
        });
        assert!(write(&c, &dest, &opts).unwrap_err().to_string().contains("source failed"));
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing left behind");
}

/// Python's `tarfile` (the reader NeMo uses) lists our members with the right sizes.
#[test]
fn python_tarfile_reads_the_output() {
    let Ok(probe) = std::process::Command::new("python3").arg("-c").arg("import tarfile").output() else {
        eprintln!("python3 not found; skipping");
        return;
    };
    if !probe.status.success() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.nemo");
    write(&checkpoint(2, 2), &a, &WriteOptions::default()).unwrap();
    let script =
        "import tarfile,sys\nwith tarfile.open(sys.argv[1]) as t:\n    for m in t.getmembers():\n        \
                  d = t.extractfile(m).read() if m.isfile() else b''\n        \
                  print(m.name, m.type.decode(), m.size, len(d), sep='|')";
    let out = std::process::Command::new("python3").arg("-c").arg(script).arg(&a).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listing = String::from_utf8(out.stdout).unwrap();
    let ours = list_members(&std::fs::read(&a).unwrap(), &a).unwrap();
    let lines: Vec<&str> = listing.lines().collect();
    assert_eq!(lines.len(), ours.len(), "{listing}");
    for (line, m) in lines.iter().zip(&ours) {
        let parts: Vec<&str> = line.split('|').collect();
        let name = if m.name.is_empty() { ".".to_string() } else { format!("./{}", m.name) };
        assert_eq!(parts[0], name, "{listing}");
        assert_eq!(parts[1], if m.kind == MemberKind::Dir { "5" } else { "0" });
        assert_eq!(parts[3].parse::<usize>().unwrap(), m.len);
    }
    assert_eq!(lines[0], ".|5|0|0");
    assert!(
        lines.iter().any(|l| l.starts_with(&format!("./{}", "v".repeat(120)))),
        "PAX long name: {listing}"
    );
}

fn zarr_archive(backend: &str) -> Vec<u8> {
    // A [3, 2] f32 array in [2, 2] chunks (edge chunk padded) and a single-chunk bf16 one.
    let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    tar_of(&[
        ("./", None),
        ("./model_config.yaml", Some(b"mcore_gpt: true\ntensor_model_parallel_size: 2\n".to_vec())),
        ("./model_weights/", None),
        (
            "./model_weights/metadata.json",
            Some(format!("{{\"sharded_backend\": \"{backend}\", \"sharded_backend_version\": 1}}").into_bytes()),
        ),
        ("./model_weights/common.pt", Some(zip_bytes(0))),
        (
            "./model_weights/w/.zarray",
            Some(br#"{"chunks":[2,2],"compressor":null,"dtype":"<f4","fill_value":null,"filters":null,"order":"C","shape":[3,2],"zarr_format":2}"#.to_vec()),
        ),
        ("./model_weights/w/0.0", Some(f32s(&[1.0, 2.0, 3.0, 4.0]))),
        ("./model_weights/w/1.0", Some(f32s(&[5.0, 6.0, 0.0, 0.0]))),
        (
            "./model_weights/b/.zarray",
            Some(br#"{"chunks":[2],"compressor":null,"dtype":"bfloat16","fill_value":null,"filters":null,"order":"C","shape":[2],"zarr_format":2}"#.to_vec()),
        ),
        ("./model_weights/b/0", Some(vec![1, 2, 3, 4])),
        ("./model_weights/x._extra_state/shard_0_1.pt", Some(zip_bytes(0))),
        (&format!("./{TOKENIZER}"), Some(b"sp".to_vec())),
    ])
}

#[test]
fn zarr_distributed_checkpoint_is_read_lazily() {
    let dir = tempfile::tempdir().unwrap();
    let c = read_bytes(dir.path(), &zarr_archive("zarr")).unwrap();
    assert_eq!(
        c.meta.flavour,
        Flavour::Nemo { layout: NemoLayout::Distributed, gzip: false, extracted: false }
    );
    assert_eq!(c.shards.len(), 1);
    assert_eq!(c.meta.artifacts.len(), 1, "dist-ckpt files are not artifacts");
    let t = &c.shards[0].tensors;
    assert_eq!(t.keys().collect::<Vec<_>>(), ["b", "w"]);
    assert_eq!((t["w"].dtype, &t["w"].shape), (DType::F32, &vec![3, 2]));
    let w: Vec<f32> =
        t["w"].bytes("w").unwrap().chunks(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    assert_eq!(w, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert_eq!((t["b"].dtype, t["b"].bytes("b").unwrap().to_vec()), (DType::BF16, vec![1, 2, 3, 4]));
    assert!(matches!(t["b"].source, ByteSource::Mapped { .. }));

    let msg = read_bytes(dir.path(), &zarr_archive("torch_dist")).unwrap_err().to_string();
    // A torch_dist checkpoint is read through its `.metadata` index; without one it is refused by name.
    assert!(msg.contains("model_weights/.metadata"), "{msg}");
}

/// Mutated archives give an error or a checkpoint, never a panic or a hang.
#[test]
fn read_tar_bytes_survives_mutations() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.nemo");
    write(&checkpoint(2, 1), &a, &WriteOptions::default()).unwrap();
    let archives = [std::fs::read(&a).unwrap(), zarr_archive("zarr")];
    assert!(read_tar_bytes(&archives[0]).is_ok());
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut rand = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for i in 0..400 {
        let mut b = archives[i % 2].clone();
        for _ in 0..(rand() % 6 + 1) {
            let at = (rand() % b.len() as u64) as usize;
            b[at] = rand() as u8;
        }
        let cut = if rand() % 3 == 0 { (rand() % b.len() as u64) as usize } else { b.len() };
        if let Ok(c) = read_tar_bytes(&b[..cut]) {
            for s in &c.shards {
                for (n, t) in &s.tensors {
                    let _ = t.bytes(n);
                }
            }
        }
    }
}

/// A member of 8 GiB or more gets a PAX `size` record that both our reader and Python's `tarfile`
/// honour (checked on a sparse file, so no disk is used).
#[cfg(target_os = "linux")]
#[test]
fn members_over_8_gib_use_pax_size() {
    use std::io::{Seek, SeekFrom, Write};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.tar");
    let size = (8u64 << 30) + 5;
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&file_header("./big.bin", size)).unwrap();
    let data_at = f.stream_position().unwrap();
    f.seek(SeekFrom::Start(data_at + size - 1)).unwrap();
    f.write_all(b"z").unwrap();
    f.write_all(&vec![0; padding(size)]).unwrap();
    let pos = f.stream_position().unwrap();
    f.write_all(&trailer(pos)).unwrap();
    drop(f);
    let map = crate::formats::map_file(&path).unwrap();
    let m = list_members(&map, &path).unwrap();
    assert_eq!((m[0].name.as_str(), m[0].len as u64, m[0].offset as u64), ("big.bin", size, data_at));
    let script =
        "import tarfile,sys\nwith tarfile.open(sys.argv[1]) as t:\n    print(t.getmembers()[0].size)";
    if let Ok(out) = std::process::Command::new("python3").arg("-c").arg(script).arg(&path).output() {
        if out.status.success() {
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), size.to_string());
        }
    }
}

/// The reference stack's Python, when `fixtures/gen/setup_venv.sh` has been run.
fn reference_python() -> Option<PathBuf> {
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/gen/.venv/bin/python");
    py.is_file().then_some(py)
}

/// Interop both ways with the reference stack: NeMo's own recipe (`torch.save` into a folder,
/// `tarfile.open(.., "w:").add(folder, arcname=".")`) is read by us, and each rank member we
/// write is read by Python's `tarfile` + `torch.load(weights_only=True)` with the same bytes.
#[test]
fn python_torch_interop() {
    let Some(py) = reference_python() else {
        eprintln!("reference venv with torch not found; skipping");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let theirs = dir.path().join("theirs.nemo");
    let make = r#"
import os, sys, tarfile, tempfile, torch, collections
out = sys.argv[1]
with tempfile.TemporaryDirectory() as d:
    with open(os.path.join(d, "model_config.yaml"), "w") as f:
        f.write("tensor_model_parallel_size: 2\npipeline_model_parallel_size: 1\ntokenizer:\n  model: nemo:" + "ab" * 16 + "_tokenizer.model\n")
    with open(os.path.join(d, "ab" * 16 + "_tokenizer.model"), "wb") as f:
        f.write(b"sp-model")
    for r in range(2):
        os.makedirs(os.path.join(d, f"mp_rank_{r:02d}"))
        sd = collections.OrderedDict()
        sd["model.w"] = torch.arange(6, dtype=torch.float32).reshape(2, 3) + r
        sd["model.h"] = torch.arange(4, dtype=torch.bfloat16) * (r + 1)
        sd["model.layer._extra_state"] = None
        torch.save(sd, os.path.join(d, f"mp_rank_{r:02d}", "model_weights.ckpt"))
    with tarfile.open(out, "w:") as tar:
        tar.add(d, arcname=".")
"#;
    let run = |args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new(&py).args(args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let made = std::process::Command::new(&py).arg("-c").arg(make).arg(&theirs).output().unwrap();
    if String::from_utf8_lossy(&made.stderr).contains("No module named") {
        eprintln!("reference venv is incomplete; skipping");
        return;
    }
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let c = read(&theirs).unwrap();
    assert_eq!(c.meta.parallel, Parallelism { tp: 2, pp: 1 });
    assert_eq!(c.meta.artifacts.len(), 1);
    let w = &c.shards[1].tensors["model.w"];
    let vals: Vec<f32> =
        w.bytes("w").unwrap().chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    assert_eq!((w.shape.clone(), vals), (vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]));
    assert!(matches!(w.source, ByteSource::Mapped { .. }), "zero-copy range of the tar");
    assert!(resolve_artifact(&c, config_of(&c).get_str("tokenizer.model").unwrap()).is_some());

    // Ours, read back by torch: every rank's tensors with identical bytes.
    let check = r#"
import sys, io, tarfile, hashlib, torch
for i, path in enumerate(sys.argv[1:]):
    with tarfile.open(path) as t:
        for m in t.getmembers():
            if m.name.endswith("model_weights.ckpt"):
                sd = torch.load(io.BytesIO(t.extractfile(m).read()), weights_only=True)
                for k, v in sd.items():
                    if v is None:  # `_extra_state` keys travel as None
                        continue
                    b = v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                    print(i, m.name, k, str(v.dtype), list(v.shape), hashlib.sha256(b).hexdigest())
"#;
    // Ours (plain and gzip, from the Python-made archive and from a tp=2 pp=2 checkpoint), checked
    // by one Python run: each file's listing is prefixed with its index.
    let mut paths: Vec<std::ffi::OsString> = Vec::new();
    let mut expected = Vec::new();
    for (i, (ckpt, gzip)) in [(&c, false), (&c, true), (&checkpoint(2, 2), false), (&checkpoint(2, 2), true)]
        .into_iter()
        .enumerate()
    {
        let ours = dir.path().join(format!("ours{i}.nemo"));
        write(ckpt, &ours, &WriteOptions { gzip, ..Default::default() }).unwrap();
        paths.push(ours.into_os_string());
        let layout = NemoLayout::for_parallelism(ckpt.meta.parallel);
        for s in &ckpt.shards {
            let member = format!("./{}", layout.weights_member(s.rank));
            for (k, t) in &s.tensors {
                let dtype = match t.dtype {
                    DType::F32 => "torch.float32",
                    DType::BF16 => "torch.bfloat16",
                    DType::I64 => "torch.int64",
                    other => panic!("{other:?}"),
                };
                let digest = sha256_hex(&t.bytes(k).unwrap());
                expected.push(format!("{i} {member} {k} {dtype} {:?} {digest}", t.shape));
            }
        }
    }
    let mut args: Vec<&std::ffi::OsStr> = vec!["-c".as_ref(), check.as_ref()];
    args.extend(paths.iter().map(|p| p.as_os_str()));
    let listing = run(&args);
    // Members come in archive (name) order, tensors in pickle order; compare as sets of lines.
    let mut got: Vec<&str> = listing.lines().collect();
    got.sort();
    expected.sort();
    assert_eq!(got, expected.iter().map(String::as_str).collect::<Vec<_>>());
}

/// SHA-256 via the system's `sha256sum`, to avoid a dependency only this test would use.
fn sha256_hex(bytes: &[u8]) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string()
}

/// GNU long-name records (Python's `GNU_FORMAT`, GNU tar) and PAX path records (Python's default)
/// both give the full member name.
#[test]
fn python_gnu_and_pax_long_names() {
    let dir = tempfile::tempdir().unwrap();
    let long = format!("model_weights/{}/0.0.0", "k".repeat(140));
    for format in ["GNU_FORMAT", "PAX_FORMAT"] {
        let path = dir.path().join(format!("{format}.tar"));
        let script = format!(
            "import io,sys,tarfile\nwith tarfile.open(sys.argv[1], 'w:', format=tarfile.{format}) as t:\n    \
             for n, d in [('./a.txt', b'hello'), ('./' + sys.argv[2], b'chunk')]:\n        \
             i = tarfile.TarInfo(n); i.size = len(d); t.addfile(i, io.BytesIO(d))"
        );
        match std::process::Command::new("python3").arg("-c").arg(&script).arg(&path).arg(&long).output() {
            Ok(out) if out.status.success() => {}
            _ => {
                eprintln!("python3 not usable; skipping");
                return;
            }
        }
        let bytes = std::fs::read(&path).unwrap();
        let m = list_members(&bytes, &path).unwrap();
        let got: Vec<(&str, &[u8])> =
            m.iter().map(|m| (m.name.as_str(), &bytes[m.offset..m.offset + m.len])).collect();
        assert_eq!(got, [("a.txt", &b"hello"[..]), (long.as_str(), &b"chunk"[..])], "{format}");
    }
}

#[test]
fn broken_gzip_is_a_named_error() {
    let dir = tempfile::tempdir().unwrap();
    let gz = dir.path().join("g.nemo");
    write(&checkpoint(1, 1), &gz, &WriteOptions { gzip: true, ..Default::default() }).unwrap();
    let bytes = std::fs::read(&gz).unwrap();
    let err = read_bytes(dir.path(), &bytes[..bytes.len() / 2]).unwrap_err();
    assert!(matches!(err, Error::Malformed { format: "gzip", .. }), "{err}");
    // A valid gzip of nothing is an empty tar.
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.flush().unwrap();
    let empty = enc.finish().unwrap();
    let err = read_bytes(dir.path(), &empty).unwrap_err();
    assert!(matches!(err, Error::Malformed { format: "tar", .. }), "{err}");
}

#[test]
fn extracted_zarr_directory_reads_like_the_tar() {
    let dir = tempfile::tempdir().unwrap();
    let ex = dir.path().join("ex");
    ::tar::Archive::new(&zarr_archive("zarr")[..]).unpack(&ex).unwrap();
    let c = read(&ex).unwrap();
    assert_eq!(
        c.meta.flavour,
        Flavour::Nemo { layout: NemoLayout::Distributed, gzip: false, extracted: true }
    );
    let from_tar = read_tar_bytes(&zarr_archive("zarr")).unwrap();
    assert_same(&from_tar, &c);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
    /// Any per-rank checkpoint (TP 1–3 × PP 1–3, so every layout; tensors of any dtype, shape
    /// and name, long ones past the tar header's 100 bytes included; artifacts of any name)
    /// written as a tar, a gzip tar or an extracted directory reads back identical, in the
    /// layout and container it was written as.
    #[test]
    fn write_then_read_is_identity(
        tp in 1usize..4, pp in 1usize..4, container in 0usize..3,
        specs in proptest::collection::btree_map(
            "[a-z][a-z0-9_.]{0,140}",
            (0usize..5, proptest::collection::vec(0usize..4, 0..3)),
            1..5,
        ),
        artifact in "[a-z0-9_][a-z0-9_.]{0,150}",
    ) {
        let dtypes = [DType::BF16, DType::F32, DType::F16, DType::I64, DType::U8];
        let mut ckpt = checkpoint(tp, pp);
        for (i, shard) in ckpt.shards.iter_mut().enumerate() {
            shard.tensors = specs
                .iter()
                .map(|(name, (d, shape))| (format!("model.{name}"), entry(dtypes[*d], shape.clone(), i as u8)))
                .collect();
        }
        ckpt.meta.artifacts.push(Artifact { name: artifact.clone(), source: ByteSource::owned(artifact.clone().into_bytes()) });
        // Not a name the checkpoint already holds (the config, the weights, a rank directory).
        proptest::prop_assume!(
            artifact != TOKENIZER
                && !artifact.ends_with("_vocab.json")
                && artifact != CONFIG
                && !["model_weights", "mp_rank", "tp_rank"].iter().any(|p| artifact.starts_with(p))
        );
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("p.nemo");
        let (gzip, extracted) = (container == 1, container == 2);
        write(&ckpt, &dest, &WriteOptions { gzip, extracted, ..Default::default() }).unwrap();
        let back = read(&dest).unwrap();
        let layout = NemoLayout::for_parallelism(Parallelism { tp, pp });
        proptest::prop_assert_eq!(&back.meta.flavour, &Flavour::Nemo { layout, gzip, extracted });
        assert_same(&ckpt, &back);
    }
}
