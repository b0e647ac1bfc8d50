#!/usr/bin/env bash
# Benchmark: one CPU training step (forward + backward, clip_grad_norm 1.0, AdamW) of shardsmith's
# candle trainer against PyTorch/transformers on the same model, threads and dtype, in ONE run
# (targets.md, "Compute core": train step <= 1.0x PyTorch time).
#
#   bash bench/train.sh      # llava-tiny stage 2 B4xT64; llava-100m stage 2 and stage 1 B2xT128
#
# Environment (optional): THREADS (default 2), RUNS (default 5), DTYPES (default "f32 bf16"),
# ROUNDS (default 1: how many times each configuration alternates ours and PyTorch; this
# machine's speed drifts by 10-30 % between minutes, so 3 rounds give a steadier ratio),
# CHECKPOINTING (1: activation checkpointing on both sides), MODEL_DIR (default
# bench/out/llava-100m, created by bench/make_llava_100m.py when missing), SHARDSMITH_BIN (default
# target/release/shardsmith, built if missing).
#
# Each configuration runs ours and PyTorch alternately (one warm-up step, then RUNS timed steps
# inside each process; medians reported), so machine noise hits both alike. bf16 means f32 master
# weights and AdamW state with bf16 compute on both sides (ours: the trainer's compute dtype;
# PyTorch: torch.autocast("cpu", bfloat16)). Prints a markdown table; ratio = ours / PyTorch
# (lower is better, <= 1 meets the target). Raw JSON lines go to bench/out/train.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-fixtures/gen/.venv/bin/python}
[ -x "$PY" ] || bash fixtures/gen/setup_venv.sh >&2
BIN=${SHARDSMITH_BIN:-target/release/shardsmith}
[ -x "$BIN" ] || cargo build --release >&2
THREADS=${THREADS:-2}
RUNS=${RUNS:-5}
DTYPES=${DTYPES:-"f32 bf16"}
MODEL_DIR=${MODEL_DIR:-bench/out/llava-100m}
ckpt=(); [ "${CHECKPOINTING:-0}" = 1 ] && ckpt=(--checkpointing)
mkdir -p bench/out
[ -f "$MODEL_DIR/config.json" ] || "$PY" bench/make_llava_100m.py --out "$MODEL_DIR" >&2
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS
out=bench/out/train.jsonl
: > "$out"

run_pair() { # model stage batch seq dtype
    local model=$1 stage=$2 batch=$3 seq=$4 dtype=$5
    "$BIN" bench train-step "$model" --stage "$stage" --batch "$batch" --seq "$seq" --runs "$RUNS" \
        --dtype "$dtype" "${ckpt[@]}" >> "$out"
    "$PY" bench/pytorch_train_step.py --model "$model" --stage "$stage" --batch "$batch" --seq "$seq" \
        --runs "$RUNS" --threads "$THREADS" --dtype "$dtype" "${ckpt[@]}" >> "$out"
}

ROUNDS=${ROUNDS:-1}
for dtype in $DTYPES; do
    for config in "fixtures/llava-tiny 2 4 64" "$MODEL_DIR 2 2 128" "$MODEL_DIR 1 2 128"; do
        for ((round = 0; round < ROUNDS; round++)); do
            # shellcheck disable=SC2086 # the config is four words
            run_pair $config "$dtype"
        done
    done
done

"$PY" - "$out" "$THREADS" "$ROUNDS" <<'PYEOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rounds = int(sys.argv[3])
print(f"\nthreads={sys.argv[2]}; times are medians (within a process, then over {rounds} alternating "
      f"round(s)); ratio = shardsmith / PyTorch, the median of the rounds' ratios\n")
print("| model | stage | trainable | dtype | batch × seq | ours ms/step | torch ms/step | ratio | rounds' ratios |")
print("|---|---|---|---|---|---|---|---|---|")
pairs = list(zip(rows[0::2], rows[1::2]))
for i in range(0, len(pairs), rounds):
    group = pairs[i : i + rounds]
    ours, torch = group[0]
    for o, t in group:
        assert o["params_trainable"] == t["params_trainable"] == ours["params_trainable"], (o, t)
    name = ours["model"].rstrip("/").split("/")[-1]
    ck = " (ckpt)" if ours.get("checkpointing") else ""
    med = lambda xs: statistics.median(xs)
    o_ms, t_ms = med([o["step_ms"] for o, _ in group]), med([t["step_ms"] for _, t in group])
    ratios = [o["step_ms"] / t["step_ms"] for o, t in group]
    print(f"| {name} | {ours['stage']}{ck} | {ours['params_trainable']/1e6:.2f}M | {ours['dtype']} | "
          f"{ours['batch']} × {ours['seq']} | {o_ms:.1f} | {t_ms:.1f} | {med(ratios):.2f} | "
          f"{', '.join(f'{r:.2f}' for r in ratios)} |")
PYEOF
