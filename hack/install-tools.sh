#!/usr/bin/env bash
# Provision the dev cluster's tools into the user cache dir (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
hack/k8s/build.sh
