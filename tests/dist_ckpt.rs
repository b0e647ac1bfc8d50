//! Distributed-checkpoint `.nemo` fixtures (fixtures/nemo-dist/, both Megatron backends) read
//! back to exactly the HF weights they were made from, through the library and the CLI.

mod common;

use common::{assert_same_tensors, fixture};
use shardsmith_converters::convert::llama::{from_hf, from_nemo, CanonicalLlama};
use shardsmith_converters::{formats, ByteSource, DType, Flavour, NemoLayout, TensorMap};
use std::process::Command;

const F32: [&str; 2] = ["nemo-dist/llama-mha-zarr.nemo", "nemo-dist/llama-mha-torch_dist.nemo"];
const BF16: &str = "nemo-dist/llama-mha-torch_dist-bf16.nemo";

fn hf() -> CanonicalLlama {
    from_hf(&formats::open(&fixture("llama-mha")).unwrap()).unwrap()
}

fn canonical_from(rel: &str) -> CanonicalLlama {
    let ckpt = formats::open(&fixture(rel)).unwrap();
    assert!(
        matches!(ckpt.meta.flavour, Flavour::Nemo { layout: NemoLayout::Distributed, extracted: false, .. }),
        "{rel}: {}",
        ckpt.meta.flavour
    );
    from_nemo(&ckpt, None).unwrap()
}

#[test]
fn f32_fixtures_give_the_hf_tensors_bit_for_bit() {
    let want = hf();
    for rel in F32 {
        let got = canonical_from(rel);
        assert_eq!(got.hparams.vocab, 256, "{rel}: vocabulary from the tokenizer artifact");
        assert_same_tensors(&got.tensors, &want.tensors, rel);
    }
}

#[test]
fn bf16_fixture_gives_the_hf_tensors_rounded_to_bf16() {
    let want: TensorMap =
        hf().tensors.iter().map(|(name, t)| (name.clone(), t.cast(name, DType::BF16).unwrap())).collect();
    let got = canonical_from(BF16);
    assert_same_tensors(&got.tensors, &want, BF16);
    // Stored one chunk per tensor, so unfused tensors are still plain ranges of the .nemo file.
    let norm = "model.norm.weight";
    assert!(matches!(got.tensors[norm].source, ByteSource::Mapped { .. }), "{norm} is zero-copy");
}

#[test]
fn cli_converts_dist_fixtures_to_matching_hf() {
    let work = tempfile::tempdir().unwrap();
    for rel in F32 {
        let out = work.path().join(rel.replace(['/', '.'], "_"));
        let run = |args: &[&std::ffi::OsStr]| {
            let o = Command::new(env!("CARGO_BIN_EXE_shardsmith")).args(args).output().unwrap();
            let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
            assert!(o.status.success(), "{args:?}: {stdout}{}", String::from_utf8_lossy(&o.stderr));
            stdout
        };
        run(&["convert".as_ref(), fixture(rel).as_os_str(), out.as_os_str()]);
        let report = run(&["diff".as_ref(), fixture("llama-mha").as_os_str(), out.as_os_str()]);
        assert!(report.contains("MATCH") && report.contains("0 differ in value"), "{rel}: {report}");
    }
}

fn shardsmith(args: &[String]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_shardsmith")).args(args).output().unwrap()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn path(p: &std::path::Path) -> String {
    p.to_str().unwrap().to_string()
}

/// Every member of `model_weights/` in a `.nemo` tar, by name.
fn dist_members(nemo: &std::path::Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let map = std::fs::read(nemo).unwrap();
    formats::nemo::list_members(&map, nemo)
        .unwrap()
        .into_iter()
        .filter(|m| m.kind == formats::nemo::MemberKind::File && m.name.starts_with("model_weights/"))
        .map(|m| (m.name.clone(), map[m.offset..m.offset + m.len].to_vec()))
        .collect()
}

