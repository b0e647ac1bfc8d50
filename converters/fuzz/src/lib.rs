//! What each fuzz target asserts about its input, one function a target: shared by the libFuzzer
//! targets (`fuzz_targets/`, each a one-line call) and by the main test suite, which includes
//! this file (`tests/fuzz_seeds.rs`) and replays the committed seeds, their truncations and
//! byte flips through the same checks on every CI run. Every check must return (the input was
//! accepted or refused with a named error) or panic on a broken invariant, never hang or
//! exhaust memory.
//!
//! Fixtures are embedded with `include_bytes!` (paths relative to this file) so the checks run
//! the same wherever they are compiled.

use shardsmith::infer::image::{load_rgb_from_bytes, AspectMode, PreprocessConfig};
use shardsmith::infer::template::{Flavour, ImageTokens, Template};
use shardsmith::infer::tokenizer::Tokenizer;
use shardsmith::train::data::{build_example, parse_json_array, parse_jsonl, ExampleConfig, IGNORE_INDEX};
use shardsmith_converters::convert::clip::ClipVisionConfig;
use shardsmith_converters::convert::sentencepiece::SentencePieceModel;
use shardsmith_converters::convert::tokenizer::hf_added_tokens;
use shardsmith_converters::describe::sentencepiece_pieces;
use shardsmith_converters::formats::nemo::{list_members, read_tar_bytes, NemoConfig};
use shardsmith_converters::formats::pickle::{dump, load, AllowList, Value};
use shardsmith_converters::formats::{safetensors, torch_zip};
use shardsmith_converters::names::llama::{LlamaHparams, NemoDialect, NemoYamlOptions};
use shardsmith_converters::names::neva::{ConvertedFrom, EXTRA_IDS};
use shardsmith_converters::DType;
use std::io::Cursor;
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// A tensor larger than this is not pulled: a stride-0 (`expand`) view or a sparse zarr array
/// is a legitimate tensor of any size, and materialising it is what the user asked for.
const MAX_PULL: usize = 64 << 20;

/// Bytes as a safetensors file: every tensor it accepts has exactly dtype × shape bytes.
pub fn safetensors_header(data: &[u8]) {
    if let Ok(tensors) = safetensors::read_mapped(anon_map(data), 0, data.len(), Arc::from(Path::new("fuzz")))
    {
        for (name, t) in &tensors {
            let bytes = t.bytes(name).expect("accepted tensors have consistent sizes");
            assert_eq!(bytes.len(), t.nbytes());
        }
    }
}

/// Memo sharing lets a few hundred bytes decode to the reader's whole budget (about a million
/// values); decoding the re-encoded form of such a tree again takes seconds under the sanitizer,
/// so the round trip is checked only below this many encoded bytes.
const MAX_ROUND_TRIP: usize = 1 << 16;

/// Bytes as a pickle under torch's allow-list: whatever decodes encodes again (unless it holds
/// an object with keyword arguments, which protocol 2 cannot express) and decodes back to the
/// same value.
pub fn pickle(data: &[u8]) {
    let origin = Path::new("fuzz");
    let Ok(value) = load(data, AllowList::default(), origin) else { return };
    match dump(&value, origin) {
        Ok(bytes) if bytes.len() <= MAX_ROUND_TRIP => {
            let back = load(&bytes, AllowList::default(), origin).expect("our own pickle decodes");
            assert!(same(&back, &value), "dump then load changed the value:\n{back:?}\n{value:?}");
        }
        Ok(_) => {}
        Err(_) => assert!(has_kwargs(&value), "only objects with keyword arguments fail to encode"),
    }
}

/// Equality with NaN equal to itself (floats compared bit for bit).
fn same(a: &Value, b: &Value) -> bool {
    let all = |x: &[Value], y: &[Value]| x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y));
    let opt = |x: &Option<Box<Value>>, y: &Option<Box<Value>>| match (x, y) {
        (Some(x), Some(y)) => same(x, y),
        (x, y) => x.is_none() && y.is_none(),
    };
    match (a, b) {
        (Value::Float(x), Value::Float(y)) => x.to_bits() == y.to_bits(),
        (Value::Tuple(x), Value::Tuple(y))
        | (Value::List(x), Value::List(y))
        | (Value::Set(x), Value::Set(y)) => all(x, y),
        (Value::Dict(x), Value::Dict(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|((k, v), (l, w))| same(k, l) && same(v, w))
        }
        (
            Value::Reduce { callable: c, args: a, state: s },
            Value::Reduce { callable: d, args: b, state: t },
        ) => same(c, d) && same(a, b) && opt(s, t),
        (
            Value::Object { class: c, args: a, kwargs: k, state: s },
            Value::Object { class: d, args: b, kwargs: l, state: t },
        ) => same(c, d) && same(a, b) && opt(k, l) && opt(s, t),
        (Value::PersistentId(x), Value::PersistentId(y)) => same(x, y),
        _ => a == b,
    }
}

