"""The cached-token ground truth of a streamed answer, read from its final usage event.

A server sends ``x-fleetserve-cached-tokens`` with a streamed answer's headers only when its first
output came within a short grace (0.25 s on fleetserve); a queued request or a long prefill starts
the stream without it. The OpenAI usage event (``stream_options.include_usage``) that ends the stream
always carries ``usage.prompt_tokens_details.cached_tokens`` (fleetserve; vLLM with
``--enable-prompt-tokens-details``), so the router reads the count there:

* the client asked for usage: its events pass through untouched and the router only reads them;
* it did not: the router asks the server for usage (``ask_for_usage``) and drops the usage event from
  what it relays (``UsageTap(strip=True)``). A fleetserve server's other events are the same bytes
  with or without ``include_usage`` (each chunk says ``"usage":null`` either way), so the client's
  stream is byte-for-byte what the server sends it without the router.
"""

from __future__ import annotations

import json
import re
from typing import Any

STREAMING_PATHS = ("/v1/chat/completions", "/v1/completions")

# stream_options fields whose meaning does not change when include_usage is turned on
_PLAIN_OPTIONS = {"include_usage", "include_obfuscation"}
_EVENT_END = re.compile(rb"\r?\n\r?\n")
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
# An event stream without blank-line framing that we can find: stop holding bytes back after this much.
_MAX_PENDING = 1 << 20


def ask_for_usage(path: str, parsed: Any) -> bytes | None:
    """The request body re-encoded with ``stream_options.include_usage: true`` when the client streams
    without asking for usage (its answer's usage event is then the router's to drop), else None: the
    client asked for usage itself, or the request is not a plain streamed generation (unknown
    stream_options fields, a body the server will refuse) and goes out as sent."""
    if path not in STREAMING_PATHS or not isinstance(parsed, dict) or parsed.get("stream") is not True:
        return None
    options = parsed.get("stream_options")
    if options is None:
        options = {}
    if not isinstance(options, dict) or not set(options) <= _PLAIN_OPTIONS:
        return None
    if options.get("include_usage") not in (None, False):
        return None  # true: the client reads usage itself; anything else: the server answers the 400
    try:
        return json.dumps({**parsed, "stream_options": {**options, "include_usage": True}},
                          ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    except ValueError:  # NaN/Infinity in the body: send it as it came, the server answers it
        return None


class UsageTap:
    """Relays an event stream, reading ``cached_tokens`` from its usage events (the last one wins).

    ``feed`` returns the bytes to pass on now, ``close`` what is left at the end. With ``strip`` the
    usage-only event (``"choices": []`` and a usage object) is dropped and events are passed on whole;
    without it every chunk passes on as it came.
    """

    def __init__(self, *, strip: bool) -> None:
        self.strip = strip
        self.cached_tokens: int | None = None
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk
        last = 0
        out: list[bytes] = []
        for end in _EVENT_END.finditer(data):
            event = data[last:end.end()]
            last = end.end()
            if self._read(event) and self.strip:
                continue
            out.append(event)
        self._pending = data[last:]
        if not self.strip:
            return chunk
        if len(self._pending) > _MAX_PENDING:  # no framing found: give up stripping, hold nothing back
            out.append(self._pending)
            self._pending = b""
        return b"".join(out)

    def close(self) -> bytes:
        rest, self._pending = self._pending, b""
        if rest:
            self._read(rest)
        return rest if self.strip else b""

    def _read(self, event: bytes) -> bool:
        """Note the event's cached-token count; True if it is a usage-only event."""
        if not _USAGE_OBJECT.search(event):
            return False
        payload = b"".join(line[5:].strip() for line in event.splitlines() if line.startswith(b"data:"))
        try:
            chunk = json.loads(payload)
        except ValueError:
            return False
        if not isinstance(chunk, dict) or not isinstance(chunk.get("usage"), dict):
            return False
        details = chunk["usage"].get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        if isinstance(cached, int) and not isinstance(cached, bool) and cached >= 0:
            self.cached_tokens = cached
        return chunk.get("choices") == []
