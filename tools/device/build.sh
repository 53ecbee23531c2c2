#!/usr/bin/env bash
# Builds the device test binaries and the pipemoe binary here (the GPU machine has no Rust toolchain) and puts
# them, stripped, in .device/set.tgz (.device/ is ignored by git), which the device tool carries to the GPU machine
# and tools/device/run-tests.sh unpacks there into .device/.
# Usage: tools/device/build.sh           the 7 device test binaries, release pipemoe and the e2e tests (~54 MB:
#                                        the whole suite, memcheck, the GPU e2e tests and `pipemoe bench`)
#        tools/device/build.sh --tests   the 7 device test binaries only (~31 MB, no release build)
# (The carried tree must stay under 64 MiB: the tree is ~18 MB, the binaries ~54 MB, gzipped ~20 MB.)
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pipemoe/target}"
tests=(device device_ops device_gemm device_attention device_route device_sampling golden_gpu)
cargo test -p pipemoe-cuda --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])' > /tmp/pipemoe-device-tests.txt
mkdir -p .device
rm -rf .device/*
for t in "${tests[@]}"; do
    exe=$(awk -v t="$t" '$1 == t { print $2 }' /tmp/pipemoe-device-tests.txt)
    [ -n "$exe" ] || { echo "no test binary for $t" >&2; exit 1; }
    cp "$exe" ".device/$t" && strip ".device/$t"
done
if [ "${1:-}" != "--tests" ]; then
    # Release: `pipemoe bench` times the host side of every launch too (cudarc at opt-level 0 is not what ships).
    cargo build --release -p pipemoe
    cargo test -p pipemoe --test e2e --no-run --message-format=json 2>/dev/null |
        python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "e2e":
        print(m["executable"])' > /tmp/pipemoe-e2e.txt
    cp "$CARGO_TARGET_DIR/release/pipemoe" .device/pipemoe && strip .device/pipemoe
    cp "$(cat /tmp/pipemoe-e2e.txt)" .device/e2e && strip .device/e2e
fi
# The GPU machine's compiled kernels from an earlier call (run-tests.sh leaves them in $OUT as cubin.tgz; copy that
# file to ~/.cache/pipemoe/device-cubin.tgz): a fresh machine then compiles only the kernel files that changed.
cache="${PIPEMOE_DEVICE_CUBIN:-$HOME/.cache/pipemoe/device-cubin.tgz}"
[ -f "$cache" ] && cp "$cache" .device/cubin.tgz
(cd .device && files=(*) && tar czf set.tgz --remove-files -- "${files[@]}")
du -sh .device
