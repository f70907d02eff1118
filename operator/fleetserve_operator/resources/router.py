"""The router's children (``spec.router.enabled``): ``fleetserve router`` in front of the servers.

With the router on, the LLMDeployment's Service ``<name>`` selects the router
pods and ``<name>-servers`` selects the server pods; each router pod follows
that Service's EndpointSlices (ready endpoints only), so it needs to list and
watch them: a ServiceAccount ``<name>-router`` with a Role granting exactly
that in the LLMDeployment's namespace. The pods pass the *restricted* Pod
Security profile like the servers' (non-root, read-only root filesystem, no
capabilities, seccomp RuntimeDefault); only the API token is mounted, which
discovery needs.
"""

from __future__ import annotations

from typing import Any

from ..api.spec import LLMDeploymentSpec
from .hashing import content_hash
from .labels import (
    LABEL_COMPONENT,
    PORT_NAME,
    SERVER_PORT,
    TEMPLATE_HASH,
    child_labels,
    router_child_labels,
    router_name,
    router_selector_labels,
    selector_labels,
    servers_service_name,
)
from .server import NON_ROOT_UID, PRESTOP_SLEEP_SECONDS, http_probe, restricted_container_security_context

# SIGTERM: in-flight requests finish (held ones are answered 503 at once, so clients retry another
# router pod); a streamed answer may take as long as the servers' own drain.
EXIT_MARGIN_SECONDS = 5
ROUTER_RESOURCES = {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}


def router_args(namespace: str, name: str, spec: LLMDeploymentSpec) -> list[str]:
    """``fleetserve router`` flags from the spec (the servers' cache TTL bounds the prefix credit)."""
    router = spec.router
    return [
        "fleetserve", "router",
        "--service", f"{namespace}/{servers_service_name(name)}",
        "--port-name", PORT_NAME,
        # 0.0.0.0 is the pod's own address (the dev cluster's node agent rewrites it to the pod IP)
        "--host", "0.0.0.0", "--port", str(SERVER_PORT),
        "--hold-timeout", str(router.hold_timeout_seconds),
        "--max-held", str(router.max_held_requests),
        "--cache-ttl", str(spec.engine.cache_ttl_seconds),
        "--drain-timeout", str(spec.engine.drain_timeout_seconds),
    ]


def build_router_pod_template(namespace: str, name: str, spec: LLMDeploymentSpec) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "router",
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "command": router_args(namespace, name, spec),
        "ports": [{"name": PORT_NAME, "containerPort": SERVER_PORT, "protocol": "TCP"}],
        "env": [{"name": "HOME", "value": "/tmp"}],
        # /health fails when the EndpointSlice watch is gone; /ready only while draining: a router
        # with no ready server is exactly what must receive (and hold) requests.
        "livenessProbe": http_probe("/health", 10, 3),
        "readinessProbe": http_probe("/ready", 2, 2),
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SLEEP_SECONDS)]}}},
        "securityContext": restricted_container_security_context(),
        "resources": ROUTER_RESOURCES,
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": router_name(name),
        "automountServiceAccountToken": True,  # the EndpointSlice watch (the Role allows only that)
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": (
            PRESTOP_SLEEP_SECONDS + spec.engine.drain_timeout_seconds + EXIT_MARGIN_SECONDS
        ),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": NON_ROOT_UID,
            "runAsGroup": NON_ROOT_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {}}],
    }
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [ref.to_wire() for ref in spec.image_pull_secrets]
    template: dict[str, Any] = {
        "metadata": {
            "labels": {**router_child_labels(name), LABEL_COMPONENT: "router"},
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(SERVER_PORT),
                            "prometheus.io/path": "/metrics"},
        },
        "spec": pod_spec,
    }
    template["metadata"]["annotations"][TEMPLATE_HASH] = content_hash(template)
    return template


def build_router_deployment(namespace: str, name: str, spec: LLMDeploymentSpec) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": router_name(name), "namespace": namespace, "labels": router_child_labels(name)},
        "spec": {
            "replicas": spec.router.replicas,
            "selector": {"matchLabels": router_selector_labels(name)},
            # Never fewer ready routers than asked for while rolling: each one holds requests.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "revisionHistoryLimit": 3,
            "template": build_router_pod_template(namespace, name, spec),
        },
    }


def wants_router_pdb(spec: LLMDeploymentSpec) -> bool:
    """As for the servers: a budget over one pod would block node drains forever."""
    return spec.router.replicas > 1


def build_router_pdb(namespace: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": router_name(name), "namespace": namespace, "labels": router_child_labels(name)},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": router_selector_labels(name)}},
    }


def build_router_service_account(namespace: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": router_name(name), "namespace": namespace, "labels": router_child_labels(name)},
    }


# What `fleetserve router --service` calls (fleetserve_router.discovery.SliceWatcher): list, then watch.
ROUTER_RULES = [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}]


def build_router_role(namespace: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": router_name(name), "namespace": namespace, "labels": router_child_labels(name)},
        "rules": ROUTER_RULES,
    }


def build_router_role_binding(namespace: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": router_name(name), "namespace": namespace, "labels": router_child_labels(name)},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": router_name(name)},
        "subjects": [{"kind": "ServiceAccount", "name": router_name(name), "namespace": namespace}],
    }


def build_servers_service(namespace: str, name: str) -> dict[str, Any]:
    """``<name>-servers``: the server pods, for the router's discovery (and for direct access)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": servers_service_name(name), "namespace": namespace, "labels": child_labels(name)},
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(name),
            "ports": [{"name": PORT_NAME, "port": SERVER_PORT, "targetPort": PORT_NAME, "protocol": "TCP"}],
        },
    }


def router_ready(deployment: dict[str, Any] | None) -> int:
    """Ready router pods of a live router Deployment (0 when absent)."""
    return int(((deployment or {}).get("status") or {}).get("readyReplicas") or 0)
