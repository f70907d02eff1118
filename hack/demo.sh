#!/usr/bin/env bash
# `make demo`: the main job end to end on this machine, against a real
# Kubernetes control plane on loopback.  Each step is a function; later steps
# (the inference server, the operator, autoscaling) are added as they land.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# True while the pid in file $1 is a live `fleetserve operator` process.
operator_running() {
  [[ -f "$1" ]] || return 1
  local pid; pid="$(cat "$1")"
  [[ "$pid" =~ ^[0-9]+$ ]] && tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -q "fleetserve operator"
}

# Earlier versions of this script kept the operator's pid in the cache dir, where `down` never saw it.
stop_legacy_operator() {
  local legacy="${FLEETSERVE_CACHE_DIR:-$HOME/.cache/fleetserve}/demo/operator.pid"
  if operator_running "$legacy"; then
    echo "stopping the operator an earlier demo left running (pid $(cat "$legacy"))"
    kill "$(cat "$legacy")"
  fi
  rm -rf "$(dirname "$legacy")"
}

# FLEETSERVE_DEV_CLUSTER_STATE (as for the tests) and FLEETSERVE_DEV_CLUSTER_PORT_BASE run the demo on a
# cluster of its own next to a shared one.
cluster_flags=()
[[ -n "${FLEETSERVE_DEV_CLUSTER_STATE:-}" ]] && cluster_flags+=(--state-dir "$FLEETSERVE_DEV_CLUSTER_STATE")

demo_cluster() {
  step "dev cluster: etcd + kube-apiserver + controller-manager + scheduler on 127.0.0.1"
  local port_flags=()
  [[ -n "${FLEETSERVE_DEV_CLUSTER_PORT_BASE:-}" ]] && port_flags+=(--port-base "$FLEETSERVE_DEV_CLUSTER_PORT_BASE")
  fleetserve dev-cluster up "${cluster_flags[@]}" "${port_flags[@]}"
  eval "$(fleetserve dev-cluster env "${cluster_flags[@]}")"
  echo "readyz: $(kubectl get --raw /readyz)"
  kubectl version
  # Informational: it exits 1 while the operator an earlier demo started is gone, which demo_operator restarts.
  fleetserve dev-cluster status "${cluster_flags[@]}" || true
}

# `start_operator PIDFILE LOG`: `fleetserve operator` for the cluster of $KUBECONFIG, detached (its own session),
# outliving this script, with no file descriptor of ours but stdout/stderr (to LOG): one it inherited would keep
# what this script was given open for as long as the operator runs (e.g. `flock LOCK hack/demo.sh`'s lock).
start_operator() {
  (
    for fd in /proc/self/fd/*; do
      fd=${fd##*/}
      if ((fd > 2)); then eval "exec $fd>&-" 2>/dev/null || true; fi
    done
    exec setsid fleetserve operator --namespace default --metrics-port 0 --no-leader-election </dev/null >>"$2" 2>&1
  ) &
  echo $! >"$1"
}

demo_operator() {
  step "operator: the LLMDeployment CRD, the operator, and the builtin model on CPU as a fleet"
  # The operator is one of the dev cluster's processes: its pid file lives in the state dir, so
  # `fleetserve dev-cluster down` stops it with the rest, and a new cluster never finds an old one.
  local state; state="$(dirname "$KUBECONFIG")"
  local pidfile="$state/pids/demo-operator.pid" log="$state/logs/demo-operator.log"
  local ca; ca="$(sha256sum "$state/pki/ca.crt" | cut -d' ' -f1)"
  stop_legacy_operator
  kubectl apply --server-side --force-conflicts -f crds/
  kubectl wait --for=condition=Established --timeout=60s crd/llmdeployments.fleetserve.io
  if operator_running "$pidfile" && [[ "$(cat "$state/demo-operator.ca" 2>/dev/null)" == "$ca" ]]; then
    echo "operator already running for this cluster (pid $(cat "$pidfile"))"
  else
    if operator_running "$pidfile"; then  # started against another cluster's CA: it can never work here
      echo "stopping a stale operator (pid $(cat "$pidfile")) that serves another cluster"
      kill "$(cat "$pidfile")"
    fi
    mkdir -p "$state/pids" "$state/logs"
    # One namespace: a shared dev cluster may hold other people's LLMDeployments.
    start_operator "$pidfile" "$log"
    echo "$ca" >"$state/demo-operator.ca"
    echo "operator started (pid $!, log $log)"
  fi
  kubectl apply -f examples/smollm2-cpu.yaml
  # An earlier demo left this fleet behind the router at minReplicas 0 (demo_router), where it is never Ready by
  # itself: back to the example's spec (in a merge patch null removes a field; the API server defaults it again).
  kubectl patch llmd smollm2-cpu --type=merge -p '{"spec": {"router": null, "autoscaling": null, "replicas": 1}}'
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
}

