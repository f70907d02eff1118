#!/usr/bin/env bash
# Build upstream Prometheus (cmd/prometheus, with every service discovery
# including Kubernetes') of one release from the Go module proxy, into the user
# cache dir:
#
#   <cache>/prometheus-go/<PROMETHEUS_GO_VERSION>/bin/prometheus
#
# Debian's `prometheus` package (tools.PROMETHEUS_VERSION, used for promtool and
# the chart's rule tests) is built without Kubernetes discovery; this one is the
# server `fleetserve dev-cluster up --monitoring` runs.  Prometheus's go.mod has
# no replace lines, so `go install <pkg>@<version>` resolves exactly upstream's
# dependency versions; its Go module tags are v0.<minor>.<patch> for release
# 3.<minor>.<patch>.  The web UI's assets are not embedded (upstream builds them
# with npm first): the HTTP API, which is all the dev cluster uses, is complete.
set -euo pipefail
PROMETHEUS_GO_VERSION="${PROMETHEUS_GO_VERSION:-v0.316.0}"
MODULE="github.com/prometheus/prometheus"
CACHE="${FLEETSERVE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fleetserve}"
base="$CACHE/prometheus-go/$PROMETHEUS_GO_VERSION"
OUT="$base/bin"
if [[ -x "$OUT/prometheus" ]]; then echo "prometheus $PROMETHEUS_GO_VERSION: cached in $OUT"; exit 0; fi
if ! command -v go >/dev/null; then
  echo "hack/prometheus/build.sh: Prometheus is built from the Go module proxy and needs the Go toolchain on PATH" >&2
  exit 1
fi
mkdir -p "$OUT"
exec 9>"$base/.build.lock"
flock 9
if [[ -x "$OUT/prometheus" ]]; then echo "prometheus $PROMETHEUS_GO_VERSION: cached in $OUT"; exit 0; fi
minor="${PROMETHEUS_GO_VERSION#v0.}"; minor="${minor%%.*}"; patch="${PROMETHEUS_GO_VERSION##*.}"
release="3.$minor.$patch"   # Go module v0.316.0 is Prometheus 3.16.0: tags v0.3MM.P
[[ "$minor" =~ ^3([0-9][0-9])$ ]] && release="3.$((10#${BASH_REMATCH[1]})).$patch"
pkg=github.com/prometheus/common/version
ldflags="-s -w -X $pkg.Version=$release -X $pkg.Revision=$PROMETHEUS_GO_VERSION -X $pkg.Branch=release -X $pkg.BuildUser=fleetserve -X $pkg.BuildDate=19700101-00:00:00"
tmp="$base/gobin.tmp"; rm -rf "$tmp"; mkdir -p "$tmp"
echo "building prometheus $release (module $MODULE@$PROMETHEUS_GO_VERSION)..."
CGO_ENABLED=0 GOBIN="$tmp" go install -trimpath -ldflags "$ldflags" "$MODULE/cmd/prometheus@$PROMETHEUS_GO_VERSION"
mv "$tmp/prometheus" "$OUT/prometheus"; rm -rf "$tmp"
echo "prometheus $PROMETHEUS_GO_VERSION built into $OUT"
