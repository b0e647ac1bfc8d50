//! Multimodal conversions on the fixtures: llava-hf and original LLaVA → NeVA `.nemo` (both
//! layouts, TP/PP, vision tower bundled or separate) → back, bit for bit; `assemble`; the bundle
//! checks that refuse an incomplete bundle before anything is written; and `models::tower`, how
//! the compute core reads a NeVA `.nemo` with its tower.

mod common;

use common::{assert_same_tensors, fixture, ok, refused, s, shardsmith};
use shardsmith::models::tower::with_tower;
use shardsmith_converters::convert::llava::{self, ImageTokenScheme, VisionSource};
use shardsmith_converters::convert::{clip, llama, neva};
use shardsmith_converters::formats::nemo::NemoConfig;
use shardsmith_converters::formats::{self, hf_dir};
use shardsmith_converters::{Checkpoint, ModelConfig, TensorMap};
use std::path::{Path, PathBuf};

fn yaml(nemo: &Path) -> NemoConfig {
    match formats::open(nemo).unwrap().meta.config {
        Some(ModelConfig::NemoYaml(c)) => c,
        _ => panic!("{}: no yaml", nemo.display()),
    }
}

fn matches(report: &str) -> bool {
    report.contains("MATCH") && report.contains(" 0 differ in value, 0 missing")
}

/// A llava-hf model with an MHA language model (llama-mha: 4 heads, 4 KV heads) so that TP 4 and
/// the legacy layout apply; llava-tiny's vision tower and projector; vocabulary grown to 320 rows
/// with <image> = 256 and <pad> = 257 as llava-hf lays it out.
fn mha_llava_hf(dir: &Path) -> PathBuf {
    let llm = llama::from_hf(&formats::open(&fixture("llama-mha")).unwrap()).unwrap();
    let mut c = llava::from_llava_hf_checked(&formats::open(&fixture("llava-tiny")).unwrap()).unwrap();
    c.llm = llm;
    llava::grow_vocab(&mut c.llm, 320).unwrap();
    let out = dir.join("llava-mha");
    hf_dir::write(&llava::to_llava_hf(&c, None).unwrap(), &out, &Default::default()).unwrap();
    out
}

/// src (llava-hf) → .nemo with `args` → llava-hf: every tensor bit-identical.
fn round_trip(src: &Path, work: &Path, tag: &str, args: &[&str]) -> PathBuf {
    let nemo = work.join(format!("{tag}.nemo"));
    let back = work.join(format!("{tag}-back"));
    let mut full = vec!["convert", s(src), s(&nemo), "--template", "vicuna_v1"];
    full.extend(args);
    ok(&full);
    ok(&["convert", s(&nemo), s(&back)]);
    let report = ok(&["diff", s(src), s(&back)]);
    assert!(matches(&report), "{tag}: {report}");
    nemo
}

#[test]
fn llava_hf_round_trips_bit_exactly_through_neva() {
    let work = tempfile::tempdir().unwrap();
    let tiny = fixture("llava-tiny");
    for (tag, args) in [
        ("gqa-1-1", vec![]),
        ("gqa-2-1-bundle", vec!["--tp", "2", "--vision", "bundle"]),
        ("gqa-2-2", vec!["--tp", "2", "--pp", "2"]),
        ("gqa-1-1-f32", vec!["--dtype", "f32", "--layout", "mcore"]),
    ] {
        round_trip(&tiny, work.path(), tag, &args);
    }
    // GQA has no legacy layout: refused with the LLaMA path's error, nothing written.
    let dst = work.path().join("legacy.nemo");
    let err = refused(&["convert", s(&tiny), s(&dst), "--template", "v1", "--layout", "legacy"]);
    assert!(err.contains("no grouped-query attention"), "{err}");
    assert!(!dst.exists() && !work.path().join("legacy-clip").exists());

    let mha = mha_llava_hf(work.path());
    for (tag, args) in [
        ("mha-4-1", vec!["--tp", "4"]),
        ("mha-4-1-legacy", vec!["--tp", "4", "--layout", "legacy", "--vision", "bundle"]),
        ("mha-2-1-legacy", vec!["--tp", "2", "--layout", "legacy"]),
        ("mha-2-2", vec!["--tp", "2", "--pp", "2", "--vision", "bundle"]),
    ] {
        let nemo = round_trip(&mha, work.path(), tag, &args);
        let c = formats::open(&nemo).unwrap();
        let tp = if tag.contains("-4-") { 4 } else { 2 };
        assert_eq!(c.meta.parallel.tp, tp, "{tag}");
    }
    // Legacy NeVA has no pipeline parallelism (NeMo 1.23).
    let err = refused(&[
        "convert",
        s(&mha),
        s(&work.path().join("x.nemo")),
        "--template",
        "v1",
        "--layout",
        "legacy",
        "--pp",
        "2",
    ]);
    assert!(err.contains("no pipeline parallelism"), "{err}");
}

