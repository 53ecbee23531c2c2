#!/usr/bin/env bash
# Builds the device test binaries and the pipemoe binary here (the GPU machine has no Rust toolchain) and puts
# them, stripped, in .device/set.tgz (.device/ is ignored by git), which the device tool carries to the GPU machine
# and tools/device/run-tests.sh unpacks there into .device/.
# Usage: tools/device/build.sh           the 7 device test binaries, release pipemoe and the e2e tests (~54 MB:
#                                        the whole suite, memcheck, the GPU e2e tests and `pipemoe bench`)
#        tools/device/build.sh --tests   the 7 device test binaries only (~31 MB, no release build)
#        tools/device/build.sh --base REF   also REF's release pipemoe as .device/base/pipemoe (built in a worktree
#                                        of REF; ~+15 MB), for tools/device/ab-bins.sh on the GPU machine
# (The carried tree must stay under 64 MiB: the tree is ~18 MB, the binaries ~54 MB, gzipped ~20 MB.)
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pipemoe/target}"
mode=all base=
while [ $# -gt 0 ]; do
    case "$1" in
        --tests) mode=tests; shift ;;
        --base) base="${2:?--base needs a git ref}"; shift 2 ;;
        *) echo "build.sh: unknown argument $1 (--tests, --base REF)" >&2; exit 2 ;;
    esac
done
[ "$mode" = tests ] && [ -n "$base" ] && { echo "build.sh: --base builds release binaries; not with --tests" >&2; exit 2; }
[ -z "$base" ] || git rev-parse --verify -q "$base^{commit}" > /dev/null || { echo "build.sh: no commit $base" >&2; exit 2; }
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
if [ "$mode" != tests ]; then
    if [ -n "$base" ]; then
        # REF's binary in a target folder of its own: cargo names a workspace's artifacts by paths relative to
        # the workspace, so a worktree's build in the same folder is taken for this tree's, and (its files being
        # newer) this tree's build then found nothing to do and shipped REF's binary as its own (sessions 19-21).
        wt=$(mktemp -d /tmp/pipemoe-base.XXXXXX)
        git worktree add -q --detach "$wt" "$base"
        (cd "$wt" && CARGO_TARGET_DIR="$CARGO_TARGET_DIR-base" cargo build --release -p pipemoe)
        mkdir -p .device/base
        cp "$CARGO_TARGET_DIR-base/release/pipemoe" .device/base/pipemoe && strip .device/base/pipemoe
        git worktree remove --force "$wt"
    fi
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
    if [ -n "$base" ] && cmp -s .device/base/pipemoe .device/pipemoe &&
        ! git diff --quiet "$base" -- crates Cargo.toml Cargo.lock; then
        echo "build.sh: $base's pipemoe and this tree's are the same file although their sources differ" >&2
        exit 1
    fi
    cp "$(cat /tmp/pipemoe-e2e.txt)" .device/e2e && strip .device/e2e
fi
# The GPU machine's compiled kernels from an earlier call (run-tests.sh leaves them in $OUT as cubin.tgz; copy that
# file to ~/.cache/pipemoe/device-cubin.tgz): a fresh machine then compiles only the kernel files that changed.
cache="${PIPEMOE_DEVICE_CUBIN:-$HOME/.cache/pipemoe/device-cubin.tgz}"
[ -f "$cache" ] && cp "$cache" .device/cubin.tgz
(cd .device && files=(*) && tar czf set.tgz --remove-files -- "${files[@]}")
du -sh .device
