#!/usr/bin/env bash
# The test command (README, .ci/run): sets up the pinned Python reference environment once
# (cached in fixtures/gen/.venv) so the interop tests can have PyTorch / transformers load our
# output, then runs the whole Rust test suite. Needs no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash fixtures/gen/setup_venv.sh >&2
export SHARDSMITH_PYTHON="$PWD/fixtures/gen/.venv/bin/python"
cargo test --workspace --locked
