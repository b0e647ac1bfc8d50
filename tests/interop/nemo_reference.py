#!/usr/bin/env python3
"""Independent PyTorch implementation of HF LLaMA-2 <-> NeMo 1.x (.nemo, non-distributed
model_weights.ckpt per rank) conversion with TP/PP resharding, written the way NeMo's own scripts
do it: whole state dicts in RAM, tensors built with torch ops, one torch.save per rank, the
archive made with tarfile. The one implementation behind two users:

  * bench/pytorch_convert.py        the CLI and the speed / peak-memory baseline of bench/convert.sh;
  * tests/interop/nemo_reference_check.py   the numerical reference for shardsmith's converter.

What it reproduces (docs formats.md, sections in brackets):
  NeMo's HF->NeMo converter (scripts/nlp_language_modeling/convert_hf_llama_to_nemo.py) followed
  by megatron_change_num_partitions.py's TP/PP split, and, for the way back, the TP/PP merge
  followed by convert_nemo_llama_to_hf.py:
  * key names, mcore and legacy (§3.2, §3.3); QKV fused per query group (§3.4); fc1 = [gate; up]
    (§3.5); legacy `rotary_pos_emb.inv_freq` = NeMo's own fp32 formula, cast to the model dtype
    (§2.2, §3.6) on every PP stage;
  * make_vocab_size_divisible_by = largest power of two <= 128 dividing V; Vp = ceil(V/(m*tp))*(m*tp),
    padding rows are zeros (as megatron_change_num_partitions pads) (§4.2);
  * TP rules (§4.1): embedding/output_layer/QKV split dim 0 contiguously, linear_proj/fc2 split
    dim 1, fc1 split per half (rank t = cat(gate_t, up_t)), norms replicated;
  * PP (§4.4): stage p holds layers [p*L/pp, (p+1)*L/pp) renumbered 0..L/pp-1; embedding on stage 0,
    final norm + output layer on the last stage;
  * rank member names (§1.3); model_config.yaml (§3.8, §5); tokenizer as `<32hex>_tokenizer.model`
    artifact referenced as `nemo:<32hex>_tokenizer.model` (§1.4); uncompressed tar of a temporary
    directory added with arcname "." (§1.1);
  * `<linear>._extra_state: None` entries, as NeMo 1.23 writes them (§2.2).

Deliberate differences from NeMo, all in the baseline's favour (it can only get faster, never
slower, than the real thing): the TP1 .nemo that NeMo writes between its converter and
megatron_change_num_partitions (and on the way back) is skipped; the QKV fusion is one torch.cat
per layer instead of NeMo's repeated cat inside the group loop (quadratic copying); tensors are
cast to the target dtype as they are read instead of building the model in fp32 first (bitwise the
same result); ranks are materialised one at a time (NeMo holds every rank's model at once), which is
what lets a 7B conversion fit in 24 GiB.

Memory, for reading peak-RSS numbers: safetensors.torch.load_file (safetensors 0.8) returns tensors
backed by the file mapping, so HF pages count in RSS as they are touched (reclaimable page cache,
not heap); HF -> .nemo therefore peaks near 2x the model in RSS (~1x of it anonymous: the NeMo
tensors) plus one rank. .nemo -> HF holds every rank in RAM (torch.load) plus one safetensors
shard's serialisation buffer (<= 5 GB).
"""

import json
import math
import re
import shutil
import tarfile
import tempfile
import uuid
from collections import OrderedDict
from pathlib import Path

import torch
import yaml

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
WEIGHTS = "model_weights.ckpt"
ARTIFACT_RE = re.compile(r"^[0-9a-f]{32}_tokenizer\.model$")
MAX_SHARD_BYTES = 5 * 10**9  # transformers' save_pretrained default "5GB"

# --- names (formats.md §3.2, §3.3) -------------------------------------------------------------

