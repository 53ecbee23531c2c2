#!/usr/bin/env bash
# A decode step's kernels on the GPU's own clock, in one device call after tools/device/build.sh: the bench with
# every kernel's blocks recorded (PIPEMOE_TRACE=1: the kernels are compiled with their records, another cache
# entry, ~1-2 minutes on a fresh machine), then tools/device/trace_summary.py over the one-stream and the
# batched steps. The records cost a timer read per thread and an atomic per block: compare the bench's ms/step
# with an untraced run before reading small differences. Logs and the CSVs go to $OUT.
# Usage: tools/device/trace.sh [layers] [context] [streams]   (default 2 4096 32; streams 0: one stream only)
set -uo pipefail
cd "$(dirname "$0")/../.."
. tools/device/env.sh
layers="${1:-2}" ctx="${2:-4096}" streams="${3:-32}"
logs="${OUT:-/tmp/pipemoe-trace}"
mkdir -p "$logs"
PIPEMOE_TRACE=1 timeout 420 ./.device/pipemoe bench --layers "$layers" --context "$ctx" --steps 8 \
    --streams "$streams" --cache-dir /tmp/pb --trace "$logs/trace.csv" > "$logs/bench-trace.txt" 2>&1 ||
    { tail -5 "$logs/bench-trace.txt"; exit 1; }
grep -E '^bench: (decode|trace|[0-9]+ streams)' "$logs/bench-trace.txt"
for f in "$logs/trace.csv" "$logs/trace.streams.csv"; do
    [ -f "$f" ] && python3 tools/device/trace_summary.py "$f" > "${f%.csv}-summary.txt" 2>&1
done
# The tables last (the call's reply carries the end of its output): the batched step's, then the one-stream's.
[ -f "$logs/trace.streams-summary.txt" ] && head -60 "$logs/trace.streams-summary.txt"
cat "$logs/trace-summary.txt"
