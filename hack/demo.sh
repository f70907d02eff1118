#!/usr/bin/env bash
# `make demo`: the main job end to end on this machine, against a real
# Kubernetes control plane on loopback.  Each step is a function; later steps
# (the inference server, the operator, autoscaling) are added as they land.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

demo_cluster() {
  step "dev cluster: etcd + kube-apiserver + controller-manager + scheduler on 127.0.0.1"
  fleetserve dev-cluster up
  eval "$(fleetserve dev-cluster env)"
  echo "readyz: $(kubectl get --raw /readyz)"
  kubectl version
  fleetserve dev-cluster status
}

demo_cluster
# (next steps: serve the builtin model and ask it a question; the operator; autoscaling)

step "done"
echo "The dev cluster keeps running; use it with:  eval \"\$(fleetserve dev-cluster env)\""
echo "Stop it with:                               fleetserve dev-cluster down"
