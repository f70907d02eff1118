#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one run (issue 15 point 6). From the repo root of a fresh box:
#
#     bash benchmarks/gpu_check.sh            # runs `make install` first when .venv is missing
#
# On a GPU machine it runs, in order:
#   1. greedy identity on CUDA: float16 and bfloat16 against Hugging Face, int8 and nf4 batched against
#      one-at-a-time, plus the planner's per-device prediction against the GPU allocation
#      (tests/integration/test_cuda_identity.py);
#   2. with two or more GPUs: tensor parallelism, TP=2 greedy identical to TP=1 on CUDA/NCCL
#      (tests/integration/test_tp_identity.py -k cuda);
#   3. the decode roofline: achieved HBM bandwidth of a decode step / the GPU's peak
#      (benchmarks/decode_roofline.py, builtin and a synthetic Llama-3.2-1B).
# Results: benchmarks/results/gpu_check/ (JUnit XML, roofline JSON, this run's log).
#
# Exit codes: 0 every check passed, or there is no NVIDIA GPU here (one line says why, nothing ran);
#             1 a check failed (the summary names it); 2 setup failed (make install, or torch sees no
#             CUDA device although nvidia-smi lists one: usually a driver older than torch's CUDA).
# GPU_CHECK_SKIP_INSTALL=1 skips `make install`; GPU_CHECK_ROOFLINE_ARGS adds arguments to the roofline runs.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

PY=.venv/bin/python
OUT=benchmarks/results/gpu_check

# no_gpu_reason: one line when this machine has no usable NVIDIA GPU, nothing when it has one
no_gpu_reason() {
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "no NVIDIA GPU on this machine (nvidia-smi not found)"
    return
  fi
  if ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    echo "no NVIDIA GPU on this machine (nvidia-smi lists no GPU: $(nvidia-smi -L 2>&1 | head -1))"
  fi
}

reason=$(no_gpu_reason)
if [ -n "$reason" ]; then
  echo "gpu_check: skipped: $reason; nothing to check"
  exit 0
fi

if [ ! -x "$PY" ] && [ "${GPU_CHECK_SKIP_INSTALL:-0}" != 1 ]; then
  echo "gpu_check: no .venv: running make install"
  make install || { echo "gpu_check: setup failed: make install"; exit 2; }
fi
gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null)
if [ -z "$gpus" ] || [ "$gpus" -lt 1 ]; then
  echo "gpu_check: setup failed: nvidia-smi lists a GPU but torch sees none ($("$PY" -c 'import torch; print("torch", torch.__version__, "built for CUDA", torch.version.cuda)' 2>&1 | tail -1); driver: $(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1))"
  exit 2
fi

mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
failed=()

run() {  # run NAME CMD...: record NAME as failed unless CMD exits 0
  local name=$1
  shift
  echo "== $name: $*"
  "$@" || failed+=("$name")
}

run identity "$PY" -m pytest -q -p no:cacheprovider tests/integration/test_cuda_identity.py \
  --junitxml="$OUT/identity.xml"
if [ "$gpus" -ge 2 ]; then
  run tensor-parallel "$PY" -m pytest -q -p no:cacheprovider tests/integration/test_tp_identity.py -k cuda \
    --junitxml="$OUT/tensor_parallel.xml"
else
  echo "== tensor-parallel: skipped (1 GPU; TP=2 needs two)"
fi
# shellcheck disable=SC2086  # the extra arguments are meant to split
run roofline-builtin "$PY" benchmarks/decode_roofline.py --output "$OUT/roofline_builtin.json" \
  ${GPU_CHECK_ROOFLINE_ARGS:-}
# shellcheck disable=SC2086
run roofline-1b "$PY" benchmarks/decode_roofline.py --synthetic "${TMPDIR:-/tmp}/fleetserve-streaming-ckpt" \
  --output "$OUT/roofline_llama32_1b.json" ${GPU_CHECK_ROOFLINE_ARGS:-}

if [ "${#failed[@]}" -gt 0 ]; then
  echo "gpu_check: FAILED: ${failed[*]} (log: $OUT/gpu_check.log)"
  exit 1
fi
echo "gpu_check: all checks passed on $gpus GPU(s) (results in $OUT/)"
exit 0
