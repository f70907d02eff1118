"""`fleetserve serve --capture-path` against a real server: sampled requests land as redacted JSON lines
with the request log's ids, the file rotates at its bound, fraction 0 writes nothing, bad settings stop
the start naming the flag."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fleetserve_server.bench.launch import ServerProcess
from serve_util import MODEL, server_factory, tiny_model  # noqa: F401 - fixtures

EMAIL = "jane.doe@example.org"
KEY = "sk-live-4fQ9zR2mX8pL0vN7cK3tY6wB1"


def _chat(proc: ServerProcess, content: str, request_id: str, **extra: object) -> httpx.Response:
    r = httpx.post(proc.base_url + "/v1/chat/completions", timeout=120, headers={"X-Request-Id": request_id},
                   json={"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4,
                         "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r


def _samples(path: Path) -> list[dict[str, object]]:
    files = sorted(path.parent.glob(path.name + "*"), key=lambda p: p.name)
    return [json.loads(line) for f in files for line in f.read_text().splitlines()]


def test_captured_requests_are_redacted_and_rotated(server_factory: Callable[..., ServerProcess],  # noqa: F811
                                                     tmp_path: Path) -> None:
    path = tmp_path / "capture" / "samples.jsonl"
    path.parent.mkdir()
    proc = server_factory("--capture-path", str(path), "--capture-fraction", "1", "--capture-max-bytes", "2048",
                          "--capture-max-files", "3", "--capture-redact", r"Project\s+Falcon")
    secret = _chat(proc, f"Mail {EMAIL} the key {KEY} about Project Falcon, account 12345678901.", "secret-1",
                   logprobs=True)
    completion = httpx.post(proc.base_url + "/v1/completions", timeout=120, headers={"X-Request-Id": "text-1"},
                            json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3, "temperature": 0.7,
                                  "seed": 5})
    assert completion.status_code == 200, completion.text
    for i in range(6):  # enough lines (~600 bytes each) to pass 2048 bytes more than once
        _chat(proc, f"Question number {i}: what is {i} + {i}?", f"fill-{i}")

    raw = "".join(p.read_text() for p in path.parent.iterdir())
    assert EMAIL not in raw and KEY not in raw and "Falcon" not in raw and "12345678901" not in raw
    samples = {s["request_id"]: s for s in _samples(path)}
    assert set(samples) == {"secret-1", "text-1", *(f"fill-{i}" for i in range(6))}
    prompt = json.dumps(samples["secret-1"]["prompt"])
    for tag in ("[REDACTED:email]", "[REDACTED:key]", "[REDACTED:custom]", "[REDACTED:number]"):
        assert tag in prompt, prompt
    secret_sample = samples["secret-1"]
    usage = secret.json()["usage"]
    assert secret_sample["completion_tokens"] == usage["completion_tokens"]
    assert secret_sample["output"] == secret.json()["choices"][0]["message"]["content"]
    assert len(secret_sample["token_logprobs"]) == usage["completion_tokens"]  # type: ignore[arg-type]
    text_sample = samples["text-1"]
    assert text_sample["prompt"] == "Once upon a time" and "token_logprobs" not in text_sample
    assert text_sample["sampling"]["temperature"] == 0.7 and text_sample["sampling"]["seed"] == 5  # type: ignore[index]
    assert text_sample["output"] == completion.json()["choices"][0]["text"]
    assert all(isinstance(s["e2e_s"], float) and s["finish_reason"] == "length" for s in samples.values())
    rotated = sorted(p.name for p in path.parent.iterdir())
    assert "samples.jsonl.1" in rotated and "samples.jsonl.2" in rotated, rotated
    assert all(p.stat().st_size <= 2048 for p in path.parent.iterdir())

    # the request log carries the same ids (the join key for an evaluation job)
    assert proc.stop() == 0
    logged = {json.loads(line)["request_id"] for line in proc.log_path.read_text().splitlines()
              if line.startswith("{") and '"request_finished"' in line}
    assert set(samples) <= logged


def test_fraction_zero_writes_nothing(server_factory: Callable[..., ServerProcess], tmp_path: Path) -> None:  # noqa: F811
    path = tmp_path / "samples.jsonl"
    proc = server_factory("--capture-path", str(path), "--capture-fraction", "0")
    for i in range(3):
        _chat(proc, f"Say {i}", f"zero-{i}")
    assert path.exists() and path.read_text() == ""


@pytest.mark.parametrize("flags,message", [
    (["--capture-fraction", "1.5"], "--capture-fraction 1.5: must lie in [0, 1]"),
    (["--capture-redact", "("], "--capture-redact '(': not a valid regular expression"),
])
def test_bad_capture_settings_stop_the_start(server_factory: Callable[..., ServerProcess],  # noqa: F811
                                             tmp_path: Path, flags: list[str], message: str) -> None:
    with pytest.raises(RuntimeError, match="exited with code 2") as failure:
        server_factory("--capture-path", str(tmp_path / "s.jsonl"), *flags)
    assert message in str(failure.value)


def test_a_missing_directory_is_named(server_factory: Callable[..., ServerProcess], tmp_path: Path) -> None:  # noqa: F811
    missing = tmp_path / "nope" / "s.jsonl"
    with pytest.raises(RuntimeError, match="exited with code 2") as failure:
        server_factory("--capture-path", str(missing))
    assert f"--capture-path {missing}: the directory {missing.parent} does not exist" in str(failure.value)
