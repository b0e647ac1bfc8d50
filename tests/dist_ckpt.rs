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