#[test]
fn the_neva_file_is_what_neva_saves() {
    let work = tempfile::tempdir().unwrap();
    let tiny = fixture("llava-tiny");
    // Bundled tower: freeze false, vision keys on every TP rank of stage 0.
    let bundled = work.path().join("bundled.nemo");
    ok(&["convert", s(&tiny), s(&bundled), "--template", "vicuna_v1", "--tp", "2", "--vision", "bundle"]);
    let y = yaml(&bundled);
    assert_eq!(y.get_bool("mm_cfg.vision_encoder.freeze"), Some(false));
    assert_eq!(y.get_str("mm_cfg.mm_mlp_adapter_type"), Some("mlp2x_gelu"));
    assert_eq!(y.get_bool("mm_cfg.llm.freeze"), Some(false));
    assert_eq!(y.get_usize("data.image_token_len"), Some(16));
    assert_eq!(y.get_str("data.conv_template"), Some("v1"));
    assert_eq!(y.get("mm_cfg.vision_encoder.crop_size").and_then(|v| v[0].as_u64()), Some(32));
    assert_eq!(y.get_str("target"), Some(shardsmith_converters::names::neva::NEVA_TARGET));
    let c = formats::open(&bundled).unwrap();
    let proj = "model.embedding.word_embeddings.adapter_layer.mm_projector_adapter.mm_projector.0.weight";
    let vis = "model.embedding.word_embeddings.vision_encoder.vision_model.post_layernorm.weight";
    for shard in &c.shards {
        assert!(shard.tensors.contains_key(proj) && shard.tensors.contains_key(vis), "rank {:?}", shard.rank);
        assert!(shard.none_keys.is_empty(), "NeVA saves parameters only");
        assert!(!shard.tensors.keys().any(|k| k.ends_with("inv_freq")));
        assert!(shard.tensors[proj].bytes(proj).unwrap() == c.shards[0].tensors[proj].bytes(proj).unwrap());
    }
    // The tokenizer got <extra_id_0..7> after its 256 pieces; the 320 llava-hf rows are kept.
    let neva_view = neva::from_neva(&c, None).unwrap();
    assert_eq!(
        neva_view.image_tokens,
        ImageTokenScheme::NevaSpan { start: 260, patch: 259, end: 261, use_im_start_end: false }
    );
    assert_eq!(neva_view.llm.hparams.vocab, 320);

    // Default for llava-hf: the tower is written beside the .nemo and referenced, freeze true.
    let separate = work.path().join("sep.nemo");
    ok(&["convert", s(&tiny), s(&separate), "--template", "vicuna_v1"]);
    let y = yaml(&separate);
    assert_eq!(y.get_bool("mm_cfg.vision_encoder.freeze"), Some(true));
    let from = PathBuf::from(y.get_str("mm_cfg.vision_encoder.from_pretrained").unwrap());
    assert!(from.is_absolute() && from.ends_with("sep-clip"), "{}", from.display());
    let tower = clip::read_hf_clip(&from).unwrap();
    let src = llava::from_llava_hf(&formats::open(&tiny).unwrap()).unwrap();
    assert_same_tensors(&tower.tensors, &src.vision, "separate tower");
    let c = formats::open(&separate).unwrap();
    assert!(!c.shards[0].tensors.keys().any(|k| k.contains("vision_encoder")));
}

