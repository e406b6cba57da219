#!/usr/bin/env bash
# One phase of `make test`: run the command, print how long it took and add the line to the summary file
# that `make test` prints at its end (PHASES_FILE). A failing phase prints its time too, then fails.
#   scripts/phase.sh NAME COMMAND [ARG…]
set -uo pipefail
name=$1
shift
start=$(date +%s%N)
"$@"
code=$?
elapsed=$(( ($(date +%s%N) - start) / 1000000 ))
if [[ $code == 0 ]]; then outcome=ok; else outcome="FAILED (exit $code)"; fi
line=$(printf 'phase %-12s %6d.%01d s  %s' "$name" $((elapsed / 1000)) $((elapsed % 1000 / 100)) "$outcome")
echo "$line"
if [[ -n "${PHASES_FILE:-}" ]]; then
    mkdir -p "$(dirname "$PHASES_FILE")"
    echo "$line" >>"$PHASES_FILE"
fi
exit $code
