#!/usr/bin/env bash
# One line per kernel of a cubin: its name and the md5 of its SASS with addresses and encodings
# stripped. Two builds whose kernels print the same md5 run the same instruction sequence, which
# is how a refactor of kernels/src can show that a GPU-verified kernel did not change, here,
# without a GPU. Build the cubin as kernels/build.rs does, e.g. for flash_wg.cu:
#   source ../shared/tools/cuda-toolchain.sh
#   nvcc --ptx -arch=sm_90a -O3 -std=c++17 -o /tmp/x.ptx kernels/src/flash_wg.cu
#   ptxas -arch=sm_90a -O3 -o /tmp/x.cubin /tmp/x.ptx
#   bash kernels/sass_md5.sh /tmp/x.cubin > before.md5   # (again after the change) then: join before.md5 after.md5
# cuobjdump: $CUOBJDUMP, else the one on PATH, else the one fixtures/gen/.venv's triton ships.
set -euo pipefail
cubin=${1:?usage: sass_md5.sh FILE.cubin}
dump=${CUOBJDUMP:-$(command -v cuobjdump || ls "$(dirname "$0")"/../fixtures/gen/.venv/lib/python3*/site-packages/triton/backends/nvidia/bin/cuobjdump 2>/dev/null | head -1)}
[[ -x $dump ]] || { echo "sass_md5.sh: no cuobjdump (set CUOBJDUMP)" >&2; exit 2; }
for f in $("$dump" -sass "$cubin" | grep -oE "Function : [A-Za-z0-9_]+" | awk '{print $3}' | sort); do
    sum=$("$dump" -sass -fun "$f" "$cubin" | grep -E '^\s+/\*[0-9a-f]{4}\*/' |
        sed -E 's@/\*[0-9a-f]{4}\*/@@; s@/\* 0x[0-9a-f]+ \*/@@' | md5sum | cut -c1-12)
    echo "$f $sum"
done