#[test]
fn original_llava_converts_both_ways() {
    let work = tempfile::tempdir().unwrap();
    let orig = fixture("llava-orig-tiny");
    let tower = fixture("llava-tiny-clip");
    // The tower is referenced by a name nobody resolves: refused, naming it, nothing written.
    let nemo = work.path().join("orig.nemo");
    let err = refused(&["convert", s(&orig), s(&nemo), "--template", "v1"]);
    assert!(
        err.contains("incomplete multimodal bundle") && err.contains("shardsmith-fixtures/llava-tiny-clip"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(work.path()).unwrap().count(), 0);

    ok(&["convert", s(&orig), s(&nemo), "--template", "v1", "--vision", s(&tower), "--tp", "2"]);
    let y = yaml(&nemo);
    assert_eq!(y.get_str("converted_from.format"), Some("llava"));
    assert_eq!(y.get_usize("converted_from.vocab_size"), Some(256));
    // Back to the LLaVA layout: every tensor as it was (the 8 rows NeVA added are removed again).
    let back = work.path().join("orig-back");
    ok(&["convert", s(&nemo), s(&back), "--to", "llava"]);
    assert!(matches(&ok(&["diff", s(&orig), s(&back)])));
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(back.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["vocab_size"], 256);
    assert_eq!(cfg["mm_projector_type"], "mlp2x_gelu");
    assert_eq!(
        std::fs::read(back.join("tokenizer.model")).unwrap(),
        std::fs::read(orig.join("tokenizer.model")).unwrap()
    );
    // The bundled tower was written beside it and is what mm_vision_tower names.
    let named = PathBuf::from(cfg["mm_vision_tower"].as_str().unwrap());
    assert_same_tensors(
        &clip::read_hf_clip(&named).unwrap().tensors,
        &clip::read_hf_clip(&tower).unwrap().tensors,
        "tower",
    );

    // To llava-hf: llava-tiny again, except the rows llava-hf adds past the 256 text tokens
    // (<image>, <pad>, padding), which get the mean rule instead of transformers' random draw.
    let hf = work.path().join("orig-hf");
    ok(&["convert", s(&nemo), s(&hf)]);
    let ours = formats::open(&hf).unwrap();
    let tiny = formats::open(&fixture("llava-tiny")).unwrap();
    let (a, b) = (ours.tensors().unwrap(), tiny.tensors().unwrap());
    assert_eq!(a.len(), b.len());
    for (name, t) in b {
        let o = &a[name.as_str()];
        assert_eq!(o.shape, t.shape, "{name}");
        let (x, y) = (o.bytes(name).unwrap(), t.bytes(name).unwrap());
        if name.ends_with("embed_tokens.weight") || name.ends_with("lm_head.weight") {
            let text_rows = 256 * 64 * 4;
            assert!(x[..text_rows] == y[..text_rows], "{name}: text rows");
        } else {
            assert!(x == y, "{name}");
        }
    }
}

#[test]
fn converting_twice_gives_identical_bytes() {
    // Same inputs, same destination (a written tower is referenced by its absolute path).
    let work = tempfile::tempdir().unwrap();
    let (llm, tower, src) = (fixture("llama-mha"), fixture("llava-tiny-clip"), fixture("llava-orig-tiny"));
    let (orig, hf, seed) =
        (work.path().join("orig.nemo"), work.path().join("hf.nemo"), work.path().join("seed.nemo"));
    let mut first = Vec::new();
    for run in 0..2 {
        let force: &[&str] = if run == 0 { &[] } else { &["--force"] };
        let orig_args =
            ["convert", s(&src), s(&orig), "--template", "llama_2", "--vision", s(&tower), "--tp", "2"];
        ok(&[&orig_args[..], force].concat());
        ok(&[&["convert", s(&fixture("llava-tiny")), s(&hf), "--template", "v1"][..], force].concat());
        let seed_args =
            ["assemble", "--llm", s(&llm), "--vision", s(&tower), "--init-seed", "11", "-o", s(&seed)];
        ok(&[&seed_args[..], force].concat());
        let bytes: Vec<Vec<u8>> = [&orig, &hf, &seed].iter().map(|p| std::fs::read(p).unwrap()).collect();
        if run == 0 {
            first = bytes;
        } else {
            for (name, (a, b)) in ["orig.nemo", "hf.nemo", "seed.nemo"].iter().zip(first.iter().zip(&bytes)) {
                assert!(a == b, "{name} differs between runs");
            }
        }
    }
}

#[test]
fn incomplete_bundles_are_refused_before_anything_is_written() {
    let work = tempfile::tempdir().unwrap();
    // llava-tiny without its tokenizer.model and without a template: both named in one error.
    let src = work.path().join("no-tokenizer");
    std::fs::create_dir(&src).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("llava-tiny").join(f), src.join(f)).unwrap();
    }
    let out = work.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let err = refused(&["convert", s(&src), s(&out.join("x.nemo"))]);
    assert!(err.contains("incomplete multimodal bundle"), "{err}");
    assert!(err.contains("tokenizer") && err.contains("conversation template"), "{err}");
    // A projector missing a tensor.
    let mut ckpt = formats::open(&fixture("llava-tiny")).unwrap();
    ckpt.shards[0].tensors.shift_remove("multi_modal_projector.linear_2.bias");
    let err = llava::from_llava_hf_checked(&ckpt).unwrap_err().to_string();
    assert!(err.contains("projector tensor 'mm_projector.2.bias'"), "{err}");
    // A tokenizer with only some of NeVA's tokens.
    let mut c = llava::from_llava_hf_checked(&formats::open(&fixture("llava-tiny")).unwrap()).unwrap();
    let sp = c.sentencepiece().unwrap().unwrap();
    let partial = sp.with_user_defined(&["<extra_id_0>", "<extra_id_1>"], Path::new("t")).unwrap();
    c.tokenizer = Some(shardsmith_converters::ByteSource::owned(partial.bytes().to_vec()));
    c.template = Some(shardsmith_converters::names::neva::Template::VicunaV1);
    let t = neva::NevaTarget {
        dialect: shardsmith_converters::names::llama::NemoDialect::Mcore,
        tp: 1,
        pp: 1,
        dtype: None,
        vision: neva::VisionPlacement::Bundle,
        template: None,
        image_aspect_ratio: None,
        divisible_by: None,
        source_format: None,
    };
    let err = neva::to_neva(&c, &t).unwrap_err().to_string();
    assert!(err.contains("it has only <extra_id_0>, <extra_id_1>"), "{err}");
    // Outputs that exist are refused before the first (vision) output is written.
    let dst = out.join("y.nemo");
    std::fs::write(&dst, b"keep").unwrap();
    let err = refused(&["convert", s(&fixture("llava-tiny")), s(&dst), "--template", "v1"]);
    assert!(err.contains("already exists"), "{err}");
    assert!(!out.join("y-clip").exists());
    assert_eq!(std::fs::read(&dst).unwrap(), b"keep");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1, "nothing else written");
}

