"""Nasty inputs against a real `fleetserve serve` on a tiny model: none may hurt the server or anyone else.

Every case sends one hostile request while a normal greedy request runs
next to it, then checks that the hostile one got a 4xx in OpenAI's error
shape (or a 200 where the input is legal), that the normal one produced the
same text as it does alone, and that /health still answers 200. One server
serves the whole module (its own, not the session's shared one: a regression
here would kill it).
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fleetserve_server.bench.launch import ServerProcess
from serve_util import MODEL, launch, metric, server_factory, tiny_model  # noqa: F401 - fixtures

NORMAL = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0,
          "ignore_eos": True}


@pytest.fixture(scope="module")
def abuse_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:  # noqa: F811
    # 16 sequences at most: the flow test runs 16 streams, the queueing test fills every slot.
    proc = launch(tiny_model, tmp_path_factory.mktemp("abuse-logs"), "--max-num-seqs", "16")
    try:
        yield proc
    finally:
        code = proc.stop()
        assert code == 0, f"server exited with {code}:\n{proc.log_tail()}"


@pytest.fixture(scope="module")
def reference_text(abuse_server: ServerProcess) -> str:
    r = httpx.post(abuse_server.base_url + "/v1/completions", json=NORMAL, timeout=60)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["text"])


def normal_request(base_url: str) -> str:
    r = httpx.post(base_url + "/v1/completions", json=NORMAL, timeout=120)
    assert r.status_code == 200, f"a normal request next to the hostile one failed: {r.status_code} {r.text}"
    return str(r.json()["choices"][0]["text"])


def assert_healthy(proc: ServerProcess) -> None:
    assert proc.process.poll() is None, f"the server exited:\n{proc.log_tail()}"
    health = httpx.get(proc.base_url + "/health", timeout=10)
    assert health.status_code == 200, f"/health after the hostile request: {health.status_code} {health.text}"


def assert_all_blocks_free(proc: ServerProcess) -> None:
    from serve_util import wait_for

    wait_for(lambda: metric(proc.base_url, "fleetserve_kv_cache_blocks_free")
             == metric(proc.base_url, "fleetserve_kv_cache_blocks_total"), 30, "every KV block to be free")


def next_to_normal(proc: ServerProcess, reference: str, hostile: Callable[[], httpx.Response]) -> httpx.Response:
    """Run ``hostile`` while a normal request runs; the normal one must be unaffected."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        normal = pool.submit(normal_request, proc.base_url)
        response = hostile()
        assert normal.result() == reference
    assert_healthy(proc)
    assert normal_request(proc.base_url) == reference  # and the next one after it
    return response


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, object]:
    assert response.status_code == status, f"expected {status}, got {response.status_code}: {response.text[:500]}"
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return dict(error)


# ---- the seed that killed the engine -------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_seed_out_of_range_fails_alone(abuse_server: ServerProcess, reference_text: str, endpoint: str) -> None:
    body: dict[str, object] = {"model": MODEL, "max_tokens": 4, "seed": 18446744073709551616, "temperature": 1}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": "hi"}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = "hi"
        path = "/v1/completions"

    def hostile() -> httpx.Response:
        return httpx.post(abuse_server.base_url + path, json=body, timeout=60)

    response = next_to_normal(abuse_server, reference_text, hostile)
    assert_openai_error(response, 400, "seed")
    assert_all_blocks_free(abuse_server)


def test_seed_out_of_range_streamed(abuse_server: ServerProcess, reference_text: str) -> None:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 4, "seed": -1, "temperature": 1, "stream": True}

    def hostile() -> httpx.Response:
        return httpx.post(abuse_server.base_url + "/v1/completions", json=body, timeout=60)

    response = next_to_normal(abuse_server, reference_text, hostile)
    assert_openai_error(response, 400, "seed")


def test_largest_valid_seed_samples(abuse_server: ServerProcess) -> None:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 4, "seed": 2**63 - 1, "temperature": 1}
    first = httpx.post(abuse_server.base_url + "/v1/completions", json=body, timeout=60)
    second = httpx.post(abuse_server.base_url + "/v1/completions", json=body, timeout=60)
    assert first.status_code == 200, first.text
    assert first.json()["choices"][0]["text"] == second.json()["choices"][0]["text"]  # still reproducible
    assert_healthy(abuse_server)



# ---- oversized and malformed bodies --------------------------------------------------------------

FIFTY_MB = 50 * 1024 * 1024


def big_body() -> bytes:
    return b'{"model": "%s", "max_tokens": 1, "prompt": "' % MODEL.encode() + b"a" * FIFTY_MB + b'"}'


