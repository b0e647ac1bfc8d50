#!/usr/bin/env python3
"""PyTorch baseline converter, HF LLaMA-2 <-> .nemo, the way NeMo's scripts do it
(convert_hf_llama_to_nemo.py + megatron_change_num_partitions.py, and back through
convert_nemo_llama_to_hf.py): whole state dicts in RAM, torch ops, torch.save per rank, tarfile.

    pytorch_convert.py hf2nemo HF_DIR OUT.nemo --tp N --pp M [--layout mcore|legacy]
                       [--dtype bf16|f16|f32] [--tokenizer PATH]
    pytorch_convert.py nemo2hf IN.nemo OUT_DIR [--vocab-size V] [--max-shard-size BYTES]

hf2nemo  HF directory (config.json, safetensors or .bin, tokenizer.model) -> .nemo with per-rank
         model_weights.ckpt files (non-distributed; mcore or legacy key names); --dtype defaults to
         the checkpoint's own dtype.
nemo2hf  .nemo (any tp/pp, non-distributed) -> merged, unfused, vocabulary trimmed to the
         tokenizer's size (SentencePiece pieces + additional_special_tokens, or --vocab-size),
         sharded safetensors (<= 5 GB each) + config.json + tokenizer.model.

The logic lives in tests/interop/nemo_reference.py (one implementation, also used by
tests/interop/nemo_reference_check.py as the numerical reference for shardsmith). It is the
speed / peak-memory baseline of bench/convert.sh; see that module's docstring for where it differs
from NeMo (always in the baseline's favour).
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "interop"))

import nemo_reference as ref  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf2nemo", help="HF directory -> .nemo")
    a.add_argument("hf_dir")
    a.add_argument("out")
    a.add_argument("--tp", type=int, default=1)
    a.add_argument("--pp", type=int, default=1)
    a.add_argument("--layout", choices=["mcore", "legacy"], default="mcore")
    a.add_argument("--dtype", choices=sorted(ref.DTYPES))
    a.add_argument("--tokenizer", help="SentencePiece model (default: HF_DIR/tokenizer.model)")
    b = sub.add_parser("nemo2hf", help=".nemo -> HF directory")
    b.add_argument("nemo")
    b.add_argument("out_dir")
    b.add_argument("--vocab-size", type=int, help="rows to keep (default: the tokenizer's vocabulary)")
    b.add_argument("--max-shard-size", type=int, default=ref.MAX_SHARD_BYTES, help="bytes per safetensors file")
    args = ap.parse_args()

    start = time.perf_counter()
    try:
        if args.cmd == "hf2nemo":
            hp = ref.hf2nemo(args.hf_dir, args.out, args.tp, args.pp, args.layout, args.dtype, args.tokenizer)
            what = f"{args.out} (tp={args.tp} pp={args.pp} {args.layout}, {hp.L} layers)"
        else:
            hp = ref.nemo2hf(args.nemo, args.out_dir, args.vocab_size, args.max_shard_size)
            what = f"{args.out_dir} ({hp.L} layers, vocab {hp.V})"
    except ref.ConvertError as e:
        print(f"pytorch_convert: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {what} in {time.perf_counter() - start:.2f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
