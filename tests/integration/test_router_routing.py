"""The router in front of real `fleetserve serve` processes on loopback: the servers' ground-truth
headers, routing that follows prefixes, and credit reset when a replica restarts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fleetserve_server.bench.launch import ServerProcess, fleetserve_argv, start_server
from router_util import address, router_metric, start_router
from serve_util import COMMON_FLAGS, MODEL, SERVER_ENV, server_factory, tiny_model, wait_for  # noqa: F401 - fixtures

SYSTEM = "You are a careful assistant. " * 12  # shared by every conversation: ~350 characters


def conversation(i: int, turns: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": SYSTEM}]
    for t in range(turns):
        messages.append({"role": "user", "content": f"conversation {i} turn {t}: tell me about topic {i * 7 + t} "
                                                   f"in some detail, please, with examples {'x' * 40}"})
        if t < turns - 1:
            messages.append({"role": "assistant", "content": f"answer {i}.{t} " * 10})
    return messages


def chat(base: str, messages: list[dict[str, str]], **extra: object) -> httpx.Response:
    resp = httpx.post(base + "/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": messages, "max_tokens": 4, "temperature": 0, **extra})
    assert resp.status_code == 200, resp.text
    return resp


def test_server_reports_cached_tokens_and_cache_epoch(server_factory: Callable[..., ServerProcess],  # noqa: F811
                                                      tiny_model: Path, tmp_path: Path) -> None:  # noqa: F811
    srv = server_factory()
    first = chat(srv.base_url, conversation(0, 1))
    again = chat(srv.base_url, conversation(0, 1))
    streamed = chat(srv.base_url, conversation(0, 1), stream=True)
    assert first.headers["x-fleetserve-cached-tokens"] == "0"
    assert int(again.headers["x-fleetserve-cached-tokens"]) > 0
    assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == int(
        again.headers["x-fleetserve-cached-tokens"])
    assert int(streamed.headers["x-fleetserve-cached-tokens"]) > 0
    epoch = first.headers["x-fleetserve-cache-epoch"]
    assert epoch and again.headers["x-fleetserve-cache-epoch"] == epoch
    assert httpx.get(srv.base_url + "/metrics").headers["x-fleetserve-cache-epoch"] == epoch
    port = int(srv.base_url.rsplit(":", 1)[1])
    assert srv.stop() == 0
    restarted = start_server("restarted", fleetserve_argv(str(tiny_model), port, COMMON_FLAGS), port=port,
                             ready_path="/ready", log_dir=tmp_path, timeout=300, env=SERVER_ENV)
    try:
        after = chat(restarted.base_url, conversation(0, 1))
        assert after.headers["x-fleetserve-cache-epoch"] != epoch
        assert after.headers["x-fleetserve-cached-tokens"] == "0"
    finally:
        restarted.stop()


def test_routing_follows_prefixes(server_factory: Callable[..., ServerProcess], tmp_path: Path) -> None:  # noqa: F811
    servers = [server_factory() for _ in range(3)]
    router = start_router(tmp_path, "--endpoints", ",".join(address(s) for s in servers))
    try:
        first_replica = {}
        for i in range(6):
            resp = chat(router.base_url, conversation(i, 1))
            first_replica[i] = resp.headers["x-fleetserve-replica"]
        for turn in (2, 3):
            for i in range(6):
                resp = chat(router.base_url, conversation(i, turn))
                # the whole conversation stays where its prefix is, and the server confirms the hit
                assert resp.headers["x-fleetserve-replica"] == first_replica[i]
                assert resp.headers["x-fleetserve-route"] == "prefix"
                assert int(resp.headers["x-fleetserve-cached-tokens"]) > 0
        # the 5 later first turns share the system prompt with the first one: prefix routes too
        assert router_metric(router.base_url, "fleetserve_router_requests_total", route="prefix") == 17
        assert router_metric(router.base_url, "fleetserve_router_requests_total", route="least_load") == 1
        assert router_metric(router.base_url, "fleetserve_router_prefix_confirmed_hits_total") == 17
        assert router_metric(router.base_url, "fleetserve_router_prefix_false_credit_total") == 0
    finally:
        assert router.stop() == 0, router.log_tail()


def test_restart_resets_prefix_credit(server_factory: Callable[..., ServerProcess], tiny_model: Path,  # noqa: F811
                                      tmp_path: Path) -> None:
    a, b = server_factory(), server_factory()
    router = start_router(tmp_path, "--endpoints", f"{address(a)},{address(b)}")
    restarted: ServerProcess | None = None
    try:
        held_by = chat(router.base_url, conversation(1, 1)).headers["x-fleetserve-replica"]
        assert chat(router.base_url, conversation(1, 2)).headers["x-fleetserve-route"] == "prefix"
        victim = a if address(a) == held_by else b
        port = int(victim.base_url.rsplit(":", 1)[1])
        assert victim.stop() == 0
        restarted = start_server("restarted", fleetserve_argv(str(tiny_model), port, COMMON_FLAGS), port=port,
                                 ready_path="/ready", log_dir=tmp_path, timeout=300, env=SERVER_ENV)
        # The router learns the new epoch from its /metrics poll (or the next response's headers).
        wait_for(lambda: router_metric(router.base_url, "fleetserve_router_cache_epoch_changes_total") >= 1,
                 10, "the router to see the restarted replica's new cache epoch")
        resp = chat(router.base_url, conversation(1, 3))
        # no false credit: the restarted replica's cache is empty, so this is not a "prefix" route
        assert resp.headers["x-fleetserve-route"] != "prefix"
        assert router_metric(router.base_url, "fleetserve_router_prefix_false_credit_total") == 0
    finally:
        assert router.stop() == 0, router.log_tail()
        if restarted is not None:
            restarted.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_openai_shapes_pass_through(server_factory: Callable[..., ServerProcess], tmp_path: Path,  # noqa: F811
                                    stream: bool) -> None:
    srv = server_factory()
    router = start_router(tmp_path, "--endpoints", address(srv))
    try:
        extra: dict[str, object] = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
        resp = chat(router.base_url, conversation(0, 1), **extra)
        if stream:
            assert resp.headers["content-type"].startswith("text/event-stream")
            assert resp.text.rstrip().endswith("data: [DONE]")
        else:
            assert resp.json()["object"] == "chat.completion"
        bad = httpx.post(router.base_url + "/v1/chat/completions", json={"model": MODEL, "messages": [],
                                                                         "max_tokens": -1}, timeout=30)
        assert bad.status_code == 400 and "error" in bad.json()  # the server's own 400, passed through
        assert httpx.get(router.base_url + "/v1/models").json()["data"][0]["id"] == MODEL
    finally:
        assert router.stop() == 0, router.log_tail()
