"""POST /v1/completions: a raw text (or token id) prompt, no chat template."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from fleetserve_server.api.choices import start_group
from fleetserve_server.api.context import get_context
from fleetserve_server.api.errors import invalid
from fleetserve_server.api.generation import (
    build_sampling_params,
    check_unsupported,
    off_loop,
    openai_finish_reason,
    require_serving,
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
from fleetserve_server.api.structured import compile_response_format
from fleetserve_server.engine.interfaces import RequestOutputDelta, TokenLogprob

router = APIRouter()


MAX_BATCH_PROMPTS = 64  # prompts in one /v1/completions request (each may have n copies)


def split_prompts(prompt: Any) -> list[str | list[int]]:
    """The request's prompts: one string, one token list, or a batch of either."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        if len(prompt) > MAX_BATCH_PROMPTS:
            raise invalid(f"prompt: at most {MAX_BATCH_PROMPTS} prompts per request, got {len(prompt)}",
                          param="prompt")
        return list(prompt)
    return [prompt]  # token ids (or an empty list: prompt_token_ids names the problem)


def prompt_token_ids(serving: Serving, prompt: Any) -> list[int]:
    """Token ids of a single prompt (text or ids)."""
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
    raise invalid("prompt must be a string, a list of token ids, or a list of either", param="prompt")


@router.post("/v1/completions", response_model=CompletionResponse,
             responses={**STREAM_200, **ERROR_RESPONSES})
async def create_completion(req: CompletionRequest, request: Request) -> Any:
    ctx = get_context(request)
    serving = require_serving(ctx.state, req.model)
    n = req.n or 1
    offending = [name for name, on in (
        ("best_of", req.best_of not in (None, n)), ("suffix", bool(req.suffix)),
    ) if on]
    check_unsupported(req, offending)
    prompts = split_prompts(req.prompt)
    grammar = await compile_response_format(serving, req.response_format)  # off the loop, cached per schema
    prompt_ids: list[list[int]] = [await off_loop(prompt_token_ids, serving, p) for p in prompts]  # CPU-heavy
    params = [build_sampling_params(req, max_tokens=req.max_tokens, prompt_len=len(ids),
                                    max_model_len=serving.model.max_model_len, prompt_param="prompt",
                                    defaults=serving.model.default_sampling, vocab_size=vocab_size(serving),
                                    logprobs=req.logprobs, prompt_logprobs=req.logprobs if req.echo else None,
                                    grammar=grammar)
              for ids in prompt_ids]
    token_text = TokenText(serving.tokenizer)
    echo_texts = [(p if isinstance(p, str) else serving.tokenizer.decode(ids)) if req.echo else ""
                  for p, ids in zip(prompts, prompt_ids, strict=True)]
    top_n = req.logprobs or 0

    def logprobs_of(prompt: int, delta_ids: list[int], entries: list[TokenLogprob] | None,
                    prompt_scores: list[TokenLogprob | None] | None, offset: int) -> CompletionLogprobs | None:
        if req.logprobs is None:
            return None
        ids: list[int] = []
        scored: list[TokenLogprob | None] = []
        if prompt_scores is not None:
            ids.extend(prompt_ids[prompt])
            scored.extend(prompt_scores)
        ids.extend(delta_ids)
        scored.extend(entries or [None] * len(delta_ids))
        return completion_logprobs(scored, ids, token_text, top_n=top_n, offset=offset)

    log_prompts = [p if ctx.request_log.keeps_text else None for p in prompts]
    group = await start_group(ctx, request, serving, endpoint="completions", prompts=prompt_ids, params=params,
                              n=n, log_prompts=log_prompts)
    response_id = f"cmpl-{group.engine_id}"
    if req.stream:
        def chunk(choices: list[CompletionChoice], usage: Any = None) -> str:
            body = CompletionResponse(id=response_id, created=group.created, model=serving.model.served_name,
                                      system_fingerprint=serving.model.fingerprint, choices=choices, usage=usage)
            return sse_event(body.model_dump_json())

        chars = [0] * len(group.runs)
        echoed = [False] * len(group.runs)

        def delta_event(delta: RequestOutputDelta) -> str:
            index = group.index_of(delta)
            prompt = index // n
            text = delta.text
            prompt_scores = None
            if req.echo and not echoed[index]:
                echoed[index] = True
                text = echo_texts[prompt] + text
                prompt_scores = delta.prompt_logprobs or [None] * len(prompt_ids[prompt])
            offset = chars[index]
            chars[index] += len(text)
            return chunk([CompletionChoice(
                index=index, text=text, finish_reason=openai_finish_reason(delta.finish_reason),  # type: ignore[arg-type]
                logprobs=logprobs_of(prompt, delta.token_ids, delta.logprobs, prompt_scores, offset))])

        return stream_response(group, req.stream_options, delta_event=delta_event,  # type: ignore[arg-type]
                               usage_event=lambda usage: chunk([], usage=usage))
    token_ids: list[list[int]] = [[] for _ in group.runs]
    entries: list[list[TokenLogprob]] = [[] for _ in group.runs]
    scores: list[list[TokenLogprob | None] | None] = [
        [None] * len(prompt_ids[i // n]) if req.echo else None for i in range(len(group.runs))]
    async for delta in group.deltas():
        index = group.index_of(delta)
        token_ids[index].extend(delta.token_ids)
        entries[index].extend(delta.logprobs or ())
        if delta.prompt_logprobs is not None:
            scores[index] = delta.prompt_logprobs
    return CompletionResponse(
        id=response_id, created=group.created, model=serving.model.served_name,
        system_fingerprint=serving.model.fingerprint,
        choices=[CompletionChoice(index=i, text=echo_texts[i // n] + "".join(run.text),
                                  finish_reason=openai_finish_reason(run.finish_reason),  # type: ignore[arg-type]
                                  logprobs=logprobs_of(i // n, token_ids[i], entries[i] or None, scores[i], 0))
                 for i, run in enumerate(group.runs)],
        usage=group.usage,
    )
