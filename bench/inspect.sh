#!/usr/bin/env bash
# Benchmark: `shardsmith inspect` on a LLaMA-2-7B-shaped synthetic checkpoint (13.5 GB bf16,
# sharded safetensors) against a Python baseline measured in the same run: the safetensors
# library opening every shard and reading every tensor's dtype and shape (the cheapest way
# Python tools list a checkpoint). Prints the median of 5 runs each.
#
#   bash bench/inspect.sh [DIR]      (DIR defaults to bench/out/llama2-7b; created if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-bench/out/llama2-7b}
cargo build --release --quiet
bin=target/release/shardsmith
[ -d "$dir" ] || "$bin" synth --preset llama2-7b -o "$dir"
bash fixtures/gen/setup_venv.sh >/dev/null
py=fixtures/gen/.venv/bin/python

median_ms() { # command... → median wall time of 5 runs in ms
  local t=()
  for _ in 1 2 3 4 5; do
    local s=$(date +%s%N); "$@" >/dev/null; local e=$(date +%s%N)
    t+=($(( (e - s) / 1000000 )))
  done
  printf '%s\n' "${t[@]}" | sort -n | sed -n 3p
}

ours=$(median_ms "$bin" inspect "$dir")
ours_json=$(median_ms "$bin" inspect --json "$dir")
python=$(median_ms "$py" -c "
import glob, sys
from safetensors import safe_open
n = 0
for f in sorted(glob.glob('$dir/*.safetensors')):
    with safe_open(f, 'numpy') as s:
        for k in s.keys():
            sl = s.get_slice(k); sl.get_dtype(); sl.get_shape(); n += 1
")
python_startup=$(median_ms "$py" -c "import safetensors")
printf '\n| what | median ms (5 runs) |\n|---|---|\n'
printf '| shardsmith inspect | %s |\n| shardsmith inspect --json | %s |\n' "$ours" "$ours_json"
printf '| python safetensors safe_open listing | %s |\n| (python interpreter + import alone) | %s |\n' "$python" "$python_startup"
