"""``LLMDeployment.spec``: the pydantic models that are the single source of truth.

The CRD's OpenAPI schema (descriptions, defaults, enums, patterns, CEL rules)
is generated from these classes by :mod:`fleetserve_operator.api.crd`; the
operator reads every spec through :meth:`LLMDeploymentSpec.model_validate`.
Field names and meanings are fixed in ``ARCHITECTURE.md``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from .base import ApiModel, Rule
from .capture import Capture
from .pod import (
    EnvFromSource,
    EnvVar,
    LocalObjectReference,
    ModelCache,
    Strategy,
    pod_settings_rules,
)
from .quantity import QUANTITY_PATTERN, Quantity

__all__ = ["QUANTITY_PATTERN", "Quantity"]  # re-exported: older imports name them here

GROUP = "fleetserve.io"
VERSION = "v1alpha1"
KIND = "LLMDeployment"
PLURAL = "llmdeployments"
SINGULAR = "llmdeployment"
SHORT_NAMES = ("llmd",)
CATEGORIES = ("fleetserve",)

DEFAULT_IMAGE = "ghcr.io/fleetserve/fleetserve:0.1.0"

Quantization = Literal["none", "int8", "nf4", "fp4"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class ModelSource(ApiModel):
    """Which weights the server loads."""

    source: str = Field(
        min_length=1, max_length=512,
        description="builtin:smollm2-135m-instruct, a directory or .gguf file on the node, or hf:org/name",
    )
    served_name: str | None = Field(
        None, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:-]*$",
        description="the model name clients send (default: derived from source)",
    )
    revision: str | None = Field(None, max_length=128, description="Hugging Face revision (hf: sources only)")


class Resources(ApiModel):
    """What one replica gets. The memory-fit proof uses gpuMemory x gpus, or memory when gpus is 0."""

    RULES = (
        Rule("self.gpus == 0 || has(self.gpuMemory)",
             "resources.gpuMemory is required when resources.gpus > 0 (the memory of one GPU, e.g. 24Gi): "
             "the operator proves the model fits before it creates pods",
             lambda r: r.gpus == 0 or r.gpu_memory is not None, field="gpuMemory"),
        Rule("self.gpus > 0 || has(self.memory)",
             "resources.memory is required when resources.gpus is 0: the server runs on CPU and the "
             "model and its KV cache must fit in it (e.g. memory: 4Gi)",
             lambda r: r.gpus > 0 or r.memory is not None, field="memory"),
        Rule("(!has(self.requests) || !(self.gpuResourceName in self.requests)) && "
             "(!has(self.limits) || !(self.gpuResourceName in self.limits))",
             "resources.requests/limits may not name the GPU resource: set resources.gpus (it is also the "
             "server's tensor-parallel size)",
             lambda r: r.gpu_resource_name not in r.requests and r.gpu_resource_name not in r.limits,
             field="limits"),
    )

    gpus: int = Field(1, ge=0, le=64, description="GPUs per replica; 0 runs the server on CPU")
    gpu_memory: Quantity | None = Field(None, description="memory of one GPU, e.g. 24Gi or 80Gi")
    cpu: Quantity | None = Field(None, description="CPU request and limit per replica, e.g. 2 or 500m")
    memory: Quantity | None = Field(
        None, description="host memory request and limit per replica; with gpus 0 it also holds the model"
    )
    gpu_resource_name: str = Field(
        "nvidia.com/gpu", max_length=253, pattern=r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?/[A-Za-z0-9]([A-Za-z0-9._-]*)$",
        description="extended resource that schedules GPUs (nvidia.com/gpu, amd.com/gpu, ...)",
    )
    requests: dict[str, Quantity] = Field(
        default_factory=dict, max_length=16,
        description="extra container requests (e.g. ephemeral-storage), or cpu/memory requests below the limits; "
                    "they override the cpu/memory shortcuts",
    )
    limits: dict[str, Quantity] = Field(
        default_factory=dict, max_length=16,
        description="extra container limits (e.g. ephemeral-storage, hugepages-2Mi); they override the "
                    "cpu/memory shortcuts",
    )


class Engine(ApiModel):
    """Inference-engine limits; they become the server's flags (server.yaml)."""

    RULES = (
        Rule("self.kvCacheMemoryFraction > 0.0 && self.kvCacheMemoryFraction < 1.0",
             "engine.kvCacheMemoryFraction must be in (0, 1): the share of device memory for weights + KV cache, "
             "e.g. 0.9", lambda e: 0.0 < e.kv_cache_memory_fraction < 1.0, field="kvCacheMemoryFraction"),
        Rule("!has(self.maxBatchTokens) || self.maxBatchTokens >= self.maxNumSeqs",
             "engine.maxBatchTokens must be >= engine.maxNumSeqs: every running sequence needs one token "
             "per decode step",
             lambda e: e.max_batch_tokens is None or e.max_batch_tokens >= e.max_num_seqs, field="maxBatchTokens"),
    )

    max_model_len: int = Field(2048, ge=1, le=1_048_576, description="context limit in tokens (prompt + output)")
    max_num_seqs: int = Field(32, ge=1, le=4096, description="sequences batched together in one engine step")
    max_batch_tokens: int | None = Field(
        None, ge=1, le=1_048_576,
        description="tokens computed per engine step (default: the server's own, 2048 on CUDA, sized for about a "
        "second per step on CPU); long prompts are split into chunks "
        "(chunked prefill is always on), so it may be below maxModelLen",
    )
    kv_cache_memory_fraction: float = Field(
        0.9, description="share of device memory for weights + KV cache, in (0, 1)"
    )
    block_size: int = Field(16, ge=1, le=256, description="tokens per KV-cache block")
    prefix_caching: bool = Field(True, description="reuse the KV cache of shared prompt prefixes")
    cache_ttl_seconds: int = Field(
        600, ge=1, le=604_800, alias="cacheTTLSeconds", description="idle seconds before a cached prefix is freed"
    )
    max_queue_length: int | None = Field(
        None, ge=1, le=1_000_000, description="waiting requests before new ones get 429 (default: 4 x the KV capacity / maxModelLen, at least maxNumSeqs)"
    )
    drain_timeout_seconds: int = Field(
        30, ge=0, le=3600,
        description="seconds in-flight requests may finish after SIGTERM; sizes terminationGracePeriodSeconds",
    )

    @property
    def effective_max_batch_tokens(self) -> int:
        """The server's default when unset (ServerConfig.max_batch_tokens)."""
        return self.max_batch_tokens if self.max_batch_tokens is not None else 2048


