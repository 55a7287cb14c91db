#!/usr/bin/env bash
# The duplicates check of `make lint`: fails when the tree holds more pairs
# of duplicated places than the committed baseline (.ci/duplicates-baseline),
# so new code does not write again what exists. `duplicates` is a command of
# the developers' machines (it reads files as text and always exits 0); where
# it is absent this says so and passes.
#   .ci/duplicates.sh           check against the baseline
#   .ci/duplicates.sh --update  write the current count as the baseline
set -euo pipefail
cd "$(dirname "$0")/.."
baseline_file=.ci/duplicates-baseline
if ! command -v duplicates >/dev/null 2>&1; then
	echo "duplicates: command not found; the duplicates check did NOT run"
	exit 0
fi
out=$(duplicates --seconds 120)
first=$(printf '%s\n' "$out" | head -n 1)
case "$first" in
"no duplicates"*) count=0 ;;
*) count=$(printf '%s\n' "$first" | sed -n 's/^\([0-9][0-9]*\) pairs\{0,1\} .*/\1/p') ;;
esac
if [ -z "$count" ]; then
	echo "duplicates: cannot read a count from its output:" >&2
	printf '%s\n' "$out" >&2
	exit 1
fi
if printf '%s\n' "$out" | grep -q '^incomplete:'; then
	# The rows speak only of what was read: an incomplete run undercounts.
	echo "duplicates: incomplete run, the count may be low:" >&2
	printf '%s\n' "$out" | grep '^incomplete:' >&2
fi
if [ "${1:-}" = "--update" ]; then
	echo "$count" >"$baseline_file"
	echo "duplicates: baseline set to $count pairs in $baseline_file"
	exit 0
fi
base=$(tr -dc '0-9' <"$baseline_file")
if [ "$count" -gt "$base" ]; then
	echo "duplicates: $count pairs of duplicated places, above the baseline of $base in $baseline_file." >&2
	echo "  See what your change wrote again: duplicates --change --base <branch point>" >&2
	echo "  If the new pairs are intended, update the baseline: make duplicates-baseline (and commit $baseline_file)" >&2
	exit 1
fi
if [ "$count" -lt "$base" ]; then
	echo "duplicates: $count pairs, below the baseline of $base: lower it with make duplicates-baseline"
else
	echo "duplicates: $count pairs (baseline $base)"
fi
