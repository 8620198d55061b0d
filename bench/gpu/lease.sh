#!/usr/bin/env bash
# The one command for a lent GPU machine (the device tool's `run`): run_all.sh into a local
# folder, then pack it for the trip back, which takes at most 8 files, 2 folders deep.
#
#   bash bench/gpu/lease.sh [run_all.sh options]     # $OUT: the tool's folder that comes back
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
