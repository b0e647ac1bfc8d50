# Sourced by the bench/gpu*.sh scripts on the GPU machine: unpacks the binaries
# bench/gpu_carry.sh packed (from $CARRY, default target/cuda-carry) into $W, puts the device
# image's CUDA libraries on the library path, sets SS (our binary), prints the card, driver and
# time, and defines limit SECONDS: a step's timeout cut to what is left of the caller's $BUDGET
# since $START (defaults: 300 s from now), keeping $RESERVE seconds (default 5) for what follows
# the steps; and parity TEST [VAR=VALUE ...]: one test of tests/cuda_parity.rs run with those
# variables, its lines printed (prefixed by the variables), a failure setting the caller's
# status=1.
CARRY=${CARRY:-target/cuda-carry}
START=${START:-$SECONDS}
BUDGET=${BUDGET:-300}
RESERVE=${RESERVE:-5}
W=/tmp/shardsmith-gpu
mkdir -p "$W"
export LD_LIBRARY_PATH=/usr/local/cuda/targets/x86_64-linux/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
gunzip -c "$CARRY/shardsmith.gz" >"$W/shardsmith" && gunzip -c "$CARRY/cuda_parity.gz" >"$W/cuda_parity" || {
    echo "missing $CARRY/shardsmith.gz or $CARRY/cuda_parity.gz (run bash bench/gpu_carry.sh first)"
    exit 2
}
chmod +x "$W/shardsmith" "$W/cuda_parity"
SS=$W/shardsmith
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
date -u +%Y-%m-%dT%H:%M:%SZ

limit() {
    local left=$((BUDGET - (SECONDS - START) - RESERVE))
    ((left < $1)) && echo $((left > 1 ? left : 1)) || echo "$1"
}

parity() {
    local t=$1
    shift
    env "$@" timeout "$(limit 60)" "$W/cuda_parity" "$t" --exact --nocapture --test-threads=1 >"$W/parity.log" 2>&1
    local rc=$?
    grep -oE "parity .*|panicked.*|test result.*" "$W/parity.log" | sed "s/^/${*:+$* }/"
    ((rc == 0)) || { status=1; echo "## parity $t${*:+ ($*)}: FAILED (exit $rc)"; tail -3 "$W/parity.log"; }
}
