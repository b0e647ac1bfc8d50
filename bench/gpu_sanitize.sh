#!/usr/bin/env bash
# compute-sanitizer over the attention kernels' parity tests, in one device call, when the
# machine has it: racecheck (shared-memory hazards between threads: the bug class the
# one-barrier-a-step pipelines of issue 7, part 11 risk, which the emulator's two cp.async modes
# approximate), synccheck (barriers in divergent code), memcheck (out-of-bounds accesses, e.g.
# the cp.async staging of lse and Δ past T). Same carry as bench/gpu.sh (bash bench/gpu_carry.sh
# here); on the GPU machine, from the repository root:  bash bench/gpu_sanitize.sh
# Run it after bench/gpu.sh when device time remains: under the sanitizer each launch is far
# slower, so the checks run most important first, each under a timeout, the whole script under a
# budget (GPU_SH_BUDGET, default 300 s; each check up to 120 s: racecheck of the forwards' test
# took longer than 60 in run 7); the last line says how many finished.
set -uo pipefail
CS=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null ||
    ls /usr/local/cuda-*/bin/compute-sanitizer 2>/dev/null | sort -V | tail -1)
if [[ -z $CS ]]; then
    echo "no compute-sanitizer on this machine"
    exit 0
fi
START=$SECONDS
BUDGET=${GPU_SH_BUDGET:-300}
CARRY=${1:-target/cuda-carry}
source "$(dirname "$0")/gpu_lib.sh"
"$CS" --version | tail -1
status=0 finished=0 checks=0
# The wgmma backward (the default on Hopper, the most restructured) first, then the forwards
# (among them the warp-specialised one, whose mbarriers and named barriers synccheck covers),
# then the mma.sync backward variants.
for check in "racecheck wgmma_backward_matches_the_cpu" "memcheck wgmma_backward_matches_the_cpu" \
    "synccheck wgmma_backward_matches_the_cpu" "racecheck wgmma_forward_matches_the_cpu" \
    "memcheck wgmma_forward_matches_the_cpu" "synccheck wgmma_forward_matches_the_cpu" \
    "racecheck attention_backward_variants_agree" \
    "memcheck attention_backward_variants_agree" "racecheck causal_attention_forward_and_backward" \
    "memcheck causal_attention_forward_and_backward" "synccheck causal_attention_forward_and_backward"; do
    set -- $check
    checks=$((checks + 1))
    timeout "$(limit 120)" "$CS" --tool "$1" --error-exitcode 9 --print-limit 10 \
        "$W/cuda_parity" "$2" --exact --nocapture --test-threads=1 >"$W/sanitize.log" 2>&1
    rc=$?
    if grep -q "skipped" "$W/sanitize.log"; then
        verdict="skipped by the test (this build lacks its kernels)"
    else
        case $rc in
        0) verdict=clean finished=$((finished + 1)) ;;
        9) verdict="REPORTED ERRORS" finished=$((finished + 1)) status=1 ;;
        124) verdict="timed out (not checked)" ;;
        *) verdict="exit $rc" status=1 ;;
        esac
    fi
    echo "## $1 $2: $verdict"
    grep -E "SUMMARY|hazard|Race reported|Invalid|Barrier error|panicked" "$W/sanitize.log" | head -6 | sed 's/^/    /'
done
echo "$finished of $checks sanitizer runs finished ($((SECONDS - START)) s)"
((finished > 0)) || status=1
exit $status
