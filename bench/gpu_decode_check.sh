#!/usr/bin/env bash
# A decode change checked in one short device call (issue 7): the decode parity tests (both
# RMSNorm placements of the graph step), the decode-attention kernel against the composed path
# (bench_gemv's attention rows), then batch-1 7B synthetic decode (bf16, prompt 128 + 128) in
# alternating runs of the default and of each A/B variable given, and the 7B layer bench twice
# (its run-to-run spread, next to the 60% MFU line). Same carry as bench/gpu.sh
# (bash bench/gpu_carry.sh here); on the GPU machine, from the repository root:
#   bash bench/gpu_decode_check.sh [VAR=VALUE ...]     (default: SHARDSMITH_DECODE_NORM_FOLD=0)
# JSON lines of every run in $OUT/decode_check.jsonl when $OUT is set.
set -uo pipefail
START=$SECONDS
BUDGET=${GPU_SH_BUDGET:-200}
CARRY=target/cuda-carry
RESERVE=5
source "$(dirname "$0")/gpu_lib.sh"
RES=${OUT:-$W}/decode_check.jsonl
: >"$RES"
status=0
VARIANTS=("$@")
((${#VARIANTS[@]})) || VARIANTS=(SHARDSMITH_DECODE_NORM_FOLD=0)

for t in decode_attention_forward batched_decode_matches_the_cpu graph_decode_matches_the_eager_steps \
    decode_profile_times_every_kind_of_launch; do
    parity "$t"
done
for v in "${VARIANTS[@]}"; do
    parity graph_decode_matches_the_eager_steps "$v"
    parity batched_decode_matches_the_cpu "$v"
done
echo "### decode attention against the composed path"
timeout "$(limit 40)" "$W/cuda_parity" bench_gemv --exact --ignored --nocapture 2>&1 |
    grep -E "decode attention|panicked" || status=1

# run LABEL [VAR=VALUE] ARGS...: one benchmark, its JSON lines tagged with the label.
run() {
    local label=$1
    shift
    timeout "$(limit 40)" env "$@" | grep '^{' | python3 -c '
import json, sys
for l in sys.stdin:
    r = json.loads(l); r["variant"] = sys.argv[1]; print(json.dumps(r))
' "$label" >>"$RES" || { status=1; echo "## $label: failed"; }
}
for round in 1 2; do
    BD=()
    ((round == 1)) && BD=(--breakdown)
    run default "$SS" bench decode --runs 3 --batch 1 ${BD[@]+"${BD[@]}"}
    for v in "${VARIANTS[@]}"; do
        run "$v" "$v" "$SS" bench decode --runs 3 --batch 1 ${BD[@]+"${BD[@]}"}
    done
done
for round in 1 2; do
    run default "$SS" bench gpu-layer --runs 5
done

python3 - "$RES" "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" <<'EOF' || status=1
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| variant | batch-1 decode tokens/s (each run) | ms per step |")
print("|---|---|---|")
for v in dict.fromkeys(r["variant"] for r in rows if r["bench"] == "decode"):
    d = [r for r in rows if r["bench"] == "decode" and r["variant"] == v]
    tps = ", ".join("%.1f" % r["tokens_per_s"] for r in d)
    ms = ", ".join("%.3f" % r["ms_per_step"] for r in d)
    print(f"| {v} | {tps} | {ms} |")
for r in rows:
    if r["bench"] == "decode_breakdown" and "kernels" in r:
        print(f"\n| decode step by launch ({r['variant']}, batch 1, position {r['position']}) | calls | ms per step |")
        print("|---|---|---|")
        for k in r["kernels"]:
            print(f"| {k['kernel']} | {k['calls']} | {k['ms']:.3f} |")
        print(f"| sum / whole step | — | {r['sum_ms']:.3f} / {r['step_ms']:.3f} |")
layers = [r for r in rows if r["bench"] == "gpu_layer"]
peak = 756 if "PCIe" in sys.argv[2] else 989
print(f"\n7B layers ×4 fwd+bwd, B2×S4096, each run (MFU of {peak} TFLOP/s):",
      ", ".join(f"{r['tflops'] / peak * 100:.1f}% ({r['tflops']:.1f} TFLOP/s)" for r in layers))
EOF
exit $status
