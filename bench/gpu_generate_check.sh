#!/usr/bin/env bash
# `generate --device cuda` against `--device cpu` on the fixtures, in one short GPU call: greedy
# token ids must be identical in f32 (tiny models, same arithmetic up to summation order); bf16
# rows are reported (ties may flip) but do not fail. Carry target/cuda-carry (bench/gpu_carry.sh).
#   on the GPU machine, from the repository root:  bash bench/gpu_generate_check.sh
set -uo pipefail
START=$SECONDS
BUDGET=${GPU_SH_BUDGET:-180}
CARRY=${1:-target/cuda-carry}
source "$(dirname "$0")/gpu_lib.sh"
status=0
compare() { # name, args...
    local name=$1; shift
    timeout "$(limit 60)" "$SS" generate "$@" --device cpu --json >"$W/cpu.json" 2>"$W/cpu.err" || { echo "$name: cpu FAILED"; tail -3 "$W/cpu.err"; status=1; return; }
    timeout "$(limit 60)" "$SS" generate "$@" --device cuda --json >"$W/gpu.json" 2>"$W/gpu.err" || { echo "$name: cuda FAILED"; tail -3 "$W/gpu.err"; status=1; return; }
    python3 - "$name" "$W/cpu.json" "$W/gpu.json" <<'PY' || status=1
import json, sys
name, a, b = sys.argv[1], json.load(open(sys.argv[2])), json.load(open(sys.argv[3]))
same = a["new_ids"] == b["new_ids"]
strict = "bf16" not in name
print(f"{name}: {'identical' if same else 'DIFFERENT'} ({len(a['new_ids'])} tokens; cuda {b['tokens_per_s']:.0f} tok/s, cpu {a['tokens_per_s']:.0f})"
      + ("" if same else f"\n  cpu  {a['new_ids']}\n  cuda {b['new_ids']}"))
sys.exit(0 if same or not strict else 1)
PY
}
compare "llama-mha f32" fixtures/llama-mha --prompt "Hello world" --max-new-tokens 24
compare "llama-mha f32 llama_2 template" fixtures/llama-mha --prompt "Tell me a story" --template llama_2 --max-new-tokens 24
compare "llama-mha f32 TP2" fixtures/llama-mha --prompt "Hello world" --max-new-tokens 24 --tp 2
compare "llama-gqa f32" fixtures/llama-gqa --prompt "The quick brown fox" --max-new-tokens 24
compare "llama-mha bf16" fixtures/llama-mha --prompt "Hello world" --max-new-tokens 24 --dtype bf16
compare "llava-tiny f32 image" fixtures/llava-tiny --prompt "What is in the image?" --image fixtures/llava-tiny/image.png --template vicuna_v1 --max-new-tokens 16
compare "llava-tiny bf16 image" fixtures/llava-tiny --prompt "What is in the image?" --image fixtures/llava-tiny/image.png --template vicuna_v1 --max-new-tokens 16 --dtype bf16
exit $status
