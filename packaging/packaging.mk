# packaging.mk: static cross builds and Debian packages. Included by the
# Makefile, whose GO and VERSION it uses. The recipes live in packaging/*.sh
# so that the Go tests in packaging/ run exactly what ships.
#
#   make cross   dist/edgegate_linux_{arm64,armv7,armv6,amd64}
#   make deb     dist/edgegate_<version>_{arm64,armhf,armel,amd64}.deb and
#                dist/edgegate-central_<version>_{arm64,amd64}.deb
#   make deb-central   only the companion's packages
#
# Same commit, same Go: same bytes (packaging/build_test.go checks it).

DIST ?= dist
# Every timestamp in a package is the commit time, not the build time.
SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null || echo 0)
export SOURCE_DATE_EPOCH
DEB_VERSION ?= $(shell packaging/debversion.sh)
export DEB_VERSION
# The armhf package carries the ARMv6 binary: Raspberry Pi OS 32-bit is
# "armhf" but must also run on the ARMv6 Pi Zero and Pi 1, where an ARMv7
# binary refuses to start. Set to 7 for ARMv7-only fleets.
DEB_ARMHF_GOARM ?= 6

# target (GOARCH[/GOARM]) : dist name suffix
CROSS_TARGETS := arm64:arm64 arm/7:armv7 arm/6:armv6 amd64:amd64
# Debian architecture : binary suffix
DEB_TARGETS := arm64:arm64 armhf:armv$(DEB_ARMHF_GOARM) armel:armv6 amd64:amd64
HOST_EDGEGATE := $(DIST)/.host/edgegate
# The companion runs on a server, not on a Pi: 64-bit only.
CENTRAL_TARGETS := arm64 amd64
HOST_CENTRAL := $(DIST)/.host-central/edgegate-central

.PHONY: cross deb deb-central test-packaging repro-check

cross:
	@mkdir -p $(DIST)
	@set -e; for t in $(CROSS_TARGETS); do \
	  echo "build $(DIST)/edgegate_linux_$${t#*:}"; \
	  GO="$(GO)" VERSION="$(VERSION)" packaging/gobuild.sh "$${t%%:*}" "$(DIST)/edgegate_linux_$${t#*:}"; \
	done
	cd $(DIST) && sha256sum edgegate_linux_* > SHA256SUMS-binaries

deb: cross deb-central
	@# A binary for this machine prints the default configuration.
	GO="$(GO)" VERSION="$(VERSION)" packaging/gobuild.sh "$$($(GO) env GOHOSTARCH)" $(HOST_EDGEGATE)
	@set -e; for t in $(DEB_TARGETS); do \
	  GO="$(GO)" packaging/deb.sh "$${t%%:*}" "$(DIST)/edgegate_linux_$${t#*:}" $(HOST_EDGEGATE) $(DIST); \
	done
	rm -rf $(DIST)/.host
	cd $(DIST) && sha256sum edgegate_*.deb edgegate-central_*.deb > SHA256SUMS-deb

# The companion: same scripts, same reproducibility, its own nfpm file.
deb-central:
	@mkdir -p $(DIST)
	GO="$(GO)" VERSION="$(VERSION)" packaging/gobuild.sh "$$($(GO) env GOHOSTARCH)" $(HOST_CENTRAL) edgegate-central
	@set -e; for a in $(CENTRAL_TARGETS); do \
	  echo "build $(DIST)/edgegate-central_linux_$$a"; \
	  GO="$(GO)" VERSION="$(VERSION)" packaging/gobuild.sh "$$a" "$(DIST)/edgegate-central_linux_$$a" edgegate-central; \
	  GO="$(GO)" packaging/deb.sh "$$a" "$(DIST)/edgegate-central_linux_$$a" $(HOST_CENTRAL) $(DIST) edgegate-central; \
	done
	rm -rf $(DIST)/.host-central

# The packaging tests alone (unit, package contents, lintian, sandbox score).
test-packaging:
	CGO_ENABLED=1 $(GO) test -race -count=1 ./packaging/...
	CGO_ENABLED=1 $(GO) test -race -count=1 -run 'Notify|Watchdog' ./internal/daemon

# The reproducibility test with a cold build cache for the second build
# (recompiles everything: slower than the default test run allows).
repro-check:
	EDGEGATE_REPRO_COLD=1 $(GO) test -count=1 -run TestReproducibleBuild -v ./packaging
