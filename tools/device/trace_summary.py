#!/usr/bin/env python3
"""A decode step's kernels on the GPU's own clock, from `pipemoe bench --trace FILE` (PIPEMOE_TRACE=1; src/trace.rs):
each launch's first and last block start, its last block end, its SMs and block times, for the median step, and
each kernel's median over the steps. Launches overlap where the step forks a branch; a launch whose first block
starts well after the one before it ended waited for SMs (or for the host).

Usage: tools/device/trace_summary.py TRACE.csv [--gap-us 8] [--all] [--sm MIN_BLOCKS]
  --gap-us  a gap with no block running longer than this ends a step (steps are synchronized by the host)
  --all     print every step's table, not only the median step's
  --sm      for the median step's launches of at least MIN_BLOCKS blocks: blocks running µs by µs (the tail is
            where it ramps down), block times by how many of the launch's blocks shared the SM, how far apart an SM's blocks ended, and in which order of their linear index
            (dispatch order) they ended — session 37 found the split-K GEMVs' co-resident blocks ending in that
            order, ~1.5 µs apart, the last alone on its SM
"""
import argparse, collections, csv, gzip, statistics, sys


def load(path):
    rows = []
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        for r in csv.DictReader(f):
            rows.append((r["kernel"], int(r["blocks"]), int(r["block"]), int(r["sm"]), int(r["start_ns"]), int(r["end_ns"])))
    if not rows:
        sys.exit(f"{path}: no records")
    return rows


def steps_of(rows, gap_ns):
    rows = sorted(rows, key=lambda r: r[4])
    steps, cur, end = [], [], None
    for r in rows:
        if cur and r[4] > end + gap_ns:
            steps.append(cur)
            cur, end = [], None
        cur.append(r)
        end = r[5] if end is None else max(end, r[5])
    steps.append(cur)
    return steps


def runs(rs, blocks):
    """Records of one kernel and grid size in start order, cut into runs of `blocks`: one launch each."""
    rs = sorted(rs, key=lambda r: r[4])
    return [rs[i:i + blocks] for i in range(0, len(rs), blocks)]


def launches_of(step):
    """Each launch of a step: its kernel, blocks, times (runs)."""
    by = collections.defaultdict(list)
    for r in step:
        by[(r[0], r[1])].append(r)
    out = []
    for (name, blocks), rs in by.items():
        for part in runs(rs, blocks):
            durs = [r[5] - r[4] for r in part]
            out.append({
                "name": name, "blocks": blocks, "recorded": len(part),
                "first": min(r[4] for r in part), "last_start": max(r[4] for r in part),
                "end": max(r[5] for r in part), "sms": len({r[3] for r in part}),
                "med": statistics.median(durs), "max": max(durs),
            })
    out.sort(key=lambda l: (l["first"], l["end"]))
    return out


def short(name):
    return name if len(name) <= 44 else name[:41] + "..."


def table(step, launches):
    t0 = min(r[4] for r in step)
    span = max(r[5] for r in step) - t0
    print(f"step of {span / 1e3:.1f} us, {len(launches)} launches, {len(step)} blocks")
    print(f"{'kernel':44} {'blocks':>6} {'SMs':>4} {'start':>7} {'all in':>7} {'end':>7} {'dur':>6} "
          f"{'blk med':>7} {'blk max':>7} {'after':>6} {'beside'}")
    for i, l in enumerate(launches):
        # The latest end among the launches that started before this one and ended before its first block: how
        # long after it this launch began (a dependency's end, if it depends on that one).
        ended = [m["end"] for m in launches[:i] if m["end"] <= l["first"]]
        after = (l["first"] - max(ended)) / 1e3 if ended else float("nan")
        beside = [short(m["name"])[:18] for m in launches if m is not l and m["first"] < l["end"] and l["first"] < m["end"]]
        print(f"{short(l['name']):44} {l['blocks']:6} {l['sms']:4} {(l['first'] - t0) / 1e3:7.2f} "
              f"{(l['last_start'] - t0) / 1e3:7.2f} {(l['end'] - t0) / 1e3:7.2f} {(l['end'] - l['first']) / 1e3:6.2f} "
              f"{l['med'] / 1e3:7.2f} {l['max'] / 1e3:7.2f} {after:6.2f} {', '.join(beside[:3])}")
    # Time with no block of the step running, between its first start and last end: the launches' gaps where no
    # branch covered them.
    idle, running_to = 0, t0
    for l in sorted(launches, key=lambda l: l["first"]):
        idle += max(0, l["first"] - running_to)
        running_to = max(running_to, l["end"])
    print(f"no block running for {idle / 1e3:.1f} of the step's {span / 1e3:.1f} us ({100 * idle / span:.0f}%)")


