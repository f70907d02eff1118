"""Structured output (``response_format``): JSON grammars compiled by xgrammar, one matcher per request.

Three objects, three lifetimes:

* ``GrammarCompiler`` — one per served model (vocabulary + stop tokens). It
  checks a schema (``check_schema``: keywords the grammar cannot enforce are
  refused, naming them), compiles it with xgrammar and keeps the compiled
  grammar in xgrammar's own byte-bounded cache, keyed by the canonical schema
  text, so the same schema compiles once. Compiling runs on the API's worker
  thread, never on the event loop or the engine thread.
* ``CompiledJSONGrammar`` — immutable, shared by every request (and every ``n``
  copy) with that schema; it lives in ``SamplingParams.grammar``.
* ``RequestGrammar`` — the per-request matcher (``engine.interfaces.TokenGrammar``),
  made when the engine admits the sequence and dropped when it finishes,
  aborts or fails. The engine advances it with each accepted token
  (``accept``), which also computes the bitmask of the tokens allowed next
  (``next_mask``, int32 ``[1, ceil(vocab / 32)]``) and whether nothing but a stop
  token may follow (``is_complete``: the engine then ends the sequence, "stop").
  The sampler only reads ``next_mask`` (``apply_token_masks``: one bitmask
  tensor per step for the constrained rows, xgrammar's CPU/CUDA kernel), so a
  step the engine runs again, or a preempted sequence being recomputed, finds
  the matcher exactly where its tokens left it: no rollback is ever needed.

Output is compact JSON (``any_whitespace=False``: ``", "`` and ``": "``
separators, no free whitespace), so a model cannot spend its budget on blanks;
``strict_mode`` is on, so objects carry no properties the schema does not name
unless it allows them (``additionalProperties``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import torch
import xgrammar as xgr

from fleetserve_server.engine.errors import GrammarError

# What one compiled-grammar cache may hold (xgrammar evicts the least recently used past it).
CACHE_BYTES = 64 << 20
# Schema limits checked before compiling: nesting depth and size of the canonical text.
MAX_SCHEMA_DEPTH = 32
MAX_SCHEMA_CHARS = 64 * 1024

# Keywords that constrain a value but that xgrammar 0.2 does not enforce (it would emit output the schema
# rejects): refused with a 400 naming them rather than silently ignored.
UNSUPPORTED_KEYWORDS = frozenset({
    "not", "if", "then", "else", "contains", "minContains", "maxContains", "dependentRequired",
    "dependentSchemas", "dependencies", "unevaluatedItems", "$dynamicRef", "$recursiveRef",
})
# Keywords whose value is one subschema / a map of them / a list of them (walked by check_schema).
_SUBSCHEMA = ("items", "additionalProperties", "propertyNames", "additionalItems", "unevaluatedProperties")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
# What a length-bounded string may hold (see _bounded_string): the Basic Multilingual Plane without
# control characters, '"', '\\' and surrogates (emoji are left out), one class per UTF-8 length. xgrammar
# turns a character class into byte ranges per lead byte: a negated class ([^"\\...]) or one range
# across UTF-8 lengths lets it emit overlong or surrogate byte runs, which decode to U+FFFD (strings
# longer than maxLength); the alternation below admits exactly the valid encodings.
_PLAIN_CHAR = ("([ !#-\\[\\]-\\u007f]|[\\u0080-\\u07ff]|[\\u0800-\\u0fff]|[\\u1000-\\ud7ff]"
               "|[\\ue000-\\uffff])")


class GrammarSpecError(ValueError):
    """A ``response_format`` fleetserve cannot enforce; the message names the problem and where."""


def check_schema(schema: Any, path: str = "schema", depth: int = 0) -> Any:
    """Return a copy of ``schema`` that xgrammar enforces exactly, or raise ``GrammarSpecError``.

    Refuses keywords the grammar would ignore (``UNSUPPORTED_KEYWORDS``, ``allOf`` with more
    than one member, ``uniqueItems: true``), nesting deeper than ``MAX_SCHEMA_DEPTH``, and
    non-schema values; rewrites ``minLength``/``maxLength`` into a ``pattern`` of that many plain
    characters (xgrammar's own length-bounded strings admit unescaped control characters, invalid JSON).
    """
    if isinstance(schema, bool):
        return schema
    if not isinstance(schema, dict):
        raise GrammarSpecError(f"{path}: a JSON schema must be an object or a boolean, got {type(schema).__name__}")
    if depth > MAX_SCHEMA_DEPTH:
        raise GrammarSpecError(f"{path}: the schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
    out = dict(schema)
    for key in schema:
        if key in UNSUPPORTED_KEYWORDS:
            raise GrammarSpecError(f"{path}: the keyword {key!r} is not supported by fleetserve's structured output "
                                   f"(it cannot be enforced while decoding); remove it")
    if schema.get("uniqueItems") is True:
        raise GrammarSpecError(f"{path}: 'uniqueItems: true' is not supported (it cannot be enforced while "
                               "decoding); remove it")
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) > 1:
        raise GrammarSpecError(f"{path}: 'allOf' with more than one schema is not supported; merge them into one")
    for key in _SUBSCHEMA:
        if isinstance(schema.get(key), dict | bool) and not (key == "additionalProperties"
                                                             and isinstance(schema[key], bool)):
            out[key] = check_schema(schema[key], f"{path}.{key}", depth + 1)
    for key in _SUBSCHEMA_MAPS:
        value = schema.get(key)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise GrammarSpecError(f"{path}.{key} must be an object mapping names to schemas")
        out[key] = {name: check_schema(sub, f"{path}.{key}.{name}", depth + 1) for name, sub in value.items()}
    for key in _SUBSCHEMA_LISTS:
        value = schema.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or not value:
            raise GrammarSpecError(f"{path}.{key} must be a non-empty array of schemas")
        out[key] = [check_schema(sub, f"{path}.{key}.{i}", depth + 1) for i, sub in enumerate(value)]
    if "minLength" in schema or "maxLength" in schema:
        kind = schema.get("type")
        if isinstance(kind, list) and "string" in kind:
            raise GrammarSpecError(f"{path}: minLength/maxLength with a list of types is not supported; "
                                   "use anyOf with one string schema")
        if kind in ("string", None):
            out = _bounded_string(out, path)
    return out


def _bounded_string(schema: dict[str, Any], path: str) -> dict[str, Any]:
    lo, hi = schema.pop("minLength", 0), schema.pop("maxLength", None)
    for name, value in (("minLength", lo), ("maxLength", hi)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise GrammarSpecError(f"{path}.{name} must be an integer >= 0, got {value!r}")
    if hi is not None and hi < lo:
        raise GrammarSpecError(f"{path}: maxLength ({hi}) is below minLength ({lo}); no string fits")
    if "pattern" in schema or "format" in schema:
        raise GrammarSpecError(f"{path}: minLength/maxLength together with pattern or format is not supported; "
                               "put the length into the pattern")
    schema["pattern"] = f"^{_PLAIN_CHAR}{{{lo},{'' if hi is None else hi}}}$"
    return schema


class GrammarCompiler:
    """Compiles ``response_format`` values for one model's vocabulary; thread-safe (xgrammar's compiler is)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int],
                 cache_bytes: int = CACHE_BYTES) -> None:
        self.vocab_size = int(vocab_size)
        self.stop_token_ids = sorted({int(t) for t in stop_token_ids if 0 <= int(t) < self.vocab_size})
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size,
                                                  stop_token_ids=self.stop_token_ids or None)
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True, cache_limit_bytes=cache_bytes)
        self.mask_width = math.ceil(self.vocab_size / 32)
        # every bit set except the stop tokens': "anything but a stop token may follow" tests against it
        non_stop = torch.full((1, self.mask_width), -1, dtype=torch.int32)
        for t in self.stop_token_ids:
            word = non_stop[0, t // 32].item() & ~(1 << (t % 32)) & 0xFFFF_FFFF
            non_stop[0, t // 32] = word - (1 << 32) if word >= 1 << 31 else word
        self.non_stop_mask = non_stop

    def compile(self, kind: str, schema: Any = None) -> CompiledJSONGrammar:
        """``kind`` "json_object" (any JSON object) or "json_schema" (``schema``); ``GrammarSpecError``
        names what is wrong with a schema. Cached by the canonical schema text."""
        if kind == "json_object":
            schema = {"type": "object"}
        elif kind != "json_schema":
            raise GrammarSpecError(f"type {kind!r} needs no grammar")
        checked = check_schema(schema)
        try:
            # not sort_keys: the order of "properties" is the order the output follows
            text = json.dumps(checked, separators=(",", ":"), allow_nan=False)
        except (ValueError, RecursionError) as exc:
            raise GrammarSpecError(f"schema: not representable as JSON ({exc})") from None
        if len(text) > MAX_SCHEMA_CHARS:
            raise GrammarSpecError(f"schema: {len(text)} characters, more than the {MAX_SCHEMA_CHARS} supported")
        try:
            compiled = self._compiler.compile_json_schema(text, any_whitespace=False, strict_mode=True)
        except Exception as exc:  # noqa: BLE001 - xgrammar raises RuntimeError (and FFI errors) for any schema it refuses
            raise GrammarSpecError(f"schema: {_reason(exc)}") from None
        grammar = CompiledJSONGrammar(compiled, self, text)
        try:
            empty = grammar.matcher().is_complete  # nothing to write but a stop token
        except GrammarError:  # not even a stop token
            empty = True
        if empty:
            raise GrammarSpecError("schema: no JSON value satisfies it")
        return grammar


class CompiledJSONGrammar:
    """A compiled grammar, shared read-only by every request with the same schema."""

    def __init__(self, compiled: Any, compiler: GrammarCompiler, schema_text: str) -> None:
        self.compiled = compiled
        self.compiler = compiler
        self.schema_text = schema_text

    def __repr__(self) -> str:  # what the request log shows under "sampling"
        return f"CompiledJSONGrammar({self.schema_text[:80]!r})"

    def __copy__(self) -> CompiledJSONGrammar:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> CompiledJSONGrammar:
        return self  # immutable and shared (dataclasses.asdict deep-copies SamplingParams' fields)

    def matcher(self) -> RequestGrammar:
        return RequestGrammar(self)


class RequestGrammar:
    """One request's position in its grammar (implements ``engine.interfaces.TokenGrammar``)."""

    __slots__ = ("_matcher", "_non_stop", "next_mask", "is_complete", "num_accepted")

    def __init__(self, grammar: CompiledJSONGrammar) -> None:
        self._matcher = xgr.GrammarMatcher(grammar.compiled)
        self._non_stop = grammar.compiler.non_stop_mask
        self.next_mask = torch.empty((1, grammar.compiler.mask_width), dtype=torch.int32)
        self.is_complete = False
        self.num_accepted = 0
        self._advance()

    def accept(self, token_id: int) -> None:
        """Advance by the token the request just got; ``GrammarError`` if the grammar forbids it."""
        if self.is_complete and self._matcher.is_terminated():
            raise GrammarError(f"token {token_id} came after the end of the response_format grammar")
        if not self._matcher.accept_token(int(token_id)):
            raise GrammarError(f"token {token_id} is not allowed by the response_format grammar at output "
                               f"position {self.num_accepted}")
        self.num_accepted += 1
        self._advance()

    def _advance(self) -> None:
        if self._matcher.is_terminated():  # a stop token was accepted
            self.is_complete = True
            return
        self._matcher.fill_next_token_bitmask(self.next_mask, 0)
        if bool(torch.bitwise_and(self.next_mask, self._non_stop).any()):
            return
        # Nothing but a stop token may follow: the value is complete (or, without even a stop token, stuck).
        if not self._matcher.is_completed():
            raise GrammarError(f"the response_format grammar allows no token after output position "
                               f"{self.num_accepted}")
        self.is_complete = True


def apply_token_masks(logits: torch.Tensor, masks: Sequence[torch.Tensor], rows: Sequence[int]) -> None:
    """Set to -inf, in place, every logit of row ``rows[j]`` whose bit in ``masks[j]`` is 0.

    One int32 bitmask tensor for the step (rows without a grammar allow everything) and one
    call of xgrammar's kernel (C++ on CPU, CUDA/Triton on a GPU): no Python loop over the vocabulary.
    """
    if not rows:
        return
    stacked = torch.cat(list(masks))
    if len(rows) == logits.shape[0] and list(rows) == list(range(logits.shape[0])):
        bitmask = stacked
        indices = None
    else:
        bitmask = torch.full((logits.shape[0], stacked.shape[1]), -1, dtype=torch.int32)
        bitmask[torch.tensor(list(rows))] = stacked
        indices = list(rows)
    if bitmask.device != logits.device:
        bitmask = bitmask.to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=min(logits.shape[-1], bitmask.shape[-1] * 32),
                                    indices=indices)


def _reason(exc: BaseException) -> str:
    """xgrammar's message without its C++ source prefix ("[time] /project/cpp/x.cc:123: ")."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if text.startswith("[") and ": " in text:
        text = text.split(": ", 1)[1]
        if text.startswith("Check failed:") and ": " in text[13:]:
            text = text.rsplit(": ", 1)[1]
    return text
