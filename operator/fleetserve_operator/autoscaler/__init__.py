"""The built-in autoscaler: scrape the pods, decide the fleet size, act and explain.

One concept per module, imports run one way:
``controller`` (I/O: pods, scrapes, Deployment and CR writes) → ``scraper``
(HTTP + exposition parsing) and ``decision`` (the pure ``plan_replicas``) →
``history`` (stabilization windows) → ``types`` (plain dataclasses).
``decision``, ``history`` and ``types`` import neither kopf, kubernetes nor
prometheus_client, so the whole scaling policy is unit- and property-tested on
plain Python.
"""

from fleetserve_operator.autoscaler.decision import plan_replicas
from fleetserve_operator.autoscaler.history import History
from fleetserve_operator.autoscaler.types import (
    AutoscalingPolicy,
    Decision,
    FleetObservation,
    PodMetrics,
)

__all__ = [
    "AutoscalingPolicy",
    "Decision",
    "FleetObservation",
    "History",
    "PodMetrics",
    "plan_replicas",
]
