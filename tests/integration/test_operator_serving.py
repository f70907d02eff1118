"""The CPU example end to end: the node agent runs the real server, Ready follows, a chat answer comes back."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import pytest
from fleetserve_devcluster.testing import DevClusterHandle
from operator_harness import apply, condition, example, get, install_crds, operator, wait_until


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
        svc = wait_until(lambda: (s := get(dev_cluster, namespace, "service", "smollm2-cpu"))
                         and s["metadata"].get("annotations", {}).get("fleetserve.io/proxy-address"),
                         60, "the service proxy address")
        request = urllib.request.Request(
            f"http://{svc}/v1/chat/completions",
            data=json.dumps({"model": "smollm2-135m-instruct", "max_tokens": 8, "temperature": 0,
                             "messages": [{"role": "user", "content": "Say hello."}]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        def chat() -> dict[str, Any] | None:
            try:
                return dict(json.loads(urllib.request.urlopen(request, timeout=120).read()))
            except OSError:  # the proxy learns the ready endpoint from the EndpointSlice, a moment later
                return None

        answer = wait_until(chat, 60, "a chat answer through the service proxy", interval=0.5)
        assert answer["choices"][0]["message"]["content"].strip()
        table = dev_cluster.kubectl("get", "llmd", "-n", namespace).stdout
        assert "1/1" in table
