"""The Service in front of the pods and the PodDisruptionBudget that protects them."""

from __future__ import annotations

from typing import Any

from .labels import (
    PORT_NAME,
    SERVER_PORT,
    child_labels,
    router_child_labels,
    router_selector_labels,
    selector_labels,
)


def build_service(name: str, namespace: str, via_router: bool = False) -> dict[str, Any]:
    """The Service clients use: the server pods, or — ``via_router`` — the router pods (which then
    find the servers through ``<name>-servers``)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": router_child_labels(name) if via_router else child_labels(name)},
        "spec": {
            "type": "ClusterIP",
            "selector": router_selector_labels(name) if via_router else selector_labels(name),
            "ports": [{"name": PORT_NAME, "port": SERVER_PORT, "targetPort": PORT_NAME, "protocol": "TCP"}],
        },
    }


def wants_pdb(replicas: int) -> bool:
    """A budget only helps with more than one replica; with one it would block node drains forever."""
    return replicas > 1


def build_pdb(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": name, "namespace": namespace, "labels": child_labels(name)},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(name)}},
    }
