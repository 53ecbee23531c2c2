#!/usr/bin/env bash
# The open measurements of docs/PERF.md ("Next"), in one device call after tools/device/build.sh and the test
# call: each one's log in $OUT, a short table last. Runs on the GPU machine.
#   gemm  the prefill GEMM against cuBLAS (device_gemm's bench: m64 and m128 tiles at every prefill shape)
#   ipc   the activation hand-off alone (`pipemoe bench-ipc`; with a second GPU, also to device 1)
# Usage: tools/device/experiments.sh [gemm] [ipc]   (default: both)
# (Session 7 answered the earlier two: the 8-row GEMV at 5 blocks per SM is slower than at 4, flash's fewest keys
# per share stays 64; PERF.md "Session 7".)
set -uo pipefail
cd "$(dirname "$0")/../.."
. tools/device/env.sh
logs="${OUT:-/tmp/pipemoe-experiments}"
mkdir -p "$logs"
# want NAME ARGS...: whether NAME was asked for (every experiment when ARGS is empty).
want() { local name=$1; shift; [ $# -eq 0 ] || [[ " $* " == *" $name "* ]]; }
summary=()
if want gemm "$@"; then
    timeout 240 ./.device/device_gemm --ignored bench_gemm --nocapture > "$logs/gemm.log" 2>&1
    summary+=("gemm (mma % of cuBLAS by shape): $(grep -E '%$' "$logs/gemm.log" | awk '{printf "%s ", $NF}')")
fi
if want ipc "$@"; then
    # A cold kernel cache compiles first: allow for it.
    timeout 240 ./.device/pipemoe bench-ipc --iters 200 > "$logs/ipc.log" 2>&1
    summary+=("ipc, one GPU: $(tr -s ' ' < "$logs/ipc.log" | grep -E '^(round trip|data landed)' | tr '\n' ';')")
    if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
        timeout 240 ./.device/pipemoe bench-ipc --iters 200 --peer-device 1 > "$logs/ipc-2gpu.log" 2>&1
        summary+=("ipc, device 0 -> 1: $(tr -s ' ' < "$logs/ipc-2gpu.log" | grep -E '^(round trip|data landed)' | tr '\n' ';')")
    fi
fi
printf '%s\n' "${summary[@]}"
