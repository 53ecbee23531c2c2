#!/usr/bin/env bash
# Where a decode step's time goes between its kernels, in one device call after tools/device/build.sh: the
# one-layer bench's step as CUDA graphs (no profiler), then ncu's duration of every pipemoe kernel of a few decode
# steps (graph nodes one by one, caches and clocks left alone), summed per step. What the step takes beyond its
# kernels' sum is launch gaps and tails: the part that fusing launches wins back (docs/PERF.md, session 9).
# Usage: [CHUNK=rows] tools/device/kernel-times.sh [context] [layers]   (default 1024 1, chunks of 64; prints a
# table last; logs in $OUT)
set -uo pipefail
cd "$(dirname "$0")/../.."
. tools/device/env.sh
ctx="${1:-1024}" layers="${2:-1}" chunk="${CHUNK:-64}"
logs="${OUT:-/tmp/pipemoe-kernel-times}"
mkdir -p "$logs"
# Prefill in 64-row chunks by default (the grouped GEMV path: ~20–40 launches a layer and chunk; CHUNK=512 takes
# the prefill GEMMs, fewer launches, when only the decode steps matter). ncu takes every pipemoe
# kernel from the start (no skip to guess: session 10's landed in the prefill) up to a count past the prefill and a
# dozen decode steps; the analysis below finds the decode steps by their single-row kernels.
bench=(./.device/pipemoe bench --layers "$layers" --context "$ctx" --chunk "$chunk" --steps 12 --streams 0 --cache-dir /tmp/pb)
"${bench[@]}" > "$logs/bench.txt" 2>&1 || { tail -5 "$logs/bench.txt"; exit 1; }
step_ms=$(grep -oP 'bench: decode \K[0-9.]+(?= ms/step)' "$logs/bench.txt" | head -1)
count=$(( (ctx / chunk + 1) * layers * 60 + 12 * layers * 30 ))
# ncu's --kernel-name matches every launch counted by --launch-skip: only pipemoe's own kernels (not cuBLAS's,
# whose splitKreduce_kernel a bare `split` would match).
timeout 400 ncu --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv \
    --kernel-name 'regex:^(add_|cache_|dense_|embed_|experts_|gptq_|indexer_|layer_norm|mla_|rms_|rope_|route|scale_|silu_|copy_rows)' \
    --launch-count "$count" "${bench[@]}" > "$logs/ncu.csv" 2> "$logs/ncu.err"
python3 - "$logs/ncu.csv" "$step_ms" "$layers" <<'EOF'
import collections, csv, sys
path, step_ms, layers = sys.argv[1], float(sys.argv[2] or 0), int(sys.argv[3])
rows = [r for r in csv.reader(open(path)) if len(r) > 14]
if not rows:
    sys.exit("ncu wrote no rows (see ncu.err)")
h = rows[0]
ki, vi, ui = h.index("Kernel Name"), h.index("Metric Value"), h.index("Metric Unit")
scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}
seq = [(r[ki].split("(")[0].strip(), float(r[vi].replace(",", "")) * scale.get(r[ui], 1e-3)) for r in rows[1:]]
# The single-row absorption runs once per layer of a one-row step and nowhere in a prefill: whole decode steps are
# the kernels from one to the one `layers` later (mla_absorb_q_r1 with a dense kv_b, mla_absorb_q_w<bits> with the
# quantized one). The first two steps (warm-up) are left out.
one_row = ("mla_absorb_q_r1", "mla_absorb_q_w")
marks = [i for i, (k, _) in enumerate(seq) if k.startswith(one_row)][2 * layers:]
if len(marks) <= layers:
    sys.exit("fewer than two decode steps among the profiled kernels: raise the launch count")
whole = min(len(marks) - 1, 8 * layers) // layers * layers
lengths = {marks[i + layers] - marks[i] for i in range(0, whole, layers)}
if len(lengths) > 1:
    sys.exit(f"the decode steps found hold different kernel counts {sorted(lengths)}: not one run of steps")
seq = seq[marks[0]:marks[whole]]
steps = whole / layers
per = collections.defaultdict(lambda: [0, 0.0])
for k, d in seq:
    per[k][0] += 1
    per[k][1] += d
print(f"{'kernel':<44} {'calls/step':>10} {'us/call':>8} {'us/step':>8}")
total = 0.0
for k, (n, d) in sorted(per.items(), key=lambda kv: -kv[1][1]):
    total += d / steps
    print(f"{k[:44]:<44} {n / steps:>10.2f} {d / n:>8.2f} {d / steps:>8.1f}")
launches = sum(n for n, _ in per.values()) / steps
print(f"kernels per step {launches:.1f}, their sum {total:.1f} us over {steps:.1f} steps")
if step_ms:
    gap = step_ms * 1000 - total
    print(f"decode step as CUDA graphs {step_ms * 1000:.1f} us: {gap:.1f} us ({100 * gap / (step_ms * 1000):.0f}%) "
          f"beyond the kernels, {gap / max(launches, 1):.2f} us per launch")
EOF
