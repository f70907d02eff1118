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

demo_operator() {
  step "operator: the LLMDeployment CRD, the operator, and the builtin model on CPU as a fleet"
  local dir="${FLEETSERVE_CACHE_DIR:-$HOME/.cache/fleetserve}/demo"
  mkdir -p "$dir"
  kubectl apply --server-side --force-conflicts -f crds/
  kubectl wait --for=condition=Established --timeout=60s crd/llmdeployments.fleetserve.io
  if [[ -f "$dir/operator.pid" ]] && kill -0 "$(cat "$dir/operator.pid")" 2>/dev/null; then
    echo "operator already running (pid $(cat "$dir/operator.pid"))"
  else
    # One namespace: a shared dev cluster may hold other people's LLMDeployments.
    fleetserve operator --namespace default --metrics-port 0 >"$dir/operator.log" 2>&1 &
    echo $! >"$dir/operator.pid"
    echo "operator started (pid $!, log $dir/operator.log)"
  fi
  kubectl apply -f examples/smollm2-cpu.yaml
  echo "waiting for Ready (the first start converts the builtin model; a few minutes on a busy CPU)..."
  kubectl wait --for=condition=Ready --timeout=900s llmd/smollm2-cpu
  kubectl get llmd
  local addr=""
  for _ in $(seq 1 120); do
    addr=$(kubectl get service smollm2-cpu -o jsonpath='{.metadata.annotations.fleetserve\.io/proxy-address}')
    [[ -n "$addr" ]] && curl -fsS "http://$addr/ready" >/dev/null 2>&1 && break
    sleep 0.5
  done
  echo "POST http://$addr/v1/chat/completions  (the Service, through the dev cluster's service proxy)"
  curl -fsS "http://$addr/v1/chat/completions" -H 'Content-Type: application/json' \
    -d '{"model": "smollm2-135m-instruct", "max_tokens": 48, "temperature": 0,
         "messages": [{"role": "user", "content": "In one sentence, what is Kubernetes?"}]}' |
    python3 -c 'import json, sys; print("answer:", json.load(sys.stdin)["choices"][0]["message"]["content"].strip())'
  kubectl describe llmd smollm2-cpu | sed -n '/^Status:/,$p'
  echo
  echo "Tear down the fleet:   kubectl delete -f examples/smollm2-cpu.yaml"
  echo "Stop the operator:     kill \$(cat $dir/operator.pid)"
}

demo_cluster
demo_operator
# (next steps: autoscaling)

step "done"
echo "The dev cluster keeps running; use it with:  eval \"\$(fleetserve dev-cluster env)\""
echo "Stop it with:                               fleetserve dev-cluster down"
