"""POST /v1/completions: a raw text (or token id) prompt, no chat template."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from fleetserve_server.api.context import get_context
from fleetserve_server.api.errors import invalid
from fleetserve_server.api.generation import (
    build_sampling_params,
    check_unsupported,
    off_loop,
    openai_finish_reason,
    require_serving,
    start_run,
    vocab_size,
)
from fleetserve_server.api.logprobs import TokenText, completion_logprobs
from fleetserve_server.api.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from fleetserve_server.api.sse import ERROR_RESPONSES, STREAM_200, sse_event, stream_response
from fleetserve_server.api.state import Serving
from fleetserve_server.engine.interfaces import RequestOutputDelta, TokenLogprob

router = APIRouter()


def prompt_token_ids(serving: Serving, prompt: Any) -> list[int]:
    """Token ids of a single prompt (text or ids); a batch of prompts is a 400 (n = 1 per request)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # the SDK wraps single prompts sometimes: ["text"] or [[ids]]
    if isinstance(prompt, str):
        if not prompt:
            raise invalid("prompt is empty; send at least one character", param="prompt")
        return list(serving.tokenizer.encode(prompt, add_special_tokens=True))
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not prompt:
            raise invalid("prompt is an empty token list; send at least one token id", param="prompt")
        vocab = getattr(serving.tokenizer, "vocab_size", None)
        limit = len(serving.tokenizer) if hasattr(serving.tokenizer, "__len__") else vocab
        bad = [t for t in prompt if t < 0 or (limit is not None and t >= limit)]
        if bad:
            raise invalid(f"prompt: token id {bad[0]} is outside the vocabulary [0, {limit})", param="prompt")
        return list(prompt)
    raise invalid("prompt: batched prompts are not supported; send one prompt (a string or a list of "
                  "token ids) per request", param="prompt")


@router.post("/v1/completions", response_model=CompletionResponse,
             responses={**STREAM_200, **ERROR_RESPONSES})
async def create_completion(req: CompletionRequest, request: Request) -> Any:
    ctx = get_context(request)
    serving = require_serving(ctx.state, req.model)
    offending = [name for name, on in (
        ("best_of", req.best_of not in (None, 1)), ("suffix", bool(req.suffix)),
        ("response_format", req.response_format is not None and req.response_format.type != "text"),
    ) if on]
    check_unsupported(req, offending)
    prompt_ids = await off_loop(prompt_token_ids, serving, req.prompt)  # CPU-heavy: not on the event loop
    params = build_sampling_params(req, max_tokens=req.max_tokens, prompt_len=len(prompt_ids),
                                   max_model_len=serving.model.max_model_len, prompt_param="prompt",
                                   defaults=serving.model.default_sampling, vocab_size=vocab_size(serving),
                                   logprobs=req.logprobs,
                                   prompt_logprobs=req.logprobs if req.echo else None)
    token_text = TokenText(serving.tokenizer)
    echo_text = ""
    if req.echo:
        single = req.prompt[0] if isinstance(req.prompt, list) and len(req.prompt) == 1 else req.prompt
        echo_text = single if isinstance(single, str) else serving.tokenizer.decode(prompt_ids)
    top_n = req.logprobs or 0

    def logprobs_of(delta_ids: list[int], entries: list[TokenLogprob] | None, prompt: list[TokenLogprob | None] | None,
                    offset: int) -> CompletionLogprobs | None:
        if req.logprobs is None:
            return None
        ids: list[int] = []
        scored: list[TokenLogprob | None] = []
        if prompt is not None:
            ids.extend(prompt_ids)
            scored.extend(prompt)
        ids.extend(delta_ids)
        scored.extend(entries or [None] * len(delta_ids))
        return completion_logprobs(scored, ids, token_text, top_n=top_n, offset=offset)

    run = await start_run(ctx, request, serving, endpoint="completions", prompt_ids=prompt_ids, params=params,
                          log_prompt=req.prompt if ctx.request_log.log_prompts else None)
    response_id = f"cmpl-{run.engine_id}"
    if req.stream:
        def chunk(choices: list[CompletionChoice], usage: Any = None) -> str:
            body = CompletionResponse(id=response_id, created=run.created, model=serving.model.served_name,
                                      system_fingerprint=serving.model.fingerprint, choices=choices, usage=usage)
            return sse_event(body.model_dump_json())

        emitted = {"chars": 0, "echoed": False}

        def delta_event(delta: RequestOutputDelta) -> str:
            text = delta.text
            prompt_scores = None
            if req.echo and not emitted["echoed"]:
                emitted["echoed"] = True
                text = echo_text + text
                prompt_scores = delta.prompt_logprobs or [None] * len(prompt_ids)
            offset = emitted["chars"]
            emitted["chars"] += len(text)
            return chunk([CompletionChoice(
                text=text, finish_reason=openai_finish_reason(delta.finish_reason),  # type: ignore[arg-type]
                logprobs=logprobs_of(delta.token_ids, delta.logprobs, prompt_scores, offset))])

        return stream_response(run, req.stream_options, delta_event=delta_event,
                               usage_event=lambda usage: chunk([], usage=usage))
    token_ids: list[int] = []
    entries: list[TokenLogprob] = []
    prompt_scores: list[TokenLogprob | None] | None = [None] * len(prompt_ids) if req.echo else None
    async for delta in run.deltas():
        token_ids.extend(delta.token_ids)
        entries.extend(delta.logprobs or ())
        if delta.prompt_logprobs is not None:
            prompt_scores = delta.prompt_logprobs
    return CompletionResponse(
        id=response_id, created=run.created, model=serving.model.served_name,
        system_fingerprint=serving.model.fingerprint,
        choices=[CompletionChoice(text=echo_text + "".join(run.text),
                                  finish_reason=openai_finish_reason(run.finish_reason),  # type: ignore[arg-type]
                                  logprobs=logprobs_of(token_ids, entries or None, prompt_scores, 0))],
        usage=run.usage,
    )
