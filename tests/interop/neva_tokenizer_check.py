#!/usr/bin/env python3
"""Check a NeVA tokenizer against NeMo's recipe for making one.

    neva_tokenizer_check.py NEVA_MODEL BASE_MODEL

NEVA_MODEL  the SentencePiece model a NeVA conversion wrote (e.g. extracted from the .nemo).
BASE_MODEL  the LLaMA SentencePiece model it was made from.

The reference is what NeMo's scripts/tokenizers/add_special_tokens_to_sentencepiece.py
--is_userdefined does (formats.md §6.4): parse BASE_MODEL with the protobuf bindings sentencepiece
ships, append <extra_id_0..7> as SentencePiece(piece, score=0.0, type=USER_DEFINED), serialise.
NEVA_MODEL must equal it byte for byte, load in sentencepiece, give the new pieces ids
base_size + k, and encode each of them as that single id.

Prints one summary line ("OK ..." or "FAIL ...") and exits 0 / 1.
"""

import sys

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

TOKENS = [f"<extra_id_{i}>" for i in range(8)]


def main():
    if len(sys.argv) != 3:
        print(__doc__)
        return 2
    ours = open(sys.argv[1], "rb").read()
    base = open(sys.argv[2], "rb").read()
    proto = model_pb2.ModelProto()
    proto.ParseFromString(base)
    n = len(proto.pieces)
    for t in TOKENS:
        proto.pieces.append(model_pb2.ModelProto.SentencePiece(piece=t, score=0.0, type=4))
    reference = proto.SerializeToString()
    problems = []
    if ours != reference:
        problems.append(f"bytes differ from the protobuf reference ({len(ours)} vs {len(reference)} bytes)")
    sp = spm.SentencePieceProcessor(model_proto=ours)
    if sp.get_piece_size() != n + 8:
        problems.append(f"{sp.get_piece_size()} pieces, expected {n + 8}")
    for k, t in enumerate(TOKENS):
        if sp.piece_to_id(t) != n + k:
            problems.append(f"{t} has id {sp.piece_to_id(t)}, expected {n + k}")
        ids = sp.encode(f"a{t}b")
        if (n + k) not in ids:
            problems.append(f"'a{t}b' encodes to {ids}, without the single id {n + k}")
    if problems:
        print(f"FAIL {sys.argv[1]}: " + "; ".join(problems))
        return 1
    print(f"OK {sys.argv[1]}: {n} base pieces + 8 user-defined, identical to the protobuf reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