fn has_kwargs(v: &Value) -> bool {
    match v {
        Value::Object { kwargs: Some(_), .. } => true,
        Value::Tuple(items) | Value::List(items) | Value::Set(items) => items.iter().any(has_kwargs),
        Value::Dict(pairs) => pairs.iter().any(|(k, v)| has_kwargs(k) || has_kwargs(v)),
        Value::Reduce { callable, args, state } => {
            has_kwargs(callable) || has_kwargs(args) || state.as_deref().is_some_and(has_kwargs)
        }
        Value::Object { class, args, state, .. } => {
            has_kwargs(class) || has_kwargs(args) || state.as_deref().is_some_and(has_kwargs)
        }
        Value::PersistentId(p) => has_kwargs(p),
        _ => false,
    }
}

/// Bytes as a PyTorch zip checkpoint: every tensor it accepts yields exactly dtype × shape bytes
/// or a named error, and an accepted state writes back to an archive of the predicted length
/// that reads back to the same tensors.
pub fn torch_zip(data: &[u8]) {
    let Ok(state) = torch_zip::read_mapped(anon_map(data), 0, data.len(), Arc::from(Path::new("fuzz")))
    else {
        return;
    };
    let mut all_ok = true;
    for (name, t) in &state.tensors {
        if t.nbytes() > MAX_PULL {
            all_ok = false;
            continue;
        }
        match t.bytes(name) {
            Ok(bytes) => assert_eq!(bytes.len(), t.nbytes(), "tensor '{name}'"),
            Err(_) => all_ok = false,
        }
    }
    if !all_ok {
        return;
    }
    let predicted = torch_zip::encoded_len(&state, "fuzz").expect("a state read from a file has a layout");
    let mut out = Cursor::new(Vec::new());
    let written = torch_zip::write_to(&state, &mut out, "fuzz").expect("a readable state writes");
    assert_eq!(written, predicted);
    let out = out.into_inner();
    let back = torch_zip::read_mapped(anon_map(&out), 0, out.len(), Arc::from(Path::new("fuzz-back")))
        .expect("our own archive reads");
    assert_eq!(back.tensors.len(), state.tensors.len());
    for ((name, t), (name2, b)) in state.tensors.iter().zip(&back.tensors) {
        assert_eq!(name, name2);
        assert_eq!((t.dtype, &t.shape), (b.dtype, &b.shape), "tensor '{name}'");
        assert_eq!(t.bytes(name).unwrap(), b.bytes(name).unwrap(), "tensor '{name}'");
    }
    let (mut none, mut none_back) = (state.none_keys.clone(), back.none_keys.clone());
    none.sort();
    none_back.sort();
    assert_eq!(none, none_back);
}

/// Bytes as a `.nemo` tar: listed members lie inside the input; every tensor and artifact of an
/// accepted checkpoint yields its bytes or a named error.
pub fn tar(data: &[u8]) {
    if let Ok(members) = list_members(data, Path::new("fuzz")) {
        for m in &members {
            assert!(m.offset.checked_add(m.len).is_some_and(|end| end <= data.len()), "{m:?}");
        }
    }
    let Ok(ckpt) = read_tar_bytes(data) else { return };
    for shard in &ckpt.shards {
        for (name, t) in &shard.tensors {
            if t.nbytes() <= MAX_PULL {
                if let Ok(bytes) = t.bytes(name) {
                    assert_eq!(bytes.len(), t.nbytes(), "tensor '{name}'");
                }
            }
        }
    }
    for a in &ckpt.meta.artifacts {
        let _ = a.source.bytes();
    }
}

