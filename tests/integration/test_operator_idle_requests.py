"""An LLMDeployment with autoscaling off costs no API request while nothing changes (issue 19, point 2).

Everything the operator must react to arrives by a watch; the only periodic work is the slow
resync (10 minutes, jittered). The operator runs under a ServiceAccount of its own, so the
API server's audit log (Metadata level, ServiceAccounts only) names every request it sends;
after the fleets converged, a 75 s window (longer than the 60 s resync the operator had before)
must hold none of its requests in the namespace. Takes ~1.5 minutes.

And what the operator does for a settled LLMDeployment reads its children from its watches: a
reconcile (woken by an edit of a child that changes nothing) and the autoscaler's ticks send no
GET of a child and no LIST of pods, and the ticks read their LLMDeployment from the watch as well.
Takes ~1 minute.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from fleetserve_devcluster import controlplane
from fleetserve_devcluster.testing import DevClusterHandle
from operator_harness import apply, cheap, condition, get, install_crds, operator, wait_until

FLEETS = 3
WINDOW_SECONDS = 75.0
CHILD_RESOURCES = {"deployments", "services", "configmaps", "poddisruptionbudgets", "pods"}
SCRAPE_SECONDS = 5
TICKS = 4


@pytest.fixture(scope="module", autouse=True)
def crds(dev_cluster: DevClusterHandle) -> None:
    install_crds(dev_cluster)


def service_account_kubeconfig(cluster: DevClusterHandle, ns: str, tmp: Path) -> tuple[Path, str]:
    """A kubeconfig with the token of ServiceAccount ``op`` in ``ns`` (cluster-admin: this test
    counts requests, it does not check RBAC) and its audit user name."""
    binding = f"op-{ns}"
    cluster.kubectl("create", "serviceaccount", "op", "-n", ns)
    cluster.kubectl("create", "clusterrolebinding", binding, "--clusterrole=cluster-admin", f"--serviceaccount={ns}:op")
    token = cluster.kubectl("create", "token", "op", "-n", ns, "--duration=1h").stdout.strip()
    server = yaml.safe_load(Path(cluster.kubeconfig).read_text())["clusters"][0]["cluster"]
    if "certificate-authority" in server and "certificate-authority-data" not in server:
        server["certificate-authority-data"] = base64.b64encode(Path(server.pop("certificate-authority"))
                                                                .read_bytes()).decode()
    path = tmp / "operator-kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "op",
        "clusters": [{"name": "dev", "cluster": server}], "users": [{"name": "op", "user": {"token": token}}],
        "contexts": [{"name": "op", "context": {"cluster": "dev", "user": "op", "namespace": ns}}],
    }))
    return path, f"system:serviceaccount:{ns}:op"


def requests_since(log: Path, offset: int, user: str, ns: str) -> list[str]:
    """``user``'s completed non-watch requests on objects of ``ns`` logged after byte ``offset``."""
    found = []
    with log.open("rb") as f:
        f.seek(offset if log.stat().st_size >= offset else 0)  # rotated (100 MB): read the new file whole
        for raw in f:
            if user.encode() not in raw:
                continue
            event: dict[str, Any] = json.loads(raw)
            ref = event.get("objectRef") or {}
            if (event.get("user", {}).get("username") == user and event.get("stage") == "ResponseComplete"
                    and event.get("verb") != "watch" and ref.get("namespace") == ns):
                found.append(f"{event['verb']} {ref.get('resource')}/{ref.get('name', '')}")
    return found


