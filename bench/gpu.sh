#!/usr/bin/env bash
# Issue 7 GPU check in one device call: kernel parity tests, then shardsmith vs PyTorch on the same
# card (LLaMA-7B-shaped layers fwd+bwd → MFU, causal attention fwd+bwd, 7B synthetic decode at
# batch 1 and 8, a NeVA-7B stage-1 training step), ending with one markdown table.
#
# Build here (no GPU needed), from the repository root (bench/gpu_carry.sh does exactly this):
#   source ../shared/tools/cuda-toolchain.sh
#   export CARGO_TARGET_DIR=/work/target-cuda
#   cargo build --release --features cuda
#   cargo test --release --features cuda --test cuda_parity --no-run
#   mkdir -p target/cuda-carry
#   strip -o target/cuda-carry/shardsmith $CARGO_TARGET_DIR/release/shardsmith
#   strip -o target/cuda-carry/cuda_parity $(ls -t $CARGO_TARGET_DIR/release/deps/cuda_parity-* | grep -v '\.d$' | head -1)
#   gzip -f target/cuda-carry/shardsmith target/cuda-carry/cuda_parity
# Device call (carry target/cuda-carry), from the repository root:  bash bench/gpu.sh
#
# Everything runs under `timeout`, and the whole script under a budget (GPU_SH_BUDGET seconds,
# default 330) so it ends inside 6 minutes even when a step hangs. Weights are random and made
# on the device; nothing is read from disk or downloaded. JSON lines of every run are kept in
# $OUT/gpu_results.jsonl when $OUT is set (else /tmp/shardsmith-gpu/). MFU uses PEAK_TFLOPS
# (default: 989 for H100 SXM / H200 bf16 dense, 756 for an H100 PCIe).
set -uo pipefail
START=$SECONDS
BUDGET=${GPU_SH_BUDGET:-330}
CARRY=${1:-target/cuda-carry}
RESERVE=10 # seconds kept for the table
source "$(dirname "$0")/gpu_lib.sh"
RES=${OUT:-$W}/gpu_results.jsonl
: >"$RES"
status=0

GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$GPU" in *PCIe*) DEFAULT_PEAK=756 ;; *) DEFAULT_PEAK=989 ;; esac
PEAK=${PEAK_TFLOPS:-$DEFAULT_PEAK}

# step NAME SECONDS CMD...: run with a timeout, JSON lines to $RES, anything else to the log.
step() {
    local name=$1 t
    t=$(limit "$2")
    shift 2
    local t0=$SECONDS
    timeout "$t" "$@" >"$W/$name.out" 2>"$W/$name.err"
    local rc=$?
    grep '^{' "$W/$name.out" >>"$RES"
    if ((rc != 0)); then
        status=1
        echo "## $name: FAILED (exit $rc$( ((rc == 124)) && echo ", timed out after ${t}s")); last lines:"
        { tail -n 5 "$W/$name.err"; tail -n 3 "$W/$name.out"; } | sed 's/^/    /'
    else
        echo "## $name: ok ($((SECONDS - t0)) s)"
    fi
}

echo "### parity (tests/cuda_parity.rs)"
for t in rms_norm_forward_and_backward rope_forward_and_backward_are_exact softmax_forward \
    swiglu_forward_and_backward cross_entropy_forward_and_backward adamw_step_is_bit_identical \
    gemm_backends_match_the_cpu \
    causal_attention_forward_and_backward attention_backward_variants_agree wgmma_forms_are_exact \
    wgmma_forward_matches_the_cpu \
    wgmma_backward_matches_the_cpu wgmma_phase_profiles_match_the_plain_kernels \
    full_attention_forward \
    decode_gemv_forward decode_attention_forward \
    rope_qkv_into_cache_is_exact head_splits_and_merges_are_exact bias_act_forward add_matches_candles_add cat_rows_matches_candles_cat cast_matches_candles_to_dtype \
    batched_decode_matches_the_cpu \
    graph_decode_matches_the_eager_steps decode_profile_times_every_kind_of_launch \
    train_step_layer_nodes_match_the_composed_graph; do
    parity "$t"
