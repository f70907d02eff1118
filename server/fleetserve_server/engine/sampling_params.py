"""Per-request sampling parameters, validated when they are made."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MAX_SEED = 2**63  # exclusive bound: torch.Generator.manual_seed rejects larger values
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 1024
# Below this temperature logits / T overflows float32 for ordinary logits; treat it as greedy (as vLLM does).
GREEDY_EPSILON = 1e-5


def _finite(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


@dataclass(frozen=True)
class SamplingParams:
    """What to generate for one request.

    ``temperature == 0`` (or below ``GREEDY_EPSILON``) means greedy. ``seed``
    makes sampling reproducible and independent of whatever else shares the
    batch. ``stop`` strings are matched on the detokenized output and are not
    part of the returned text; ``stop_token_ids`` end generation like EOS.
    ``min_tokens`` holds EOS and ``stop_token_ids`` back until that many tokens
    exist. Penalties follow OpenAI (presence, frequency: additive, over the
    generated tokens) and HF/vLLM (repetition: multiplicative, over prompt and
    output). ``logit_bias`` is ``((token_id, bias), ...)``. ``logprobs`` asks
    for the chosen token's log-probability plus that many alternatives (None:
    off); ``prompt_logprobs`` the same for every prompt position.
    ``grammar`` (``response_format``) is a compiled grammar with a ``matcher()``
    method (``runner.grammar.CompiledJSONGrammar``): each sequence gets its own
    matcher, the sampler masks every token the grammar forbids, and the sequence
    ends ("stop") once the grammar is complete.
    Invalid values raise ``ValueError`` naming the field and the limit.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1, normalized to 0) = disabled
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    grammar: Any = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.stop_token_ids, tuple):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if isinstance(self.logit_bias, Mapping):
            object.__setattr__(self, "logit_bias", tuple((int(k), float(v)) for k, v in self.logit_bias.items()))
        elif not isinstance(self.logit_bias, tuple):
            object.__setattr__(self, "logit_bias", tuple(self.logit_bias))
        if _int("max_tokens", self.max_tokens) < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if _finite("temperature", self.temperature) < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not (0.0 < _finite("top_p", self.top_p) <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if _int("top_k", self.top_k) < -1:
            raise ValueError(f"top_k must be an integer >= -1 (0 or -1 disables it), got {self.top_k!r}")
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        if not (0.0 <= _finite("min_p", self.min_p) <= 1.0):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and not (0 <= _int("seed", self.seed) < MAX_SEED):
            raise ValueError(f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        self._check_stops()
        if _int("min_tokens", self.min_tokens) < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be at most max_tokens ({self.max_tokens})")
        for name in ("presence_penalty", "frequency_penalty"):
            if not (-2.0 <= _finite(name, getattr(self, name)) <= 2.0):
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not (0.0 < _finite("repetition_penalty", self.repetition_penalty) <= 100.0):
            raise ValueError(f"repetition_penalty must be in (0, 100] (1 disables it), got {self.repetition_penalty!r}")
        self._check_logit_bias()
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not (0 <= _int(name, value) <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {value!r}")
        if self.grammar is not None and not callable(getattr(self.grammar, "matcher", None)):
            raise ValueError(f"grammar must be a compiled grammar with a matcher() method, got "
                             f"{type(self.grammar).__name__}")

    def _check_stops(self) -> None:
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop: at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be integers >= 0")

    def _check_logit_bias(self) -> None:
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias: at most {MAX_LOGIT_BIAS} entries, got {len(self.logit_bias)}")
        for token, bias in self.logit_bias:
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise ValueError(f"logit_bias keys must be token ids >= 0, got {token!r}")
            if not (-100.0 <= _finite("logit_bias", bias) <= 100.0):
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPSILON

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def needs_logits_processing(self) -> bool:
        """True when the logits change before the greedy/sampled pick (penalties, bias, min_tokens)."""
        return self.has_penalties or bool(self.logit_bias) or self.min_tokens > 0
