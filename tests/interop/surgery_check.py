#!/usr/bin/env python3
"""Check `shardsmith surgery` outputs with the reference stack (transformers, sentencepiece).

    surgery_check.py extract LLAVA_DIR LLM_DIR VISION_DIR PROJECTOR_SAFETENSORS
    surgery_check.py tokens HF_DIR FIRST_ID TOKEN [TOKEN ...]
    surgery_check.py sentencepiece ORIGINAL_MODEL EDITED_MODEL TOKEN [TOKEN ...]
    surgery_check.py swap BUNDLE_DIR LLM_DIR SWAPPED_DIR

extract: LlamaForCausalLM loads LLM_DIR and CLIPVisionModel loads VISION_DIR with no missing,
unexpected or mismatched weights; every weight equals the llava-hf model's (language model + head,
vision tower, projector under LLaVA's model.mm_projector.{0,2} keys); the extracted LLM's logits
and the tower's hidden states equal the llava-hf submodules' on the same inputs; AutoTokenizer
and CLIPImageProcessor load the copied files.

tokens: AutoTokenizer (fast and slow) loads HF_DIR and encodes each TOKEN as the single id
FIRST_ID + i; AutoModelForCausalLM loads it cleanly with vocab_size rows.

sentencepiece: EDITED_MODEL parses as the protobuf Python's sentencepiece_model_pb2 builds by
appending each TOKEN as a USER_DEFINED piece (score 0) to ORIGINAL_MODEL — NeMo's
add_special_tokens_to_sentencepiece.py — and SentencePieceProcessor encodes each TOKEN as one id.

swap: LlavaForConditionalGeneration loads SWAPPED_DIR cleanly; its vision tower and projector
equal BUNDLE_DIR's, its language model and head equal LLM_DIR's (LlamaForCausalLM), and its
text-only logits equal the LLM's.

Prints one summary line ("OK ..." or "FAIL ...") and exits 0 / 1.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

transformers.logging.set_verbosity_error()
torch.set_num_threads(1)


def fail(msg):
    print(f"FAIL {msg}")
    sys.exit(1)


def load_clean(cls, path):
    model, info = cls.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    if bad:
        fail(f"{cls.__name__} from {path}: {bad}")
    return model.eval()


@torch.no_grad()
def extract(llava_dir, llm_dir, vision_dir, projector):
    from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, LlamaForCausalLM,
                              LlavaForConditionalGeneration)

    llava = LlavaForConditionalGeneration.from_pretrained(llava_dir, dtype=torch.float32).eval()
    llm = load_clean(LlamaForCausalLM, llm_dir)
    tower = load_clean(CLIPVisionModel, vision_dir)
    lm = llava.model.language_model if hasattr(llava.model, "language_model") else llava.language_model.model
    ref_llm = {f"model.{k}": v for k, v in lm.state_dict().items()}
    ref_llm["lm_head.weight"] = llava.lm_head.weight
    got = llm.state_dict()
    if sorted(got) != sorted(ref_llm):
        fail(f"llm keys differ: {sorted(set(got) ^ set(ref_llm))}")
    for k, v in ref_llm.items():
        if not torch.equal(got[k], v):
            fail(f"llm {k} differs")
    vt = llava.model.vision_tower if hasattr(llava.model, "vision_tower") else llava.vision_tower
    for k, v in vt.state_dict().items():
        if not torch.equal(tower.state_dict()[k], v):
            fail(f"vision {k} differs")
    proj = load_file(projector)
    mmp = llava.model.multi_modal_projector if hasattr(llava.model, "multi_modal_projector") else llava.multi_modal_projector
    want = {f"model.mm_projector.{i}.{p}": getattr(getattr(mmp, lin), p)
            for i, lin in ((0, "linear_1"), (2, "linear_2")) for p in ("weight", "bias")}
    if sorted(proj) != sorted(want) or any(not torch.equal(proj[k], v) for k, v in want.items()):
        fail(f"projector keys/values differ: {sorted(proj)}")
    ids = torch.tensor([[1, 5, 9, 33, 100, 255, 2]])
    ref_logits = llava.lm_head(lm(input_ids=ids).last_hidden_state)
    if not torch.equal(llm(input_ids=ids).logits, ref_logits):
        fail("llm logits differ from llava-hf's language model")
    px = torch.randn((1, 3, tower.config.image_size, tower.config.image_size), generator=torch.Generator().manual_seed(0))
    a = tower(pixel_values=px, output_hidden_states=True).hidden_states
    b = vt(pixel_values=px, output_hidden_states=True).hidden_states
    if any(not torch.equal(x, y) for x, y in zip(a, b)):
        fail("vision hidden states differ")
    tok = AutoTokenizer.from_pretrained(llm_dir)
    CLIPImageProcessor.from_pretrained(vision_dir)
    print(f"OK extract: {len(got)} llm, {len(tower.state_dict())} vision, {len(proj)} projector tensors; "
          f"logits and hidden states identical; tokenizer {type(tok).__name__} with {len(tok)} tokens")


@torch.no_grad()
def tokens(hf_dir, first, toks):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for use_fast in (True, False):
        tok = AutoTokenizer.from_pretrained(hf_dir, use_fast=use_fast)
        for i, t in enumerate(toks):
            ids = tok(t, add_special_tokens=False)["input_ids"]
            if ids != [first + i]:
                fail(f"{type(tok).__name__}: '{t}' encodes as {ids}, expected [{first + i}]")
        text = f"hello {toks[0]} world"
        ids = tok(text)["input_ids"]
        if first not in ids:
            fail(f"{type(tok).__name__}: '{text}' -> {ids} lacks {first}")
    model = load_clean(AutoModelForCausalLM, hf_dir)
    rows = model.get_input_embeddings().weight.shape[0]
    if rows != model.config.vocab_size or rows < first + len(toks):
        fail(f"embedding has {rows} rows, config says {model.config.vocab_size}")
    print(f"OK tokens: {len(toks)} tokens at ids {first}.., fast and slow tokenizers agree; model loads with {rows} rows")


def sentencepiece(original, edited, toks):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    want = pb.ModelProto()
    want.ParseFromString(Path(original).read_bytes())
    for t in toks:
        p = want.SentencePiece()
        p.piece, p.score, p.type = t, 0.0, pb.ModelProto.SentencePiece.USER_DEFINED
        want.pieces.append(p)
    got = pb.ModelProto()
    got.ParseFromString(Path(edited).read_bytes())
    if got != want:
        fail("edited model differs from the protobuf reference edit")
    sp = spm.SentencePieceProcessor(model_file=edited)
    base = len(want.pieces) - len(toks)
    for i, t in enumerate(toks):
        if sp.piece_to_id(t) != base + i or sp.encode(t) != [base + i] and sp.encode(t)[-1:] != [base + i]:
            fail(f"'{t}': piece_to_id {sp.piece_to_id(t)}, encode {sp.encode(t)}, expected {base + i}")
    print(f"OK sentencepiece: {len(toks)} USER_DEFINED pieces at ids {base}.., same ModelProto as protobuf's edit")


@torch.no_grad()
def swap(bundle_dir, llm_dir, swapped_dir):
    from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

    bundle = LlavaForConditionalGeneration.from_pretrained(bundle_dir, dtype=torch.float32).eval()
    out = load_clean(LlavaForConditionalGeneration, swapped_dir)
    llm = load_clean(LlamaForCausalLM, llm_dir)
    for part in ("vision_tower", "multi_modal_projector"):
        a, b = getattr(bundle.model, part).state_dict(), getattr(out.model, part).state_dict()
        if any(not torch.equal(a[k], b[k]) for k in a) or sorted(a) != sorted(b):
            fail(f"{part} differs from the bundle's")
    lm = out.model.language_model.state_dict()
    for k, v in llm.model.state_dict().items():
        if not torch.equal(lm[k], v):
            fail(f"language model {k} differs from the new LLM's")
    if not torch.equal(out.lm_head.weight, llm.lm_head.weight):
        fail("lm_head differs from the new LLM's")
    ids = torch.tensor([[1, 5, 9, 33, 100, 2]])
    if not torch.equal(out(input_ids=ids).logits, llm(input_ids=ids).logits):
        fail("text-only logits differ from the new LLM's")
    print(f"OK swap: vision and projector kept, {out.config.text_config.num_hidden_layers}-layer LLM in place, logits identical")


def main():
    if len(sys.argv) < 2:
        fail(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "extract" and len(args) == 4:
        extract(*args)
    elif cmd == "tokens" and len(args) >= 3:
        tokens(args[0], int(args[1]), args[2:])
    elif cmd == "swap" and len(args) == 3:
        swap(*args)
    elif cmd == "sentencepiece" and len(args) >= 3:
        sentencepiece(args[0], args[1], args[2:])
    else:
        fail(f"bad usage: {sys.argv[1:]}")


if __name__ == "__main__":
    main()