done
# The GEMV kernels at every row count they have (the default hands batches past 4 to cuBLAS).
parity decode_gemv_forward SHARDSMITH_CUDA_GEMV=8
# The graph decode step with its RMSNorms as launches of their own (not folded into the GEMVs).
parity graph_decode_matches_the_eager_steps SHARDSMITH_DECODE_NORM_FOLD=0
parity decode_profile_times_every_kind_of_launch SHARDSMITH_DECODE_NORM_FOLD=0
# The attention kernels in blockIdx's own order (head-major) instead of heaviest-first.
parity causal_attention_forward_and_backward SHARDSMITH_ATTN_ORDER=head

echo "### trainer end to end (fixtures/train-tiny, f32, stage 1, 10 steps): CUDA losses against the CPU's"
for d in cpu cuda; do
    step "train-$d" 60 "$SS" train --config fixtures/train-tiny/train.yaml --set trainer.device=$d \
        --set output.dir="$W/train-$d" --set output.save_formats=[hf] --force
done
python3 - "$W/train-cpu/metrics.jsonl" "$W/train-cuda/metrics.jsonl" <<'EOF2' || status=1
import json, sys
cpu, gpu = ([json.loads(l)["loss"] for l in open(p)] for p in sys.argv[1:3])
rel = max(abs(a - b) / abs(a) for a, b in zip(cpu, gpu))
print(f"train-tiny losses: {len(gpu)} CUDA steps vs {len(cpu)} CPU, max rel diff {rel:.2e}", "ok" if len(cpu) == len(gpu) == 10 and rel < 1e-4 else "FAIL")
sys.exit(0 if len(cpu) == len(gpu) == 10 and rel < 1e-4 else 1)
EOF2

echo "### decode GEMV against cuBLAS (7B layer shapes, bf16)"
[[ -n ${GPU_SH_TINY:-} ]] || SHARDSMITH_CUDA_GEMV=8 timeout "$(limit 40)" "$W/cuda_parity" bench_gemv --exact --ignored --nocapture 2>&1 |
    grep -oE "bench .*|panicked.*" || status=1

echo "### benchmarks"
PY="${PYTHON:-python3} bench/pytorch_gpu.py"
# GPU_SH_TINY=1: toy shapes on the CPU, to check the script end to end without a GPU.
L=() A=() D=() N=() C=()
if [[ -n ${GPU_SH_TINY:-} ]]; then
    L=(--layers 2 --hidden 64 --heads 4 --kv-heads 2 --ffn 172 --vocab 300)
    C=(--device cpu --dtype f32)
    A=(--batch 1 --heads 4 --kv-heads 2 --seq 16 --head-dim 16)
    D=(--batch 1,3 --prompt-len 5 --steps 4)
    N=(--vision-layers 2 --vision-hidden 32 --vision-heads 2 --vision-intermediate 64 --image-size 28 --patch 14 --batch 2 --seq 12)
    L2=(--batch 2 --seq 16)
fi
step ours-gpu-layer 60 "$SS" bench gpu-layer --runs 5 "${L[@]}" "${C[@]}" ${L2[@]+"${L2[@]}"}
step ours-gpu-layer-composed 60 "$SS" bench gpu-layer --composed --runs 5 "${L[@]}" "${C[@]}" ${L2[@]+"${L2[@]}"}
step ours-gpu-layer-pool-off 60 env SHARDSMITH_CUDA_POOL_KEEP=0 "$SS" bench gpu-layer --runs 5 "${L[@]}" "${C[@]}" ${L2[@]+"${L2[@]}"}
# The other bf16 attention kernels (ops::attention::FlashForward, FlashBackward) in the whole
# layer (the default: tma forward, tma backward): the mma.sync forward (every GPU's) with the
# mma.sync backwards split and fused and with tma's; the tma forward with the wgmma backward.
for kv in "mma split" "mma fused" "mma tma" "tma wgmma"; do
    set -- $kv
    [[ -n ${GPU_SH_TINY:-} && ( $kv == *wgmma* || $kv == *tma* ) ]] && continue # a CPU build has no wgmma kernels
    step ours-gpu-layer-$1-$2 60 env SHARDSMITH_FLASH_FWD=$1 SHARDSMITH_FLASH_BWD=$2 "$SS" bench gpu-layer --runs 5 "${L[@]}" "${C[@]}" ${L2[@]+"${L2[@]}"}