# Seconds since the epoch, with milliseconds.
now() { date +%s.%3N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):7.2f} s')" "$1" "$2"; }

demo_router() {
  step "router: the fleet behind fleetserve router, scaled to zero, and back for a held request"
  local window=30
  kubectl patch llmd smollm2-cpu --type=merge -p "{\"spec\": {
    \"router\": {\"enabled\": true, \"replicas\": 1},
    \"autoscaling\": {\"enabled\": true, \"minReplicas\": 0, \"maxReplicas\": 1, \"scrapeIntervalSeconds\": 2,
                      \"scaleDownStabilizationSeconds\": $window}}}"
  echo "waiting for the router pod, and for Service smollm2-cpu to select it..."
  kubectl wait --for=condition=RouterReady --timeout=300s llmd/smollm2-cpu
  kubectl get llmd smollm2-cpu -o jsonpath='{.status.conditions[?(@.type=="RouterReady")].message}{"\n"}'
  kubectl get service smollm2-cpu smollm2-cpu-servers -o wide
  local idle; idle=$(now)
  echo "no traffic: the autoscaler scales to zero after the ${window} s scale-down window..."
  for _ in $(seq 1 300); do
    [[ "$(kubectl get llmd smollm2-cpu -o jsonpath='{.status.desiredReplicas}')" == "0" ]] && break
    sleep 1
  done
  echo "desiredReplicas 0 after $(since "$idle" "$(now)") idle: $(kubectl get llmd smollm2-cpu \
    -o jsonpath='{.status.autoscaler.lastDecision.reason}')"
  local selector="app.kubernetes.io/name=fleetserve-server,app.kubernetes.io/instance=smollm2-cpu"
  while [[ -n "$(kubectl get pods -l "$selector" -o name)" ]]; do sleep 1; done
  echo "no server pod left; the router pod still runs:"
  kubectl get pods -l app.kubernetes.io/instance=smollm2-cpu

  local addr; addr=$(kubectl get service smollm2-cpu -o jsonpath='{.metadata.annotations.fleetserve\.io/proxy-address}')
  local answer; answer=$(mktemp)
  local sent; sent=$(now)
  echo "POST http://$addr/v1/chat/completions while no server runs: the router holds it..."
  curl -sS "http://$addr/v1/chat/completions" -H 'Content-Type: application/json' -o "$answer" \
    -d '{"model": "smollm2-135m-instruct", "max_tokens": 32, "temperature": 0,
         "messages": [{"role": "user", "content": "In one sentence, what is a GPU?"}]}' &
  local client=$! decided="" ready=""
  while kill -0 "$client" 2>/dev/null; do
    if [[ -z "$decided" && "$(kubectl get llmd smollm2-cpu -o jsonpath='{.status.desiredReplicas}')" == "1" ]]; then
      decided=$(now)
    fi
    if [[ -z "$ready" ]] && kubectl get pods -l "$selector" \
        -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -q True; then
      ready=$(now)
    fi
    sleep 0.3
  done
  wait "$client"
  local answered; answered=$(now)
  echo "timeline (from the request's arrival at the router):"
  echo "  $(since "$sent" "$sent")  request sent to Service smollm2-cpu (held by the router)"
  [[ -n "$decided" ]] && echo "  $(since "$sent" "$decided")  scale decision: desiredReplicas 0 -> 1"
  [[ -n "$ready" ]] && echo "  $(since "$sent" "$ready")  server pod Ready"
  echo "  $(since "$sent" "$answered")  answer received"
  kubectl get llmd smollm2-cpu -o jsonpath='  decision: {.status.autoscaler.lastDecision.reason}{"\n"}'
  python3 -c 'import json, sys; print("answer:", json.load(open(sys.argv[1]))["choices"][0]["message"]["content"].strip())' "$answer"
  rm -f "$answer"
  echo
  echo "The fleet stays behind the router at minReplicas 0: it goes back to zero after ${window} s without traffic."
  echo "Tear down the fleet:   kubectl delete llmd smollm2-cpu"
  echo "The operator stops with: fleetserve dev-cluster down"
}

