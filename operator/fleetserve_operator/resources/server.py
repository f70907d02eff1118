"""The server's ConfigMap and the Deployment that runs ``fleetserve serve``."""

from __future__ import annotations

from typing import Any

import yaml

from ..api.capture import max_file_bytes
from ..api.spec import LLMDeploymentSpec
from ..reconcile.fit import MemoryFit
from .hashing import content_hash
from .labels import (
    CACHE_DIR,
    CONFIG_DIR,
    CONFIG_FILE,
    CONFIG_HASH,
    LABEL_COMPONENT,
    PORT_NAME,
    SERVER_PORT,
    TEMPLATE_HASH,
    child_labels,
    config_map_name,
    selector_labels,
)

# Seconds the pod keeps serving after it is marked Terminating, so that every
# proxy has dropped its endpoint before the server stops admitting requests.
PRESTOP_SLEEP_SECONDS = 5
# Margin after the drain for the process to flush and exit.
EXIT_MARGIN_SECONDS = 10
# Model loading can take many minutes (downloads, quantization): the startup
# probe allows this long before liveness takes over.
STARTUP_PERIOD_SECONDS = 5
STARTUP_BUDGET_SECONDS = 30 * 60
NON_ROOT_UID = 65532
# Where spec.capture's volume is mounted; each pod writes <pod name>.jsonl there.
CAPTURE_DIR = "/var/lib/fleetserve/capture"


def server_config(spec: LLMDeploymentSpec, fit: MemoryFit) -> dict[str, Any]:
    """``server.yaml``: ServerConfig keys (the `fleetserve serve` flags in snake_case).

    ``kv_cache_tokens`` is the planner's capacity whenever the proof ran and
    passed, so the server allocates exactly what the operator predicted. The
    host is left to the server's default (all interfaces), as in any pod.
    """
    engine = spec.engine
    config: dict[str, Any] = {
        "model": spec.model.source,
        "served_model_name": spec.model.served_name,
        "quantization": spec.quantization,
        "dtype": spec.dtype,
        # auto: CUDA when the pod got a GPU, the CPU otherwise (also on the dev cluster's pretend GPUs)
        "device": "cpu" if spec.resources.gpus == 0 else "auto",
        # one rank per GPU, the size the memory proof planned (resources.gpus); 1, the default, is left out
        "tensor_parallel_size": fit.tensor_parallel_size if fit.tensor_parallel_size > 1 else None,
        "max_model_len": engine.max_model_len,
        "max_num_seqs": engine.max_num_seqs,
        # None unless the CR sets it: the server then sizes its own step budget (2048 on CUDA, a ~1 s
        # step on the CPU cores it may use); the planner assumes the CUDA value (reconcile/fit.py).
        "max_batch_tokens": engine.max_batch_tokens,
        "kv_cache_memory_fraction": engine.kv_cache_memory_fraction,
        "block_size": engine.block_size,
        "prefix_caching": engine.prefix_caching,
        "cache_ttl_seconds": engine.cache_ttl_seconds,
        "max_queue_length": engine.max_queue_length,
        "port": SERVER_PORT,
        "drain_timeout": engine.drain_timeout_seconds,
        "log_format": "json",
    }
    if fit.status == "True" and fit.plan is not None:
        config["kv_cache_tokens"] = fit.plan.kv_capacity_tokens
    config.update(capture_config(spec))
    return {k: v for k, v in config.items() if v is not None}


def capture_config(spec: LLMDeploymentSpec) -> dict[str, Any]:
    """The --capture-* settings of spec.capture (the path, per pod, is a flag: see _container)."""
    capture = spec.capture
    if not capture.enabled:
        return {}
    config: dict[str, Any] = {
        "capture_fraction": capture.fraction,
        "capture_max_bytes": max_file_bytes(capture.max_file_size),
        "capture_max_files": capture.max_files,
        "capture_default_redaction": capture.default_redaction,
    }
    if capture.redact:
        config["capture_redact"] = list(capture.redact)
    return config