done
# The layer's GEMMs through cuBLAS directly (ops::cublas) instead of candle's matmul.
for g in cublas cublaslt; do
    step ours-gpu-layer-gemm-$g 60 env SHARDSMITH_GEMM=$g "$SS" bench gpu-layer --runs 5 "${L[@]}" "${C[@]}" ${L2[@]+"${L2[@]}"}
done
# q, k and v as three products in the layer node instead of one over their stacked weights.
step ours-gpu-layer-qkv-apart 60 env SHARDSMITH_NODE_FUSED_QKV=0 "$SS" bench gpu-layer --runs 5 "${L[@]}" "${C[@]}" ${L2[@]+"${L2[@]}"}
# A graph node a layer instead of one for the chain of layers (candle's backward then zero-fills
# and adds each layer's input gradient).
step ours-gpu-layer-no-chain 60 env SHARDSMITH_LAYER_CHAIN=0 "$SS" bench gpu-layer --runs 5 "${L[@]}" "${C[@]}" ${L2[@]+"${L2[@]}"}
# f32 master weights, as `train` keeps them: cast to bf16 each step, the weight gradients f32
# products (cuBLAS by default, ops::linear::GemmBackend::for_product; candle's product widened
# by a second pass with SHARDSMITH_GEMM=candle).
step ours-gpu-layer-f32-masters 60 "$SS" bench gpu-layer --f32-masters --runs 5 "${L[@]}" "${C[@]}" ${L2[@]+"${L2[@]}"}
step ours-gpu-layer-f32-masters-candle 60 env SHARDSMITH_GEMM=candle "$SS" bench gpu-layer --f32-masters --runs 5 "${L[@]}" "${C[@]}" ${L2[@]+"${L2[@]}"}
step torch-gpu-layer 60 $PY gpu-layer --runs 5 "${L[@]}" "${C[@]}" ${L2[@]+"${L2[@]}"}
G=()
[[ -n ${GPU_SH_TINY:-} ]] && G=(--rows 32 --square 48)
step ours-gemm 40 "$SS" bench gemm --runs 10 --warmup 2 "${L[@]}" "${C[@]}" ${G[@]+"${G[@]}"}
step torch-gemm 40 $PY gemm --runs 10 --warmup 2 "${L[@]}" "${C[@]}" ${G[@]+"${G[@]}"}
# The wgmma kernels in their own runs, so that a fault in one cannot cost the others' numbers.
AK=()
[[ -n ${GPU_SH_TINY:-} ]] || AK=(--forward mma --backward split,wide,fused)
step ours-attention 30 "$SS" bench attention --runs 10 --warmup 2 "${C[@]}" "${A[@]}" ${AK[@]+"${AK[@]}"}
if [[ -z ${GPU_SH_TINY:-} ]]; then
    step ours-attention-wgmma 30 "$SS" bench attention --runs 10 --warmup 2 "${A[@]}" --forward wgmma,wgmma128,tma --backward split
    # --phases: then the profiled wgmma kernels, where their warps spend their cycles (tables below).
    step ours-attention-wgmma-bwd 40 "$SS" bench attention --runs 10 --warmup 2 "${A[@]}" --forward wgmma,wgmma128,tma,mma --backward wgmma,tma --phases
    # The same kernels with the blocks in head-major order (after the rows above: `find` takes
    # the first match, so the table's other cells stay heaviest-first).
    step ours-attention-head-major 30 env SHARDSMITH_ATTN_ORDER=head "$SS" bench attention --runs 10 --warmup 2 "${A[@]}" --forward mma,wgmma --backward split,wgmma
