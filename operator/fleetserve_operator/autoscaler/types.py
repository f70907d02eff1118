"""Plain value types shared by the scraper, the decision and the controller.

They carry no Kubernetes or HTTP objects: the controller adapts the CR's
pydantic spec and the pod list into these at the edge, so ``plan_replicas``
is a pure function of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

# Defaults mirror the CRD's (ARCHITECTURE.md, `autoscaling{...}`); the CR's
# pydantic model is the source of truth, these only serve direct callers.
DEFAULT_SCALE_DOWN_STABILIZATION_S = 300.0
DEFAULT_SCRAPE_INTERVAL_S = 10.0
# Kubernetes HPA's default scale-down policy: at most half of the fleet per minute.
DEFAULT_SCALE_DOWN_PERCENT = 50
DEFAULT_SCALE_DOWN_PERIOD_S = 60.0
# A signal within ±10 % of its target proposes no change (Kubernetes HPA's
# tolerance), so a load that hovers around the target never flaps the size.
TOLERANCE = 0.10


class ScrapeError(StrEnum):
    """Why one pod's /metrics gave no usable numbers (the metric label values)."""

    TIMEOUT = "timeout"
    CONNECTION = "connection"
    HTTP_STATUS = "http_status"
    PARSE = "parse"
    MISSING_METRIC = "missing_metric"


class Signal(StrEnum):
    """Which input drove a decision."""

    QUEUE = "queue"
    KV_CACHE = "kv_cache"
    NONE = "none"


class Limit(StrEnum):
    """What kept the desired size from following the raw recommendation.

    The values double as the ``ScalingActive`` / ``Degraded`` condition reasons.
    """

    NONE = "ValidMetrics"
    SCALE_DOWN_STABILIZATION = "ScaleDownStabilized"
    SCALE_UP_STABILIZATION = "ScaleUpStabilized"
    SCALE_UP_RATE = "ScaleUpLimited"
    SCALE_DOWN_RATE = "ScaleDownLimited"
    MAX_REPLICAS = "TooManyReplicas"
    MIN_REPLICAS = "TooFewReplicas"
    UNSCHEDULABLE = "Unschedulable"
    WAITING_FOR_NODES = "WaitingForNodes"
    METRICS_UNAVAILABLE = "MetricsUnavailable"
    NO_READY_PODS = "NoReadyPods"
    SCALED_TO_ZERO = "ScaledToZero"
    SCALE_FROM_ZERO = "ScaleFromZero"
    ROUTER_METRICS_UNAVAILABLE = "RouterMetricsUnavailable"


@dataclass(frozen=True)
class AutoscalingPolicy:
    """The CR's ``spec.autoscaling`` as the decision needs it.

    Invariants (enforced here, and by the CRD's CEL rules before a spec gets
    this far): ``0 <= min_replicas <= max_replicas``, ``target_queue_length > 0``,
    ``0 < target_kv_cache_usage <= 1``, windows ``>= 0``; a scale-down removes
    at most ``scale_down_percent`` % of the size at the start of any
    ``scale_down_period_s`` (HPA's ``behavior.scaleDown.policies``).
    """

    min_replicas: int
    max_replicas: int
    target_queue_length: float
    target_kv_cache_usage: float
    scale_up_stabilization_s: float = 0.0
    scale_down_stabilization_s: float = DEFAULT_SCALE_DOWN_STABILIZATION_S
    scrape_interval_s: float = DEFAULT_SCRAPE_INTERVAL_S
    scale_down_percent: int = DEFAULT_SCALE_DOWN_PERCENT
    scale_down_period_s: float = DEFAULT_SCALE_DOWN_PERIOD_S

    def __post_init__(self) -> None:
        if self.min_replicas < 0:
            raise ValueError(f"autoscaling.minReplicas={self.min_replicas} must be >= 0")
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"autoscaling.maxReplicas={self.max_replicas} is below minReplicas={self.min_replicas}; "
                "raise maxReplicas or lower minReplicas"
            )
        if not self.target_queue_length > 0:
            raise ValueError(f"autoscaling.targetQueueLength={self.target_queue_length} must be > 0")
        if not 0 < self.target_kv_cache_usage <= 1:
            raise ValueError(
                f"autoscaling.targetKVCacheUsage={self.target_kv_cache_usage} must be in (0, 1], e.g. 0.8"
            )
        if self.scale_up_stabilization_s < 0 or self.scale_down_stabilization_s < 0:
            raise ValueError("autoscaling.scale{Up,Down}StabilizationSeconds must be >= 0")
        if not self.scrape_interval_s > 0:
            raise ValueError(f"autoscaling.scrapeIntervalSeconds={self.scrape_interval_s} must be > 0")
        if not 1 <= self.scale_down_percent <= 100:
            raise ValueError(f"autoscaling.scaleDownPolicy.percent={self.scale_down_percent} must be in [1, 100]")
        if not self.scale_down_period_s > 0:
            raise ValueError(f"autoscaling.scaleDownPolicy.periodSeconds={self.scale_down_period_s} must be > 0")

    @property
    def longest_window_s(self) -> float:
        """How long the history must remember: the stabilization windows and the rate period."""
        return max(self.scale_up_stabilization_s, self.scale_down_stabilization_s, self.scale_down_period_s)


