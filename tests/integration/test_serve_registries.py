"""After hundreds of requests of every kind, every per-request registry of a real server is empty again.

Streamed and non-streamed, chat and text, cancelled mid-stream, disconnected
while waiting for a non-streamed answer, invalid (400) and refused for a full
queue (429). The server runs with ``FLEETSERVE_DEBUG_MEMORY=1``, whose
``/debug/memory`` reports the length of every container attribute of the
server's objects; after the load each must be back at its value after
/ready, except the prefix cache's own (cached blocks are kept by design).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from fleetserve_server.bench.launch import ServerProcess
from serve_util import MODEL, metric, server_factory, tiny_model, wait_for  # noqa: F401 - fixtures

# The prefix cache keeps released blocks on purpose (bounded by the pool); the free list shrinks as it grows.
# The metrics' last engine snapshot is replaced on every refresh (a value, not a registry).
PREFIX_CACHE = ("block_manager._cached", "block_manager._hash_to_block", "block_manager._free")
SNAPSHOT = "metrics._snapshot."


def registries(url: str) -> dict[str, int]:
    reply = httpx.get(url + "/debug/memory", timeout=60)
    assert reply.status_code == 200, reply.text
    regs: dict[str, int] = reply.json()["registries"]
    return regs


def one_request(url: str, kind: str, i: int) -> str:
    prompt = f"request {i}: " + " ".join(random.Random(i).choice(["red", "green", "blue", "cat"]) for _ in range(20))
    body: dict[str, Any] = {"model": MODEL, "prompt": prompt, "max_tokens": 24, "ignore_eos": True}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 16}
    try:
        if kind == "complete":
            return str(httpx.post(url + "/v1/completions", json=body, timeout=120).status_code)
        if kind == "chat":
            return str(httpx.post(url + "/v1/chat/completions", json=chat, timeout=120).status_code)
        if kind in ("stream", "cancel"):
            with httpx.stream("POST", url + "/v1/chat/completions", json={**chat, "stream": True},
                              timeout=120) as reply:
                if reply.status_code != 200:
                    return str(reply.status_code)
                for n, _ in enumerate(reply.iter_lines()):
                    if kind == "cancel" and n >= 2:
                        return "cancelled"  # closing the stream: the client is gone
            return "200"
        if kind == "disconnect":
            long = {**body, "max_tokens": 1500}
            try:
                return str(httpx.post(url + "/v1/completions", json=long, timeout=0.3).status_code)
            except httpx.TimeoutException:
                return "disconnected"
        if kind == "invalid":
            return str(httpx.post(url + "/v1/completions", json={**body, "temperature": -1}, timeout=60).status_code)
    except httpx.HTTPError as exc:
        return type(exc).__name__
    raise AssertionError(kind)


def test_per_request_registries_are_empty_after_load(server_factory: Callable[..., ServerProcess]) -> None:  # noqa: F811
    proc = server_factory("--max-num-seqs", "4", "--max-queue-length", "8", env={"FLEETSERVE_DEBUG_MEMORY": "1"})
    url = proc.base_url
    before = registries(url)
    assert "state.serving.engine._streams" in before and "state.serving.engine.engine._requests" in before, before
    kinds = ["complete"] * 80 + ["chat"] * 60 + ["stream"] * 80 + ["cancel"] * 50 + ["disconnect"] * 30 \
        + ["invalid"] * 30
    random.Random(0).shuffle(kinds)
    with ThreadPoolExecutor(16) as pool:  # 16 clients against 4 slots + 8 queued: some get 429
        outcomes = list(pool.map(lambda a: one_request(url, *a), [(k, i) for i, k in enumerate(kinds)]))
    counts = {o: outcomes.count(o) for o in set(outcomes)}
    assert counts.get("400") == 30, counts
    assert counts.get("cancelled", 0) + counts.get("429", 0) >= 50 and counts.get("disconnected", 0) >= 1, counts
    assert set(counts) <= {"200", "400", "429", "cancelled", "disconnected"}, counts
    wait_for(lambda: metric(url, "fleetserve_requests_running") == 0
             and metric(url, "fleetserve_requests_waiting") == 0, 120, "the engine to go idle")

    def back_to_baseline() -> bool:
        after = registries(url)
        return all(after.get(k, 0) <= v for k, v in before.items() if not k.endswith(PREFIX_CACHE) and not k.startswith(SNAPSHOT))

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not back_to_baseline():
        time.sleep(0.2)
    after = registries(url)
    grown = {k: (before.get(k), v) for k, v in after.items()
             if v > before.get(k, 0) and not k.endswith(PREFIX_CACHE) and not k.startswith(SNAPSHOT)}
    # Smaller than at /ready is fine (e.g. the batch-size buffer the warm-up filled, drained by a scrape).
    assert not grown, f"registries not back at their /ready size after {len(kinds)} requests {counts}: {grown}"
    assert metric(url, "fleetserve_kv_cache_usage_ratio") == 0