fi
step torch-attention 40 $PY attention --runs 10 --warmup 2 "${C[@]}" "${A[@]}"
# --breakdown: the graph step's time by kind of launch, at each batch whose step is a graph
# (a CUDA run only).
BD=(--breakdown)
[[ -n ${GPU_SH_TINY:-} ]] && BD=()
step ours-decode 70 "$SS" bench decode --runs 3 ${BD[@]+"${BD[@]}"} "${L[@]}" "${C[@]}" "${D[@]}"
# The graph step with each RMSNorm a launch of its own instead of folded into the GEMV that
# reads it (gemv.cu's gemv_norm).
step ours-decode-no-fold 60 env SHARDSMITH_DECODE_NORM_FOLD=0 "$SS" bench decode --runs 3 "${L[@]}" "${C[@]}" "${D[@]}"
step ours-decode-eager 60 env SHARDSMITH_CUDA_GRAPH=0 "$SS" bench decode --runs 3 "${L[@]}" "${C[@]}" "${D[@]}"
step ours-decode-eager-events 60 env SHARDSMITH_CUDA_GRAPH=0 SHARDSMITH_CUDA_EVENTS=1 "$SS" bench decode --runs 3 "${L[@]}" "${C[@]}" "${D[@]}"
step ours-decode-cublas 60 env SHARDSMITH_CUDA_GEMV=0 "$SS" bench decode --runs 3 "${L[@]}" "${C[@]}" "${D[@]}"
step ours-decode-gemv8 60 env SHARDSMITH_CUDA_GEMV=8 "$SS" bench decode --runs 3 "${L[@]}" "${C[@]}" "${D[@]}"
step torch-decode 60 $PY decode --runs 3 "${L[@]}" "${C[@]}" "${D[@]}"
step ours-neva 60 "$SS" bench neva-step --runs 3 "${L[@]}" "${C[@]}" "${N[@]}"
step ours-neva-composed 60 "$SS" bench neva-step --composed --runs 3 "${L[@]}" "${C[@]}" "${N[@]}"
step ours-neva-pool-off 60 env SHARDSMITH_CUDA_POOL_KEEP=0 "$SS" bench neva-step --runs 3 "${L[@]}" "${C[@]}" "${N[@]}"
step ours-neva-split 60 env SHARDSMITH_FLASH_FWD=mma SHARDSMITH_FLASH_BWD=split "$SS" bench neva-step --runs 3 "${L[@]}" "${C[@]}" "${N[@]}"
[[ -n ${GPU_SH_TINY:-} ]] || step ours-neva-wgmma 60 env SHARDSMITH_FLASH_FWD=wgmma SHARDSMITH_FLASH_BWD=wgmma "$SS" bench neva-step --runs 3 "${L[@]}" "${C[@]}" "${N[@]}"
step ours-neva-gemm-cublaslt 60 env SHARDSMITH_GEMM=cublaslt "$SS" bench neva-step --runs 3 "${L[@]}" "${C[@]}" "${N[@]}"
step ours-neva-qkv-apart 60 env SHARDSMITH_NODE_FUSED_QKV=0 "$SS" bench neva-step --runs 3 "${L[@]}" "${C[@]}" "${N[@]}"
step torch-neva 60 $PY neva-step --runs 3 "${L[@]}" "${C[@]}" "${N[@]}"

echo "### results ($GPU, peak $PEAK TFLOP/s bf16 for MFU; $((SECONDS - START)) s)"
python3 - "$RES" "$PEAK" <<'EOF' || status=1
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
peak = float(sys.argv[2])
# The default attention kernels (those of the first layer run, which sets no variable; a build
# without wgmma defaults to split) and the variants measured beside them.
first = next((r for r in rows if r["bench"] == "gpu_layer" and r["impl"] == "shardsmith"), {})
DEF = dict(flash_fwd=first.get("flash_fwd", "mma"), flash_bwd=first.get("flash_bwd", "split"))
VARIANTS = [(f, b) for f, b in [("mma", "split"), ("mma", "wide"), ("mma", "fused"), ("mma", "wgmma"), ("mma", "tma"), ("wgmma", "split"), ("wgmma", "wgmma"), ("wgmma128", "split"), ("wgmma128", "wgmma"), ("tma", "split"), ("tma", "wgmma"), ("tma", "tma")]
            if (f, b) != (DEF["flash_fwd"], DEF["flash_bwd"])]
def find(bench, impl, **kv):
    # A callable value is a test of the whole row.
    ok = lambda r, k, v: v(r) if callable(v) else r.get(k) == v
    for r in rows:
        if r["bench"] == bench and r["impl"] == impl and all(ok(r, k, v) for k, v in kv.items()):
            return r
def fmt(x, unit=""):
    return "—" if x is None else f"{x:.1f}{unit}"
out = ["| benchmark | metric | shardsmith | PyTorch eager | ours vs eager (>1: ours faster) | PyTorch other |",
       "|---|---|---|---|---|---|"]
def line(name, metric, ours, base, others, higher_better=True):
    ratio = None
    if ours is not None and base:
        ratio = ours / base if higher_better else base / ours
    out.append(f"| {name} | {metric} | {fmt(ours)} | {fmt(base)} | {'—' if ratio is None else f'{ratio:.2f}×'} | {others} |")
