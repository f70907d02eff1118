#!/usr/bin/env bash
# Build fleetserve-otelcol — a minimal OpenTelemetry Collector distribution
# (OTLP receiver, file and debug exporters; main.go beside this script, the
# shape the collector's own builder generates) — from the Go module proxy into
# the user cache dir:
#
#   <cache>/otelcol/<OTELCOL_VERSION>/bin/fleetserve-otelcol
#
# The tracing integration tests export spans to it over OTLP/HTTP and read them
# back from the file exporter's JSON lines.  Every collector module is pinned at
# one release (core and contrib's fileexporter at v0.161.0, core's v1 modules at v1.67.0), which
# keeps their shared dependencies consistent.  (v0.161.0: core v0.163.0's otlpreceiver
# needs internal/statusutil@v0.163.0, and contrib v0.165.1's fileexporter
# extension/encoding/otlpencodingextension@v0.165.1, neither served by the module proxy.)
set -euo pipefail
OTELCOL_VERSION="${OTELCOL_VERSION:-v0.161.0}"
# contrib tags its own patch releases; this is the one paired with core OTELCOL_VERSION
OTELCOL_CONTRIB_VERSION="${OTELCOL_CONTRIB_VERSION:-v0.161.0}"
# the collector's stable (v1) modules of the same release
OTELCOL_STABLE_VERSION="${OTELCOL_STABLE_VERSION:-v1.67.0}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${FLEETSERVE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fleetserve}"
base="$CACHE/otelcol/$OTELCOL_VERSION"
OUT="$base/bin"
if [[ -x "$OUT/fleetserve-otelcol" ]]; then echo "otelcol $OTELCOL_VERSION: cached in $OUT"; exit 0; fi
if ! command -v go >/dev/null; then
  echo "hack/otelcol/build.sh: the collector is built from the Go module proxy and needs the Go toolchain on PATH" >&2
  exit 1
fi
mkdir -p "$OUT"
exec 9>"$base/.build.lock"
flock 9
if [[ -x "$OUT/fleetserve-otelcol" ]]; then echo "otelcol $OTELCOL_VERSION: cached in $OUT"; exit 0; fi
work="$base/src"; rm -rf "$work"; mkdir -p "$work"
cp "$HERE/main.go" "$HERE/go.mod" "$work/"; [[ -f "$HERE/go.sum" ]] && cp "$HERE/go.sum" "$work/"  # go.mod/go.sum: the versions and checksums resolved once
cd "$work"
echo "resolving collector modules $OTELCOL_VERSION..."
GOFLAGS=-mod=mod go get \
  "go.opentelemetry.io/collector/otelcol@$OTELCOL_VERSION" \
  "go.opentelemetry.io/collector/receiver/otlpreceiver@$OTELCOL_VERSION" \
  "go.opentelemetry.io/collector/exporter/debugexporter@$OTELCOL_VERSION" \
  "go.opentelemetry.io/collector/confmap/provider/envprovider@$OTELCOL_STABLE_VERSION" \
  "go.opentelemetry.io/collector/confmap/provider/fileprovider@$OTELCOL_STABLE_VERSION" \
  "github.com/open-telemetry/opentelemetry-collector-contrib/exporter/fileexporter@$OTELCOL_CONTRIB_VERSION"
GOFLAGS=-mod=mod go mod tidy
echo "building fleetserve-otelcol $OTELCOL_VERSION..."
CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w" -o "$OUT/fleetserve-otelcol.tmp" .
mv "$OUT/fleetserve-otelcol.tmp" "$OUT/fleetserve-otelcol"
echo "fleetserve-otelcol $OTELCOL_VERSION built into $OUT"
