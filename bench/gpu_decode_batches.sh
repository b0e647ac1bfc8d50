#!/usr/bin/env bash
# Which decode batches the GEMV kernels should take (ops::cuda_gemv_rows, SHARDSMITH_CUDA_GEMV),
# in one short device call: the GEMV and decode parity tests with the default, then 7B synthetic
# decode (bf16, prompt 128 + 128) at batches 2, 3 and 4 with the GEMV kernels up to each of those
# batches and with cuBLAS for every product (0). Same carry as bench/gpu.sh (bench/gpu_carry.sh).
#   on the GPU machine, from the repository root:  bash bench/gpu_decode_batches.sh
set -uo pipefail
START=$SECONDS
BUDGET=${GPU_SH_BUDGET:-150}
CARRY=${1:-target/cuda-carry}
RESERVE=5
source "$(dirname "$0")/gpu_lib.sh"
status=0
for t in decode_gemv_forward batched_decode_matches_the_cpu graph_decode_matches_the_eager_steps; do
    parity "$t"
done
echo "| GEMV rows | batch | ms per step | tokens/s | steps replayed |"
echo "|---|---|---|---|---|"
for rows in 0 2 3 4; do
    SHARDSMITH_CUDA_GEMV=$rows timeout "$(limit 40)" "$SS" bench decode --runs 3 --batch 2,3,4 2>/dev/null |
        grep '^{' | python3 -c '
import json, sys
for l in sys.stdin:
    r = json.loads(l)
    print("| {} | {} | {:.3f} | {:.1f} | {} |".format(r["cuda_gemv_rows"], r["batch"], r["ms_per_step"], r["tokens_per_s"], r["graph_replays"]))
' || status=1
done
exit $status