g = lambda r, k: None if r is None else r[k]
# Weights in the compute dtype (older runs wrote no "masters"), or f32 masters under bf16.
same_masters = lambda r: r.get("masters", r["dtype"]) == r["dtype"]
f32_masters = lambda r: r.get("masters") == "f32" and r["dtype"] != "f32"
fused = lambda r: r.get("fused_qkv", True)
chain = lambda r: r.get("layer_chain", True)
o, t, c = find("gpu_layer", "shardsmith", layer_nodes=True, cuda_pool_keep=True, gemm="candle", masters=same_masters, fused_qkv=fused, layer_chain=chain, **DEF), find("gpu_layer", "pytorch"), find("gpu_layer", "pytorch_ckpt")
oq = find("gpu_layer", "shardsmith", fused_qkv=False)
on = find("gpu_layer", "shardsmith", layer_chain=False)
om, omc = (find("gpu_layer", "shardsmith", masters=f32_masters, gemm_f32=x) for x in ("cublas", "candle"))
# The layer's variant runs are told apart from its GEMM-library runs by gemm; attention rows have no gemm.
kern = lambda bench, key, **kv: ", ".join(f"{f}+{b} {fmt(g(find(bench, 'shardsmith', flash_fwd=f, flash_bwd=b, **kv), key))}" for f, b in VARIANTS)
oc = find("gpu_layer", "shardsmith", layer_nodes=False)
op = find("gpu_layer", "shardsmith", cuda_pool_keep=False)
gemms = lambda bench, key: ", ".join(f"{x} {fmt(g(find(bench, 'shardsmith', gemm=x, layer_nodes=True, cuda_pool_keep=True, **DEF), key))}" for x in ("cublas", "cublaslt"))
if o or t:
    r = o or t
    name = f"LLaMA-7B layers ×{r['layers']} fwd+bwd, B{r['batch']}×S{r['seq']}"
    line(name, "TFLOP/s", g(o, "tflops"), g(t, "tflops"),
         f"full ckpt {fmt(g(c, 'tflops'))}; ours composed {fmt(g(oc, 'tflops'))}, pool released {fmt(g(op, 'tflops'))}; "
         f"attention fwd+bwd kernels {kern('gpu_layer', 'tflops', gemm='candle')}; GEMMs by {gemms('gpu_layer', 'tflops')}; "
         f"q/k/v as three products {fmt(g(oq, 'tflops'))}; a graph node a layer (no chain) {fmt(g(on, 'tflops'))}")
    mfu = lambda r: None if r is None else 100 * r["tflops"] / peak
    line(name, "MFU %", mfu(o), mfu(t), f"full ckpt {fmt(mfu(c))}; ours composed {fmt(mfu(oc))}, pool released {fmt(mfu(op))}")
    line(name + ", f32 master weights (ours; PyTorch: bf16 weights)", "MFU %", mfu(om), mfu(t),
         f"ours with the f32 weight gradients widened from candle's bf16 product: {fmt(mfu(omc))}")
o, t = find("attention", "shardsmith", **DEF), find("attention", "pytorch")
wg, wg128, tma = (find("attention", "shardsmith", flash_fwd=f) for f in ("wgmma", "wgmma128", "tma"))
fl, cu = find("attention", "pytorch_flash"), find("attention", "pytorch_cudnn")
if o or t:
    r = o or t
    name = f"causal attention B{r['batch']} H{r['heads']} S{r['seq']} D{r['head_dim']}"
    hm = lambda f, b, key: fmt(g(find("attention", "shardsmith", flash_fwd=f, flash_bwd=b, attn_order="head"), key))
    line(name, "fwd+bwd TFLOP/s", g(o, "tflops_fwd_bwd"), g(t, "tflops_fwd_bwd"),
         f"flash {fmt(g(fl, 'tflops_fwd_bwd'))}, cuDNN {fmt(g(cu, 'tflops_fwd_bwd'))}; ours {kern('attention', 'tflops_fwd_bwd')}; "
         f"blocks head-major instead of heaviest-first: mma+split {hm('mma', 'split', 'tflops_fwd_bwd')}, mma+wgmma {hm('mma', 'wgmma', 'tflops_fwd_bwd')}, wgmma+wgmma {hm('wgmma', 'wgmma', 'tflops_fwd_bwd')}")
    line(name, "fwd TFLOP/s", g(o, "tflops_fwd"), g(t, "tflops_fwd"),
         f"flash {fmt(g(fl, 'tflops_fwd'))}, cuDNN {fmt(g(cu, 'tflops_fwd'))}; ours wgmma {fmt(g(wg, 'tflops_fwd'))}, wgmma128 {fmt(g(wg128, 'tflops_fwd'))}, tma {fmt(g(tma, 'tflops_fwd'))}; "
         f"head-major mma {hm('mma', 'wgmma', 'tflops_fwd')}, wgmma {hm('wgmma', 'wgmma', 'tflops_fwd')}")
