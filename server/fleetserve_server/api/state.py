"""The server's lifecycle (loading -> ready -> draining) and what the routes need once loaded."""

from __future__ import annotations

import asyncio
import enum
import functools
import hashlib
import importlib.metadata
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from fleetserve_server.engine.interfaces import EngineClient

log = logging.getLogger("fleetserve.server")


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer the HTTP layer uses."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class ModelInfo:
    """What the API tells clients about the served model.

    ``fingerprint`` is the ``system_fingerprint`` of every response: the engine
    version, the served name, the quantization and dtype, and a hash of the
    whole engine configuration, so any output can be traced to its exact setup.
    """

    served_name: str
    max_model_len: int
    quantization: str = "none"
    dtype: str = "float32"
    source: str = ""
    engine_config: dict[str, Any] = field(default_factory=dict)
    # temperature / top_p / top_k used when a request omits them (the model's generation_config)
    default_sampling: dict[str, Any] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))

    @functools.cached_property
    def fingerprint(self) -> str:
        # Cached: every streamed chunk carries it, and computing it (the package
        # metadata lookup above all) cost ~1.5 ms, more than the rest of a chunk.
        blob = repr(sorted({**self.engine_config, "source": self.source,
                            "default_sampling": sorted(self.default_sampling.items())}.items())).encode()
        digest = hashlib.sha256(blob).hexdigest()[:10]
        return f"fleetserve-{engine_version()}/{self.served_name}/{self.quantization}/{self.dtype}/{digest}"


@functools.cache
def engine_version() -> str:
    """The installed fleetserve version (read once: importlib.metadata parses files on every call)."""
    try:
        return importlib.metadata.version("fleetserve")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


class Phase(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclass
class Serving:
    """Everything a generation route needs; exists only once the model is loaded."""

    engine: EngineClient
    tokenizer: Tokenizer
    model: ModelInfo


class ServerState:
    """Phase plus the set of in-flight requests.

    Invariants: ``serving`` is set before the phase becomes READY; once
    DRAINING, the phase never goes back; ``inflight`` holds exactly the engine
    request ids whose handlers have been admitted and have not yet returned.
    """

    def __init__(self) -> None:
        self.phase = Phase.LOADING
        self.serving: Serving | None = None
        self.load_error: str | None = None
        self.inflight: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        # Names this process's prefix cache (the x-fleetserve-cache-epoch header): a router that
        # sees it change knows every prefix it credited to this replica is gone.
        self.cache_epoch = uuid.uuid4().hex[:16]

    def attach(self, engine: EngineClient, tokenizer: Tokenizer, model: ModelInfo) -> None:
        self.serving = Serving(engine=engine, tokenizer=tokenizer, model=model)
        self.cache_epoch = uuid.uuid4().hex[:16]  # a new engine starts with an empty cache

    def mark_ready(self) -> None:
        if self.serving is None:
            raise RuntimeError("mark_ready() before attach(): the engine is not loaded")
        if self.phase is Phase.LOADING:
            self.phase = Phase.READY

    def admit(self, request_id: str) -> None:
        self.inflight.add(request_id)
        self._idle.clear()

    def release(self, request_id: str) -> None:
        self.inflight.discard(request_id)
        if not self.inflight:
            self._idle.set()

    async def drain(self, timeout: float) -> list[str]:
        """Stop admitting, wait up to ``timeout`` s for in-flight requests, then abort the rest.

        Returns the ids that had to be aborted. Aborted requests still end
        normally from their handler's view, with ``finish_reason: abort``.
        """
        self.phase = Phase.DRAINING
        log.info("draining: %d request(s) in flight, waiting up to %.1fs", len(self.inflight), timeout)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=timeout)
            return []
        except TimeoutError:
            pass
        aborted = sorted(self.inflight)
        log.warning("drain timeout: aborting %d request(s) still in flight", len(aborted))
        if self.serving is not None:
            for request_id in aborted:
                await self.serving.engine.abort(request_id)
        # Give the aborted handlers a moment to send their final chunk.
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=5.0)
        except TimeoutError:
            log.error("%d request(s) did not finish after abort", len(self.inflight))
        return aborted
