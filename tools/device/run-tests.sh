#!/usr/bin/env bash
# The device test suite, on the GPU machine, in one command (docs/CUDA.md): every binary tools/device/build.sh
# put in .device/, then compute-sanitizer's memcheck on the demo model and its racecheck on the two-head-group
# flash kernel and the indexer's top-k, then (when .device/pipemoe is there) the GPU end-to-end tests. Prints one
# line per binary and a verdict last; logs go to $OUT (or /tmp/pipemoe-device).
# Usage: tools/device/run-tests.sh              every suite
#        tools/device/run-tests.sh device ...   only these suites: test binaries, `memcheck`, `racecheck`, `e2e_gpu`
#                                               (an unknown name is refused, not skipped)
set -uo pipefail
cd "$(dirname "$0")/../.."
if ! nvidia-smi -L > /dev/null 2>&1; then
    echo "no GPU here (nvidia-smi finds none): the device suite runs on the GPU machine" >&2
    exit 2
fi
# The binaries tools/device/build.sh carried, unpacked (a second run finds them so), and the kernels an earlier
# call compiled; the cache as this run leaves it goes back in $logs for the next build
# (~/.cache/pipemoe/device-cubin.tgz).
. tools/device/env.sh
logs="${OUT:-/tmp/pipemoe-device}"
mkdir -p "$logs"
keep_cache() { [ -d "$PIPEMOE_KERNEL_CACHE" ] && tar czf "$logs/cubin.tgz" -C "$PIPEMOE_KERNEL_CACHE" .; }
trap keep_cache EXIT
failed=0
run() {  # name, command...
    local name=$1; shift
    local start=$SECONDS
    # One binary may take at most 5 minutes: a hang costs that, not the whole call.
    if timeout 300 "$@" > "$logs/$name.log" 2>&1 && ! grep -q 'SKIPPED' "$logs/$name.log"; then
        printf '%-22s ok      %4ds  %s\n' "$name" $((SECONDS - start)) "$(grep -h 'test result' "$logs/$name.log" | tail -1)"
    else
        failed=1
        printf '%-22s FAILED  %4ds  %s\n' "$name" $((SECONDS - start)) "$(grep -h -m1 -A1 'panicked' "$logs/$name.log" | tail -1)"
    fi
}
suites=(device device_ops device_gemm device_attention device_route device_sampling golden_gpu)
only=("$@")
wanted() { [ ${#only[@]} = 0 ] || [[ " ${only[*]} " == *" $1 "* ]]; }
for name in "${only[@]}"; do
    if [[ " ${suites[*]} memcheck racecheck e2e_gpu " != *" $name "* ]]; then
        echo "unknown suite '$name': one of ${suites[*]} memcheck racecheck e2e_gpu" >&2
        exit 2
    fi
done
for t in "${suites[@]}"; do
    wanted "$t" && [ -x ".device/$t" ] && run "$t" ".device/$t" --nocapture --test-threads 1
done
wanted memcheck && [ -x .device/golden_gpu ] && run memcheck compute-sanitizer --tool memcheck --error-exitcode 1 \
    .device/golden_gpu bf16_and_fp8_caches_stay_close_to_f32
# One split a row: each block walks a whole row's tiles (device_attention's doc comment of the test).
wanted racecheck && [ -x .device/device_attention ] && PIPEMOE_FLASH_MAX_SPLITS=1 run racecheck compute-sanitizer \
    --tool racecheck --error-exitcode 1 .device/device_attention two_head_group_flash_matches_the_cpu_reference
# The indexer's top-k over rows of 1 to 65,536 keys: both of its paths (~90 s under racecheck).
wanted racecheck && [ -x .device/device_attention ] && run racecheck_topk compute-sanitizer --tool racecheck \
    --error-exitcode 1 .device/device_attention indexer_select_matches_the_cpu_backend_and_feeds_attention
if wanted e2e_gpu && [ -x .device/pipemoe ] && [ -x .device/e2e ]; then
    PIPEMOE_BIN="$PWD/.device/pipemoe" PIPEMOE_REPO="$PWD" run e2e_gpu .device/e2e gpu --nocapture --test-threads 1
fi
if [ $failed = 0 ]; then echo "device suite: PASSED"; else echo "device suite: FAILED (logs in $logs)"; fi
exit $failed