#[test]
fn the_core_finds_a_nevas_tower() {
    let work = tempfile::tempdir().unwrap();
    let made = work.path().join("made");
    std::fs::create_dir(&made).unwrap();
    let nemo = made.join("m.nemo");
    ok(&["convert", s(&fixture("llava-tiny")), s(&nemo), "--template", "vicuna_v1", "--tp", "2"]);
    let tiny = llava::from_llava_hf(&formats::open(&fixture("llava-tiny")).unwrap()).unwrap();
    let check = |c: &llava::CanonicalLlava| {
        assert_same_tensors(&c.vision, &tiny.vision, "vision");
        assert_same_tensors(&c.projector, &tiny.projector, "projector");
        assert_eq!(c.image_token_len(), Some(16));
        assert_eq!(c.image_token, 259);
        assert_eq!(c.template.map(|t| t.name()), Some("vicuna_v1"));
        assert!(c.sentencepiece().unwrap().unwrap().id("<extra_id_7>") == Some(263));
    };
    let c = with_tower(&formats::open(&nemo).unwrap(), None).unwrap();
    assert!(matches!(c.vision_source, VisionSource::Directory(_)));
    check(&c);
    // Moved together to another directory: found beside the .nemo by its name.
    let moved = work.path().join("moved");
    std::fs::rename(&made, &moved).unwrap();
    let c = with_tower(&formats::open(&moved.join("m.nemo")).unwrap(), None).unwrap();
    check(&c);
    // Without the tower, the core is told what is missing; given one explicitly, it is used.
    let lone = work.path().join("lone.nemo");
    std::fs::rename(moved.join("m.nemo"), &lone).unwrap();
    std::fs::rename(moved.join("m-clip"), work.path().join("elsewhere")).unwrap();
    let err = with_tower(&formats::open(&lone).unwrap(), None).unwrap_err().to_string();
    assert!(
        err.contains("the vision tower's weights are not in the checkpoint")
            && err.contains("mm_cfg.vision_encoder.from_pretrained names"),
        "{err}"
    );
    let c = with_tower(&formats::open(&lone).unwrap(), Some(&work.path().join("elsewhere"))).unwrap();
    check(&c);
    // Another tower than the one the file records is named, not run.
    let err =
        with_tower(&formats::open(&lone).unwrap(), Some(&fixture("clip-vision"))).unwrap_err().to_string();
    assert!(
        err.contains("clip-vision/config.json: not the vision tower")
            && err.contains("num_hidden_layers 2 vs 3"),
        "{err}"
    );
}

