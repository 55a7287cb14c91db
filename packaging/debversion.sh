#!/bin/sh
# Prints the Debian version for the checked-out commit. `git describe` is
# not one: a Debian version must start with a digit, and a "-" would mark a
# Debian revision (a non-native package).
#   v1.2.3                     -> 1.2.3
#   v1.2.3-4-gabc1234[-dirty]  -> 1.2.3+4.gabc1234[.dirty]
#   abc1234[-dirty] (no tag)   -> 0.0.0+git20261126.053000.abc1234[.dirty]
# The untagged form carries the commit time so that upgrades between
# untagged builds sort in commit order.
set -eu
cd "$(dirname "$0")/.."
d=$(git describe --tags --always --dirty 2>/dev/null || echo unknown)
case $d in
v[0-9]* | [0-9]*.[0-9]*)
	d=${d#v}
	base=${d%%-*}
	rest=${d#"$base"}
	rest=$(printf '%s' "${rest#-}" | tr -- - .)
	if [ -n "$rest" ]; then
		printf '%s+%s\n' "$base" "$rest"
	else
		printf '%s\n' "$base"
	fi
	;;
*)
	ts=$(git log -1 --format=%ct 2>/dev/null || echo 0)
	when=$(date -u -d "@$ts" +%Y%m%d.%H%M%S)
	printf '0.0.0+git%s.%s\n' "$when" "$(printf '%s' "$d" | tr -- - .)"
	;;
esac
