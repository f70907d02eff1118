"""The router's EndpointSlice discovery against the dev cluster's real API server.

The slices are written by hand (a Service without a selector) with addresses from the dev cluster's
198.18.0.0/15 range (the API server refuses loopback ones). The watcher test sends no traffic; the
end-to-end test runs a real server on a dev-cluster node address, which the dev cluster puts on the
loopback interface, so every byte stays on this machine.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import threading
import time
from pathlib import Path

import httpx
from fleetserve_devcluster.testing import DevClusterHandle
from fleetserve_router.discovery import KubeAPI, SliceWatcher
from fleetserve_server.bench.launch import fleetserve_argv, free_port, start_server
from router_util import router_metric, start_router
from serve_util import COMMON_FLAGS, MODEL, SERVER_ENV, tiny_model, wait_for  # noqa: F401 - fixtures


def service(namespace: str) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "llm", "namespace": namespace},
                       "spec": {"ports": [{"name": "http", "port": 8000, "targetPort": 8000}]}})


def endpoint_slice(namespace: str, name: str, ready: dict[str, bool], port: int = 8000) -> str:
    return json.dumps({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": "llm",
                                "endpointslice.kubernetes.io/managed-by": "test.fleetserve.io"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": [a], "conditions": {"ready": r}} for a, r in ready.items()],
    })


def test_watcher_follows_ready_endpoints(dev_cluster: DevClusterHandle, namespace: str) -> None:
    dev_cluster.kubectl("apply", "-f", "-", input=service(namespace))
    dev_cluster.kubectl("apply", "-f", "-", input=endpoint_slice(namespace, "llm-a", {"198.18.200.1": True,
                                                                                      "198.18.200.2": False}))

    async def main() -> list[float]:
        seen: list[set[str]] = []
        watcher = SliceWatcher(KubeAPI(str(dev_cluster.kubeconfig)), namespace, "llm", seen.append)
        task = asyncio.create_task(watcher.run())
        lags: list[float] = []
        try:
            await asyncio.wait_for(watcher.synced.wait(), 30)
            assert seen[-1] == {"198.18.200.1:8000"}
            for ready, expected in (
                ({"198.18.200.1": True, "198.18.200.2": True}, {"198.18.200.1:8000", "198.18.200.2:8000"}),
                ({"198.18.200.1": False, "198.18.200.2": True}, {"198.18.200.2:8000"}),
            ):
                start = time.monotonic()
                await asyncio.to_thread(dev_cluster.kubectl, "apply", "-f", "-",
                                        input=endpoint_slice(namespace, "llm-a", ready))
                while seen[-1] != expected:
                    assert time.monotonic() - start < 10, f"still {seen[-1]}, want {expected}"
                    await asyncio.sleep(0.01)
                lags.append(time.monotonic() - start)
            start = time.monotonic()
            await asyncio.to_thread(dev_cluster.kubectl, "delete", "endpointslice", "llm-a", "-n", namespace)
            while seen[-1] != set():
                assert time.monotonic() - start < 10
                await asyncio.sleep(0.01)
            lags.append(time.monotonic() - start)
        finally:
            task.cancel()
        return lags

    lags = asyncio.run(main())
    print(f"EndpointSlice change -> router endpoints (incl. kubectl ~0.2-0.5 s): {[f'{x:.2f}' for x in lags]} s")


def local_dev_address() -> str:
    """A 198.18.x address the dev cluster put on lo (a node's), so traffic to it stays local."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", "lo"], capture_output=True, text=True).stdout
    found = re.findall(r"inet (198\.1[89]\.\d+\.\d+)/32", out)
    assert found, f"no dev-cluster address on lo (is the dev cluster up?):\n{out}"
    return found[0]


def test_router_service_mode_holds_until_the_slice_says_ready(dev_cluster: DevClusterHandle, namespace: str,
                                                              tiny_model: Path, tmp_path: Path) -> None:  # noqa: F811
    host = local_dev_address()
    port = free_port(host)
    server = start_server("on-node-address", fleetserve_argv(str(tiny_model), port, COMMON_FLAGS, host=host),
                          port=port, ready_path="/ready", log_dir=tmp_path, timeout=300, env=SERVER_ENV, host=host)
    dev_cluster.kubectl("apply", "-f", "-", input=service(namespace))
    dev_cluster.kubectl("apply", "-f", "-", input=endpoint_slice(namespace, "llm-a", {host: False}, port))
    router = start_router(tmp_path, "--service", f"{namespace}/llm", "--kubeconfig", str(dev_cluster.kubeconfig))
    try:
        assert httpx.get(router.base_url + "/health").status_code == 200
        assert router_metric(router.base_url, "fleetserve_router_ready_replicas") == 0
        results: list[httpx.Response] = []
        request = threading.Thread(target=lambda: results.append(httpx.post(
            router.base_url + "/v1/chat/completions", timeout=120,
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})))
        request.start()
        wait_for(lambda: router_metric(router.base_url, "fleetserve_router_requests_held") == 1, 10,
                 "the request to be held while the only endpoint is not ready")
        dev_cluster.kubectl("apply", "-f", "-", input=endpoint_slice(namespace, "llm-a", {host: True}, port))
        request.join(60)
        assert results and results[0].status_code == 200, results
        assert results[0].headers["x-fleetserve-replica"] == f"{host}:{port}"
        assert router_metric(router.base_url, "fleetserve_router_ready_replicas") == 1
    finally:
        assert router.stop() == 0, router.log_tail()
        server.stop()
