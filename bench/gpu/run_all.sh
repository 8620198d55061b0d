#!/usr/bin/env bash
# Issue #8: everything the GPU machine should measure, in one command, < 10 minutes.
#
#   bench/gpu/run_all.sh [--dry-run] [--quick] [--only step1,step2]
#
# The GPU machine has torch + triton in its own python3 and no internet: nothing is
# installed, PYTHONPATH points at this checkout. Results go to ${OUT:-bench/results/gpu-run}:
# per-step logs, bench JSON/CSV/PNG, calibration, traces and summary.md.
# Each step runs under `timeout` and a failure is recorded, not fatal, so one stuck
# step cannot eat the others' time. Steps: env gpu-kernel-tests gpu-tests graph-decode gemm
# fp8-overlap overlap-emulated calibrate predict timeline profile (then the summary always runs); a step
# the budget cannot reach is recorded as skipped: rerun it alone with --only. The gloo suites
# (bench/test_overlap.py, bench/test_layers.py) measure CPU ranks: run them on the CPU machine.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PY=${PYTHON:-python3}
OUT=${OUT:-bench/results/gpu-run}
BUDGET_S=${BUDGET_S:-545}   # whole run; one command on the GPU machine may run 600 s
RESERVE_S=20                # kept back for the summary
DRY=0 QUICK=() ONLY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --quick) QUICK=(--quick) ;;
        --only) ONLY=",$2,"; shift ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
STEPS="$OUT/steps.tsv"
printf 'step\tstatus\trc\tseconds\tlog\tcommand\n' >"$STEPS"
if "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    HAS_CUDA=1
else
    HAS_CUDA=0
    # No GPU (a CPU rehearsal): Triton kernels can only run interpreted.
    export TRITON_INTERPRET=1
fi

# step NAME TIMEOUT_S CMD...: run CMD with its output in logs/NAME.log, record the outcome.
step() {
    local name=$1 limit=$2; shift 2
    local cmd="$*"
    if [ -n "$ONLY" ] && [[ "$ONLY" != *",$name,"* ]]; then return 0; fi
    local left=$((BUDGET_S - SECONDS - RESERVE_S))
    [ "$limit" -gt "$left" ] && limit=$left
    local log="logs/$name.log" status rc=0 t0=$SECONDS
    if [ "$DRY" = 1 ]; then
        status="dry-run"
        echo "== $name (dry run): $cmd"
    elif [ "$limit" -lt 5 ]; then
        status="skipped (out of time)"
    else
        echo "== $name (limit ${limit}s): $cmd"
        timeout --kill-after=10 "$limit" "$@" >"$OUT/$log" 2>&1
        rc=$?
        case $rc in
            0) status=ok ;;
            5) status="no tests selected" ;;  # pytest's code for an empty selection
            124|137) status="timeout after ${limit}s" ;;
            *) status="failed (rc $rc)" ;;
        esac
        tail -n 3 "$OUT/$log" | sed 's/^/   /'
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - t0))" "$log" "$cmd" >>"$STEPS"
    echo "   -> $status ($((SECONDS - t0)) s)"
}

# suites PATTERN: --suite options for the files matching bench/PATTERN (other branches add them).
suites() {
    local f
    for f in bench/$1; do [ -e "$f" ] && printf -- '--suite\n%s\n' "$f"; done
    return 0
}

env_info() {
    mkdir -p "$OUT/env"
    { nvidia-smi || echo "nvidia-smi: not available"; } >"$OUT/env/nvidia-smi.txt" 2>&1
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
        >"$OUT/env/gpu.csv" 2>/dev/null || true
    { command -v nsys && nsys --version; } >"$OUT/env/nsys.txt" 2>&1 || echo "nsys: not available" >"$OUT/env/nsys.txt"
    "$PY" - "$OUT/env/versions.json" <<'PYEOF'
import json, platform, sys, datetime
import torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "triton": tv, "host": platform.node(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None}
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info))
PYEOF
}

