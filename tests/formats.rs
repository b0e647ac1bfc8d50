//! The format layer on the committed fixtures: every reader against the reference values,
//! cross-format agreement, write→read identity, and named errors for bad input.

mod common;

use common::{assert_same_tensors, fixture, nemo_checkpoint};
use shardsmith_converters::formats::{self, hf_dir, nemo, safetensors, torch_zip, Format};
use shardsmith_converters::{
    ByteSource, Checkpoint, Error, Flavour, ModelConfig, NemoLayout, Parallelism, TensorEntry, TensorMap,
};
use std::path::Path;
use std::sync::Arc;

fn expected(stem: &str) -> TensorMap {
    safetensors::read_file(&fixture(&format!("torch/{stem}.expected.safetensors"))).unwrap()
}

#[test]
fn torch_saved_files_read_as_pytorch_wrote_them() {
    // all dtypes, a scalar and an empty tensor; views into one storage with offsets and a
    // transposed view; a Lightning-style nested dict; NeMo-style `_extra_state: None` entries.
    for (file, stem) in [
        ("all_dtypes.pt", "all_dtypes"),
        ("shared_storage.pt", "shared_storage"),
        ("parameters.pt", "parameters"),
        ("extra_state.ckpt", "extra_state"),
    ] {
        let state = torch_zip::read_file(&fixture(&format!("torch/{file}"))).unwrap();
        assert_same_tensors(&state.tensors, &expected(stem), file);
    }
    let extra = torch_zip::read_file(&fixture("torch/extra_state.ckpt")).unwrap();
    assert!(!extra.none_keys.is_empty() && extra.none_keys.iter().all(|k| k.ends_with("_extra_state")));
    // Lightning nesting: the expected file names tensors `state_dict/<key>`.
    let nested = torch_zip::read_file(&fixture("torch/nested.ckpt")).unwrap();
    let want: TensorMap = expected("nested")
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("state_dict/").unwrap_or(&k).to_string(), v))
        .collect();
    assert_same_tensors(&nested.tensors, &want, "nested.ckpt");
}

#[test]
fn hostile_and_legacy_torch_files_are_refused_by_name() {
    let evil = fixture("torch/evil.pt");
    match formats::open(&evil) {
        Err(Error::ForbiddenGlobal { path, module, name }) => {
            assert!(path.to_string_lossy().starts_with(&*evil.to_string_lossy()), "{}", path.display());
            assert!(module == "posix" || module == "os", "{module}");
            assert_eq!(name, "system");
        }
        other => panic!("expected ForbiddenGlobal, got {other:?}"),
    }
    assert!(matches!(Format::detect(&fixture("torch/legacy.pt")), Err(Error::LegacyTorchFile { .. })));
}

#[test]
fn the_same_weights_agree_across_safetensors_and_bin() {
    let st = formats::open(&fixture("llama-gqa")).unwrap();
    let bin = formats::open(&fixture("llama-gqa-bin")).unwrap();
    assert_eq!(st.meta.flavour, Flavour::HfSafetensorsDir { sharded: true });
    assert_eq!(bin.meta.flavour, Flavour::HfBinDir { sharded: true });
    assert_same_tensors(st.tensors().unwrap(), bin.tensors().unwrap(), "safetensors vs bin");
}

#[test]
fn safetensors_written_by_transformers_rewrite_byte_identically() {
    // Our writer uses the reference order and header, so re-writing any file transformers
    // wrote reproduces it exactly.
    let out = tempfile::tempdir().unwrap();
    let files = ["llama-mha/model.safetensors", "clip-vision/model.safetensors"]
        .into_iter()
        .map(String::from)
        .chain((1..=4).map(|i| format!("llama-gqa/model-0000{i}-of-00004.safetensors")));
    for rel in files {
        let tensors = safetensors::read_file(&fixture(&rel)).unwrap();
        let dest = out.path().join(rel.replace('/', "_"));
        safetensors::write_file(&tensors, &dest, false).unwrap();
        assert!(std::fs::read(fixture(&rel)).unwrap() == std::fs::read(&dest).unwrap(), "{rel} differs");
    }
}

