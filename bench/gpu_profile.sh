#!/usr/bin/env bash
# Where the GPU time goes (issue 7), one device call: the `bench_layer_parts` micro-benchmarks of
# tests/cuda_parity.rs (a 7B layer's GEMMs at B2×S4096 by kind, the attention kernels, its
# element-wise ops as often as a layer runs them, a ViT-L layer's pieces), the parts of the real
# layer step timed by CUDA events (bench gpu-layer --phases) and, when Nsight Systems is on the
# machine, the kernels of a NeVA step with 4
# LLM layers by total time. Same carry as bench/gpu.sh (bash bench/gpu_carry.sh here), then on
# the GPU machine:  bash bench/gpu_profile.sh
set -uo pipefail
START=$SECONDS
BUDGET=${GPU_SH_BUDGET:-240}
CARRY=${1:-target/cuda-carry}
RESERVE=5
source "$(dirname "$0")/gpu_lib.sh"
status=0
echo "### where a layer's time goes (cuda_parity bench_layer_parts)"
timeout "$(limit 120)" "$W/cuda_parity" bench_layer_parts --exact --ignored --nocapture 2>&1 |
    grep -oE "bench .*|panicked.*|error.*" || status=1
# Each part of the 7B layers' step timed by CUDA events on the stream (ops::phases), per layer:
# what the parts above add up to in the real step, and what no part holds (autograd's own work,
# the GPU idling between launches).
echo "### where a 7B layer step's GPU time goes (bench gpu-layer --phases)"
for v in "" SHARDSMITH_NODE_FUSED_QKV=0; do
    timeout "$(limit 60)" env $v "$SS" bench gpu-layer --runs 3 --phases 2>&1 | grep '^{' | python3 -c '
import json, sys
rows = [json.loads(l) for l in sys.stdin]
p = next(r for r in rows if r["bench"] == "gpu_layer_phases")
n, step, rest = p["layers"], p["step_ms"], p["step_ms"] - p["in_regions_ms"]
print("| %s: part of a layer (B%d×S%d, %s) | calls | ms | share |" % (sys.argv[1] or "default", p["batch"], p["seq"], p["dtype"]))
print("|---|---|---|---|")
for ph in sorted(p["phases"], key=lambda ph: -ph["ms"]):
    print("| %s | %g | %.3f | %.1f%% |" % (ph["name"], ph["calls"] / n, ph["ms"] / n, ph["ms"] / step * 100))
print("| in no part (autograd, idle gaps) | — | %.3f | %.1f%% |" % (rest / n, rest / step * 100))
print("| whole step, by events / timed (median) | — | %.3f / %.3f | 100%% |" % (step / n, p["timed_step_ms"] / n))
' "$v" || status=1
done
# With Nsight Systems on the machine: the kernels of a NeVA step (4 LLM layers, the whole ViT) and
# of 2 decoder layers fwd+bwd at B2×S4096, by total GPU time.
NSYS=$(command -v nsys || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems*/bin/nsys 2>/dev/null | head -1)
profile() {
    local name=$1
    shift
    echo "## nsys: $*"
    timeout "$(limit 90)" "$NSYS" profile -o "$W/$name" --force-overwrite true -t cuda "$SS" "$@" >/dev/null 2>&1 &&
        timeout "$(limit 60)" "$NSYS" stats -r cuda_gpu_kern_sum -f csv "$W/$name.nsys-rep" 2>/dev/null |
        python3 -c '
import csv, sys
rows = [r for r in csv.reader(sys.stdin) if len(r) > 8]
head, body = rows[0], rows[1:]
t, n, name = head.index("Total Time (ns)"), head.index("Instances"), head.index("Name")
total = sum(float(r[t]) for r in body)
print(f"{len(body)} kernels, {total / 1e6:.1f} ms of GPU time in all (warm-up and timed runs)")
for r in body[:25]:
    print(f"  {float(r[t]) / total * 100:5.1f} %  {float(r[t]) / 1e6:8.2f} ms  x{r[n]:>6}  {r[name][:110]}")
' || { status=1; echo "nsys failed"; }
}
if [[ -n $NSYS ]]; then
    profile neva bench neva-step --layers 4 --runs 2 --warmup 1
    profile layer bench gpu-layer --layers 2 --runs 2 --warmup 1
else
    echo "no nsys here"
fi
exit $status
