#!/usr/bin/env bash
# The decode path in one short device call (about a minute): the decode kernels' parity tests and
# the CUDA-graph step against eager steps and the CPU, each with and without programmatic
# dependent launch (SHARDSMITH_CUDA_PDL=1); `generate --device cuda` against the CPU with PDL;
# then 7B synthetic decode (bf16, prompt 128 + 128, batch 1 and 8) without and with PDL. Same
# carry as bench/gpu.sh (bench/gpu_carry.sh).
#   on the GPU machine, from the repository root:  bash bench/gpu_decode_check.sh
set -uo pipefail
START=$SECONDS
BUDGET=${GPU_SH_BUDGET:-200}
CARRY=${1:-target/cuda-carry}
RESERVE=5
source "$(dirname "$0")/gpu_lib.sh"
status=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
date -u +%Y-%m-%dT%H:%M:%SZ
for pdl in 0 1; do
    for t in decode_gemv_forward decode_attention_forward batched_decode_matches_the_cpu graph_decode_matches_the_eager_steps; do
        SHARDSMITH_CUDA_PDL=$pdl timeout "$(limit 60)" "$W/cuda_parity" "$t" --exact --nocapture --test-threads=1 >"$W/parity.log" 2>&1
        rc=$?
        grep -oE "parity graph.*|panicked.*|test result.*" "$W/parity.log" | sed "s/^/PDL=$pdl $t: /"
        ((rc == 0)) || { status=1; tail -5 "$W/parity.log"; }
    done
done
SHARDSMITH_CUDA_PDL=1 timeout "$(limit 120)" bash "$(dirname "$0")/gpu_generate_check.sh" || status=1
echo "| PDL | batch | ms per step | tokens/s | steps replayed |"
echo "|---|---|---|---|---|"
for pdl in 0 1 0 1; do
    SHARDSMITH_CUDA_PDL=$pdl timeout "$(limit 40)" "$SS" bench decode --runs 3 --batch 1,8 2>"$W/decode.err" | grep '^{' |
        python3 -c '
import json, sys
for l in sys.stdin:
    r = json.loads(l)
    print("| {} | {} | {:.3f} | {:.1f} | {} |".format(r["cuda_pdl"], r["batch"], r["ms_per_step"], r["tokens_per_s"], r["graph_replays"]))
' || { status=1; tail -3 "$W/decode.err"; }
done
exit $status
