"""Names and labels of an LLMDeployment's children (fixed in ARCHITECTURE.md)."""

from __future__ import annotations

MANAGED_BY = "fleetserve"
FIELD_MANAGER = "fleetserve"
APP_NAME = "fleetserve-server"
ROUTER_APP_NAME = "fleetserve-router"  # the router's pods and objects (spec.router.enabled)

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_COMPONENT = "app.kubernetes.io/component"

# Annotations the operator owns.
APPLIED_HASH = "fleetserve.io/applied-hash"  # of the whole desired child: apply only when it changes
TEMPLATE_HASH = "fleetserve.io/template-hash"  # of the pod template: any spec change rolls the pods
CONFIG_HASH = "fleetserve.io/config-hash"  # of server.yaml: a config change rolls the pods too

SERVER_PORT = 8000
PORT_NAME = "http"
CONFIG_FILE = "server.yaml"
CONFIG_DIR = "/etc/fleetserve"
CACHE_DIR = "/var/cache/fleetserve"


def selector_labels(instance: str) -> dict[str, str]:
    """Labels that select the pods of one LLMDeployment (immutable in the Deployment)."""
    return {LABEL_NAME: APP_NAME, LABEL_INSTANCE: instance}


def child_labels(instance: str) -> dict[str, str]:
    """Labels on every child object and pod."""
    return {**selector_labels(instance), LABEL_MANAGED_BY: MANAGED_BY}


def router_selector_labels(instance: str) -> dict[str, str]:
    """Labels that select one LLMDeployment's router pods (never its server pods)."""
    return {LABEL_NAME: ROUTER_APP_NAME, LABEL_INSTANCE: instance}


def router_child_labels(instance: str) -> dict[str, str]:
    """Labels on the router's objects and pods."""
    return {**router_selector_labels(instance), LABEL_MANAGED_BY: MANAGED_BY}


def router_name(instance: str) -> str:
    """The router's Deployment, PodDisruptionBudget, ServiceAccount, Role and RoleBinding."""
    return f"{instance}-router"


def servers_service_name(instance: str) -> str:
    """With the router on: the Service that selects the server pods (the router watches its EndpointSlices)."""
    return f"{instance}-servers"


def router_selector_string(instance: str) -> str:
    return ",".join(f"{k}={v}" for k, v in router_selector_labels(instance).items())


def selector_string(instance: str) -> str:
    """``status.selector`` for the scale subresource."""
    return ",".join(f"{k}={v}" for k, v in selector_labels(instance).items())


def config_map_name(instance: str) -> str:
    return f"{instance}-config"


def endpoint(instance: str, namespace: str) -> str:
    """The Service's in-cluster URL."""
    return f"http://{instance}.{namespace}.svc.cluster.local:{SERVER_PORT}"
