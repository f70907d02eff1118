"""Fixtures for the serving tests: a tiny random model on disk and real `fleetserve serve` processes.

Every server is a subprocess on 127.0.0.1 with a free port, started with the
same console entry point a user runs, and stopped (SIGTERM) by the fixture.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fleetserve_server.bench.launch import ServerProcess, fleetserve_argv, free_port, start_server
from prometheus_client.parser import text_string_to_metric_families

# Small enough to load in a second; long enough context for the drain tests' long generations.
COMMON_FLAGS = ["--device", "cpu", "--max-model-len", "2048", "--kv-cache-tokens", "32768",
                "--log-format", "json"]
MODEL = "tiny-llama"  # the served name: the model directory's name
SERVER_ENV = {"OMP_NUM_THREADS": "1", "FLEETSERVE_API_KEY": ""}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fleetserve_server.testing import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama", max_position_embeddings=4096)


@pytest.fixture(scope="module")
def hf(tiny_model: Path):  # type: ignore[no-untyped-def]
    """The same tiny model in transformers (float32, eval), with its tokenizer: the reference."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model)
    return model, tok


def openai_client(proc: ServerProcess, *, timeout: float = 120.0) -> Any:
    """The official openai SDK pointed at ``proc`` (no retries: a test sees every answer as sent)."""
    import openai

    return openai.OpenAI(base_url=proc.base_url + "/v1", api_key="unused", max_retries=0, timeout=timeout)


def launch(model: Path, log_dir: Path, *flags: str, env: dict[str, str] | None = None) -> ServerProcess:
    port = free_port()
    return start_server(f"fleetserve-{port}", fleetserve_argv(str(model), port, [*COMMON_FLAGS, *flags]),
                        port=port, ready_path="/ready", log_dir=log_dir, timeout=300,
                        env={**SERVER_ENV, **(env or {})})


@pytest.fixture(scope="session")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The shared server: default limits, no API key."""
    proc = launch(tiny_model, tmp_path_factory.mktemp("logs"))
    try:
        yield proc
    finally:
        code = proc.stop()
        assert code == 0, f"server exited with {code}:\n{proc.log_tail()}"


@pytest.fixture
def server_factory(tiny_model: Path, tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start servers with extra flags for one test; any still running are stopped afterwards."""
    started: list[ServerProcess] = []

    def make(*flags: str, env: dict[str, str] | None = None) -> ServerProcess:
        proc = launch(tiny_model, tmp_path, *flags, env=env)
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.stop(timeout=10)


def scrape(base_url: str) -> dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """/metrics as {family: {(sample name, sorted labels): value}}."""
    text = httpx.get(base_url + "/metrics", timeout=10).text
    out: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for family in text_string_to_metric_families(text):
        out[family.name] = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
    return out


def metric(base_url: str, family: str, **labels: str) -> float:
    """Sum of a family's plain samples (not _bucket/_count/_sum) matching ``labels``."""
    total = 0.0
    for (name, sample_labels), value in scrape(base_url)[family].items():
        if name.endswith(("_bucket", "_count", "_sum")) and name != family:
            continue
        if all(dict(sample_labels).get(k) == v for k, v in labels.items()):
            total += value
    return total


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
