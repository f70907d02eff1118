"""``LLMDeployment.status``: what the operator (and the autoscaler) observed.

The operator writes status as a JSON merge patch of only the keys that
changed (see :mod:`fleetserve_operator.status`); these models give the CRD its
status schema and document each field. Writers other than the operator (the
autoscaler) own ``desiredReplicas`` (when autoscaling is on), ``autoscaler``
and the ``ScalingActive`` condition.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import ApiModel

ConditionType = Literal["Ready", "Progressing", "MemoryFits", "ScalingActive", "Degraded", "MonitoringReady",
                        "RouterReady"]
CONDITION_TYPES: tuple[str, ...] = ("Ready", "Progressing", "MemoryFits", "ScalingActive", "Degraded",
                                    "MonitoringReady", "RouterReady")


class Condition(ApiModel):
    """One condition; ``lastTransitionTime`` changes only when ``status`` changes."""

    type: ConditionType = Field(
        description="Ready, Progressing, MemoryFits, ScalingActive, Degraded, MonitoringReady or RouterReady")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown")
    reason: str = Field(max_length=1024, description="CamelCase reason")
    message: str = Field("", max_length=32768, description="human-readable explanation, with numbers")
    last_transition_time: str = Field(description="when status last changed (RFC 3339)")
    observed_generation: int | None = Field(None, ge=0, description="spec generation the condition is about")


class MemoryStatus(ApiModel):
    """The memory-fit proof for one replica, per device: what one GPU holds (sizes in bytes)."""

    fits: bool | None = Field(None, description="one full-length sequence fits on every device; absent when unknown")
    device: str | None = Field(None, description="cuda or cpu: where the numbers were computed for")
    devices: int | None = Field(None, ge=0, description="GPUs in each pod (resources.gpus; 1 on cpu)")
    tensor_parallel_size: int | None = Field(
        None, ge=0, description="devices the server splits the model across (1: the whole model on one GPU)"
    )
    available_bytes: int | None = Field(None, ge=0, description="one device's memory (gpuMemory, or memory)")
    weights_bytes: int | None = Field(None, ge=0, description="weights on one device (the largest shard)")
    kv_bytes_per_token: int | None = Field(None, ge=0, description="K and V of every layer for one token, per device")
    kv_capacity_tokens: int | None = Field(None, ge=0, description="KV-cache tokens the server allocates")
    max_concurrent_sequences: int | None = Field(
        None, ge=0, description="full-length (maxModelLen) sequences the KV cache holds at once"
    )
    message: str | None = Field(None, max_length=4096, description="the planner's explanation")


class ScaleDecision(ApiModel):
    """The autoscaler's last change of desiredReplicas."""

    from_: int = Field(alias="from", ge=0, description="replicas before")
    to: int = Field(ge=0, description="replicas after")
    reason: str = Field(max_length=4096, description="which metric asked for it, with the numbers")


class ObservedMetrics(ApiModel):
    """Fleet-wide metrics the autoscaler scraped last."""

    queue_length: float | None = Field(None, ge=0, description="waiting requests per ready replica")
    kv_cache_usage: float | None = Field(None, ge=0, description="mean KV-cache usage ratio (0..1)")
    kv_cache_usage_percent: int | None = Field(
        None, ge=0, description="kvCacheUsage x 100, rounded (the KV% printer column)"
    )
    pods: int | None = Field(None, ge=0, description="pods scraped")
    held_requests: int | None = Field(
        None, ge=0, description="requests the router pods hold for want of a ready replica (router.enabled)"
    )


class WaitingForNodes(ApiModel):
    """The fleet's pods no node could take yet (a cluster autoscaler may be adding one)."""

    pods: int = Field(ge=0, description="unschedulable pods still within scheduling.maxNodeProvisionSeconds")
    overdue: int = Field(0, ge=0, description="unschedulable pods past that limit (Degraded/Unschedulable)")
    since: str | None = Field(None, description="when the first of them became unschedulable (RFC 3339)")
    seconds: int = Field(0, ge=0, description="how long the longest-waiting one has waited")


class AutoscalerStatus(ApiModel):
    """Written by the autoscaler only."""

    last_scale_time: str | None = Field(None, description="when desiredReplicas last changed (RFC 3339)")
    last_decision: ScaleDecision | None = Field(None, description="the last scaling decision")
    observed: ObservedMetrics | None = Field(None, description="the last scrape")
    waiting_for_nodes: WaitingForNodes | None = Field(
        None, description="pods waiting for a node; absent when every pod is placed")


class LLMDeploymentStatus(ApiModel):
    """Observed state; every field is optional because writers fill it in over time."""

    observed_generation: int | None = Field(None, ge=0, description="last spec generation reconciled")
    replicas: int | None = Field(None, ge=0, description="pods of the Deployment (the scale subresource)")
    ready_replicas: int | None = Field(None, ge=0, description="pods passing /ready")
    desired_replicas: int | None = Field(
        None, ge=0, description="replicas wanted: spec.replicas, or the autoscaler's decision"
    )
    ready_summary: str | None = Field(None, description="ready/desired, for the Ready printer column")
    selector: str | None = Field(None, description="label selector of the pods (the scale subresource)")
    endpoint: str | None = Field(None, description="in-cluster URL of the Service")
    memory: MemoryStatus | None = Field(None, description="memory-fit proof")
    autoscaler: AutoscalerStatus | None = Field(None, description="built-in autoscaler state")
    conditions: list[Condition] = Field(default_factory=list, description="Ready, Progressing, MemoryFits, ...")


def observed_metrics(queue_length: float | None, kv_cache_usage: float | None, pods: int,
                     held_requests: int | None = None) -> dict[str, object]:
    """``status.autoscaler.observed`` as a camelCase dict, with the percent column filled in."""
    out: dict[str, object] = {"pods": pods}
    if held_requests is not None:
        out["heldRequests"] = held_requests
    if queue_length is not None:
        out["queueLength"] = round(float(queue_length), 3)
    if kv_cache_usage is not None:
        out["kvCacheUsage"] = round(float(kv_cache_usage), 4)
        out["kvCacheUsagePercent"] = int(round(float(kv_cache_usage) * 100))
    return out
