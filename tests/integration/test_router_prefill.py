"""The router's pending prefill against a real `fleetserve serve` on loopback: a request's uncached
prompt counts on its replica while the replica has given it no output (queued behind another), and
the count returns to 0 after streamed, non-streamed, refused (400) and abandoned requests."""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable
from typing import Any

import httpx
from fleetserve_router.prompt import CHARS_PER_TOKEN, ChunkHasher, render_request
from fleetserve_server.bench.launch import ServerProcess
from router_util import address, router_metric, start_router
from serve_util import MODEL, metric, server_factory, tiny_model, wait_for  # noqa: F401 - fixtures

PENDING = "fleetserve_router_pending_prefill_tokens"
CHUNK_CHARS = 64  # the router's default --chunk-chars


def chat_body(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 8,
            "temperature": 0, **extra}


def estimated_tokens(body: dict[str, Any]) -> float:
    """What the router counts for a prompt it holds no prefix of: its full chunks, ~16 tokens each."""
    chunks = len(ChunkHasher(CHUNK_CHARS).hashes(render_request("/v1/chat/completions", body)))
    return chunks * CHUNK_CHARS / CHARS_PER_TOKEN


def open_stream(router: ServerProcess, body: dict[str, Any]) -> tuple[http.client.HTTPConnection,
                                                                        http.client.HTTPResponse]:
    host, port = address(router).rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    return conn, resp


def read_until_event(resp: http.client.HTTPResponse) -> bytes:
    """The stream's next line that is not blank: a comment or the first line of an event."""
    while True:
        line = resp.readline()
        if line.strip():
            return line


def test_pending_prefill_counts_a_queued_prompt_and_returns_to_zero(
        server_factory: Callable[..., ServerProcess], tmp_path: Any) -> None:  # noqa: F811
    srv = server_factory("--max-num-seqs", "1")  # a second request waits while one runs
    router = start_router(tmp_path, "--endpoints", address(srv))
    key = address(srv)

    def pending() -> float:
        return router_metric(router.base_url, PENDING, replica=key)

    try:
        base = router.base_url + "/v1/chat/completions"
        ok = httpx.post(base, json=chat_body("A short question about whales and their songs?"), timeout=60)
        assert ok.status_code == 200 and pending() == 0
        with httpx.stream("POST", base, json=chat_body("Another question, streamed, about the tides?", stream=True),
                          timeout=60) as resp:
            assert resp.status_code == 200 and "data: [DONE]" in list(resp.iter_lines())
        assert pending() == 0
        refused = httpx.post(base, json=chat_body("A question with a bad limit.", max_tokens=-1), timeout=60)
        assert refused.status_code == 400 and pending() == 0

        # One long answer runs (its client reads its first event, then nothing more); a document sent
        # behind it waits for the only sequence slot (": queued") and counts as pending until it leaves.
        long_conn, long_resp = open_stream(router, chat_body("Tell me a long story.", stream=True, max_tokens=1900,
                                                            ignore_eos=True))
        assert read_until_event(long_resp).startswith(b"data:")
        document = "Read this document, then answer. " + " ".join(f"word{i}" for i in range(150))
        doc = chat_body(document, stream=True)
        expected = estimated_tokens(doc)
        assert expected > 200
        doc_conn, doc_resp = open_stream(router, doc)
        assert read_until_event(doc_resp) == b": queued\n"  # the server has given it no output
        assert pending() == expected
        doc_conn.close()  # the client gives up before any output
        wait_for(lambda: pending() == 0, 30, "the abandoned document to leave the pending count")
        long_conn.close()  # and the long answer's client leaves mid-answer
        wait_for(lambda: metric(srv.base_url, "fleetserve_requests_running") == 0, 30, "the server to abort it")
        assert pending() == 0
    finally:
        assert router.stop() == 0, router.log_tail()
