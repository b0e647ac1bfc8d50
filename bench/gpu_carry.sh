#!/usr/bin/env bash
# Build what bench/gpu.sh runs on the GPU machine and pack it into target/cuda-carry/ (git-ignored;
# carry that path): the release `shardsmith` with --features cuda and the cuda_parity test
# binary, each stripped and gzipped. No GPU needed here. From the repository root:
#   bash bench/gpu_carry.sh            # then, on the device: bash bench/gpu.sh
set -euo pipefail
source "${CUDA_TOOLCHAIN:-../shared/tools/cuda-toolchain.sh}"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-cuda}
cargo build --release --features cuda --bin shardsmith
cargo test --release --features cuda --test cuda_parity --no-run
parity=$(ls -t "$CARGO_TARGET_DIR"/release/deps/cuda_parity-* | grep -v '\.d$' | head -1)
# Stripped and gzipped in a scratch directory, then renamed into place: other sessions may use
# target/cuda-carry too, and a half-written .gz must never be carried.
mkdir -p target/cuda-carry
tmp=$(mktemp -d target/cuda-carry/.tmp.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
strip -o "$tmp/shardsmith" "$CARGO_TARGET_DIR/release/shardsmith"
strip -o "$tmp/cuda_parity" "$parity"
gzip -c "$tmp/shardsmith" >"$tmp/shardsmith.gz"
gzip -c "$tmp/cuda_parity" >"$tmp/cuda_parity.gz"
mv "$tmp/shardsmith.gz" "$tmp/cuda_parity.gz" target/cuda-carry/
ls -l target/cuda-carry/shardsmith.gz target/cuda-carry/cuda_parity.gz
