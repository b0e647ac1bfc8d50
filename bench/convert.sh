#!/usr/bin/env bash
# Benchmark: HF LLaMA-2 safetensors -> .nemo TP-8 -> HF with shardsmith, against `cp -r` of the
# same bytes and against the PyTorch baseline (bench/pytorch_convert.py: the way NeMo's converter +
# megatron_change_num_partitions work — whole model in RAM, torch ops, torch.save per rank, tarfile),
# all in ONE run on the same synthetic checkpoint (targets.md, "Conversion and resharding").
#
#   bash bench/convert.sh PRESET [LAYERS]
#     PRESET  llama2-7b | llama2-13b | llama2-70b      (shardsmith synth presets)
#     LAYERS  keep only this many decoder layers (e.g. `llama2-7b 4` ~ 1B, `llama2-70b 2`)
#
# Environment (all optional):
#   RUNS=N           repeat every step N times and report the median wall time / peak RSS
#                    (default 1: a single run per step; at 7B each step moves ~13.5 GB through
#                    the disk, so one run per step is what fits the time budget — say so when
#                    recording results; use RUNS=5 for the small sizes).
#   HF_DIR=path      use this HF checkpoint instead of synthesizing one (it is not deleted).
#   REFCHECK=0|1     also check shardsmith's .nemo tensor-by-tensor against the PyTorch reference
#                    (tests/interop/nemo_reference_check.py; needs ~1.2x the model in RAM);
#                    default: on when the checkpoint is <= 4 GiB.
#   SHARDSMITH_BIN   binary to use (default target/release/shardsmith, built if missing).
#   KEEP=1           keep the work directory.
#   DIST=0           skip the distributed-checkpoint steps (2b, 3b; default: run them).
#
# Steps, each timed as wall clock from start to the end of a following `sync` (so every step is
# charged for getting its bytes to disk) and run under /usr/bin/time -v for the peak RSS; `sync`
# also runs before each step. The page cache is not dropped (shared machine): every step reads the
# same source, which the preceding steps have warmed alike.
#   1. cp -r DIR COPY                                  (the physical floor; the copy is deleted)
#   1b. cat of every file into COPY                    (the same bytes through user space)
#   2. shardsmith convert DIR OURS.nemo --tp 8         (HF -> .nemo TP-8)
#   3. shardsmith convert OURS.nemo OURS_BACK          (.nemo TP-8 -> HF)
#   2b. shardsmith convert DIR D.nemo --tp 8 --dist-ckpt B   (HF -> distributed .nemo, B = zarr
#       and torch_dist)
#   3b. shardsmith convert D.nemo D_BACK               (distributed .nemo -> HF)
#   4. pytorch_convert.py hf2nemo DIR PY.nemo --tp 8
#   5. pytorch_convert.py nemo2hf PY.nemo PY_BACK
# Peak RSS of the PyTorch rows includes the HF file pages that safetensors maps (see the docstring
# of tests/interop/nemo_reference.py).
# Then OURS_BACK and PY_BACK must equal DIR bit for bit (`shardsmith diff` when the binary has it,
# else a safetensors comparison in Python). Outputs are deleted as soon as they are checked, so the
# disk holds at most DIR + 2 more copies (~3x the model size).
#
# Work directory: bench/out/convert-<tag>.work (git-ignored), removed at the end; the table is kept
# in bench/out/convert-<tag>.md, <tag> = PRESET or PRESET-L<LAYERS>.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