def test_autoscaling_off_fleets_cost_no_requests_between_resyncs(
    dev_cluster: DevClusterHandle, namespace: str, tmp_path: Path
) -> None:
    log = controlplane.audit_log_path(Path(dev_cluster.state_dir))
    if not log.exists():
        pytest.fail("this dev cluster runs without the API server's audit log (started by an older fleetserve): "
                    "`fleetserve dev-cluster down` and up again")
    kubeconfig, user = service_account_kubeconfig(dev_cluster, namespace, tmp_path)
    names = [f"idle-{i}" for i in range(FLEETS)]
    try:
        with operator(dev_cluster, namespace, kubeconfig=kubeconfig):  # the default resync
            for name in names:
                apply(dev_cluster, namespace, cheap(name, replicas=0))

            def converged() -> bool:
                for name in names:
                    cr = get(dev_cluster, namespace, "llmd", name) or {"metadata": {}}
                    status = cr.get("status") or {}
                    scaling = condition(cr, "ScalingActive")
                    if status.get("observedGeneration") != cr["metadata"].get("generation") or not scaling:
                        return False
                return all(get(dev_cluster, namespace, "deployment", name) for name in names)

            wait_until(converged, 60, "every LLMDeployment reconciled, its autoscaler status written")
            time.sleep(5)  # the watch events of the operator's own writes wake (no-op) reconciles: let them pass
            offset = log.stat().st_size
            time.sleep(WINDOW_SECONDS)  # an absence is observed over a window; nothing to poll for
            seen = requests_since(log, offset, user, namespace)
        assert seen == [], (f"{len(seen)} requests of the operator in {WINDOW_SECONDS:g} s for {FLEETS} idle "
                            f"LLMDeployments with autoscaling off: {sorted(set(seen))}")
    finally:
        dev_cluster.kubectl("delete", "clusterrolebinding", f"op-{namespace}", "--ignore-not-found", check=False)


def test_settled_fleets_read_their_children_from_the_watches(
    dev_cluster: DevClusterHandle, namespace: str, tmp_path: Path
) -> None:
    log = controlplane.audit_log_path(Path(dev_cluster.state_dir))
    if not log.exists():
        pytest.fail("this dev cluster runs without the API server's audit log: `fleetserve dev-cluster down` and up")
    kubeconfig, user = service_account_kubeconfig(dev_cluster, namespace, tmp_path)
    autoscaling = {"enabled": True, "minReplicas": 1, "maxReplicas": 2, "scrapeIntervalSeconds": SCRAPE_SECONDS}
    fleets = {"fixed": cheap("fixed", replicas=2), "auto": cheap("auto", autoscaling=autoscaling)}
    try:
        with operator(dev_cluster, namespace, kubeconfig=kubeconfig):
            for manifest in fleets.values():
                apply(dev_cluster, namespace, manifest)

            def settled() -> bool:
                for name in fleets:
                    cr = get(dev_cluster, namespace, "llmd", name) or {"metadata": {}}
                    status = cr.get("status") or {}
                    if status.get("observedGeneration") != cr["metadata"].get("generation") or \
                            not condition(cr, "ScalingActive"):
                        return False
                auto = (get(dev_cluster, namespace, "llmd", "auto") or {}).get("status") or {}
                return bool(auto.get("autoscaler")) and get(dev_cluster, namespace, "pdb", "fixed") is not None

            wait_until(settled, 90, "both LLMDeployments reconciled, the autoscaler's decision written")
            time.sleep(5)  # the watch events of the operator's own writes wake (no-op) reconciles: let them pass
            offset = log.stat().st_size
            for name in fleets:  # a child event: the reconcile runs, finds nothing to change
                dev_cluster.kubectl("annotate", "service", name, "-n", namespace, "example.com/touched=1")
            wait_until(lambda: all(f"get llmdeployments/{name}" in requests_since(log, offset, user, namespace)
                                   for name in fleets), 30, "a reconcile of each LLMDeployment after the edit")
            time.sleep(TICKS * SCRAPE_SECONDS)  # the autoscaler's ticks: what they send is counted over a window
            seen = requests_since(log, offset, user, namespace)
        reads = [r for r in seen if r.split()[0] in ("get", "list") and r.split()[1].split("/")[0] in CHILD_RESOURCES]
        assert reads == [], f"the operator read children from the API server: {reads} (all requests: {seen})"
        # One GET of each LLMDeployment: the reconcile's. The ticks read the watched body.
        assert sorted(r for r in seen if r.startswith("get llmdeployments/")) == \
            ["get llmdeployments/auto", "get llmdeployments/fixed"], seen
    finally:
        dev_cluster.kubectl("delete", "clusterrolebinding", f"op-{namespace}", "--ignore-not-found", check=False)
