//! `shardsmith surgery …` on the fixtures: rename / drop, extract, resize-vocab, keep-layers,
//! merge-lora (against torch's merge in fixtures/lora-tiny), merge and swap-llm (llava-hf and NeVA
//! `.nemo`); refusals before any write; dry runs; reruns give identical bytes. The interop tests at the end have
//! transformers and sentencepiece load what we wrote (skipped without the reference venv).

mod common;

use common::{assert_same_tensors, fixture, ok, reference_python, refused, run_checker, s};
use shardsmith::commands::diff;
use shardsmith::commands::synth::{sentencepiece_model, synthetic_tensors, LlamaShape};
use shardsmith_converters::convert::sentencepiece::SentencePieceModel;
use shardsmith_converters::convert::{llama, llava, neva};
use shardsmith_converters::formats::{self, hf_dir, safetensors};
use shardsmith_converters::names::neva::EXTRA_IDS;
use shardsmith_converters::surgery::numeric::to_f32;
use shardsmith_converters::{Checkpoint, Flavour, Meta, ModelConfig, Parallelism, TensorMap};
use std::path::{Path, PathBuf};
use std::process::Command;

fn tensors(p: &Path) -> TensorMap {
    formats::open(p).unwrap().tensors().unwrap().clone()
}

fn hf_config(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p.join("config.json")).unwrap()).unwrap()
}

/// Every file of a directory (or the file itself), by relative name.
fn file_bytes(p: &Path) -> Vec<(String, Vec<u8>)> {
    if p.is_file() {
        return vec![(String::new(), std::fs::read(p).unwrap())];
    }
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(p)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|f| (f.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&f).unwrap()))
        .collect();
    files.sort();
    files
}

/// A synthetic HF LLaMA (seeded bf16 values) with a SentencePiece tokenizer of its vocabulary.
fn synthetic_hf(shape: &LlamaShape, out: &Path) -> PathBuf {
    let meta = Meta {
        path: out.to_path_buf(),
        flavour: Flavour::HfSafetensorsDir { sharded: false },
        parallel: Parallelism::default(),
        config: Some(ModelConfig::HfJson(shape.config_json())),
        artifacts: vec![shardsmith_converters::Artifact {
            name: "tokenizer.model".into(),
            source: shardsmith_converters::ByteSource::owned(sentencepiece_model(shape.vocab)),
        }],
    };
    hf_dir::write(&Checkpoint::single(meta, synthetic_tensors(shape, 11)), out, &Default::default()).unwrap();
    out.to_path_buf()
}

