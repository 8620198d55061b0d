#!/usr/bin/env bash
# The GPU run in one command: run_all.sh into a local folder, then its results packed into
# at most 8 files, 2 folders deep, in $OUT (for a machine whose results are copied back).
#
#   OUT=/path/to/results bash bench/gpu/pack_run.sh [run_all.sh options]
#
# Brings back: run.tgz (everything but traces), traces.tgz (torch.profiler traces),
# summary.md and run.log, unpacked here with `tar xzf` into bench/results/<device>/.
set -uo pipefail
cd "$(dirname "$0")/../.."
BACK=${OUT:?set OUT to the folder that comes back}
WORK=$(mktemp -d /tmp/fusedpar-run.XXXX)
export PYTHONUNBUFFERED=1
OUT="$WORK/run" bash bench/gpu/run_all.sh "$@" 2>&1 | tee "$BACK/run.log"
tar czf "$BACK/run.tgz" -C "$WORK" --exclude='*trace*.json' run
tar czf "$BACK/traces.tgz" -C "$WORK" --wildcards --no-anchored 'run/*trace*.json' 2>/dev/null \
    || tar czf "$BACK/traces.tgz" -C "$WORK" run/timeline/trace.json 2>/dev/null || true
cp "$WORK/run/summary.md" "$BACK/summary.md" 2>/dev/null || true
ls -la "$BACK"
