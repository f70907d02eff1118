"""What the engine needs from a tokenizer (a Hugging Face fast tokenizer fits)."""

from __future__ import annotations

from typing import Protocol


class Tokenizer(Protocol):
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        ...

    def decode(self, token_ids: list[int], *, skip_special_tokens: bool = False) -> str:
        ...
