"""The `bench serve` load generator: datasets, percentiles, and a run against the API on a fake engine."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from api_fakes import MODEL, FakeEngine, FakeTokenizer
from fleetserve_server.api.app import create_app
from fleetserve_server.bench.launch import free_port
from fleetserve_server.bench.loadgen import (
    RequestResult,
    format_table,
    multiturn_dataset,
    percentiles,
    random_dataset,
    run_workload,
    summarize,
)


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentiles(values) == {"p50": 50.0, "p90": 90.0, "p99": 99.0}
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None}
    assert percentiles([7.0]) == {"p50": 7.0, "p90": 7.0, "p99": 7.0}


def test_datasets_are_deterministic_and_multiturn_shares_a_prefix() -> None:
    assert random_dataset(4, 64, 8, seed=1) == random_dataset(4, 64, 8, seed=1)
    prompts = [c.user_turns[0] for c in random_dataset(4, 64, 8, seed=1)]
    assert len(set(p.split(": ", 1)[1][:20] for p in prompts)) == 4  # distinct prefixes
    assert all(50 <= len(p.split()) <= 60 for p in prompts)
    convs = multiturn_dataset(3, 2, 64, 8, seed=1)
    assert len({c.system for c in convs}) == 1 and all(len(c.user_turns) == 2 for c in convs)


def test_summary_counts_failures_and_tpot() -> None:
    results = [RequestResult(0, 0, True, 0.0, ttft=0.5, e2e=1.5, output_tokens=11),
               RequestResult(1, 0, False, 0.0, error="APIConnectionError: boom")]
    s = summarize("x", results, duration=2.0)
    assert (s.requests, s.failures, s.total_output_tokens) == (2, 1, 11)
    assert s.output_throughput == 5.5 and s.tpot_s["p50"] == pytest.approx(0.1)
    assert "APIConnectionError" in format_table([s])


@pytest.fixture
def fake_server() -> Iterator[str]:
    app = create_app(FakeEngine(step_s=0.002), served_name="fake-model", tokenizer=FakeTokenizer(), model=MODEL)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(10)


def test_workload_against_the_api(fake_server: str) -> None:
    convs = multiturn_dataset(4, 2, 8, 6, seed=0)  # the fake tokenizer spends a token per character
    results, duration = asyncio.run(run_workload(
        base_url=fake_server, model="fake-model", conversations=convs, request_rate=50.0, concurrency=3,
        extra_body={"ignore_eos": True}))
    assert len(results) == 8 and all(r.ok for r in results), [r.error for r in results]
    assert all(r.output_tokens == 6 and r.ttft is not None and r.e2e >= r.ttft for r in results)  # type: ignore[operator]
    second = [r for r in results if r.turn == 1]
    first = [r for r in results if r.turn == 0]
    assert min(r.prompt_tokens for r in second) > max(r.prompt_tokens for r in first)  # history resent
    s = summarize("fake", results, duration)
    assert s.failures == 0 and set(s.ttft_by_turn_p50_s) == {0, 1}


def test_transformers_serve_gets_a_model_dir_that_names_its_architecture(tmp_path: Path) -> None:
    from fleetserve_server.bench.serve import _with_architectures

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
    (model / "model.safetensors").write_bytes(b"weights")
    overlay = _with_architectures(model, tmp_path / "scratch")
    assert overlay != model
    assert json.loads((overlay / "config.json").read_text()) == {
        "model_type": "llama", "vocab_size": 10, "architectures": ["LlamaForCausalLM"]}
    assert (overlay / "model.safetensors").read_bytes() == b"weights"
    assert json.loads((model / "config.json").read_text()) == {"model_type": "llama", "vocab_size": 10}
    assert _with_architectures(overlay, tmp_path / "scratch") == overlay  # already named: used as is
    (model / "config.json").write_text(json.dumps({"model_type": "no-such-type"}))
    with pytest.raises(ValueError, match="no-such-type"):
        _with_architectures(model, tmp_path / "other")


@pytest.mark.parametrize("fresh", [False, True])
def test_fresh_connections_open_one_connection_per_request(fake_server: str, fresh: bool) -> None:
    """``fresh_connections``: every request on a TCP connection of its own (a Service balanced per
    connection then balances per request); the default pool reuses keep-alive connections."""
    upstream_port = int(fake_server.rsplit(":", 1)[1].split("/")[0])
    accepted = 0

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

    async def main() -> list[RequestResult]:
        proxy = await asyncio.start_server(relay, "127.0.0.1", 0)
        port = proxy.sockets[0].getsockname()[1]
        convs = multiturn_dataset(2, 3, 8, 4, seed=0)
        async with proxy:
            results, _ = await run_workload(base_url=f"http://127.0.0.1:{port}/v1", model="fake-model",
                                            conversations=convs, request_rate=float("inf"), concurrency=1,
                                            extra_body={"ignore_eos": True}, fresh_connections=fresh)
        return results

    results = asyncio.run(main())
    assert len(results) == 6 and all(r.ok for r in results), [r.error for r in results]
    if fresh:
        assert accepted == 6
    else:
        assert accepted < 6
