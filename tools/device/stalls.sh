#!/usr/bin/env bash
# Why a decode step's kernels take the time they do, in one device call after tools/device/build.sh: ncu's full
# set (throughput, warp states, scheduler, source-level stall samples with line info) on the last decode step's
# launches of the kernels matching REGEX in the one-layer bench, one row, caches and clocks left alone.
# Pass 1 lists every matching launch (name, grid) to find the decode step's; pass 2 profiles those.
# Usage: [CACHE=all|none] tools/device/stalls.sh [REGEX] [context]   (default gptq_mma_gemv, 4096; prints a table
# last; the details, the per-instruction source page of each kernel and the report go to $OUT)
# CACHE (ncu's --cache-control of pass 2, default all): the full set replays each kernel for its many passes, and
# with the caches left alone (none) a kernel whose bytes fit in L2 reads them from L2 after the first pass — its
# duration and DRAM figures are then not the serving path's (session 28's runs, made with none: the fused q_a/kv_a
# GEMV showed 0.15% DRAM throughput). `all` flushes them before each pass, as an 8-layer decode step finds them.
set -uo pipefail
cd "$(dirname "$0")/../.."
. tools/device/env.sh
re="${1:-gptq_mma_gemv}" ctx="${2:-4096}"
logs="${OUT:-/tmp/pipemoe-stalls}"
mkdir -p "$logs"
# --decode-only: the decode steps are the run's last launches. Without it the per-block rows came last, and session
# 48's profile of three kernels found the MoE-block row's launches as the repeating tail and took only those.
bench=(./.device/pipemoe bench --layers 1 --context "$ctx" --chunk 512 --steps 6 --streams 0 --decode-only --cache-dir /tmp/pb)
export PIPEMOE_NVRTC_LINEINFO=1
"${bench[@]}" > "$logs/bench.txt" 2>&1 || { tail -5 "$logs/bench.txt"; exit 1; }
timeout 300 ncu --clock-control none --cache-control none --kernel-name "regex:$re" \
    --metrics gpu__time_duration.sum,launch__grid_size --csv "${bench[@]}" > "$logs/list.csv" 2> "$logs/list.err"
# The decode step's launches: one-row launches come last; take the last step's (the kernels after the last
# occurrence of the first kernel name that repeats with the same grid every step).
read -r skip count < <(python3 - "$logs/list.csv" <<'EOF'
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 14]
h = rows[0]
ki, mi, vi = h.index("Kernel Name"), h.index("Metric Name"), h.index("Metric Value")
launches = {}
for r in rows[1:]:
    launches.setdefault(int(r[h.index("ID")]), {})[r[mi]] = r[vi]
    launches[int(r[h.index("ID")])]["name"] = r[ki].split("(")[0]
seq = [(launches[i]["name"], launches[i]["launch__grid_size"]) for i in sorted(launches)]
# The decode step's signature: the last 30 launches' period.
for period in range(1, 30):
    if len(seq) >= 3 * period and seq[-period:] == seq[-2 * period:-period] == seq[-3 * period:-2 * period]:
        print(len(seq) - period, period)
        break
else:
    print(len(seq) - 5, 5)
EOF
)
echo "profiling launches $skip..$((skip + count - 1)) of those matching $re"
timeout 400 ncu --clock-control none --cache-control "${CACHE:-all}" --kernel-name "regex:$re" --launch-skip "$skip" \
    --launch-count "$count" --set full --import-source no -f -o "$logs/stalls" "${bench[@]}" > "$logs/ncu.log" 2>&1
ncu -i "$logs/stalls.ncu-rep" --page details --csv > "$logs/details.csv"
ncu -i "$logs/stalls.ncu-rep" --page source --csv --print-source sass > "$logs/source.csv" 2> "$logs/source.err"
python3 "$(dirname "$0")/ncu_summary.py" "$logs/details.csv" "$logs/source.csv"
