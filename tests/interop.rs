//! PyTorch and transformers load what we write and get identical tensors (run by
//! `tests/run.sh` with the pinned reference venv; see `common::reference_python`).

mod common;

use common::{fixture, reference_python, run_checker};
use shardsmith_converters::formats::{self, hf_dir, nemo, safetensors, torch_zip};
use shardsmith_converters::{
    ByteSource, Checkpoint, Flavour, Meta, ModelConfig, NemoLayout, Parallelism, Rank, Shard, TensorMap,
};
use std::path::Path;

#[test]
fn torch_load_reads_our_pytorch_files() {
    let Some(py) = reference_python() else { return };
    let out = tempfile::tempdir().unwrap();
    for (file, stem) in [
        ("all_dtypes.pt", "all_dtypes"),
        ("shared_storage.pt", "shared_storage"),
        ("extra_state.ckpt", "extra_state"),
        ("parameters.pt", "parameters"),
    ] {
        let state = torch_zip::read_file(&fixture(&format!("torch/{file}"))).unwrap();
        let dest = out.path().join(file);
        torch_zip::write_file(&state, &dest, false).unwrap();
        // The expected file may also describe non-tensor leaves of the original; compare tensors only.
        let expected = out.path().join(format!("{stem}.expected.safetensors"));
        safetensors::write_file(
            &safetensors::read_file(&fixture(&format!("torch/{stem}.expected.safetensors"))).unwrap(),
            &expected,
            false,
        )
        .unwrap();
        let line = run_checker(&py, "torch_load_check.py", &[&dest, &expected]);
        assert!(line.starts_with("OK"), "{file}: {line}");
    }
}

fn nemo_from_fixture(tp: usize, pp: usize) -> Checkpoint {
    let hf = formats::open(&fixture("llama-mha")).unwrap();
    let mut shards: Vec<Shard> = (0..pp)
        .flat_map(|p| (0..tp).map(move |t| Shard::new(Rank { tp: t, pp: p }, TensorMap::new())))
        .collect();
    let n = shards.len();
    for (i, (name, t)) in hf.tensors().unwrap().iter().enumerate() {
        shards[i % n].tensors.insert(name.clone(), t.clone());
    }
    let raw = format!(
        "mcore_gpt: false\nnum_layers: 2\ntensor_model_parallel_size: {tp}\npipeline_model_parallel_size: {pp}\n\
         tokenizer:\n  model: nemo:00112233445566778899aabbccddeeff_tokenizer.model\n"
    );
    let meta = Meta {
        path: "memory".into(),
        flavour: Flavour::Nemo {
            layout: NemoLayout::for_parallelism(Parallelism { tp, pp }),
            gzip: false,
            extracted: false,
        },
        parallel: Parallelism { tp, pp },
        config: Some(ModelConfig::NemoYaml(nemo::NemoConfig::parse(raw, Path::new("t.yaml")).unwrap())),
        artifacts: vec![shardsmith_converters::Artifact {
            name: "00112233445566778899aabbccddeeff_tokenizer.model".into(),
            source: ByteSource::owned(std::fs::read(fixture("llama-mha/tokenizer.model")).unwrap()),
        }],
    };
    Checkpoint { meta, shards }
}

#[test]
fn nemo_loaders_read_our_archives() {
    let Some(py) = reference_python() else { return };
    let out = tempfile::tempdir().unwrap();
    for (tp, pp, gzip) in [(1, 1, false), (2, 1, false), (2, 2, false), (2, 1, true)] {
        let ckpt = nemo_from_fixture(tp, pp);
        let dest = out.path().join(format!("m{tp}{pp}{gzip}.nemo"));
        nemo::write(&ckpt, &dest, &nemo::WriteOptions { gzip, ..Default::default() }).unwrap();
        let expected = out.path().join(format!("expected{tp}{pp}{gzip}"));
        std::fs::create_dir(&expected).unwrap();
        let layout = NemoLayout::for_parallelism(Parallelism { tp, pp });
        for shard in &ckpt.shards {
            let member =
                layout.weights_member(shard.rank).replace('/', "__").replace(".ckpt", ".safetensors");
            safetensors::write_file(&shard.tensors, &expected.join(member), false).unwrap();
        }
        let line = run_checker(&py, "nemo_check.py", &[&dest, &expected]);
        assert!(line.starts_with("OK"), "tp={tp} pp={pp} gzip={gzip}: {line}");
    }
}

#[test]
fn transformers_loads_our_hf_directories_and_reproduces_golden_logits() {
    let Some(py) = reference_python() else { return };
    let out = tempfile::tempdir().unwrap();
    for (model, weights) in [
        ("llama-mha", hf_dir::WeightFormat::Safetensors),
        ("llama-gqa", hf_dir::WeightFormat::Bin),
        ("clip-vision", hf_dir::WeightFormat::Safetensors),
    ] {
        let ckpt = formats::open(&fixture(model)).unwrap();
        let dest = out.path().join(model);
        hf_dir::write(
            &ckpt,
            &dest,
            &hf_dir::WriteOptions { weights, max_shard_bytes: 200_000, overwrite: false },
        )
        .unwrap();
        let line = run_checker(&py, "hf_load_check.py", &[&dest, &fixture(&format!("{model}/golden"))]);
        assert!(line.starts_with("OK"), "{model}: {line}");
    }
}