if [[ $# -lt 1 || $# -gt 2 ]]; then
    sed -n '2,12p' "$0" >&2
    exit 2
fi
preset=$1
layers=${2:-}
tag=$preset${layers:+-L$layers}
runs=${RUNS:-1}
bin=${SHARDSMITH_BIN:-target/release/shardsmith}
out=bench/out
work=$out/convert-$tag.work
table=$out/convert-$tag.md

if [[ ! -x $bin ]]; then
    echo "convert.sh: $bin missing, building it" >&2
    cargo build --release --quiet
fi
help=$("$bin" --help)
grep -qE '^ +convert ' <<<"$help" || { echo "convert.sh: $bin has no 'convert' subcommand (rebuild?)" >&2; exit 1; }
has_diff=0
if grep -qE '^ +diff ' <<<"$help"; then has_diff=1; fi
py=$(bash fixtures/gen/setup_venv.sh)
if [[ ! -x /usr/bin/time ]]; then
    echo "convert.sh: installing GNU time" >&2
    if [[ $(id -u) == 0 ]]; then apt-get install -y time >/dev/null || { apt-get update >/dev/null && apt-get install -y time >/dev/null; }
    else sudo apt-get install -y time >/dev/null; fi
fi

rm -rf "$work"
mkdir -p "$work"
cleanup() {
    if [[ ${KEEP:-0} != 1 ]]; then rm -rf "$work"; fi
}
trap cleanup EXIT

# --- the checkpoint -----------------------------------------------------------------------------
if [[ -n ${HF_DIR:-} ]]; then
    src=$HF_DIR
else
    src=$work/hf
    echo "convert.sh: synthesizing $preset${layers:+ with $layers layers}" >&2
    "$bin" synth --preset "$preset" ${layers:+--layers "$layers"} -o "$src" >&2
fi
# NeMo LLaMA needs a SentencePiece tokenizer.model; synth writes none. Make one with exactly
# vocab_size pieces (the fixture's BPE model plus filler pieces) so padding and trimming are real.
tok=$src/tokenizer.model
if [[ ! -f $tok ]]; then
    tok=$work/tokenizer.model
    "$py" - "$src/config.json" fixtures/llama-mha/tokenizer.model "$tok" <<'EOF'
import json, sys
from sentencepiece import sentencepiece_model_pb2 as pb
import sentencepiece as spm
vocab = json.load(open(sys.argv[1]))["vocab_size"]
m = pb.ModelProto()
m.ParseFromString(open(sys.argv[2], "rb").read())
if len(m.pieces) > vocab:
    sys.exit(f"fixture tokenizer has {len(m.pieces)} pieces > vocab_size {vocab}")
low = min(p.score for p in m.pieces)
for i in range(vocab - len(m.pieces)):
    p = m.pieces.add()
    p.piece, p.score, p.type = f"\u2581synth{i:06d}", low - 1 - i, pb.ModelProto.SentencePiece.NORMAL
open(sys.argv[3], "wb").write(m.SerializeToString())
assert spm.SentencePieceProcessor(model_file=sys.argv[3]).vocab_size() == vocab
EOF
fi

read -r bytes largest ntensors < <("$py" - "$src" <<'EOF'
import glob, json, struct, sys
total = largest = n = 0
for f in glob.glob(sys.argv[1] + "/*.safetensors"):
    with open(f, "rb") as fh:
        hdr = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
    for k, v in hdr.items():
        if k != "__metadata__":
            size = v["data_offsets"][1] - v["data_offsets"][0]
            total += size; largest = max(largest, size); n += 1
print(total, largest, n)
EOF
)
mib() { echo $(( ($1 + 1048575) / 1048576 )); }
need=$(( bytes * 3 + (2 << 30) ))
free=$(( $(df --output=avail -B1 "$work" | tail -1) ))
if (( free < need )); then
    echo "convert.sh: $(mib $free) MiB free under $work, need ~$(mib $need) MiB (3x the checkpoint + 2 GiB)" >&2
    exit 1
fi
refcheck=${REFCHECK:-auto}
if [[ $refcheck == auto ]]; then refcheck=$(( bytes <= (4 << 30) ? 1 : 0 )); fi

# --- measuring ----------------------------------------------------------------------------------
declare -A wall_s rss_mib
order=()
# measure NAME OUTPUT -- CMD...: run CMD $runs times (OUTPUT removed before each run, kept after
# the last), record the median wall seconds (incl. a trailing sync) and median peak RSS.
measure() {
    local name=$1 output=$2
    shift 3
    local walls=() rsss=()
    for ((r = 1; r <= runs; r++)); do
        rm -rf "$output"
        sync
        local tf=$work/time.txt s e
        s=$(date +%s%N)
        if ! /usr/bin/time -v -o "$tf" "$@" >"$work/step.log" 2>&1; then
            echo "convert.sh: step '$name' failed:" >&2
            tail -20 "$work/step.log" >&2
            exit 1
        fi
        sync
        e=$(date +%s%N)
        walls+=($(( (e - s) / 1000000 )))
        rsss+=($(awk -F': ' '/Maximum resident set size/ {print $2}' "$tf"))
        echo "convert.sh: $name run $r/$runs: $(( (e - s) / 1000000 )) ms, peak RSS $(( ${rsss[-1]} / 1024 )) MiB" >&2
    done
    local mid=$(( (runs + 1) / 2 ))
    wall_s[$name]=$(printf '%s\n' "${walls[@]}" | sort -n | sed -n "${mid}p" | awk '{printf "%.2f", $1 / 1000}')
    rss_mib[$name]=$(printf '%s\n' "${rsss[@]}" | sort -n | sed -n "${mid}p" | awk '{printf "%d", $1 / 1024}')
    order+=("$name")
}

# same_as_source DIR: exit 0 when DIR's tensors equal the source's bit for bit
same_as_source() {
    if ((has_diff)); then
        "$bin" diff "$src" "$1" >"$work/diff.log" 2>&1 || { tail -20 "$work/diff.log" >&2; return 1; }
    else
        "$py" - "$src" "$1" <<'EOF'
import glob, sys
import torch
from safetensors import safe_open
def index(d):
    out = {}
    for f in glob.glob(d + "/*.safetensors"):
        with safe_open(f, "pt") as s:
            out.update({k: f for k in s.keys()})
    return out
a, b = index(sys.argv[1]), index(sys.argv[2])
bad = sorted(set(a) ^ set(b))
for k in sorted(set(a) & set(b)):
    with safe_open(a[k], "pt") as fa, safe_open(b[k], "pt") as fb:
        x, y = fa.get_tensor(k), fb.get_tensor(k)
    if x.dtype != y.dtype or x.shape != y.shape or not x.reshape(-1).view(torch.uint8).equal(y.reshape(-1).view(torch.uint8)):
        bad.append(k)
if bad:
    sys.exit(f"{len(bad)} tensors differ or are missing, e.g. {bad[:5]}")
EOF
    fi
}

checks=()
tp=8
measure "cp -r (same bytes)" "$work/copy" -- cp -r "$src" "$work/copy"
rm -rf "$work/copy"
# cp copies inside the kernel (copy_file_range); any converter that must look at the bytes (a
# CRC for the zip, a gather for fused tensors) reads them into user space and writes them back,
# which is what this baseline measures: the same bytes through a user-space buffer.
mkdir -p "$work/cat"
measure "cat > file (user-space copy of the same bytes)" "$work/cat" -- sh -c 'mkdir -p "$2" && for f in "$1"/*; do cat "$f" > "$2/$(basename "$f")"; done' _ "$src" "$work/cat"
rm -rf "$work/cat"

measure "shardsmith HF → .nemo TP-$tp" "$work/ours.nemo" -- "$bin" convert "$src" "$work/ours.nemo" --tp $tp --tokenizer "$tok"
if ((refcheck)); then
    if line=$("$py" tests/interop/nemo_reference_check.py "$src" "$work/ours.nemo" --tp $tp --pp 1 --tokenizer "$tok"); then
        checks+=("shardsmith .nemo TP-$tp vs PyTorch reference, rank by rank: OK")
    else
        checks+=("shardsmith .nemo TP-$tp vs PyTorch reference: **FAIL** — $(echo "$line" | head -3 | tr '\n' ' ')")
    fi
fi
measure "shardsmith .nemo TP-$tp → HF" "$work/ours_back" -- "$bin" convert "$work/ours.nemo" "$work/ours_back"
if same_as_source "$work/ours_back"; then checks+=("shardsmith round trip HF → .nemo TP-$tp → HF: bit-identical ($ntensors tensors)")
else checks+=("shardsmith round trip HF → .nemo TP-$tp → HF: **DIFFERS**"); fi
rm -rf "$work/ours_back"
# The second leg reads the .nemo, not the HF files: its floor is a copy of the .nemo's bytes.
# Measured after our leg, so if anything the copy finds the .nemo warmer in the page cache.
measure "cp of the TP-$tp .nemo (floor of the second leg)" "$work/nemo_copy" -- cp "$work/ours.nemo" "$work/nemo_copy"
rm -rf "$work/nemo_copy"
rm -f "$work/ours.nemo"

if [[ ${DIST:-1} != 0 ]]; then
    for backend in zarr torch_dist; do
        measure "shardsmith HF → $backend dist .nemo (TP-$tp chunks)" "$work/dist.nemo" -- "$bin" convert "$src" "$work/dist.nemo" --tp $tp --tokenizer "$tok" --dist-ckpt $backend
        measure "shardsmith $backend dist .nemo → HF" "$work/dist_back" -- "$bin" convert "$work/dist.nemo" "$work/dist_back"
        rm -f "$work/dist.nemo"
        if same_as_source "$work/dist_back"; then checks+=("shardsmith round trip HF → $backend dist .nemo → HF: bit-identical ($ntensors tensors)")
        else checks+=("shardsmith round trip HF → $backend dist .nemo → HF: **DIFFERS**"); fi
        rm -rf "$work/dist_back"
    done
fi

measure "PyTorch HF → .nemo TP-$tp" "$work/py.nemo" -- "$py" bench/pytorch_convert.py hf2nemo "$src" "$work/py.nemo" --tp $tp --tokenizer "$tok"
measure "PyTorch .nemo TP-$tp → HF" "$work/py_back" -- "$py" bench/pytorch_convert.py nemo2hf "$work/py.nemo" "$work/py_back"
rm -f "$work/py.nemo"
if same_as_source "$work/py_back"; then checks+=("PyTorch round trip HF → .nemo TP-$tp → HF: bit-identical ($ntensors tensors)")
else checks+=("PyTorch round trip HF → .nemo TP-$tp → HF: **DIFFERS**"); fi
rm -rf "$work/py_back"

# --- report -------------------------------------------------------------------------------------
cp_s=${wall_s["cp -r (same bytes)"]}
rss_limit=$(( $(mib $largest) * 2 + 256 ))
cpu=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo 2>/dev/null || echo unknown)
{
    echo "## convert: $preset${layers:+ ($layers layers)}, $(mib $bytes) MiB in $ntensors tensors"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores ($cpu), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM," \
        "commit $(git rev-parse --short HEAD 2>/dev/null || echo ?)$(git diff --quiet 2>/dev/null || echo -dirty)," \
        "\`bash bench/convert.sh $*\`, RUNS=$runs ($([[ $runs == 1 ]] && echo 'single run per step' || echo "median of $runs"))"
    echo
    echo "| step | wall s | ratio vs cp | peak RSS MiB |"
    echo "|---|---|---|---|"
    for n in "${order[@]}"; do
        printf '| %s | %s | %s | %s |\n' "$n" "${wall_s[$n]}" \
            "$(awk -v a="${wall_s[$n]}" -v b="$cp_s" 'BEGIN { printf (b > 0 ? "%.2f" : "-"), a / b }')" "${rss_mib[$n]}"
    done
    echo
    h2n=${wall_s["shardsmith HF → .nemo TP-$tp"]}; n2h=${wall_s["shardsmith .nemo TP-$tp → HF"]}
    cpn=${wall_s["cp of the TP-$tp .nemo (floor of the second leg)"]}
    echo "- shardsmith vs the cp of its own input: HF → .nemo $(awk -v a="$h2n" -v b="$cp_s" 'BEGIN{printf "%.2f", a/b}')× cp of the HF files," \
        ".nemo → HF $(awk -v a="$n2h" -v b="$cpn" 'BEGIN{printf "%.2f", a/b}')× cp of the .nemo"
    p2n=${wall_s["PyTorch HF → .nemo TP-$tp"]}; pn2h=${wall_s["PyTorch .nemo TP-$tp → HF"]}
    echo "- speed-up over PyTorch: HF → .nemo $(awk -v a="$p2n" -v b="$h2n" 'BEGIN{printf "%.1f", a/b}')×," \
        ".nemo → HF $(awk -v a="$pn2h" -v b="$n2h" 'BEGIN{printf "%.1f", a/b}')× (targets: ≤ 1.3× cp, ≥ 5× PyTorch)"
    echo "- RSS target for shardsmith: ≤ 2 × largest tensor ($(mib $largest) MiB) + 256 MiB = $rss_limit MiB"
    for c in "${checks[@]}"; do echo "- $c"; done
} >"$table.tmp"
mv "$table.tmp" "$table"
echo
cat "$table"
if printf '%s\n' "${checks[@]}" | grep -q '\*\*'; then exit 1; fi