def _capture_volume(spec: LLMDeploymentSpec) -> dict[str, Any]:
    volume = spec.capture.volume
    if volume.persistent_volume_claim is not None:
        return {"name": "capture", "persistentVolumeClaim": {"claimName": volume.persistent_volume_claim.claim_name}}
    if volume.host_path is not None:
        return {"name": "capture", "hostPath": {"path": volume.host_path.path, "type": volume.host_path.type}}
    return {"name": "capture", "emptyDir": volume.empty_dir.to_wire() if volume.empty_dir is not None else {}}


def render_server_config(spec: LLMDeploymentSpec, fit: MemoryFit) -> str:
    return yaml.safe_dump(server_config(spec, fit), sort_keys=True)


def build_config_map(name: str, namespace: str, spec: LLMDeploymentSpec, fit: MemoryFit) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": config_map_name(name), "namespace": namespace, "labels": child_labels(name)},
        "data": {CONFIG_FILE: render_server_config(spec, fit)},
    }


def _resources(spec: LLMDeploymentSpec) -> dict[str, Any]:
    res = spec.resources
    amounts: dict[str, Any] = {}
    if res.cpu is not None:
        amounts["cpu"] = res.cpu
    if res.memory is not None:
        amounts["memory"] = res.memory
    if res.gpus > 0:
        amounts[res.gpu_resource_name] = str(res.gpus)
    # requests == limits: Guaranteed QoS, and extended resources must match anyway; the explicit
    # requests/limits maps add resources (ephemeral-storage, ...) or lower a request below its limit.
    requests = {**amounts, **res.requests}
    limits = {**amounts, **res.limits}
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def restricted_container_security_context() -> dict[str, Any]:
    """The container securityContext of every pod fleetserve renders (server, router): what the
    restricted Pod Security profile asks of a container, a fresh dict each call."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def http_probe(path: str, period: int, failures: int, timeout: int = 3) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": PORT_NAME},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def _container(name: str, spec: LLMDeploymentSpec) -> dict[str, Any]:
    env: list[dict[str, Any]] = [
        {"name": "FLEETSERVE_CACHE_DIR", "value": CACHE_DIR},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "HOME", "value": "/tmp"},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    if spec.api_key_secret_ref is not None:
        ref = spec.api_key_secret_ref
        env.append({"name": "FLEETSERVE_API_KEY",
                    "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    env.extend(var.to_wire() for var in spec.env)
    container: dict[str, Any] = {
        "name": "server",
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["fleetserve", "serve", "--config", f"{CONFIG_DIR}/{CONFIG_FILE}"],
        "ports": [{"name": PORT_NAME, "containerPort": SERVER_PORT, "protocol": "TCP"}],
        "env": env,
        "startupProbe": http_probe("/health", STARTUP_PERIOD_SECONDS, STARTUP_BUDGET_SECONDS // STARTUP_PERIOD_SECONDS),
        "livenessProbe": http_probe("/health", 10, 3),
        "readinessProbe": http_probe("/ready", 2, 2),
        # The sleep runs before SIGTERM, so endpoints are gone before the drain starts. An exec
        # (the image has coreutils) rather than the newer `sleep` action: every runtime, the dev
        # cluster's node agent included, runs exec hooks.
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SLEEP_SECONDS)]}}},
        "securityContext": restricted_container_security_context(),
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "model-cache", "mountPath": CACHE_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    if spec.capture.enabled:
        # One file per pod (replicas may share a claim); the kubelet expands $(POD_NAME) from the env above.
        container["command"] += ["--capture-path", f"{CAPTURE_DIR}/$(POD_NAME).jsonl"]
        container["volumeMounts"].append({"name": "capture", "mountPath": CAPTURE_DIR})
    if spec.env_from:
        container["envFrom"] = [source.to_wire() for source in spec.env_from]
    resources = _resources(spec)
    if resources:
        container["resources"] = resources
    return container


def _model_cache_volume(spec: LLMDeploymentSpec) -> dict[str, Any]:
    cache = spec.model_cache
    if cache.persistent_volume_claim is not None:
        return {"name": "model-cache", "persistentVolumeClaim": {"claimName": cache.persistent_volume_claim.claim_name}}
    if cache.host_path is not None:
        return {"name": "model-cache", "hostPath": {"path": cache.host_path.path, "type": cache.host_path.type}}
    empty_dir = cache.empty_dir.to_wire() if cache.empty_dir is not None else {}
    return {"name": "model-cache", "emptyDir": empty_dir}


def _pod_metadata(name: str, spec: LLMDeploymentSpec, config_text: str) -> dict[str, Any]:
    """Only the selector labels and spec.podLabels/podAnnotations: never the CR's own labels, so
    relabelling the LLMDeployment (or a Helm chart bump stamping helm.sh/chart on it) rolls no pod.
    The operator's keys win (the CRD's CEL rules reject podLabels/podAnnotations that name them)."""
    return {
        "labels": {**spec.pod_labels, **child_labels(name), LABEL_COMPONENT: "server"},
        "annotations": {
            **spec.pod_annotations,
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(SERVER_PORT),
            "prometheus.io/path": "/metrics",
            CONFIG_HASH: content_hash(config_text),
        },
    }


def build_pod_template(name: str, spec: LLMDeploymentSpec, config_text: str) -> dict[str, Any]:
    """The pod template, with the template-hash annotation over everything else in it."""
    scheduling = spec.scheduling
    pod_spec: dict[str, Any] = {
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": (
            PRESTOP_SLEEP_SECONDS + spec.engine.drain_timeout_seconds + EXIT_MARGIN_SECONDS
        ),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": NON_ROOT_UID,
            "runAsGroup": NON_ROOT_UID,
            "fsGroup": NON_ROOT_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(name, spec)],
        "volumes": [
            {"name": "config", "configMap": {"name": config_map_name(name)}},
            _model_cache_volume(spec),
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    if spec.capture.enabled:
        pod_spec["volumes"].append(_capture_volume(spec))
    if scheduling.node_selector:
        pod_spec["nodeSelector"] = dict(scheduling.node_selector)
    if scheduling.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in scheduling.tolerations]
    if scheduling.affinity:
        pod_spec["affinity"] = dict(scheduling.affinity)
    if scheduling.priority_class_name:
        pod_spec["priorityClassName"] = scheduling.priority_class_name
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [ref.to_wire() for ref in spec.image_pull_secrets]
    if spec.service_account_name:
        pod_spec["serviceAccountName"] = spec.service_account_name
    template: dict[str, Any] = {"metadata": _pod_metadata(name, spec, config_text), "spec": pod_spec}
    template["metadata"]["annotations"][TEMPLATE_HASH] = content_hash(template)
    return template


def build_deployment(
    name: str, namespace: str, spec: LLMDeploymentSpec, fit: MemoryFit, replicas: int
) -> dict[str, Any]:
    """The Deployment; ``replicas`` is decided by the plan (spec, autoscaler, or 0 when it cannot fit)."""
    template = build_pod_template(name, spec, render_server_config(spec, fit))
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": child_labels(name)},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector_labels(name)},
            # Default 1/0: never below the wanted capacity, one extra pod (and GPU) at a time;
            # spec.strategy 0/1 rolls on a cluster without a spare GPU.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {
                "maxSurge": spec.strategy.max_surge, "maxUnavailable": spec.strategy.max_unavailable}},
            "revisionHistoryLimit": 3,
            "progressDeadlineSeconds": STARTUP_BUDGET_SECONDS + 600,
            "template": template,
        },
    }


def template_hash(deployment: dict[str, Any] | None) -> str | None:
    """The template hash a (live or desired) Deployment carries."""
    if not deployment:
        return None
    annotations = (((deployment.get("spec") or {}).get("template") or {}).get("metadata") or {}).get(
        "annotations"
    ) or {}
    return annotations.get(TEMPLATE_HASH)
