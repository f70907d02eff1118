"""The autoscaler obeys the memory proof and never changes the size by itself (issue 14, point 4).

* A spec that stops fitting is scaled to 0 by the reconcile and stays at 0: no autoscaler tick
  brings it back to minReplicas; ``ScalingActive=False/MemoryDoesNotFit`` says why.
* Turning autoscaling off keeps the size the autoscaler had reached, and the scale subresource
  (``kubectl get llmd --subresource=scale``) reports the size in effect all along.

The autoscaler ticks every second here; pods never get a node, so no model server starts.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from fleetserve_devcluster.testing import DevClusterHandle
from operator_harness import apply, cheap, condition, get, install_crds, operator, wait_until

TICK = {"scrapeIntervalSeconds": 1}
# Five autoscaler ticks: long enough for a tick to undo what the reconcile did.
OBSERVE_SECONDS = 5.0


@pytest.fixture(scope="module", autouse=True)
def crds(dev_cluster: DevClusterHandle) -> None:
    install_crds(dev_cluster)


def deployment_replicas(cluster: DevClusterHandle, ns: str, name: str) -> int | None:
    dep = get(cluster, ns, "deployment", name)
    return None if dep is None else int(dep["spec"]["replicas"])


def replicas_over(cluster: DevClusterHandle, ns: str, name: str, seconds: float) -> set[int | None]:
    """Every Deployment size seen while polling for ``seconds`` (an absence check needs a window)."""
    seen: set[int | None] = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen.add(deployment_replicas(cluster, ns, name))
        time.sleep(0.2)
    return seen


def scale_subresource(cluster: DevClusterHandle, ns: str, name: str) -> dict[str, Any]:
    out = cluster.kubectl("get", "-n", ns, "llmd", name, "--subresource=scale", "-o", "json").stdout
    return dict(json.loads(out))


def test_a_spec_that_stops_fitting_stays_at_zero(dev_cluster: DevClusterHandle, namespace: str) -> None:
    auto = {"enabled": True, "minReplicas": 1, "maxReplicas": 3, **TICK}
    body = cheap("nofit", autoscaling=auto)
    with operator(dev_cluster, namespace):
        apply(dev_cluster, namespace, body)
        wait_until(lambda: deployment_replicas(dev_cluster, namespace, "nofit") == 1, 30, "the Deployment at 1")
        body["spec"]["resources"] = {"gpus": 0, "memory": "1100Mi"}  # 76 MiB after the runtime's 1 GiB
        apply(dev_cluster, namespace, body)
        cr = wait_until(lambda: (c := get(dev_cluster, namespace, "llmd", "nofit"))
                        and (condition(c, "MemoryFits") or {}).get("status") == "False" and c, 30, "MemoryFits=False")
        wait_until(lambda: deployment_replicas(dev_cluster, namespace, "nofit") == 0, 30, "the Deployment at 0")
        seen = replicas_over(dev_cluster, namespace, "nofit", OBSERVE_SECONDS)
        assert seen == {0}, f"the Deployment left 0 while the model does not fit: {sorted(map(str, seen))}"
        cr = wait_until(lambda: (c := get(dev_cluster, namespace, "llmd", "nofit"))
                        and (condition(c, "ScalingActive") or {}).get("reason") == "MemoryDoesNotFit" and c,
                        30, "ScalingActive=False/MemoryDoesNotFit")
        active = condition(cr, "ScalingActive") or {}
        assert active["status"] == "False" and "fit" in active["message"], active
        assert cr["status"].get("desiredReplicas") == 0, cr["status"]


def test_turning_autoscaling_off_keeps_the_size_in_effect(dev_cluster: DevClusterHandle, namespace: str) -> None:
    auto = {"enabled": True, "minReplicas": 2, "maxReplicas": 3, **TICK}
    body = cheap("keep", replicas=1, autoscaling=auto)
    with operator(dev_cluster, namespace):
        apply(dev_cluster, namespace, body)
        wait_until(lambda: deployment_replicas(dev_cluster, namespace, "keep") == 2, 30, "minReplicas 2 in effect")
        wait_until(lambda: scale_subresource(dev_cluster, namespace, "keep")["spec"].get("replicas") == 2, 30,
                   "the scale subresource reporting the 2 replicas in effect")
        dev_cluster.kubectl("patch", "-n", namespace, "llmd", "keep", "--type=merge",
                            "-p", '{"spec":{"autoscaling":{"enabled":false}}}')
        wait_until(lambda: (c := get(dev_cluster, namespace, "llmd", "keep"))
                   and (condition(c, "ScalingActive") or {}).get("reason") == "AutoscalingDisabled", 30,
                   "ScalingActive=False/AutoscalingDisabled")
        seen = replicas_over(dev_cluster, namespace, "keep", OBSERVE_SECONDS)
        assert seen == {2}, f"turning autoscaling off changed the size: {sorted(map(str, seen))}"
        assert scale_subresource(dev_cluster, namespace, "keep")["spec"]["replicas"] == 2
