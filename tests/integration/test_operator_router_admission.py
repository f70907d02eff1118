"""`autoscaling.minReplicas: 0` on the real API server: the CRD's CEL rule admits it only with the
router on (issue 16 point 2). No operator runs: this is the API server's own doing."""

from __future__ import annotations

from fleetserve_devcluster.testing import DevClusterHandle
from operator_harness import apply, cheap, get, install_crds

TO_ZERO = {"enabled": True, "minReplicas": 0, "maxReplicas": 2}


def test_min_replicas_zero_is_admitted_only_with_the_router(dev_cluster: DevClusterHandle, namespace: str) -> None:
    install_crds(dev_cluster)
    refused = apply(dev_cluster, namespace, cheap("alone", autoscaling=TO_ZERO), check=False)
    assert refused.returncode != 0, refused.stdout
    assert "autoscaling.minReplicas may be 0 only with router.enabled" in refused.stderr, refused.stderr
    assert get(dev_cluster, namespace, "llmd", "alone") is None

    off = apply(dev_cluster, namespace, cheap("off", autoscaling=TO_ZERO, router={"enabled": False}), check=False)
    assert off.returncode != 0 and "only with router.enabled" in off.stderr

    apply(dev_cluster, namespace, cheap("routed", autoscaling=TO_ZERO, router={"enabled": True}))
    stored = get(dev_cluster, namespace, "llmd", "routed")
    assert stored is not None
    assert stored["spec"]["autoscaling"]["minReplicas"] == 0
    # The API server filled in the router's defaults.
    assert stored["spec"]["router"] == {"enabled": True, "replicas": 2, "holdTimeoutSeconds": 900,
                                        "maxHeldRequests": 1000}
    # Switching the router off while at minReplicas 0 is refused too (the fleet could not come back).
    patched = dev_cluster.kubectl("patch", "llmd", "routed", "-n", namespace, "--type=merge", "-p",
                                  '{"spec": {"router": {"enabled": false}}}', check=False)
    assert patched.returncode != 0 and "only with router.enabled" in patched.stderr, patched.stderr
