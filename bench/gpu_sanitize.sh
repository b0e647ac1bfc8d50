#!/usr/bin/env bash
# compute-sanitizer over the attention kernels' parity tests, in one device call, when the
# machine has it: racecheck (shared-memory hazards between threads: the bug class the
# one-barrier-a-step pipelines of issue 7, part 11 risk, which the emulator's two cp.async modes
# approximate), synccheck (barriers in divergent code), memcheck (out-of-bounds accesses, e.g.
# the cp.async staging of lse and Δ past T). Same carry as bench/gpu.sh (bash bench/gpu_carry.sh
# here); on the GPU machine, from the repository root:  bash bench/gpu_sanitize.sh
# Run it after bench/gpu.sh when device time remains: under the sanitizer each launch is ~100×
# slower, so every test gets a timeout and the whole script a budget (GPU_SH_BUDGET, default 240 s).
set -uo pipefail
START=$SECONDS
BUDGET=${GPU_SH_BUDGET:-240}
CARRY=${1:-target/cuda-carry}
source "$(dirname "$0")/gpu_lib.sh"
status=0
CS=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer 2>/dev/null | head -1)
if [[ -z $CS ]]; then
    echo "no compute-sanitizer on this machine"
    exit 0
fi
"$CS" --version | tail -1
# The wgmma kernels first (the default backward on Hopper), then the mma.sync ones.
for t in wgmma_backward_matches_the_cpu wgmma_forward_matches_the_cpu attention_backward_variants_agree \
    causal_attention_forward_and_backward; do
    for tool in racecheck synccheck memcheck; do
        timeout "$(limit 60)" "$CS" --tool "$tool" --error-exitcode 9 --print-limit 10 \
            "$W/cuda_parity" "$t" --exact --nocapture --test-threads=1 >"$W/sanitize.log" 2>&1
        rc=$?
        case $rc in
        0) verdict=clean ;;
        9) verdict="REPORTED ERRORS" ;;
        124) verdict="timed out (not checked)" ;;
        *) verdict="exit $rc" ;;
        esac
        echo "## $tool $t: $verdict"
        grep -E "SUMMARY|hazard|Race reported|Invalid|Barrier error|panicked" "$W/sanitize.log" | head -6 | sed 's/^/    /'
        [[ $rc == 0 || $rc == 124 ]] || status=1
    done
done
exit $status
