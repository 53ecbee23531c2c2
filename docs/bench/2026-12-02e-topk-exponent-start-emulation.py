# Emulation of topk_one_tile's selection logic (indexer.cu) with the exponent-histogram start: the k-th largest
# order key found from (pre, b) by two-bit steps, then the output set; checked against a sort (ties: lower index).
import random, struct

def okey(x):
    u = struct.unpack('<I', struct.pack('<f', x))[0]
    return (~u) & 0xffffffff if u & 0x80000000 else u | 0x80000000

def select(keys, topk, hist_start=True, window=False):
    n = len(keys)
    allb, anyb = 0xffffffff, 0
    for k in keys: allb &= k; anyb |= k
    differ = allb ^ anyb
    b = differ.bit_length() - 1 if differ else -1
    pre = allb if b < 0 else allb & ~((2 << b) - 1) & 0xffffffff
    exact = False
    steps = 0
    wsteps = 0
    if hist_start and b >= 23:
        hist = [0] * 512
        for k in keys: hist[k >> 23] += 1
        # warp 0: lane l holds bins 511-16l-i, i = 0..15
        s = [sum(hist[511 - 16 * l - i] for i in range(16)) for l in range(32)]
        cum, c = [], 0
        for l in range(32): c += s[l]; cum.append(c)
        L = next(l for l in range(32) if cum[l] >= topk)
        running = cum[L] - s[L]
        for i in range(16):
            bin_ = 511 - 16 * L - i
            running += hist[bin_]
            if running >= topk: B, ge = bin_, running; break
        pre, b, exact = B << 23, 22, ge == topk
        steps += 1
        in_bin = hist[B]
        if window and not exact and in_bin <= 256:
            # warp 0 alone over the bin's keys: counts relative to the keys above the bin
            above = ge - in_bin
            wk = [k for k in keys if k >> 23 == B]
            assert len(wk) == in_bin
            need = topk - above
            while b >= 0 and not exact:
                hi = 1 << b; lo = 1 << (b - 1) if b > 0 else hi
                c3, c2, c1 = pre | hi | lo, pre | hi, pre | lo
                m3 = sum(k >= c3 for k in wk); m2 = sum(k >= c2 for k in wk); m1 = sum(k >= c1 for k in wk)
                kept = m3 if m3 >= need else m2 if m2 >= need else m1 if m1 >= need else -1
                pre = c3 if m3 >= need else c2 if m2 >= need else c1 if m1 >= need else pre
                exact = kept == need
                b -= 2; wsteps += 1
            b = -1
    while b >= 0 and not exact:
        hi = 1 << b; lo = 1 << (b - 1) if b > 0 else hi
        c3, c2, c1 = pre | hi | lo, pre | hi, pre | lo
        m3 = sum(k >= c3 for k in keys); m2 = sum(k >= c2 for k in keys); m1 = sum(k >= c1 for k in keys)
        kept = m3 if m3 >= topk else m2 if m2 >= topk else m1 if m1 >= topk else -1
        pre = c3 if m3 >= topk else c2 if m2 >= topk else c1 if m1 >= topk else pre
        exact = kept == topk
        b -= 2; steps += 1
    prefix = (pre - 1) if exact else pre
    total_above = sum(k > prefix for k in keys)
    need = topk - total_above
    out, eq = [], 0
    for i, k in enumerate(keys):
        if k > prefix: out.append(i)
        elif k == prefix and eq < need: out.append(i); eq += 1
    return sorted(out), (steps, wsteps)

def reference(vals, topk):
    order = sorted(range(len(vals)), key=lambda i: (-okey(vals[i]) , i))
    return sorted(order[:topk])

random.seed(1)
worst = {}
for trial in range(600):
    n = random.choice([5, 64, 300, 2049, 4096, 4130, 8192])
    topk = random.choice([1, 4, 64, 2048]) 
    if topk >= n: continue
    kind = trial % 5
    if kind == 0: vals = [random.gauss(0, 1) for _ in range(n)]
    elif kind == 1: vals = [float(random.randint(-2, 2)) for _ in range(n)]        # ties
    elif kind == 2: vals = [random.uniform(1.0, 1.0001) for _ in range(n)]        # one exponent
    elif kind == 3: vals = [random.choice([0.0, -0.0, 1e-30, -1e-30, 3.5]) for _ in range(n)]
    else: vals = [random.gauss(0, 1) * 10 ** random.randint(-3, 3) for _ in range(n)]
    vals = [struct.unpack('<f', struct.pack('<f', v))[0] for v in vals]
    keys = [okey(v) for v in vals]
    want = reference(vals, topk)
    for hs, win in ((False, False), (True, False), (True, True)):
        got, steps = select(keys, topk, hs, win)
        assert got == want, (trial, kind, n, topk, hs, win)
        worst[(kind, hs, win)] = max(worst.get((kind, hs, win), (0, 0)), steps)
print("all equal; most (block-wide steps, warp steps) by (kind, histogram start, window):")
for k, v in sorted(worst.items()): print(" ", k, v)
