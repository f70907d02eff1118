"""The generated CRD on the real API server: it installs, defaults, validates with CEL, prints columns, scales.

No operator runs here: everything is the API server's own doing.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from fleetserve_devcluster.testing import DevClusterHandle
from operator_harness import apply, cheap, get, install_crds


@pytest.fixture(scope="module", autouse=True)
def crds(dev_cluster: DevClusterHandle) -> None:
    install_crds(dev_cluster)


def with_spec(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    body = copy.deepcopy(base)
    node = body["spec"]
    *parents, leaf = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return body


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("autoscaling", {"enabled": True, "minReplicas": 3, "maxReplicas": 1},
         "autoscaling.minReplicas must be <= autoscaling.maxReplicas"),
        ("quantization", "int3", 'Unsupported value: "int3"'),
        ("resources", {"gpus": 1, "gpuMemory": "lots"}, "spec.resources.gpuMemory in body should match"),
        ("resources", {"gpus": 1}, "resources.gpuMemory is required when resources.gpus > 0"),
        ("engine.kvCacheMemoryFraction", 1.5, "engine.kvCacheMemoryFraction must be in (0, 1)"),
        ("engine.maxModelLen", 0, "spec.engine.maxModelLen in body should be greater than or equal to 1"),
        ("engine", {"maxNumSeqs": 64, "maxBatchTokens": 16}, "engine.maxBatchTokens must be >= engine.maxNumSeqs"),
        ("autoscaling", {"targetKVCacheUsage": 0}, "autoscaling.targetKVCacheUsage must be in (0, 1]"),
        ("capture", {"enabled": True, "volume": {"emptyDir": {}, "persistentVolumeClaim": {"claimName": "samples"}}},
         "capture.volume: set at most one of emptyDir, persistentVolumeClaim or hostPath"),
    ],
)
def test_invalid_specs_are_rejected_with_the_rules_message(
    dev_cluster: DevClusterHandle, namespace: str, path: str, value: Any, expected: str
) -> None:
    body = with_spec(cheap("bad"), path, value)
    proc = apply(dev_cluster, namespace, body, check=False)
    assert proc.returncode != 0, proc.stdout
    assert expected in proc.stderr, proc.stderr
    assert get(dev_cluster, namespace, "llmd", "bad") is None


def test_name_must_fit_a_service_name(dev_cluster: DevClusterHandle, namespace: str) -> None:
    proc = apply(dev_cluster, namespace, cheap("x" * 53), check=False)
    assert proc.returncode != 0 and "metadata.name must be a DNS-1035 label" in proc.stderr


def test_defaults_columns_and_scale_subresource(dev_cluster: DevClusterHandle, namespace: str) -> None:
    apply(dev_cluster, namespace, cheap("ok"))
    stored = get(dev_cluster, namespace, "llmd", "ok")
    assert stored is not None
    spec = stored["spec"]
    # defaults filled in by the API server from the schema, nested objects included
    assert spec["quantization"] == "none" and spec["engine"]["blockSize"] == 16
    assert spec["autoscaling"]["enabled"] is False and spec["monitoring"]["serviceMonitor"] is True
    table = dev_cluster.kubectl("get", "llmd", "-n", namespace).stdout.splitlines()
    assert table[0].split() == ["NAME", "MODEL", "QUANT", "READY", "KV%", "QUEUE", "FITS", "AGE"]
    assert table[1].split()[:3] == ["ok", "builtin:smollm2-135m-instruct", "none"]
    # the short name and the category work too
    assert "ok" in dev_cluster.kubectl("get", "fleetserve", "-n", namespace, "-o", "name").stdout
    dev_cluster.kubectl("scale", "-n", namespace, "llmd/ok", "--replicas=3")
    scaled = get(dev_cluster, namespace, "llmd", "ok")
    assert scaled is not None and scaled["spec"]["replicas"] == 3
