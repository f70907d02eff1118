"""The sample capture's pieces on plain data: redaction, rotation at the size bound, sampling, bad settings."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fleetserve_server.capture import (
    CaptureConfigError,
    Redactor,
    RotatingJsonLines,
    SampleCapture,
    open_capture,
)
from fleetserve_server.cli.serve import configure
from fleetserve_server.config import build_config


@pytest.mark.parametrize("text,secret,kind", [
    ("mail jane.doe+eval@example.co.uk now", "jane.doe+eval@example.co.uk", "email"),
    ("my key is sk-proj-AbCdEf0123456789XyZ_abcdef ok", "AbCdEf0123456789XyZ", "key"),
    ("Authorization: Bearer abcDEF123456ghiJKL", "abcDEF123456ghiJKL", "key"),
    ("set api_key=s3cr3tValue99", "s3cr3tValue99", "key"),
    ("use ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789", "aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789", "key"),
    ("aws AKIAABCDEFGHIJKLMNOP", "AKIAABCDEFGHIJKLMNOP", "key"),
    ("hex 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", "9f86d081884c7d", "key"),
    ("card 4111 1111 1111 1111 please", "4111 1111", "number"),
    ("call +44 20-7946-0958", "7946-0958", "number"),
])
def test_default_patterns_redact_the_secret_and_keep_the_rest(text: str, secret: str, kind: str) -> None:
    out = Redactor().text(text)
    assert f"[REDACTED:{kind}]" in out and secret not in out, out
    assert out.split(" ")[0] == text.split(" ")[0]  # the words before the secret stay


@pytest.mark.parametrize("text", ["The year 2024 had 366 days.", "Count the tokens: 12, 345 and 6789.",
                                  "Write a haiku about the sea.", "version 1.2.3 of the tokenizer"])
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert Redactor().text(text) == text


def test_user_patterns_and_nested_messages() -> None:
    redactor = Redactor([r"Project Falcon"], defaults=True)
    messages = [{"role": "user", "content": "Project Falcon: mail bob@corp.example"}]
    assert redactor.value(messages) == [{"role": "user", "content": "[REDACTED:custom]: mail [REDACTED:email]"}]
    assert Redactor(["zz+"], defaults=False).text("bob@corp.example") == "bob@corp.example"


@pytest.mark.parametrize("pattern,message", [("(", "not a valid regular expression"),
                                             ("a*", "matches the empty string")])
def test_a_bad_user_pattern_names_itself(pattern: str, message: str) -> None:
    with pytest.raises(CaptureConfigError, match=re.escape(f"--capture-redact {pattern!r}")):
        Redactor([pattern])
    with pytest.raises(CaptureConfigError, match=message):
        Redactor([pattern])


def test_rotation_keeps_every_file_under_the_bound_and_drops_the_oldest(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    writer = RotatingJsonLines(path, max_bytes=100, max_files=2)
    lines = [f'{{"i": {i:3d}, "pad": "{"x" * 20}"}}\n'.encode() for i in range(10)]  # 41 bytes each: 2 per file
    for line in lines:
        assert writer.write(line)
    writer.close()
    files = [path, tmp_path / "s.jsonl.1", tmp_path / "s.jsonl.2"]
    assert all(f.stat().st_size <= 100 for f in files)
    assert not (tmp_path / "s.jsonl.3").exists()
    kept = [json.loads(x)["i"] for f in reversed(files) for x in f.read_text().splitlines()]
    assert kept == list(range(4, 10))  # 3 files x 2 lines: the 4 oldest lines rotated out
    assert not RotatingJsonLines(path, max_bytes=100, max_files=2).write(b"y" * 101)


def test_fraction_decides_and_the_record_has_no_token_ids(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    values = iter([0.2, 0.7])
    capture = SampleCapture(RotatingJsonLines(path, 10_000, 1), fraction=0.5, redactor=Redactor(),
                            rng=lambda: next(values))
    assert capture.sampled() and not capture.sampled()
    assert not SampleCapture(capture.writer, fraction=0.0, redactor=Redactor(), rng=lambda: 0.0).sampled()
    fields = {"request_id": "r1", "sampling": {"temperature": 0.5, "grammar": object()}, "e2e_s": 0.25}
    capture.record(fields, prompt="hi a@b.io", output="ok", token_logprobs=[-0.123456, -1.0])
    sample = json.loads(path.read_text())
    assert sample["request_id"] == "r1" and sample["prompt"] == "hi [REDACTED:email]"
    assert sample["sampling"] == {"temperature": 0.5, "structured_output": True}
    assert sample["token_logprobs"] == [-0.12346, -1.0] and sample["e2e_s"] == 0.25


@pytest.mark.parametrize("kwargs,message", [
    ({"fraction": 1.5}, "--capture-fraction 1.5: must lie in"),
    ({"max_bytes": 10}, "--capture-max-bytes 10"),
    ({"max_files": 0}, "--capture-max-files 0"),
])
def test_bad_settings_name_the_flag(tmp_path: Path, kwargs: dict[str, float], message: str) -> None:
    settings = {"fraction": 0.5, "max_bytes": 4096, "max_files": 2, **kwargs}
    with pytest.raises(CaptureConfigError, match=message):
        open_capture(str(tmp_path / "s.jsonl"), **settings)  # type: ignore[arg-type]


def test_paths_that_cannot_work_are_named(tmp_path: Path) -> None:
    with pytest.raises(CaptureConfigError, match="does not exist; create it or mount a volume"):
        open_capture(str(tmp_path / "missing" / "s.jsonl"), fraction=1, max_bytes=4096, max_files=1)
    with pytest.raises(CaptureConfigError, match="is a directory"):
        open_capture(str(tmp_path), fraction=1, max_bytes=4096, max_files=1)
    assert open_capture(None, fraction=1, max_bytes=4096, max_files=1) is None


def test_serve_flags_fill_the_capture_settings() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    configure(parser)
    args = parser.parse_args(["--capture-path", "/c/s.jsonl", "--capture-fraction", "0.25", "--capture-redact", "a+",
                              "--capture-redact", "b+", "--no-capture-default-redaction",
                              "--otlp-endpoint", "http://c:4318"])
    config = build_config({k: v for k, v in vars(args).items() if k not in ("handler", "config")}, environ={})
    assert (config.capture_path, config.capture_fraction, config.capture_redact) == ("/c/s.jsonl", 0.25,
                                                                                     ["a+", "b+"])
    assert config.capture_default_redaction is False and config.otlp_endpoint == "http://c:4318"
    assert build_config({}, environ={}).capture_path is None  # off by default


def test_a_capture_that_cannot_write_never_fails_the_answer(tmp_path: Path) -> None:
    import asyncio

    import httpx
    from api_fakes import MODEL, FakeEngine, FakeTokenizer
    from fleetserve_server.api.app import create_app

    capture = open_capture(str(tmp_path / "s.jsonl"), fraction=1, max_bytes=4096, max_files=1)
    assert capture is not None
    capture.writer._file.close()  # writing now raises ValueError (not OSError): a broken writer
    app = create_app(FakeEngine(), served_name=MODEL.served_name, tokenizer=FakeTokenizer(), model=MODEL,
                     capture=capture)

    async def ask() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.post("/v1/chat/completions", json={
                "model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})

    r = asyncio.run(ask())
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
