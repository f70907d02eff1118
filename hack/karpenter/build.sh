#!/usr/bin/env bash
# Build Karpenter's kwok cloud provider (upstream's kwok/main.go) of one
# Karpenter release from the Go module proxy, into the user cache dir, and copy
# the release's CRDs (NodePool, NodeClaim, NodeOverlay, KWOKNodeClass, ...)
# next to it:
#
#   <cache>/karpenter/<KARPENTER_VERSION>/bin/karpenter-kwok
#   <cache>/karpenter/<KARPENTER_VERSION>/crds/*.yaml
#
# `go install sigs.k8s.io/karpenter/kwok@vX` would do, but the binary must not
# depend on a GOBIN; a wrapper module whose main.go is upstream's kwok/main.go
# (copied from the module cache: a main package cannot be imported) resolves
# exactly upstream's dependency versions from its go.mod.
#
# v1.15.0's go.mod says `go 1.26.9`: GOTOOLCHAIN=go1.27.3 makes the go command
# fetch that toolchain through the same module proxy (golang.org/toolchain)
# when the local Go is older.  v1.13.0 builds with Go 1.26.8 as it is.
set -euo pipefail
KARPENTER_VERSION="${KARPENTER_VERSION:-v1.15.0}"
export GOTOOLCHAIN="${GOTOOLCHAIN_KARPENTER:-go1.27.3}"
CACHE="${FLEETSERVE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fleetserve}"
base="$CACHE/karpenter/$KARPENTER_VERSION"
OUT="$base/bin"
if [[ -x "$OUT/karpenter-kwok" && -f "$base/crds/.complete" ]]; then
  echo "karpenter $KARPENTER_VERSION: cached in $OUT"; exit 0
fi
if ! command -v go >/dev/null; then
  echo "hack/karpenter/build.sh: Karpenter is built from the Go module proxy and needs the Go toolchain on PATH" >&2
  exit 1
fi
mkdir -p "$CACHE/karpenter"
exec 9>"$CACHE/karpenter/.build.lock"   # two concurrent builds would share one source dir
flock 9
if [[ -x "$OUT/karpenter-kwok" && -f "$base/crds/.complete" ]]; then
  echo "karpenter $KARPENTER_VERSION: cached in $OUT"; exit 0
fi
work="$base/src"
rm -rf "$work" "$base/crds"; mkdir -p "$work" "$OUT" "$base/crds"
cd "$work"
upstream="$(GOFLAGS=-mod=mod go mod download -json "sigs.k8s.io/karpenter@$KARPENTER_VERSION" \
  | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["Dir"]) if "Dir" in d else sys.exit("go mod download: " + d.get("Error", "?"))')"
go_line="$(grep -m1 '^go ' "$upstream/go.mod")"
cat > go.mod <<MOD
module fleetserve.local/karpenterbuild

$go_line

require sigs.k8s.io/karpenter $KARPENTER_VERSION
MOD
install -m 0644 "$upstream/kwok/main.go" main.go
echo "resolving modules for karpenter $KARPENTER_VERSION (GOTOOLCHAIN=$GOTOOLCHAIN)..."
GOFLAGS=-mod=mod go mod tidy
echo "building karpenter-kwok..."
CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w" -o "$OUT/karpenter-kwok.tmp" .
mv "$OUT/karpenter-kwok.tmp" "$OUT/karpenter-kwok"
install -m 0644 "$upstream"/pkg/apis/crds/*.yaml "$upstream"/kwok/apis/crds/*.yaml "$base/crds/"
touch "$base/crds/.complete"
echo "karpenter $KARPENTER_VERSION built into $OUT; CRDs in $base/crds"
