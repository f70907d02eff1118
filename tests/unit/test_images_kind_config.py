"""kind-config.yaml against kind's `kind.x-k8s.io/v1alpha4` Cluster type, field by field.

The schema below transcribes sigs.k8s.io/kind/pkg/apis/config/v1alpha4/types.go
(Cluster, Node, Networking, Mount, PortMapping, PatchJSON6902 and their enums);
kind decodes its config strictly, so an unknown field is an error there too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KIND_CONFIG = REPO / "kind-config.yaml"

STR, INT32, BOOL = "string", "int32", "bool"
PATCH_JSON6902 = {"group": STR, "version": STR, "kind": STR, "patch": STR}
MOUNT = {
    "containerPath": STR, "hostPath": STR, "readOnly": BOOL, "selinuxRelabel": BOOL,
    "propagation": ("enum", {"None", "HostToContainer", "Bidirectional"}),
}
PORT_MAPPING = {
    "containerPort": INT32, "hostPort": INT32, "listenAddress": STR,
    "protocol": ("enum", {"TCP", "UDP", "SCTP"}),
}
NODE = {
    "role": ("enum", {"control-plane", "worker"}),
    "image": STR,
    "labels": ("map", STR),
    "extraMounts": ("list", MOUNT),
    "extraPortMappings": ("list", PORT_MAPPING),
    "gpus": STR,
    "kubeadmConfigPatches": ("list", STR),
    "kubeadmConfigPatchesJSON6902": ("list", PATCH_JSON6902),
}
NETWORKING = {
    "ipFamily": ("enum", {"ipv4", "ipv6", "dual"}),
    "apiServerPort": INT32, "apiServerAddress": STR, "podSubnet": STR, "serviceSubnet": STR,
    "disableDefaultCNI": BOOL, "kubeProxyMode": ("enum", {"iptables", "ipvs", "nftables", "none"}),
    "dnsSearch": ("list", STR),
}
CLUSTER = {
    "kind": ("enum", {"Cluster"}),
    "apiVersion": ("enum", {"kind.x-k8s.io/v1alpha4"}),
    "name": STR,
    "nodes": ("list", NODE),
    "networking": NETWORKING,
    "featureGates": ("map", BOOL),
    "runtimeConfig": ("map", STR),
    "kubeadmConfigPatches": ("list", STR),
    "kubeadmConfigPatchesJSON6902": ("list", PATCH_JSON6902),
    "containerdConfigPatches": ("list", STR),
    "containerdConfigPatchesJSON6902": ("list", STR),
}


def validate(value: Any, schema: Any, path: str = "") -> list[str]:
    """Errors (path: problem) of `value` against a schema node of the tables above."""
    where = path or "<root>"
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return [f"{where}: expected an object, got {type(value).__name__}"]
        errors = []
        for key, item in value.items():
            if key not in schema:
                errors.append(f"{where}: unknown field {key!r} (kind v1alpha4 knows {sorted(schema)})")
            else:
                errors += validate(item, schema[key], f"{path}.{key}" if path else key)
        return errors
    if schema == STR:
        return [] if isinstance(value, str) else [f"{where}: expected a string, got {value!r}"]
    if schema == BOOL:
        return [] if isinstance(value, bool) else [f"{where}: expected a bool, got {value!r}"]
    if schema == INT32:
        ok = isinstance(value, int) and not isinstance(value, bool) and -(2**31) <= value < 2**31
        return [] if ok else [f"{where}: expected an int32, got {value!r}"]
    kind, inner = schema
    if kind == "enum":
        return [] if value in inner else [f"{where}: {value!r} is not one of {sorted(inner)}"]
    if kind == "list":
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {type(value).__name__}"]
        return [e for i, item in enumerate(value) for e in validate(item, inner, f"{where}[{i}]")]
    if kind == "map":
        if not isinstance(value, dict):
            return [f"{where}: expected a map, got {type(value).__name__}"]
        return [e for k, item in value.items() for e in validate(item, inner, f"{where}[{k!r}]")]
    raise AssertionError(f"bad schema node {schema!r}")


def _config() -> dict:
    return yaml.safe_load(KIND_CONFIG.read_text())


def test_kind_config_matches_the_v1alpha4_cluster_type() -> None:
    config = _config()
    assert validate(config, CLUSTER) == []
    assert config["kind"] == "Cluster" and config["apiVersion"] == "kind.x-k8s.io/v1alpha4"


def test_one_control_plane_two_workers_one_with_gpu_label() -> None:
    roles = [node.get("role", "control-plane") for node in _config()["nodes"]]
    assert roles == ["control-plane", "worker", "worker"]
    workers = [n for n in _config()["nodes"] if n.get("role") == "worker"]
    gpu = [n for n in workers if n.get("labels", {}).get("nvidia.com/gpu.present") == "true"]
    assert len(gpu) == 1
    # Node labels are strings; YAML would turn an unquoted true into a bool, which kind rejects.
    assert validate(gpu[0]["labels"], ("map", STR)) == []


def test_workers_mount_the_host_model_cache() -> None:
    for node in _config()["nodes"]:
        if node.get("role") != "worker":
            continue
        mounts = {m["containerPath"]: m for m in node.get("extraMounts", [])}
        cache = mounts["/var/cache/fleetserve-models"]
        assert cache["hostPath"].startswith("/") and not cache.get("readOnly", False)


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda c: c["nodes"][1].update(lables={"a": "b"}), "unknown field 'lables'"),
        (lambda c: c["nodes"][0].update(role="master"), "'master' is not one of"),
        (lambda c: c["nodes"][2]["labels"].update({"nvidia.com/gpu.present": True}), "expected a string"),
        (lambda c: c["nodes"][1]["extraMounts"][0].update(propagation="shared"), "is not one of"),
        (lambda c: c.update(apiVersion="kind.sigs.k8s.io/v1alpha3"), "is not one of"),
        (lambda c: c.update(networking={"apiServerPort": "6443"}), "expected an int32"),
    ],
)
def test_validator_rejects_what_kind_rejects(mutate: Any, error: str) -> None:
    config = _config()
    mutate(config)
    errors = validate(config, CLUSTER)
    assert any(error in e for e in errors), errors
