#!/usr/bin/env python3
"""Check token ids another tokenizer computed against transformers' slow LlamaTokenizer.

    slow_tokenizer_check.py DIR [DIR ...]

Each DIR is an HF directory (tokenizer.model, tokenizer_config.json, no tokenizer.json) holding
ours.json: {"texts": [...], "ids": [[...], ...]}, the ids shardsmith's tokenizer gave each text
(BOS included). AutoTokenizer(use_fast=False) must give the same ids.

Prints one summary line ("OK ..." or "FAIL ...") and exits 0 / 1.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

transformers.logging.set_verbosity_error()


def main():
    problems, compared = [], 0
    for d in sys.argv[1:]:
        ours = json.loads((Path(d) / "ours.json").read_text())
        tok = AutoTokenizer.from_pretrained(d, use_fast=False, local_files_only=True)
        for text, ids in zip(ours["texts"], ours["ids"]):
            compared += 1
            want = tok(text).input_ids
            if ids != want:
                problems.append(f"{Path(d).name} {text!r}: ours {ids} transformers {want}")
    if problems:
        print(f"FAIL {len(problems)} of {compared} differ: " + "; ".join(problems[:4]))
        return 1
    print(f"OK {compared} encodings equal transformers' slow LlamaTokenizer's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