#[test]
fn assemble_builds_a_neva_starting_checkpoint() {
    let work = tempfile::tempdir().unwrap();
    let llm = fixture("llama-mha");
    let tower = fixture("llava-tiny-clip");
    let out = work.path().join("a.nemo");
    let projector = fixture("llava-projector/mm_projector.bin");
    ok(&[
        "assemble",
        "--llm",
        s(&llm),
        "--vision",
        s(&tower),
        "--projector",
        s(&projector),
        "-o",
        s(&out),
        "--tp",
        "2",
        "--layout",
        "legacy",
    ]);
    let y = yaml(&out);
    assert_eq!(y.get_bool("mm_cfg.vision_encoder.freeze"), Some(true));
    assert_eq!(y.get_str("data.conv_template"), Some("v1"));
    let c = with_tower(&formats::open(&out).unwrap(), None).unwrap();
    let mm: TensorMap = shardsmith_converters::formats::torch_zip::read_file(&projector)
        .unwrap()
        .tensors
        .into_iter()
        .map(|(k, v)| (k.trim_start_matches("model.").to_string(), v))
        .collect();
    assert_same_tensors(&c.projector, &mm, "projector from mm_projector.bin");
    // Embedding: llama-mha's 256 rows, then 8 rows of their mean for <extra_id_0..7>.
    assert_eq!(c.llm.hparams.vocab, 264);
    let base = llama::from_hf(&formats::open(&llm).unwrap()).unwrap();
    let name = "model.embed_tokens.weight";
    let (grown, orig) = (c.llm.tensors[name].bytes(name).unwrap(), base.tensors[name].bytes(name).unwrap());
    assert!(grown[..orig.len()] == orig[..]);
    let col0: f64 =
        orig.chunks(64 * 4).map(|r| f32::from_le_bytes(r[..4].try_into().unwrap()) as f64).sum::<f64>()
            / 256.0;
    let new0 = f32::from_le_bytes(grown[orig.len()..orig.len() + 4].try_into().unwrap());
    assert_eq!(new0, col0 as f32);
    // Back to LLaVA's layout: llama-mha's tensors exactly, plus the projector.
    let back = work.path().join("back");
    ok(&["convert", s(&out), s(&back), "--to", "llava"]);
    let back_llm = llama::from_hf(&{
        let mut b = formats::open(&back).unwrap();
        b.shards[0].tensors.retain(|k, _| !k.contains("mm_projector"));
        if let Some(ModelConfig::HfJson(cfg)) = &mut b.meta.config {
            cfg["model_type"] = serde_json::json!("llama");
        }
        b
    })
    .unwrap();
    assert_same_tensors(&back_llm.tensors, &base.tensors, "LLM after assemble → llava");

    // Seeded projector, bundled tower; a different seed gives different weights.
    let (s1, s2) = (work.path().join("s1.nemo"), work.path().join("s2.nemo"));
    for (seed, dst) in [("1", &s1), ("2", &s2)] {
        ok(&[
            "assemble",
            "--llm",
            s(&llm),
            "--vision",
            s(&tower),
            "--init-seed",
            seed,
            "--bundle-vision",
            "-o",
            s(dst),
        ]);
    }
    let p1 = with_tower(&formats::open(&s1).unwrap(), None).unwrap().projector;
    let p2 = with_tower(&formats::open(&s2).unwrap(), None).unwrap().projector;
    let n = "mm_projector.0.weight";
    assert!(p1[n].bytes(n).unwrap() != p2[n].bytes(n).unwrap());
    assert_eq!(yaml(&s1).get_bool("mm_cfg.vision_encoder.freeze"), Some(false));
    // Projector type disagreeing with the file is refused.
    let err = refused(&[
        "assemble",
        "--llm",
        s(&llm),
        "--vision",
        s(&tower),
        "--projector",
        s(&projector),
        "--projector-type",
        "linear",
        "-o",
        s(&work.path().join("z.nemo")),
    ]);
    assert!(err.contains("holds a mlp2x_gelu projector"), "{err}");
}