#[test]
fn rename_and_drop_by_pattern_round_trip_and_refuse_collisions() {
    let work = tempfile::tempdir().unwrap();
    let src = fixture("llama-mha");
    let renamed = work.path().join("renamed");
    let plan = ok(&[
        "surgery",
        "rename",
        s(&src),
        "-o",
        s(&renamed),
        "--rule",
        r"^model\.layers\.(\d+)\.mlp\.=blocks.$1.ffn.",
        "--dry-run",
    ]);
    assert!(
        plan.contains("renamed  blocks.0.ffn.up_proj.weight")
            && plan.contains("<- model.layers.0.mlp.up_proj.weight"),
        "{plan}"
    );
    assert!(!renamed.exists(), "a dry run writes nothing");
    ok(&[
        "surgery",
        "rename",
        s(&src),
        "-o",
        s(&renamed),
        "--rule",
        r"^model\.layers\.(\d+)\.mlp\.=blocks.$1.ffn.",
    ]);
    assert!(tensors(&renamed).contains_key("blocks.1.ffn.down_proj.weight"));
    // A dry run onto what now exists says the real run would refuse it.
    let rule = r"^model\.layers\.(\d+)\.mlp\.=blocks.$1.ffn.";
    let again = ok(&["surgery", "rename", s(&src), "-o", s(&renamed), "--rule", rule, "--dry-run"]);
    assert!(again.contains("(it exists: the real run would refuse without --force)"), "{again}");
    // And back: the very file transformers wrote (same names, same header, same bytes).
    let back = work.path().join("back");
    let report = ok(&[
        "surgery",
        "rename",
        s(&renamed),
        "-o",
        s(&back),
        "--rule",
        r"^blocks\.(\d+)\.ffn\.=model.layers.$1.mlp.",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!((v["written"].as_bool(), v["plan"]["summary"]["renamed"].as_u64()), (Some(true), Some(6)));
    assert!(
        std::fs::read(back.join("model.safetensors")).unwrap()
            == std::fs::read(src.join("model.safetensors")).unwrap()
    );
    assert_eq!(
        std::fs::read(back.join("tokenizer.json")).unwrap(),
        std::fs::read(src.join("tokenizer.json")).unwrap()
    );

    // Two tensors onto one name: refused, naming both, before anything is written.
    let dst = work.path().join("collide");
    let err =
        refused(&["surgery", "rename", s(&src), "-o", s(&dst), "--rule", r"^model\.layers\.\d+\.(.*)$=$1"]);
    assert!(err.contains("'model.layers.0.input_layernorm.weight' and 'model.layers.1.input_layernorm.weight' would both be named 'input_layernorm.weight'"), "{err}");
    let err = refused(&["surgery", "rename", s(&src), "-o", s(&dst), "--rule", "^lm_head=model.norm"]);
    assert!(err.contains("'lm_head.weight' and 'model.norm.weight'"), "{err}");
    assert!(refused(&["surgery", "rename", s(&src), "-o", s(&dst), "--rule", "nothing_like_this=x"])
        .contains("matches no tensor"));
    assert!(refused(&["surgery", "rename", s(&src), "-o", s(&dst), "--rule", "(unclosed=x"])
        .contains("--rule '(unclosed=x'"));
    assert!(!dst.exists());

    // Drop on every rank of a .nemo; the None keys of dropped modules go too.
    let nemo = work.path().join("m.nemo");
    ok(&["convert", s(&src), s(&nemo), "--tp", "2", "--pp", "2"]);
    let dropped = work.path().join("dropped.nemo");
    let out = ok(&["surgery", "drop", s(&nemo), "-o", s(&dropped), "--pattern", "*linear_fc1*"]);
    // fc1 weight + its fused norm, for 1 layer per stage × 2 stages × 2 tp ranks.
    assert!(out.contains("; 8 dropped"), "{out}");
    let c = formats::open(&dropped).unwrap();
    assert_eq!(c.meta.parallel, Parallelism { tp: 2, pp: 2 });
    for shard in &c.shards {
        assert!(shard.tensors.keys().all(|n| !n.contains("linear_fc1")));
        assert!(shard.none_keys.iter().all(|n| !n.contains("linear_fc1")), "{:?}", shard.none_keys);
        assert!(!shard.none_keys.is_empty());
    }
    let err = refused(&["surgery", "drop", s(&nemo), "-o", s(&dropped), "--pattern", "*no_such*", "--force"]);
    assert!(err.contains("--pattern '*no_such*'") && err.contains("matches no tensor"), "{err}");
}

#[test]
fn extract_writes_each_part_byte_exact_in_its_own_format() {
    let work = tempfile::tempdir().unwrap();
    let src = fixture("llava-tiny");
    let parts = llava::from_llava_hf(&formats::open(&src).unwrap()).unwrap();
    let (llm, vision, proj) =
        (work.path().join("llm"), work.path().join("vision"), work.path().join("mm_projector.safetensors"));
    ok(&["surgery", "extract", s(&src), "--part", "llm", "-o", s(&llm)]);
    ok(&["surgery", "extract", s(&src), "--part", "vision", "-o", s(&vision)]);
    ok(&["surgery", "extract", s(&src), "--part", "projector", "-o", s(&proj)]);

    let c = llama::from_hf(&formats::open(&llm).unwrap()).unwrap();
    assert_eq!(c.hparams, parts.llm.hparams);
    assert_same_tensors(&c.tensors, &parts.llm.tensors, "llm");
    assert_eq!(hf_config(&llm)["architectures"][0], "LlamaForCausalLM");
    for f in ["tokenizer.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json"] {
        assert_eq!(std::fs::read(llm.join(f)).unwrap(), std::fs::read(src.join(f)).unwrap(), "{f} copied");
    }
    assert_same_tensors(&tensors(&vision), &parts.vision, "vision");
    assert_eq!(hf_config(&vision)["model_type"], "clip_vision_model");
    assert!(vision.join("preprocessor_config.json").is_file());
    let p: TensorMap = parts.projector.iter().map(|(n, t)| (format!("model.{n}"), t.clone())).collect();
    assert_same_tensors(&tensors(&proj), &p, "projector");

    // A projector directory gets LLaVA's config beside the weights.
    let pdir = work.path().join("pdir");
    ok(&["surgery", "extract", s(&src), "--part", "projector", "-o", s(&pdir)]);
    let cfg = hf_config(&pdir);
    assert_eq!(
        (cfg["mm_projector_type"].as_str(), cfg["mm_hidden_size"].as_u64(), cfg["hidden_size"].as_u64()),
        (Some("mlp2x_gelu"), Some(48), Some(64))
    );
    assert!(pdir.join("mm_projector.safetensors").is_file());
    // Not multimodal: a clear refusal.
    let err = refused(&[
        "surgery",
        "extract",
        s(&fixture("llama-mha")),
        "--part",
        "llm",
        "-o",
        s(&work.path().join("x")),
    ]);
    assert!(err.contains("expected 'llava'"), "{err}");
}

/// Rows `[0, rows)` of a `[R, C]` f32 matrix, summed per column in f64 in row order, over `rows`.
fn column_mean(m: &[f32], cols: usize, rows: usize) -> Vec<f32> {
    let mut sum = vec![0f64; cols];
    for r in m.chunks_exact(cols).take(rows) {
        sum.iter_mut().zip(r).for_each(|(s, x)| *s += f64::from(*x));
    }
    sum.into_iter().map(|s| (s / rows as f64) as f32).collect()
}

#[test]
fn resize_vocab_adds_tokens_reproducibly_and_refuses_unsafe_shrinks() {
    let work = tempfile::tempdir().unwrap();
    let src = fixture("llama-mha");
    let out = work.path().join("added");
    ok(&["surgery", "resize-vocab", s(&src), "-o", s(&out), "--add-tokens", "<a>,<bb>"]);
    assert_eq!(hf_config(&out)["vocab_size"], 258);
    let (before, after) = (tensors(&src), tensors(&out));
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        let (old, new) = (to_f32(name, &before[name]).unwrap(), to_f32(name, &after[name]).unwrap());
        assert_eq!(after[name].shape, [258, 64]);
        assert_eq!(&new[..256 * 64], &old[..], "{name}: existing rows untouched");
        let mean = column_mean(&old, 64, 256);
        assert_eq!(&new[256 * 64..257 * 64], &mean[..], "{name}: new row = mean of the token rows");
        assert_eq!(&new[257 * 64..], &mean[..]);
    }
    let tj: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("tokenizer.json")).unwrap()).unwrap();
    let added: Vec<(u64, &str)> = tj["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["id"].as_u64().unwrap(), t["content"].as_str().unwrap()))
        .collect();
    assert_eq!(&added[3..], [(256, "<a>"), (257, "<bb>")]);
    // Bit-reproducible: a second run writes identical bytes, for every init.
    let again = work.path().join("again");
    ok(&["surgery", "resize-vocab", s(&src), "-o", s(&again), "--add-tokens", "<a>,<bb>"]);
    assert!(file_bytes(&out) == file_bytes(&again), "rerun differs");
    let seeded = |tag: &str, init: &str| {
        let p = work.path().join(tag);
        ok(&["surgery", "resize-vocab", s(&src), "-o", s(&p), "--to", "300", "--init", init]);
        std::fs::read(p.join("model.safetensors")).unwrap()
    };
    assert!(seeded("s1", "seeded:7") == seeded("s2", "seeded:7"));
    assert!(seeded("s3", "seeded:7") != seeded("s4", "seeded:8"));
    let z = tensors(&work.path().join("s1"));
    assert_eq!(z["lm_head.weight"].shape, [300, 64]);

    // Shrinking: dropping rows the tokenizer uses is refused; padding rows can go.
    let err = refused(&["surgery", "resize-vocab", s(&src), "-o", s(&work.path().join("x")), "--to", "250"]);
    assert!(err.contains("cannot shrink the vocabulary to 250") && err.contains("255 ("), "{err}");
    // A typo'd size is refused before rows are allocated for it.
    let err =
        refused(&["surgery", "resize-vocab", s(&src), "-o", s(&work.path().join("x")), "--to", "100000000"]);
    assert!(err.contains("--to 100000000: at most 16777216 rows"), "{err}");
    let err = refused(&[
        "surgery",
        "resize-vocab",
        s(&src),
        "-o",
        s(&work.path().join("x")),
        "--add-tokens",
        "<s>",
    ]);
    assert!(err.contains("already has '<s>' (id 1)"), "{err}");
    let grown = work.path().join("grown");
    ok(&["surgery", "resize-vocab", s(&fixture("llama-gqa")), "-o", s(&grown), "--to", "384"]);
    let shrunk = work.path().join("shrunk");
    ok(&["surgery", "resize-vocab", s(&grown), "-o", s(&shrunk), "--to", "333"]);
    assert!(ok(&["diff", s(&fixture("llama-gqa")), s(&shrunk)]).contains("MATCH"));

    // .nemo (tp 2, pp 2): the SentencePiece model gets the pieces, the vocabulary follows it.
    let nemo = work.path().join("m.nemo");
    ok(&["convert", s(&src), s(&nemo), "--tp", "2", "--pp", "2"]);
    let nemo_out = work.path().join("added.nemo");
    let plan = ok(&["surgery", "resize-vocab", s(&nemo), "-o", s(&nemo_out), "--add-tokens", "<a>,<bb>"]);
    assert!(plan.contains("USER_DEFINED SentencePiece pieces appended"), "{plan}");
    let c = formats::open(&nemo_out).unwrap();
    assert_eq!(c.meta.parallel, Parallelism { tp: 2, pp: 2 });
    let canon = llama::from_nemo(&c, None).unwrap();
    assert_eq!(canon.hparams.vocab, 258, "the tokenizer now has 258 pieces");
    assert_same_tensors(
        &canon.tensors,
        &llama::from_hf(&formats::open(&out).unwrap()).unwrap().tensors,
        "nemo vs HF resize",
    );
    let err =
        refused(&["surgery", "resize-vocab", s(&nemo), "-o", s(&work.path().join("y.nemo")), "--to", "300"]);
    assert!(err.contains("follows its tokenizer"), "{err}");
}

