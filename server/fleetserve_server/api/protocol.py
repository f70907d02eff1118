"""Request and response models of the OpenAI-compatible API (the OpenAPI schema comes from here).

Every sampling field is bounded here (a 400 naming the field) and again in
``SamplingParams``. Unknown fields, and known ones fleetserve does not
implement, are a 400 naming the field instead of a silent default; fields the
OpenAI SDK sends as bookkeeping (``HARMLESS_FIELDS``: ``user``, ``metadata``,
``store``, ...) are accepted and ignored.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# --- errors ---------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorInfo


# --- requests -------------------------------------------------------------

# Bounds, checked here (a 400 naming the field) and again by SamplingParams.
MAX_SEED = 2**63  # exclusive: what torch.Generator.manual_seed accepts
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 1024
MAX_LOGPROBS = 20
MAX_N = 16
_INT32_MAX = 2**31 - 1

# Fields the OpenAI SDK and frameworks send as bookkeeping that do not change
# what is generated: accepted and ignored. Any other field fleetserve does not
# know is a 400 naming it (a silently ignored parameter is a wrong answer).
HARMLESS_FIELDS = frozenset({
    "user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier",
    "parallel_tool_calls",  # only means something with `tools`, which is rejected
})


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    include_obfuscation: bool | None = Field(None, description="accepted and ignored (no obfuscation padding)")


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field("response", max_length=256)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="a JSON Schema object")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """``{"type": "text"}``, ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {...}}``."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class _SamplingFields(BaseModel):
    """Fields common to chat and text completions.

    Unknown fields are rejected (``HARMLESS_FIELDS`` are declared, accepted and ignored).
    """

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="the served model name (see GET /v1/models)")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate at most (default: up to the "
                                                            "context limit)")
    temperature: float | None = Field(None, ge=0, le=1e4, allow_inf_nan=False,
                                      description="0 = greedy; default from the model's generation_config, else 1")
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False, description="nucleus sampling mass in (0, 1]")
    top_k: int | None = Field(None, ge=-1, le=_INT32_MAX,
                              description="sample from the k most likely tokens; 0 or -1 disables")
    min_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False,
                                description="drop tokens less likely than min_p x the most likely one")
    seed: int | None = Field(None, ge=0, lt=MAX_SEED, description="makes sampling reproducible; in [0, 2^63)")
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP_STRINGS} strings that end "
                                                           "generation (not returned)")
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS,
                                             description="token ids that end generation (not returned)")
    n: int | None = Field(None, ge=1, le=MAX_N, description=f"number of choices (1..{MAX_N})")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = Field(None, description="keep generating past the end-of-sequence token")
    min_tokens: int | None = Field(None, ge=0, le=_INT32_MAX,
                                   description="tokens generated before EOS or stop_token_ids may end it")
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, gt=0, le=100, allow_inf_nan=False,
                                             description="HF/vLLM-style multiplicative penalty; 1 disables")
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_LOGIT_BIAS,
                                                description="token id (as a string) -> bias in [-100, 100]")
    # HARMLESS_FIELDS: bookkeeping, accepted and ignored
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else (value or [])
        if len(items) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(items)}")
        for item in items:
            if not item:
                raise ValueError("stop strings must be non-empty")
            if len(item) > MAX_STOP_STRING_CHARS:
                raise ValueError(f"a stop string has at most {MAX_STOP_STRING_CHARS} characters, got {len(item)}")
        return value

    @field_validator("stop_token_ids")
    @classmethod
    def _non_negative_ids(cls, value: list[int] | None) -> list[int] | None:
        if value and any(t < 0 or t > _INT32_MAX for t in value):
            raise ValueError("stop_token_ids must be token ids >= 0")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.isdigit() or int(key) > _INT32_MAX:
                raise ValueError(f"keys are token ids as decimal strings, got {key[:32]!r}")
            if not (math.isfinite(bias) and -100 <= bias <= 100):
                raise ValueError(f"biases are in [-100, 100], got {bias!r} for token {key}")
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    # OpenAI also allows a list of content parts; only text parts are supported.
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="alias of max_tokens (newer SDKs send this)")
    logprobs: bool | None = Field(None, description="return the log-probability of each output token")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                     description=f"with logprobs: up to {MAX_LOGPROBS} most likely alternatives")
    tools: list[dict[str, Any]] | None = Field(None, description="not supported")
    tool_choice: str | dict[str, Any] | None = Field(None, description="only 'none' is supported")
    response_format: ResponseFormat | None = Field(None, description="text, json_object or json_schema")


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        description="the prompt: text, token ids, or a batch of either"
    )
    echo: bool | None = Field(None, description="prepend the prompt to the completion")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description=f"log-probabilities of the chosen and up to {MAX_LOGPROBS} top tokens")
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="only equal to n is supported")
    suffix: str | None = Field(None, description="not supported")
    response_format: ResponseFormat | None = Field(None, description="text, json_object or json_schema")


# --- responses ------------------------------------------------------------


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None


# OpenAI's values only; an aborted or failed request is an error, not a finish reason.
FinishReasonField = Literal["stop", "length"] | None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    """``choices[i].logprobs`` of a chat completion: one entry per generated token."""

    content: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    """``choices[i].logprobs`` of a text completion (with ``echo``, the prompt's tokens come first;
    the first prompt token has no logprob: nothing predicts it)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    finish_reason: FinishReasonField
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: FinishReasonField = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    """One SSE event of a streamed chat completion (``data: {...}``)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReasonField
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    """A text completion; streamed chunks share this shape (``object`` stays ``text_completion``)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "fleetserve"
    max_model_len: int | None = None
    root: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthStatus(BaseModel):
    status: str
    detail: str | None = None