#[test]
fn neva_reshards_and_plans() {
    let work = tempfile::tempdir().unwrap();
    let tiny = fixture("llava-tiny");
    let two = work.path().join("two.nemo");
    ok(&["convert", s(&tiny), s(&two), "--template", "llama_2", "--tp", "2", "--vision", "bundle"]);
    let one = work.path().join("one.nemo");
    ok(&["reshard", s(&two), "-o", s(&one), "--tp", "1"]);
    let y = yaml(&one);
    assert_eq!(y.get_usize("tensor_model_parallel_size"), Some(1));
    assert_eq!(y.get_usize("converted_from.image_token_index"), Some(256));
    assert_eq!(y.get_str("data.conv_template"), Some("llama_2"));
    let back = work.path().join("back");
    ok(&["convert", s(&one), s(&back)]);
    assert!(matches(&ok(&["diff", s(&tiny), s(&back)])));
    // The plan names both outputs and writes nothing.
    let plan = ok(&["convert", s(&tiny), s(&work.path().join("p.nemo")), "--template", "v1", "--dry-run"]);
    assert!(plan.contains("p-clip as HF directory") && plan.contains("p.nemo as .nemo"), "{plan}");
    assert!(!work.path().join("p.nemo").exists() && !work.path().join("p-clip").exists());
}

/// Reading a checkpoint written by the library (not the CLI) agrees with the fixture, for the
/// lead's `load_checkpoint`: the bundle for a NeVA `.nemo` is complete.
#[test]
fn library_round_trip_keeps_every_part() {
    let c = llava::from_llava_hf_checked(&formats::open(&fixture("llava-tiny")).unwrap()).unwrap();
    let t = neva::NevaTarget {
        dialect: shardsmith_converters::names::llama::NemoDialect::Mcore,
        tp: 2,
        pp: 1,
        dtype: None,
        vision: neva::VisionPlacement::Bundle,
        template: Some(shardsmith_converters::names::neva::Template::Nvgpt),
        image_aspect_ratio: Some("square".into()),
        divisible_by: None,
        source_format: None,
    };
    let nemo: Checkpoint = neva::to_neva(&c, &t).unwrap();
    let mut back = with_tower(&nemo, None).unwrap();
    assert_eq!(back.image_aspect_ratio.as_deref(), Some("square"));
    neva::undo_neva_tokens(&mut back).unwrap();
    assert_eq!(back.image_tokens, ImageTokenScheme::Repeated { image: 256, pad: Some(257) });
    assert_same_tensors(&back.llm.tensors, &c.llm.tensors, "llm");
    assert_same_tensors(&back.vision, &c.vision, "vision");
    assert_eq!(back.tokenizer.unwrap().bytes().unwrap(), c.tokenizer.unwrap().bytes().unwrap());
}

/// `neva::canonical_tensors` (for `diff`): a NeVA file equals the llava-hf model it came from.
#[test]
fn canonical_tensors_compare_neva_with_its_source() {
    let work = tempfile::tempdir().unwrap();
    let nemo = work.path().join("c.nemo");
    ok(&["convert", s(&fixture("llava-tiny")), s(&nemo), "--template", "v1", "--tp", "2"]);
    let a = neva::canonical_tensors(&formats::open(&fixture("llava-tiny")).unwrap()).unwrap();
    let b = neva::canonical_tensors(&formats::open(&nemo).unwrap()).unwrap();
    assert_eq!(a.len(), 80);
    assert_same_tensors(&a, &b, "llava-tiny vs its NeVA");
}

