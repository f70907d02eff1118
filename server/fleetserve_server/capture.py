"""Opt-in capture of sampled requests as JSON lines, for offline evaluation of what the model says.

Off unless ``--capture-path`` is set. Then each finished request is written
with probability ``--capture-fraction`` as one JSON object per line: prompt,
output, sampling parameters, token counts, finish reason, latency, and — only
when the request itself asked for ``logprobs`` — the generated tokens'
log-probabilities. ``request_id`` is the same as in the JSON request log.

Prompt and output pass through a ``Redactor`` first: by default e-mail
addresses, API keys / tokens and long digit runs become ``[REDACTED:<kind>]``;
``--capture-redact REGEX`` adds patterns. Token ids are never written (they
would spell out what the redaction removed), only their log-probabilities.

The file is bounded: once the next line would take it past
``--capture-max-bytes`` it is rotated (``samples.jsonl`` -> ``samples.jsonl.1``
-> ... -> ``samples.jsonl.<max-files>``, the oldest dropped), so the capture
never uses more than ``(max_files + 1) * max_bytes`` bytes. A single sample
larger than the bound is dropped (and counted) rather than breaking it.
Nothing here imports torch or the HTTP framework.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("fleetserve.capture")

# Default redaction patterns, applied in this order (keys before numbers: a key may hold digit runs).
DEFAULT_PATTERNS: dict[str, str] = {
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
    # "Bearer <token>", "api_key=...", "token: ..." and friends: the value after the keyword
    "key": r"(?i)\b(?:bearer|api[_-]?key|access[_-]?key|secret|token|password|passwd)\b\s*[:=]?\s*['\"]?"
           r"[A-Za-z0-9._~+/=-]{8,}"
           # well-known key shapes (OpenAI/Anthropic sk-..., GitHub, Slack, Hugging Face, Google, AWS ids)
           r"|\b(?:sk|pk|rk)-[A-Za-z0-9_-]{16,}|\bgh[pousr]_[A-Za-z0-9]{20,}|\bxox[abprs]-[A-Za-z0-9-]{10,}"
           r"|\bhf_[A-Za-z0-9]{20,}|\bAIza[A-Za-z0-9_-]{30,}|\bAKIA[0-9A-Z]{16}\b"
           # JWTs
           r"|\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"
           # any other long run of letters and digits mixed (hex secrets, random tokens)
           r"|\b(?=[A-Za-z0-9_-]*[0-9])(?=[A-Za-z0-9_-]*[A-Za-z])[A-Za-z0-9_-]{32,}\b",
    # 8 or more digits, optionally grouped by spaces or dashes: card, phone, account and ID numbers
    "number": r"(?<![0-9])[0-9](?:[ -]?[0-9]){7,}(?![0-9])",
}


class CaptureConfigError(ValueError):
    """The capture settings cannot be used; the message names the flag and the fix."""


class Redactor:
    """Replaces every match of its patterns in a string with ``[REDACTED:<name>]``.

    User patterns are named ``custom``; they run after the defaults.
    """

    def __init__(self, extra: Iterable[str] = (), *, defaults: bool = True) -> None:
        self.patterns: list[tuple[str, re.Pattern[str]]] = []
        if defaults:
            self.patterns += [(name, re.compile(rx)) for name, rx in DEFAULT_PATTERNS.items()]
        for rx in extra:
            try:
                compiled = re.compile(rx)
            except re.error as exc:
                raise CaptureConfigError(f"--capture-redact {rx!r}: not a valid regular expression ({exc})") from None
            if compiled.search(""):
                raise CaptureConfigError(f"--capture-redact {rx!r}: matches the empty string, so it would "
                                         "redact between every character; make it match at least one")
            self.patterns.append(("custom", compiled))

    def text(self, value: str) -> str:
        for name, pattern in self.patterns:
            value = pattern.sub(f"[REDACTED:{name}]", value)
        return value

    def value(self, value: Any) -> Any:
        """Redact every string inside a JSON-like value (chat messages, prompt lists)."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {k: self.value(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.value(v) for v in value]
        return value


