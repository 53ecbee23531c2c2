#!/usr/bin/env bash
# What one pipeline hop costs in serving — the gRPC step call from one worker process to the next, its activations
# and the processes' wake-ups — measured on the real server, CPU workers (no GPU needed): the demo model served by
# 1 and then by 3 CPU workers (same layers, split), the same greedy request of N tokens (ignore_eos) five times
# each, in turns for a number of rounds; the per-token time of 3 workers minus that of 1 (medians of all runs
# each), over the 2 extra hops, is one hop's cost (each round's own figure is printed too, for the spread). Compute per
# token is the same in both (the same layers run once each), so the difference is the hand-offs.
# Usage: tools/hop-cost.sh [pipemoe binary] [tokens] [rounds] [cpu|cuda]   (defaults: the release build, 200, 2,
# cpu). Prints JSON lines last. Two rounds resolve ~0.1 ms at best (session 13: rounds of one binary 0.21-0.37 ms
# apart); more rounds narrow the pooled medians. `cuda` (the GPU machine with 2 or more GPUs): GPU workers, one on
# cuda:0 against one per GPU, so each extra hop is a hand-off between two devices (CUDA IPC) and a gRPC step.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:-${CARGO_TARGET_DIR:-$HOME/.cache/pipemoe/target}/release/pipemoe}"
tokens="${2:-200}"
rounds="${3:-2}"
kind="${4:-cpu}"
case "$kind" in
    cpu) many=3 ;;
    cuda) many=$(nvidia-smi -L 2>/dev/null | wc -l)
          [ "$many" -ge 2 ] || { echo "cuda: the hop needs 2 or more GPUs (nvidia-smi finds $many)" >&2; exit 2; } ;;
    *) echo "devices: cpu or cuda, not $kind" >&2; exit 2 ;;
esac
[ -x "$bin" ] || { echo "no pipemoe binary at $bin (cargo build --release -p pipemoe)" >&2; exit 2; }
dir=$(mktemp -d /tmp/pipemoe-hop.XXXXXX)
port=$((20000 + RANDOM % 20000))
model="$PWD/data/models/tiny-dsv32-w3a16"
trap '"$bin" stop --data-dir "$dir" > /dev/null 2>&1 || true; rm -rf "$dir"' EXIT
# Rounds of 1 and 3 workers taking turns: the host's drift between the configurations lands in both.
for workers in $(for _ in $(seq "$rounds"); do echo 1 "$many"; done); do
    if [ "$kind" = cpu ]; then
        devices=$(printf 'cpu%.0s,' $(seq "$workers"))
    else
        devices=$(for d in $(seq 0 $((workers - 1))); do printf 'cuda:%d,' "$d"; done)
    fi
    devices=${devices%,}
    "$bin" recipe upsert --data-dir "$dir" --id "w$workers" --model "$model" --devices "$devices" \
        --max-model-len 4096 > /dev/null
    "$bin" start --data-dir "$dir" --recipe "w$workers" --port "$port" > /dev/null 2>&1
    python3 - "$port" "$tokens" "$workers" <<'PY' | tee -a "$dir/runs.jsonl"
import json, sys, time, urllib.request
port, n, workers = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def ask(max_tokens):
    body = json.dumps({"model": "tiny-dsv32-w3a16", "messages": [{"role": "user", "content": "Count to one hundred."}],
                       "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                 {"Content-Type": "application/json"})
    t = time.perf_counter()
    r = json.load(urllib.request.urlopen(req, timeout=600))
    return time.perf_counter() - t, r["usage"]["completion_tokens"]
ask(4)
per = []
for _ in range(5):
    t1, c1 = ask(1)
    tn, cn = ask(n)
    per.append((tn - t1) / (cn - c1))
per.sort()
print(json.dumps({"workers": workers, "tokens": n, "per_token_ms": [round(p * 1e3, 3) for p in per],
                  "median_ms": round(per[2] * 1e3, 3)}))
PY
    "$bin" stop --data-dir "$dir" > /dev/null
done
python3 -c '
import json, os, statistics, sys
runs, many, kind = [json.loads(l) for l in open(sys.argv[1])], int(sys.argv[2]), sys.argv[3]
pooled = {w: statistics.median(p for r in runs if r["workers"] == w for p in r["per_token_ms"]) for w in (1, many)}
hops = many - 1
rounds = [(b["median_ms"] - a["median_ms"]) / hops for a, b in zip(runs[0::2], runs[1::2])]
print(json.dumps({"hop_ms": round((pooled[many] - pooled[1]) / hops, 3), "per_round_hop_ms": [round(h, 3) for h in rounds],
                  "workers": [1, many], "devices": kind, "machine_cores": os.cpu_count()}))' "$dir/runs.jsonl" "$many" "$kind"