/// HF CLIP towers in and out as `pytorch_model.bin` too.
#[test]
fn clip_towers_are_read_and_written_as_bin() {
    let work = tempfile::tempdir().unwrap();
    let nemo = work.path().join("b.nemo");
    ok(&["convert", s(&fixture("llava-tiny")), s(&nemo), "--template", "v1", "--weights", "bin"]);
    let side = work.path().join("b-clip");
    assert!(side.join("pytorch_model.bin").is_file() && !side.join("model.safetensors").exists());
    let c = with_tower(&formats::open(&nemo).unwrap(), None).unwrap();
    let tiny = llava::from_llava_hf(&formats::open(&fixture("llava-tiny")).unwrap()).unwrap();
    assert_same_tensors(&c.vision, &tiny.vision, "tower through .bin");
    // And a .bin tower given with --vision.
    let orig = work.path().join("o.nemo");
    ok(&["convert", s(&fixture("llava-orig-tiny")), s(&orig), "--template", "v1", "--vision", s(&side)]);
    let c = with_tower(&formats::open(&orig).unwrap(), None).unwrap();
    assert_eq!(c.vision_source, VisionSource::Bundled);
    assert_same_tensors(&c.vision, &tiny.vision, "bundled from a .bin tower");
}

/// The names of a `.nemo` tar's files under `model_weights/`.
fn dist_member_names(nemo: &Path) -> Vec<String> {
    let map = std::fs::read(nemo).unwrap();
    formats::nemo::list_members(&map, nemo)
        .unwrap()
        .into_iter()
        .filter(|m| m.kind == formats::nemo::MemberKind::File)
        .map(|m| m.name)
        .filter(|n| n.starts_with("model_weights/"))
        .collect()
}

/// `--dist-ckpt` writes a NeVA `.nemo` as MegatronNevaModel saves one (NeMo after May 2024): the
/// LLM as GPT's stacked arrays, the projector and bundled tower as replicated arrays under their
/// state-dict keys, no `_extra_state` objects (NeVA saves parameters only). Both backends read
/// back to the source bit for bit, reshard to per-rank files and agree with them; the legacy
/// layout is refused before anything is written. (interop.rs loads these with Megatron-core.)
#[test]
fn neva_distributed_checkpoints_round_trip() {
    let work = tempfile::tempdir().unwrap();
    let tiny = fixture("llava-tiny");
    let per_rank =
        round_trip(&tiny, work.path(), "per-rank", &["--tp", "2", "--pp", "2", "--vision", "bundle"]);
    for backend in ["zarr", "torch_dist"] {
        let args = ["--tp", "2", "--pp", "2", "--vision", "bundle", "--dist-ckpt", backend];
        let nemo = round_trip(&tiny, work.path(), backend, &args);
        let names = dist_member_names(&nemo);
        assert!(names.iter().any(|n| n == "model_weights/metadata.json"), "{backend}: {names:?}");
        assert!(!names.iter().any(|n| n.contains("_extra_state")), "{backend}: NeVA saves no extra state");
        if backend == "zarr" {
            let projector = "model_weights/model.embedding.word_embeddings.adapter_layer.mm_projector_adapter.mm_projector.0.weight/0.0";
            assert!(names.iter().any(|n| n == projector), "one replicated chunk: {names:?}");
        }
        let y = yaml(&nemo);
        let parallel = ["tensor_model_parallel_size", "pipeline_model_parallel_size"].map(|k| y.get_usize(k));
        assert_eq!(parallel, [Some(2), Some(2)], "{backend}: the yaml keeps tp/pp");
        // It runs at the tp it was saved for and reproduces llava-tiny's golden logits.
        let report = ok(&["validate", s(&nemo), "--reference", s(&tiny)]);
        assert!(
            report.contains("(neva, f32, tp=2)") && report.contains("result: PASS"),
            "{backend}: {report}"
        );
        // Back to per-rank files: the same tensors as the per-rank conversion.
        let one = work.path().join(format!("{backend}-tp1.nemo"));
        ok(&["convert", s(&nemo), s(&one), "--tp", "1"]);
        assert!(matches(&ok(&["diff", s(&one), s(&per_rank)])), "{backend}");
        assert!(dist_member_names(&one).is_empty(), "{backend}: per-rank output");
    }
    // A NeVA holding only its projector (mm_cfg.llm.freeze) has only replicated arrays.
    let mut projector_only = formats::open(&per_rank).unwrap();
    for s in &mut projector_only.shards {
        s.tensors.retain(|k, _| k.contains(".adapter_layer."));
    }
    let w = neva::dist_weights(&projector_only).unwrap();
    assert_eq!(w.arrays.len(), 4, "mlp2x_gelu: two weights, two biases");
    assert!(w.objects.is_empty() && w.arrays.iter().all(|a| a.chunks.len() == 1 && a.chunk == a.shape));
    // Replicas that disagree are named.
    let mut odd = formats::open(&per_rank).unwrap();
    let key = "model.embedding.word_embeddings.adapter_layer.mm_projector_adapter.mm_projector.2.bias";
    let rank1 = odd.shards.iter_mut().find(|s| s.rank.tp == 1 && s.rank.pp == 0).unwrap();
    rank1.tensors.shift_remove(key);
    let err = neva::dist_weights(&odd).unwrap_err().to_string();
    assert!(err.contains(key) && err.contains("rank tp=1 holds nothing"), "{err}");
    let mut stray = formats::open(&per_rank).unwrap();
    let copy = stray.shards[0].tensors[key].clone();
    let later = stray.shards.iter_mut().find(|s| s.rank.pp == 1).unwrap();
    later.tensors.insert(key.to_string(), copy);
    let err = neva::dist_weights(&stray).unwrap_err().to_string();
    assert!(err.contains("pp=1 holds") && err.contains("first pipeline stage"), "{err}");
    // The legacy layout has no distributed form: refused before anything is written, the tower
    // directory a non-bundled conversion writes beside the .nemo included.
    let mha = mha_llava_hf(work.path());
    let dst = work.path().join("legacy-dist.nemo");
    for vision in [&["--vision", "bundle"][..], &[][..]] {
        let mut args = vec!["convert", s(&mha), s(&dst), "--template", "v1", "--layout", "legacy"];
        args.extend(["--dist-ckpt", "zarr"]);
        args.extend(vision);
        let err = refused(&args);
        assert!(err.contains("legacy NeVA layout has none"), "{err}");
        assert!(!dst.exists() && !work.path().join("legacy-dist-clip").exists(), "{args:?}");
    }
}

