"""schemathesis against /openapi.json of a real server: no 5xx, responses match the declared schema."""

from __future__ import annotations

import pytest
from fleetserve_server.bench.launch import ServerProcess
from hypothesis import HealthCheck, given, settings
from serve_util import MODEL, server, tiny_model  # noqa: F401 - fixtures

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def test_openapi_schema_fuzzing(server: ServerProcess) -> None:  # noqa: F811
    schema = schemathesis.openapi.from_url(server.base_url + "/openapi.json")
    failures: list[str] = []
    statuses: dict[int, int] = {}
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def run(case) -> None:  # type: ignore[no-untyped-def]
            if isinstance(case.body, dict):
                # Random model names only ever hit the 400 path (unit-tested); name the served
                # model so the other fields' fuzzing reaches the engine.
                case.body["model"] = MODEL
                # Keep generations short so the fuzzing stays fast on a CPU (no limit at all
                # would mean "up to the context length").
                for key in ("max_tokens", "max_completion_tokens"):
                    if isinstance(case.body.get(key), int):
                        case.body[key] = min(case.body[key], 8)
                if case.body.get("max_tokens") is None and case.body.get("max_completion_tokens") is None:
                    case.body["max_tokens"] = 8
            response = case.call_and_validate(base_url=server.base_url, checks=CHECKS, timeout=60)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        try:
            run()
        except Exception as exc:  # collect every operation's failure, then report them all
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
    assert operations == 6  # chat, completions, models, health, ready, metrics
    assert not failures, "\n\n".join(failures)
    # The fuzzing reached the engine (200s) and the validation (400s), not just one of them.
    print("schemathesis responses by status:", statuses)
    assert statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0, statuses
