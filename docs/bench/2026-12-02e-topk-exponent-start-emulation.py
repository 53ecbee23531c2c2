# Multi-level variant: 9-bit histograms at bits 31..23, then (while the k-th key's bin holds more than WINDOW keys)
# 22..14 and 13..5 over that bin's keys; then warp 0 alone over a bin of <= WINDOW keys, or the block's two-bit steps.
import random, struct
WINDOW = 256

def okey(x):
    u = struct.unpack('<I', struct.pack('<f', x))[0]
    return (~u) & 0xffffffff if u & 0x80000000 else u | 0x80000000

def two_bit(keys, pre, b, need):
    exact, steps = False, 0
    while b >= 0 and not exact:
        hi = 1 << b; lo = 1 << (b - 1) if b > 0 else hi
        c3, c2, c1 = pre | hi | lo, pre | hi, pre | lo
        m3 = sum(k >= c3 for k in keys); m2 = sum(k >= c2 for k in keys); m1 = sum(k >= c1 for k in keys)
        kept = m3 if m3 >= need else m2 if m2 >= need else m1 if m1 >= need else -1
        pre = c3 if m3 >= need else c2 if m2 >= need else c1 if m1 >= need else pre
        exact = kept == need
        b -= 2; steps += 1
    return pre, exact, steps

def select(keys, topk):
    allb, anyb = 0xffffffff, 0
    for k in keys: allb &= k; anyb |= k
    differ = allb ^ anyb
    b = differ.bit_length() - 1 if differ else -1
    pre = allb if b < 0 else allb & ~((2 << b) - 1) & 0xffffffff
    exact, hists, bsteps, wsteps = False, 0, 0, 0
    above = 0
    cand = keys
    # 9-bit histograms from the highest bit the keys differ in, while the k-th key's bin is larger than a window
    first = b >= 23
    while (first or b >= 8) and not exact and (hists == 0 or len(cand) > WINDOW):
        # as the kernel: the first level at bits 31..23 where the keys differ there (counted with the agreement)
        shift = 23 if first else b - 8
        first = False
        hist = [0] * 512
        for k in cand: hist[(k >> shift) & 511] += 1
        hists += 1
        need = topk - above
        run = 0
        for bin_ in range(511, -1, -1):
            run += hist[bin_]
            if run >= need: break
        in_bin = hist[bin_]
        pre = pre | (bin_ << shift)
        exact = run == need
        above += run - in_bin
        b = shift - 1
        cand = [k for k in cand if (k >> shift) & 511 == bin_]
    if hists and not exact and b >= 0 and len(cand) <= WINDOW:
        pre, exact, wsteps = two_bit(cand, pre, b, topk - above)
        b = -1
    if b >= 0 and not exact:
        pre, exact, bsteps = two_bit(keys, pre, b, topk)
    prefix = (pre - 1) if exact else pre
    need = topk - sum(k > prefix for k in keys)
    out, eq = [], 0
    for i, k in enumerate(keys):
        if k > prefix: out.append(i)
        elif k == prefix and eq < need: out.append(i); eq += 1
    return sorted(out), (hists, bsteps, wsteps)

def reference(vals, topk):
    order = sorted(range(len(vals)), key=lambda i: (-okey(vals[i]), i))
    return sorted(order[:topk])

if __name__ == "__main__":
    random.seed(1)
    eps = 2.0 ** -23
    gens = {
        "gauss": lambda n: [random.gauss(0, 1) for _ in range(n)],
        "gauss+5": lambda n: [random.gauss(5, 1) for _ in range(n)],
        "uniform": lambda n: [random.uniform(-1, 1) for _ in range(n)],
        "chi2": lambda n: [random.gauss(0, 1) ** 2 for _ in range(n)],
        "mixed": lambda n: [random.gauss(0, 1) * 10 ** random.randint(-3, 3) for _ in range(n)],
        "ties": lambda n: [float(random.randint(-2, 2)) for _ in range(n)],
        "one exponent": lambda n: [random.uniform(1.0, 1.0001) for _ in range(n)],
        "last bits": lambda n: [1.0 + (i * 7 % 13) * eps for i in range(n)],
        "specials": lambda n: [[0.0, -0.0, -1.0, 1.0, 2.5, -2.5, float('inf'), float('-inf'), float('nan')][random.randrange(9)] for _ in range(n)],
    }
    for name, gen in gens.items():
        worst = {}
        for trial in range(12):
            for n in (5, 200, 2049, 4130, 8192):
                for topk in (1, 7, 64, 2048):
                    if topk >= n: continue
                    vals = [struct.unpack('<f', struct.pack('<f', v))[0] for v in gen(n)]
                    keys = [okey(v) for v in vals]
                    got, st = select(keys, topk)
                    assert got == reference(vals, topk), (name, n, topk)
                    if (n, topk) == (4130, 2048):
                        worst.setdefault("4130@2048", []).append(st)
        s = worst.get("4130@2048", [])
        mean = [sum(x[i] for x in s) / len(s) for i in range(3)]
        print(f"{name:>13}: equal; at 4,130 keys, top 2,048: histograms {mean[0]:.1f}, block steps {mean[1]:.1f}, warp steps {mean[2]:.1f}")
