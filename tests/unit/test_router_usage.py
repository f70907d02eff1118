"""The router's reading of a streamed answer's usage event (router/fleetserve_router/usage.py)."""

from __future__ import annotations

import json

from fleetserve_router.usage import UsageTap, ask_for_usage
from hypothesis import given
from hypothesis import strategies as st


def event(choices: list[object], usage: object = None) -> bytes:
    return b"data: " + json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": choices,
                                   "usage": usage}, separators=(",", ":")).encode() + b"\n\n"


USAGE = {"prompt_tokens": 90, "completion_tokens": 4, "total_tokens": 94, "prompt_tokens_details": {"cached_tokens": 64}}
BODY = [b": queued\n\n", event([{"index": 0, "delta": {"role": "assistant", "content": ""}}]),
        event([{"index": 0, "delta": {"content": "Hi"}}]), b": keep-alive\n\n",
        event([{"index": 0, "delta": {"content": " there"}, "finish_reason": "length"}])]
WITH_USAGE = b"".join([*BODY, event([], USAGE), b"data: [DONE]\n\n"])
WITHOUT_USAGE = b"".join([*BODY, b"data: [DONE]\n\n"])


def relay(tap: UsageTap, data: bytes, cuts: list[int]) -> bytes:
    out, last = [], 0
    for cut in sorted(set(cuts)):
        out.append(tap.feed(data[last:cut]))
        last = cut
    out.append(tap.feed(data[last:]))
    out.append(tap.close())
    return b"".join(out)


@given(st.lists(st.integers(0, len(WITH_USAGE)), max_size=12))
def test_strip_drops_only_the_usage_event_however_the_stream_is_cut(cuts: list[int]) -> None:
    tap = UsageTap(strip=True)
    assert relay(tap, WITH_USAGE, cuts) == WITHOUT_USAGE
    assert tap.cached_tokens == 64


@given(st.lists(st.integers(0, len(WITH_USAGE)), max_size=12))
def test_pass_through_reads_and_keeps_every_byte(cuts: list[int]) -> None:
    tap = UsageTap(strip=False)
    assert relay(tap, WITH_USAGE, cuts) == WITH_USAGE
    assert tap.cached_tokens == 64


def test_crlf_framing_and_no_usage() -> None:
    crlf = WITH_USAGE.replace(b"\n", b"\r\n")
    tap = UsageTap(strip=True)
    assert relay(tap, crlf, [7, 300]) == WITHOUT_USAGE.replace(b"\n", b"\r\n")
    assert tap.cached_tokens == 64
    tap = UsageTap(strip=True)
    assert relay(tap, WITHOUT_USAGE, [5]) == WITHOUT_USAGE and tap.cached_tokens is None
    # a usage event without prompt_tokens_details (vLLM without --enable-prompt-tokens-details): unknown
    bare = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    tap = UsageTap(strip=True)
    assert relay(tap, b"".join([*BODY, event([], bare), b"data: [DONE]\n\n"]), []) == WITHOUT_USAGE
    assert tap.cached_tokens is None


def test_ask_for_usage_only_when_the_client_did_not() -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "héllo"}], "stream": True}
    asked = ask_for_usage("/v1/chat/completions", base)
    assert asked is not None and json.loads(asked) == {**base, "stream_options": {"include_usage": True}}
    assert "héllo" in asked.decode()
    off = {**base, "stream_options": {"include_usage": False, "include_obfuscation": False}}
    assert json.loads(ask_for_usage("/v1/completions", off) or b"")["stream_options"] == {
        "include_usage": True, "include_obfuscation": False}
    assert ask_for_usage("/v1/chat/completions", {**base, "stream_options": {"include_usage": True}}) is None
    assert ask_for_usage("/v1/chat/completions", {**base, "stream": False}) is None
    assert ask_for_usage("/v1/embeddings", base) is None
    # what the router does not understand goes out as sent (the server answers it)
    assert ask_for_usage("/v1/chat/completions", {**base, "stream_options": {"continuous_usage_stats": True}}) is None
    assert ask_for_usage("/v1/chat/completions", {**base, "stream_options": {"include_usage": "yes"}}) is None
    assert ask_for_usage("/v1/chat/completions", {**base, "stream_options": "x"}) is None
    assert ask_for_usage("/v1/chat/completions", {**base, "temperature": float("nan")}) is None
    assert ask_for_usage("/v1/chat/completions", {**base, "messages": [{"role": "user", "content": "\ud800"}]}) is None
    assert ask_for_usage("/v1/chat/completions", [base]) is None
