#!/usr/bin/env bash
# Build and run the CPU emulation of the kernels (kernels/emu/test.cpp). Needs g++ ≥ 11 (C++20).
set -euo pipefail
cd "$(dirname "$0")"
g++ -std=c++20 -O2 -pthread -DSHARDSMITH_EMU -Wno-unknown-pragmas -o /tmp/shardsmith-kernels-emu test.cpp
/tmp/shardsmith-kernels-emu
