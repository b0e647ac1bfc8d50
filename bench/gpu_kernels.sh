#!/usr/bin/env bash
# GPU kernel parity + micro-benchmarks against PyTorch, in one device call.
#
# Same carry as bench/gpu.sh (bash bench/gpu_carry.sh here), then on the GPU machine, from the
# repository root:  bash bench/gpu_kernels.sh [target/cuda-carry]
# Each parity test runs in its own process (a faulting kernel cannot take the others down), then
# the `bench_kernels` / `bench_kernels_direct` tests and bench/pytorch_kernels.py print
# comparable `bench | ...` rows.
set -uo pipefail
START=$SECONDS
BUDGET=${GPU_SH_BUDGET:-420}
CARRY=${1:-target/cuda-carry}
source "$(dirname "$0")/gpu_lib.sh"
status=0
for t in rms_norm_forward_and_backward rope_forward_and_backward_are_exact softmax_forward \
    swiglu_forward_and_backward cross_entropy_forward_and_backward adamw_step_is_bit_identical \
    causal_attention_forward_and_backward; do
    parity "$t"
done
for b in bench_kernels bench_kernels_direct; do
    timeout "$(limit 120)" "$W/cuda_parity" "$b" --exact --ignored --nocapture 2>&1 | grep -oE "bench .*|panicked.*|error.*" || status=1
done
timeout "$(limit 150)" python3 bench/pytorch_kernels.py 2>&1 | grep -v Warning || status=1
exit $status
