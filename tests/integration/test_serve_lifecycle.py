"""Auth, back-pressure, cancellation and SIGTERM drain against real `fleetserve serve` processes."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable

import httpx
import openai
import pytest
from fleetserve_server.bench.launch import ServerProcess
from serve_util import MODEL, metric, server_factory, tiny_model, wait_for  # noqa: F401 - fixtures

LONG = {"ignore_eos": True}


def client(proc: ServerProcess, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=proc.base_url + "/v1", api_key=key, max_retries=0, timeout=300)


def test_api_key_queue_full_and_disconnect(server_factory: Callable[..., ServerProcess]) -> None:  # noqa: F811
    proc = server_factory("--max-num-seqs", "1", "--max-queue-length", "1", env={"FLEETSERVE_API_KEY": "k3y"})
    url = proc.base_url

    # 401 without or with a wrong key; probes and metrics stay open.
    with pytest.raises(openai.AuthenticationError) as missing:
        client(proc, key="wrong").models.list()
    assert missing.value.status_code == 401 and missing.value.body["type"] == "authentication_error"  # type: ignore[index]
    assert httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x"}).status_code == 401
    assert [httpx.get(url + p).status_code for p in ("/health", "/ready", "/metrics")] == [200, 200, 200]
    authed = client(proc, key="k3y")
    assert authed.models.list().data[0].id == MODEL

    # One running (max-num-seqs 1), one waiting (max-queue-length 1): the third gets 429 + Retry-After.
    total = metric(url, "fleetserve_kv_cache_blocks_total")
    aborts = metric(url, "fleetserve_requests", finish_reason="abort")
    running = authed.completions.create(model=MODEL, prompt="first", max_tokens=1900, stream=True, extra_body=LONG)
    next(iter(running))
    waiting_started = threading.Event()

    def queued() -> None:
        waiting_started.set()
        try:
            client(proc, key="k3y").completions.create(model=MODEL, prompt="second", max_tokens=4,
                                                       extra_body=LONG)
        except openai.APIError:
            pass

    thread = threading.Thread(target=queued, daemon=True)
    thread.start()
    wait_for(lambda: metric(url, "fleetserve_requests_waiting") == 1, 30, "a waiting request")
    with pytest.raises(openai.RateLimitError) as full:
        authed.completions.create(model=MODEL, prompt="third", max_tokens=4)
    assert full.value.status_code == 429
    assert int(full.value.response.headers["retry-after"]) >= 1
    assert full.value.code == "queue_full"
    assert metric(url, "fleetserve_requests_rejected", reason="queue_full") == 1
    assert metric(url, "fleetserve_requests_rejected", reason="unauthorized") == 2

    # The running stream holds KV blocks; closing it (a client disconnect) frees them.
    assert metric(url, "fleetserve_kv_cache_blocks_free") < total
    generated_before_close = metric(url, "fleetserve_generation_tokens")
    running.close()
    wait_for(lambda: metric(url, "fleetserve_requests", finish_reason="abort") == aborts + 1, 30,
             "the disconnected stream to be aborted")
    thread.join(60)
    wait_for(lambda: metric(url, "fleetserve_requests_running") == 0, 30, "no running requests")
    assert metric(url, "fleetserve_kv_cache_blocks_free") == total
    assert metric(url, "fleetserve_kv_cache_usage_ratio") == 0
    # Aborted early: nowhere near the 1900 tokens it asked for.
    assert metric(url, "fleetserve_generation_tokens") - generated_before_close < 1900

    # A non-streaming client that gives up (read timeout) is aborted too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer k3y"}, timeout=1.0,
                   json={"model": MODEL, "prompt": "slow", "max_tokens": 1900, "ignore_eos": True})
    wait_for(lambda: metric(url, "fleetserve_requests", finish_reason="abort") == aborts + 2, 30,
             "the timed-out request to be aborted")
    wait_for(lambda: metric(url, "fleetserve_kv_cache_blocks_free") == total, 30, "KV blocks to be freed")


def test_sigterm_drains_in_flight_streams_and_refuses_new_work(
        server_factory: Callable[..., ServerProcess]) -> None:  # noqa: F811
    proc = server_factory("--drain-timeout", "120")
    streams = [client(proc).completions.create(model=MODEL, prompt=f"drain {i}", max_tokens=800, stream=True,
                                               stream_options={"include_usage": True}, extra_body=LONG)
               for i in range(2)]
    iterators = [iter(s) for s in streams]
    for it in iterators:
        next(it)  # both admitted and generating
    proc.process.send_signal(signal.SIGTERM)
    wait_for(lambda: httpx.get(proc.base_url + "/ready").status_code == 503, 30, "/ready to turn 503")
    with pytest.raises(openai.InternalServerError) as refused:
        client(proc).completions.create(model=MODEL, prompt="late", max_tokens=2)
    assert refused.value.status_code == 503 and refused.value.code == "draining"
    for it in iterators:
        chunks = list(it)
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == ["length"]
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 800
    assert proc.process.wait(60) == 0, proc.log_tail()


def test_drain_timeout_aborts_what_is_left(server_factory: Callable[..., ServerProcess]) -> None:  # noqa: F811
    proc = server_factory("--drain-timeout", "1")
    stream = client(proc).completions.create(model=MODEL, prompt="too long", max_tokens=1900, stream=True,
                                             extra_body=LONG)
    it = iter(stream)
    next(it)
    proc.process.send_signal(signal.SIGTERM)
    # finish_reason only takes OpenAI's values, so a request cut off by the drain deadline ends its
    # stream with an error event (the SDK raises it), never with a made-up finish reason.
    finishes: list[str] = []
    with pytest.raises(openai.APIError, match="stopped this request before it finished"):
        finishes += [c.choices[0].finish_reason for c in it if c.choices and c.choices[0].finish_reason]
    assert finishes == []
    assert proc.process.wait(60) == 0, proc.log_tail()
    records = [json.loads(line) for line in proc.log_path.read_text().splitlines() if line.startswith("{")]
    finished = [r for r in records if r.get("event") == "request_finished"]
    assert len(finished) == 1
    record = finished[0]
    assert record["finish_reason"] == "abort" and record["model"] == MODEL
    assert record["prompt_tokens"] == len("too long") and 0 < record["completion_tokens"] < 1900
    assert {"request_id", "queue_time_s", "ttft_s", "e2e_s"} <= set(record)
    assert record["sampling"]["max_tokens"] == 1900 and "seed" in record["sampling"]
    assert "prompt" not in record and "completion" not in record  # no --log-prompts: no user text
