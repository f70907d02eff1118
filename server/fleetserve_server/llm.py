"""The offline API, vLLM-shaped: ``LLM(...).generate(prompts, params)`` and ``.chat``.

    from fleetserve_server import LLM, SamplingParams
    llm = LLM()                                   # builtin:smollm2-135m-instruct
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=16, temperature=0))
    out[0].outputs[0].text

All prompts go into one continuously batched engine at once; results come
back in prompt order. Invalid input raises ``ValueError`` naming the field
before any request is queued, so one bad prompt never half-runs a batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from fleetserve_server.engine.interfaces import CompletionOutput, RequestOutput
from fleetserve_server.engine.sampling_params import SamplingParams
from fleetserve_server.runner.builtin import DEFAULT_MODEL
from fleetserve_server.runner.factory import LoadedEngine, create_engine

__all__ = ["LLM", "LoadedEngine", "SamplingParams", "create_engine"]

Prompt = str | Sequence[int]
Message = dict[str, str]


class LLM:
    """A model with a continuously batched engine over a paged KV cache.

    ``LLM(model, **engine_args)``: the keyword arguments and their defaults are
    ``create_engine``'s (the options of ``fleetserve serve``: ``quantization``,
    ``dtype``, ``max_model_len``, ``kv_cache_tokens``, ...), so the offline API
    and the server build their engines one way. ``seed`` seeds the sampling of
    requests that do not carry their own seed.
    """

    def __init__(self, model: str = DEFAULT_MODEL, **engine_args: Any) -> None:
        self.loaded: LoadedEngine = create_engine(model, **engine_args)
        self.engine = self.loaded.engine
        self.tokenizer = self.loaded.tokenizer
        self._ids = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs in prompt order."""
        prompt_list = _as_prompt_list(prompts)
        param_list = _as_param_list(params, len(prompt_list))
        encoded: list[tuple[str | None, str | list[int]]] = []
        for i, prompt in enumerate(prompt_list):
            if isinstance(prompt, str):
                if not prompt:
                    raise ValueError(f"prompts[{i}] is empty; a prompt needs at least one token")
                encoded.append((prompt, prompt))
            else:
                ids = list(prompt)
                if not ids:
                    raise ValueError(f"prompts[{i}] is empty; a prompt needs at least one token")
                if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                    raise ValueError(f"prompts[{i}] must be a string or a list of int token ids")
                encoded.append((None, ids))
        return self._run(encoded, param_list, use_tqdm)

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them (chat template applied)."""
        if not messages:
            raise ValueError("messages is empty; pass a list of {'role', 'content'} dicts")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("this model's tokenizer has no chat template; use generate() with a plain prompt")
        prompts: list[str] = []
        for ci, conv in enumerate(conversations):
            for mi, m in enumerate(conv):
                if not isinstance(m, dict) or "role" not in m or "content" not in m:
                    raise ValueError(f"messages[{ci}][{mi}] must be a dict with 'role' and 'content'")
            prompts.append(self.tokenizer.apply_chat_template(list(conv), tokenize=False, add_generation_prompt=True))
        param_list = _as_param_list(params, len(prompts))
        encoded = [(p, self.tokenizer.encode(p, add_special_tokens=False)) for p in prompts]
        return self._run(encoded, param_list, use_tqdm)  # type: ignore[arg-type]

    def _run(self, encoded: list[tuple[str | None, str | list[int]]], params: list[SamplingParams],
             use_tqdm: bool) -> list[RequestOutput]:
        from tqdm.auto import tqdm

        engine = self.engine
        request_ids = [f"offline-{next(self._ids)}" for _ in encoded]
        # Validate every request before queueing any: a bad one must not half-run the batch.
        seqs = []
        for i, (rid, (_, prompt), p) in enumerate(zip(request_ids, encoded, params, strict=True)):
            try:
                seqs.append(engine.make_sequence(rid, prompt, p))
            except ValueError as exc:
                exc.args = (f"prompts[{i}]: {exc}",)  # keep the type (and .param), name the prompt
                raise
        outputs: dict[str, RequestOutput] = {}
        for rid, (text, _), seq in zip(request_ids, encoded, seqs, strict=True):
            engine.add_sequence(seq)
            outputs[rid] = RequestOutput(
                request_id=rid, prompt=text, prompt_token_ids=list(seq.token_ids),
                outputs=[CompletionOutput(index=0, text="", token_ids=[], finish_reason=None)], finished=False,
            )
        with tqdm(total=len(request_ids), desc="generating", disable=not use_tqdm, unit="req") as bar:
            while engine.has_unfinished():
                for delta in engine.step():
                    out = outputs.get(delta.request_id)
                    if out is None:
                        continue
                    comp = out.outputs[0]
                    comp.text += delta.text
                    comp.token_ids.extend(delta.token_ids)
                    if delta.finish_reason is not None:
                        comp.finish_reason = delta.finish_reason
                        out.finished = True
                        out.num_cached_tokens = delta.cached_prompt_tokens
                        bar.update()
        return [outputs[rid] for rid in request_ids]


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a string, a list of strings or a list of token-id lists (non-empty)")
    if all(isinstance(t, int) for t in prompts):
        return [list(prompts)]  # type: ignore[arg-type]
    return list(prompts)  # type: ignore[arg-type]


def _as_param_list(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    plist = list(params)
    if len(plist) != n:
        raise ValueError(f"params has {len(plist)} entries but there are {n} prompts; pass one per prompt or one")
    if not all(isinstance(p, SamplingParams) for p in plist):
        raise ValueError("params must be SamplingParams or a list of them")
    return plist