/// `convert --dist-ckpt zarr` writes what the fixture generator (Megatron's zarr layout, written
/// by independent Python) wrote for llama-mha at tp=2: every `.zarray`, chunk file and
/// `metadata.json` byte for byte. (The generator keeps one extra-state module to stay small, and
/// its torch.save zips differ from ours in zip details only; interop.rs loads ours in torch.)
#[test]
fn zarr_output_matches_the_fixture_member_for_member() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("mha.nemo");
    let mut args = strings(&["convert", "--tp", "2", "--dist-ckpt", "zarr"]);
    args.extend([path(&fixture("llama-mha")), path(&out)]);
    let o = shardsmith(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ours = dist_members(&out);
    let theirs = dist_members(&fixture(F32[0]));
    let arrays: Vec<&String> = theirs.keys().filter(|n| !n.ends_with(".pt")).collect();
    assert_eq!(arrays.len(), 39, "metadata.json + 9 arrays × (.zarray + chunks)");
    for name in arrays {
        assert!(ours.get(name) == theirs.get(name), "{name} differs");
    }
    let objects = ours.keys().filter(|n| n.contains("._extra_state/shard_")).count();
    assert_eq!(objects, 6 * 2, "one per TE module (4 linears, 2 attention names) and layer");
    assert_eq!(ours.len(), 39 + 1 + objects, "arrays, common.pt, objects and nothing else");
}

