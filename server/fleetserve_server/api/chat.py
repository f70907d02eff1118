"""POST /v1/chat/completions: the prompt is the tokenizer's chat template over ``messages``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from fleetserve_server.api.choices import start_group
from fleetserve_server.api.context import APIContext, get_context
from fleetserve_server.api.errors import invalid
from fleetserve_server.api.generation import (
    build_sampling_params,
    check_unsupported,
    off_loop,
    openai_finish_reason,
    require_serving,
    vocab_size,
)
from fleetserve_server.api.logprobs import TokenText, chat_logprobs
from fleetserve_server.api.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    DeltaMessage,
)
from fleetserve_server.api.sse import ERROR_RESPONSES, STREAM_200, sse_event, stream_response
from fleetserve_server.api.structured import compile_response_format
from fleetserve_server.engine.interfaces import TokenLogprob

router = APIRouter()


def _message_text(content: str | list[dict[str, Any]] | None, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise invalid(f"messages[{index}].content: only text parts are supported "
                          f"(got type {part.get('type')!r})", param=f"messages.{index}.content")
        parts.append(part["text"])
    return "".join(parts)


def render_chat_prompt(ctx: APIContext, req: ChatCompletionRequest) -> list[int]:
    """Token ids of the chat template applied to the messages, ending with the assistant's turn."""
    serving = require_serving(ctx.state, req.model)
    messages = [{"role": m.role, "content": _message_text(m.content, i)} for i, m in enumerate(req.messages)]
    try:
        text = serving.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja templates raise on roles they do not support
        raise invalid(f"messages: the model's chat template rejected them ({exc})", param="messages") from None
    # The template already holds the special tokens (BOS, role markers).
    return list(serving.tokenizer.encode(text, add_special_tokens=False))


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses={**STREAM_200, **ERROR_RESPONSES})
async def create_chat_completion(req: ChatCompletionRequest, request: Request) -> Any:
    ctx = get_context(request)
    serving = require_serving(ctx.state, req.model)
    offending = [name for name, on in (
        ("tools", bool(req.tools)), ("tool_choice", req.tool_choice not in (None, "none")),
    ) if on]
    check_unsupported(req, offending)
    if req.top_logprobs and not req.logprobs:
        raise invalid("top_logprobs needs logprobs: true", param="top_logprobs")
    prompt_ids = await off_loop(render_chat_prompt, ctx, req)  # CPU-heavy for long chats: not on the loop
    grammar = await compile_response_format(serving, req.response_format)  # off the loop, cached per schema
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = build_sampling_params(req, max_tokens=max_tokens, prompt_len=len(prompt_ids),
                                   max_model_len=serving.model.max_model_len, prompt_param="messages",
                                   defaults=serving.model.default_sampling, vocab_size=vocab_size(serving),
                                   logprobs=(req.top_logprobs or 0) if req.logprobs else None, grammar=grammar)
    token_text = TokenText(serving.tokenizer)

    def logprobs_of(entries: list[TokenLogprob] | None) -> ChatLogprobs | None:
        return chat_logprobs(entries, token_text) if req.logprobs and entries is not None else None

    log_prompt = [m.model_dump() for m in req.messages] if ctx.request_log.keeps_text else None
    n = req.n or 1
    group = await start_group(ctx, request, serving, endpoint="chat", prompts=[prompt_ids], params=[params], n=n,
                              log_prompts=[log_prompt])
    response_id = f"chatcmpl-{group.engine_id}"
    if req.stream:
        def chunk(choices: list[ChatChunkChoice], usage: Any = None) -> str:
            body = ChatCompletionChunk(
                id=response_id, created=group.created, model=serving.model.served_name,
                system_fingerprint=serving.model.fingerprint, choices=choices, usage=usage,
            )
            return sse_event(body.model_dump_json())

        return stream_response(
            group, req.stream_options,  # type: ignore[arg-type]  # RunGroup streams like a GenerationRun
            opening=chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                           for i in range(n)]),
            delta_event=lambda delta: chunk([ChatChunkChoice(
                index=group.index_of(delta), delta=DeltaMessage(content=delta.text),
                finish_reason=openai_finish_reason(delta.finish_reason),  # type: ignore[arg-type]
                logprobs=logprobs_of(delta.logprobs))]),
            usage_event=lambda usage: chunk([], usage=usage),
        )
    entries: list[list[TokenLogprob]] = [[] for _ in group.runs]
    async for delta in group.deltas():
        entries[group.index_of(delta)].extend(delta.logprobs or ())
    return ChatCompletionResponse(
        id=response_id, created=group.created, model=serving.model.served_name,
        system_fingerprint=serving.model.fingerprint,
        choices=[ChatChoice(index=i, message=ChatResponseMessage(content="".join(run.text)),
                            finish_reason=openai_finish_reason(run.finish_reason),  # type: ignore[arg-type]
                            logprobs=logprobs_of(entries[i]))
                 for i, run in enumerate(group.runs)],
        usage=group.usage,
    )