# Which attention kernels to make the defaults: the fastest forward by its own time, and the
# fastest backward by fwd+bwd time less its forward's (heaviest-first rows).
att = [r for r in rows if r["bench"] == "attention" and r["impl"] == "shardsmith" and r.get("attn_order", "heaviest") == "heaviest" and r.get("fwd_ms")]
if att and att[0]["device"] == "cuda":
    label = lambda kind, r: r["flash_" + kind]
    fwd_best, bwd_best = {}, {}
    for r in att:
        flops = r["tflops_fwd"] * r["fwd_ms"] * 1e9
        fwd_best[label("fwd", r)] = max(fwd_best.get(label("fwd", r), 0), r["tflops_fwd"])
        if r["fwd_bwd_ms"] > r["fwd_ms"]:
            bwd = 2.5 * flops / ((r["fwd_bwd_ms"] - r["fwd_ms"]) * 1e9)
            bwd_best[label("bwd", r)] = max(bwd_best.get(label("bwd", r), 0), bwd)
    rank = lambda d: ", ".join(f"{k} {v:.1f}" for k, v in sorted(d.items(), key=lambda kv: -kv[1]))
    out += ["", f"Attention kernels, fastest first (TFLOP/s, B2 H32 S4096 D128): forward {rank(fwd_best)}; backward (fwd+bwd less fwd) {rank(bwd_best)}"]
for b in sorted({r["batch"] for r in rows if r["bench"] == "decode"}):
    # The default's GEMV rows: those of the first decode run, which sets no variable.
    dr = next((r.get("cuda_gemv_rows") for r in rows if r["bench"] == "decode" and r["impl"] == "shardsmith"), None)
    # And whether it folds the RMSNorms into the GEMVs (runs before the fold existed did not).
    fold = lambda r: r.get("decode_norm_fold", False)
    df = next((fold(r) for r in rows if r["bench"] == "decode" and r["impl"] == "shardsmith" and r["batch"] == b), False)
    o, t, gr = find("decode", "shardsmith", batch=b, cuda_gemv_rows=dr, cuda_graph=True, cuda_events=False, decode_norm_fold=lambda r: fold(r) == df), find("decode", "pytorch", batch=b), find("decode", "pytorch_cudagraph", batch=b)
    onf = find("decode", "shardsmith", batch=b, decode_norm_fold=lambda r: "decode_norm_fold" in r and fold(r) != df)
    oc = find("decode", "shardsmith", batch=b, cuda_gemv_rows=0)
    o8 = find("decode", "shardsmith", batch=b, cuda_gemv_rows=8)
    oe = find("decode", "shardsmith", batch=b, cuda_gemv_rows=dr, cuda_graph=False, cuda_events=False)
    ov = find("decode", "shardsmith", batch=b, cuda_gemv_rows=dr, cuda_graph=False, cuda_events=True)
    r = o or t or gr
    name = f"7B decode ({r['layers']} layers), batch {b}, prompt {r['prompt_len']} + {r['steps']}"
    line(name, "tokens/s", g(o, "tokens_per_s"), g(t, "tokens_per_s"),
         f"CUDA graphs {fmt(g(gr, 'tokens_per_s'))}; ours: {g(o, 'graph_replays')} steps replayed from its graph, eager {fmt(g(oe, 'tokens_per_s'))}, "
         f"eager with cudarc events {fmt(g(ov, 'tokens_per_s'))}, all GEMMs by cuBLAS {fmt(g(oc, 'tokens_per_s'))}, "
         f"GEMV kernels to batch 8 {fmt(g(o8, 'tokens_per_s'))} ({g(o8, 'graph_replays')} replayed), "
         f"RMSNorms {'as their own launches' if df else 'folded into the GEMVs'} {fmt(g(onf, 'tokens_per_s'))}")
