#!/usr/bin/env python3
"""Load a NeVA .nemo whose weights are a distributed checkpoint with Megatron-core's own loader,
asking for exactly what NeMo's MegatronNevaModel asks for, and compare every tensor with the same
model written per rank, merged over its ranks by the reference's independent TP/PP merge.

    megatron_neva_load.py PER_RANK.nemo OUR_DIST.nemo

MegatronNevaModel.sharded_state_dict (NeMo after 2024-05, neva_model.py) is GPT's filtered to
get_keys_to_keep(): parameter names only, so unlike megatron_dist_load.py no Transformer Engine
`_extra_state` object is requested (a NeVA distributed checkpoint holds none); the projector, and
the vision tower when it is saved, are replicated ShardedTensors under their state-dict keys
(NevaWordEmbeddingMixin.sharded_state_dict); the LLM, when saved, is GPT's layer-stacked arrays.
The per-rank file is the reference for the values: both .nemo files come from one conversion at
one tp (so the padded vocabulary agrees), and the per-rank one is read with torch.load and merged
by nemo_reference.py, not by shardsmith. Which Megatron-core, and the SKIP rules: as
megatron_dist_load.py. Prints "OK ..." or "FAIL ..." last.
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import nemo_reference as ref  # noqa: E402
from megatron_dist_load import compare, load, sharded_state_dict, version  # noqa: E402
from nemo_dist_check import expected_arrays, finish  # noqa: E402

MULTIMODAL = ("model.embedding.word_embeddings.adapter_layer.", "model.embedding.word_embeddings.vision_encoder.")


def reference_arrays(per_rank, problems):
    """key -> (global tensor, None, 1) from the per-rank file, and the number of layers."""
    with tempfile.TemporaryDirectory() as tmp:
        y, ranks, tok = ref.read_nemo_ranks(per_rank, tmp)
        vocab = ref.sentencepiece_vocab(tok, y.get("tokenizer")) if tok is not None else 0
    if not y.get("mcore_gpt", False):
        problems.append(f"{per_rank}: mcore_gpt is not true; NeVA writes a distributed checkpoint for mcore only")
    hp = ref.HParams.from_yaml(y, vocab)
    # Replicated: tp rank 0 of the first stage holds it, every other rank of that stage a copy.
    mm = {k: v for k, v in ranks[(0, 0)].items() if k.startswith(MULTIMODAL)}
    for (t, p), sd in ranks.items():
        held = [k for k in sd if k.startswith(MULTIMODAL)]
        if p == 0 and sorted(held) != sorted(mm):
            problems.append(f"{per_rank}: rank tp={t} pp=0 holds other projector/vision keys than tp=0")
        for k in held:
            v = sd.pop(k)
            if p != 0 or not torch.equal(v, mm.get(k, torch.empty(0))):
                problems.append(f"{per_rank}: '{k}' on rank tp={t} pp={p} is not the replicated copy")
    arrays = {}
    if any(ranks.values()):  # the LLM is saved (mm_cfg.llm.freeze: false)
        gather = ref.rank_gatherer(per_rank, y, ranks, hp)
        full = {(role, l): gather(role, l) for role in ref.LAYER_ROLES for l in range(hp.L)}
        full.update({(role, None): gather(role, None) for role in ("embedding", "final_norm", "output")})
        arrays = expected_arrays(full, hp)
        left = sorted(k for sd in ranks.values() for k in sd)
        if left:
            problems.append(f"{per_rank}: tensors the reference did not map: {left[:10]}")
    arrays.update({k: (v, None, 1) for k, v in mm.items()})
    return arrays, hp.L


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("per_rank")
    ap.add_argument("dist")
    a = ap.parse_args()
    problems = []
    arrays, L = reference_arrays(a.per_rank, problems)
    loaded, backend = load(a.dist, lambda st, so: sharded_state_dict(arrays, L, st, so, extra_state=False), problems)
    compare(arrays, loaded, L, problems)
    mm = sum(k.startswith(MULTIMODAL) for k in arrays)
    finish(problems, f"OK megatron-core {version()} dist_checkpointing.load of NeVA {backend}: {len(arrays) - mm} LLM arrays over {L} layers and {mm} replicated projector/vision arrays bit-identical to the per-rank file")


if __name__ == "__main__":
    main()
