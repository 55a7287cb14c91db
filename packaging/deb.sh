#!/bin/sh
# Builds the edgegate .deb for one architecture from a binary already
# built by gobuild.sh. Used by `make deb` and by packaging/deb_test.go.
#
# usage: packaging/deb.sh DEB_ARCH BINARY HOST_BINARY OUTDIR
#   HOST_BINARY runs on this machine; it prints the default configuration
#   (`edgegate config template`), so the conffile is always the template
#   of the code being packaged, never a copy that drifts.
# Environment: DEB_VERSION (default: debversion.sh), DEB_MAINTAINER,
# SOURCE_DATE_EPOCH (default: the commit time), GO.
# Prints the path of the .deb.
set -eu
cd "$(dirname "$0")/.."

arch=$1 binary=$2 host=$3 outdir=$4
: "${GO:=go}"
: "${DEB_VERSION:=$(packaging/debversion.sh)}"
: "${DEB_MAINTAINER:=edgegate maintainers <edgegate@users.noreply.github.com>}"
: "${SOURCE_DATE_EPOCH:=$(git log -1 --format=%ct 2>/dev/null || echo 0)}"
export SOURCE_DATE_EPOCH

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$host" config template >"$work/edgegate.yaml"
# -n: no name or time in the gzip header, for reproducible bytes.
packaging/changelog.sh "$DEB_VERSION" "$DEB_MAINTAINER" | gzip -9n >"$work/changelog.gz"
# nfpm takes a file's mode from file_info, but an unset mtime from the
# source file: pin the generated ones too.
touch -d "@$SOURCE_DATE_EPOCH" "$work/edgegate.yaml" "$work/changelog.gz"

mkdir -p "$outdir"
deb="$outdir/edgegate_${DEB_VERSION}_${arch}.deb"
DEB_ARCH=$arch DEB_VERSION=$DEB_VERSION DEB_MAINTAINER=$DEB_MAINTAINER \
	DEB_BINARY=$binary DEB_CONFIG=$work/edgegate.yaml DEB_CHANGELOG=$work/changelog.gz \
	"$GO" tool nfpm package --config packaging/nfpm.yaml --packager deb --target "$deb" >&2
echo "$deb"
