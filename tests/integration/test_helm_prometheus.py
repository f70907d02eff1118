"""Alerting on the real thing: a real Prometheus (the provisioned Debian build) with the chart's
rules file and the relabelling docs/runbooks.md documents, scraping the server pods of a running
LLMDeployment on the dev cluster.

Debian builds Prometheus without `kubernetes_sd_configs` (it does not package client-go), so the
test serves Prometheus' HTTP service discovery from the cluster's real pod list, with the same
`__meta_kubernetes_pod_*` labels Kubernetes SD would attach; the runbook's relabel rules then
select and label the targets exactly as they would with `kubernetes_sd_configs`.

The LLMDeployment comes from `helm install` with `llmDeployments` (operator and server run by the
node agent). It is deliberately small (one sequence at a time), so a burst of concurrent requests
leaves more than 10 waiting and FleetserveQueueBacklog must show up as pending (its `for` is 10m)
in Prometheus' own /api/v1/alerts.
"""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fleetserve_devcluster.testing import DevClusterHandle
from fleetserve_devcluster.tools import ToolMissingError, tool_path
from helm_util import get_json, helm, wait_until

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "fleetserve"
ALERTS = CHART / "files" / "alerts.yaml"
CONCURRENT_REQUESTS = 16  # > FleetserveQueueBacklog's 10 waiting, with one running at a time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """A prometheus process on 127.0.0.1:<port> and its HTTP API."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        try:
            binary = tool_path("prometheus")
        except ToolMissingError as exc:
            pytest.fail(str(exc))
        self.port = _free_port()
        config_file = workdir / "prometheus.yaml"
        config_file.write_text(yaml.safe_dump(config))
        self.log = (workdir / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [str(binary), f"--config.file={config_file}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.log_path = workdir / "prometheus.log"

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v1/{path}{query}", timeout=5) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]

    def ready(self) -> bool:
        assert self.proc.poll() is None, f"prometheus exited:\n{self.log_path.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def small_model(dev_cluster: DevClusterHandle, namespace: str, tmp_path: Path) -> Iterator[str]:
    """`helm install` with one deliberately small LLMDeployment; yields its name once Ready."""
    dev_cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    # The API server's PodSecurity admission refuses any pod of the chart that breaks the restricted profile.
    dev_cluster.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted",
                        "pod-security.kubernetes.io/enforce-version=latest")
    release = f"fs-{uuid.uuid4().hex[:8]}"
    values = {
        "watchNamespaces": [namespace],
        "image": {"repository": "fleetserve/operator", "tag": "dev"},
        "llmDeployments": [{
            "name": "tiny",
            "model": {"source": "builtin:smollm2-135m-instruct"},
            "resources": {"gpus": 0, "cpu": "2", "memory": "2Gi"},
            "engine": {"maxModelLen": 512, "maxBatchTokens": 512, "maxNumSeqs": 1, "maxQueueLength": 64},
            "replicas": 1,
        }],
    }
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    helm(dev_cluster, "install", release, CHART, "-n", namespace, "-f", values_file, "--wait", "--timeout", "300s",
         timeout=330)
    try:
        wait_until(lambda: _ready_server_pods(dev_cluster, namespace), 600, "a Ready server pod of LLMDeployment tiny")
        yield "tiny"
    finally:
        helm(dev_cluster, "uninstall", release, "-n", namespace, "--wait", "--timeout", "120s", check=False)


def _ready_server_pods(cluster: DevClusterHandle, namespace: str) -> list[dict]:
    pods = get_json(cluster, "pods", "-n", namespace, "-l",
                    "app.kubernetes.io/name=fleetserve-server,app.kubernetes.io/instance=tiny")["items"]
    return [p for p in pods if not p["metadata"].get("deletionTimestamp") and any(
        c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))]


def _pod_targets(cluster: DevClusterHandle, namespace: str) -> list[dict[str, Any]]:
    """HTTP SD target groups of every pod port in `namespace`, labelled like Kubernetes SD's pod role."""
    groups = []
    for pod in get_json(cluster, "pods", "-n", namespace)["items"]:
        ip = pod["status"].get("podIP")
        if not ip or pod["metadata"].get("deletionTimestamp"):
            continue
        meta = {
            "__meta_kubernetes_namespace": namespace,
            "__meta_kubernetes_pod_name": pod["metadata"]["name"],
            **{f"__meta_kubernetes_pod_label_{_sanitize(k)}": v for k, v in pod["metadata"].get("labels", {}).items()},
        }
        for container in pod["spec"]["containers"]:
            for port in container.get("ports", []):
                groups.append({"targets": [f"{ip}:{port['containerPort']}"], "labels": {
                    **meta, "__meta_kubernetes_pod_container_port_name": port.get("name", "")}})
    return groups


