"""The operator's background work over every LLMDeployment it watches, without finalizers.

kopf runs a ``@kopf.daemon`` or ``@kopf.timer`` per object and puts a finalizer
on every object to stop it — so with the operator stopped (or scaled to zero)
deleting an LLMDeployment, or its namespace, hangs forever. Nothing here needs
a finalizer: the children are owned (garbage collection removes them) and the
autoscaler's memory is a cache. So the periodic work lives in the operator
process instead: :class:`Fleets` keeps one asyncio task per watched
LLMDeployment, started and stopped by the LLMDeployment watch (kopf's
``on.event``: the initial listing, every change and the deletion), that

* runs the autoscaler tick every ``autoscaling.scrapeIntervalSeconds``
  (idle while autoscaling is off: it reads the cached body, no API call; with it
  on, it reads the watched LLMDeployment, Deployment and pods, and sends
  requests only to write), and
* runs a full reconcile every ``resync_s`` seconds (10 minutes by default,
  each period drawn from 0.9–1.1 x so a whole cluster's fleets, all tracked at
  start-up, do not resync in one burst) — the level-triggered safety net that
  repairs what no watch reports (a PodDisruptionBudget edited by hand) and
  whatever event was missed (it reads every child from the API server, not
  from the watch cache). Everything else is event-driven: an
  LLMDeployment with autoscaling off costs no API request between resyncs.

A task that fails logs and retries; it never takes the others down.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import kopf

from .autoscaler.controller import RETRY_SECONDS, FleetState, autoscale_tick, forget_metrics
from .kube import Kube, KubeError

log = logging.getLogger(__name__)

Reconcile = Callable[[str, str, str, bool], None]  # namespace, name, trigger, coalesce
RESYNC_JITTER = 0.1  # each resync period is resync_s x uniform(1 - this, 1 + this)


@dataclass
class _Fleet:
    body: dict[str, Any]
    task: asyncio.Task[None] | None = None
    state: FleetState = field(default_factory=FleetState)


class Fleets:
    """One background task per watched LLMDeployment (see the module docstring).

    Invariant: a key is in ``_fleets`` exactly while its LLMDeployment exists
    and is not being deleted; its task runs until :meth:`forget` or :meth:`close`.
    Call every method from the operator's event loop.
    """

    def __init__(self, kube: Callable[[], Kube], reconcile: Reconcile, resync_s: float) -> None:
        self._kube = kube
        self._reconcile = reconcile
        self.resync_s = resync_s
        self._fleets: dict[tuple[str, str], _Fleet] = {}

    def __len__(self) -> int:
        return len(self._fleets)

    def track(self, namespace: str, name: str, body: dict[str, Any]) -> None:
        """The LLMDeployment exists as ``body``: keep its task running with the newest body."""
        key = (namespace, name)
        if (body.get("metadata") or {}).get("deletionTimestamp"):
            self.forget(namespace, name)
            return
        fleet = self._fleets.get(key)
        if fleet is None:
            fleet = self._fleets[key] = _Fleet(body=body)
            fleet.task = asyncio.get_running_loop().create_task(self._run(key, fleet),
                                                                name=f"fleet {namespace}/{name}")
        else:
            fleet.body = body

    def forget(self, namespace: str, name: str) -> None:
        fleet = self._fleets.pop((namespace, name), None)
        if fleet is not None and fleet.task is not None:
            fleet.task.cancel()

    async def close(self) -> None:
        tasks = [f.task for f in self._fleets.values() if f.task is not None]
        self._fleets.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, key: tuple[str, str], fleet: _Fleet) -> None:
        namespace, name = key
        next_resync = time.monotonic() + self._resync_period()
        try:
            while True:
                if time.monotonic() >= next_resync:
                    await asyncio.to_thread(self._resync, namespace, name)
                    next_resync = time.monotonic() + self._resync_period()
                delay = await self._tick(namespace, name, fleet)
                await asyncio.sleep(max(0.05, min(delay, next_resync - time.monotonic())))
        finally:
            forget_metrics(namespace, name)

    def _resync_period(self) -> float:
        return self.resync_s * random.uniform(1 - RESYNC_JITTER, 1 + RESYNC_JITTER)

    async def _tick(self, namespace: str, name: str, fleet: _Fleet) -> float:
        try:
            result = await autoscale_tick(
                self._kube(), namespace, name, fleet.state, cached=fleet.body,
                reconcile=lambda: self._reconcile(namespace, name, "autoscale", False))
            return result.next_tick_s
        except KubeError as exc:
            log.warning("autoscaler %s/%s: API server: %s; retrying in %.0f s", namespace, name, exc, RETRY_SECONDS)
        except (kopf.TemporaryError, kopf.PermanentError) as exc:
            log.warning("autoscaler %s/%s: the reconcile after a decision: %s", namespace, name, exc)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug must not end the fleet's loop for good
            log.exception("autoscaler %s/%s: tick failed; retrying in %.0f s", namespace, name, RETRY_SECONDS)
        return RETRY_SECONDS

    def _resync(self, namespace: str, name: str) -> None:
        try:
            self._reconcile(namespace, name, "resync", True)
        except (kopf.TemporaryError, kopf.PermanentError) as exc:
            log.warning("resync of %s/%s: %s", namespace, name, exc)
        except Exception:
            log.exception("resync of %s/%s failed", namespace, name)