def test_50_mb_body_is_413_from_content_length(abuse_server: ServerProcess, reference_text: str) -> None:
    body = big_body()

    def hostile() -> httpx.Response:
        return httpx.post(abuse_server.base_url + "/v1/completions", content=body,
                          headers={"Content-Type": "application/json"}, timeout=120)

    error = assert_openai_error(next_to_normal(abuse_server, reference_text, hostile), 413)
    assert error["code"] == "request_too_large" and "--max-request-bytes" in str(error["message"])


def test_50_mb_chunked_body_is_413_while_reading(abuse_server: ServerProcess, reference_text: str) -> None:
    sent = 0

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must count what arrives
        nonlocal sent
        body = big_body()
        for i in range(0, len(body), 1 << 20):
            sent += 1 << 20
            yield body[i : i + (1 << 20)]

    def hostile() -> httpx.Response:
        return httpx.post(abuse_server.base_url + "/v1/chat/completions", content=chunks(),
                          headers={"Content-Type": "application/json"}, timeout=120)

    try:
        response = next_to_normal(abuse_server, reference_text, hostile)
    except httpx.TransportError:
        # The server answered 413 and closed the connection while the client was still sending:
        # the limit worked (it did not read 50 MB); what matters is that it stays healthy.
        assert sent < FIFTY_MB
        assert_healthy(abuse_server)
        return
    assert_openai_error(response, 413)


@pytest.mark.parametrize("body, param", [
    pytest.param(b'{"model": "' + MODEL.encode() + b'", "prompt": "caf\xc3\x28 \xff\xfe"}', None,
                 id="invalid-utf8"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, None, id="nested-100k"),
    pytest.param(b'{"model": "' + MODEL.encode() + b'", "prompt": "x", "messages": ' + b"[" * 100_000 + b"]",
                 None, id="nested-unterminated"),
    pytest.param(b'{"model": "' + MODEL.encode() + b'", "prompt": "hi", "temperature": NaN}', "temperature",
                 id="nan-temperature"),
    pytest.param(b'{"model": "' + MODEL.encode() + b'", "prompt": "hi", "top_p": Infinity}', "top_p",
                 id="inf-top-p"),
    pytest.param(b'{"model": "' + MODEL.encode() + b'", "prompt": "hi", "max_tokens": Infinity}', "max_tokens",
                 id="inf-max-tokens"),
    pytest.param(b'{"model": "' + MODEL.encode() + b'", "prompt": "hi", "temperature": -Infinity}',
                 "temperature", id="minus-inf-temperature"),
    pytest.param(b'{"model": "' + MODEL.encode() + b'", "prompt": "hi", "presence_penalty": NaN}',
                 "presence_penalty", id="nan-presence-penalty"),
])
def test_malformed_body_is_a_400(abuse_server: ServerProcess, reference_text: str, body: bytes,
                                 param: str | None) -> None:
    def hostile() -> httpx.Response:
        return httpx.post(abuse_server.base_url + "/v1/completions", content=body,
                          headers={"Content-Type": "application/json"}, timeout=60)

    assert_openai_error(next_to_normal(abuse_server, reference_text, hostile), 400, param)


# ---- huge but well-formed requests ---------------------------------------------------------------


def test_one_million_character_prompt(abuse_server: ServerProcess, reference_text: str) -> None:
    body = {"model": MODEL, "prompt": "hello world " * 83_334, "max_tokens": 4}

    def hostile() -> httpx.Response:
        return httpx.post(abuse_server.base_url + "/v1/completions", json=body, timeout=120)

    error = assert_openai_error(next_to_normal(abuse_server, reference_text, hostile), 400, "prompt")
    assert error["code"] == "context_length_exceeded"


def test_ten_thousand_stop_strings(abuse_server: ServerProcess, reference_text: str) -> None:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 4, "stop": [f"stop{i}" for i in range(10_000)]}

    def hostile() -> httpx.Response:
        return httpx.post(abuse_server.base_url + "/v1/completions", json=body, timeout=60)

    assert_openai_error(next_to_normal(abuse_server, reference_text, hostile), 400, "stop")


def test_chat_with_ten_thousand_messages(abuse_server: ServerProcess, reference_text: str) -> None:
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i}"} for i in range(10_000)]
    body = {"model": MODEL, "messages": messages, "max_tokens": 4}

    def hostile() -> httpx.Response:
        return httpx.post(abuse_server.base_url + "/v1/chat/completions", json=body, timeout=120)

    error = assert_openai_error(next_to_normal(abuse_server, reference_text, hostile), 400, "messages")
    assert error["code"] == "context_length_exceeded"


# ---- liveness: streams keep flowing, queued streams get headers at once -------------------------