class ScaleDownPolicy(ApiModel):
    """At most ``percent`` % of the replicas at the start of any ``periodSeconds`` are removed
    (at least one per period), after the scale-down stabilization window."""

    percent: int = Field(50, ge=1, le=100, description="share of the fleet a scale-down may remove per period")
    period_seconds: int = Field(60, ge=1, le=3600, description="length of the period, in seconds")


class Autoscaling(ApiModel):
    """The built-in autoscaler (see fleetserve_operator.autoscaler)."""

    RULES = (
        Rule("self.minReplicas <= self.maxReplicas",
             "autoscaling.minReplicas must be <= autoscaling.maxReplicas",
             lambda a: a.min_replicas <= a.max_replicas, field="minReplicas"),
        Rule("self.targetKVCacheUsage > 0.0 && self.targetKVCacheUsage <= 1.0",
             "autoscaling.targetKVCacheUsage must be in (0, 1], e.g. 0.8",
             lambda a: 0.0 < a.target_kv_cache_usage <= 1.0, field="targetKVCacheUsage"),
    )

    enabled: bool = Field(False, description="scale from the pods' queue and KV-cache metrics")
    min_replicas: int = Field(
        1, ge=0, le=1000,
        description="fewest replicas the autoscaler keeps; 0 (scale to zero when idle) needs router.enabled, "
                    "whose held requests bring the fleet back",
    )
    max_replicas: int = Field(4, ge=1, le=1000, description="most replicas the autoscaler creates")
    target_queue_length: float = Field(
        4.0, gt=0, le=100_000, description="waiting requests per replica the autoscaler aims for"
    )
    target_kv_cache_usage: float = Field(
        0.8, alias="targetKVCacheUsage", description="KV-cache usage ratio per replica the autoscaler aims for"
    )
    scale_up_stabilization_seconds: int = Field(
        0, ge=0, le=3600, description="highest recommendation over this window is used when scaling up"
    )
    scale_down_stabilization_seconds: int = Field(
        300, ge=0, le=86_400, description="highest recommendation over this window is used when scaling down"
    )
    scrape_interval_seconds: int = Field(10, ge=1, le=3600, description="seconds between metric scrapes")
    scale_down_policy: ScaleDownPolicy = Field(
        default_factory=lambda: ScaleDownPolicy.model_validate({}),
        description="how fast the fleet may shrink (HPA's behavior.scaleDown.policies, type Percent)",
    )


class Scheduling(ApiModel):
    """Copied into the pod template as they are."""

    node_selector: dict[str, str] = Field(default_factory=dict, description="pod nodeSelector")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="pod tolerations")
    affinity: dict[str, Any] | None = Field(None, description="pod affinity (core/v1 Affinity)")
    priority_class_name: str | None = Field(None, max_length=253, description="pod priorityClassName")
    max_node_provision_seconds: int = Field(
        900, ge=0, le=86400,
        description="how long a pod may wait for a node and then become Ready on it (your cluster autoscaler's "
                    "max node provision time plus the model's load time) before the fleet is "
                    "Degraded/Unschedulable; until then it counts as capacity being provisioned "
                    "(Progressing/WaitingForNodes) and is never removed. 0: no node autoscaler, at once",
    )


class SecretKeyRef(ApiModel):
    """A key of a Secret in the LLMDeployment's namespace."""

    name: str = Field(min_length=1, max_length=253, description="Secret name")
    key: str = Field("api-key", min_length=1, max_length=253, description="key in the Secret")


class Monitoring(ApiModel):
    """Prometheus Operator objects, created only when their CRDs exist in the cluster."""

    service_monitor: bool = Field(True, description="create a ServiceMonitor for the pods' /metrics")
    prometheus_rule: bool = Field(True, description="create a PrometheusRule with fleetserve's alerts")


