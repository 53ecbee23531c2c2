#!/usr/bin/env bash
# A branch's device checks in one call, on the GPU machine (tools/device/build.sh [--base REF] put the binaries in
# .device/): the device suites, GEMV tests again under each knob given with --env, the same-host A/B of
# .device/base/pipemoe against .device/pipemoe (when both are there), then each ignored benchmark given with --bench.
# $OUT gets two files: logs.tgz (every log and table) and cubin.tgz (the kernel cache: keep it as
# ~/.cache/pipemoe/device-cubin.tgz for the next build); a summary is printed last.
# Usage: tools/device/verify-branch.sh [--suites "device device_ops ..."] [--env KNOB=VALUE]... [--rounds N]
#                                      [--bench "BINARY TEST [KNOB=VALUE ...]"]...
#   --suites  tools/device/run-tests.sh's names (default: device device_ops golden_gpu memcheck; "" for none)
#   --env     run the GEMV tests (device's gptq_gemv, device_ops' linears and grouped experts) with KNOB=VALUE
#   --rounds  A/B rounds (default 3; 0: no A/B)
#   --bench   e.g. "device bench_gemv PIPEMOE_BENCH_PATHS=mma"
# A whole call is at most 10 minutes: the default suites take ~5, an A/B of 3 rounds ~3.5, bench_gemv ~0.5.
set -uo pipefail
cd "$(dirname "$0")/../.."
suites="device device_ops golden_gpu memcheck" rounds=3 envs=() benches=()
while [ $# -gt 0 ]; do
    case "$1" in
        --suites) suites="${2?}"; shift 2 ;;
        --env) envs+=("${2:?}"); shift 2 ;;
        --rounds) rounds="${2:?}"; shift 2 ;;
        --bench) benches+=("${2:?}"); shift 2 ;;
        *) sed -n 2,13p "$0" >&2; exit 2 ;;
    esac
done
. tools/device/env.sh
out="${OUT:-/tmp/verify-out}" work=$(mktemp -d /tmp/verify.XXXXXX)
mkdir -p "$out"
summary="$work/summary.txt"
pack() {
    tar czf "$out/logs.tgz" -C "$work" .
    [ -d "$PIPEMOE_KERNEL_CACHE" ] && tar czf "$out/cubin.tgz" -C "$PIPEMOE_KERNEL_CACHE" .
}
trap pack EXIT

if [ -n "$suites" ]; then
    # shellcheck disable=SC2086  # the suites' names are words
    OUT="$work/suites" tools/device/run-tests.sh $suites 2>&1 | tee -a "$summary"
    rm -f "$work/suites/cubin.tgz"
fi
for e in "${envs[@]}"; do
    mkdir -p "$work/env"
    for t in "device gptq_gemv" "device_ops linears" "device_ops grouped_experts"; do
        set -- $t
        log="$work/env/$1-$2-${e//[^A-Za-z0-9_]/_}.log"
        if env "$e" timeout 300 ".device/$1" "$2" --nocapture --test-threads 1 > "$log" 2>&1; then
            echo "[$e] $1 $2: ok  $(grep -h 'test result' "$log" | tail -1)" | tee -a "$summary"
        else
            echo "[$e] $1 $2: FAILED  $(grep -h -m1 -A1 'panicked' "$log" | tail -1)" | tee -a "$summary"
        fi
    done
done
if [ "$rounds" -gt 0 ] && [ -x .device/base/pipemoe ] && [ -x .device/pipemoe ]; then
    mkdir -p "$work/ab"
    OUT="$work/ab" tools/device/ab-bins.sh .device/base/pipemoe .device/pipemoe "$rounds" > "$work/ab/table.txt" 2>&1
    cat "$work/ab/table.txt" >> "$summary"
fi
for b in "${benches[@]}"; do
    read -r bin test knobs <<< "$b"
    log="$work/bench-$bin-$test-$(echo "${knobs:-default}" | tr -c 'A-Za-z0-9_\n' _).txt"
    # shellcheck disable=SC2086  # the knobs are words
    env ${knobs:-} timeout 300 ".device/$bin" --ignored "$test" --nocapture > "$log" 2>&1
    { echo "== $bin $test ${knobs:-} (rc $?)"; grep -vE '^(running|test |$)' "$log"; } >> "$summary"
done
echo "----- summary -----"
cat "$summary"
