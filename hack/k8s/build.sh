#!/usr/bin/env bash
# Build kube-apiserver, kube-controller-manager, kube-scheduler and kubectl of
# one Kubernetes release from the Go module proxy, into the user cache dir.
# `build.sh kubelet kube-proxy` builds just those (the real nodes of
# `dev-cluster up --real-nodes`); only missing binaries are built.
#
# `go install k8s.io/kubernetes/cmd/...@vX` refuses because upstream's go.mod
# replaces every staging module with ./staging/...; a wrapper module that
# requires k8s.io/kubernetes and replaces each staging module with its
# published v0.Y.Z tag resolves the same code from the proxy.  The replace
# list is generated from upstream's own go.mod because it changes per minor.
set -euo pipefail
K8S_VERSION="${K8S_VERSION:-v1.36.3}"
CACHE="${FLEETSERVE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fleetserve}"
OUT="$CACHE/k8s/$K8S_VERSION/bin"
BINS=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
[[ $# -gt 0 ]] && BINS=("$@")
missing=()
for b in "${BINS[@]}"; do [[ -x "$OUT/$b" ]] || missing+=("$b"); done
if [[ ${#missing[@]} == 0 ]]; then echo "kubernetes $K8S_VERSION (${BINS[*]}): cached in $OUT"; exit 0; fi

minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"; patch="${K8S_VERSION##*.}"
staging_version="v0.$minor.$patch"
work="$CACHE/k8s/$K8S_VERSION/src"
rm -rf "$work"; mkdir -p "$work" "$OUT"
cd "$work"
upstream_mod="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
go_line="$(grep -m1 '^go ' "$upstream_mod")"
godebug_line="$(grep -m1 '^godebug ' "$upstream_mod" || true)"
{
  echo "module fleetserve.local/k8sbuild"
  echo
  echo "$go_line"
  [[ -n "$godebug_line" ]] && echo "$godebug_line"
  echo
  echo "require k8s.io/kubernetes $K8S_VERSION"
  echo
  echo "replace ("
  grep -E '^\s+k8s\.io/[^ ]+ => \./staging/' "$upstream_mod" | awk -v v="$staging_version" '{print "\t" $1 " => " $1 " " v}'
  echo ")"
} > go.mod
cat > tools.go <<'GO'
//go:build tools

package k8sbuild

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
)
GO
echo "resolving modules for kubernetes $K8S_VERSION (staging $staging_version)..."
GOFLAGS=-mod=mod go mod tidy -e >/dev/null 2>&1 || true
GOFLAGS=-mod=mod go get "k8s.io/kubernetes@$K8S_VERSION"
pkg=k8s.io/component-base/version
ldflags="-s -w -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
ldflags="$ldflags -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"
for b in "${missing[@]}"; do
  echo "building $b..."
  CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "$ldflags" -o "$OUT/$b.tmp" "k8s.io/kubernetes/cmd/$b"
  mv "$OUT/$b.tmp" "$OUT/$b"
done
echo "kubernetes $K8S_VERSION (${missing[*]}) built into $OUT"
