#!/usr/bin/env bash
# GPU kernel parity + micro-benchmarks against PyTorch, in one device call.
#
# Build here (no GPU needed), then carry the stripped test binary to the GPU machine:
#   source ../shared/tools/cuda-toolchain.sh
#   CARGO_TARGET_DIR=/work/target-cuda cargo test --release --features cuda --test cuda_parity --no-run
#   mkdir -p target/cuda-carry && cp <the cuda_parity-* executable> target/cuda-carry/cuda_parity
#   strip target/cuda-carry/cuda_parity     # ~57 MB; with the working tree that can pass the device
#   gzip target/cuda-carry/cuda_parity      # tool's 64 MiB carry limit: carry it gzipped (~14 MB) and
#                                           # `gunzip -c` it into /tmp/DIR on the GPU machine first
# On the GPU machine, from the repository root:  bash bench/gpu_kernels.sh [target/cuda-carry]
# Each parity test runs in its own process (a faulting kernel cannot take the others down), then
# the `bench_kernels` / `bench_kernels_direct` tests and bench/pytorch_kernels.py print
# comparable `bench | ...` rows.
set -uo pipefail
BIN=${1:-target/cuda-carry}/cuda_parity
export LD_LIBRARY_PATH=/usr/local/cuda/targets/x86_64-linux/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
date -u +%Y-%m-%dT%H:%M:%SZ
status=0
for t in rms_norm_forward_and_backward rope_forward_and_backward_are_exact softmax_forward \
    swiglu_forward_and_backward cross_entropy_forward_and_backward adamw_step_is_bit_identical \
    causal_attention_forward_and_backward; do
    timeout 60 "$BIN" "$t" --exact --nocapture --test-threads=1 2>&1 | grep -oE "parity .*|panicked.*|error.*|test result.*" || status=1
done
for b in bench_kernels bench_kernels_direct; do
    timeout 120 "$BIN" "$b" --exact --ignored --nocapture 2>&1 | grep -oE "bench .*|panicked.*|error.*" || status=1
done
timeout 150 python3 bench/pytorch_kernels.py 2>&1 | grep -v Warning || status=1
exit $status
