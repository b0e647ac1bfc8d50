#!/usr/bin/env bash
# Benchmark: CPU forward of shardsmith's candle core against PyTorch/transformers on the same
# model, threads and dtype, in ONE run (targets.md, "Compute core": <= 1.0x PyTorch time).
#
#   bash bench/forward.sh                 # ~134M LLaMA (bench/make_llama_100m.py) + llava-tiny
#
# Environment (optional): THREADS (default: all cores), RUNS (default 5), PROMPT (default 128),
# DECODE (default 32), DTYPES (default "f32 bf16"), MODEL_DIR (default bench/out/llama-100m,
# created when missing), SHARDSMITH_BIN (default target/release/shardsmith, built if missing).
#
# Each configuration runs ours and PyTorch alternately (ours, torch, ours, torch, ...: RUNS
# timed repetitions inside each process after one warm-up, medians reported), so machine noise
# hits both alike. Prints a markdown table; ratio = ours / PyTorch (lower is better, <= 1 meets
# the target). Raw JSON lines go to bench/out/forward.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-fixtures/gen/.venv/bin/python}
[ -x "$PY" ] || bash fixtures/gen/setup_venv.sh >&2
BIN=${SHARDSMITH_BIN:-target/release/shardsmith}
[ -x "$BIN" ] || cargo build --release >&2
THREADS=${THREADS:-$(nproc)}
RUNS=${RUNS:-5}
PROMPT=${PROMPT:-128}
DECODE=${DECODE:-32}
DTYPES=${DTYPES:-"f32 bf16"}
MODEL_DIR=${MODEL_DIR:-bench/out/llama-100m}
mkdir -p bench/out
[ -f "$MODEL_DIR/config.json" ] || "$PY" bench/make_llama_100m.py --out "$MODEL_DIR" >&2
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS
out=bench/out/forward.jsonl
: > "$out"

run_pair() { # model prompt image-flag dtype
    local model=$1 prompt=$2 image=$3 dtype=$4
    local flag=(); [ "$image" = 1 ] && flag=(--image)
    "$BIN" bench forward "$model" --prompt-len "$prompt" --decode "$DECODE" --runs "$RUNS" --dtype "$dtype" "${flag[@]}" >> "$out"
    "$PY" bench/pytorch_forward.py --model "$model" --threads "$THREADS" --dtype "$dtype" \
        --prompt-len "$prompt" --decode "$DECODE" --runs "$RUNS" "${flag[@]}" >> "$out"
}

for dtype in $DTYPES; do
    run_pair "$MODEL_DIR" "$PROMPT" 0 "$dtype"
    run_pair fixtures/llava-tiny 48 1 "$dtype"
done

"$PY" - "$out" "$THREADS" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"\nthreads={sys.argv[2]}; times are medians; ratio = shardsmith / PyTorch\n")
print("| model | dtype | prompt | prefill ours ms | prefill torch ms | ratio | decode ours ms/tok | decode torch ms/tok | ratio |")
print("|---|---|---|---|---|---|---|---|---|")
for ours, torch in zip(rows[0::2], rows[1::2]):
    name = ours["model"].rstrip("/").split("/")[-1]
    print(f"| {name} ({ours['params']/1e6:.1f}M) | {ours['dtype']} | {ours['prompt_len']} | "
          f"{ours['prefill_ms']:.1f} | {torch['prefill_ms']:.1f} | {ours['prefill_ms']/torch['prefill_ms']:.2f} | "
          + (f"{ours['decode_ms_per_token']:.2f} | {torch['decode_ms_per_token']:.2f} | "
             f"{ours['decode_ms_per_token']/torch['decode_ms_per_token']:.2f} |"
             if ours["decode_ms_per_token"] is not None and torch["decode_ms_per_token"] else "– | – | – |"))
PYEOF
