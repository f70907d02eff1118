#!/usr/bin/env bash
# Reproduces the "Offline engine" figures of BENCHMARKS.md (float32, CPU).
# Each command measures fleetserve and its baselines in the same process.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
mkdir -p benchmarks/results
"$BIN/fleetserve" bench offline --model builtin:smollm2-135m-instruct --num-prompts 32 --input-len 128 \
  --output-len 64 --baselines hf-sequential,hf-static,transformers-cb --sequential-prompts 4 --threads 2 \
  --workload uniform --output benchmarks/results/offline-uniform.json
"$BIN/fleetserve" bench offline --model builtin:smollm2-135m-instruct --num-prompts 32 \
  --baselines hf-static --threads 2 --workload mixed --output benchmarks/results/offline-mixed.json
"$BIN/fleetserve" bench offline --model builtin:smollm2-135m-instruct --num-prompts 4 --input-len 16 \
  --output-len 4 --baselines none --quality --prefix --output benchmarks/results/offline-quality.json
