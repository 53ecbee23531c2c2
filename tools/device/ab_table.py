"""The table of tools/device/ab-bins.sh: logs ab-{A,B}-{round}.txt of `pipemoe bench --profile` runs in a folder.

Per binary, the median over rounds of the decode steps (one stream and, when run, the streams) and of each
profiled op's µs a call, section by section (one-row decode, the prefill, the streams' decode), with B's change
against A; then each binary's spread over its rounds ((max − min) / median, %) and whether the two binaries' rounds
lie apart (every round of one below every round of the other: "apart"; "-" with fewer than 2 rounds each). A
change inside the spread of overlapping rounds is not evidence (PERF.md session 19: the 32-stream step moved ±4%
between binaries whose kernels all stayed within 2%). Usage: python3 tools/device/ab_table.py LOG_DIR ROUNDS
"""

import os
import re
import statistics
import sys

STEP = [
    ("decode ms/step", re.compile(r"bench: decode ([0-9.]+) ms/step")),
    ("decode after queueing", re.compile(r"bench: decode [0-9.]+ ms/step, queued by the host in [0-9.]+ ms, ([0-9.]+) ms after")),
    ("streams ms/step", re.compile(r"bench: \d+ streams ([0-9.]+) ms/step")),
]
SECTION = re.compile(r"bench: profile of (2 decode steps of \d+ streams|2 decode steps|a prefill of \d+ positions)")
ROW = re.compile(r"^(\S.*?)\s{2,}(\d+)\s+([0-9.]+)\s+([0-9.]+)\s+[0-9.]+%")


def parse(path):
    """{key: value}: the step figures, and (section, op) → µs a call."""
    out, section = {}, None
    with open(path) as f:
        for line in f:
            for name, pat in STEP:
                m = pat.search(line)
                if m:
                    out[(name, "")] = float(m.group(1))
            m = SECTION.search(line)
            if m:
                section = m.group(1)
                continue
            if line.startswith("window"):
                section = None
                continue
            m = ROW.match(line)
            if m and section:
                op, calls, gpu = m.group(1).strip(), int(m.group(2)), float(m.group(3))
                out[(section, op)] = gpu / calls
    return out


def main():
    folder, rounds = sys.argv[1], int(sys.argv[2])
    runs = {side: [] for side in "AB"}
    for side in "AB":
        for i in range(1, rounds + 1):
            path = os.path.join(folder, f"ab-{side}-{i}.txt")
            if os.path.exists(path):
                runs[side].append(parse(path))
    if not runs["A"] or not runs["B"]:
        sys.exit(f"no runs of both binaries in {folder}")
    keys = [k for k in runs["A"][0] if all(k in r for side in "AB" for r in runs[side])]
    print(f"{'section':<36} {'op':<42} {'A':>10} {'B':>10} {'B/A':>7} {'±A %':>6} {'±B %':>6} {'rounds':>7}")
    for key in keys:
        vals = {side: [r[key] for r in runs[side]] for side in "AB"}
        med = {side: statistics.median(vals[side]) for side in "AB"}
        spread = {side: 100 * (max(vals[side]) - min(vals[side])) / med[side] if med[side] else 0.0 for side in "AB"}
        section, op = key
        ratio = med["B"] / med["A"] if med["A"] else float("nan")
        print(
            f"{section[:36]:<36} {op[:42]:<42} {med['A']:>10.3f} {med['B']:>10.3f} {ratio:>7.3f} "
            f"{spread['A']:>6.1f} {spread['B']:>6.1f} {separation(vals['A'], vals['B']):>7}"
        )


def separation(a, b):
    """"apart" when every value of one list is below every value of the other, "overlap" otherwise ("-" when either
    has fewer than two: one round says nothing of the spread)."""
    if len(a) < 2 or len(b) < 2:
        return "-"
    return "apart" if max(a) < min(b) or max(b) < min(a) else "overlap"


if __name__ == "__main__":
    main()
