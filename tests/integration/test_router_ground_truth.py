"""The servers' ground truth reaches the router for streamed answers too (real `fleetserve serve` and
`fleetserve router` processes on loopback).

A server sends ``x-fleetserve-cached-tokens`` with a streamed answer's headers only when the first
output came within its first-output grace (0.25 s); a stream that waits longer (a queued request, a
long prefill on a CPU pod) starts without it. The router then reads the cached-token count from the
stream's final usage event (asking for it when the client did not, and dropping it from what the
client sees), so its prefix hits are confirmed and false credit is corrected for streams as well.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fleetserve_server.bench.launch import ServerProcess, fleetserve_argv, start_server
from router_util import address, router_metric, start_router
from serve_util import COMMON_FLAGS, MODEL, SERVER_ENV, server_factory, tiny_model, wait_for  # noqa: F401 - fixtures

SYSTEM = "You are a careful assistant. " * 12


def conversation(i: int, turns: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": SYSTEM}]
    for t in range(turns):
        messages.append({"role": "user", "content": f"conversation {i} turn {t}: tell me about topic {i * 7 + t} "
                                                   f"in some detail, please, with examples {'x' * 40}"})
        if t < turns - 1:
            messages.append({"role": "assistant", "content": f"answer {i}.{t} " * 10})
    return messages


def body(messages: list[dict[str, str]], **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": messages, "max_tokens": 4, "temperature": 0, **extra}


def stream_text(base: str, payload: dict[str, Any]) -> tuple[httpx.Headers, str]:
    with httpx.stream("POST", base + "/v1/chat/completions", json=payload, timeout=120) as resp:
        assert resp.status_code == 200, resp.read()
        return resp.headers, resp.read().decode()


def usage_events(text: str) -> list[dict[str, Any]]:
    events = []
    for line in text.splitlines():
        if line.startswith("data: {"):
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage") is not None:
                events.append(chunk)
    return events


def normalized(text: str) -> str:
    """The stream with what differs between two runs of one request masked: its id, creation time,
    (the second run finds more of its prompt cached) the cached-token count, and the SSE comments a
    queued request gets."""
    text = re.sub(r"^: [a-z-]+\n\n", "", text, flags=re.M)
    text = re.sub(r'"id":"[^"]*"', '"id":"-"', text)
    return re.sub(r'"(created|cached_tokens)":\d+', r'"\1":0', text)


@contextmanager
def occupied(server: ServerProcess) -> Iterator[None]:
    """A long streamed generation sent straight to ``server``, running (its first output arrived) for the
    block's duration; leaving the block closes its connection, which aborts it. With --max-num-seqs 1,
    every request sent meanwhile waits in the server's queue, so its first output comes late."""
    with httpx.Client(timeout=120) as client:
        payload = {"model": MODEL, "messages": [{"role": "user", "content": "Tell a very long story."}],
                   "max_tokens": 1900, "ignore_eos": True, "temperature": 0, "stream": True}
        with client.stream("POST", server.base_url + "/v1/chat/completions", json=payload) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    break  # the opening event: the generation is running
            yield
            # nothing more is read: leaving the stream block closes the connection (the server aborts)


