"""``response_format``: checked and compiled before the engine sees the request.

``{"type": "text"}`` (or no field) needs nothing. ``json_object`` and
``json_schema`` are compiled by the model's ``runner.grammar.GrammarCompiler``
on a worker thread (never on the event loop; cached per schema), and any
problem with them is a 400 with ``param: "response_format"`` naming it.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fleetserve_server.api.errors import invalid
from fleetserve_server.api.protocol import ResponseFormat
from fleetserve_server.api.state import Serving

PARAM = "response_format"

# One thread: a schema compiles in milliseconds (cached ones in microseconds), and a slow one must
# not delay tokenization, which has its own thread.
_GRAMMAR_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleetserve-grammar")
# id(serving) -> (a weak reference to it, its compiler); one entry per loaded model (Serving is unhashable)
_COMPILERS: dict[int, tuple[weakref.ref[Serving], Any]] = {}
_COMPILERS_LOCK = threading.Lock()


def grammar_compiler(serving: Serving) -> Any:
    """The served model's ``GrammarCompiler`` (made on first use): its vocabulary and stop tokens
    are the runner's, so masks line up with the logits."""
    from fleetserve_server.runner.grammar import GrammarCompiler  # torch + xgrammar: only when asked

    with _COMPILERS_LOCK:
        entry = _COMPILERS.get(id(serving))
        compiler = entry[1] if entry is not None and entry[0]() is serving else None
        if compiler is None:
            engine = getattr(serving.engine, "engine", None)  # AsyncEngine wraps the LLMEngine
            runner = getattr(engine, "runner", None)
            tokenizer: Any = serving.tokenizer
            vocab = getattr(engine, "vocab_size", None) or len(tokenizer)
            stops = set(getattr(runner, "eos_token_ids", ()) or ())
            if not stops and getattr(tokenizer, "eos_token_id", None) is not None:
                stops = {tokenizer.eos_token_id}
            compiler = GrammarCompiler(tokenizer, vocab, sorted(stops))
            for key in [k for k, (ref, _) in _COMPILERS.items() if ref() is None]:
                del _COMPILERS[key]
            _COMPILERS[id(serving)] = (weakref.ref(serving), compiler)
        return compiler


def _compile(serving: Serving, kind: str, schema: Any) -> Any:
    from fleetserve_server.runner.grammar import GrammarSpecError

    try:
        return grammar_compiler(serving).compile(kind, schema)
    except GrammarSpecError as exc:
        raise invalid(f"response_format.json_schema.{exc}" if kind == "json_schema"
                      else f"response_format: {exc}", param=PARAM) from None


async def compile_response_format(serving: Serving, response_format: ResponseFormat | None) -> Any:
    """The compiled grammar for ``SamplingParams.grammar``, or None for plain text; 400s name the problem."""
    if response_format is None or response_format.type == "text":
        if response_format is not None and response_format.json_schema is not None:
            raise invalid("response_format: json_schema is only allowed with type 'json_schema'", param=PARAM)
        return None
    if response_format.type == "json_object":
        if response_format.json_schema is not None:
            raise invalid("response_format: json_schema is only allowed with type 'json_schema'", param=PARAM)
        schema = None
    else:
        spec = response_format.json_schema
        if spec is None or spec.schema_ is None:
            raise invalid("response_format: type 'json_schema' needs json_schema.schema (a JSON Schema object)",
                          param=PARAM)
        schema = spec.schema_
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_GRAMMAR_POOL, functools.partial(_compile, serving, response_format.type,
                                                                       schema))
