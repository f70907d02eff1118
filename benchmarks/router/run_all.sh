#!/usr/bin/env bash
# The router benchmarks of BENCHMARKS.md "Router" (issue 16 point 3), in the order they were run.
# Each step is one short command under the machine's heavy-work lock; results go to benchmarks/results/.
#   STATE=~/.cache/fleetserve/dev-cluster-b16 PORT_BASE=19000 benchmarks/router/run_all.sh [overhead|multiturn|docs|unique|zero]...
set -euo pipefail
cd "$(dirname "$0")/../.."
STATE="${STATE:-$HOME/.cache/fleetserve/dev-cluster-router-bench}"
PORT_BASE="${PORT_BASE:-19000}"
RATE_MULTITURN="${RATE_MULTITURN:-1.0}"   # multiturn: --rate-auto raises the conversations (from 6) until round-robin is 3x idle
RATE_UNIQUE="${RATE_UNIQUE:-0.6}"         # the first probe; --rate-auto raises it until least-load is 2x idle
LOCK=(flock /tmp/fleetserve-heavy.lock nice -n 19)
PY=.venv/bin/python
steps=("$@")
[[ ${#steps[@]} -gt 0 ]] || steps=(overhead multiturn unique zero)

bash benchmarks/router/setup_inference_perf.sh >/dev/null
.venv/bin/fleetserve dev-cluster up --state-dir "$STATE" --port-base "$PORT_BASE" >/dev/null
for step in "${steps[@]}"; do
  case "$step" in
    overhead)   # c: router overhead at 500 req/s against a stub backend (loopback, no cluster)
      "${LOCK[@]}" $PY benchmarks/router/overhead.py --rate 500 --seconds 10 --rounds 3 --pin \
        --json benchmarks/results/router-overhead.json ;;
    multiturn)  # a: router vs the Service's round-robin, 3 replicas, multi-turn chat (inference-perf)
      "${LOCK[@]}" $PY benchmarks/router/fleet_bench.py up --state-dir "$STATE"
      "${LOCK[@]}" $PY benchmarks/router/fleet_bench.py run --state-dir "$STATE" --scenario multiturn \
        --rate "$RATE_MULTITURN" --rate-auto --sessions 10 --rounds 3 \
        --json benchmarks/results/router-multiturn.json ;;
    docs)       # a, redone: a pasted document then short questions, a TCP connection per request in every arm
      "${LOCK[@]}" $PY benchmarks/router/fleet_bench.py up --state-dir "$STATE"
      "${LOCK[@]}" $PY benchmarks/router/fleet_bench.py run --state-dir "$STATE" --loadgen bench-serve \
        --fresh-connections --scenario docs --system-tokens 20 --doc-tokens 800 --question-tokens 12 \
        --output-len 16 --turns 5 --sessions 30 --rate 0.2 --idle-sessions 2 --idle-rate 0.1 \
        --single-sessions 3 --single-rate 0.1 --rounds 3 --seed 23 \
        --json benchmarks/results/router-multiturn-docs.json ;;
    unique)     # b: router vs least-load, unique prompts (inference-perf)
      "${LOCK[@]}" $PY benchmarks/router/fleet_bench.py up --state-dir "$STATE"
      "${LOCK[@]}" $PY benchmarks/router/fleet_bench.py run --state-dir "$STATE" --scenario unique \
        --rate "$RATE_UNIQUE" --rate-auto --auto-factor 2 --sessions 40 --probe-sessions 20 --idle-sessions 10 \
        --idle-rate 0.3 --rounds 3 --json benchmarks/results/router-unique.json ;;
    zero)       # d: 50 concurrent requests at 0 replicas, timeline plot
      "${LOCK[@]}" $PY benchmarks/router/fleet_bench.py down --state-dir "$STATE"
      "${LOCK[@]}" $PY benchmarks/router/from_zero.py --state-dir "$STATE" --requests 50 --runs 3 \
        --json benchmarks/results/router-from-zero.json --plot benchmarks/results/router-from-zero.png ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