#[test]
fn hf_directories_round_trip() {
    let out = tempfile::tempdir().unwrap();
    let src = fixture("llama-gqa");
    let ckpt = formats::open(&src).unwrap();
    let dest = out.path().join("copy");
    let opts = hf_dir::WriteOptions { max_shard_bytes: 180_000, ..Default::default() };
    let files = hf_dir::write(&ckpt, &dest, &opts).unwrap();
    assert!(files.contains(&"model.safetensors.index.json".to_string()), "{files:?}");
    let back = formats::open(&dest).unwrap();
    assert_eq!(back.meta.flavour, Flavour::HfSafetensorsDir { sharded: true });
    assert_same_tensors(ckpt.tensors().unwrap(), back.tensors().unwrap(), "hf rewrite");
    for name in ["tokenizer.json", "tokenizer.model", "generation_config.json"] {
        assert_eq!(std::fs::read(src.join(name)).unwrap(), std::fs::read(dest.join(name)).unwrap(), "{name}");
    }
    let (ModelConfig::HfJson(a), Some(ModelConfig::HfJson(b))) =
        (ckpt.meta.config.unwrap(), back.meta.config)
    else {
        panic!("config.json lost")
    };
    assert_eq!(a, b);

    // .bin directory → .bin directory keeps every tensor.
    let bin = formats::open(&fixture("llama-gqa-bin")).unwrap();
    let dest = out.path().join("bin");
    let opts = hf_dir::WriteOptions {
        weights: hf_dir::WeightFormat::Bin,
        max_shard_bytes: 180_000,
        ..Default::default()
    };
    hf_dir::write(&bin, &dest, &opts).unwrap();
    let back = formats::open(&dest).unwrap();
    assert_eq!(back.meta.flavour, Flavour::HfBinDir { sharded: true });
    assert_same_tensors(bin.tensors().unwrap(), back.tensors().unwrap(), "bin rewrite");
}

#[test]
fn torch_files_round_trip_and_rewrite_byte_identically() {
    let out = tempfile::tempdir().unwrap();
    for file in ["all_dtypes.pt", "shared_storage.pt", "extra_state.ckpt"] {
        let state = torch_zip::read_file(&fixture(&format!("torch/{file}"))).unwrap();
        // Same file name both times: torch names the zip's top directory after it.
        let once = out.path().join(format!("once/{file}"));
        std::fs::create_dir_all(once.parent().unwrap()).unwrap();
        torch_zip::write_file(&state, &once, false).unwrap();
        let back = torch_zip::read_file(&once).unwrap();
        assert_same_tensors(&state.tensors, &back.tensors, file);
        assert_eq!(state.none_keys, back.none_keys, "{file}");
        // Our own output is a fixed point.
        let twice = out.path().join(format!("twice/{file}"));
        std::fs::create_dir_all(twice.parent().unwrap()).unwrap();
        torch_zip::write_file(&back, &twice, false).unwrap();
        let (a, b) = (std::fs::read(&once).unwrap(), std::fs::read(&twice).unwrap());
        assert!(a == b, "{file}: second write differs from the first");
    }
}

fn assert_same_checkpoint(a: &Checkpoint, b: &Checkpoint, what: &str) {
    assert_eq!(a.shards.len(), b.shards.len(), "{what}: rank count");
    for (sa, sb) in a.shards.iter().zip(&b.shards) {
        assert_eq!(sa.rank, sb.rank, "{what}");
        assert_same_tensors(&sa.tensors, &sb.tensors, &format!("{what} rank {:?}", sa.rank));
    }
}

#[test]
fn nemo_round_trips_in_every_layout_and_container() {
    let out = tempfile::tempdir().unwrap();
    for (tp, pp) in [(1, 1), (2, 1), (2, 2), (1, 2)] {
        let ckpt = nemo_checkpoint(tp, pp);
        for (gzip, extracted) in [(false, false), (true, false), (false, true)] {
            let dest = out.path().join(format!("m-{tp}-{pp}-{gzip}-{extracted}.nemo"));
            nemo::write(&ckpt, &dest, &nemo::WriteOptions { gzip, extracted, ..Default::default() }).unwrap();
            let back = formats::open(&dest).unwrap();
            let what = format!("tp={tp} pp={pp} gzip={gzip} extracted={extracted}");
            assert_eq!(back.meta.parallel, Parallelism { tp, pp }, "{what}");
            assert_eq!(
                back.meta.flavour,
                Flavour::Nemo {
                    layout: NemoLayout::for_parallelism(Parallelism { tp, pp }),
                    gzip,
                    extracted
                },
                "{what}"
            );
            assert_same_checkpoint(&ckpt, &back, &what);
            let Some(ModelConfig::NemoYaml(cfg)) = &back.meta.config else { panic!("{what}: no yaml") };
            let Some(ModelConfig::NemoYaml(orig)) = &ckpt.meta.config else { unreachable!() };
            assert_eq!(cfg.raw, orig.raw, "{what}: yaml must survive verbatim, ${{...}} included");
            let tok = nemo::resolve_artifact(&back, cfg.get_str("tokenizer.model").unwrap())
                .expect("tokenizer artifact");
            assert_eq!(tok.source.bytes().unwrap(), ckpt.meta.artifacts[0].source.bytes().unwrap());
        }
        // A plain tar we wrote rewrites to the same bytes.
        let a = out.path().join(format!("m-{tp}-{pp}-false-false.nemo"));
        let b = out.path().join(format!("again-{tp}-{pp}.nemo"));
        nemo::write(&formats::open(&a).unwrap(), &b, &nemo::WriteOptions::default()).unwrap();
        assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(), "tp={tp} pp={pp}: rewrite differs");
    }
}

