"""The text a request's prefix is hashed on, cut into fixed-size chunks and hashed with the server's
own chained block hash.

Why characters, not tokens: the router has no model files (its pod pulls no weights and no
tokenizer, and must not import torch), and the index only needs *prefix equality*, not token
counts. Chat templates are prefix-stable across the turns of a conversation (turn k+1's messages
start with turn k's messages and its answer), so a canonical rendering of the messages is too: equal
rendered prefixes mean equal template prefixes, hence equal token prefixes on the server. A chunk of
``chunk_chars`` characters stands for roughly ``chunk_chars / 4`` tokens (English text), so the
default 64 characters is about one 16-token KV block. The chaining is
``fleetserve_server.engine.block_manager.hash_block`` fed with the chunk's code points: equal
hashes mean equal whole prefixes, exactly as on the server.

Hashing is the router's largest cost per request after HTTP itself, so ``ChunkHasher`` remembers
recent (parent hash, chunk) pairs: a shared system prompt or an earlier turn is hashed once, not
on every request; new text is hashed in one pass over its code points.
"""

from __future__ import annotations

import json
import sys
from array import array
from typing import Any

from fleetserve_server.engine.block_manager import hash_block, hash_block_bytes

# English text runs about 4 characters a token: the router's estimate of a chunk's tokens.
CHARS_PER_TOKEN = 4

# Separators that cannot be confused with message text (C0 controls are rare in prompts, and a
# collision only costs a wrong guess that the server's ground truth then corrects).
_ROLE_START = "\x02"
_MESSAGE_END = "\x03"


def render_chat(model: str, messages: list[Any]) -> str:
    """A canonical rendering of chat messages with no generation prompt at the end, so that the next
    turn's rendering (which adds the answer and a new user message) extends this one."""
    parts = [model, "\x1d"]
    for message in messages:
        if not isinstance(message, dict):
            return ""
        content = message.get("content")
        if isinstance(content, list):  # text parts, as the server joins them
            content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        elif not isinstance(content, str):
            content = "" if content is None else json.dumps(content, sort_keys=True)
        parts.append(f"{_ROLE_START}{message.get('role', '')}\x1f{content}{_MESSAGE_END}")
    return "".join(parts)


def render_request(path: str, body: Any) -> str:
    """The prefix text of an OpenAI request body ('' when it has none the index can use)."""
    if not isinstance(body, dict):
        return ""
    model = str(body.get("model") or "")
    if path.endswith("/chat/completions"):
        messages = body.get("messages")
        return render_chat(model, messages) if isinstance(messages, list) else ""
    if path.endswith("/completions"):
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return f"{model}\x1d{prompt}"
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return f"{model}\x1e" + ",".join(str(t) for t in prompt)
    return ""


def chunk_hashes(text: str, chunk_chars: int, parent: bytes | None = None) -> list[bytes]:
    """Chained hashes of the text's full ``chunk_chars``-character chunks (the partial tail is not
    hashed, like the server's partial last block), the first chained to ``parent``."""
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be >= 1, got {chunk_chars}")
    full = len(text) // chunk_chars * chunk_chars
    if full == 0:
        return []
    if sys.byteorder != "little":  # the one-pass layout below is hash_block's on little-endian hosts
        hashes: list[bytes] = []
        for start in range(0, full, chunk_chars):
            parent = hash_block(parent, [ord(c) for c in text[start : start + chunk_chars]])
            hashes.append(parent)
        return hashes
    # hash_block hashes each code point as a native int64 ("q"): lay all of them out at once
    # (UTF-32 code units into the low halves of zeroed 8-byte slots), then hash slice by slice.
    codes = array("I")
    codes.frombytes(text[:full].encode("utf-32-le", "surrogatepass"))  # JSON may carry lone surrogates
    wide = bytearray(8 * full)
    memoryview(wide).cast("I")[0::2] = codes
    view = memoryview(wide)
    step = 8 * chunk_chars
    hashes = []
    for start in range(0, 8 * full, step):
        parent = hash_block_bytes(parent, view[start : start + step])
        hashes.append(parent)
    return hashes


class ChunkHasher:
    """``chunk_hashes`` with a memo of recent ``(parent hash, chunk text) -> hash`` pairs.

    Invariants: ``hashes(text) == chunk_hashes(text, chunk_chars)`` for every text; the memo holds at
    most ``max_entries`` pairs, the oldest inserted dropped first (~300 bytes each).
    """

    def __init__(self, chunk_chars: int, max_entries: int = 32768) -> None:
        if chunk_chars < 1:
            raise ValueError(f"chunk_chars must be >= 1, got {chunk_chars}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.chunk_chars = chunk_chars
        self.max_entries = max_entries
        self._memo: dict[tuple[bytes | None, str], bytes] = {}

    def __len__(self) -> int:
        return len(self._memo)

    def hashes(self, text: str) -> list[bytes]:
        n = self.chunk_chars
        memo = self._memo
        out: list[bytes] = []
        parent: bytes | None = None
        for start in range(0, len(text) - n + 1, n):
            chunk = text[start : start + n]
            known = memo.get((parent, chunk))
            if known is None:
                # a chunk not seen after this parent: the rest of the text is new as well
                rest = chunk_hashes(text[start:], n, parent)
                for i, h in enumerate(rest):
                    memo[(parent, text[start + i * n : start + (i + 1) * n])] = h
                    parent = h
                while len(memo) > self.max_entries:
                    del memo[next(iter(memo))]
                out.extend(rest)
                return out
            out.append(known)
            parent = known
        return out