def per_sm(step, min_blocks):
    """Each large launch's blocks grouped by SM: durations by the SM's count of them, the spread of an SM's ends, and
    the most common order in which an SM's blocks ended, as ranks of their linear indices (the order the hardware
    dispatches them in; their starts are within the timer's 32 ns of each other)."""
    by = collections.defaultdict(list)
    for r in step:
        by[(r[0], r[1])].append(r)
    print(f"\n{'kernel':44} {'blocks':>6} {'on an SM':>8} {'n':>4} {'blk med':>7} {'blk max':>7}  end spread med/max  end order by block index")
    for (name, blocks), rs in sorted(by.items(), key=lambda kv: -kv[0][1]):
        if blocks < min_blocks:
            continue
        rs.sort(key=lambda r: r[4])
        for i in range(0, len(rs), blocks):
            part = rs[i:i + blocks]
            sms = collections.defaultdict(list)
            for r in part:
                sms[r[3]].append(r)
            spread = [max(r[5] for r in v) - min(r[5] for r in v) for v in sms.values() if len(v) > 1]
            orders = collections.Counter()
            for v in sms.values():
                if len(v) > 1:
                    by_index = sorted(v, key=lambda r: r[2])
                    orders[tuple(by_index.index(r) for r in sorted(v, key=lambda r: r[5]))] += 1
            common = orders.most_common(1)[0] if orders else ((), 0)
            counts = collections.defaultdict(list)
            for v in sms.values():
                for r in v:
                    counts[len(v)].append((r[5] - r[4]) / 1e3)
            first = True
            for c in sorted(counts):
                d = counts[c]
                tail = (f"  {statistics.median(spread) / 1e3:5.2f} / {max(spread) / 1e3:5.2f}   {common[0]} x{common[1]}"
                        if first and spread else "")
                print(f"{short(name) if first else '':44} {blocks if first else '':>6} {c:8} {len(d):4} "
                      f"{statistics.median(d):7.2f} {max(d):7.2f}{tail}")
                first = False
            # Blocks running, µs by µs from the launch's first start: the ramp down at the end is the tail.
            s0 = min(r[4] for r in part)
            span = (max(r[5] for r in part) - s0) / 1e3
            act = [0.0] * (int(span) + 1)
            for r in part:
                a, b = (r[4] - s0) / 1e3, (r[5] - s0) / 1e3
                for t in range(int(a), int(b) + 1):
                    act[t] += max(0.0, min(b, t + 1) - max(a, t))
            print(f"{'':44} blocks running by µs: {' '.join(str(round(v)) for v in act)}")
            break  # the first launch of each kernel in the step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--gap-us", type=float, default=8.0)
    ap.add_argument("--all", action="store_true")
    ap.add_argument("--sm", type=int, default=0)
    a = ap.parse_args()
    rows = load(a.trace)
    stamps = sorted({r[4] for r in rows} | {r[5] for r in rows})
    tick = min((b - a_ for a_, b in zip(stamps, stamps[1:]) if b > a_), default=0)
    steps = steps_of(rows, a.gap_us * 1e3)
    spans = [max(r[5] for r in s) - min(r[4] for r in s) for s in steps]
    print(f"{a.trace}: {len(rows)} blocks in {len(steps)} steps; the timer's smallest step {tick} ns; "
          f"step spans (us) {', '.join(f'{s / 1e3:.1f}' for s in spans)}")
    order = sorted(range(len(steps)), key=lambda i: spans[i])
    chosen = range(len(steps)) if a.all else [order[len(order) // 2]]
    for i in chosen:
        print(f"\n# step {i}")
        table(steps[i], launches_of(steps[i]))
    if a.sm:
        per_sm(steps[order[len(order) // 2]], a.sm)
    # Each kernel's launch durations (first block start to last block end) over all steps.
    per = collections.defaultdict(list)
    for s in steps:
        for l in launches_of(s):
            per[(l["name"], l["blocks"])].append((l["end"] - l["first"]) / 1e3)
    print(f"\n{'kernel':44} {'blocks':>6} {'launches':>8} {'median us':>9} {'min':>6} {'max':>6}")
    for (name, blocks), d in sorted(per.items(), key=lambda kv: -statistics.median(kv[1]) * len(kv[1])):
        print(f"{short(name):44} {blocks:6} {len(d):8} {statistics.median(d):9.2f} {min(d):6.2f} {max(d):6.2f}")


if __name__ == "__main__":
    main()