def _sanitize(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label)


class _ServiceDiscovery(http.server.ThreadingHTTPServer):
    """Prometheus HTTP SD (`http_sd_configs`) backed by the dev cluster's pod list."""

    def __init__(self, cluster: DevClusterHandle, namespace: str) -> None:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                body = json.dumps(_pod_targets(outer.cluster, outer.namespace)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.cluster, self.namespace = cluster, namespace
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/targets"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def _runbook_scrape_config(sd_url: str) -> dict[str, Any]:
    """The server job of docs/runbooks.md "Scraping" (its relabel rules as written), discovering via `sd_url`."""
    text = (REPO / "docs" / "runbooks.md").read_text()
    block = text.split("## Scraping", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    documented = yaml.safe_load(block)
    server_job = next(j for j in documented["scrape_configs"] if j["job_name"] == "fleetserve-server")
    assert server_job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
    server_job["http_sd_configs"] = [{"url": sd_url, "refresh_interval": "2s"}]
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [server_job],
    }


def _complete(url: str, model: str, results: list[int]) -> None:
    body = json.dumps({"model": model, "prompt": "Tell me a long story about a lighthouse keeper.",
                       "max_tokens": 32, "ignore_eos": True}).encode()
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as resp:
            json.load(resp)
            results.append(resp.status)
    except urllib.error.HTTPError as exc:
        results.append(exc.code)


def test_real_prometheus_scrapes_servers_and_raises_the_queue_alert(
    dev_cluster: DevClusterHandle, namespace: str, small_model: str, tmp_path: Path
) -> None:
    discovery = _ServiceDiscovery(dev_cluster, namespace)
    prometheus = Prometheus(_runbook_scrape_config(discovery.url), tmp_path)
    try:
        wait_until(prometheus.ready, 60, "prometheus /-/ready")
        # Its rules file is the chart's plain alerts.yaml, loaded as is.
        groups = prometheus.api("rules")["groups"]
        loaded = {r["name"] for g in groups for r in g["rules"]}
        expected = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
        assert loaded == expected

        # Service discovery finds the server pod, and its target is up.
        pod = _ready_server_pods(dev_cluster, namespace)[0]
        targets = wait_until(
            lambda: [t for t in prometheus.api("targets")["activeTargets"] if t["health"] == "up"],
            60, "an up fleetserve-server target")
        assert targets[0]["labels"]["job"] == "fleetserve-server"
        assert targets[0]["labels"]["namespace"] == namespace
        assert targets[0]["labels"]["pod"] == pod["metadata"]["name"]
        series = wait_until(lambda: prometheus.api("query", query="fleetserve_kv_cache_usage_ratio")["result"],
                            30, "fleetserve_kv_cache_usage_ratio in Prometheus")
        assert series[0]["metric"]["namespace"] == namespace and series[0]["metric"]["model"]

        # A burst of concurrent requests against a server that runs one sequence at a time.
        base = f"http://{pod['status']['podIP']}:8000"
        with urllib.request.urlopen(f"{base}/v1/models", timeout=10) as resp:
            model = json.load(resp)["data"][0]["id"]
        results: list[int] = []
        workers = [threading.Thread(target=_complete, args=(f"{base}/v1/completions", model, results), daemon=True)
                   for _ in range(CONCURRENT_REQUESTS)]
        for worker in workers:
            worker.start()

        def queue_alert() -> list[dict] | None:
            alerts = prometheus.api("alerts")["alerts"]
            return [a for a in alerts if a["labels"]["alertname"] == "FleetserveQueueBacklog"
                    and a["state"] in ("pending", "firing")] or None

        alert = wait_until(queue_alert, 120, "FleetserveQueueBacklog pending in Prometheus' /api/v1/alerts")[0]
        assert alert["labels"]["namespace"] == namespace and alert["labels"]["model"] == model
        assert alert["labels"]["severity"] == "warning"
        assert float(alert["value"]) > 10
        assert f"requests for model {model} in namespace {namespace}" in alert["annotations"]["description"]

        # The burst is not waited for: on a loaded CPU it takes minutes to drain, and the server's
        # own tests cover answering it; requests still running end with the uninstall.
        assert not [code for code in results if code != 200], results
    finally:
        prometheus.stop()
        discovery.stop()
