#!/usr/bin/env python3
"""Write the committed fuzz seeds (stdlib only, deterministic): a few small valid inputs per
target, taken from fixtures/torch/ or built here. Run from anywhere:

    python3 converters/fuzz/seeds/make_seeds.py

Fills converters/fuzz/seeds/<target>/ for every target (about 150 KB in all).
"""
import collections
import io
import json
import pickle
import shutil
import struct
import tarfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TORCH = HERE.parents[2] / "fixtures" / "torch"


def fresh(name):
    d = HERE / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    return d


def member(zip_path, suffix):
    with zipfile.ZipFile(zip_path) as z:
        (name,) = [n for n in z.namelist() if n.endswith(suffix)]
        return z.read(name)


def pickles():
    d = fresh("pickle")
    # torch.save's protocol-2 state dict: tensors and Transformer Engine's BytesIO _extra_state.
    (d / "extra_state.pkl").write_bytes(member(TORCH / "extra_state.ckpt", "/data.pkl"))
    # Text opcodes (protocol 0: ASCII only, the reader takes no escaped literals) and framed
    # protocol-4 opcodes, over allowed globals only.
    value = collections.OrderedDict(
        [("i", [0, 255, 65535, -1, 2**40]), ("f", (1.5, -0.0)), ("s", "text"), ("b", b"\x01\x7f"),
         ("set", {1, 2}), ("fs", frozenset([3])), ("ba", bytearray(b"x")), ("t", (None, True, False)),
         ("memo", None)])
    value["memo"] = value["i"]  # a shared reference: memo PUT/GET
    (d / "text_p0.pkl").write_bytes(pickle.dumps(value, protocol=0))
    value["big"] = -(2**70)  # LONG1; protocol 0's LONG literals are limited to 64 bits here
    (d / "framed_p4.pkl").write_bytes(pickle.dumps(value, protocol=4))


def torch_zips():
    d = fresh("torch_zip")
    for name in ["parameters.pt", "shared_storage.pt", "extra_state.ckpt"]:
        shutil.copy(TORCH / name, d / name)


