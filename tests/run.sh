#!/usr/bin/env bash
# The test command (README, .ci/run): sets up the pinned Python reference environment once
# (cached in fixtures/gen/.venv) so the interop tests can have PyTorch / transformers load our
# output, then runs the whole Rust test suite. Needs no GPU. Ends with one summary line,
# "tests: N passed, M failed", summed over every test binary.
set -euo pipefail
cd "$(dirname "$0")/.."
bash fixtures/gen/setup_venv.sh >&2
export SHARDSMITH_PYTHON="$PWD/fixtures/gen/.venv/bin/python"
# Hermetic: no test may reach the Hub or see the user's own HuggingFace cache.
HF_HUB_CACHE=$(mktemp -d)
export HF_HUB_CACHE HF_HUB_OFFLINE=1
log=$(mktemp)
trap 'rm -rf "$log" "$HF_HUB_CACHE"' EXIT
status=0
cargo test --workspace --locked 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