@pytest.mark.parametrize("client_usage", [False, True])
def test_late_stream_confirms_prefix_hit(server_factory: Callable[..., ServerProcess],  # noqa: F811
                                         tmp_path: Path, client_usage: bool) -> None:
    """Regression: a streamed request that waits past the server's first-output grace starts without the
    cached-tokens header; the router still learns the ground truth (it confirmed 0 of 97 predicted hits
    on CPU pods before), and the client's stream is what the server sends without the router."""
    srv = server_factory("--max-num-seqs", "1")
    router = start_router(tmp_path, "--endpoints", address(srv))
    try:
        first = httpx.post(router.base_url + "/v1/chat/completions", json=body(conversation(0, 1)), timeout=60)
        assert first.status_code == 200 and first.headers["x-fleetserve-cached-tokens"] == "0"
        extra: dict[str, Any] = {"stream": True}
        if client_usage:
            extra["stream_options"] = {"include_usage": True}
        second = body(conversation(0, 2), **extra)
        with httpx.Client(timeout=120) as client, ExitStack() as blocker:
            blocker.enter_context(occupied(srv))
            resp = client.send(client.build_request("POST", router.base_url + "/v1/chat/completions",
                                                    json=second), stream=True)
            try:
                assert resp.status_code == 200
                # Queued behind the long generation: the headers went out before the first output existed.
                assert "x-fleetserve-cached-tokens" not in resp.headers
                # credited with the prefix ("fail_open" keeps the credit when the busy server's load
                # figures went stale on a loaded machine)
                assert resp.headers["x-fleetserve-route"] in ("prefix", "fail_open")
                blocker.close()  # the long generation is aborted: the queued request runs now
                text = resp.read().decode()
            finally:
                resp.close()
        assert text.rstrip().endswith("data: [DONE]")
        # The hit was confirmed from the stream's final usage event (there was no header to read it from).
        wait_for(lambda: router_metric(router.base_url, "fleetserve_router_prefix_confirmed_hits_total") >= 1,
                 10, "the router to confirm the streamed prefix hit")
        assert router_metric(router.base_url, "fleetserve_router_prefix_predicted_hits_total") == 1
        assert router_metric(router.base_url, "fleetserve_router_cached_tokens_total") > 0
        assert router_metric(router.base_url, "fleetserve_router_prefix_false_credit_total") == 0
        usage = usage_events(text)
        if client_usage:
            assert len(usage) == 1 and usage[0]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        else:
            assert usage == []  # the usage event the router asked for is not passed on
        _, direct = stream_text(srv.base_url, second)
        assert normalized(text) == normalized(direct)
    finally:
        assert router.stop() == 0, router.log_tail()


def test_streamed_answers_after_a_restart(server_factory: Callable[..., ServerProcess], tiny_model: Path,  # noqa: F811
                                          tmp_path: Path) -> None:
    """The cache_epoch path with streams only: the router scrapes /metrics once an hour here, so it learns
    of the restart from a streamed answer's own x-fleetserve-cache-epoch header. That request was routed
    on stale credit (a false prediction, counted once the stream's usage says 0 cached tokens); the credit
    is then the restarted replica's own, and the next turn's hit is confirmed."""
    srv = server_factory()
    router = start_router(tmp_path, "--endpoints", address(srv), "--poll-interval", "3600")
    restarted: ServerProcess | None = None
    try:
        wait_for(lambda: router_metric(router.base_url, "fleetserve_router_ready_replicas") == 1, 30,
                 "the router to see the replica ready")
        stream_text(router.base_url, body(conversation(2, 1), stream=True))
        port = int(srv.base_url.rsplit(":", 1)[1])
        assert srv.stop() == 0
        restarted = start_server("restarted", fleetserve_argv(str(tiny_model), port, COMMON_FLAGS), port=port,
                                 ready_path="/ready", log_dir=tmp_path, timeout=300, env=SERVER_ENV)
        headers, _ = stream_text(router.base_url, body(conversation(2, 2), stream=True))
        assert headers["x-fleetserve-route"] == "prefix"  # stale credit: the router has not heard yet
        assert router_metric(router.base_url, "fleetserve_router_cache_epoch_changes_total") == 1
        wait_for(lambda: router_metric(router.base_url, "fleetserve_router_prefix_false_credit_total") == 1,
                 10, "the router to count the false prediction from the stream's usage")
        headers, text = stream_text(router.base_url, body(conversation(2, 3), stream=True))
        assert headers["x-fleetserve-route"] == "prefix"
        assert usage_events(text) == []
        wait_for(lambda: router_metric(router.base_url, "fleetserve_router_prefix_confirmed_hits_total") == 1,
                 10, "the router to confirm the hit on the restarted replica")
        assert router_metric(router.base_url, "fleetserve_router_prefix_false_credit_total") == 1
    finally:
        assert router.stop() == 0, router.log_tail()
        if restarted is not None:
            restarted.stop()