o, t = find("neva_step", "shardsmith", layer_nodes=True, cuda_pool_keep=True, gemm="candle", fused_qkv=fused, layer_chain=chain, **DEF), find("neva_step", "pytorch")
oq = find("neva_step", "shardsmith", fused_qkv=False)
os_ = find("neva_step", "shardsmith", flash_fwd="mma", flash_bwd="split") if DEF["flash_bwd"] != "split" else None
ol = find("neva_step", "shardsmith", gemm="cublaslt")
of = find("neva_step", "shardsmith", flash_fwd="wgmma", flash_bwd="wgmma")
oc = find("neva_step", "shardsmith", layer_nodes=False)
op = find("neva_step", "shardsmith", cuda_pool_keep=False)
if o or t:
    r = o or t
    name = f"NeVA-7B stage 1 step (LLaMA ×{r['llm_layers']} + ViT-L/14-336 ×{r['vision_layers']}), B{r['batch']}×S{r['seq']}"
    parts = lambda r: "—" if r is None else f"fwd+bwd {r['fwd_bwd_ms']:.1f}, vision+projector fwd {r['vision_projector_ms']:.1f}"
    line(name, "step ms (ratio: eager ÷ ours)", g(o, "step_ms"), g(t, "step_ms"),
         f"ours: {parts(o)}; composed {fmt(g(oc, 'step_ms'))} ({parts(oc)}); pool released {fmt(g(op, 'step_ms'))}; "
         f"attention kernels mma+split {fmt(g(os_, 'step_ms'))}, wgmma+wgmma {fmt(g(of, 'step_ms'))}; GEMMs by cublaslt {fmt(g(ol, 'step_ms'))}; "
         f"q/k/v as three products {fmt(g(oq, 'step_ms'))}", higher_better=False)
gemm_rows = [r for r in rows if r["bench"] == "gemm" and r["impl"] == "shardsmith" and r["gemm"] == "candle"]
if gemm_rows:
    out += ["", "| GEMM (bf16) | M×N×K | candle TFLOP/s | cublas | cublaslt | PyTorch |", "|---|---|---|---|---|---|"]
    for r in gemm_rows:
        key = dict(name=r["name"], op=r["op"], m=r["m"], n=r["n"], k=r["k"])
        cells = [fmt(r["tflops"])] + [fmt(g(find("gemm", "shardsmith", gemm=x, **key), "tflops")) for x in ("cublas", "cublaslt")]
        cells.append(fmt(g(find("gemm", "pytorch", **key), "tflops")))
        out.append(f"| {r['name']} {r['op']} | {r['m']}×{r['n']}×{r['k']} | " + " | ".join(cells) + " |")
for r in rows:
    if r["bench"] != "decode_breakdown" or "kernels" not in r:
        continue
    out += ["", f"| decode step by launch (batch {r['batch']}, position {r['position']}, {r['dtype']}) | calls | ms per step | share of the step |",
            "|---|---|---|---|"]
    for k in r["kernels"]:
        out.append(f"| {k['kernel']} | {k['calls']} | {k['ms']:.3f} | {100 * k['ms'] / r['step_ms']:.1f}% |")
    out.append(f"| sum of the partial graphs / whole step | — | {r['sum_ms']:.3f} / {r['step_ms']:.3f} | {100 * r['sum_ms'] / r['step_ms']:.1f}% |")
# bench attention --phases: the profiled wgmma kernels' cycles by phase (ops::attention::phases).
for r in rows:
    if r["bench"] != "attention_phases":
        continue
    out += ["", f"| {r['kernel']} (B{r['batch']} H{r['heads']} S{r['seq']}; plain {r['plain_ms']:.2f} ms, profiled {r['profiled_ms']:.2f} ms) | share of warp cycles | runs | cycles a run |",
            "|---|---|---|---|"]
    for p in r["phases"]:
        out.append(f"| {p['phase']} | {100 * p['share']:.1f}% | {p['runs']} | {p['cycles_per_run']:.0f} |")
print("\n".join(out))
EOF
echo "(total $((SECONDS - START)) s; JSON lines in $RES)"
exit $status
