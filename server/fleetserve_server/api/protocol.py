"""Request and response models of the OpenAI-compatible API (the OpenAPI schema comes from here).

Fields fleetserve accepts but does not implement are declared so that a
request using them gets a 400 naming the field instead of a silent default;
fields the OpenAI SDK sends as bookkeeping (``user``, ``metadata``, ``store``)
are accepted and ignored.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

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


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields common to chat and text completions."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="the served model name (see GET /v1/models)")
    max_tokens: int | None = Field(None, description="tokens to generate at most (default: up to the context limit)")
    temperature: float | None = Field(None, description="0 = greedy; default 1.0")
    top_p: float | None = Field(None, description="nucleus sampling mass in (0, 1]")
    top_k: int | None = Field(None, description="sample from the k most likely tokens; 0 or -1 disables")
    seed: int | None = Field(None, description="makes sampling reproducible")
    stop: str | list[str] | None = Field(None, description="up to 4 strings that end generation (not returned)")
    n: int | None = Field(None, description="number of choices; only 1 is supported")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = Field(None, description="keep generating past the end-of-sequence token")
    presence_penalty: float | None = Field(None, description="only 0 is supported")
    frequency_penalty: float | None = Field(None, description="only 0 is supported")
    logit_bias: dict[str, float] | None = Field(None, description="not supported (must be empty)")
    user: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    # OpenAI also allows a list of content parts; only text parts are supported.
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, description="alias of max_tokens (newer SDKs send this)")
    logprobs: bool | None = Field(None, description="not supported")
    top_logprobs: int | None = Field(None, description="not supported")
    tools: list[dict[str, Any]] | None = Field(None, description="not supported")
    response_format: dict[str, Any] | None = Field(None, description="only {'type': 'text'} is supported")


class CompletionRequest(_SamplingFields):
    # A batch of prompts (a list of strings or of token lists) is not supported: n = 1 per request.
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        description="the prompt as text or token ids (a single prompt)"
    )
    echo: bool | None = Field(None, description="not supported")
    logprobs: int | None = Field(None, description="not supported")
    best_of: int | None = Field(None, description="only 1 is supported")
    suffix: str | None = Field(None, description="not supported")


# --- responses ------------------------------------------------------------


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None


FinishReasonField = Literal["stop", "length", "abort", "error"] | None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    finish_reason: FinishReasonField
    logprobs: None = None


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
    logprobs: None = None


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
    logprobs: None = None


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