bench_step() {  # bench_step NAME LIMIT PATTERN...
    local name=$1 limit=$2 pattern found=()
    shift 2
    for pattern in "$@"; do mapfile -t -O "${#found[@]}" found < <(suites "$pattern"); done
    if [ ${#found[@]} -eq 0 ]; then
        step "$name" "$limit" echo "no suite matches bench/{$*} yet"
    else
        # Benchmarks starting after the budget are skipped, so pytest still ends in time
        # and writes the JSON of those that ran.
        local left=$((BUDGET_S - SECONDS - RESERVE_S))
        [ "$limit" -gt "$left" ] && limit=$left
        step "$name" "$limit" "$PY" -m fusedpar bench "${found[@]}" "${QUICK[@]}" \
            --budget-s $((limit * 2 / 3)) --out "$OUT/$name"
    fi
}

export OUT PY
export -f env_info
# Ordered by what only a GPU can tell; limits add up to ~575 s of the 545 s budget, so the
# profile step is the one a slow run loses (the timeline step's trace covers most of it).
step env 20 bash -c env_info
# Compiled, not interpreted, Triton (tests/conftest.py turns the interpreter on otherwise).
# The kernel matrix compiles ~300 specializations: 8 pytest-xdist workers compile in parallel.
XDIST=(); "$PY" -c 'import xdist' 2>/dev/null && XDIST=(-n 8)
step gpu-kernel-tests 100 env FUSEDPAR_COMPILED_TRITON=1 "$PY" -m pytest "${XDIST[@]}" \
    tests/kernels/test_gpu_kernels.py -q -p no:cacheprovider --timeout=90 --junitxml="$OUT/gpu-kernel-tests.xml"
# (includes tests/kernels/test_gpu_fp8.py: compiled fp8 GEMMs and quantization)
step gpu-tests 60 env FUSEDPAR_COMPILED_TRITON=1 "$PY" -m pytest -m gpu tests -q -p no:cacheprovider \
    --ignore=tests/kernels/test_gpu_kernels.py --timeout=45 --junitxml="$OUT/gpu-tests.xml"
# A decode step of a parallelized tiny Llama captured in a CUDA graph and replayed: same
# tokens as eager, ms per token eager vs graph (issue 27). Without CUDA: the eager half and
# a check that the step makes no host sync.
if [ "$HAS_CUDA" = 1 ]; then
    step graph-decode 40 "$PY" bench/gpu/graph_decode.py --out "$OUT/graph-decode"
else
    step graph-decode 40 "$PY" bench/gpu/graph_decode.py --cpu-smoke --new-tokens 4 --out "$OUT/graph-decode"
fi
# Parts in order problems, fp8 (fp8 vs bf16 TFLOP/s at the same shapes), epilogues, sweep:
# rows past its budget are recorded as skipped, so the tile sweep is what a short run loses.
if [ "$HAS_CUDA" = 1 ]; then
    step gemm 130 "$PY" bench/gpu/gemm_sweep.py --budget-s 105 --out "$OUT/gemm"
else
    step gemm 5 echo "no CUDA: bench/gpu/gemm_sweep.py needs a GPU"
fi
# fp8 vs bf16 all-gather + GEMM at the same shapes, over the emulated link (half the bytes).
if [ "$HAS_CUDA" = 1 ]; then
    step fp8-overlap 40 "$PY" bench/gpu/fp8_overlap.py --budget-s 28 --out "$OUT/fp8-overlap"
else
    step fp8-overlap 30 "$PY" bench/gpu/fp8_overlap.py --cpu-smoke --out "$OUT/fp8-overlap"
fi
# One GPU cannot move data between ranks: overlap measured against an emulated link.
# It starts no new case after 3/4 of its limit and writes its files after every case.
emu_limit=$((BUDGET_S - SECONDS - RESERVE_S - 110)); [ "$emu_limit" -gt 70 ] && emu_limit=70
if [ "$HAS_CUDA" = 1 ]; then
    step overlap-emulated "$emu_limit" "$PY" bench/gpu/overlap_emulated.py "${QUICK[@]}" \
        --budget-s $((emu_limit * 3 / 4)) --out "$OUT/overlap-emulated"
else
    step overlap-emulated "$emu_limit" "$PY" bench/gpu/overlap_emulated.py --cpu-smoke \
        --out "$OUT/overlap-emulated"
fi
step calibrate 30 "$PY" -m fusedpar bench --calibrate "${QUICK[@]}" --out "$OUT/calibrate"
step predict 10 "$PY" -m fusedpar bench --predict
# One overlapped SP MLP block, fwd+bwd, over the emulated link: a PNG with a row per stream.
if [ "$HAS_CUDA" = 1 ]; then
    step timeline 40 "$PY" bench/gpu/timeline.py --out "$OUT/timeline"
else
    step timeline 40 "$PY" bench/gpu/timeline.py --cpu-smoke --kernel torch --out "$OUT/timeline"
fi
if [ "$HAS_CUDA" = 1 ]; then
    step profile 30 env PYTHON="$PY" bench/nsys/profile_layer.sh "$OUT/profile/fusedpar"
else
    step profile 30 "$PY" -m fusedpar profile --out "$OUT/profile"
fi
RESERVE_S=0 ONLY="" DRY=0  # the summary runs even in a dry run: it is the plumbing
step summary 20 "$PY" bench/gpu/summarize.py "$OUT"
echo "summary: $OUT/summary.md"
