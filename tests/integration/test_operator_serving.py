"""The CPU example end to end: the node agent runs the real server, Ready follows, a chat answer comes back."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import pytest
from fleetserve_devcluster.testing import DevClusterHandle
from operator_harness import apply, condition, example, get, install_crds, list_kind, operator, wait_until


@pytest.mark.slow
def test_cpu_example_becomes_ready_and_answers(dev_cluster: DevClusterHandle, namespace: str) -> None:
    install_crds(dev_cluster)
    with operator(dev_cluster, namespace):
        apply(dev_cluster, namespace, example("smollm2-cpu.yaml"))
        cr = wait_until(lambda: (c := get(dev_cluster, namespace, "llmd", "smollm2-cpu"))
                        and (condition(c, "Ready") or {}).get("status") == "True" and c,
                        600, "Ready=True on smollm2-cpu", interval=1.0)
        assert cr["status"]["readyReplicas"] == 1 and cr["status"]["readySummary"] == "1/1"
        progressing = wait_until(lambda: (c := get(dev_cluster, namespace, "llmd", "smollm2-cpu"))
                                 and (condition(c, "Progressing") or {}).get("reason") == "RolloutComplete" and c,
                                 60, "RolloutComplete")
        assert (condition(progressing, "Degraded") or {}).get("status") == "False"
        [pod] = list_kind(dev_cluster, namespace, "pod", "app.kubernetes.io/instance=smollm2-cpu")
        body = json.dumps({"model": "smollm2-135m-instruct", "max_tokens": 8, "temperature": 0,
                           "messages": [{"role": "user", "content": "Say hello."}]}).encode()

        def chat(address: str) -> dict[str, Any] | None:
            request = urllib.request.Request(f"http://{address}/v1/chat/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            try:
                return dict(json.loads(urllib.request.urlopen(request, timeout=300).read()))
            except OSError:
                return None

        # the server allocated exactly the KV cache the operator's memory proof predicted
        metrics = urllib.request.urlopen(f"http://{pod['status']['podIP']}:8000/metrics", timeout=60).read().decode()
        capacity = [line for line in metrics.splitlines() if line.startswith("fleetserve_kv_cache_capacity_tokens{")]
        assert capacity and float(capacity[0].rsplit(" ", 1)[1]) == cr["status"]["memory"]["kvCapacityTokens"]
        # the pod the operator built serves on its own address...
        direct = chat(f"{pod['status']['podIP']}:8000")
        assert direct is not None and direct["choices"][0]["message"]["content"].strip()
        # ...and the Service's address (the dev cluster's proxy in kube-proxy's role) reaches it
        proxy = wait_until(lambda: (s := get(dev_cluster, namespace, "service", "smollm2-cpu"))
                           and s["metadata"].get("annotations", {}).get("fleetserve.io/proxy-address"),
                           60, "the service proxy address")
        answer = wait_until(lambda: chat(proxy), 120, f"a chat answer through the service proxy {proxy}",
                            interval=1.0)
        assert answer["choices"][0]["message"]["content"].strip()
        table = dev_cluster.kubectl("get", "llmd", "-n", namespace).stdout
        assert "1/1" in table