/// Bytes as a SentencePiece `ModelProto` (a `.nemo`'s `tokenizer.model`, the converters' piece
/// editor): the piece counter agrees with the parser; an accepted model takes NeVA's
/// `<extra_id_*>` pieces (unless it has one already) and gives back exactly its own bytes when
/// they are removed again.
pub fn sentencepiece(data: &[u8]) {
    let counted = sentencepiece_pieces(data);
    let Ok(sp) = SentencePieceModel::parse(data.to_vec(), Path::new("fuzz.model")) else { return };
    assert_eq!(counted, Some(sp.len()), "the counter and the parser agree on the pieces");
    if let Ok(grown) = sp.with_user_defined(&EXTRA_IDS, Path::new("fuzz.model")) {
        assert_eq!(grown.len(), sp.len() + EXTRA_IDS.len());
        let back = grown.without_appended(&EXTRA_IDS, Path::new("fuzz.model")).expect("we appended them");
        assert_eq!(back.bytes(), sp.bytes());
    }
}

/// Bytes as the `tokenizer.model` that `generate`, `evaluate` and `train` tokenise with (the
/// core's reader): an accepted tokenizer encodes and decodes text, and streams it the same as it
/// decodes it.
pub fn tokenizer_model(data: &[u8]) {
    let Ok(tok) = Tokenizer::from_sentencepiece_bytes(data, "fuzz.model") else { return };
    check_tokenizer(&tok);
}

/// A tokenizer encodes and decodes sample text, and streams it the same as it decodes it.
fn check_tokenizer(tok: &Tokenizer) {
    for text in ["", "Hello world", "  two  spaces", "Ünïcödé 日本\n", "<s>[INST] <image>\n</s>"] {
        let Ok(ids) = tok.encode(text, false) else { continue };
        let Ok(decoded) = tok.decode(&ids, true) else { continue };
        let mut stream = tok.stream(true);
        let mut streamed = String::new();
        for &id in &ids {
            streamed.push_str(&stream.next_token(id).expect("decoded above"));
        }
        streamed.push_str(&stream.finish().expect("decoded above"));
        assert_eq!(streamed, decoded, "streaming {text:?}");
    }
}

/// Text as training records, LLaVA's JSON array and NeMo's `.jsonl`: a file-level error or one
/// verdict per record; a `.jsonl` verdict per non-empty line.
pub fn train_records(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let records = parse_jsonl(text);
    assert_eq!(records.len(), text.lines().filter(|l| !l.trim().is_empty()).count());
    let _ = parse_json_array(text, Path::new("fuzz.json"));
}

