//! PyTorch and transformers load what we write and get identical tensors (run by
//! `tests/run.sh` with the pinned reference venv; see `common::reference_python`).

mod common;

use common::{fixture, reference_python, run_checker};
use shardsmith_converters::formats::{self, hf_dir, nemo, safetensors, torch_zip};
use shardsmith_converters::{NemoLayout, Parallelism};
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

#[test]
fn nemo_loaders_read_our_archives() {
    let Some(py) = reference_python() else { return };
    let out = tempfile::tempdir().unwrap();
    for (tp, pp, gzip) in [(1, 1, false), (2, 1, false), (2, 2, false), (2, 1, true)] {
        let ckpt = common::nemo_checkpoint(tp, pp);
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

/// Our `convert` output against an independent PyTorch implementation of NeMo's converter and
/// `megatron_change_num_partitions` (bit for bit, rank by rank), and against a simulated Megatron
/// tensor-parallel forward pass whose logits must match transformers' (fp32 tier).
#[test]
fn converted_nemo_matches_the_pytorch_reference_and_megatron_forward() {
    let Some(py) = reference_python() else { return };
    let out = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_shardsmith");
    for (model, tp, pp, layout, dtype) in [
        ("llama-mha", 2, 2, "mcore", None),
        ("llama-mha", 4, 1, "legacy", None),
        ("llama-mha", 2, 1, "mcore", Some("bf16")),
        ("llama-gqa", 2, 3, "mcore", None),
    ] {
        let src = fixture(model);
        let nemo = out.path().join(format!("{model}-{tp}-{pp}-{layout}-{}.nemo", dtype.unwrap_or("same")));
        let (tp_s, pp_s) = (tp.to_string(), pp.to_string());
        let mut args =
            vec!["convert", src.to_str().unwrap(), nemo.to_str().unwrap(), "--tp", &tp_s, "--pp", &pp_s];
        args.extend(["--layout", layout]);
        if let Some(d) = dtype {
            args.extend(["--dtype", d]);
        }
        let status = std::process::Command::new(bin).args(&args).status().unwrap();
        assert!(status.success(), "{args:?}");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/nemo_reference_check.py");
        let mut check = std::process::Command::new(&py);
        check.arg(&script).arg(&src).arg(&nemo).args(["--tp", &tp_s, "--pp", &pp_s, "--layout", layout]);
        if let Some(d) = dtype {
            check.args(["--dtype", d]);
        }
        // NeMo computes the legacy rotary buffer with torch's fp32 pow, which is not correctly
        // rounded; ours is, so a few elements may sit 1 ulp apart (the buffer is recomputed on load).
        check.args(["--inv-freq-ulps", "1"]);
        let result = check.output().unwrap();
        let stdout = String::from_utf8_lossy(&result.stdout);
        assert!(
            result.status.success(),
            "{model} tp={tp} pp={pp} {layout}: {stdout}{}",
            String::from_utf8_lossy(&result.stderr)
        );
        // The forward check holds the fp32 tier (1e-4 × max |logit|); bf16 weights are covered
        // bit for bit by the reference check above.
        if dtype.is_none() {
            let line = run_checker(&py, "nemo_tp_forward_check.py", &[&src, &nemo]);
            assert!(line.starts_with("OK"), "{model} tp={tp} pp={pp} {layout}: {line}");
        }
    }
}

/// `convert --dist-ckpt zarr|torch_dist` against the PyTorch reference conversion, laid out as
/// Megatron's strategies do (layer-stacked, one chunk per layer × TP fragment): zarr read from its
/// chunk files, torch_dist loaded by `torch.distributed.checkpoint` itself, torch loading
/// `common.pt` and every `_extra_state` object; then each restored by Megatron-core's own
/// `dist_checkpointing.load` at tensor-parallel size 1, as a NeMo job restores it
/// (`megatron_dist_load.py`): torch_dist by megatron-core 0.16, zarr by 0.5.0 (NeMo 1.23's,
/// through TensorStore; fixtures/gen/requirements-interop.txt, requirements-megatron-zarr.txt).
#[test]
fn distributed_nemo_matches_the_pytorch_reference() {
    let Some(py) = reference_python() else { return };
    let out = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_shardsmith");
    for (model, tp, pp, dtype, backend) in [
        ("llama-gqa", 2, 3, None, "zarr"),
        ("llama-mha", 4, 1, Some("bf16"), "zarr"),
        ("llama-gqa", 2, 3, None, "torch_dist"),
        ("llama-mha", 4, 1, Some("bf16"), "torch_dist"),
    ] {
        let src = fixture(model);
        let nemo = out.path().join(format!("{model}-{tp}-{pp}-{backend}.nemo"));
        let (tp_s, pp_s) = (tp.to_string(), pp.to_string());
        let mut args =
            vec!["convert", src.to_str().unwrap(), nemo.to_str().unwrap(), "--tp", &tp_s, "--pp", &pp_s];
        args.extend(["--dist-ckpt", backend]);
        let mut check = vec![src.to_str().unwrap(), nemo.to_str().unwrap(), "--tp", &tp_s];
        if let Some(d) = dtype {
            args.extend(["--dtype", d]);
            check.extend(["--dtype", d]);
        }
        let status = std::process::Command::new(bin).args(&args).status().unwrap();
        assert!(status.success(), "{args:?}");
        let check: Vec<&Path> = check.iter().map(Path::new).collect();
        let line = run_checker(&py, "nemo_dist_check.py", &check);
        assert!(line.starts_with(&format!("OK {backend}")), "{model} tp={tp} pp={pp} {backend}: {line}");
        let out = run_checker(&py, "megatron_dist_load.py", &check);
        megatron_verdict(
            &py,
            backend,
            &format!("load of {backend},"),
            &out,
            &format!("{model} tp={tp} pp={pp}"),
        );
    }
}

/// Asserts a Megatron loader script's last line is its OK line (containing `want`), except that a
/// zarr check may SKIP where setup_venv.sh left its marker (no megatron-core 0.5.0 wheels for this
/// Python): said on stderr, not failed.
fn megatron_verdict(py: &Path, backend: &str, want: &str, out: &str, what: &str) {
    let last = out.lines().last().unwrap_or_default();
    let marker = py.parent().and_then(Path::parent).map(|venv| venv.join("megatron-zarr/UNAVAILABLE"));
    if backend == "zarr" && last.starts_with("SKIP") && marker.is_some_and(|m| m.exists()) {
        eprintln!("{what}: {last}");
        return;
    }
    assert!(last.starts_with("OK megatron-core") && last.contains(want), "{what} Megatron: {out}");
}

/// A NeVA `.nemo` written as a distributed checkpoint is what Megatron-core's loader reads for
/// MegatronNevaModel's sharded state dict (`megatron_neva_load.py`: GPT's filtered to NeVA's
/// parameters, no extra-state objects, replicated projector and tower), with every tensor equal
/// to the same conversion's per-rank file merged by the independent reference.
#[test]
fn megatron_loads_neva_distributed_checkpoints() {
    let Some(py) = reference_python() else { return };
    let out = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_shardsmith");
    let tiny = fixture("llava-tiny");
    let convert = |dst: &Path, extra: &[&str]| {
        let mut args =
            vec!["convert", tiny.to_str().unwrap(), dst.to_str().unwrap(), "--template", "vicuna_v1"];
        args.extend(["--tp", "2", "--pp", "2", "--vision", "bundle"]);
        args.extend(extra);
        let o = std::process::Command::new(bin).args(&args).output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    };
    let per_rank = out.path().join("per-rank.nemo");
    convert(&per_rank, &[]);
    for backend in ["zarr", "torch_dist"] {
        let dist = out.path().join(format!("{backend}.nemo"));
        convert(&dist, &["--dist-ckpt", backend]);
        let log = run_checker(&py, "megatron_neva_load.py", &[&per_rank, &dist]);
        megatron_verdict(&py, backend, &format!("load of NeVA {backend}:"), &log, &format!("NeVA {backend}"));
    }
}

/// NeVA conversions end in llava-hf directories transformers loads and that reproduce llava-tiny's
/// golden logits (≤ 1e-5; from the original-LLaVA copy, whose rows past the 256 text tokens are
/// re-initialised, on the text-token columns), with a working processor and chat template, and
/// that shardsmith itself generates from as transformers does (prompt ids and greedy tokens); the
/// NeVA tokenizer is byte-identical to NeMo's protobuf recipe.
#[test]
fn transformers_loads_llava_hf_converted_through_neva() {
    let Some(py) = reference_python() else { return };
    let out = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_shardsmith");
    let run = |args: &[&str]| {
        let o = std::process::Command::new(bin).args(args).output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    };
    let p = |name: &str| out.path().join(name).to_str().unwrap().to_string();
    let tiny = fixture("llava-tiny");
    let orig = fixture("llava-orig-tiny");
    let tower = fixture("llava-tiny-clip");
    for (tag, src, extra, template, cols) in [
        ("hf-tp2", &tiny, vec!["--tp", "2"], "vicuna_v1", None),
        ("hf-bundle-pp2", &tiny, vec!["--tp", "2", "--pp", "2", "--vision", "bundle"], "vicuna_v1", None),
        ("orig", &orig, vec!["--vision", tower.to_str().unwrap()], "llama_2", Some("256")),
    ] {
        let nemo = p(&format!("{tag}.nemo"));
        let hf = p(&format!("{tag}-hf"));
        let mut args = vec!["convert", src.to_str().unwrap(), &nemo, "--template", template];
        args.extend(extra);
        run(&args);
        run(&["convert", &nemo, &hf]);
        // shardsmith reads the directory it wrote; the check asks transformers for the same tokens.
        // (The raw prompt starts with the image token, where transformers drops the lone ▁.)
        let image = fixture("llava-tiny/image.png");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/llava_hf_check.py");
        let mut check = std::process::Command::new(&py);
        check.arg(&script).arg(&hf).arg(fixture("llava-tiny/golden")).args(["--template", template]);
        for (i, t) in [template, "raw"].into_iter().enumerate() {
            let generated = out.path().join(format!("{tag}-generated-{i}.json"));
            let o = std::process::Command::new(bin)
                .args(["generate", &hf, "--template", t, "--prompt", "What is this?", "--aspect", "square"])
                .args(["--image", image.to_str().unwrap(), "--max-new-tokens", "6", "--json"])
                .output()
                .unwrap();
            assert!(o.status.success(), "{tag}: generate: {}", String::from_utf8_lossy(&o.stderr));
            std::fs::write(&generated, &o.stdout).unwrap();
            check.arg("--generated").arg(&generated);
        }
        check.arg("--image").arg(&image);
        if let Some(c) = cols {
            check.args(["--vocab-cols", c]);
        }
        let result = check.output().unwrap();
        let stdout = String::from_utf8_lossy(&result.stdout);
        assert!(
            result.status.success() && stdout.starts_with("OK"),
            "{tag}: {stdout}{}",
            String::from_utf8_lossy(&result.stderr)
        );
        // The NeVA tokenizer inside the .nemo.
        let ckpt = formats::open(Path::new(&nemo)).unwrap();
        let model = ckpt.meta.artifacts.iter().find(|a| a.name.ends_with("_tokenizer.model")).unwrap();
        let extracted = out.path().join(format!("{tag}-tokenizer.model"));
        std::fs::write(&extracted, model.source.bytes().unwrap()).unwrap();
        let line =
            run_checker(&py, "neva_tokenizer_check.py", &[&extracted, &fixture("llama-mha/tokenizer.model")]);
        assert!(line.starts_with("OK"), "{tag}: {line}");
    }
}

/// transformers tokenizes with what a round trip through a `.nemo` writes back exactly as with
/// the directory it started from, fast and slow tokenizers both (special tokens mid-text, where
/// LlamaTokenizer's `legacy` and `add_prefix_space` settings decide): LLaMA HF → .nemo (TP 2) →
/// reshard → HF, llava-hf → NeVA → llava-hf, original LLaVA → NeVA → LLaVA.
#[test]
fn transformers_tokenizes_round_trips_as_their_source() {
    let Some(py) = reference_python() else { return };
    let out = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_shardsmith");
    let p = |name: &str| out.path().join(name).to_str().unwrap().to_string();
    let run = |args: &[&str]| {
        let o = std::process::Command::new(bin).args(args).output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    };
    let tower = fixture("llava-tiny-clip");
    for (source, there, extra, back) in [
        ("llama-gqa", vec!["--tp", "2"], vec!["--tp", "1"], vec![]),
        ("llava-tiny", vec!["--tp", "2", "--template", "vicuna_v1"], vec!["--pp", "2"], vec![]),
        (
            "llava-orig-tiny",
            vec!["--template", "llama_2", "--vision", tower.to_str().unwrap()],
            vec![],
            vec!["--to", "llava"],
        ),
    ] {
        let (nemo, resharded, hf) =
            (p(&format!("{source}.nemo")), p(&format!("{source}-2.nemo")), p(&format!("{source}-hf")));
        let src = fixture(source);
        run(&[&["convert", src.to_str().unwrap(), &nemo][..], &there].concat());
        run(&[&["convert", &nemo, &resharded][..], &extra].concat());
        run(&[&["convert", &resharded, &hf][..], &back].concat());
        let line = run_checker(&py, "hf_tokenizer_check.py", &[Path::new(&hf), &src]);
        assert!(line.starts_with("OK"), "{source}: {line}");
    }
    // Edits along the way: the directory tokenizes as the one whose tokenizer it now has. (A
    // bundle has `<image>` as a token where a bare LLaMA or original LLaVA has text.)
    let (gqa, tiny, mha) = (fixture("llama-gqa"), fixture("llava-tiny"), fixture("llama-mha"));
    let s = |p: &Path| p.to_str().unwrap().to_string();
    // (what, commands, the directory to compare with, a text to leave out)
    type Step<'a> = (&'a str, Vec<Vec<String>>, String, Option<&'a str>);
    let steps: [Step; 3] = [
        (
            "NeVA swap-llm",
            vec![
                vec![
                    "surgery".into(),
                    "swap-llm".into(),
                    p("llava-tiny.nemo"),
                    "--llm".into(),
                    s(&gqa),
                    "-o".into(),
                    p("swapped.nemo"),
                ],
                vec!["convert".into(), p("swapped.nemo"), p("swapped-hf")],
            ],
            s(&gqa),
            Some("<image>"),
        ),
        (
            ".nemo resize-vocab",
            vec![
                vec!["convert".into(), s(&mha), p("mha.nemo")],
                vec![
                    "surgery".into(),
                    "resize-vocab".into(),
                    p("mha.nemo"),
                    "--add-tokens".into(),
                    "<a>,<b>".into(),
                    "-o".into(),
                    p("mha-ab.nemo"),
                ],
                vec!["convert".into(), p("mha-ab.nemo"), p("mha-ab-hf")],
                vec![
                    "surgery".into(),
                    "resize-vocab".into(),
                    s(&mha),
                    "--add-tokens".into(),
                    "<a>,<b>".into(),
                    "-o".into(),
                    p("mha-ab"),
                ],
            ],
            p("mha-ab"),
            None,
        ),
        (
            "llava-hf to LLaVA",
            vec![vec![
                "convert".into(),
                s(&tiny),
                p("tiny-llava"),
                "--to".into(),
                "llava".into(),
                "--template".into(),
                "vicuna_v1".into(),
            ]],
            s(&tiny),
            Some("<image>"),
        ),
    ];
    for (what, commands, reference, ignore) in steps {
        for args in &commands {
            run(&args.iter().map(String::as_str).collect::<Vec<_>>());
        }
        let ours = &commands.iter().rev().find(|c| c[0] == "convert").unwrap()[2];
        let mut check = vec![Path::new(ours), Path::new(&reference)];
        if let Some(text) = ignore {
            check.extend([Path::new("--ignore"), Path::new(text)]);
        }
        let line = run_checker(&py, "hf_tokenizer_check.py", &check);
        assert!(line.starts_with("OK"), "{what}: {line}");
    }
}

/// An HF directory without `tokenizer.json` tokenizes as transformers' slow `LlamaTokenizer`
/// reads its config: `legacy` true (the default: every piece between special tokens gets its
/// own "▁") or false, `add_prefix_space` true, false or null (read as false without a
/// tokenizer.json), user-defined pieces its config lists as special added tokens, and added
/// tokens with `lstrip` / `rstrip` (the whitespace beside them dropped), legacy and not.
#[test]
fn sentencepiece_directories_tokenize_as_transformers_slow_llama_tokenizer() {
    let Some(py) = reference_python() else { return };
    let out = tempfile::tempdir().unwrap();
    let texts = [
        "Hello world",
        "A</s>B",
        "x <s>\nWhat is this?",
        "</s> hi",
        "  two  spaces",
        "<s>start",
        "a <unk> b",
        "<unk>",
        "<a>hi <b>",
        "x <a> y",
        "p  <b>  q",
        "A </s>  B",
        " \t<a>\n<b>\n end",
        "<b> <a> <b>",
        "  <a>",
        "<b>   ",
    ];
    // llama-mha's model with <a> and <b> as user-defined pieces (what a .nemo makes of HF added
    // tokens), which one config lists as special added tokens.
    let model = shardsmith_converters::convert::sentencepiece::SentencePieceModel::parse(
        std::fs::read(fixture("llama-mha/tokenizer.model")).unwrap(),
        Path::new("tokenizer.model"),
    )
    .unwrap();
    let with_ab = model.with_user_defined(&["<a>", "<b>"], Path::new("tokenizer.model")).unwrap();
    let token = |content: &str, lstrip: bool, rstrip: bool| {
        serde_json::json!({"content": content, "special": true, "lstrip": lstrip, "rstrip": rstrip,
            "normalized": false, "single_word": false})
    };
    let special = |content: &str| token(content, false, false);
    // <a> eats the whitespace before it, <b> the whitespace after, </s> both.
    let stripping = |legacy: bool| {
        serde_json::json!({"legacy": legacy, "additional_special_tokens": ["<a>", "<b>"],
            "added_tokens_decoder": {"0": token("<unk>", false, false), "1": token("<s>", false, false),
                "2": token("</s>", true, true), "256": token("<a>", true, false), "257": token("<b>", false, true)}})
    };
    let source: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("llama-mha/tokenizer_config.json")).unwrap()).unwrap();
    let variants = [
        ("absent", serde_json::json!({})),
        ("legacy", serde_json::json!({"legacy": true})),
        ("non-legacy", serde_json::json!({"legacy": false})),
        ("no-prefix", serde_json::json!({"legacy": false, "add_prefix_space": false})),
        ("null-prefix", serde_json::json!({"legacy": false, "add_prefix_space": null})),
        ("legacy-no-prefix", serde_json::json!({"legacy": true, "add_prefix_space": false})),
        (
            "special-pieces",
            serde_json::json!({"legacy": false, "additional_special_tokens": ["<a>", "<b>"],
                "added_tokens_decoder": {"256": special("<a>"), "257": special("<b>")}}),
        ),
        ("strip-legacy", stripping(true)),
        ("strip-non-legacy", stripping(false)),
    ];
    let mut dirs = Vec::new();
    for (name, settings) in variants {
        let dir = out.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        let with_pieces = matches!(name, "special-pieces" | "strip-legacy" | "strip-non-legacy");
        let pieces = if with_pieces { with_ab.bytes() } else { model.bytes() };
        std::fs::write(dir.join("tokenizer.model"), pieces).unwrap();
        let mut config = source.clone();
        let o = config.as_object_mut().unwrap();
        o.remove("legacy");
        o.extend(settings.as_object().unwrap().clone());
        std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
        let tok = shardsmith::infer::tokenizer::Tokenizer::from_dir(&dir).unwrap();
        let ids: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t, true).unwrap()).collect();
        std::fs::write(dir.join("ours.json"), serde_json::json!({"texts": texts, "ids": ids}).to_string())
            .unwrap();
        dirs.push(dir);
    }
    let dirs: Vec<&Path> = dirs.iter().map(|d| d.as_path()).collect();
    let line = run_checker(&py, "slow_tokenizer_check.py", &dirs);
    assert!(line.starts_with("OK"), "{line}");
}