#[test]
fn keep_layers_is_byte_exact_for_hf_llava_and_nemo() {
    let work = tempfile::tempdir().unwrap();
    // HF LLaMA (sharded source): every kept tensor bit-identical, config updated.
    let src = fixture("llama-gqa");
    let out = work.path().join("gqa2");
    ok(&["surgery", "keep-layers", s(&src), "--first", "2", "-o", s(&out)]);
    assert_eq!(hf_config(&out)["num_hidden_layers"], 2);
    let (a, b) = (
        diff::canonical(&formats::open(&src).unwrap()).unwrap(),
        diff::canonical(&formats::open(&out).unwrap()).unwrap(),
    );
    let report = diff::diff(&a, &b, 0.0).unwrap();
    for row in &report.tensors {
        let is_layer2 = row.name.starts_with("model.layers.2.");
        match &row.verdict {
            diff::Verdict::Identical => assert!(!is_layer2, "{}", row.name),
            diff::Verdict::MissingInB { .. } => assert!(is_layer2, "{}", row.name),
            other => panic!("{}: {other:?}", row.name),
        }
    }
    assert_eq!(b.len(), 3 + 2 * 9);

    // llava-hf: the language model's layers go, vision tower and projector stay.
    let lv = work.path().join("llava1");
    ok(&["surgery", "keep-layers", s(&fixture("llava-tiny")), "--first", "1", "-o", s(&lv)]);
    assert_eq!(hf_config(&lv)["text_config"]["num_hidden_layers"], 1);
    let (orig, cut) = (tensors(&fixture("llava-tiny")), tensors(&lv));
    assert_eq!(orig.len() - cut.len(), 9);
    for (n, t) in &cut {
        assert!(t.bytes(n).unwrap() == orig[n.as_str()].bytes(n).unwrap(), "{n}");
    }
    assert_eq!(llava::from_llava_hf(&formats::open(&lv).unwrap()).unwrap().llm.hparams.layers, 1);

    // .nemo at tp 2, pp 2: re-emitted at tp 2, pp 2 with num_layers updated; bit-identical.
    let shape = LlamaShape { layers: 4, hidden: 64, ffn: 96, heads: 4, kv_heads: 2, vocab: 128 };
    let hf4 = synthetic_hf(&shape, &work.path().join("syn4"));
    let nemo = work.path().join("syn4.nemo");
    ok(&["convert", s(&hf4), s(&nemo), "--tp", "2", "--pp", "2"]);
    let cut = work.path().join("syn2.nemo");
    ok(&["surgery", "keep-layers", s(&nemo), "--first", "2", "-o", s(&cut)]);
    let c = formats::open(&cut).unwrap();
    assert_eq!(c.meta.parallel, Parallelism { tp: 2, pp: 2 });
    let Some(ModelConfig::NemoYaml(cfg)) = &c.meta.config else { panic!("no yaml") };
    assert_eq!(cfg.get_usize("num_layers"), Some(2));
    let hf2 = work.path().join("syn2-hf");
    ok(&["surgery", "keep-layers", s(&hf4), "--first", "2", "-o", s(&hf2)]);
    assert!(ok(&["diff", s(&cut), s(&hf2)]).contains("MATCH"));
    // Layers that no longer split over the pipeline stages: refused with what to do.
    let err =
        refused(&["surgery", "keep-layers", s(&nemo), "--first", "3", "-o", s(&work.path().join("z.nemo"))]);
    assert!(err.contains("do not split over 2 pipeline stages") && err.contains("reshard"), "{err}");
    let err = refused(&["surgery", "keep-layers", s(&src), "--first", "4", "-o", s(&work.path().join("z"))]);
    assert!(err.contains("only 3 layers"), "{err}");
}

/// `convert SRC DST` to a NeVA `.nemo` with the tower bundled, plus `extra` arguments.
fn to_bundled_neva(src: &Path, dst: &Path, extra: &[&str]) {
    let mut args = vec!["convert", s(src), s(dst), "--template", "vicuna_v1", "--vision", "bundle"];
    args.extend(extra);
    ok(&args);
}

/// keep-layers on a NeVA `.nemo` (per rank or a distributed checkpoint) keeps the language
/// model's first layers at the source's layout, projector and tower untouched: the same bundle as
/// cutting the llava-hf source first and converting that.
#[test]
fn keep_layers_cuts_a_neva_language_model() {
    let work = tempfile::tempdir().unwrap();
    let tiny = fixture("llava-tiny");
    let lv = work.path().join("llava1");
    ok(&["surgery", "keep-layers", s(&tiny), "--first", "1", "-o", s(&lv)]);
    let want = work.path().join("want.nemo");
    to_bundled_neva(&lv, &want, &["--tp", "2"]);
    for (tag, extra) in [("per-rank", &[][..]), ("zarr", &["--dist-ckpt", "zarr"][..])] {
        let nemo = work.path().join(format!("{tag}.nemo"));
        to_bundled_neva(&tiny, &nemo, &[&["--tp", "2"][..], extra].concat());
        let cut = work.path().join(format!("{tag}-1.nemo"));
        let plan = ok(&["surgery", "keep-layers", s(&nemo), "--first", "1", "-o", s(&cut)]);
        assert!(plan.contains("num_layers: 2 -> 1"), "{tag}: {plan}");
        let c = formats::open(&cut).unwrap();
        assert_eq!(c.meta.parallel, Parallelism { tp: 2, pp: 1 }, "{tag}: the source's layout, per rank");
        let report = ok(&["diff", s(&cut), s(&want)]);
        assert!(
            report.contains("MATCH") && report.contains(" 0 differ in value, 0 missing"),
            "{tag}: {report}"
        );
        let back = neva::from_neva(&c, None).unwrap();
        assert_eq!(back.llm.hparams.layers, 1);
    }
    // Layers that no longer split over the pipeline stages: refused, nothing written.
    let pp2 = work.path().join("pp2.nemo");
    to_bundled_neva(&tiny, &pp2, &["--tp", "2", "--pp", "2"]);
    let dst = work.path().join("z.nemo");
    let err = refused(&["surgery", "keep-layers", s(&pp2), "--first", "1", "-o", s(&dst)]);
    assert!(err.contains("do not split over 2 pipeline stages"), "{err}");
    assert!(!dst.exists());
}

/// merge of two NeVA `.nemo` files (per rank and distributed, different TP) is the NeVA of the
/// merged llava-hf sources: language model, projector and bundled tower merged under canonical
/// names, written like A. Mixed architectures and tower placements are refused.
#[test]
fn merge_combines_neva_bundles_part_by_part() {
    let work = tempfile::tempdir().unwrap();
    let p = |name: &str| work.path().join(name);
    let tiny = fixture("llava-tiny");
    let (a2, want) = (p("a2"), p("want"));
    ok(&["surgery", "merge", s(&tiny), s(&tiny), "--weights", "2,0", "-o", s(&a2)]);
    ok(&["surgery", "merge", s(&tiny), s(&a2), "--weights", "0.25,0.75", "-o", s(&want)]);
    let (na, nb, got) = (p("a.nemo"), p("b.nemo"), p("got.nemo"));
    to_bundled_neva(&tiny, &na, &["--tp", "2"]);
    to_bundled_neva(&a2, &nb, &["--dist-ckpt", "torch_dist"]);
    ok(&["surgery", "merge", s(&na), s(&nb), "--weights", "0.25,0.75", "-o", s(&got)]);
    let report = ok(&["diff", s(&got), s(&want)]);
    assert!(report.contains("MATCH") && report.contains(" 80 bit-identical"), "{report}");
    assert_eq!(formats::open(&got).unwrap().meta.parallel, Parallelism { tp: 2, pp: 1 }, "A's layout");

    let err = refused(&["surgery", "merge", s(&na), s(&tiny), "-o", s(&p("x.nemo"))]);
    assert!(err.contains("A is a NeVA .nemo and B is not"), "{err}");
    let referenced = p("ref.nemo");
    ok(&["convert", s(&tiny), s(&referenced), "--template", "vicuna_v1"]);
    let err = refused(&["surgery", "merge", s(&na), s(&referenced), "-o", s(&p("x.nemo"))]);
    assert!(err.contains("A bundles its vision tower and B references one"), "{err}");
    // LLaMA-only edits point a NeVA file to extract → edit → swap-llm.
    let err = refused(&["surgery", "resize-vocab", s(&na), "--to", "400", "-o", s(&p("x.nemo"))]);
    assert!(err.contains("a NeVA .nemo") && err.contains("swap-llm"), "{err}");
    let adapter = fixture("lora-tiny/adapter");
    let err = refused(&["surgery", "merge-lora", s(&na), "--adapter", s(&adapter), "-o", s(&p("x.nemo"))]);
    assert!(err.contains("a NeVA .nemo") && err.contains("swap-llm"), "{err}");
    // A multimodal --llm for swap-llm is named as such, for either kind of bundle.
    for bundle in [&tiny, &na] {
        let err = refused(&["surgery", "swap-llm", s(bundle), "--llm", s(&nb), "-o", s(&p("x.nemo"))]);
        assert!(err.contains("--llm is a multimodal checkpoint"), "{err}");
    }
    assert!(!p("x.nemo").exists());
}

/// Compare each golden tensor with ours: max |ours − torch| ≤ 1e-6 · max |torch|.
fn assert_close_to_golden(ours: &TensorMap, golden: &TensorMap, what: &str) {
    for (name, want) in golden {
        let (a, b) = (to_f32(name, &ours[name.as_str()]).unwrap(), to_f32(name, want).unwrap());
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        let err = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(err <= 1e-6 * scale, "{what} {name}: max abs error {err:e} vs scale {scale}");
    }
}