# canonical role -> (mcore name, legacy name); {i} = stage-local layer index
NEMO_NAMES = {
    "embedding": ("model.embedding.word_embeddings.weight", "model.language_model.embedding.word_embeddings.weight"),
    "input_norm": (
        "model.decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight",
        "model.language_model.encoder.layers.{i}.input_layernorm.weight",
    ),
    "qkv": (
        "model.decoder.layers.{i}.self_attention.linear_qkv.weight",
        "model.language_model.encoder.layers.{i}.self_attention.query_key_value.weight",
    ),
    "proj": (
        "model.decoder.layers.{i}.self_attention.linear_proj.weight",
        "model.language_model.encoder.layers.{i}.self_attention.dense.weight",
    ),
    "post_norm": (
        "model.decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight",
        "model.language_model.encoder.layers.{i}.post_attention_layernorm.weight",
    ),
    "fc1": (
        "model.decoder.layers.{i}.mlp.linear_fc1.weight",
        "model.language_model.encoder.layers.{i}.mlp.dense_h_to_4h.weight",
    ),
    "fc2": (
        "model.decoder.layers.{i}.mlp.linear_fc2.weight",
        "model.language_model.encoder.layers.{i}.mlp.dense_4h_to_h.weight",
    ),
    "final_norm": ("model.decoder.final_layernorm.weight", "model.language_model.encoder.final_layernorm.weight"),
    "output": ("model.output_layer.weight", "model.language_model.output_layer.weight"),
}
LEGACY_INV_FREQ = "model.language_model.rotary_pos_emb.inv_freq"
LAYER_ROLES = ["input_norm", "qkv", "proj", "post_norm", "fc1", "fc2"]
# linear modules whose `_extra_state` NeMo 1.23 (megatron-core 0.5) saves as None (§2.2)
EXTRA_STATE = {
    "mcore": [
        "model.decoder.layers.{i}.self_attention.linear_proj._extra_state",
        "model.decoder.layers.{i}.self_attention.linear_qkv._extra_state",
        "model.decoder.layers.{i}.mlp.linear_fc1._extra_state",
        "model.decoder.layers.{i}.mlp.linear_fc2._extra_state",
    ],
    "legacy": [
        "model.language_model.encoder.layers.{i}.self_attention.query_key_value._extra_state",
        "model.language_model.encoder.layers.{i}.self_attention.dense._extra_state",
        "model.language_model.encoder.layers.{i}.mlp.dense_h_to_4h._extra_state",
        "model.language_model.encoder.layers.{i}.mlp.dense_4h_to_h._extra_state",
    ],
}
EXTRA_STATE_OUTPUT = {"mcore": "model.output_layer._extra_state", "legacy": "model.language_model.output_layer._extra_state"}

HF_LAYER = {
    "input_norm": "model.layers.{i}.input_layernorm.weight",
    "q": "model.layers.{i}.self_attn.q_proj.weight",
    "k": "model.layers.{i}.self_attn.k_proj.weight",
    "v": "model.layers.{i}.self_attn.v_proj.weight",
    "proj": "model.layers.{i}.self_attn.o_proj.weight",
    "post_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "gate": "model.layers.{i}.mlp.gate_proj.weight",
    "up": "model.layers.{i}.mlp.up_proj.weight",
    "fc2": "model.layers.{i}.mlp.down_proj.weight",
}


def nemo_name(role, layout, i=None):
    name = NEMO_NAMES[role][0 if layout == "mcore" else 1]
    return name.format(i=i) if i is not None else name


class ConvertError(Exception):
    pass


# --- hyper-parameters ---------------------------------------------------------------------------


class HParams:
    def __init__(self, layers, hidden, ffn, heads, groups, head_dim, vocab, theta, eps, max_pos, init_std, rope_factor, tied):
        self.L, self.H, self.F, self.nh, self.ng, self.d, self.V = layers, hidden, ffn, heads, groups, head_dim, vocab
        self.theta, self.eps, self.max_pos, self.init_std, self.rope_factor, self.tied = theta, eps, max_pos, init_std, rope_factor, tied

    @classmethod
    def from_hf(cls, cfg):
        nh = cfg["num_attention_heads"]
        ng = cfg.get("num_key_value_heads") or nh
        d = cfg.get("head_dim") or cfg["hidden_size"] // nh
        rs = cfg.get("rope_scaling")
        factor = None
        if rs:
            kind = rs.get("rope_type", rs.get("type"))
            if kind != "linear":
                raise ConvertError(f"rope_scaling type {kind!r}: NeMo 1.23's converter supports only 'linear'")
            factor = float(rs["factor"])
        return cls(
            cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"], nh, ng, d, cfg["vocab_size"],
            float(cfg.get("rope_theta", 10000.0)), float(cfg.get("rms_norm_eps", 1e-6)),
            cfg.get("max_position_embeddings", 4096), float(cfg.get("initializer_range", 0.02)), factor,
            bool(cfg.get("tie_word_embeddings", False)),
        )

    @classmethod
    def from_yaml(cls, y, vocab):
        nh = y["num_attention_heads"]
        return cls(
            y["num_layers"], y["hidden_size"], y["ffn_hidden_size"], nh, y.get("num_query_groups") or nh,
            y.get("kv_channels") or y["hidden_size"] // nh, vocab, float(y.get("rotary_base", 10000.0)),
            float(y.get("layernorm_epsilon", 1e-5)), y.get("max_position_embeddings", y.get("encoder_seq_length", 4096)),
            float(y.get("init_method_std", 0.02)), y.get("seq_len_interpolation_factor"),
            bool(y.get("share_embeddings_and_output_weights", False)),
        )


