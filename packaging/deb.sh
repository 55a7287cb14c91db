#!/bin/sh
# Builds a .deb for one architecture from a binary already built by
# gobuild.sh: the gateway (edgegate, packaging/nfpm.yaml) or the companion
# (edgegate-central, packaging/central/nfpm.yaml). Used by `make deb` and
# by packaging/deb_test.go.
#
# usage: packaging/deb.sh DEB_ARCH BINARY HOST_BINARY OUTDIR [PACKAGE]
#   PACKAGE is edgegate (default) or edgegate-central.
#   HOST_BINARY runs on this machine. For edgegate it prints the default
#   configuration (`edgegate config template`), so the conffile is always
#   the template of the code being packaged, never a copy that drifts; for
#   edgegate-central it checks the shipped example configuration
#   (`edgegate-central config check`), so a conffile the binary refuses is
#   never packaged.
# Environment: DEB_VERSION (default: debversion.sh), DEB_MAINTAINER,
# SOURCE_DATE_EPOCH (default: the commit time), GO.
# Prints the path of the .deb.
set -eu
cd "$(dirname "$0")/.."

arch=$1 binary=$2 host=$3 outdir=$4 package=${5:-edgegate}
: "${GO:=go}"
: "${DEB_VERSION:=$(packaging/debversion.sh)}"
: "${DEB_MAINTAINER:=edgegate maintainers <edgegate@users.noreply.github.com>}"
: "${SOURCE_DATE_EPOCH:=$(git log -1 --format=%ct 2>/dev/null || echo 0)}"
export SOURCE_DATE_EPOCH

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
case $package in
edgegate)
	nfpm=packaging/nfpm.yaml
	"$host" config template >"$work/config.yaml"
	;;
edgegate-central)
	nfpm=packaging/central/nfpm.yaml
	cp packaging/central/config.yaml "$work/config.yaml"
	"$host" config check --config "$work/config.yaml" >&2
	;;
*)
	echo "deb.sh: unknown package '$package' (edgegate or edgegate-central)" >&2
	exit 2
	;;
esac
# -n: no name or time in the gzip header, for reproducible bytes.
packaging/changelog.sh "$DEB_VERSION" "$DEB_MAINTAINER" "$package" | gzip -9n >"$work/changelog.gz"
# nfpm takes a file's mode from file_info, but an unset mtime from the
# source file: pin the generated ones too.
touch -d "@$SOURCE_DATE_EPOCH" "$work/config.yaml" "$work/changelog.gz"

mkdir -p "$outdir"
deb="$outdir/${package}_${DEB_VERSION}_${arch}.deb"
DEB_ARCH=$arch DEB_VERSION=$DEB_VERSION DEB_MAINTAINER=$DEB_MAINTAINER \
	DEB_BINARY=$binary DEB_CONFIG=$work/config.yaml DEB_CHANGELOG=$work/changelog.gz \
	"$GO" tool nfpm package --config "$nfpm" --packager deb --target "$deb" >&2
echo "$deb"
