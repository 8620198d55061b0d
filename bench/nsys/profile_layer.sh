#!/usr/bin/env bash
# Capture one `python -m fusedpar profile --gpu` run with Nsight Systems.
#
#   bench/nsys/profile_layer.sh [REPORT_PREFIX] [extra `fusedpar profile` options...]
#   e.g. bench/nsys/profile_layer.sh traces/mlp-8k --shape 8192 14336 4096 --chunks 4
#
# Only the steps after warm-up are captured: the profile command brackets them with
# cudaProfilerStart/Stop, which --capture-range=cudaProfilerApi listens for.
# Writes REPORT_PREFIX.nsys-rep and REPORT_PREFIX-stats.txt (NVTX + kernel summaries).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
prefix=${1:-traces/fusedpar-profile}
shift || true
mkdir -p "$(dirname "$prefix")"
if ! command -v nsys >/dev/null 2>&1; then
    echo "nsys not found; falling back to a torch.profiler trace in $(dirname "$prefix")" >&2
    PYTHONPATH=$PWD "$PYTHON" -m fusedpar profile --gpu --torch-trace \
        --out "$(dirname "$prefix")" "$@"
    exit 0
fi
nsys profile -t cuda,nvtx --capture-range=cudaProfilerApi --capture-range-end=stop \
    --force-overwrite=true -o "$prefix" \
    env PYTHONPATH="$PWD" "$PYTHON" -m fusedpar profile --gpu "$@"
# Report names changed in nsys 2023.x (nvtxsum -> nvtx_sum, gpukernsum -> cuda_gpu_kern_sum).
nsys stats --force-export=true --report nvtx_sum,cuda_gpu_kern_sum \
    "$prefix.nsys-rep" >"$prefix-stats.txt" 2>&1 \
    || nsys stats --force-export=true --report nvtxsum,gpukernsum \
        "$prefix.nsys-rep" >"$prefix-stats.txt" 2>&1 \
    || echo "nsys stats failed (see $prefix-stats.txt)" >&2
echo "report: $prefix.nsys-rep; summaries: $prefix-stats.txt"
