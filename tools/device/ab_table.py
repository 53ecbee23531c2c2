"""The table of tools/device/ab-bins.sh: logs ab-{A,B}-{round}.txt of `pipemoe bench --profile` runs in a folder.

Per binary, the median over rounds of the decode steps (one stream and, when run, the streams) and of each
profiled op's µs a call, section by section (one-row decode, the prefill, the streams' decode), with B's change
against A. Usage: python3 tools/device/ab_table.py LOG_DIR ROUNDS
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
    print(f"{'section':<36} {'op':<42} {'A':>10} {'B':>10} {'B/A':>7}")
    for key in keys:
        med = {side: statistics.median(r[key] for r in runs[side]) for side in "AB"}
        section, op = key
        ratio = med["B"] / med["A"] if med["A"] else float("nan")
        print(f"{section[:36]:<36} {op[:42]:<42} {med['A']:>10.3f} {med['B']:>10.3f} {ratio:>7.3f}")


if __name__ == "__main__":
    main()
