#!/usr/bin/env bash
# The tensor-core GEMV's launch tuning swept in one device call (docs/CUDA.md): per setting "warps_per_sm stages
# smem_kib" (PIPEMOE_GEMV_*), the Mma rows of `device --ignored bench_gemv` and the routed experts of
# `device_ops --ignored bench_experts` (the grouped launches share the GEMV's block), on the GPU machine.
# Usage: tools/device/sweep-gemv.sh "8 8 44" "16 8 44" "8 4 44" "16 4 96"
set -uo pipefail
cd "$(dirname "$0")/../.."
. tools/device/env.sh
[ -x .device/device ] && [ -x .device/device_ops ] || { echo "no .device/ binaries: run tools/device/build.sh here" >&2; exit 2; }
for cfg in "$@"; do
    read -r w s k <<< "$cfg"
    echo "== warps_per_sm=$w stages=$s smem_kib=$k"
    export PIPEMOE_GEMV_WARPS_PER_SM=$w PIPEMOE_GEMV_STAGES=$s PIPEMOE_GEMV_SMEM_KIB=$k
    timeout 120 ./.device/device --ignored bench_gemv --nocapture 2>&1 | grep -E "Mma|ignoring"
    timeout 120 ./.device/device_ops --ignored bench_experts --nocapture 2>&1 | grep -E "^top-"
done
