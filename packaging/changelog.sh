#!/bin/sh
# Prints the Debian changelog entry for VERSION (a native package: one
# entry per build, made from the commit), dated SOURCE_DATE_EPOCH so that
# the same commit gives the same changelog.gz.
# usage: packaging/changelog.sh VERSION MAINTAINER [PACKAGE]
# DEB_COMMIT and DEB_SUBJECT override what git says (the tests pin them, so
# a commit landing while they run does not change the package).
set -eu
cd "$(dirname "$0")/.."
version=$1 maintainer=$2 package=${3:-edgegate}
commit=${DEB_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}
subject=${DEB_SUBJECT:-$(git log -1 --format=%s 2>/dev/null | cut -c1-40 || echo "local build")}
date=$(LC_ALL=C date -u -R -d "@${SOURCE_DATE_EPOCH:-0}")
cat <<CL
$package ($version) unstable; urgency=medium

  * Built from commit $commit: $subject

 -- $maintainer  $date
CL
