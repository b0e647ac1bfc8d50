#!/usr/bin/env python3
"""Check that transformers tokenizes with our HF directory's tokenizer as with a reference one.

    hf_tokenizer_check.py OURS REFERENCE [--ignore TEXT]

OURS, REFERENCE  HF model directories (tokenizer.model and the tokenizer_config.json /
                 special_tokens_map.json / added_tokens.json / tokenizer.json beside it).

Both are loaded with AutoTokenizer offline, fast and slow; for each text below (special tokens in
the middle of text, where LlamaTokenizer's `legacy` flag matters, spaces, newlines, non-Latin
script) the ids must be equal, and so must decoding them with and without special tokens.

--ignore TEXT  leave out the texts containing TEXT (e.g. <image>, which one side has as a
               token and the other does not).

Prints one summary line ("OK ..." or "FAIL ...") and exits 0 / 1.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

transformers.logging.set_verbosity_error()

TEXTS = [
    "Hello world",
    "A</s>B",
    "x <s>\nWhat is this?",
    "</s> hi",
    "<image>\nWhat is in the picture?",
    "USER: <image> describe </s>ASSISTANT:",
    "  two  spaces",
    "line\nbreak\n\n",
    "日本語 ok",
]


def main():
    args = sys.argv[1:]
    ignore = None
    if len(args) == 4 and args[2] == "--ignore":
        ignore, args = args[3], args[:2]
    if len(args) != 2:
        print(__doc__)
        return 2
    ours, ref = args
    texts = [t for t in TEXTS if ignore is None or ignore not in t]
    problems, compared = [], 0
    for fast in (True, False):
        kind = "fast" if fast else "slow"
        try:
            a = AutoTokenizer.from_pretrained(ours, use_fast=fast, local_files_only=True)
            b = AutoTokenizer.from_pretrained(ref, use_fast=fast, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any refusal is a failed check
            print(f"FAIL {ours}: {kind} AutoTokenizer failed: {type(e).__name__}: {str(e).strip()[:300]}")
            return 1
        for text in texts:
            ia, ib = a(text).input_ids, b(text).input_ids
            compared += 1
            if ia != ib:
                problems.append(f"{kind} {text!r}: ours {ia} reference {ib}")
                continue
            for skip in (False, True):
                da, db = a.decode(ia, skip_special_tokens=skip), b.decode(ib, skip_special_tokens=skip)
                if da != db:
                    problems.append(f"{kind} decode(skip_special_tokens={skip}) {text!r}: ours {da!r} reference {db!r}")
    if problems:
        print(f"FAIL {ours}: {len(problems)} of {compared} differ: " + "; ".join(problems[:4]))
        return 1
    print(f"OK {ours}: {compared} encodings and their decodings equal the reference's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
