"""The engine's ``TokenLogprob`` entries in OpenAI's two shapes (chat and text completions).

Token strings are each token decoded on its own (as vLLM reports them); a
token that is part of a multi-byte character decodes to U+FFFD, and chat's
``bytes`` field carries the UTF-8 of that string.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from fleetserve_server.api.protocol import ChatLogprobs, ChatTokenLogprob, ChatTopLogprob, CompletionLogprobs
from fleetserve_server.engine.interfaces import TokenLogprob


class TokenText:
    """Decodes single tokens, memoized (the same ids recur across tokens and top lists)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text


def _finite(value: float) -> float:
    # -inf (a token the model gives no mass in float32) is not JSON; report the float32 floor
    return value if math.isfinite(value) else -9999.0


def chat_logprobs(entries: Sequence[TokenLogprob], text: TokenText) -> ChatLogprobs:
    content = []
    for e in entries:
        token = text(e.token_id)
        content.append(ChatTokenLogprob(
            token=token, logprob=_finite(e.logprob), bytes=list(token.encode()),
            top_logprobs=[ChatTopLogprob(token=text(t), logprob=_finite(lp), bytes=list(text(t).encode()))
                          for t, lp in e.top],
        ))
    return ChatLogprobs(content=content)


def completion_logprobs(entries: Sequence[TokenLogprob | None], token_ids: Sequence[int], text: TokenText,
                        *, top_n: int, offset: int = 0) -> CompletionLogprobs:
    """``entries[i]`` scores ``token_ids[i]`` (None: the first prompt token); ``offset`` is where
    the first token's text starts in the returned text."""
    out = CompletionLogprobs()
    for token_id, e in zip(token_ids, entries, strict=True):
        token = text(token_id)
        out.tokens.append(token)
        out.text_offset.append(offset)
        offset += len(token)
        if e is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(_finite(e.logprob))
        top: dict[str, float] = {}
        for t, lp in e.top[:top_n]:
            top.setdefault(text(t), _finite(lp))
        if top_n:
            top.setdefault(token, _finite(e.logprob))  # the chosen token too, as vLLM reports it
        out.top_logprobs.append(top if top_n else None)
    return out
