"""schemathesis against /openapi.json of a real server, with valid AND invalid inputs.

Both generation modes run on every operation: positive (data the schema
allows) and negative (data it forbids: wrong types, out-of-range numbers,
missing fields, ...). Whatever comes in, no response may be a 5xx, every
response must match the declared schema, and afterwards the engine must be
alive with every KV block free again.

``FLEETSERVE_FUZZ_EXAMPLES`` sets the examples per operation and mode (50 in
``make test``, i.e. 100 per operation; ``make fuzz`` runs 500, i.e. 1,000).
Operations without parameters (GET /health, ...) have only a handful of
distinct inputs; Hypothesis stops when it has tried them all.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fleetserve_server.bench.launch import ServerProcess
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from serve_util import MODEL, launch, metric, tiny_model, wait_for  # noqa: F401 - fixtures

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = int(os.environ.get("FLEETSERVE_FUZZ_EXAMPLES", "50"))
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")


@pytest.fixture(scope="module")
def fuzz_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:  # noqa: F811
    """Its own server: the fuzzing must not be able to break the session's shared one."""
    proc = launch(tiny_model, tmp_path_factory.mktemp("fuzz-logs"))
    try:
        yield proc
    finally:
        code = proc.stop()
        assert code == 0, f"server exited with {code}:\n{proc.log_tail()}"


def _keep_short(body: object) -> None:
    """Short generations keep the fuzzing fast on a CPU (no max_tokens means "up to the context")."""
    if not isinstance(body, dict):
        return
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 8:
            body[key] = 8
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = 8
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > 2:
        body["n"] = 2


def _fuzzer(operation, mode: GenerationMode, base_url: str, statuses: Counter[int],  # type: ignore[no-untyped-def]
            seen: list[int]):
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def run(case) -> None:  # type: ignore[no-untyped-def]
        if mode is GenerationMode.POSITIVE and isinstance(case.body, dict):
            # Random model names only ever hit the 400 path (unit-tested); name the served
            # model so the other fields' fuzzing reaches the engine.
            case.body["model"] = MODEL
        _keep_short(case.body)
        response = case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=60)
        statuses[response.status_code] += 1
        seen.append(response.status_code)

    return run


def test_openapi_schema_fuzzing(fuzz_server: ServerProcess) -> None:
    base_url = fuzz_server.base_url
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    failures: list[str] = []
    statuses: Counter[int] = Counter()
    examples: dict[str, list[int]] = {}
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        label = f"{operation.method.upper()} {operation.path}"
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            run = _fuzzer(operation, mode, base_url, statuses, examples.setdefault(f"{label} {mode.value}", []))
            try:
                run()
            except Unsatisfiable:
                pass  # no negative input exists for an operation without parameters
            except Exception as exc:  # collect every operation's failure, then report them all
                failures.append(f"{label} ({mode.value}): {exc}")
    assert operations == 6  # chat, completions, models, health, ready, metrics
    print(f"schemathesis: {sum(len(v) for v in examples.values())} examples, responses by status {dict(sorted(statuses.items()))}")
    for key, seen in sorted(examples.items()):
        print(f"  {key}: {len(seen)}")
    assert not failures, "\n\n".join(failures)
    assert not [s for s in statuses if s >= 500], statuses
    # The fuzzing reached the engine (200s) and the validation (400s), with both kinds of input.
    assert statuses[200] > 0 and statuses[400] > 0, statuses
    for path in GENERATION_PATHS:
        for mode in ("positive", "negative"):
            assert len(examples[f"POST {path} {mode}"]) >= EXAMPLES * 0.9, {k: len(v) for k, v in examples.items()}
    # Whatever the fuzzing sent, the engine is alive and every KV block came back.
    health = httpx.get(base_url + "/health", timeout=10)
    assert health.status_code == 200, health.text
    wait_for(lambda: metric(base_url, "fleetserve_kv_cache_blocks_free")
             == metric(base_url, "fleetserve_kv_cache_blocks_total"), 30, "every KV block to be free")
    print(f"  after: /health 200, KV blocks free {metric(base_url, 'fleetserve_kv_cache_blocks_free'):.0f} "
          f"of {metric(base_url, 'fleetserve_kv_cache_blocks_total'):.0f}")