/// HF → distributed `.nemo` (both backends) at any tp/pp/dtype → HF gives the HF tensors back
/// bit for bit, as a tar and as an extracted directory, and the yaml keeps the requested
/// parallelism.
#[test]
fn dist_output_round_trips_to_hf() {
    let work = tempfile::tempdir().unwrap();
    for (model, tp, pp, dtype, extracted, backend) in [
        ("llama-gqa", 1, 1, None, false, "zarr"),
        ("llama-gqa", 2, 3, None, false, "zarr"),
        ("llama-mha", 4, 2, Some("bf16"), false, "zarr"),
        ("llama-mha", 2, 1, None, true, "zarr"),
        ("llama-gqa", 2, 3, None, false, "torch_dist"),
        ("llama-mha", 4, 1, Some("bf16"), false, "torch_dist"),
        ("llama-mha", 1, 2, None, true, "torch_dist"),
    ] {
        let tag = format!("{model}-{tp}-{pp}-{}-{extracted}-{backend}", dtype.unwrap_or("same"));
        let nemo = work.path().join(format!("{tag}.nemo"));
        let src = fixture(model);
        let mut args = strings(&["convert", "--dist-ckpt", backend]);
        args.extend([path(&src), path(&nemo), "--tp".into(), tp.to_string(), "--pp".into(), pp.to_string()]);
        if let Some(d) = dtype {
            args.extend(strings(&["--dtype", d]));
        }
        if extracted {
            args.push("--extracted".into());
        }
        let o = shardsmith(&args);
        assert!(o.status.success(), "{tag}: {}", String::from_utf8_lossy(&o.stderr));
        let ckpt = formats::open(&nemo).unwrap();
        assert!(matches!(ckpt.meta.flavour, Flavour::Nemo { layout: NemoLayout::Distributed, .. }), "{tag}");
        let back = from_nemo(&ckpt, None).unwrap();
        let want = from_hf(&formats::open(&src).unwrap()).unwrap().tensors;
        let want: TensorMap = match dtype {
            Some(_) => want.iter().map(|(n, t)| (n.clone(), t.cast(n, DType::BF16).unwrap())).collect(),
            None => want,
        };
        assert_same_tensors(&back.tensors, &want, &tag);
        let Some(shardsmith_converters::ModelConfig::NemoYaml(cfg)) = &ckpt.meta.config else {
            panic!("{tag}")
        };
        assert_eq!(cfg.get_usize("tensor_model_parallel_size"), Some(tp), "{tag}");
        assert_eq!(cfg.get_usize("pipeline_model_parallel_size"), Some(pp), "{tag}");
        // `inspect` reports the parallelism NeMo loads it at, not the one global shard.
        let o = shardsmith(&["inspect".to_string(), path(&nemo), "--json".into()]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!((v["tp"].as_u64(), v["pp"].as_u64()), (Some(tp as u64), Some(pp as u64)), "{tag}");
    }
}

/// A zarr `.nemo` reshards to a per-rank file, to torch_dist and back to zarr with identical
/// arrays.
#[test]
fn dist_output_reshards_both_ways() {
    let work = tempfile::tempdir().unwrap();
    let [a, b, c, d] = ["a", "b", "c", "d"].map(|n| work.path().join(format!("{n}.nemo")));
    let src = fixture("llama-gqa");
    for (from, to, tp, dist) in [
        (&src, &a, "2", Some("zarr")),
        (&a, &b, "1", None),
        (&b, &c, "2", Some("torch_dist")),
        (&c, &d, "2", Some("zarr")),
    ] {
        let mut args = vec!["convert".to_string(), path(from), path(to), "--tp".into(), tp.into()];
        if let Some(backend) = dist {
            args.extend(strings(&["--dist-ckpt", backend]));
        }
        let o = shardsmith(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{args:?}: {err}");
        // Leaving a distributed checkpoint for per-rank files is said, not silent.
        let leaves = from == &a && dist.is_none();
        assert_eq!(
            err.contains("is a distributed checkpoint; writing one model_weights.ckpt per rank"),
            leaves,
            "{err}"
        );
    }
    let per_rank = formats::open(&b).unwrap();
    assert!(matches!(per_rank.meta.flavour, Flavour::Nemo { layout: NemoLayout::Single, .. }));
    let arrays = |nemo: &std::path::Path| {
        dist_members(nemo).into_iter().filter(|(n, _)| !n.ends_with(".pt")).collect::<Vec<_>>()
    };
    assert!(arrays(&a) == arrays(&d), "tp 2 zarr → tp 1 file → torch_dist → zarr changed the arrays");
    let torch_dist = dist_members(&c);
    assert!(
        torch_dist.contains_key("model_weights/.metadata")
            && torch_dist.contains_key("model_weights/__0_0.distcp")
    );
}

/// What a distributed checkpoint cannot hold, or an output that is not a `.nemo`, is refused
/// before anything is written.
#[test]
fn dist_ckpt_refusals_are_named_and_write_nothing() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("x.nemo");
    for (model, extra, want) in [
        ("llama-mha", &["--layout", "legacy"][..], "megatron-core names"),
        (
            "llava-tiny",
            &["--to", "hf"][..],
            "applies to .nemo outputs; this conversion writes an HF directory",
        ),
    ] {
        let mut args = vec!["convert".to_string(), path(&fixture(model)), path(&out)];
        args.extend(strings(&["--dist-ckpt", "zarr"]));
        args.extend(strings(extra));
        let o = shardsmith(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{args:?}: {err}");
        assert!(!out.exists(), "{args:?} left {}", out.display());
    }
}

/// `surgery … --dist-ckpt` writes its `.nemo` as a distributed checkpoint: keep-layers keeping
/// both layers of the zarr fixture gives the fixture's arrays back member for member (per rank
/// without the flag); on an HF output the flag is refused before anything is written.
#[test]
fn surgery_writes_distributed_checkpoints() {
    let work = tempfile::tempdir().unwrap();
    let (dist, per_rank) = (work.path().join("dist.nemo"), work.path().join("per-rank.nemo"));
    let keep = |out: &std::path::Path, extra: &[&str]| {
        let mut args = strings(&["surgery", "keep-layers", "--first", "2", "-o"]);
        args.extend([path(out), path(&fixture(F32[0]))]);
        args.extend(strings(extra));
        shardsmith(&args)
    };
    let o = keep(&dist, &["--dist-ckpt", "zarr"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("layout: a distributed checkpoint (zarr, 9 arrays)"));
    let (ours, theirs) = (dist_members(&dist), dist_members(&fixture(F32[0])));
    for name in theirs.keys().filter(|n| !n.ends_with(".pt")) {
        assert!(ours.get(name) == theirs.get(name), "{name} differs");
    }
    let o = keep(&per_rank, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout)
        .contains("per-rank model_weights.ckpt (tp=2, pp=1) unless --dist-ckpt"));
    assert!(dist_members(&per_rank).is_empty());
    let hf = work.path().join("hf");
    let mut args = strings(&["surgery", "rename", "--rule", "a=b", "--dist-ckpt", "zarr", "-o"]);
    args.extend([path(&hf), path(&fixture("llama-mha"))]);
    let o = shardsmith(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--dist-ckpt applies to .nemo outputs"), "{err}");
    assert!(!hf.exists());
}
