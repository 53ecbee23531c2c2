#!/usr/bin/env bash
# Several kernel macros, each timed against the usual kernels in one process (`pipemoe bench --ab variant` with
# PIPEMOE_NVRTC_VARIANT set to the macro's defines), one after another in one device call, after
# tools/device/build.sh. Prints one line per variant and a table last. The first run compiles the usual set and its
# variant's on a fresh machine (~2 minutes at once: session 47's first run of four timed out at 120 s), the others
# their variant's set only (~10 s on a warm machine).
# Usage: tools/device/ab-variants.sh [-r ROUNDS] NAME='-DX=1 [-DY=2]' ... [-- bench args]
#   NAME         a label for the table; its defines are the variant's (the "old way" of `--ab variant`: a positive
#                saving means the variant is slower than the usual kernels)
#   -r ROUNDS    rounds each (default 6)
#   bench args   default: --layers 2 --context 4096 --steps 32 --streams 0 --decode-only
# Logs: $OUT (or /tmp/pipemoe-ab-variants)/ab-NAME.{txt,json} (the table reads the bench's --json). A/A check
# first: AA='-DPIPEMOE_AA=1' (no kernel reads it;
# session 47: −0.1 µs, range −0.6 … +1.0 over 10 rounds).
set -uo pipefail
cd "$(dirname "$0")/../.."
. tools/device/env.sh
rounds=6
if [ "${1:-}" = -r ]; then
    rounds="${2:?-r needs a count}"
    shift 2
fi
variants=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do
    [[ "$1" =~ ^[A-Za-z0-9_.-]+=-D ]] || { echo "ab-variants.sh: not NAME='-D...': $1" >&2; exit 2; }
    variants+=("$1")
    shift
done
[ ${#variants[@]} -gt 0 ] || { sed -n 2,14p "$0" >&2; exit 2; }
[ "${1:-}" = -- ] && shift
bench=("$@")
[ ${#bench[@]} -gt 0 ] || bench=(--layers 2 --context 4096 --steps 32 --streams 0 --decode-only)
logs="${OUT:-/tmp/pipemoe-ab-variants}"
mkdir -p "$logs"
first=1
for v in "${variants[@]}"; do
    name="${v%%=*}" defines="${v#*=}"
    limit=200
    [ $first = 1 ] && limit=420
    first=0
    rm -f "$logs/ab-$name.json"
    PIPEMOE_NVRTC_VARIANT="$defines" timeout "$limit" ./.device/pipemoe bench "${bench[@]}" --cache-dir /tmp/pb \
        --ab variant --ab-rounds "$rounds" --json "$logs/ab-$name.json" > "$logs/ab-$name.txt" 2>&1
    rc=$?
    line=$(grep -E '^bench: A/B variant' "$logs/ab-$name.txt")
    echo "$name: ${line:-no A/B (rc $rc; timeout 124): $(tail -1 "$logs/ab-$name.txt")}"
done
# The table from the bench's JSON ("ab": the usual and the variant's medians, the saving's median and range).
python3 - "$logs" "${variants[@]}" <<'PY'
import json, os, sys
logs = sys.argv[1]
print("\n%-12s %-40s %9s %9s %8s %s" % ("variant", "defines", "usual ms", "var. ms", "saved µs", "range µs (+: variant slower)"))
for v in sys.argv[2:]:
    name, defines = v.split("=", 1)
    path = os.path.join(logs, "ab-%s.json" % name)
    try:
        ab = json.load(open(path))["ab"][0]
    except (OSError, ValueError, KeyError, IndexError):
        print("%-12s %-40s failed (no A/B in %s)" % (name, defines, path))
        continue
    print("%-12s %-40s %9.4f %9.4f %+8.1f %+7.1f .. %+.1f" % (
        name, defines, ab["usual_s"] * 1e3, ab["old_way_s"] * 1e3, ab["saved_median_s"] * 1e6,
        ab["saved_min_s"] * 1e6, ab["saved_max_s"] * 1e6))
PY