class RotatingJsonLines:
    """Appends lines to ``path``, rotating before a line would take it past ``max_bytes``.

    Invariants: ``path`` never exceeds ``max_bytes``; at most ``max_files`` rotated files
    (``path.1`` newest .. ``path.<max_files>`` oldest) exist beside it.
    """

    def __init__(self, path: Path, max_bytes: int, max_files: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.max_files = max_files
        self._lock = threading.Lock()
        self._file = open(path, "ab")  # noqa: SIM115 - held open for the process's life
        self._size = self._file.tell()

    def write(self, line: bytes) -> bool:
        """Append ``line``; False (nothing written) if it alone is over the bound."""
        if len(line) > self.max_bytes:
            return False
        with self._lock:
            if self._size + len(line) > self.max_bytes:
                self._rotate()
            self._file.write(line)
            self._file.flush()  # a reader (an eval job, a test) sees whole lines as they are written
            self._size += len(line)
        return True

    def _rotate(self) -> None:
        self._file.close()
        for index in range(self.max_files - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{index + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._file = open(self.path, "ab")  # noqa: SIM115
        self._size = 0

    def close(self) -> None:
        with self._lock:
            self._file.close()


@dataclass
class SampleCapture:
    """Decides which finished requests to keep and writes them, redacted."""

    writer: RotatingJsonLines
    fraction: float
    redactor: Redactor
    rng: Callable[[], float] = random.random
    written: int = 0
    dropped_too_large: int = 0

    def sampled(self) -> bool:
        return self.fraction > 0 and self.rng() < self.fraction

    def record(self, fields: Mapping[str, Any], *, prompt: Any, output: str | None,
               token_logprobs: list[float] | None) -> None:
        """Write one request: ``fields`` is the request log's record (ids, counts, latency, sampling)."""
        sampling = {k: v for k, v in dict(fields.get("sampling") or {}).items() if k != "grammar"}
        sampling["structured_output"] = bool((fields.get("sampling") or {}).get("grammar"))
        sample: dict[str, Any] = {
            "ts": round(time.time(), 3),
            "request_id": fields.get("request_id"),
            "engine_request_id": fields.get("engine_request_id"),
            "endpoint": fields.get("endpoint"),
            "model": fields.get("model"),
            "prompt": self.redactor.value(prompt),
            "output": self.redactor.text(output or ""),
            "sampling": sampling,
            "finish_reason": fields.get("finish_reason"),
            "prompt_tokens": fields.get("prompt_tokens"),
            "completion_tokens": fields.get("completion_tokens"),
            "cached_prompt_tokens": fields.get("cached_prompt_tokens"),
            "queue_time_s": fields.get("queue_time_s"),
            "ttft_s": fields.get("ttft_s"),
            "e2e_s": fields.get("e2e_s"),
        }
        if token_logprobs is not None:
            sample["token_logprobs"] = [round(v, 5) for v in token_logprobs]
        line = (json.dumps(sample, default=str, ensure_ascii=False) + "\n").encode()
        try:
            ok = self.writer.write(line)
        except OSError as exc:  # a full or vanished volume must not fail the request that was served
            log.warning("capture: writing %s failed: %s", self.writer.path, exc)
            return
        if ok:
            self.written += 1
        else:
            self.dropped_too_large += 1
            log.warning("capture: a %d-byte sample is over --capture-max-bytes %d and was dropped",
                        len(line), self.writer.max_bytes)

    def close(self) -> None:
        self.writer.close()


def open_capture(path: str | None, *, fraction: float, max_bytes: int, max_files: int,
                 redact: Iterable[str] = (), default_redaction: bool = True) -> SampleCapture | None:
    """The capture the flags describe, its file opened; None when ``path`` is unset (the default).

    Raises CaptureConfigError naming the flag for settings that cannot work (before the model loads).
    """
    if not path:
        return None
    if not 0.0 <= fraction <= 1.0:
        raise CaptureConfigError(f"--capture-fraction {fraction}: must lie in [0, 1] (0.01 keeps 1% of requests)")
    if max_bytes < 1024:
        raise CaptureConfigError(f"--capture-max-bytes {max_bytes}: at least 1024 bytes, so a sample fits")
    if max_files < 1:
        raise CaptureConfigError(f"--capture-max-files {max_files}: keep at least 1 rotated file")
    redactor = Redactor(redact, defaults=default_redaction)
    target = Path(path)
    if target.is_dir():
        raise CaptureConfigError(f"--capture-path {path}: is a directory; name a file in it, "
                                 f"e.g. {target / 'samples.jsonl'}")
    if not target.parent.is_dir():
        raise CaptureConfigError(f"--capture-path {path}: the directory {target.parent} does not exist; "
                                 "create it or mount a volume there")
    try:
        writer = RotatingJsonLines(target, max_bytes=max_bytes, max_files=max_files)
    except OSError as exc:
        raise CaptureConfigError(f"--capture-path {path}: cannot open it for writing ({exc.strerror})") from None
    log.info("capturing %.4g of requests to %s (rotated at %d bytes, %d old files kept)",
             fraction, path, max_bytes, max_files)
    return SampleCapture(writer=writer, fraction=fraction, redactor=redactor)
