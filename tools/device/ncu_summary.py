#!/usr/bin/env python3
"""ncu's report of a few launches in short (tools/device/stalls.sh, ncu-streams.sh): each kernel's headline figures
from the details page, then where its warps wait from the source page's stall samples, its instructions grouped by
how often each ran (the hot loop runs once a chunk a warp, a block's start and end once a warp, ...).
Usage: ncu_summary.py details.csv [source.csv]"""
import collections
import csv
import sys


def details(path):
    rows = [r for r in csv.reader(open(path))]
    h = rows[0]
    ii, ki, ni, ui, vi = (h.index(c) for c in ("ID", "Kernel Name", "Metric Name", "Metric Unit", "Metric Value"))
    want = ["Duration", "DRAM Throughput", "Memory Throughput", "Compute (SM) Throughput", "Issue Slots Busy",
            "No Eligible", "Active Warps Per Scheduler", "Eligible Warps Per Scheduler", "Achieved Occupancy",
            "Warp Cycles Per Issued Instruction", "Executed Ipc Active", "Registers Per Thread", "Grid Size",
            "Dynamic Shared Memory Per Block", "Waves Per SM"]
    by = {}
    for r in rows[1:]:
        by.setdefault((r[ii], r[ki].split("(")[0]), {})[r[ni]] = f"{r[vi]} {r[ui]}".strip()
    for (i, k), m in by.items():
        print(f"== {i} {k}")
        for w in want:
            if w in m:
                print(f"   {w:<36} {m[w]}")


def source(path):
    blocks, cur = [], []
    for line in open(path).read().split("\n"):
        if line.startswith('"Kernel Name"'):
            if cur: blocks.append(cur)
            cur = [line]
        elif cur:
            cur.append(line)
    if cur: blocks.append(cur)
    seen = set()
    for b in blocks:
        rows = list(csv.reader(b[1:]))
        if not rows or "Address" not in rows[0]: continue
        h, body = rows[0], [r for r in rows[1:] if len(rows[0]) == len(r)]
        key = "\n".join(line for line in b[1:] if line.strip())
        if key in seen: continue  # ncu's source page can list a kernel twice
        seen.add(key)
        S, E = h.index("Warp Stall Sampling (All Samples)"), h.index("Instructions Executed")
        stalls = [c for c in h if c.startswith("stall_") and "Not Issued" not in c]
        by = collections.defaultdict(lambda: [0, 0.0, collections.Counter()])
        for r in body:
            g = by[int(float(r[E] or 0))]
            g[0] += 1; g[1] += float(r[S] or 0)
            for c in stalls: g[2][c[6:]] += float(r[h.index(c)] or 0)
        tot = sum(g[1] for g in by.values()) or 1
        print("==", b[0].split(",")[1].strip('"'), f"{tot:.0f} samples")
        for e, (n, smp, c) in sorted(by.items(), key=lambda kv: -kv[1][1])[:8]:
            top = " ".join(f"{k}:{v:.0f}" for k, v in c.most_common(6))
            print(f"   ran {e:>8}: {n:4} instructions, {smp:6.0f} samples ({100 * smp / tot:4.1f}%)  {top}")


if __name__ == "__main__":
    details(sys.argv[1])
    if len(sys.argv) > 2:
        try:
            source(sys.argv[2])
        except (OSError, ValueError, IndexError) as e:  # a report without a source page
            print(f"no stall samples: {e}")
