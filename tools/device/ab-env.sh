#!/usr/bin/env bash
# One pipemoe binary timed against itself under two environments (a knob's two settings), on the GPU machine:
# tools/device/ab-bins.sh over two wrappers of .device/pipemoe (or $PIPEMOE_AB_BIN) that set A's and B's variables.
# Usage: tools/device/ab-env.sh "A_VARS" "B_VARS" [rounds] [-- bench args]
#   A_VARS, B_VARS  space-separated NAME=VALUE assignments, or "" for none
#                   e.g. tools/device/ab-env.sh "PIPEMOE_FLASH_STAGES=2" "" 4 -- --layers 2 --context 4096 --steps 32 --streams 0
#   rounds, bench args: as ab-bins.sh's. Logs and the table as ab-bins.sh's ($OUT or /tmp/pipemoe-ab-bins).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 2 ] || { sed -n 2,7p "$0" >&2; exit 2; }
a_vars=$1 b_vars=$2
shift 2
bin="${PIPEMOE_AB_BIN:-.device/pipemoe}"
[[ "$bin" = /* ]] || bin="$PWD/$bin"  # the wrappers run from anywhere
work=$(mktemp -d /tmp/ab-env.XXXXXX)
for side in A B; do
    vars=$a_vars
    [ "$side" = B ] && vars=$b_vars
    for v in $vars; do
        [[ "$v" =~ ^[A-Za-z_][A-Za-z0-9_]*=[^\']*$ ]] || { echo "ab-env.sh: not NAME=VALUE: $v" >&2; exit 2; }
    done
    {
        echo '#!/bin/sh'
        echo "# side $side of tools/device/ab-env.sh"
        for v in $vars; do echo "export ${v%%=*}='${v#*=}'"; done
        echo "exec '$bin' \"\$@\""
    } > "$work/$side.sh"
    chmod +x "$work/$side.sh"
done
echo "A: ${a_vars:-(none)}   B: ${b_vars:-(none)}   ($bin)"
exec tools/device/ab-bins.sh "$work/A.sh" "$work/B.sh" "$@"
