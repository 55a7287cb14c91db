#!/bin/sh
# Builds one static edgegate binary, reproducibly: the same commit, Go
# version and target give the same bytes on any machine and in any
# directory. Used by `make cross`, `make deb` and packaging/build_test.go,
# so the test checks exactly what ships.
#
# usage: packaging/gobuild.sh GOARCH[/GOARM] OUTPUT [COMMAND]
#   e.g. packaging/gobuild.sh arm/6 dist/edgegate_linux_armv6
#   COMMAND is the directory under cmd/ (default edgegate; edgegate-central
#   for the companion's package and container image).
# VERSION (default: git describe) is stamped into daemon.Version.
set -eu
cd "$(dirname "$0")/.."

target=$1 out=$2 command=${3:-edgegate}
arch=${target%%/*}
goarm=
case $target in
*/*) goarm=${target#*/} ;;
esac
: "${GO:=go}"
: "${VERSION:=$(git describe --tags --always --dirty 2>/dev/null || echo dev)}"

# -trimpath drops local paths, -buildid= the per-build id; VCS stamping
# (go version -m) is left on: for a given commit it is constant.
# CGO_ENABLED=0: a static binary runs on any Debian or Raspberry Pi OS
# release and needs no cross C toolchain.
CGO_ENABLED=0 GOOS=linux GOARCH=$arch GOARM=$goarm \
	exec "$GO" build -trimpath \
	-ldflags "-s -w -buildid= -X github.com/edgegate/edgegate/internal/daemon.Version=$VERSION" \
	-o "$out" "./cmd/$command"