def divisible_by(vocab):
    """NeMo's converter: largest power of two <= 128 that divides the vocabulary (§3.8)."""
    base = 128
    while vocab % base:
        base //= 2
    return base


def padded_vocab(vocab, multiple, tp):
    """Megatron's _vocab_size_with_padding (§4.2)."""
    m = multiple * tp
    return int(math.ceil(vocab / m) * m)


def check_parallelism(hp, layout, tp, pp):
    problems = []
    if tp < 1 or pp < 1:
        problems.append(f"tp={tp} pp={pp}: both must be >= 1")
    else:
        for what, n in (("num_attention_heads", hp.nh), ("num_query_groups", hp.ng), ("ffn_hidden_size", hp.F)):
            if n % tp:
                problems.append(f"{what}={n} is not divisible by tp={tp}")
        if hp.L % pp:
            problems.append(f"num_layers={hp.L} is not divisible by pp={pp}")
    if layout == "legacy" and hp.ng != hp.nh:
        problems.append(f"legacy layout has no GQA (num_query_groups={hp.ng} != num_attention_heads={hp.nh}); use mcore")
    if hp.tied:
        problems.append("tied embeddings are not supported (LLaMA-2 is untied)")
    if problems:
        raise ConvertError("; ".join(problems))


def member_name(t, p, tp, pp):
    """formats.md §1.3, with the './' prefix NeMo's tar has."""
    if tp * pp == 1:
        return f"./{WEIGHTS}"
    if pp == 1:
        return f"./mp_rank_{t:02d}/{WEIGHTS}"
    return f"./tp_rank_{t:02d}_pp_rank_{p:03d}/{WEIGHTS}"


def inv_freq(hp, dtype):
    """NeMo's RotaryEmbedding buffer: 1 / base ** (arange(0, dim, 2).float() / dim), in fp32, then
    cast with the model (rotary_percentage = 1.0, so dim = kv_channels)."""
    dim = hp.d
    f = 1.0 / (hp.theta ** (torch.arange(0, dim, 2).float() / dim))
    return f.to(dtype)


# --- HF side ------------------------------------------------------------------------------------


def read_hf_config(hf_dir):
    with open(Path(hf_dir) / "config.json") as f:
        return json.load(f)