# The Karpenter step runs on a dev cluster of its own, `<state>-karpenter` with ports at the main cluster's
# base + 500, brought down when the step ends: the main cluster is the one the tests reuse, and they expect a
# GPU pod beyond its GPUs to stay Pending, which Karpenter would end by provisioning a node for it.
demo_karpenter() (  # a subshell: its KUBECONFIG and its EXIT trap stay here
  step "cluster autoscaling: load grows the fleet onto a GPU node Karpenter provisions, then it shrinks"
  local started=$SECONDS main_state; main_state="$(dirname "$KUBECONFIG")"
  local state="$main_state-karpenter" name=tiny-gpu
  local base; base=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["port_base"] + 500)' \
    "$main_state/cluster.json")
  fleetserve dev-cluster down --state-dir "$state" >/dev/null  # one an interrupted demo left behind
  # Down when the step ends well; after a failure it stays up for a look (the next demo downs it first).
  trap 'if (($?)); then echo "the Karpenter step failed; its cluster stays up: KUBECONFIG=$state/kubeconfig," \
    "logs in $state/logs; then: fleetserve dev-cluster down --state-dir $state" >&2
    else echo "bringing the Karpenter cluster down"; fleetserve dev-cluster down --state-dir "$state" >/dev/null; fi' EXIT
  echo "a cluster of its own in $state: 1 static node with 1 GPU, and Karpenter's NodePool gpu that may add"
  echo "2 GPU nodes, each registering 10 s after its NodeClaim (a real GPU node boots for minutes)"
  fleetserve dev-cluster up --state-dir "$state" --port-base "$base" --nodes 1 --gpus-per-node 1 \
    --karpenter --max-gpu-nodes 2 --node-provision-seconds 10
  export KUBECONFIG="$state/kubeconfig"
  kubectl get nodepools,nodes
  kubectl apply --server-side --force-conflicts -f crds/ >/dev/null
  kubectl wait --for=condition=Established --timeout=60s crd/llmdeployments.fleetserve.io >/dev/null
  # The operator as one of this cluster's processes: `down` stops it with the rest.
  start_operator "$state/pids/demo-operator.pid" "$state/logs/demo-operator.log"
  # A tiny random-weight Llama: the load needs many quick requests, not good answers, on a CPU shared by all.
  # <state>/test-models is part of every pod's "image" in the dev cluster (the tests' models live there too).
  TQDM_DISABLE=1 python -c 'import sys; from fleetserve_server.testing import make_tiny_llama
make_tiny_llama(sys.argv[1])' "$state/test-models/tiny-llama"
  # 1 GPU per replica (the dev cluster's GPUs are pretend: the server runs on CPU), 1 to 2 replicas, 2 requests
  # in flight per replica wanted, scale-down after a 20 s window.
  kubectl apply -f - <<YAML
apiVersion: fleetserve.io/v1alpha1
kind: LLMDeployment
metadata:
  name: $name
spec:
  model: {source: $state/test-models/tiny-llama, servedName: tiny}
  resources: {gpus: 1, gpuMemory: 8Gi, memory: 2Gi}
  engine: {maxModelLen: 512, maxNumSeqs: 4, maxBatchTokens: 512}
  replicas: 1
  autoscaling: {enabled: true, minReplicas: 1, maxReplicas: 2, targetQueueLength: 2, targetKVCacheUsage: 0.95,
                scaleUpStabilizationSeconds: 0, scaleDownStabilizationSeconds: 20, scrapeIntervalSeconds: 2}
YAML
  kubectl wait --for=condition=Ready --timeout=300s "llmd/$name"
  kubectl get pods -o wide
  local addr=""
  for _ in $(seq 1 120); do
    addr=$(kubectl get service "$name" -o jsonpath='{.metadata.annotations.fleetserve\.io/proxy-address}')
    [[ -n "$addr" ]] && curl -fsS "http://$addr/ready" >/dev/null 2>&1 && break
    sleep 0.5
  done
  python hack/demo_karpenter.py "$name" "$addr"
  echo "the Karpenter step took $((SECONDS - started)) s; to run Karpenter yourself:"
  echo "  fleetserve dev-cluster up --nodes 1 --gpus-per-node 1 --karpenter  (README: Cluster autoscaling)"
)

demo_cluster
demo_operator
demo_router
demo_karpenter

step "done"
echo "The dev cluster keeps running; use it with:  eval \"\$(fleetserve dev-cluster env ${cluster_flags[*]})\""
echo "Stop it (and the operator) with:            fleetserve dev-cluster down ${cluster_flags[*]}"
