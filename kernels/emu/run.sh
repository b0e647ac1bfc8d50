#!/usr/bin/env bash
# Build and run the CPU emulation of the kernels (kernels/emu/test.cpp). Needs g++ ≥ 11 (C++20).
# tests/kernels_emu.rs runs it with the test suite.
set -euo pipefail
cd "$(dirname "$0")"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
g++ -std=c++20 -O2 -pthread -DSHARDSMITH_EMU -Wno-unknown-pragmas -o "$dir/emu" test.cpp
"$dir/emu"