/// Bytes as a run's metrics log (`metrics.jsonl`) reopened to resume after 0, 2 and every step
/// (`MetricsLog::resume`), each time from a file of exactly those bytes: kept, it is a prefix of
/// the input made of whole lines, empty exactly when no record is returned, that record at or
/// before the step; refused, the error names the file and the file is left as it was.
pub fn metrics_log(data: &[u8]) {
    use shardsmith::train::metrics::MetricsLog;
    use std::sync::atomic::{AtomicUsize, Ordering};
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let name =
        format!("shardsmith-fuzz-{}-{}.jsonl", std::process::id(), CALLS.fetch_add(1, Ordering::Relaxed));
    let path = std::env::temp_dir().join(&name);
    for step in [0, 2, u64::MAX] {
        std::fs::write(&path, data).expect("a temporary log");
        match MetricsLog::resume(&path, step) {
            Ok((_, last)) => {
                let kept = std::fs::read(&path).expect("the kept log");
                assert!(data.starts_with(&kept), "the kept log is a prefix of the input");
                assert!(kept.is_empty() || kept.ends_with(b"\n"), "the kept log is whole lines");
                assert_eq!(last.is_some(), !kept.is_empty(), "a record returned exactly when one is kept");
                assert!(last.is_none_or(|r| r.step <= step), "a kept record after step {step}");
            }
            Err(e) => {
                assert!(e.to_string().contains(&name), "the error names the log: {e}");
                assert_eq!(
                    std::fs::read(&path).expect("the refused log"),
                    data,
                    "a refused log is left as it was"
                );
            }
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// Text as a `train --config` YAML, with and without a `--set` override: Ok or a named error.
pub fn train_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (origin, base) = (Path::new("fuzz.yaml"), Path::new("."));
    let _ = shardsmith::train::config::TrainConfig::parse(text, origin, base, &[]);
    let _ = shardsmith::train::config::TrainConfig::parse(
        text,
        origin,
        base,
        &["trainer.max_steps=3".to_string()],
    );
}

/// The tokenizers and sample configurations `train_examples` builds every record with: LLaVA's
/// flavour with llava-tiny's `tokenizer.json` (`<image>` 256, each template, legacy and not) and
/// NeMo's with llama-gqa's `tokenizer.model` plus NeVA's `<extra_id_0..7>` (each template, image
/// spans with and without start/end tokens); context lengths that cut some of the seed records
/// (a template's system prompt alone is ~100 tokens).
fn example_setups() -> &'static [(Tokenizer, ExampleConfig)] {
    static SETUPS: OnceLock<Vec<(Tokenizer, ExampleConfig)>> = OnceLock::new();
    SETUPS.get_or_init(|| {
        let hf = include_bytes!("../../../fixtures/llava-tiny/tokenizer.json");
        let hf =
            Tokenizer::from_json_bytes(hf, "llava-tiny/tokenizer.json", None).expect("fixture tokenizer");
        let sp = include_bytes!("../../../fixtures/llama-gqa/tokenizer.model");
        let mut neva =
            Tokenizer::from_sentencepiece_bytes(sp, "llama-gqa/tokenizer.model").expect("fixture tokenizer");
        let extra: Vec<String> = (0..8).map(|i| format!("<extra_id_{i}>")).collect();
        neva.add_special_tokens(&extra.iter().map(String::as_str).collect::<Vec<_>>()).expect("extra ids");
        let mut setups = Vec::new();
        for (template, max_len, legacy) in [
            (Template::VicunaV1, 4096, false),
            (Template::VicunaV1, 160, true),
            (Template::Llama2, 200, false),
            (Template::Plain, 4096, false),
        ] {
            let image_tokens = ImageTokens::LlavaHf { image_token_id: 256, n: 4 };
            let cfg = ExampleConfig {
                template,
                flavour: Flavour::Llava,
                image_tokens,
                max_len,
                legacy_tokenizer: legacy,
            };
            setups.push((hf.clone(), cfg));
        }
        for (template, max_len, use_im_start_end) in [
            (Template::VicunaV1, 4096, false),
            (Template::Llama2, 250, true),
            (Template::Nvgpt, 4096, false),
            (Template::Plain, 32, false),
        ] {
            let image_tokens = ImageTokens::Neva { n: 3, use_im_start_end };
            let cfg = ExampleConfig {
                template,
                flavour: Flavour::Nemo,
                image_tokens,
                max_len,
                legacy_tokenizer: false,
            };
            setups.push((neva.clone(), cfg));
        }
        for (tok, cfg) in &setups {
            cfg.validate(tok).expect("a valid setup");
        }
        setups
    })
}

/// Text as `.jsonl` training records, each record made a sample under every setup of
/// [`example_setups`]: a sample or a named bad-record reason, never a panic; a sample has as
/// many labels as ids, at most the context length, labels that are their own id or ignored,
/// and its image spans in order inside the ids with every image position ignored. Returns how
/// many samples each setup made (so that a replay can tell the checks were reached).
pub fn train_examples(data: &[u8]) -> Vec<usize> {
    let mut made = vec![0; example_setups().len()];
    let Ok(text) = std::str::from_utf8(data) else { return made };
    for record in parse_jsonl(text).into_iter().flatten() {
        for ((tok, cfg), made) in example_setups().iter().zip(&mut made) {
            let Ok(ex) = build_example(tok, cfg, &record) else { continue };
            *made += 1;
            assert_eq!(ex.ids.len(), ex.labels.len(), "{cfg:?}");
            assert!(ex.ids.len() <= cfg.max_len, "{cfg:?}: {} ids", ex.ids.len());
            for (&id, &label) in ex.ids.iter().zip(&ex.labels) {
                assert!(label == IGNORE_INDEX || label == i64::from(id), "{cfg:?}: label {label} at id {id}");
            }
            let mut end = 0;
            for span in &ex.image_spans {
                assert!(
                    span.start >= end && span.start + span.len <= ex.ids.len(),
                    "{cfg:?}: {:?}",
                    ex.image_spans
                );
                assert!(ex.labels[span.start..span.start + span.len].iter().all(|&l| l == IGNORE_INDEX));
                end = span.start + span.len;
            }
        }
    }
    made
}

/// Text as an HF `config.json`: LLaMA's hyper-parameters and a CLIP tower's config are read or
/// refused by name; hyper-parameters that pass validation write back to a config.json and a
/// model_config.yaml that read back to themselves (config.json stating BOS/EOS 1 and 2 where
/// none were given; the yaml carrying none).
pub fn hf_config(data: &[u8]) {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let _ = ClipVisionConfig::from_json(&json, "fuzz.json");
    let Ok(hp) = LlamaHparams::from_hf(&json, Path::new("fuzz.json")) else { return };
    if hp.validate(Path::new("fuzz.json")).is_err() {
        return;
    }
    let stated =
        LlamaHparams { bos: Some(hp.bos.unwrap_or(1)), eos: Some(hp.eos.unwrap_or(2)), ..hp.clone() };
    let back = LlamaHparams::from_hf(&hp.hf_config(DType::BF16), Path::new("written.json"))
        .expect("our own config.json");
    assert_eq!(back, stated, "config.json round trip");
    let text = hp.nemo_yaml(&NemoYamlOptions {
        dialect: NemoDialect::Mcore,
        dtype: DType::BF16,
        tp: 1,
        pp: 1,
        divisible_by: 1,
        tokenizer_model: None,
    });
    let cfg = NemoConfig::parse(text, Path::new("written.yaml")).expect("our own yaml");
    let back = LlamaHparams::from_nemo(&cfg, hp.vocab, Path::new("written.yaml")).expect("our own yaml");
    assert_eq!(LlamaHparams { bos: hp.bos, eos: hp.eos, ..back }, hp, "model_config.yaml round trip");
}

/// Text as a `.nemo`'s `model_config.yaml`: parsed or refused by name, and so are the LLaMA
/// hyper-parameters and NeVA's conversion record in it; a scalar set by the line editor
/// (`reshard`'s TP/PP edits, `--set`) is in the text afterwards, which parses to the same
/// document with that one value changed, or the edit is refused and nothing changes.
pub fn nemo_yaml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(cfg) = NemoConfig::parse(text.to_string(), Path::new("fuzz.yaml")) else { return };
    let _ = LlamaHparams::from_nemo(&cfg, 32000, Path::new("fuzz.yaml"));
    let _ = ConvertedFrom::from_yaml(&cfg.value);
    let edits: [(&str, serde_yaml::Value); 4] = [
        ("tensor_model_parallel_size", 2.into()),
        ("precision", "bf16".into()),
        ("tokenizer.model", "nemo:x_tokenizer.model".into()),
        ("mm_cfg.vision_encoder.freeze", true.into()),
    ];
    for (key, value) in edits {
        let mut edited = cfg.clone();
        match edited.set_scalar(key, value.clone()) {
            Ok(()) => {
                assert_eq!(edited.get(key), Some(&value), "set {key}");
                let reread =
                    NemoConfig::parse(edited.raw.clone(), Path::new("edited.yaml")).expect("the edit parses");
                assert_eq!(reread.value, edited.value, "set {key}: the text and the parsed view agree");
            }
            Err(_) => assert_eq!(edited.raw, cfg.raw, "a refused edit changes nothing"),
        }
    }
}

