#!/usr/bin/env bash
# The headline ratios of BENCHMARKS.md, each the median of 3 rounds with the systems interleaved
# (A B A B A B) after a warm-up of each system (issue 13 point 7). Run on an otherwise idle machine;
# every command prints the load average per round. Raw JSON: benchmarks/results/headline-*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
RUNS=${RUNS:-3}
mkdir -p benchmarks/results
# Offline, uniform: fleetserve vs HF static batching, transformers' generate_batch, HF generate one by one.
"$BIN/fleetserve" bench offline --model builtin:smollm2-135m-instruct --num-prompts 32 --input-len 128 \
  --output-len 64 --baselines hf-static,transformers-cb,hf-sequential --sequential-prompts 4 --threads 2 \
  --workload uniform --runs "$RUNS" --output benchmarks/results/headline-offline-uniform.json
# Offline, mixed lengths: fleetserve vs HF static batching.
"$BIN/fleetserve" bench offline --model builtin:smollm2-135m-instruct --num-prompts 32 --baselines hf-static \
  --threads 2 --workload mixed --runs "$RUNS" --output benchmarks/results/headline-offline-mixed.json
# Serving, 32 streamed chat requests at once: fleetserve vs `transformers serve --continuous-batching`.
"$BIN/fleetserve" bench serve --num-prompts 32 --input-len 128 --output-len 64 --concurrency 32 \
  --baseline transformers-serve --threads 2 --runs "$RUNS" --output-json benchmarks/results/headline-serve.json
# Serving, 16 requests at once: fleetserve vs the naive one-request-at-a-time server (16, not 32: the
# naive server takes ~6 minutes per round for 32).
"$BIN/fleetserve" bench serve --num-prompts 16 --input-len 128 --output-len 64 --concurrency 16 \
  --baseline naive --threads 2 --runs "$RUNS" --output-json benchmarks/results/headline-serve-naive.json
