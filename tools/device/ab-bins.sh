#!/usr/bin/env bash
# Two pipemoe binaries timed against each other on the GPU machine, in alternating runs of one call (the order
# flips every round, so a host's drift lands on both): each run is `pipemoe bench … --profile`, and the table at
# the end gives, per binary, the median over rounds of the decode step and of every profiled op's µs a call, and
# B's change against A. Each binary carries its own kernel sources (the cubin cache keys on them).
# Usage: tools/device/ab-bins.sh A B [rounds] [-- bench args]
#   A, B        pipemoe binaries, e.g. .device/base/pipemoe (tools/device/build.sh --base REF) and .device/pipemoe
#   rounds      default 3
#   bench args  default: --layers 2 --context 4096 --steps 16 --cache-dir /tmp/pb2 --streams 32
#               (add --decode-only for the decode step alone: no profiled prefill, per-block rows, cuBLAS or IPC;
#               the first two each prefill the context again: not timed, est. 20-25 s of a ~75 s 128K run)
# Logs go to $OUT (or /tmp/pipemoe-ab-bins); the table is printed last.
# PIPEMOE_AB_SECONDS=N: start no round that would end past N seconds from the start (judged by the rounds so far),
# and print the table of the rounds done: give it what is left of the device call (a call cut off by its limit
# prints nothing; session 38 lost an A/B so).
set -uo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 2 ] || { sed -n 2,10p "$0" >&2; exit 2; }
# tools/device/build.sh carries the binaries packed, and the kernels an earlier call compiled (as run-tests.sh).
. tools/device/env.sh
a=$1 b=$2
shift 2
rounds=3
if [ $# -gt 0 ] && [ "$1" != "--" ]; then rounds=$1; shift; fi
[ "${1:-}" = "--" ] && shift
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--layers 2 --context 4096 --steps 16 --cache-dir /tmp/pb2 --streams 32)
for bin in "$a" "$b"; do [ -x "$bin" ] || { echo "not an executable: $bin" >&2; exit 2; }; done
# Sessions 19-21 compared a binary with itself without knowing it (build.sh --base's shared target folder): say so.
cmp -s "$a" "$b" && echo "ab-bins.sh: WARNING: $a and $b are the same file; this A/B measures noise only" >&2
logs="${OUT:-/tmp/pipemoe-ab-bins}"
mkdir -p "$logs"
budget="${PIPEMOE_AB_SECONDS:-0}"
[[ "$budget" =~ ^[0-9]+$ ]] || { echo "ab-bins.sh: PIPEMOE_AB_SECONDS is not a number of seconds: $budget" >&2; exit 2; }
done_rounds=0
for i in $(seq "$rounds"); do
    if [ "$budget" -gt 0 ] && [ "$done_rounds" -gt 0 ] &&
        [ $((SECONDS + SECONDS / done_rounds)) -gt "$budget" ]; then
        echo "ab-bins.sh: $done_rounds of $rounds rounds in ${SECONDS}s; another would pass PIPEMOE_AB_SECONDS=$budget" >&2
        break
    fi
    order="A B"
    [ $((i % 2)) -eq 0 ] && order="B A"
    for side in $order; do
        bin=$a
        [ "$side" = B ] && bin=$b
        timeout 300 "$bin" bench "${args[@]}" --profile > "$logs/ab-$side-$i.txt" 2>&1 ||
            echo "round $i $side: the bench failed (rc $?), see $logs/ab-$side-$i.txt" >&2
    done
    done_rounds=$i
done
python3 "$(dirname "$0")/ab_table.py" "$logs" "$done_rounds"