/// Bytes as an HF `tokenizer.json` (the core's fast-tokenizer path) and as the files listing
/// added tokens: a tokenizer that loads encodes and decodes text, and streams it as it decodes
/// it; the added-token readers return the list or a named error.
pub fn tokenizer_json(data: &[u8]) {
    for name in ["tokenizer.json", "tokenizer_config.json", "added_tokens.json"] {
        let read = |n: &str| Ok((n == name).then(|| data.to_vec()));
        let _ = hf_added_tokens(read, Path::new("fuzz"));
    }
    let Ok(tok) = Tokenizer::from_json_bytes(data, "fuzz/tokenizer.json", None) else { return };
    check_tokenizer(&tok);
}

/// Bytes as an image for the vision tower (`generate --image`, training images): decoded or
/// refused by name; an image that decodes (declared within 2048 × 2048) preprocesses under every aspect
/// mode to llava-tiny's 3 × crop × crop, all finite.
pub fn image(data: &[u8]) {
    // The size from the header first: a valid header may declare a picture of gigabytes, which
    // decoding would rightly try to allocate (up to the image crate's 512 MiB limit).
    let header = image::ImageReader::new(Cursor::new(data)).with_guessed_format();
    match header.ok().and_then(|r| r.into_dimensions().ok()) {
        Some((w, h)) if w <= 2048 && h <= 2048 => {}
        _ => return,
    }
    let Ok(rgb) = load_rgb_from_bytes(data, "fuzz.png") else { return };
    for mode in [AspectMode::Square, AspectMode::Pad, AspectMode::Keep] {
        let Ok(px) = preprocess_config().preprocess(&rgb, mode) else { continue };
        assert_eq!(px.data.len(), 3 * px.height * px.width, "{mode:?}");
        if mode != AspectMode::Keep {
            let crop = preprocess_config().crop_size;
            assert_eq!((px.height as u32, px.width as u32), crop, "{mode:?}");
        }
        assert!(px.data.iter().all(|v| v.is_finite()), "{mode:?}");
    }
}