#[test]
fn merge_lora_matches_torch_and_reruns_bit_exactly() {
    let work = tempfile::tempdir().unwrap();
    let base = fixture("llama-mha");
    let base_t = tensors(&base);
    for adapter in ["adapter", "adapter-rslora"] {
        let out = work.path().join(adapter);
        ok(&[
            "surgery",
            "merge-lora",
            s(&base),
            "--adapter",
            s(&fixture(&format!("lora-tiny/{adapter}"))),
            "-o",
            s(&out),
        ]);
        let merged = tensors(&out);
        let golden =
            safetensors::read_file(&fixture(&format!("lora-tiny/golden/merged-{adapter}.safetensors")))
                .unwrap();
        assert_close_to_golden(&merged, &golden, adapter);
        let replaced = if adapter == "adapter-rslora" { vec!["lm_head.weight"] } else { vec![] };
        for (n, t) in &merged {
            if golden.contains_key(n) {
                continue;
            }
            let want = if replaced.contains(&n.as_str()) {
                let a =
                    safetensors::read_file(&fixture("lora-tiny/adapter-rslora/adapter_model.safetensors"))
                        .unwrap();
                a["base_model.model.lm_head.weight"].bytes(n).unwrap().into_owned()
            } else {
                base_t[n.as_str()].bytes(n).unwrap().into_owned()
            };
            assert!(t.bytes(n).unwrap() == want, "{adapter}: {n} should be untouched or replaced");
        }
        let again = work.path().join(format!("{adapter}-again"));
        ok(&[
            "surgery",
            "merge-lora",
            s(&base),
            "--adapter",
            s(&fixture(&format!("lora-tiny/{adapter}"))),
            "-o",
            s(&again),
        ]);
        assert!(file_bytes(&out) == file_bytes(&again), "{adapter}: rerun differs");
    }
    // A .nemo base merges to the same weights, at its own tp.
    let nemo = work.path().join("m.nemo");
    ok(&["convert", s(&base), s(&nemo), "--tp", "2"]);
    let nemo_out = work.path().join("merged.nemo");
    ok(&[
        "surgery",
        "merge-lora",
        s(&nemo),
        "--adapter",
        s(&fixture("lora-tiny/adapter")),
        "-o",
        s(&nemo_out),
    ]);
    assert_eq!(formats::open(&nemo_out).unwrap().meta.parallel.tp, 2);
    assert!(ok(&["diff", s(&nemo_out), s(&work.path().join("adapter"))]).contains("MATCH"));
    // fan_in_fan_out: true merges as false: PEFT turns it off for nn.Linear targets (all of
    // LLaMA's), so transposing the product (the same shape for q_proj) would be silently wrong.
    let fifo = work.path().join("adapter-fifo");
    std::fs::create_dir(&fifo).unwrap();
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        std::fs::copy(fixture("lora-tiny/adapter").join(f), fifo.join(f)).unwrap();
    }
    let config = std::fs::read_to_string(fifo.join("adapter_config.json")).unwrap();
    assert!(config.contains("\"fan_in_fan_out\": false"), "{config}");
    std::fs::write(
        fifo.join("adapter_config.json"),
        config.replace("\"fan_in_fan_out\": false", "\"fan_in_fan_out\": true"),
    )
    .unwrap();
    let fifo_out = work.path().join("merged-fifo");
    ok(&["surgery", "merge-lora", s(&base), "--adapter", s(&fifo), "-o", s(&fifo_out)]);
    assert!(ok(&["diff", s(&fifo_out), s(&work.path().join("adapter"))]).contains("MATCH"));
    // An adapter for another model is refused with the shapes.
    let err = refused(&[
        "surgery",
        "merge-lora",
        s(&fixture("llama-gqa")),
        "--adapter",
        s(&fixture("lora-tiny/adapter")),
        "-o",
        s(&work.path().join("x")),
    ]);
    assert!(err.contains("module 'model.layers.0.self_attn.v_proj'") || err.contains("shape"), "{err}");
}

#[test]
fn merge_averages_in_f32_and_refuses_different_architectures() {
    let work = tempfile::tempdir().unwrap();
    let a = fixture("llama-mha");
    // A with itself at 0.5 / 0.5 is A, bit for bit.
    let same = work.path().join("same");
    ok(&["surgery", "merge", s(&a), s(&a), "-o", s(&same)]);
    assert!(ok(&["diff", s(&a), s(&same)]).contains("MATCH"));
    // A with a LoRA-merged copy: exactly 0.75·a + 0.25·b in f32, element by element.
    let b = work.path().join("b");
    ok(&["surgery", "merge-lora", s(&a), "--adapter", s(&fixture("lora-tiny/adapter")), "-o", s(&b)]);
    let m = work.path().join("m");
    ok(&["surgery", "merge", s(&a), s(&b), "--weight", "0.25", "-o", s(&m)]);
    let (ta, tb, tm) = (tensors(&a), tensors(&b), tensors(&m));
    for name in ["model.layers.0.self_attn.q_proj.weight", "model.norm.weight"] {
        let (x, y, z) = (
            to_f32(name, &ta[name]).unwrap(),
            to_f32(name, &tb[name]).unwrap(),
            to_f32(name, &tm[name]).unwrap(),
        );
        let want: Vec<f32> = x.iter().zip(&y).map(|(x, y)| 0.75 * x + 0.25 * y).collect();
        assert_eq!(z, want, "{name}");
    }
    // HF and .nemo merge by canonical name; the output takes A's container.
    let nemo = work.path().join("b.nemo");
    ok(&["convert", s(&b), s(&nemo), "--tp", "2"]);
    let m2 = work.path().join("m2");
    ok(&["surgery", "merge", s(&a), s(&nemo), "--weights", "0.75,0.25", "-o", s(&m2)]);
    assert!(ok(&["diff", s(&m), s(&m2)]).contains("MATCH"));
    // Different architectures: every difference listed.
    let err =
        refused(&["surgery", "merge", s(&a), s(&fixture("llama-gqa")), "-o", s(&work.path().join("x"))]);
    assert!(
        err.contains("layers: A 2, B 3")
            && err.contains("query groups: A 4, B 2")
            && err.contains("vocabulary: A 256, B 333"),
        "{err}"
    );
    let err =
        refused(&["surgery", "merge", s(&a), s(&fixture("llava-tiny")), "-o", s(&work.path().join("x"))]);
    assert!(err.contains("A is a LLaMA checkpoint and B is not"), "{err}");
    // Non-LLaMA checkpoints merge by stored name.
    let lv = work.path().join("lv");
    ok(&[
        "surgery",
        "merge",
        s(&fixture("llava-tiny")),
        s(&fixture("llava-tiny")),
        "-o",
        s(&lv),
        "--weights",
        "0.5,0.5",
    ]);
    assert!(
        std::fs::read(lv.join("model.safetensors")).unwrap()
            == std::fs::read(fixture("llava-tiny/model.safetensors")).unwrap()
    );
}

