#!/usr/bin/env bash
# Where a many-stream decode step's time goes, in one device call after tools/device/build.sh: ncu's duration of
# every pipemoe kernel of the one-layer bench (each stream's prefill one chunk, so the launches stay ~2,000), the
# last two many-stream steps' kernels summed by name (the profile's `gpu us` at many streams is event to event and
# takes in the host's issuing: this is the kernels alone), then ncu's full set on the last launch of the kernels
# matching REGEX (a many-stream step's), with the stall table of tools/device/stalls.sh.
# Usage: tools/device/ncu-streams.sh [REGEX] [streams] [context]   (default mla_flash, 32, 4096; logs in $OUT, a
# table last). GRID=N: the last launch matching REGEX with a grid of N blocks (a many-stream step's, where the
# one-row steps' launches of the same kernel come later).
set -uo pipefail
cd "$(dirname "$0")/../.."
. tools/device/env.sh
re="${1:-mla_flash}" streams="${2:-32}" ctx="${3:-4096}"
logs="${OUT:-/tmp/pipemoe-ncu-streams}"
mkdir -p "$logs"
bench=(./.device/pipemoe bench --layers 1 --context "$ctx" --chunk "$ctx" --steps 2 --streams "$streams"
    --cache-dir /tmp/pb)
"${bench[@]}" > "$logs/bench.txt" 2>&1 || { tail -5 "$logs/bench.txt"; exit 1; }
all='regex:^(add_|cache_|dense_|embed_|experts_|gptq_|indexer_|layer_norm|mla_|rms_|rope_|route|router_|scale_|silu_|copy_rows)'
timeout 300 ncu --clock-control none --cache-control none --metrics gpu__time_duration.sum,launch__grid_size --csv \
    --kernel-name "$all" "${bench[@]}" > "$logs/list.csv" 2> "$logs/list.err"
GRID="${GRID:-}" python3 - "$logs/list.csv" "$re" "$logs/skip.txt" > "$logs/table.txt" <<'EOF'
import collections, csv, os, re, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 14]
h = rows[0]
ii, ki, mi, vi = (h.index(c) for c in ("ID", "Kernel Name", "Metric Name", "Metric Value"))
launch = {}
for r in rows[1:]:
    d = launch.setdefault(int(r[ii]), {"name": r[ki].split("(")[0]})
    d[r[mi]] = float(r[vi].replace(",", ""))
ids = sorted(launch)
pat, grid = re.compile(sys.argv[2]), os.environ.get("GRID")
hits = [k for k, i in enumerate(ids)
        if pat.search(launch[i]["name"]) and (not grid or int(launch[i]["launch__grid_size"]) == int(grid))]
if len(hits) < 2:
    print(f"{len(hits)} launches match: no step between two of them", file=sys.stderr)
    sys.exit(1)
# One layer: a step runs from one matching launch to the next.
step = ids[hits[-2]:hits[-1]]
tot = collections.defaultdict(lambda: [0, 0.0])
for i in step:
    d = launch[i]
    t = tot[(d["name"], int(d["launch__grid_size"]))]
    t[0] += 1
    t[1] += d["gpu__time_duration.sum"] / 1e3
s = sum(v[1] for v in tot.values())
print(f"a step (launches {hits[-2]}..{hits[-1] - 1}): {len(step)} launches, kernels' sum {s:.1f} us (ncu durations)")
print(f"{'kernel':<52} {'grid':>7} {'calls':>5} {'us':>9} {'%':>6}")
for (n, g), (c, us) in sorted(tot.items(), key=lambda kv: -kv[1][1]):
    print(f"{n[:52]:<52} {g:>7} {c:>5} {us:>9.1f} {100 * us / s:>5.1f}%")
last = hits[-1]
open(sys.argv[3], "w").write(str(last))
EOF
cat "$logs/table.txt"
skip=$(cat "$logs/skip.txt" 2>/dev/null || echo -1)
[ "$skip" -ge 0 ] 2>/dev/null || { echo "no launch matches $re"; exit 1; }
echo "full set on launch $skip of the pipemoe kernels (the last matching $re)"
timeout 300 ncu --clock-control none --cache-control all --kernel-name "$all" --launch-skip "$skip" --launch-count 1 \
    --set full --import-source no -f -o "$logs/full" "${bench[@]}" > "$logs/ncu.log" 2>&1
ncu -i "$logs/full.ncu-rep" --page details --csv > "$logs/details.csv"
ncu -i "$logs/full.ncu-rep" --page source --csv --print-source sass > "$logs/source.csv" 2> "$logs/source.err"
python3 tools/device/ncu_summary.py "$logs/details.csv" "$logs/source.csv"
