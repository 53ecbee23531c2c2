#!/usr/bin/env python3
"""A launch's blocks by phase, from `pipemoe bench --trace FILE` (tools/device/trace.sh): for every launch of the
kernels whose name matches a regex, each phase's first and last start, last end and median block time (µs from the
launch's first block), and the first wave's (the first `--wave` blocks to start) times against the later blocks'.
Phases are ranges of the block index: a fused launch's halves (gptq_mma_moe_row: gate/up blocks first, then down;
blocks take their tickets in start order, which follows the index closely enough to read phases by it).

Usage: tools/device/trace_phases.py TRACE.csv[.gz] REGEX [--phases name:lo-hi,...] [--wave N]
  e.g. tools/device/trace_phases.py trace.csv.gz moe_row --phases gu:0-1152,down:1152-1656,next:1656-9999 --wave 528
"""
import argparse
import collections
import re
import statistics as st

from trace_summary import load, runs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("kernel")
    ap.add_argument("--phases", default="all:0-100000000")
    ap.add_argument("--wave", type=int, default=0)
    a = ap.parse_args()
    phases = []
    for p in a.phases.split(","):
        name, span = p.split(":")
        lo, hi = span.split("-")
        phases.append((name, int(lo), int(hi)))
    by_kernel = collections.defaultdict(list)
    for kernel, blocks, block, sm, start, end in load(a.trace):
        if re.search(a.kernel, kernel):
            by_kernel[(kernel, blocks)].append((kernel, blocks, block, sm, start, end))
    for (name, blocks), rows in sorted(by_kernel.items()):
        print(name)
        for launch in runs(rows, blocks):
            launch = [(b, sm, s, e) for _, _, b, sm, s, e in launch]
            t0 = min(r[2] for r in launch)
            us = lambda v: (v - t0) / 1e3
            parts = []
            for pname, lo, hi in phases:
                blocks = [r for r in launch if lo <= r[0] < hi]
                if not blocks:
                    continue
                med = st.median((r[3] - r[2]) / 1e3 for r in blocks)
                parts.append(f"{pname}: start {us(min(r[2] for r in blocks)):5.1f}-{us(max(r[2] for r in blocks)):5.1f}"
                             f" end {us(max(r[3] for r in blocks)):5.1f} med {med:5.2f}")
            line = "  " + " | ".join(parts)
            if a.wave:
                first = sorted(launch, key=lambda r: r[2])[: a.wave]
                later = sorted(launch, key=lambda r: r[2])[a.wave:]
                ends = sorted(us(r[3]) for r in first)
                line += (f" || first {len(first)}: ends {ends[0]:.1f}/{ends[len(ends) // 2]:.1f}/{ends[-1]:.1f}"
                         f" (min/med/max), dur med {st.median((r[3] - r[2]) / 1e3 for r in first):.2f}")
                if later:
                    line += f"; later dur med {st.median((r[3] - r[2]) / 1e3 for r in later):.2f}"
            print(line)


if __name__ == "__main__":
    main()
