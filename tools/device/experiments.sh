#!/usr/bin/env bash
# The open tuning questions of docs/PERF.md ("Next"), answered in one device call after tools/device/build.sh:
# each setting's timings side by side, a short table last. Runs on the GPU machine; logs go to $OUT.
#   1. GEMV blocks per SM: the 8-row kernels as built (MMA_MIN_BLOCKS=1) against -DMMA_MIN_BLOCKS=5
#      (bench_gemv's Mma rows at batch 1 and 4, and bench_experts).
#   2. Flash key shares: PIPEMOE_FLASH_MIN_SPLIT_KEYS 64 / 128 / 256 (2-layer decode bench with --profile:
#      flash and mla_out per layer, the decode step).
#   3. The prefill GEMM (device_gemm's bench).
# Usage: tools/device/experiments.sh [1 2 3]   (default: all)
set -uo pipefail
cd "$(dirname "$0")/../.."
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export PIPEMOE_KERNEL_CACHE="${PIPEMOE_KERNEL_CACHE:-/tmp/pipemoe-cubin}" PIPEMOE_MODELS_DIR="$PWD/data/models"
[ -f .device/set.tgz ] && tar xzf .device/set.tgz -C .device && rm .device/set.tgz
logs="${OUT:-/tmp/pipemoe-experiments}"
mkdir -p "$logs"
want() { [ $# -eq 0 ] || [[ " $* " == *" $1 "* ]]; }
summary=()
if want 1 "$@"; then
    for blocks in 1 5; do
        # 1 is the default build (its cubins are cached from the test run); 5 recompiles every file it loads.
        if [ "$blocks" = 1 ]; then unset PIPEMOE_NVRTC_DEFINES; else export PIPEMOE_NVRTC_DEFINES="-DMMA_MIN_BLOCKS=$blocks"; fi
        timeout 240 ./.device/device --ignored bench_gemv --nocapture > "$logs/gemv-blocks$blocks.log" 2>&1
        timeout 150 ./.device/device_ops --ignored bench_experts --nocapture > "$logs/experts-blocks$blocks.log" 2>&1
        summary+=("MMA_MIN_BLOCKS=$blocks: $(grep -hE 'o_proj .* Mma +1 ' "$logs/gemv-blocks$blocks.log" | awk '{print "o_proj b1", $(NF-2), "us"}') \
$(grep -hE '^top-' "$logs/experts-blocks$blocks.log" | head -2 | tr '\n' ' ')")
    done
    unset PIPEMOE_NVRTC_DEFINES
fi
if want 2 "$@"; then
    for keys in 64 128 256; do
        PIPEMOE_FLASH_MIN_SPLIT_KEYS=$keys timeout 120 ./.device/pipemoe bench --layers 2 --context 1024 --steps 16 \
            --streams 8 --cache-dir /tmp/pb --profile > "$logs/flash-keys$keys.log" 2>&1
        summary+=("flash min keys $keys: $(grep -hE 'decode [0-9.]+ ms/step' "$logs/flash-keys$keys.log" | head -1) \
$(grep -hE '^mla (flash|out)' "$logs/flash-keys$keys.log" | awk '{printf "%s %s %s us/%s; ", $1, $2, $(NF-2), $(NF-3)}')")
    done
fi
if want 3 "$@"; then
    timeout 200 ./.device/device_gemm --ignored bench_gemm --nocapture > "$logs/gemm.log" 2>&1
    summary+=("gemm: see gemm.log ($(grep -c . "$logs/gemm.log") lines)")
fi
printf '%s\n' "${summary[@]}"