def tar_bytes(members):
    """An uncompressed PAX tar like NeMo's, with only the two end-of-archive blocks (no record
    padding, to keep the seed small)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.mtime = 0
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                t.addfile(info)
            else:
                info.size = len(data)
                info.mode = 0o644
                t.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    end = len(raw.rstrip(b"\0"))
    end = (end + 511) // 512 * 512
    return raw[:end] + b"\0" * 1024


def tars():
    # torch_dist.nemo is written by the Rust writer (see the README), not here: keep it.
    kept = HERE / "tar" / "torch_dist.nemo"
    torch_dist = kept.read_bytes() if kept.exists() else None
    d = fresh("tar")
    if torch_dist is not None:
        kept.write_bytes(torch_dist)
    weights = (TORCH / "parameters.pt").read_bytes()
    tok = "0123456789abcdef0123456789abcdef_tokenizer.model"
    yaml = lambda tp: (f"precision: bf16\ntensor_model_parallel_size: {tp}\npipeline_model_parallel_size: 1\n"
                       f"tokenizer:\n  library: sentencepiece\n  model: nemo:{tok}\n").encode()
    (d / "single.nemo").write_bytes(tar_bytes([
        ("./", None), ("./model_config.yaml", yaml(1)), ("./model_weights.ckpt", weights),
        (f"./{tok}", b"sp")]))
    (d / "mp_rank.nemo").write_bytes(tar_bytes([
        ("./", None), ("./model_config.yaml", yaml(2)),
        ("./mp_rank_00/", None), ("./mp_rank_00/model_weights.ckpt", weights),
        ("./mp_rank_01/", None), ("./mp_rank_01/model_weights.ckpt", weights)]))
    f32 = lambda *v: struct.pack(f"<{len(v)}f", *v)
    zarray = lambda shape, chunks, dtype: json.dumps(
        {"chunks": chunks, "compressor": None, "dtype": dtype, "fill_value": None, "filters": None,
         "order": "C", "shape": shape, "zarr_format": 2}).encode()
    (d / "zarr.nemo").write_bytes(tar_bytes([
        ("./", None), ("./model_config.yaml", b"mcore_gpt: true\ntensor_model_parallel_size: 2\n"),
        ("./model_weights/", None),
        ("./model_weights/metadata.json", b'{"sharded_backend": "zarr", "sharded_backend_version": 1}'),
        ("./model_weights/w/.zarray", zarray([3, 2], [2, 2], "<f4")),
        ("./model_weights/w/0.0", f32(1, 2, 3, 4)), ("./model_weights/w/1.0", f32(5, 6, 0, 0)),
        ("./model_weights/b/.zarray", zarray([2], [2], "bfloat16")),
        ("./model_weights/b/0", b"\x01\x02\x03\x04")]))


def safetensors():
    d = fresh("safetensors_header")

    def write(name, tensors, metadata=None):
        header, data = {}, b""
        for key, dtype, shape, payload in tensors:
            header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(payload)]}
            data += payload
        if metadata is not None:
            header["__metadata__"] = metadata
        h = json.dumps(header, separators=(",", ":")).encode()
        h += b" " * (-len(h) % 8)
        (d / name).write_bytes(struct.pack("<Q", len(h)) + h + data)

    write("small.safetensors", [
        ("a", "F32", [2, 2], struct.pack("<4f", 1, 2, 3, 4)),
        ("b", "BF16", [3], b"\x80\x3f\x00\x40\x40\x40"),
        ("c", "I64", [], struct.pack("<q", 7)),
    ], {"format": "pt"})
    write("edge.safetensors", [
        ("empty", "F16", [0, 4], b""), ("u8", "U8", [1, 1, 3], b"\x01\x02\x03"),
        ("bool", "BOOL", [2], b"\x00\x01"),
    ])


FIXTURES = HERE.parents[2] / "fixtures"


def tokenizers():
    # The fixtures' SentencePiece models, for both readers (the converters' piece editor and the
    # core's tokenizer).
    for target in ("sentencepiece", "tokenizer_model"):
        d = fresh(target)
        for name in ("llama-mha", "llama-gqa"):
            shutil.copy(FIXTURES / name / "tokenizer.model", d / f"{name}.model")


# NeMo-style records (one JSON object a line) covering the shapes the masking code branches on:
# an image marker first, last, missing or twice; several rounds; a system prompt and nvgpt labels;
# a leading gpt turn; user/assistant spellings; an empty reply.
RECORDS = [
    {"id": "first", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A box."}]},
    {"id": 7, "image": ["b.png"], "conversations": [
        {"from": "human", "value": "Which colour?\n<image>"}, {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "And the lid?"}, {"from": "gpt", "value": "Blue, with a handle."}]},
    {"id": "no-marker", "image": "c.png", "conversations": [
        {"from": "user", "value": "Describe it."}, {"from": "assistant", "value": "Round."}]},
    {"id": "two-markers", "image": "d.png", "conversations": [
        {"from": "human", "value": "<image> and <image>"}, {"from": "gpt", "value": "Twice."}]},
    {"id": "text", "system": "You are terse.", "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello.", "label": "quality:4,humor:0"},
        {"from": "human", "value": "Bye"}, {"from": "gpt", "value": ""}]},
    {"id": "gpt-first", "conversations": [
        {"from": "gpt", "value": "Ahead."}, {"from": "human", "value": "What?"}, {"from": "gpt", "value": "Nothing."}]},
]


def training():
    d = fresh("train_config")
    shutil.copy(FIXTURES / "train-tiny" / "train.yaml", d / "train.yaml")
    lines = "".join(json.dumps(r) + "\n" for r in RECORDS).encode()
    d = fresh("train_records")
    shutil.copy(FIXTURES / "train-tiny" / "data.json", d / "data.json")
    (d / "records.jsonl").write_bytes(lines)
    d = fresh("train_examples")
    (d / "records.jsonl").write_bytes(lines)
    # The fixture's LLaVA array as one record a line.
    data = json.loads((FIXTURES / "train-tiny" / "data.json").read_text())
    (d / "train-tiny.jsonl").write_bytes("".join(json.dumps(r) + "\n" for r in data).encode())


def metrics():
    # Logs as `train` writes them: whole records, a null loss (a skipped step), an extra field,
    # and a run killed mid-line.
    d = fresh("metrics_log")
    rec = lambda step, loss: json.dumps({"step": step, "loss": loss, "lr": 1e-4, "grad_norm": 0.5, "tokens": 64,
                                         "consumed_samples": 4 * step, "tokens_per_s": 1000.0,
                                         "elapsed_s": 0.25 * step}) + "\n"
    (d / "three.jsonl").write_text(rec(1, 2.5) + rec(2, None) + rec(3, 2.25))
    extra = json.loads(rec(1, 2.0))
    extra["skipped_records"] = 2
    (d / "torn.jsonl").write_text(json.dumps(extra) + "\n" + rec(2, 1.5) + rec(3, 1.25)[:40])


def configs():
    d = fresh("hf_config")
    for name in ("llama-mha", "llama-gqa", "llava-tiny", "llava-orig-tiny", "llava-tiny-clip", "clip-vision"):
        shutil.copy(FIXTURES / name / "config.json", d / f"{name}.json")
    # Inputs the fuzzer found (found-*) are kept as they are: nothing here could rebuild them.
    found = {p.name: p.read_bytes() for p in (HERE / "tokenizer_json").glob("found-*")}
    d = fresh("tokenizer_json")
    for name, data in found.items():
        (d / name).write_bytes(data)
    for name in ("llama-gqa", "llava-tiny"):
        shutil.copy(FIXTURES / name / "tokenizer.json", d / f"{name}.json")
    for name in ("tokenizer_config.json", "added_tokens.json"):
        shutil.copy(FIXTURES / "llava-tiny" / name, d / f"llava-tiny-{name}")
    # Regression (the fuzzer's first find): a syntax error inside `decoder` made the tokenizers
    # crate panic while loading.
    text = (FIXTURES / "llava-tiny" / "tokenizer.json").read_text()
    assert '"decoder": {' in text
    (d / "broken-decoder.json").write_text(text.replace('"decoder": {', '"decoder": {7: 0, ', 1))
    d = fresh("nemo_yaml")
    with tarfile.open(FIXTURES / "nemo-dist" / "llama-mha-zarr.nemo") as t:
        (member,) = [m for m in t.getmembers() if m.name.endswith("model_config.yaml")]
        (d / "llama-mha.yaml").write_bytes(t.extractfile(member).read())
    # NeVA's sections as convert writes them (mm_cfg, data, converted_from), comments and a
    # flow sequence included.
    (d / "neva.yaml").write_text(
        "# a NeVA config\nmcore_gpt: true\nprecision: bf16\ntensor_model_parallel_size: 1\n"
        "pipeline_model_parallel_size: 1\nnum_layers: 2\nhidden_size: 64\nffn_hidden_size: 172\n"
        "num_attention_heads: 4\nnum_query_groups: 2\nencoder_seq_length: 64\n"
        "max_position_embeddings: 64\nrotary_base: 10000.0\nlayernorm_epsilon: 1.0e-05\n"
        "share_embeddings_and_output_weights: false\ntokenizer:\n  library: sentencepiece\n"
        "  model: nemo:abc_tokenizer.model\nmm_cfg:\n  llm:\n    freeze: false\n"
        "  vision_encoder:\n    from_pretrained: '/tmp/x-clip'\n    freeze: true  # referenced\n"
        "    crop_size: [32, 32]\n  mm_mlp_adapter_type: mlp2x_gelu\ndata:\n  image_token_len: 16\n"
        "  conv_template: v1\nconverted_from:\n  format: llava-hf\n  vocab_size: 320\n"
        "  added_tokenizer_pieces: 8\n  image_token_index: 256\n  pad_token_id: 257\n")
    d = fresh("image")
    shutil.copy(FIXTURES / "llava-tiny" / "image.png", d / "llava-tiny.png")
    for name in ("tall.png", "wide.png"):
        shutil.copy(FIXTURES / "train-tiny" / "images" / name, d / name)


# Specs as users type them: rename rules (groups, anchors), drop globs, init modes, token lists,
# devices, hub references, projector / template / part / dtype names.
SPECS = {
    "rule.txt": r"^model\.layers\.(\d+)\.mlp\.(.*)$=layers.${1}.ffn.$2",
    "glob.txt": "model.layers.*.self_attn.*",
    "init.txt": "mean",
    "tokens.txt": "<image>,<pad>,<extra_id_0>",
    "device.txt": "cuda:1",
    "hub.txt": "hf://llava-hf/llava-1.5-7b-hf@main",
    "projector.txt": "mlp2x_gelu",
    "template.txt": "vicuna_v1",
    "dtype.txt": "bf16",
}


def specs():
    d = fresh("cli_specs")
    for name, text in SPECS.items():
        (d / name).write_text(text)


if __name__ == "__main__":
    pickles()
    torch_zips()
    tars()
    safetensors()
    tokenizers()
    training()
    configs()
    metrics()
    specs()
    total = sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file() and p.suffix != ".py")
    print(f"seeds written under {HERE} ({total} bytes)")
