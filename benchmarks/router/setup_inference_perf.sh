#!/usr/bin/env bash
# Creates inference-perf (the Kubernetes serving working group's load generator,
# https://github.com/kubernetes-sigs/inference-perf) in its own virtual
# environment under the user cache dir. It needs Python >= 3.12; the project's
# .venv may be older, so the venv is built from pyenv's oldest 3.12+ (or $PYTHON312).
# Prints the path of the inference-perf executable on its last line.
set -euo pipefail

VERSION="${INFERENCE_PERF_VERSION:-0.7.0}"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/fleetserve"
VENV="$CACHE/inference-perf-$VERSION"

find_python312() {
  if [[ -n "${PYTHON312:-}" ]]; then echo "$PYTHON312"; return; fi
  if command -v pyenv >/dev/null 2>&1; then
    local root; root="$(pyenv root)"
    local v
    for v in $(ls -1 "$root/versions" 2>/dev/null | grep -E '^3\.(1[2-9])\.' | sort -V); do
      if [[ -x "$root/versions/$v/bin/python3" ]]; then echo "$root/versions/$v/bin/python3"; return; fi
    done
  fi
  for c in python3.13 python3.12; do
    if command -v "$c" >/dev/null 2>&1; then command -v "$c"; return; fi
  done
  echo "no Python >= 3.12 found: install one (pyenv install 3.12) or set PYTHON312" >&2
  exit 1
}

if [[ ! -x "$VENV/bin/inference-perf" ]]; then
  PY="$(find_python312)"
  echo "creating $VENV from $PY" >&2
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet "inference-perf==$VERSION"
fi
"$VENV/bin/inference-perf" --help >/dev/null
echo "$VENV/bin/inference-perf"