/// `diff` compares an original LLaVA by canonical names too, its tower (written beside, named
/// by path) included; a tower only named by a Hub id is left out, with a note, rather than
/// reported missing. llava-hf → LLaVA drops the rows llava-hf added past the text tokens
/// (<image>, <pad>, padding), so LLaVA → llava-hf → LLaVA is exact.
#[test]
fn diff_compares_original_llava_by_canonical_names() {
    let work = tempfile::tempdir().unwrap();
    let differing = |a: &Path, b: &Path| {
        let (_, out, _) = shardsmith(&["diff", s(a), s(b), "--json"]);
        let report: serde_json::Value = serde_json::from_str(&out).unwrap();
        let names: Vec<String> = report["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["status"] != "identical")
            .map(|t| t["name"].as_str().unwrap().to_string())
            .collect();
        (names, report["vision_not_compared"].clone())
    };
    let rows = ["model.embed_tokens.weight", "lm_head.weight"];
    let llava = work.path().join("llava");
    ok(&["convert", s(&fixture("llava-tiny")), s(&llava), "--to", "llava"]);
    assert_eq!(
        differing(&fixture("llava-tiny"), &llava),
        (rows.map(String::from).to_vec(), serde_json::Value::Null)
    );
    let (orig, tower) = (fixture("llava-orig-tiny"), fixture("llava-tiny-clip"));
    assert_eq!(differing(&orig, &fixture("llava-tiny")), (rows.map(String::from).to_vec(), s(&orig).into()));
    let (hf, back) = (work.path().join("hf"), work.path().join("back"));
    ok(&["convert", s(&orig), s(&hf), "--vision", s(&tower)]);
    ok(&["convert", s(&hf), s(&back), "--to", "llava"]);
    assert!(matches(&ok(&["diff", s(&orig), s(&back)])));
}