@dataclass(frozen=True)
class PodMetrics:
    """One ready pod's load, read from its /metrics.

    ``queue_length`` is waiting + running requests; ``kv_cache_usage`` is the
    fraction of KV-cache blocks in use, 0..1.
    """

    pod: str
    queue_length: float
    kv_cache_usage: float


@dataclass(frozen=True)
class FleetObservation:
    """Everything ``plan_replicas`` knows about the fleet at one instant.

    ``current_replicas`` is the size already requested (the Deployment's
    ``spec.replicas``); it includes pods that are ``starting`` (scheduled, not
    Ready yet) and ``unschedulable`` (Pending with PodScheduled=False).
    ``metrics`` holds one entry per ready pod that answered; ``scrape_errors``
    counts the ready pods that did not, per reason. ``waiting_for_nodes``
    counts the unschedulable pods still inside ``scheduling.maxNodeProvisionSeconds``
    (a node may be booting for them) plus the bound pods not Ready yet inside it
    (loading their model): none of them is removed.
    """

    current_replicas: int
    ready: int
    starting: int = 0
    unschedulable: int = 0
    waiting_for_nodes: int = 0
    metrics: tuple[PodMetrics, ...] = ()
    scrape_errors: dict[ScrapeError, int] = field(default_factory=dict)
    # With the router on: requests its pods hold (None: router off, or no router pod answered),
    # and whether it routed any request since the previous tick (traffic the scrape may not catch).
    held: int | None = None
    traffic: bool = False

    @property
    def answered(self) -> int:
        return len(self.metrics)

    @property
    def queue_length(self) -> float | None:
        """Total queue across the ready pods, extrapolated from those that answered."""
        if not self.metrics:
            return None
        total = sum(m.queue_length for m in self.metrics)
        # Pods that did not answer are assumed as loaded as those that did.
        return total * self.ready / self.answered if self.ready > self.answered else total

    @property
    def kv_cache_usage(self) -> float | None:
        """Mean KV-cache usage of the ready pods that answered."""
        if not self.metrics:
            return None
        return sum(m.kv_cache_usage for m in self.metrics) / self.answered


@dataclass(frozen=True)
class Decision:
    """The outcome of one ``plan_replicas`` call.

    ``desired`` is always within ``[min_replicas, max_replicas]``.
    ``recommendation`` is the raw, unstabilized proposal the caller records in
    the history (``None`` when the metrics were not good enough to propose
    anything, and nothing must be recorded). ``reason`` is one human sentence,
    e.g. ``"queue 34 > 8 × 3 ready → 5"``.
    """

    current: int
    desired: int
    reason: str
    signal: Signal
    limit: Limit
    recommendation: int | None

    @property
    def direction(self) -> str:
        if self.desired > self.current:
            return "up"
        if self.desired < self.current:
            return "down"
        return "none"

    @property
    def metrics_ok(self) -> bool:
        return self.limit not in (Limit.METRICS_UNAVAILABLE, Limit.NO_READY_PODS, Limit.ROUTER_METRICS_UNAVAILABLE)