class Router(ApiModel):
    """``fleetserve router`` in front of the servers: prefix-aware routing, and requests held while no
    replica is ready (what makes ``autoscaling.minReplicas: 0`` safe)."""

    enabled: bool = Field(
        False,
        description="run <name>-router: the Service <name> then selects the router pods and <name>-servers the "
                    "server pods",
    )
    replicas: int = Field(2, ge=1, le=100, description="router pods (each holds its own requests)")
    hold_timeout_seconds: int = Field(
        900, ge=1, le=86_400,
        description="how long a request waits for a ready replica (node provisioning, image pull, model load) "
                    "before it gets 503",
    )
    max_held_requests: int = Field(
        1000, ge=0, le=1_000_000, description="requests one router pod holds at once; more get 429 + Retry-After"
    )


def _spec_rules() -> tuple[Rule, ...]:
    return (
        *pod_settings_rules(),
        Rule("!has(self.autoscaling) || !self.autoscaling.enabled || self.autoscaling.minReplicas > 0 || "
             "(has(self.router) && self.router.enabled)",
             "autoscaling.minReplicas may be 0 only with router.enabled: true (the router holds the requests "
             "that arrive while no replica runs, and its held-requests gauge brings the fleet back)",
             lambda s: not s.autoscaling.enabled or s.autoscaling.min_replicas > 0 or s.router.enabled,
             field="autoscaling.minReplicas"),
    )


class LLMDeploymentSpec(ApiModel):
    """Desired state of a fleet of fleetserve inference servers."""

    RULES = _spec_rules()

    model: ModelSource = Field(description="the model to serve")
    image: str = Field(DEFAULT_IMAGE, min_length=1, max_length=512, description="server container image")
    quantization: Quantization = Field("none", description="bitsandbytes weight quantization")
    dtype: Dtype = Field("auto", description="compute dtype (auto: bfloat16 on GPU, float32 on CPU)")
    resources: Resources = Field(
        description="per-replica resources: gpus with gpuMemory, or gpus: 0 with memory (the fit proof needs one)"
    )
    engine: Engine = Field(default_factory=lambda: Engine.model_validate({}), description="inference engine limits")
    replicas: int = Field(
        1, ge=0, le=1000,
        description="replicas when autoscaling is off; HPA/KEDA may set it through the scale subresource",
    )
    autoscaling: Autoscaling = Field(default_factory=lambda: Autoscaling.model_validate({}), description="built-in autoscaler")
    scheduling: Scheduling = Field(default_factory=lambda: Scheduling.model_validate({}), description="pod placement")
    api_key_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret holding the API key clients must send as a Bearer token"
    )
    monitoring: Monitoring = Field(default_factory=lambda: Monitoring.model_validate({}), description="Prometheus Operator integration")
    router: Router = Field(
        default_factory=lambda: Router.model_validate({}),
        description="the prefix-aware router in front of the servers (holds requests through scale-from-zero)",
    )
    # Pod settings (api/pod.py). None of them is copied from the LLMDeployment's own metadata:
    # only podLabels/podAnnotations reach the pod template, so relabelling the CR rolls no pod.
    image_pull_secrets: list[LocalObjectReference] = Field(
        default_factory=list, max_length=16, description="Secrets (by name) to pull the server image"
    )
    service_account_name: str | None = Field(
        None, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
        description="ServiceAccount of the server pods (its token is not mounted)",
    )
    env: list[EnvVar] = Field(default_factory=list, max_length=64, description="extra server environment variables")
    env_from: list[EnvFromSource] = Field(
        default_factory=list, max_length=16,
        description="ConfigMaps/Secrets whose keys become environment variables (e.g. HF_TOKEN from a Secret)",
    )
    model_cache: ModelCache = Field(
        default_factory=lambda: ModelCache.model_validate({}),
        description="volume for downloaded/converted weights: emptyDir (default), a shared persistentVolumeClaim, "
                    "or hostPath",
    )
    capture: Capture = Field(
        default_factory=lambda: Capture.model_validate({}),
        description="opt-in capture of sampled requests (redacted JSON lines) for offline evaluation",
    )
    strategy: Strategy = Field(
        default_factory=lambda: Strategy.model_validate({}),
        description="rolling update: maxSurge 1/maxUnavailable 0 (default) needs a spare GPU; 0/1 does not",
    )
    pod_annotations: dict[str, str] = Field(
        default_factory=dict, max_length=64, description="extra annotations on the server pods"
    )
    pod_labels: dict[str, str] = Field(
        default_factory=dict, max_length=64,
        description="extra labels on the server pods (the only labels besides the selector; the "
                    "LLMDeployment's own labels are never copied, so relabelling it restarts nothing)",
    )


def spec_from_body(body: dict[str, Any] | Any) -> LLMDeploymentSpec:
    """The validated spec of an LLMDeployment object (raises pydantic.ValidationError)."""
    return LLMDeploymentSpec.model_validate(dict(body.get("spec") or {}))