#[test]
fn inspect_sees_nemo_layouts() {
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("tp2pp2.nemo");
    nemo::write(&nemo_checkpoint(2, 2), &dest, &nemo::WriteOptions::default()).unwrap();
    let ckpt = formats::open(&dest).unwrap();
    let report = shardsmith::commands::inspect::report(&ckpt, None).unwrap();
    assert_eq!((report.tp, report.pp), (2, 2));
    assert_eq!(report.format, ".nemo (tar), weights in tp_rank_XX_pp_rank_YYY/");
    assert_eq!(report.architecture.layers, Some(2));
    assert_eq!(report.architecture.hidden, Some(64));
    assert_eq!(report.totals.tensors, ckpt.tensor_count());
}

/// A tensor whose bytes cannot be produced, to make a writer fail midway.
fn failing_tensor() -> TensorEntry {
    TensorEntry::new(
        shardsmith_converters::DType::F32,
        vec![4],
        ByteSource::derived(|| Err(Error::invalid("source.bin", "simulated read failure"))),
        Arc::from(Path::new("source.bin")),
    )
}

#[test]
fn a_failed_write_leaves_nothing_behind() {
    let out = tempfile::tempdir().unwrap();
    let mut ckpt = nemo_checkpoint(2, 1);
    ckpt.shards[1].tensors.insert("zzz.broken".into(), failing_tensor());
    let nemo_dest = out.path().join("broken.nemo");
    let err = nemo::write(&ckpt, &nemo_dest, &nemo::WriteOptions::default()).unwrap_err();
    assert!(err.to_string().contains("simulated read failure"), "{err}");

    let mut tensors = formats::open(&fixture("llama-mha")).unwrap().tensors().unwrap().clone();
    tensors.insert("zzz.broken".into(), failing_tensor());
    assert!(safetensors::write_file(&tensors, &out.path().join("broken.safetensors"), false).is_err());
    let state = torch_zip::TorchState::new(tensors.clone(), vec![]);
    assert!(torch_zip::write_file(&state, &out.path().join("broken.bin"), false).is_err());
    let hf = Checkpoint::single(formats::open(&fixture("llama-mha")).unwrap().meta, tensors);
    assert!(hf_dir::write(&hf, &out.path().join("broken-hf"), &Default::default()).is_err());

    let left: Vec<_> = std::fs::read_dir(out.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn truncated_and_corrupt_inputs_give_named_errors() {
    let out = tempfile::tempdir().unwrap();
    let cases = [
        ("llama-mha/model.safetensors", "model.safetensors"),
        ("torch/all_dtypes.pt", "all_dtypes.pt"),
        ("llama-gqa-bin/pytorch_model-00001-of-00004.bin", "shard.bin"),
    ];
    for (src, name) in cases {
        let bytes = std::fs::read(fixture(src)).unwrap();
        for cut in [bytes.len() / 2, bytes.len() - 1, 40] {
            let path = out.path().join(name);
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let result = Format::detect(&path).and_then(|f| f.read(&path));
            let ckpt_err = match result {
                Err(e) => e,
                // Some cuts still parse as a header; the data must then fail when pulled.
                Ok(c) => c
                    .shards
                    .iter()
                    .flat_map(|s| s.tensors.iter())
                    .find_map(|(n, t)| t.bytes(n).err())
                    .unwrap_or_else(|| panic!("{src} cut at {cut} read without error")),
            };
            let msg = ckpt_err.to_string();
            assert!(msg.contains(name) || msg.contains("cannot tell"), "{src} cut at {cut}: {msg}");
        }
    }
    // Sharded directory whose index names a missing file.
    let dir = out.path().join("hf");
    std::fs::create_dir(&dir).unwrap();
    for f in ["config.json", "model.safetensors.index.json", "model-00001-of-00004.safetensors"] {
        std::fs::copy(fixture("llama-gqa").join(f), dir.join(f)).unwrap();
    }
    let err = formats::open(&dir).unwrap_err().to_string();
    assert!(err.contains("model-00002-of-00004.safetensors"), "{err}");
}
