#!/usr/bin/env bash
# The Prometheus Operator's CRDs (ServiceMonitor, PrometheusRule, ...) for the tests that need a
# cluster that looks like kube-prometheus-stack, at a pinned version, never hand-written.
#
# Source: the Go module github.com/prometheus-operator/prometheus-operator at $PROMETHEUS_OPERATOR_VERSION,
# from the Go module proxy. The module ships its CRDs under example/prometheus-operator-crd/, generated
# upstream by controller-gen from pkg/apis/monitoring (the same version of the types); they are copied
# as shipped, and the copy is checked to be controller-gen output of that version.
#
#   out: <cache>/prometheus-operator-crds/<version>/monitoring.coreos.com_*.yaml
#
# Usage: hack/prometheus-operator-crds.sh        (idempotent; prints the directory)
set -euo pipefail
cd "$(dirname "$0")/.."

PROMETHEUS_OPERATOR_VERSION="${PROMETHEUS_OPERATOR_VERSION:-v0.85.0}"
MODULE="github.com/prometheus-operator/prometheus-operator"
CACHE="${FLEETSERVE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fleetserve}"  # as fleetserve_devcluster.tools.cache_dir()
out="$CACHE/prometheus-operator-crds/$PROMETHEUS_OPERATOR_VERSION"

if [[ -f "$out/.complete" ]]; then echo "$out"; exit 0; fi
if ! command -v go >/dev/null; then
  echo "prometheus-operator-crds: needs the Go toolchain on PATH (it fetches $MODULE from the Go module proxy)" >&2
  exit 1
fi
# `go mod download` verifies the module against the checksum database (GONOSUMDB unset), so the
# files are the ones every user of this version gets.
scratch="$(mktemp -d)"; trap 'rm -rf "$scratch"' EXIT
dir="$(cd "$scratch" && GOFLAGS=-mod=mod go mod download -json "$MODULE@$PROMETHEUS_OPERATOR_VERSION" \
       | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("Dir") or sys.exit(d.get("Error","no Dir")))')"
src="$dir/example/prometheus-operator-crd"
want="${PROMETHEUS_OPERATOR_VERSION#v}"
rm -rf "$out.tmp"; mkdir -p "$out.tmp"
for f in "$src"/monitoring.coreos.com_*.yaml; do
  if ! grep -q "controller-gen.kubebuilder.io/version" "$f" || ! grep -q "operator.prometheus.io/version: $want\$" "$f"; then
    echo "prometheus-operator-crds: $f is not controller-gen output of $want" >&2; exit 1
  fi
  install -m 0644 "$f" "$out.tmp/"
done
touch "$out.tmp/.complete"
rm -rf "$out"; mv "$out.tmp" "$out"
echo "$out"