fn preprocess_config() -> &'static PreprocessConfig {
    static CFG: OnceLock<PreprocessConfig> = OnceLock::new();
    CFG.get_or_init(|| {
        let json = include_bytes!("../../../fixtures/llava-tiny/preprocessor_config.json");
        let json: serde_json::Value = serde_json::from_slice(json).expect("fixture json");
        PreprocessConfig::from_json(&json, Path::new("preprocessor_config.json")).expect("fixture config")
    })
}

/// Text as each of the specs a user types on the command line or writes in a config field
/// (`--rule`, `--pattern`, `--init`, `--tokens`, `--device`, `hf://` references, projector,
/// template, part and dtype names): parsed or refused by name, never a panic; a rename rule or
/// drop pattern that parses applies to a small checkpoint or is refused; a projector type that
/// parses names a bounded list of tensors.
pub fn cli_specs(data: &[u8]) {
    use shardsmith_converters::names::neva::ProjectorType;
    use shardsmith_converters::surgery::{parts::Part, rename, vocab};
    let Ok(s) = std::str::from_utf8(data) else { return };
    let _ = shardsmith::hub::HubRef::parse(s);
    let _ = shardsmith::models::parse_device(s);
    let _ = shardsmith::models::projector::ProjectorKind::parse(s);
    let _ = AspectMode::parse(s);
    let _ = Template::parse(s);
    let _ = shardsmith_converters::names::neva::Template::parse(s);
    let _ = DType::parse(s);
    let _ = Part::parse(s);
    let _ = vocab::Init::parse(s);
    let _ = vocab::parse_token_list(s);
    if let Some(kind) = ProjectorType::parse(s) {
        let shapes = kind.shapes(3, 4);
        assert!(!shapes.is_empty() && shapes.len() <= 2 * shardsmith_converters::names::neva::MAX_MLP_DEPTH);
        assert_eq!(ProjectorType::parse(&kind.name()), Some(kind), "its name parses back");
    }
    if let Ok(rule) = rename::RenameRule::parse(s) {
        let _ = rename::rename(small_checkpoint(), &[rule]);
    }
    if rename::globs(&[s.to_string()]).is_ok() {
        let _ = rename::drop(small_checkpoint(), &[s.to_string()]);
    }
}

/// Two ranks of a few LLaMA-named tensors (for `cli_specs`' renames and drops).
fn small_checkpoint() -> &'static shardsmith_converters::Checkpoint {
    use shardsmith_converters::checkpoint::{
        ByteSource, Flavour, Meta, Parallelism, Rank, Shard, TensorEntry,
    };
    static CKPT: OnceLock<shardsmith_converters::Checkpoint> = OnceLock::new();
    CKPT.get_or_init(|| {
        let origin: Arc<Path> = Arc::from(Path::new("small"));
        let names = [
            "model.embed_tokens.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.1.input_layernorm.weight",
            "lm_head.weight",
        ];
        let tensors = |rank: u8| {
            names
                .iter()
                .map(|n| {
                    let bytes = ByteSource::owned(vec![rank; 8]);
                    (n.to_string(), TensorEntry::new(DType::F32, vec![2], bytes, origin.clone()))
                })
                .collect()
        };
        let shards = (0..2).map(|tp| Shard::new(Rank { tp, pp: 0 }, tensors(tp as u8))).collect();
        let meta = Meta {
            path: "small".into(),
            flavour: Flavour::SafetensorsFile,
            parallel: Parallelism { tp: 2, pp: 1 },
            config: None,
            artifacts: vec![],
        };
        shardsmith_converters::Checkpoint { meta, shards }
    })
}

/// `data` in a fresh read-only anonymous map (the readers take a shared map).
fn anon_map(data: &[u8]) -> Arc<memmap2::Mmap> {
    let mut map = memmap2::MmapMut::map_anon(data.len().max(1)).expect("anonymous map");
    map[..data.len()].copy_from_slice(data);
    Arc::new(map.make_read_only().expect("read-only"))
}