def hf_weight_files(hf_dir):
    d = Path(hf_dir)
    for index, single in (("model.safetensors.index.json", "model.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (d / index).exists():
            with open(d / index) as f:
                return [d / n for n in sorted(set(json.load(f)["weight_map"].values()))]
        if (d / single).exists():
            return [d / single]
    raise ConvertError(f"{hf_dir}: no model.safetensors[.index.json] or pytorch_model.bin[.index.json]")


def load_hf_state_dict(hf_dir):
    """The whole checkpoint in RAM, like NeMo's converter (LlamaForCausalLM.from_pretrained)."""
    from safetensors.torch import load_file

    sd = {}
    for f in hf_weight_files(hf_dir):
        part = load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f, map_location="cpu", weights_only=True)
        sd.update(part)
    for k in [k for k in sd if k.endswith("rotary_emb.inv_freq")]:
        del sd[k]
    return sd


def hf_to_nemo_full(sd, hp, layout, dtype):
    """HF state dict -> TP1/PP1 NeMo tensors keyed by (role, global layer or None), vocab NOT yet
    padded. Consumes `sd` (tensors are popped as they are used so the peak stays ~1x the model)."""

    def take(name):
        if name not in sd:
            raise ConvertError(f"HF checkpoint has no tensor {name!r}")
        t = sd.pop(name)
        return t.to(dtype) if t.is_floating_point() else t

    full = OrderedDict()
    full[("embedding", None)] = take("model.embed_tokens.weight")
    hpg = hp.nh // hp.ng
    for l in range(hp.L):
        n = {k: v.format(i=l) for k, v in HF_LAYER.items()}
        full[("input_norm", l)] = take(n["input_norm"])
        q = take(n["q"]).reshape(hp.nh, hp.d, hp.H)
        k = take(n["k"]).reshape(hp.ng, hp.d, hp.H)
        v = take(n["v"]).reshape(hp.ng, hp.d, hp.H)
        pieces = []
        for g in range(hp.ng):  # §3.4: per query group [q heads of g; k_g; v_g]
            pieces += [q[g * hpg : (g + 1) * hpg], k[g : g + 1], v[g : g + 1]]
        full[("qkv", l)] = torch.cat(pieces).reshape((hp.nh + 2 * hp.ng) * hp.d, hp.H)
        del q, k, v, pieces
        full[("proj", l)] = take(n["proj"])
        full[("post_norm", l)] = take(n["post_norm"])
        full[("fc1", l)] = torch.cat([take(n["gate"]), take(n["up"])])  # §3.5: [gate; up]
        full[("fc2", l)] = take(n["fc2"])
    full[("final_norm", None)] = take("model.norm.weight")
    full[("output", None)] = take("lm_head.weight")
    if sd:
        raise ConvertError(f"unmapped HF tensors: {sorted(sd)[:10]}{' …' if len(sd) > 10 else ''}")
    return full


def pad_vocab(full, hp, vp):
    for role in ("embedding", "output"):
        w = full[(role, None)]
        if w.shape[0] != hp.V:
            raise ConvertError(f"{role}: {w.shape[0]} rows, config vocab_size is {hp.V}")
        if vp > hp.V:
            full[(role, None)] = torch.cat([w, torch.zeros(vp - hp.V, w.shape[1], dtype=w.dtype)])


def own(t):
    """A rank's own contiguous copy: torch.save of a view would write the whole parent storage."""
    return t.clone(memory_format=torch.contiguous_format)


def tp_split(role, w, tp):
    """§4.1: list of tp local tensors (views)."""
    if role in ("input_norm", "post_norm", "final_norm"):
        return [w] * tp
    if role in ("embedding", "output", "qkv"):
        return list(torch.split(w, w.shape[0] // tp, dim=0))
    if role in ("proj", "fc2"):
        return list(torch.split(w, w.shape[1] // tp, dim=1))
    if role == "fc1":
        gate, up = torch.chunk(w, 2, dim=0)
        return [torch.cat([g, u]) for g, u in zip(torch.chunk(gate, tp, dim=0), torch.chunk(up, tp, dim=0))]
    raise ValueError(role)


def stage_roles(hp, layout, p, pp):
    """[(role, global layer, stage-local layer)] in module (state_dict) order for stage p."""
    per = hp.L // pp
    out = []
    if p == 0:
        out.append(("embedding", None, None))
    for l in range(p * per, (p + 1) * per):
        out += [(r, l, l - p * per) for r in LAYER_ROLES]
    if p == pp - 1:
        out += [("final_norm", None, None), ("output", None, None)]
    return out


def rank_state_dicts(full, hp, layout, tp, pp, dtype):
    """Yield ((t, p), member name, state dict) one rank at a time, in member order."""
    for p in range(pp):
        roles = stage_roles(hp, layout, p, pp)
        per = hp.L // pp
        for t in range(tp):
            sd = OrderedDict()
            if layout == "legacy":
                sd[LEGACY_INV_FREQ] = inv_freq(hp, dtype)
            for role, l, local in roles:
                sd[nemo_name(role, layout, local)] = own(tp_split(role, full[(role, l)], tp)[t])
            for local in range(per):
                for e in EXTRA_STATE[layout]:
                    sd[e.format(i=local)] = None
            if p == pp - 1:
                sd[EXTRA_STATE_OUTPUT[layout]] = None
            yield (t, p), member_name(t, p, tp, pp), sd


def precision_of(dtype):
    return {torch.bfloat16: "bf16", torch.float16: 16, torch.float32: 32}[dtype]


def dtype_of_precision(prec):
    s = str(prec)
    if s.startswith("bf16"):
        return torch.bfloat16
    if s.startswith("16"):
        return torch.float16
    return torch.float32


def nemo_yaml(hp, tp, pp, layout, dtype, tokenizer_ref):
    """model_config.yaml as NeMo's converter writes it (§3.8, §5.2), keys in NeMo's order."""
    mcore = layout == "mcore"
    return OrderedDict(
        mcore_gpt=mcore,
        transformer_engine=mcore,
        precision=precision_of(dtype),
        megatron_amp_O2=False,
        micro_batch_size=4,
        global_batch_size=8,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=None,
        encoder_seq_length=hp.max_pos,
        max_position_embeddings=hp.max_pos,
        num_layers=hp.L,
        hidden_size=hp.H,
        ffn_hidden_size=hp.F,
        num_attention_heads=hp.nh,
        num_query_groups=hp.ng,
        kv_channels=None if hp.d * hp.nh == hp.H else hp.d,
        init_method_std=hp.init_std,
        normalization="rmsnorm",
        layernorm_epsilon=hp.eps,
        make_vocab_size_divisible_by=divisible_by(hp.V),
        bias=False,
        activation="fast-swiglu",
        position_embedding_type="rope",
        rotary_percentage=1.0,
        rotary_base=hp.theta,
        seq_len_interpolation_factor=hp.rope_factor,
        share_embeddings_and_output_weights=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        ffn_dropout=0.0,
        use_cpu_initialization=False,
        tokenizer=OrderedDict(
            library="sentencepiece",
            type=None,
            model=tokenizer_ref,
            vocab_file=None,
            merge_file=None,
            delimiter=None,
            sentencepiece_legacy=False,
        ),
        target="nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel",
        nemo_version="1.23.0",
    )


def _plain(o):
    if isinstance(o, dict):
        return {k: _plain(v) for k, v in o.items()}
    return o


def prepare_hf2nemo(hf_dir, tp, pp, layout, dtype_name=None):
    """Load HF, build the TP1 NeMo tensors with padded vocab. Returns (hp, full, dtype)."""
    if layout not in ("mcore", "legacy"):
        raise ConvertError(f"layout {layout!r}: mcore or legacy")
    hp = HParams.from_hf(read_hf_config(hf_dir))
    check_parallelism(hp, layout, tp, pp)
    sd = load_hf_state_dict(hf_dir)
    if "model.embed_tokens.weight" not in sd:
        raise ConvertError(f"{hf_dir}: no model.embed_tokens.weight")
    dtype = DTYPES[dtype_name] if dtype_name else sd["model.embed_tokens.weight"].dtype
    full = hf_to_nemo_full(sd, hp, layout, dtype)
    pad_vocab(full, hp, padded_vocab(hp.V, divisible_by(hp.V), tp))
    return hp, full, dtype


def hf2nemo(hf_dir, out, tp, pp, layout="mcore", dtype_name=None, tokenizer=None):
    tok = Path(tokenizer) if tokenizer else Path(hf_dir) / "tokenizer.model"
    if not tok.exists():
        raise ConvertError(f"{tok}: no SentencePiece tokenizer.model (NeMo LLaMA needs one); pass --tokenizer")
    hp, full, dtype = prepare_hf2nemo(hf_dir, tp, pp, layout, dtype_name)
    out = Path(out)
    # NeMo's save_to: write everything into a temporary directory, then tar it with arcname ".".
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".nemo-tmp-") as tmp:
        artifact = f"{uuid.uuid4().hex}_tokenizer.model"
        shutil.copyfile(tok, Path(tmp) / artifact)
        with open(Path(tmp) / "model_config.yaml", "w") as f:
            yaml.safe_dump(_plain(nemo_yaml(hp, tp, pp, layout, dtype, f"nemo:{artifact}")), f, sort_keys=False)
        for _, member, sd in rank_state_dicts(full, hp, layout, tp, pp, dtype):
            path = Path(tmp) / member
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(sd, path)
            del sd
        del full
        with tarfile.open(out, "w:") as tar:
            tar.add(tmp, arcname=".")
    return hp


# --- NeMo -> HF ---------------------------------------------------------------------------------


def open_tar(path):
    for mode in ("r:", "r:gz"):
        try:
            return tarfile.open(path, mode)
        except tarfile.ReadError:
            continue
    raise ConvertError(f"{path}: neither a tar nor a gzip-compressed tar")


def _strip(name):
    return name[2:] if name.startswith("./") else name


def sentencepiece_vocab(path, cfg_tok):
    import sentencepiece as spm

    n = spm.SentencePieceProcessor(model_file=str(path)).vocab_size()
    return n + len((cfg_tok or {}).get("additional_special_tokens") or [])


def merge_tp(role, parts, hp):
    """Inverse of tp_split (§4.1 / megatron_change_num_partitions merge)."""
    if role in ("input_norm", "post_norm", "final_norm"):
        return parts[0]
    if role in ("embedding", "output", "qkv"):
        return torch.cat(parts, dim=0)
    if role in ("proj", "fc2"):
        return torch.cat(parts, dim=1)
    if role == "fc1":
        halves = [torch.chunk(x, 2, dim=0) for x in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    raise ValueError(role)


def split_qkv(w, hp):
    """§3.4 inverse: fused [(nh+2ng)*d, H] -> q [nh*d, H], k, v [ng*d, H]."""
    hpg = hp.nh // hp.ng
    blocks = w.reshape(hp.nh + 2 * hp.ng, hp.d, hp.H)
    qi = [g * (hpg + 2) + j for g in range(hp.ng) for j in range(hpg)]
    ki = [g * (hpg + 2) + hpg for g in range(hp.ng)]
    vi = [g * (hpg + 2) + hpg + 1 for g in range(hp.ng)]
    pick = lambda idx, n: blocks.index_select(0, torch.tensor(idx)).reshape(n * hp.d, hp.H)
    return pick(qi, hp.nh), pick(ki, hp.ng), pick(vi, hp.ng)


def hf_config(hp, dtype):
    cfg = OrderedDict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_size=hp.H,
        intermediate_size=hp.F,
        num_hidden_layers=hp.L,
        num_attention_heads=hp.nh,
        num_key_value_heads=hp.ng,
        head_dim=hp.d,
        vocab_size=hp.V,
        max_position_embeddings=hp.max_pos,
        rms_norm_eps=hp.eps,
        rope_theta=hp.theta,
        rope_scaling={"rope_type": "linear", "factor": hp.rope_factor} if hp.rope_factor else None,
        hidden_act="silu",
        initializer_range=hp.init_std,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        torch_dtype={torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype],
        bos_token_id=1,
        eos_token_id=2,
    )
    return cfg


def save_hf(tensors, out_dir, max_shard_bytes=MAX_SHARD_BYTES):
    """save_pretrained-style sharding (fill a shard until the next tensor would overflow it), one
    save_file per shard. Consumes `tensors`: each shard's tensors are dropped once written."""
    from safetensors.torch import save_file

    plan, size = [[]], 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if plan[-1] and size + n > max_shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(k)
        size += n
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    names = ["model.safetensors"] if len(plan) == 1 else [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    weight_map = {}
    for name, keys in zip(names, plan):
        shard = OrderedDict((k, tensors.pop(k)) for k in keys)
        save_file(shard, str(Path(out_dir) / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
        del shard
    if len(plan) > 1:
        with open(Path(out_dir) / "model.safetensors.index.json", "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def read_nemo_ranks(nemo_path, extract_dir):
    """NeMo's restore_from: extract the archive, read the yaml, torch.load every rank file.
    Returns (yaml dict, {(t, p): state dict}, tokenizer path inside extract_dir)."""
    with open_tar(nemo_path) as tar:
        tar.extractall(extract_dir, filter="data")
    root = Path(extract_dir)
    with open(root / "model_config.yaml") as f:
        y = yaml.safe_load(f)
    if "model" in y and isinstance(y["model"], dict):
        y = y["model"]
    if (root / "model_weights").is_dir():
        raise ConvertError(f"{nemo_path}: distributed checkpoint (model_weights/) not supported by this reference")
    tp, pp = y.get("tensor_model_parallel_size", 1), y.get("pipeline_model_parallel_size", 1)
    ranks = {}
    for p in range(pp):
        for t in range(tp):
            path = root / _strip(member_name(t, p, tp, pp))
            if not path.exists():
                raise ConvertError(f"{nemo_path}: missing {member_name(t, p, tp, pp)}")
            sd = torch.load(path, map_location="cpu", weights_only=True)
            ranks[(t, p)] = {
                ("model." + k[len("model.module.") :] if k.startswith("model.module.") else k): v
                for k, v in sd.items()
                if not k.endswith("_extra_state") and not k.endswith("rotary_pos_emb.inv_freq")
            }
            del sd
    tok_ref = str((y.get("tokenizer") or {}).get("model") or "")
    tok = None
    if tok_ref.startswith("nemo:"):
        tok = root / tok_ref[len("nemo:") :]
    elif tok_ref:
        tok = root / Path(tok_ref).name
    return y, ranks, (tok if tok is not None and tok.exists() else None)


def rank_gatherer(nemo_path, y, ranks, hp):
    """gather(role, layer) -> the global NeMo tensor of `role` (layer None: a non-layer role),
    merged over the tensor-parallel ranks of its pipeline stage (§4.1, §4.4) and popped from
    `ranks`, so what is left afterwards was never mapped."""
    layout = "mcore" if y.get("mcore_gpt", False) else "legacy"
    tp, pp = y.get("tensor_model_parallel_size", 1), y.get("pipeline_model_parallel_size", 1)
    check_parallelism(hp, layout, tp, pp)
    per = hp.L // pp

    def gather(role, l):
        p = 0 if role == "embedding" else pp - 1 if l is None else l // per
        local = None if l is None else l - p * per
        name = nemo_name(role, layout, local)
        parts = []
        for t in range(tp):
            if name not in ranks[(t, p)]:
                raise ConvertError(f"{nemo_path}: {member_name(t, p, tp, pp)} has no {name!r}")
            parts.append(ranks[(t, p)].pop(name))
        return merge_tp(role, parts, hp)

    return gather


def nemo2hf(nemo_path, out_dir, vocab=None, max_shard_bytes=MAX_SHARD_BYTES):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".nemo-extract-") as tmp:
        y, ranks, tok = read_nemo_ranks(nemo_path, tmp)
        if tok is not None:
            shutil.copyfile(tok, out_dir / "tokenizer.model")
        if vocab is None:
            if tok is None:
                raise ConvertError(f"{nemo_path}: tokenizer.model artifact not found; pass --vocab-size")
            vocab = sentencepiece_vocab(tok, y.get("tokenizer"))
    # the extracted copy is gone (NeMo's restore_from cleans up its temporary directory too)
    hp = HParams.from_yaml(y, vocab)
    gather = rank_gatherer(nemo_path, y, ranks, hp)

    # views (vocabulary trim, gate/up halves) get their own storage: save_file refuses tensors that
    # share memory, and the merged parent can then be freed
    out = OrderedDict()
    emb = gather("embedding", None)
    if emb.shape[0] < hp.V:
        raise ConvertError(f"embedding has {emb.shape[0]} rows, vocabulary is {hp.V}")
    dtype = emb.dtype
    out["model.embed_tokens.weight"] = own(emb[: hp.V])
    del emb
    for l in range(hp.L):
        n = {k: v.format(i=l) for k, v in HF_LAYER.items()}
        out[n["q"]], out[n["k"]], out[n["v"]] = split_qkv(gather("qkv", l), hp)
        out[n["proj"]] = gather("proj", l)
        out[n["gate"]], out[n["up"]] = (own(h) for h in torch.chunk(gather("fc1", l), 2, dim=0))
        out[n["fc2"]] = gather("fc2", l)
        out[n["input_norm"]] = gather("input_norm", l)
        out[n["post_norm"]] = gather("post_norm", l)
    out["model.norm.weight"] = gather("final_norm", None)
    out["lm_head.weight"] = own(gather("output", None)[: hp.V])
    left = sorted(k for sd in ranks.values() for k in sd)
    if left:
        raise ConvertError(f"{nemo_path}: unmapped NeMo tensors: {left[:10]}")
    ranks.clear()
    with open(out_dir / "config.json", "w") as f:
        json.dump(hf_config(hp, dtype), f, indent=2)
    save_hf(out, out_dir, max_shard_bytes)
    return hp