class Streams:
    """Long greedy streams on their own threads, recording when each SSE line arrived."""

    def __init__(self, base_url: str, count: int, max_tokens: int = 1500) -> None:
        self.base_url = base_url
        self.arrivals: list[float] = []
        self.first_lines: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        body = {"model": MODEL, "prompt": "stream", "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True}
        self.threads = [threading.Thread(target=self._run, args=(body,), daemon=True) for _ in range(count)]
        for t in self.threads:
            t.start()

    def _run(self, body: dict[str, object]) -> None:
        with httpx.stream("POST", self.base_url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                with self.lock:
                    if len(self.first_lines) < len(self.threads) * 2:
                        self.first_lines.append(line)
                    if line.startswith("data:"):
                        self.arrivals.append(time.monotonic())
                if self.stop.is_set():
                    return  # closing the response disconnects: the server aborts the request

    def count_data(self) -> int:
        with self.lock:
            return len(self.arrivals)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def test_streams_keep_flowing_while_a_huge_prompt_is_tokenized(abuse_server: ServerProcess) -> None:
    """Tokenizing 1 MB takes seconds of CPU; done on the event loop it froze every stream meanwhile."""
    streams = Streams(abuse_server.base_url, 16)
    try:
        from serve_util import wait_for

        wait_for(lambda: streams.count_data() >= 32, 60, "the streams to start")
        start = time.monotonic()
        big = httpx.post(abuse_server.base_url + "/v1/completions",
                         json={"model": MODEL, "prompt": "hello world " * 83_334, "max_tokens": 4}, timeout=120)
        end = time.monotonic()
        assert big.status_code == 400, big.text
        with streams.lock:
            during = [t for t in streams.arrivals if start <= t <= end]
            before = max((t for t in streams.arrivals if t < start), default=start)
            after = min((t for t in streams.arrivals if t > end), default=end)
        points = [before, *during, after]
        longest_gap = max(b - a for a, b in zip(points, points[1:], strict=False))
        # The streams got tokens all through the big request, not just before and after it.
        assert len(during) >= 3, (len(during), end - start)
        assert longest_gap < (end - start) / 2, (longest_gap, end - start)
    finally:
        streams.close()
    assert_healthy(abuse_server)
    assert_all_blocks_free(abuse_server)


def test_queued_stream_gets_headers_and_a_comment_at_once(abuse_server: ServerProcess) -> None:
    """With every sequence slot busy, a new stream is queued: its headers and an SSE comment
    go out right away (proxies with header timeouts would otherwise drop it), then its tokens."""
    busy = Streams(abuse_server.base_url, 16, max_tokens=1500)
    try:
        from serve_util import wait_for

        wait_for(lambda: metric(abuse_server.base_url, "fleetserve_requests_running") == 16, 60,
                 "16 running requests")
        body = {"model": MODEL, "prompt": "queued", "max_tokens": 3, "temperature": 0, "stream": True}
        with httpx.stream("POST", abuse_server.base_url + "/v1/completions", json=body, timeout=120) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            lines = r.iter_lines()
            first = next(lines)
            # still queued when the first line came: the busy streams hold every slot
            assert metric(abuse_server.base_url, "fleetserve_requests_waiting") >= 1
            assert first.startswith(":"), first
            busy.close()  # free the slots: the queued request runs and streams its tokens
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        data = [json.loads(line[5:]) for line in rest if line.startswith("data: {")]
        assert data and data[-1]["choices"][0]["finish_reason"] == "length"
    finally:
        busy.close()
    assert_healthy(abuse_server)


def test_waiting_queue_is_bounded_by_default(server_factory) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """No --max-queue-length: the bound comes from the KV cache, 4 x 4096 / 2048 = 8 waiting requests."""
    proc = server_factory("--kv-cache-tokens", "4096", "--max-num-seqs", "1")
    long_body = {"model": MODEL, "prompt": "running", "max_tokens": 1500, "temperature": 0, "ignore_eos": True}
    short_body = {"model": MODEL, "prompt": "waiting", "max_tokens": 2, "temperature": 0}
    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        running = pool.submit(httpx.post, proc.base_url + "/v1/completions", json=long_body, timeout=300)
        from serve_util import wait_for

        wait_for(lambda: metric(proc.base_url, "fleetserve_requests_running") == 1, 60, "the long request to run")
        waiting = [pool.submit(httpx.post, proc.base_url + "/v1/completions", json=short_body, timeout=300)
                   for _ in range(8)]
        wait_for(lambda: metric(proc.base_url, "fleetserve_requests_waiting") == 8, 60, "eight waiting requests")
        refused = httpx.post(proc.base_url + "/v1/completions", json=short_body, timeout=60)
        assert_openai_error(refused, 429)
        assert int(refused.headers["retry-after"]) >= 1
        assert metric(proc.base_url, "fleetserve_requests_rejected", reason="queue_full") == 1
        assert running.result().status_code == 200
        assert all(w.result().status_code == 200 for w in waiting)
