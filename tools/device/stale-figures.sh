#!/usr/bin/env bash
# Issue 6's occasional figures in one device call after tools/device/build.sh: the ratio to HF transformers
# (4 layers, 1K context), bench_gemv on the tensor-core path (batch 1/4/8/16) and a one-row layer by kernel
# (ncu, tools/device/kernel-times.sh). Logs and JSON go to $OUT (8 files); a short summary is printed last.
set -u
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/pipemoe-stale}"
mkdir -p "$OUT"
. tools/device/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
t0=$SECONDS
./.device/pipemoe bench --layers 4 --context 1024 --steps 16 --streams 0 --cache-dir /tmp/pb \
    --json "$OUT/hf-pipemoe4.json" > "$OUT/hf-pipemoe4.txt" 2>&1
python3 tools/device/hf_baseline.py --model "$(ls -d /tmp/pb/dsv32-random-l3-7-* | head -1)" --layers 3 7 \
    --context 1024 --steps 8 --pipemoe-json "$OUT/hf-pipemoe4.json" --json "$OUT/hf.json" > "$OUT/hf.txt" 2>&1
echo "hf done $((SECONDS - t0)) s"
PIPEMOE_BENCH_PATHS=mma PIPEMOE_BENCH_OUT="$OUT/gemv.json" ./.device/device --ignored bench_gemv --nocapture \
    > "$OUT/gemv.txt" 2>&1
echo "gemv done $((SECONDS - t0)) s"
CHUNK=512 OUT=/tmp/kt timeout 300 tools/device/kernel-times.sh 4096 1 > "$OUT/kt.txt" 2>&1
echo "kernel times done $((SECONDS - t0)) s"
tar czf "$OUT/cubin.tgz" -C "$PIPEMOE_KERNEL_CACHE" . 2>/dev/null
tail -3 "$OUT/hf.txt"
grep -E "o_proj|q_b|gate" "$OUT/gemv.txt" | tail -20
tail -30 "$OUT/kt.txt"
