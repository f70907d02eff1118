"""fleetserve's inference server: engine, model runner, HTTP API.

``LLM`` (torch) is imported lazily so that the pure-Python parts (memory
planner, config, engine interfaces) stay importable without torch — the
operator imports them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fleetserve_server.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from fleetserve_server.llm import LLM

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from fleetserve_server.llm import LLM

        return LLM
    raise AttributeError(name)