#[test]
fn swap_llm_keeps_vision_and_projector_brings_the_tokenizer_and_refuses_mismatches() {
    let work = tempfile::tempdir().unwrap();
    let bundle = fixture("llava-tiny");
    let llm = work.path().join("llm");
    ok(&["surgery", "extract", s(&bundle), "--part", "llm", "-o", s(&llm)]);
    let llm1 = work.path().join("llm1");
    ok(&["surgery", "keep-layers", s(&llm), "--first", "1", "-o", s(&llm1)]);
    let out = work.path().join("swapped");
    ok(&["surgery", "swap-llm", s(&bundle), "--llm", s(&llm1), "-o", s(&out)]);
    let (orig, swapped, new_llm) = (tensors(&bundle), tensors(&out), tensors(&llm1));
    for (n, t) in &orig {
        if !n.starts_with("language_model.") {
            assert!(swapped[n.as_str()].bytes(n).unwrap() == t.bytes(n).unwrap(), "{n} must stay byte-exact");
        }
    }
    for (n, t) in &new_llm {
        let stored = if n == "lm_head.weight" {
            "language_model.lm_head.weight".to_string()
        } else {
            format!("language_model.{n}")
        };
        assert!(swapped[stored.as_str()].bytes(n).unwrap() == t.bytes(n).unwrap(), "{stored}");
    }
    assert_eq!(hf_config(&out)["text_config"]["num_hidden_layers"], 1);
    assert_eq!(hf_config(&out)["text_config"]["pad_token_id"], 257);
    // Hidden sizes must match (the projector outputs the old one).
    let small = synthetic_hf(
        &LlamaShape { layers: 1, hidden: 32, ffn: 48, heads: 2, kv_heads: 2, vocab: 320 },
        &work.path().join("h32"),
    );
    let err =
        refused(&["surgery", "swap-llm", s(&bundle), "--llm", s(&small), "-o", s(&work.path().join("x"))]);
    assert!(err.contains("hidden size 32") && err.contains("(64,"), "{err}");
    // Another LLaMA brings its own tokenizer, <image> and <pad> appended after its 333 ids: it
    // reads text exactly as it did alone, and the bundle still takes images.
    let gqa = work.path().join("gqa-bundle");
    ok(&["surgery", "swap-llm", s(&bundle), "--llm", s(&fixture("llama-gqa")), "-o", s(&gqa)]);
    let cfg = hf_config(&gqa);
    assert_eq!(
        (cfg["image_token_index"].as_u64(), cfg["text_config"]["pad_token_id"].as_u64()),
        (Some(333), Some(334))
    );
    assert!(gqa.join("processor_config.json").is_file() && !gqa.join("added_tokens.json").exists());
    let tok_cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(gqa.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(tok_cfg["pad_token"], "<pad>", "the bundle pads with <pad>");
    let generate = |ckpt: &Path, extra: &[&str]| {
        let mut args = vec!["generate", s(ckpt), "--max-new-tokens", "5", "--json"];
        args.extend(extra);
        let v: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
        (v["prompt_ids"].clone(), v["new_ids"].clone())
    };
    let text = ["--prompt", "Hello world, the model", "--template", "raw"];
    assert_eq!(generate(&gqa, &text), generate(&fixture("llama-gqa"), &text));
    let image = fixture("llava-tiny/image.png");
    let (prompt, _) = generate(&gqa, &["--prompt", "What?", "--image", s(&image)]);
    assert_eq!(prompt.as_array().unwrap().iter().filter(|id| id.as_u64() == Some(333)).count(), 16);
    // A .nemo LLM is named: its tokenizer files would have to be made first.
    let nemo = work.path().join("gqa.nemo");
    ok(&["convert", s(&fixture("llama-gqa")), s(&nemo)]);
    let err =
        refused(&["surgery", "swap-llm", s(&bundle), "--llm", s(&nemo), "-o", s(&work.path().join("x"))]);
    assert!(err.contains("convert the .nemo first"), "{err}");
    let err = refused(&[
        "surgery",
        "swap-llm",
        s(&bundle),
        "--llm",
        s(&fixture("llama-gqa-bin")),
        "-o",
        s(&work.path().join("x")),
    ]);
    assert!(err.contains("missing a tokenizer (tokenizer.model or tokenizer.json)"), "{err}");
    assert!(!work.path().join("x").exists());
}

#[test]
fn dry_runs_print_json_plans_and_write_nothing() {
    let work = tempfile::tempdir().unwrap();
    let dst = work.path().join("out");
    for args in [
        vec!["keep-layers", s(&fixture("llama-mha")), "--first", "1"],
        vec!["resize-vocab", s(&fixture("llama-mha")), "--add-tokens", "<x>"],
        vec!["extract", s(&fixture("llava-tiny")), "--part", "vision"],
        vec!["drop", s(&fixture("llama-mha")), "--pattern", "lm_head*"],
    ] {
        let mut full = vec!["surgery"];
        full.extend(&args);
        full.extend(["-o", s(&dst), "--dry-run", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&ok(&full)).unwrap();
        assert_eq!(v["written"], false, "{args:?}");
        assert!(v["plan"]["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["bytes"].is_u64() && t["shape"].is_array()));
        assert!(!dst.exists(), "{args:?} wrote something");
    }
}

// ------------------------------------------------------------------------------------------------
// Interop: the reference stack loads what surgery wrote.

#[test]
fn transformers_loads_extracted_parts_and_swapped_bundle() {
    let Some(py) = reference_python() else { return };
    let work = tempfile::tempdir().unwrap();
    let src = fixture("llava-tiny");
    let (llm, vision, proj) =
        (work.path().join("llm"), work.path().join("vision"), work.path().join("p.safetensors"));
    ok(&["surgery", "extract", s(&src), "--part", "llm", "-o", s(&llm)]);
    ok(&["surgery", "extract", s(&src), "--part", "vision", "-o", s(&vision)]);
    ok(&["surgery", "extract", s(&src), "--part", "projector", "-o", s(&proj)]);
    let line = run_checker(&py, "surgery_check.py", &[Path::new("extract"), &src, &llm, &vision, &proj]);
    assert!(line.starts_with("OK"), "{line}");
    let llm1 = work.path().join("llm1");
    ok(&["surgery", "keep-layers", s(&llm), "--first", "1", "-o", s(&llm1)]);
    let swapped = work.path().join("swapped");
    ok(&["surgery", "swap-llm", s(&src), "--llm", s(&llm1), "-o", s(&swapped)]);
    let line = run_checker(&py, "surgery_check.py", &[Path::new("swap"), &src, &llm1, &swapped]);
    assert!(line.starts_with("OK"), "{line}");
}

#[test]
fn transformers_and_sentencepiece_read_added_tokens() {
    let Some(py) = reference_python() else { return };
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("hf");
    ok(&["surgery", "resize-vocab", s(&fixture("llama-mha")), "-o", s(&out), "--add-tokens", "<a>,<bb>"]);
    let line = run_checker(
        &py,
        "surgery_check.py",
        &[Path::new("tokens"), &out, Path::new("256"), Path::new("<a>"), Path::new("<bb>")],
    );
    assert!(line.starts_with("OK"), "{line}");
    // A directory with only a SentencePiece model gets an added_tokens.json transformers reads.
    let sp = work.path().join("sp");
    std::fs::create_dir(&sp).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.model"] {
        std::fs::copy(fixture("llama-mha").join(f), sp.join(f)).unwrap();
    }
    let sp_out = work.path().join("sp-out");
    ok(&["surgery", "resize-vocab", s(&sp), "-o", s(&sp_out), "--add-tokens", "<a>,<bb>"]);
    assert!(sp_out.join("added_tokens.json").is_file());
    let line = run_checker(
        &py,
        "surgery_check.py",
        &[Path::new("tokens"), &sp_out, Path::new("256"), Path::new("<a>"), Path::new("<bb>")],
    );
    assert!(line.starts_with("OK"), "{line}");
    // The .nemo's edited SentencePiece model equals protobuf's own edit.
    let nemo = work.path().join("m.nemo");
    ok(&["convert", s(&fixture("llama-mha")), s(&nemo)]);
    let nemo_out = work.path().join("added.nemo");
    ok(&["surgery", "resize-vocab", s(&nemo), "-o", s(&nemo_out), "--add-tokens", "<a>,<bb>"]);
    let c = formats::open(&nemo_out).unwrap();
    let model = work.path().join("edited.model");
    std::fs::write(
        &model,
        c.meta
            .artifacts
            .iter()
            .find(|a| a.name.ends_with("tokenizer.model"))
            .unwrap()
            .source
            .bytes()
            .unwrap(),
    )
    .unwrap();
    let line = run_checker(
        &py,
        "surgery_check.py",
        &[
            Path::new("sentencepiece"),
            &fixture("llama-mha/tokenizer.model"),
            &model,
            Path::new("<a>"),
            Path::new("<bb>"),
        ],
    );
    assert!(line.starts_with("OK"), "{line}");
}

/// What a layer-0 QKV LoRA changes, by canonical name.
const LAYER0_QKV: [&str; 3] = [
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.v_proj.weight",
];

/// A NeMo LoRA adapter `.nemo` (tp 2) for llama-mha's layer-0 QKV, with `linear_out` = `out`.
fn nemo_lora_adapter(dir: &Path, name: &str, out: f32) -> PathBuf {
    nemo_lora_adapter_with(dir, name, out, 96, &[], &[])
}

/// A NeMo LoRA adapter `.nemo` (tp 2, rank 4, hidden 64) for layer 0's QKV (`qkv_rows` per rank),
/// `linear_out` = `out`, and `whole` tensors saved beside it on the ranks `whole_ranks`, as NeVA
/// PEFT saves its projector.
fn nemo_lora_adapter_with(
    dir: &Path,
    name: &str,
    out: f32,
    qkv_rows: usize,
    whole: &[(String, Vec<usize>)],
    whole_ranks: &[usize],
) -> PathBuf {
    use shardsmith_converters::formats::nemo;
    use shardsmith_converters::{ByteSource, NemoLayout, Rank, Shard, TensorEntry};
    let origin: std::sync::Arc<Path> = std::sync::Arc::from(Path::new("adapter"));
    let t = |shape: Vec<usize>, v: f32| {
        let n: usize = shape.iter().product();
        let bytes: Vec<u8> = (0..n).flat_map(|i| (v * ((i % 7) as f32 - 3.0)).to_le_bytes()).collect();
        TensorEntry::new(shardsmith_converters::DType::F32, shape, ByteSource::owned(bytes), origin.clone())
    };
    let pre = "model.decoder.layers.0.self_attention.adapter_layer.lora_kqv_adapter";
    let shards = (0..2)
        .map(|tp| {
            let mut m = TensorMap::new();
            m.insert(format!("{pre}.linear_in.weight"), t(vec![2, 64], 0.01));
            m.insert(format!("{pre}.linear_out.weight"), t(vec![qkv_rows, 4], out));
            for (name, shape) in whole.iter().filter(|_| whole_ranks.contains(&tp)) {
                m.insert(name.clone(), t(shape.clone(), 0.25));
            }
            Shard::new(Rank { tp, pp: 0 }, m)
        })
        .collect();
    let yaml = "mcore_gpt: true\ntensor_model_parallel_size: 2\npipeline_model_parallel_size: 1\n\
                peft:\n  peft_scheme: lora\n  lora_tuning:\n    adapter_dim: 4\n    alpha: 8\n";
    let parallel = Parallelism { tp: 2, pp: 1 };
    let meta = Meta {
        path: dir.join(name),
        flavour: Flavour::Nemo {
            layout: NemoLayout::for_parallelism(parallel),
            gzip: false,
            extracted: false,
        },
        parallel,
        config: Some(ModelConfig::NemoYaml(nemo::NemoConfig::parse(yaml.into(), Path::new("y")).unwrap())),
        artifacts: vec![],
    };
    let path = dir.join(name);
    nemo::write(&Checkpoint { meta, shards }, &path, &Default::default()).unwrap();
    path
}

/// NeVA PEFT saves the projector it trains beside the LoRA weights: merge-lora on a NeVA `.nemo`
/// merges the LoRA into the language model and takes the adapter's projector, keeping the TP
/// layout and the vision tower; a tensor the base lacks is refused by name.
#[test]
fn merge_lora_takes_a_neva_adapters_projector() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let base = neva_from_tiny(w, "base", &["--tp", "2"]);
    let proj = "model.embedding.word_embeddings.adapter_layer.mm_projector_adapter.mm_projector";
    let whole: Vec<(String, Vec<usize>)> =
        [("0.weight", vec![64, 48]), ("0.bias", vec![64]), ("2.weight", vec![64, 64]), ("2.bias", vec![64])]
            .into_iter()
            .map(|(n, shape)| (format!("{proj}.{n}"), shape))
            .collect();
    let adapter = nemo_lora_adapter_with(w, "neva-lora.nemo", 0.5, 64, &whole, &[0, 1]);
    let merged = w.join("merged.nemo");
    let plan = ok(&["surgery", "merge-lora", s(&base), "--adapter", s(&adapter), "-o", s(&merged)]);
    assert!(plan.contains("10 modified") && plan.contains("replaced by the adapter's"), "{plan}");
    let (before, after) = (neva_parts(&base), neva_parts(&merged));
    assert_eq!(formats::open(&merged).unwrap().meta.parallel, Parallelism { tp: 2, pp: 1 });
    // The projector is the adapter's: every value v·((i mod 7) − 3) with v = 0.25.
    for (name, t) in &after.projector {
        let b = t.bytes(name).unwrap();
        let got: Vec<f32> = b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert!(got.iter().enumerate().all(|(i, x)| *x == 0.25 * ((i % 7) as f32 - 3.0)), "{name}");
    }
    let changed: Vec<&String> = before
        .llm
        .tensors
        .iter()
        .filter(|(n, t)| t.bytes(n).unwrap() != after.llm.tensors[*n].bytes(n).unwrap())
        .map(|(n, _)| n)
        .collect();
    assert_eq!(changed, LAYER0_QKV);
    assert!(before.vision.iter().all(|(n, t)| t.bytes(n).unwrap() == after.vision[n].bytes(n).unwrap()));
    // Refused by name, nothing written: a whole tensor the base does not have; one saved on only
    // some of the ranks that hold it; a misshapen one; one that is also LoRA-adapted.
    let qkv = "model.decoder.layers.0.self_attention.linear_qkv.weight";
    type Case<'a> = (&'a str, Vec<(String, Vec<usize>)>, &'a [usize], &'a str);
    let cases: [Case; 4] = [
        (
            "stray",
            vec![("model.extra.weight".into(), vec![2, 2])],
            &[0, 1],
            "tensor 'model.extra.weight' (tp=0 pp=0) is neither a NeMo LoRA",
        ),
        (
            "partial",
            whole[..1].to_vec(),
            &[0],
            "mm_projector.0.weight' on tp=1 pp=0 (the adapter saves it whole on tp=0 pp=0",
        ),
        (
            "shape",
            vec![(whole[1].0.clone(), vec![32])],
            &[0, 1],
            "mm_projector.0.bias' (tp=0 pp=0): the adapter's is f32 [32], the base's f32 [64]",
        ),
        (
            "both",
            vec![(qkv.into(), vec![64, 64])],
            &[0, 1],
            "linear_qkv.weight' (tp=0 pp=0) is both LoRA-adapted and saved whole",
        ),
    ];
    for (tag, whole, ranks, want) in cases {
        let bad = nemo_lora_adapter_with(w, &format!("{tag}.nemo"), 0.5, 64, &whole, ranks);
        let out = w.join(format!("{tag}-merged.nemo"));
        let err = refused(&["surgery", "merge-lora", s(&base), "--adapter", s(&bad), "-o", s(&out)]);
        assert!(err.contains(want), "{tag}: {err}");
        assert!(!out.exists(), "{tag}");
    }
}

#[test]
fn merge_lora_reads_nemo_lora_adapters() {
    let work = tempfile::tempdir().unwrap();
    let base = work.path().join("base.nemo");
    ok(&["convert", s(&fixture("llama-mha")), s(&base), "--tp", "2"]);
    // linear_out = 0: the merge is the identity.
    let zero = nemo_lora_adapter(work.path(), "zero.nemo", 0.0);
    let same = work.path().join("same.nemo");
    ok(&["surgery", "merge-lora", s(&base), "--adapter", s(&zero), "-o", s(&same)]);
    assert!(ok(&["diff", s(&base), s(&same)]).contains("MATCH"));
    // Otherwise exactly layer 0's q, k and v change, and the layout is kept.
    let lora = nemo_lora_adapter(work.path(), "lora.nemo", 0.5);
    let merged = work.path().join("merged.nemo");
    let plan = ok(&["surgery", "merge-lora", s(&base), "--adapter", s(&lora), "-o", s(&merged)]);
    assert!(plan.contains("2 modified") && plan.contains("alpha 8 / dim 4"), "{plan}");
    assert_eq!(formats::open(&merged).unwrap().meta.parallel, Parallelism { tp: 2, pp: 1 });
    let report = diff::diff(
        &diff::canonical(&formats::open(&base).unwrap()).unwrap(),
        &diff::canonical(&formats::open(&merged).unwrap()).unwrap(),
        0.0,
    )
    .unwrap();
    let changed: Vec<&str> = report
        .tensors
        .iter()
        .filter(|r| !matches!(r.verdict, diff::Verdict::Identical))
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(changed, LAYER0_QKV);
    // An adapter saved at another tp is refused.
    let tp1 = work.path().join("tp1.nemo");
    ok(&["convert", s(&fixture("llama-mha")), s(&tp1)]);
    let err = refused(&[
        "surgery",
        "merge-lora",
        s(&tp1),
        "--adapter",
        s(&lora),
        "-o",
        s(&work.path().join("x.nemo")),
    ]);
    assert!(err.contains("adapter saved at tp=2 pp=1, base at tp=1 pp=1"), "{err}");
}

// ------------------------------------------------------------------------------------------------
// NeVA `.nemo` bundles.

/// llava-tiny → NeVA `.nemo` with `args` (`--tp`, `--vision bundle`, …).
fn neva_from_tiny(work: &Path, tag: &str, args: &[&str]) -> PathBuf {
    let nemo = work.join(format!("{tag}.nemo"));
    let tiny = fixture("llava-tiny");
    let mut full = vec!["convert", s(&tiny), s(&nemo), "--template", "vicuna_v1"];
    full.extend(args);
    ok(&full);
    nemo
}

fn neva_parts(nemo: &Path) -> llava::CanonicalLlava {
    neva::from_neva(&formats::open(nemo).unwrap(), None).unwrap()
}

/// The first `rows` rows of a `[R, C]` tensor, as bytes.
fn first_rows(t: &shardsmith_converters::TensorEntry, rows: usize) -> Vec<u8> {
    let b = t.bytes("rows").unwrap();
    b[..rows * (b.len() / t.shape[0])].to_vec()
}

/// The stored projector and vision-tower tensors of a NeVA `.nemo`, per rank.
fn stored_non_llm(nemo: &Path) -> Vec<((usize, usize), String, Vec<u8>)> {
    let c = formats::open(nemo).unwrap();
    let mut out = Vec::new();
    for shard in &c.shards {
        for (n, t) in &shard.tensors {
            if n.contains("mm_projector") || n.contains("vision_encoder") {
                out.push(((shard.rank.tp, shard.rank.pp), n.clone(), t.bytes(n).unwrap().into_owned()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn extract_takes_each_part_out_of_a_neva_nemo_byte_exact() {
    let work = tempfile::tempdir().unwrap();
    let tiny = fixture("llava-tiny");
    let hf = llava::from_llava_hf(&formats::open(&tiny).unwrap()).unwrap();
    let hf_sp = std::fs::read(tiny.join("tokenizer.model")).unwrap();
    for (tag, args) in [("bundled-tp2", vec!["--tp", "2", "--vision", "bundle"]), ("referenced-tp1", vec![])]
    {
        let nemo = neva_from_tiny(work.path(), tag, &args);
        let parts = neva_parts(&nemo);
        let dir = work.path().join(tag);
        std::fs::create_dir_all(&dir).unwrap();
        let (llm, vision, proj) = (dir.join("llm"), dir.join("vision"), dir.join("mm_projector.safetensors"));
        ok(&["surgery", "extract", s(&nemo), "--part", "llm", "-o", s(&llm)]);
        ok(&["surgery", "extract", s(&nemo), "--part", "vision", "-o", s(&vision)]);
        ok(&["surgery", "extract", s(&nemo), "--part", "projector", "-o", s(&proj)]);

        // LLM: NeVA's tokenizer as stored = llava-tiny's 256 pieces + <extra_id_0..7> (ids
        // 256..=263), and the embedding and head cut to exactly those 264 ids.
        let sp_bytes = std::fs::read(llm.join("tokenizer.model")).unwrap();
        assert!(sp_bytes == parts.tokenizer.as_ref().unwrap().bytes().unwrap().as_ref(), "{tag}: tokenizer");
        let sp = SentencePieceModel::parse(sp_bytes, &llm).unwrap();
        assert_eq!(sp.len(), 264, "{tag}");
        assert_eq!(sp.id("<extra_id_0>"), Some(256));
        assert_eq!(sp.without_appended(&EXTRA_IDS, &llm).unwrap().bytes(), hf_sp.as_slice(), "{tag}");
        let c = llama::from_hf(&formats::open(&llm).unwrap()).unwrap();
        assert_eq!(hf_config(&llm)["vocab_size"], 264);
        assert_eq!(hf_config(&llm)["architectures"][0], "LlamaForCausalLM");
        let mut expect = c.hparams.clone();
        expect.vocab = parts.llm.hparams.vocab;
        // NeVA's yaml leaves BOS / EOS to the tokenizer; config.json spells LLaMA's 1 / 2.
        assert_eq!((c.hparams.bos, c.hparams.eos), (Some(1), Some(2)));
        (expect.bos, expect.eos) = (parts.llm.hparams.bos, parts.llm.hparams.eos);
        assert_eq!(expect, parts.llm.hparams, "{tag}: hparams other than the vocabulary");
        assert_eq!((parts.llm.hparams.vocab, hf.llm.hparams.vocab), (320, 320));
        assert_eq!(c.tensors.keys().collect::<Vec<_>>(), hf.llm.tensors.keys().collect::<Vec<_>>());
        for (n, t) in &c.tensors {
            if n == "model.embed_tokens.weight" || n == "lm_head.weight" {
                // Rows 0..264 are bit-identical to NeVA's canonical rows and to llava-hf's (rows
                // 256..263 hold what llava-hf had there: <image>, <pad>, padding); llava-hf's
                // rows 264..320 are padding past the NeVA tokenizer, dropped.
                assert_eq!(t.shape, [264, 64], "{tag}: {n}");
                let got = t.bytes(n).unwrap();
                assert!(*got == first_rows(&parts.llm.tensors[n.as_str()], 264), "{tag}: {n} vs NeVA");
                assert!(*got == first_rows(&hf.llm.tensors[n.as_str()], 264), "{tag}: {n} vs llava-hf");
            } else {
                let (a, b) = (&parts.llm.tensors[n.as_str()], &hf.llm.tensors[n.as_str()]);
                assert!(t.bytes(n).unwrap() == a.bytes(n).unwrap(), "{tag}: {n} vs NeVA");
                assert!(t.bytes(n).unwrap() == b.bytes(n).unwrap(), "{tag}: {n} vs llava-hf");
            }
        }
        // Vision tower (bundled, or the local from_pretrained directory) and projector.
        assert_same_tensors(&tensors(&vision), &parts.vision, "vision vs NeVA");
        assert_same_tensors(&tensors(&vision), &hf.vision, "vision vs llava-hf");
        assert_eq!(hf_config(&vision)["model_type"], "clip_vision_model");
        assert!(vision.join("preprocessor_config.json").is_file());
        let p: TensorMap = hf.projector.iter().map(|(n, t)| (format!("model.{n}"), t.clone())).collect();
        assert_same_tensors(&tensors(&proj), &p, "projector");
        // Extracting twice gives identical bytes.
        let again = dir.join("llm2");
        ok(&["surgery", "extract", s(&nemo), "--part", "llm", "-o", s(&again)]);
        assert_eq!(file_bytes(&llm), file_bytes(&again), "{tag}: rerun");
    }
    // A projector directory carries LLaVA's config.
    let nemo = work.path().join("referenced-tp1.nemo");
    let pdir = work.path().join("pdir");
    ok(&["surgery", "extract", s(&nemo), "--part", "projector", "-o", s(&pdir)]);
    let cfg = hf_config(&pdir);
    assert_eq!(
        (cfg["mm_projector_type"].as_str(), cfg["mm_hidden_size"].as_u64(), cfg["hidden_size"].as_u64()),
        (Some("mlp2x_gelu"), Some(48), Some(64))
    );
    assert_eq!(cfg["mm_vision_select_feature"], "patch");

    // A referenced tower that does not resolve: refused, naming from_pretrained; nothing written.
    let y = match formats::open(&nemo).unwrap().meta.config {
        Some(ModelConfig::NemoYaml(c)) => c,
        _ => unreachable!(),
    };
    let tower = PathBuf::from(y.get_str("mm_cfg.vision_encoder.from_pretrained").unwrap());
    std::fs::remove_dir_all(&tower).unwrap();
    let dst = work.path().join("novision");
    let err = refused(&["surgery", "extract", s(&nemo), "--part", "vision", "-o", s(&dst)]);
    assert!(err.contains("vision tower weights") && err.contains(tower.to_str().unwrap()), "{err}");
    assert!(!dst.exists());
    // The other parts do not need the tower.
    ok(&["surgery", "extract", s(&nemo), "--part", "projector", "-o", s(&dst)]);
}

#[test]
fn swap_llm_in_a_neva_nemo_keeps_tower_and_projector() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let tiny = fixture("llava-tiny");
    let nemo = neva_from_tiny(w, "src", &["--tp", "2", "--vision", "bundle"]);
    let src = neva_parts(&nemo);
    // The new LLM: llava-tiny's language model (320 rows, a 256-piece tokenizer) cut to 1 layer.
    let llm = w.join("llm");
    ok(&["surgery", "extract", s(&tiny), "--part", "llm", "-o", s(&llm)]);
    let llm1 = w.join("llm1");
    ok(&["surgery", "keep-layers", s(&llm), "--first", "1", "-o", s(&llm1)]);
    let out = w.join("swapped.nemo");
    let plan = ok(&["surgery", "swap-llm", s(&nemo), "--llm", s(&llm1), "-o", s(&out), "--dry-run"]);
    assert!(
        plan.contains(
            "tokenizer.model: the new LLM's (256 pieces) with <extra_id_0..7> appended at ids 256..=263"
        ) && plan.contains("dropped  model.layers.1.mlp.up_proj.weight")
            && plan.contains("llm num_hidden_layers: 2 -> 1")
            && plan.contains("tp=2 pp=1 mcore"),
        "{plan}"
    );
    assert!(!out.exists(), "a dry run writes nothing");
    ok(&["surgery", "swap-llm", s(&nemo), "--llm", s(&llm1), "-o", s(&out)]);

    let ckpt = formats::open(&out).unwrap();
    assert_eq!((ckpt.meta.parallel.tp, ckpt.meta.parallel.pp), (2, 1));
    let y = match &ckpt.meta.config {
        Some(ModelConfig::NemoYaml(c)) => c.clone(),
        _ => unreachable!(),
    };
    assert_eq!(y.get_bool("mm_cfg.vision_encoder.freeze"), Some(false), "the tower stays bundled");
    assert_eq!(y.get_usize("num_layers"), Some(1));
    // Projector and tower: the stored tensors, every rank, byte for byte.
    assert_eq!(stored_non_llm(&out), stored_non_llm(&nemo));
    let swapped = neva_parts(&out);
    assert_same_tensors(&swapped.projector, &src.projector, "projector");
    assert_same_tensors(&swapped.vision, &src.vision, "vision");
    // The LLM is the new one, all 320 rows: 0..256 its tokens, 256..264 now <extra_id_*> (the
    // new LLM's rows there, kept as convert keeps them), 264..320 read back via converted_from.
    let new = llama::from_hf(&formats::open(&llm1).unwrap()).unwrap();
    assert_same_tensors(&swapped.llm.tensors, &new.tensors, "llm");
    let sp = swapped.sentencepiece().unwrap().unwrap();
    assert_eq!((sp.len(), sp.id("<extra_id_3>")), (264, Some(259)));
    assert!(matches!(swapped.image_tokens, llava::ImageTokenScheme::NevaSpan { patch: 259, .. }));

    // llava-tiny's whole LLM swapped in is, canonically, llava-tiny again.
    let full = w.join("full.nemo");
    ok(&["surgery", "swap-llm", s(&nemo), "--llm", s(&llm), "-o", s(&full)]);
    let report = ok(&["diff", s(&full), s(&tiny)]);
    assert!(report.contains("MATCH") && report.contains(" 0 differ in value, 0 missing"), "{report}");

    // The NeVA's own LLM, extracted and swapped back: same tokenizer, same tensors on the
    // tokenizer's 264 rows, and the bundle validates against the original.
    let own = w.join("own");
    ok(&["surgery", "extract", s(&nemo), "--part", "llm", "-o", s(&own)]);
    let back = w.join("back.nemo");
    let plan = ok(&["surgery", "swap-llm", s(&nemo), "--llm", s(&own), "-o", s(&back)]);
    assert!(plan.contains("already with <extra_id_0..7>"), "{plan}");
    let b = neva_parts(&back);
    assert!(b.tokenizer.unwrap().bytes().unwrap() == src.tokenizer.as_ref().unwrap().bytes().unwrap());
    assert_eq!(b.llm.hparams.vocab, 264);
    for (n, t) in &src.llm.tensors {
        let got = b.llm.tensors[n.as_str()].bytes(n).unwrap().into_owned();
        let want = if t.shape[0] == 320 { first_rows(t, 264) } else { t.bytes(n).unwrap().into_owned() };
        assert!(got == want, "{n}");
    }
    assert_eq!(stored_non_llm(&back), stored_non_llm(&nemo));
    let report = ok(&["validate", s(&back), "--against", s(&nemo)]);
    assert!(report.contains("result: PASS"), "{report}");

    // A .nemo LLM works too (its tokenizer from the archive).
    let llm_nemo = w.join("llm1.nemo");
    ok(&["convert", s(&llm1), s(&llm_nemo)]);
    let from_nemo = w.join("from-nemo.nemo");
    let plan = ok(&["surgery", "swap-llm", s(&nemo), "--llm", s(&llm_nemo), "-o", s(&from_nemo)]);
    assert!(plan.contains("rows 258 -> 266"), "{plan}");
    // A .nemo's vocabulary follows its tokenizer: 256 pieces plus the <image> and <pad> its HF
    // tokenizer had added (user-defined pieces now), grown to 266 by the mean rule.
    let got = neva_parts(&from_nemo).llm;
    assert_eq!(got.hparams.vocab, 266);
    for (n, t) in &new.tensors {
        let g = &got.tensors[n.as_str()];
        if t.shape[0] == 320 {
            assert_eq!(g.shape, [266, 64], "{n}");
            assert!(first_rows(g, 258) == first_rows(t, 258), "{n}");
        } else {
            assert!(g.bytes(n).unwrap() == t.bytes(n).unwrap(), "{n}");
        }
    }

    // Refusals, before anything is written.
    let x = w.join("x.nemo");
    let small = synthetic_hf(
        &LlamaShape { layers: 1, hidden: 32, ffn: 48, heads: 2, kv_heads: 2, vocab: 320 },
        &w.join("h32"),
    );
    let err = refused(&["surgery", "swap-llm", s(&nemo), "--llm", s(&small), "-o", s(&x)]);
    assert!(err.contains("hidden size 32") && err.contains("(64,"), "{err}");
    let err = refused(&["surgery", "swap-llm", s(&nemo), "--llm", s(&nemo), "-o", s(&x)]);
    assert!(err.contains("multimodal") && err.contains("extract"), "{err}");
    assert!(!x.exists());
}

#[test]
fn transformers_loads_parts_extracted_from_neva() {
    let Some(py) = reference_python() else { return };
    let work = tempfile::tempdir().unwrap();
    let nemo = neva_from_tiny(work.path(), "n", &["--vision", "bundle"]);
    let (llm, vision) = (work.path().join("llm"), work.path().join("vision"));
    ok(&["surgery", "extract", s(&nemo), "--part", "llm", "-o", s(&llm)]);
    ok(&["surgery", "extract", s(&nemo), "--part", "vision", "-o", s(&vision)]);
    let script = r#"
import sys, torch
from transformers import AutoTokenizer, CLIPVisionModel, LlamaForCausalLM
llm, vision = sys.argv[1], sys.argv[2]
m, info = LlamaForCausalLM.from_pretrained(llm, output_loading_info=True)
assert not any(info.values()), info
tok = AutoTokenizer.from_pretrained(llm, use_fast=False)
assert len(tok) == m.config.vocab_size == 264, (len(tok), m.config.vocab_size)
assert tok.convert_tokens_to_ids("<extra_id_3>") == 259
ids = tok("a <extra_id_4>", add_special_tokens=False).input_ids
assert 260 in ids, ids
with torch.no_grad():
    m(torch.tensor([[1, 5, 259]]))
v, info = CLIPVisionModel.from_pretrained(vision, output_loading_info=True)
assert not info["missing_keys"] and not info["mismatched_keys"], info
print("OK")
"#;
    let out = Command::new(&py).arg("-c").arg(script).arg(&llm).arg(&vision).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("OK"), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
}

/// `extract` on a text-only .nemo says so, instead of calling it a NeVA file.
#[test]
fn extract_on_a_text_only_nemo_says_it_has_no_parts() {
    let work = tempfile::tempdir().unwrap();
    let nemo = work.path().join("m.nemo");
    ok(&["convert", s(&fixture("llama-gqa")), s(&nemo), "--tp", "2"]);
    let err =
        refused(&["surgery", "extract", s(&nemo), "--part", "projector", "-o", s(&work.path().join("p"))]);
    assert!(err.contains("a text-only .nemo has no parts to take apart"), "{err}");
}
