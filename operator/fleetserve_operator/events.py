"""Kubernetes Events the operator posts on an LLMDeployment."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    """One Event: ``type`` is Normal or Warning, ``reason`` CamelCase."""

    type: str
    reason: str
    message: str
