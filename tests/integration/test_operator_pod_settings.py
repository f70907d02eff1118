"""The pod settings production needs (issue 14, point 6) on the real API server, in a namespace that
enforces the *restricted* Pod Security profile: the API server's own PodSecurity admission refuses
any pod that violates it, so a pod that exists here passed it.

Pods are pinned to a node that does not exist: the ReplicaSet controller still creates them (that is
where PodSecurity admits or refuses), but no model server starts.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from fleetserve_devcluster.testing import DevClusterHandle
from operator_harness import EXAMPLES, NOWHERE, apply, cheap, get, install_crds, operator, wait_until

SELECTOR = "app.kubernetes.io/name=fleetserve-server,app.kubernetes.io/instance={}"


@pytest.fixture(scope="module", autouse=True)
def crds(dev_cluster: DevClusterHandle) -> None:
    install_crds(dev_cluster)


@pytest.fixture
def restricted(dev_cluster: DevClusterHandle, namespace: str) -> str:
    dev_cluster.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted",
                        "pod-security.kubernetes.io/enforce-version=latest")
    return namespace


def pods(cluster: DevClusterHandle, ns: str, name: str) -> list[dict[str, Any]]:
    proc = cluster.kubectl("get", "pods", "-n", ns, "-l", SELECTOR.format(name), "-o", "json")
    return list(json.loads(proc.stdout)["items"])


def failed_creates(cluster: DevClusterHandle, ns: str) -> list[str]:
    proc = cluster.kubectl("get", "events", "-n", ns, "--field-selector", "reason=FailedCreate", "-o", "json")
    return [e["message"] for e in json.loads(proc.stdout)["items"]]


ALL_SETTINGS: dict[str, Any] = {
    "imagePullSecrets": [{"name": "registry-cred"}],
    "serviceAccountName": "llm-server",
    "env": [{"name": "HF_HUB_OFFLINE", "value": "1"},
            {"name": "TEAM", "valueFrom": {"configMapKeyRef": {"name": "meta", "key": "team", "optional": True}}}],
    "envFrom": [{"secretRef": {"name": "hf-token", "optional": True}}],
    "modelCache": {"persistentVolumeClaim": {"claimName": "models"}},
    "strategy": {"maxSurge": 0, "maxUnavailable": 1},
    "podAnnotations": {"example.com/owner": "ml-platform"},
    "podLabels": {"team": "ml"},
}


def test_every_pod_setting_reaches_pods_that_pass_the_restricted_profile(
    dev_cluster: DevClusterHandle, restricted: str
) -> None:
    ns = restricted
    dev_cluster.kubectl("create", "serviceaccount", "llm-server", "-n", ns)
    body = cheap("settings", **ALL_SETTINGS)
    body["spec"]["resources"].update(requests={"ephemeral-storage": "1Gi"}, limits={"ephemeral-storage": "2Gi"})
    with operator(dev_cluster, ns):
        apply(dev_cluster, ns, body)
        [pod] = wait_until(lambda: pods(dev_cluster, ns, "settings"), 60,
                           f"a server pod admitted under restricted (FailedCreate: {failed_creates(dev_cluster, ns)})")
        spec = pod["spec"]
        [c] = spec["containers"]
        assert spec["imagePullSecrets"] == [{"name": "registry-cred"}]
        assert spec["serviceAccountName"] == "llm-server"
        env = {e["name"]: e for e in c["env"]}
        assert env["HF_HUB_OFFLINE"]["value"] == "1"
        assert env["TEAM"]["valueFrom"]["configMapKeyRef"]["name"] == "meta"
        assert c["envFrom"] == [{"secretRef": {"name": "hf-token", "optional": True}}]
        [cache] = [v for v in spec["volumes"] if v["name"] == "model-cache"]
        assert cache["persistentVolumeClaim"] == {"claimName": "models"}
        assert pod["metadata"]["annotations"]["example.com/owner"] == "ml-platform"
        assert pod["metadata"]["labels"]["team"] == "ml"
        assert c["resources"]["limits"]["ephemeral-storage"] == "2Gi"
        assert c["resources"]["requests"]["ephemeral-storage"] == "1Gi"
        dep = get(dev_cluster, ns, "deployment", "settings")
        assert dep is not None
        assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


def test_host_path_cache_is_refused_by_a_restricted_namespace(dev_cluster: DevClusterHandle, restricted: str) -> None:
    """hostPath is documented as privileged-only; the API server's PodSecurity says so too."""
    ns = restricted
    with operator(dev_cluster, ns):
        apply(dev_cluster, ns, cheap("hostcache", modelCache={"hostPath": {"path": "/var/cache/fleetserve"}}))
        message = wait_until(
            lambda: next((m for m in failed_creates(dev_cluster, ns) if "hostPath" in m), None), 60,
            "a FailedCreate event naming hostPath")
        assert "violates PodSecurity" in message and "restricted" in message
        assert not pods(dev_cluster, ns, "hostcache")


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"podLabels": {"app.kubernetes.io/instance": "other"}}, "podLabels may not set"),
        ({"podAnnotations": {"fleetserve.io/config-hash": "x"}}, "podAnnotations may not use the fleetserve.io/"),
        ({"env": [{"name": "HF_HOME", "value": "/x"}]}, "env may not set"),
        ({"env": [{"name": "A", "value": "1", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]},
         "either value or valueFrom"),
        ({"envFrom": [{"prefix": "X_"}]}, "exactly one of configMapRef or secretRef"),
        ({"modelCache": {"emptyDir": {}, "persistentVolumeClaim": {"claimName": "c"}}}, "at most one of"),
        ({"strategy": {"maxSurge": "0%", "maxUnavailable": 0}}, "cannot both be 0"),
        ({"strategy": {"maxSurge": "lots"}}, "spec.strategy.maxSurge"),
        ({"resources": {"gpus": 1, "gpuMemory": "24Gi", "limits": {"nvidia.com/gpu": "2"}}}, "GPU resource"),
    ],
)
def test_api_server_refuses_bad_pod_settings_with_the_message(
    dev_cluster: DevClusterHandle, namespace: str, patch: dict[str, Any], message: str
) -> None:
    body = cheap("bad", **patch)
    proc = apply(dev_cluster, namespace, body, check=False)
    assert proc.returncode != 0, f"admitted: {patch}"
    assert message in proc.stderr, proc.stderr


@pytest.mark.parametrize("filename", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_every_example_is_admitted_under_restricted(
    dev_cluster: DevClusterHandle, restricted: str, filename: str
) -> None:
    """Server-side dry-run of every example's pod, as the operator renders it, in a restricted namespace."""
    import yaml
    from fleetserve_operator.api.spec import spec_from_body
    from fleetserve_operator.reconcile.fit import check_memory_fit
    from fleetserve_operator.resources.server import build_deployment

    docs = [d for d in yaml.safe_load_all((EXAMPLES / filename).read_text()) if d]
    for body in (d for d in docs if d.get("kind") == "LLMDeployment"):
        body["spec"]["scheduling"] = NOWHERE
        spec = spec_from_body(body)
        dep = build_deployment(body["metadata"]["name"], restricted, spec, check_memory_fit(spec), 1)
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "dry-" + body["metadata"]["name"][:40], **dep["spec"]["template"]["metadata"]},
               "spec": {**dep["spec"]["template"]["spec"], "serviceAccountName": "default"}}
        proc = dev_cluster.kubectl("apply", "--dry-run=server", "-n", restricted, "-f", "-",
                                   input=json.dumps(pod), check=False)
        assert proc.returncode == 0, f"{filename}: {proc.stderr}"
