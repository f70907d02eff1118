"""The asynchronous engine client the HTTP layer talks to.

One background thread owns the ``LLMEngine`` and runs its steps; asyncio
callers hand it commands (add, abort) through a lock-protected list and get
their output deltas back through per-request ``asyncio.Queue``s, filled with
``loop.call_soon_threadsafe`` (one call per event loop per step).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TypeAlias

from fleetserve_server.engine import alloc
from fleetserve_server.engine.errors import (
    EngineDeadError,
    EngineDrainingError,
    QueueFullError,
    RequestFailedError,
    RequestValidationError,
)
from fleetserve_server.engine.interfaces import EngineClient, EngineStats, RequestOutputDelta
from fleetserve_server.engine.llm_engine import LLMEngine
from fleetserve_server.engine.sampling_params import SamplingParams
from fleetserve_server.engine.sequence import Sequence

log = logging.getLogger(__name__)

_Item: TypeAlias = RequestOutputDelta | BaseException


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[_Item]


class AsyncEngine:
    """Runs an ``LLMEngine`` on one background thread; implements ``EngineClient``.

    The thread sleeps on a condition while there is no work, waking every
    ``idle_wake_seconds`` to expire idle prefix-cache blocks. If a step raises,
    the thread records the error, fails every in-flight request with
    ``EngineDeadError`` and exits; ``check_health`` raises from then on. A
    request the engine failed alone (its final delta has ``finish_reason ==
    "error"``) gets ``RequestFailedError`` instead; nobody else notices.

    Invariants: only the engine thread touches the ``LLMEngine`` (except its
    thread-safe ``make_sequence`` and ``stats``); a request id is in
    ``_streams`` from admission until its generator ends; a generator that is
    closed or cancelled before its final delta aborts its request.
    """

    def __init__(self, engine: LLMEngine, *, idle_wake_seconds: float = 1.0,
                 malloc_trim_seconds: float = 0.0) -> None:
        self.engine = engine
        self.idle_wake_seconds = idle_wake_seconds
        # > 0: when the engine goes idle after work, hand the allocator's free heap back to the OS
        # (malloc_trim), at most once per this many seconds; see engine/alloc.py.
        self.malloc_trim_seconds = malloc_trim_seconds
        self.malloc_trims = 0
        self._busy_since_trim = False
        self._last_trim = time.monotonic()
        self._cond = threading.Condition()
        self._commands: list[tuple[str, Sequence | str]] = []
        self._pending_adds = 0
        self._streams: dict[str, _Stream] = {}
        self._inflight: set[str] = set()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._draining = False
        self._error: BaseException | None = None

    # ---- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread (idempotent)."""
        with self._cond:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="fleetserve-engine", daemon=True)
            self._thread.start()

    def start_draining(self) -> None:
        """Refuse new requests (``EngineDrainingError``); in-flight ones continue."""
        self._draining = True

    @property
    def draining(self) -> bool:
        return self._draining

    async def wait_until_idle(self, timeout: float | None = None) -> bool:
        """Wait until no request is in flight; False if ``timeout`` passed first."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while self.num_unfinished and self.is_alive:
            if deadline is not None and loop.time() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread after its current step; in-flight requests fail
        with ``EngineDeadError``."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._fail_all("the engine was shut down")

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._error is None and not self._stop

    @property
    def num_unfinished(self) -> int:
        """Requests admitted and not yet finished."""
        with self._cond:
            return len(self._inflight)

    # ---- EngineClient --------------------------------------------------------

    async def generate(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutputDelta]:
        """Stream the request's output deltas; the last has ``finish_reason`` set.

        Raises on the first iteration, before yielding anything:
        ``RequestValidationError``, ``QueueFullError``, ``EngineDrainingError``,
        ``EngineDeadError``. Later (or on the first iteration, if nothing came
        before): ``RequestFailedError`` when the engine failed this request
        alone, ``EngineDeadError`` when the engine loop died.
        """
        if self._thread is None and not self._stop:
            self.start()
        self._raise_if_not_accepting()
        seq = self.engine.make_sequence(request_id, prompt, params)
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        with self._cond:
            if request_id in self._streams or request_id in self._inflight:
                raise RequestValidationError(f"request id {request_id!r} is already in flight", param="request_id")
            max_queue = self.engine.config.max_queue_length
            waiting = len(self.engine.scheduler.waiting) + self._pending_adds
            if max_queue is not None and waiting >= max_queue:
                raise QueueFullError(
                    f"the waiting queue is full ({waiting} of {max_queue} requests); retry later",
                    retry_after=self.engine.retry_after_estimate(),
                )
            self._streams[request_id] = _Stream(asyncio.get_running_loop(), queue)
            self._inflight.add(request_id)
            self._commands.append(("add", seq))
            self._pending_adds += 1
            self._cond.notify()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine has already forgotten the request
                    raise item
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            with self._cond:
                self._streams.pop(request_id, None)
                if not finished:  # closed early (client gone) or cancelled
                    self._commands.append(("abort", request_id))
                    self._cond.notify()

    async def abort(self, request_id: str) -> None:
        """Abort a request: its stream ends with a delta whose finish_reason is ``abort``."""
        with self._cond:
            self._commands.append(("abort", request_id))
            self._cond.notify()

    async def check_health(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"the engine loop died: {type(self._error).__name__}: {self._error}")
        if self._thread is not None and not self._thread.is_alive():
            raise EngineDeadError("the engine loop is not running (shut down)")
        if self._thread is None:
            raise EngineDeadError("the engine loop has not been started")
        runner_health = getattr(self.engine.runner, "check_health", None)  # e.g. a dead tensor-parallel rank
        if runner_health is not None:
            try:
                runner_health()
            except Exception as exc:  # noqa: BLE001 - any failure the runner reports makes the engine unusable
                raise EngineDeadError(f"the model runner failed: {exc}") from exc

    def stats(self) -> EngineStats:
        stats = self.engine.stats()
        with self._cond:
            stats.requests_waiting += self._pending_adds
        return stats

    # ---- the engine thread -----------------------------------------------------

    def _raise_if_not_accepting(self) -> None:
        if self._error is not None or self._stop:
            raise EngineDeadError("the engine is not running; no request can be served")
        if self._draining:
            raise EngineDrainingError("the server is draining and accepts no new requests")

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._cond:
                    if not self._commands and not self._stop and not engine.has_unfinished():
                        # idle: sleep until work arrives, but wake to expire the cache
                        self._cond.wait(timeout=self.idle_wake_seconds)
                    if self._stop:
                        return
                    commands, self._commands = self._commands, []
                self._apply(commands)
                deltas = engine.step() if engine.has_unfinished() else []
                if deltas:
                    self._busy_since_trim = True
                if not deltas and not engine.has_unfinished():
                    engine.expire_cache()
                    self._maybe_trim()
                self._dispatch(deltas)
        except BaseException as exc:  # noqa: BLE001 - any crash kills the loop; report it to every caller
            log.exception("the engine loop died")
            self._error = exc
            self._fail_all(f"the engine loop died: {type(exc).__name__}: {exc}")

    def _maybe_trim(self) -> None:
        """Idle after work: return the heap the burst left free (at most once per malloc_trim_seconds)."""
        if self.malloc_trim_seconds <= 0 or not self._busy_since_trim:
            return
        now = time.monotonic()
        if now - self._last_trim < self.malloc_trim_seconds:
            return
        self._busy_since_trim = False
        self._last_trim = now
        alloc.malloc_trim()
        self.malloc_trims += 1

    def _apply(self, commands: list[tuple[str, Sequence | str]]) -> None:
        for kind, arg in commands:
            if kind == "add":
                assert isinstance(arg, Sequence)
                with self._cond:
                    self._pending_adds -= 1
                try:
                    self.engine.add_sequence(arg)
                except (QueueFullError, RequestValidationError) as exc:
                    self._deliver(arg.request_id, exc)
            else:
                assert isinstance(arg, str)
                self.engine.abort_request(arg)

    def _deliver(self, request_id: str, item: _Item) -> None:
        with self._cond:
            self._inflight.discard(request_id)
            stream = self._streams.get(request_id)
        if stream is not None:
            self._call_in_loop(stream.loop, [(stream.queue, item)])

    def _dispatch(self, deltas: list[RequestOutputDelta]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[_Item], _Item]]] = {}
        with self._cond:
            for delta in deltas:
                if delta.finish_reason is not None:
                    self._inflight.discard(delta.request_id)
                stream = self._streams.get(delta.request_id)
                if stream is not None:
                    item: _Item = delta
                    if delta.finish_reason == "error":
                        if delta.text or delta.token_ids:  # what it produced before failing still goes out
                            by_loop.setdefault(stream.loop, []).append(
                                (stream.queue, RequestOutputDelta(delta.request_id, delta.text, delta.token_ids)))
                        item = RequestFailedError(delta.error or "the request failed in the engine",
                                                  param=delta.error_param)
                    by_loop.setdefault(stream.loop, []).append((stream.queue, item))
        for loop, items in by_loop.items():
            self._call_in_loop(loop, items)

    @staticmethod
    def _call_in_loop(loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue[_Item], _Item]]) -> None:
        def put_all() -> None:
            for queue, item in items:
                queue.put_nowait(item)

        try:
            loop.call_soon_threadsafe(put_all)
        except RuntimeError:
            pass  # the caller's event loop is closed: nobody is listening

    def _fail_all(self, message: str) -> None:
        with self._cond:
            streams = list(self._streams.items())
            self._inflight.clear()
            self._commands.clear()
            self._pending_adds = 0
        for _, stream in streams:
            self._call_in_loop(stream.loop, [(stream.queue, EngineDeadError(message))])


def _conforms(engine: AsyncEngine) -> EngineClient:
    """Never called: makes mypy prove that AsyncEngine implements EngineClient."""
    return engine
