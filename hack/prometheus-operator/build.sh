#!/usr/bin/env bash
# Build the Prometheus Operator (cmd/operator) and its config reloader
# (cmd/prometheus-config-reloader) of one release from the Go module proxy,
# into the user cache dir:
#
#   <cache>/prometheus-operator/<PROMETHEUS_OPERATOR_VERSION>/bin/{prometheus-operator,prometheus-config-reloader}
#   <cache>/prometheus-operator/<PROMETHEUS_OPERATOR_VERSION>/rbac/*.yaml   (the module's example RBAC of
#       the operator and of Prometheus: ServiceAccounts, ClusterRoles, ClusterRoleBindings)
#
# `go install github.com/prometheus-operator/prometheus-operator/cmd/operator@vX`
# refuses: upstream's go.mod replaces its two API submodules (pkg/apis/monitoring,
# pkg/client) with ./pkg/...  Like hack/k8s/build.sh, a wrapper module requires
# the main module and repeats each of those replace lines with the submodule's
# published tag of the same version, generated from upstream's own go.mod.
set -euo pipefail
PROMETHEUS_OPERATOR_VERSION="${PROMETHEUS_OPERATOR_VERSION:-v0.85.0}"
MODULE="github.com/prometheus-operator/prometheus-operator"
CACHE="${FLEETSERVE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fleetserve}"
base="$CACHE/prometheus-operator/$PROMETHEUS_OPERATOR_VERSION"
OUT="$base/bin"
BINS=(prometheus-operator prometheus-config-reloader)
cached() { for b in "${BINS[@]}"; do [[ -x "$OUT/$b" ]] || return 1; done; [[ -f "$base/rbac/.complete" ]]; }
if cached; then echo "prometheus-operator $PROMETHEUS_OPERATOR_VERSION: cached in $OUT"; exit 0; fi
if ! command -v go >/dev/null; then
  echo "hack/prometheus-operator/build.sh: the Prometheus Operator is built from the Go module proxy and needs the Go toolchain on PATH" >&2
  exit 1
fi
mkdir -p "$CACHE/prometheus-operator"
exec 9>"$CACHE/prometheus-operator/.build.lock"   # two concurrent builds would share one source dir
flock 9
if cached; then echo "prometheus-operator $PROMETHEUS_OPERATOR_VERSION: cached in $OUT"; exit 0; fi
work="$base/src"
rm -rf "$work"; mkdir -p "$work" "$OUT"
cd "$work"
upstream_mod="$(GOFLAGS=-mod=mod go mod download -json "$MODULE@$PROMETHEUS_OPERATOR_VERSION" \
  | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["GoMod"]) if "GoMod" in d else sys.exit("go mod download: " + d.get("Error", "?"))')"
upstream="$(GOFLAGS=-mod=mod go mod download -json "$MODULE@$PROMETHEUS_OPERATOR_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
rm -rf "$base/rbac"; mkdir -p "$base/rbac"
for f in prometheus-operator/prometheus-operator-service-account.yaml prometheus-operator/prometheus-operator-cluster-role.yaml \
         prometheus-operator/prometheus-operator-cluster-role-binding.yaml prometheus/prometheus-service-account.yaml \
         prometheus/prometheus-cluster-role.yaml prometheus/prometheus-cluster-role-binding.yaml; do
  install -m 0644 "$upstream/example/rbac/$f" "$base/rbac/"
done
touch "$base/rbac/.complete"
go_line="$(grep -m1 '^go ' "$upstream_mod")"
{
  echo "module fleetserve.local/prometheusoperatorbuild"
  echo
  echo "$go_line"
  echo
  echo "require $MODULE $PROMETHEUS_OPERATOR_VERSION"
  echo
  echo "replace ("
  # upstream: `<module>/pkg/apis/monitoring => ./pkg/apis/monitoring`; here: that submodule at its published tag
  grep -E "^\s+$MODULE/[^ ]+ => \./" "$upstream_mod" | awk -v v="$PROMETHEUS_OPERATOR_VERSION" '{print "\t" $1 " => " $1 " " v}'
  echo ")"
} > go.mod
cat > tools.go <<GO
//go:build tools

package prometheusoperatorbuild

import (
	_ "$MODULE/cmd/operator"
	_ "$MODULE/cmd/prometheus-config-reloader"
)
GO
echo "resolving modules for prometheus-operator $PROMETHEUS_OPERATOR_VERSION..."
GOFLAGS=-mod=mod go get "$MODULE@$PROMETHEUS_OPERATOR_VERSION"
GOFLAGS=-mod=mod go mod tidy -e >/dev/null 2>&1 || true
pkg=github.com/prometheus/common/version
ldflags="-s -w -X $pkg.Version=${PROMETHEUS_OPERATOR_VERSION#v} -X $pkg.Revision=$PROMETHEUS_OPERATOR_VERSION -X $pkg.Branch=release -X $pkg.BuildUser=fleetserve -X $pkg.BuildDate=19700101-00:00:00"
build() {  # <binary> <package>
  [[ -x "$OUT/$1" ]] && return 0
  echo "building $1..."
  CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "$ldflags" -o "$OUT/$1.tmp" "$2"
  mv "$OUT/$1.tmp" "$OUT/$1"
}
build prometheus-operator "$MODULE/cmd/operator"
build prometheus-config-reloader "$MODULE/cmd/prometheus-config-reloader"
echo "prometheus-operator $PROMETHEUS_OPERATOR_VERSION built into $OUT"
