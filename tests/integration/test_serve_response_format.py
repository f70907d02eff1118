"""response_format (json_object, json_schema) through the official openai SDK against a real `fleetserve serve`.

The model is the tiny random one: it emits garbage, so only the grammar makes the output JSON. Schemas
here bound every string, number and array, so a compact answer has at most ``worst_case_tokens``
tokens (one byte per token in the test tokenizer): with that many tokens the request must end with
``finish_reason: "stop"`` and the text must parse and validate. An unbounded ``json_object`` may run
out of tokens, and then it must say so (``"length"``, exactly ``max_tokens`` tokens).
"""

from __future__ import annotations

import json
import string
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from fleetserve_server.bench.launch import ServerProcess
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_util import MODEL, metric, server, server_factory, tiny_model, wait_for  # noqa: F401 - fixtures

jsonschema = pytest.importorskip("jsonschema")


def client(proc: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=proc.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


def schema_format(schema: dict[str, Any], name: str = "answer") -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


# ---- bounded schemas and their longest compact answer -----------------------------------------------------

def worst_case_tokens(schema: dict[str, Any]) -> int:
    """Bytes of the longest compact JSON value ``schema`` admits (", " and ": " separators, as served)."""
    if "enum" in schema:
        return max(len(json.dumps(v, ensure_ascii=False).encode()) for v in schema["enum"])
    if "const" in schema:
        return len(json.dumps(schema["const"], ensure_ascii=False).encode())
    if "anyOf" in schema:
        return max(worst_case_tokens(s) for s in schema["anyOf"])
    kind = schema["type"]
    if kind == "string":
        return 2 + 4 * schema["maxLength"]  # a character is at most 4 bytes, no escapes (see check_schema)
    if kind == "integer":
        return max(len(str(schema["minimum"])), len(str(schema["maximum"])))
    if kind == "boolean":
        return 5
    if kind == "null":
        return 4
    if kind == "array":
        return 2 + schema["maxItems"] * (worst_case_tokens(schema["items"]) + 2)
    if kind == "object":
        return 2 + sum(len(json.dumps(k).encode()) + 2 + worst_case_tokens(v) + 2
                       for k, v in schema["properties"].items())
    raise AssertionError(schema)


NAMES = st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=8)
LEAVES = st.one_of(
    st.integers(1, 8).map(lambda n: {"type": "string", "maxLength": n}),
    st.tuples(st.integers(-10**6, 10**6), st.integers(0, 10**6)).map(
        lambda t: {"type": "integer", "minimum": t[0], "maximum": t[0] + t[1]}),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(st.text(alphabet="abcxyz -", min_size=1, max_size=6), min_size=1, max_size=4, unique=True).map(
        lambda values: {"enum": values}),
    st.integers(-99, 99).map(lambda v: {"const": v}),
)


def _object(props: dict[str, Any], required: list[bool]) -> dict[str, Any]:
    names = list(props)
    return {"type": "object", "properties": props,
            "required": [n for n, r in zip(names, required, strict=False) if r] or names[:1]}


def _extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    arrays = st.tuples(children, st.integers(0, 1), st.integers(1, 3)).map(
        lambda t: {"type": "array", "items": t[0], "minItems": t[1], "maxItems": max(t[1], t[2])})
    objects = st.tuples(st.dictionaries(NAMES, children, min_size=1, max_size=4),
                        st.lists(st.booleans(), min_size=4, max_size=4)).map(lambda t: _object(*t))
    unions = st.lists(children, min_size=2, max_size=2).map(lambda xs: {"anyOf": xs})
    return st.one_of(arrays, objects, unions)


SCHEMAS = st.tuples(st.dictionaries(NAMES, st.recursive(LEAVES, _extend, max_leaves=6), min_size=1, max_size=5),
                    st.lists(st.booleans(), min_size=5, max_size=5)).map(lambda t: _object(*t))

# Written by hand: what agent frameworks send (pydantic-style $defs/$ref, nullable unions, nested lists).
HAND_WRITTEN = [
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                      "unit": {"enum": ["celsius", "fahrenheit"]}},
     "required": ["city", "unit"], "additionalProperties": False},
    {"$defs": {"Step": {"type": "object", "properties": {"explanation": {"type": "string", "maxLength": 6},
                                                         "output": {"type": "string", "maxLength": 4}},
                        "required": ["explanation", "output"], "additionalProperties": False}},
     "type": "object", "properties": {"steps": {"type": "array", "items": {"$ref": "#/$defs/Step"}, "maxItems": 2},
                                      "final_answer": {"type": "string", "maxLength": 5}},
     "required": ["steps", "final_answer"], "additionalProperties": False},
    {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9999},
                                      "email": {"anyOf": [{"type": "string", "maxLength": 12}, {"type": "null"}]},
                                      "active": {"type": "boolean"}},
     "required": ["id", "email", "active"]},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "maxItems": 3, "items": {"type": "integer", "minimum": -9, "maximum": 9}}}},
     "required": ["matrix"]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
                                      "level": {"const": "high"}},
     "required": ["code", "level"]},
]


def _bound(schema: dict[str, Any]) -> int:
    if "$defs" in schema:  # HAND_WRITTEN[1]: inline the one reference for the bound
        step = schema["$defs"]["Step"]
        inlined = {**schema["properties"]["steps"], "items": step}
        return worst_case_tokens({**schema, "properties": {**schema["properties"], "steps": inlined}})
    if "pattern" in json.dumps(schema):
        return 40
    return worst_case_tokens(schema)


def ask_chat(proc: ServerProcess, schema: dict[str, Any], prompt: str, *, stream: bool = False,
             temperature: float = 0.0) -> tuple[str, str | None, int]:
    """(content, finish_reason, completion tokens) of one chat completion constrained by ``schema``."""
    max_tokens = _bound(schema) + 4
    kwargs: dict[str, Any] = dict(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                  max_tokens=max_tokens, temperature=temperature,
                                  response_format=schema_format(schema))
    if not stream:
        r = client(proc).chat.completions.create(**kwargs)
        return r.choices[0].message.content or "", r.choices[0].finish_reason, r.usage.completion_tokens
    text, finish, usage = "", None, 0
    for chunk in client(proc).chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                      **kwargs):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
    return text, finish, usage


def check(schema: dict[str, Any], text: str, finish: str | None) -> Any:
    assert finish == "stop", (finish, text, schema)  # the grammar completed within the bound
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


# ---- tests --------------------------------------------------------------------------------------------------

@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(schema=SCHEMAS)
def test_generated_schemas_are_followed(server: ServerProcess, schema: dict[str, Any]) -> None:  # noqa: F811
    text, finish, _ = ask_chat(server, schema, "Fill in the form as JSON.")
    check(schema, text, finish)


@pytest.mark.parametrize("index", range(len(HAND_WRITTEN)))
def test_hand_written_schemas_streamed_and_not(server: ServerProcess, index: int) -> None:  # noqa: F811
    schema = HAND_WRITTEN[index]
    text, finish, tokens = ask_chat(server, schema, f"Answer {index} as JSON.")
    check(schema, text, finish)
    streamed, finish_s, tokens_s = ask_chat(server, schema, f"Answer {index} as JSON.", stream=True)
    check(schema, streamed, finish_s)
    assert (streamed, tokens_s) == (text, tokens)  # greedy: the stream concatenates to the same answer
    sampled, finish_t, _ = ask_chat(server, schema, f"Answer {index} as JSON.", temperature=1.0)
    check(schema, sampled, finish_t)


def test_json_object_output_parses_or_says_length(server: ServerProcess) -> None:  # noqa: F811
    c = client(server)
    stops = 0
    max_tokens = 1500
    for seed in range(8):
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"JSON please ({seed})"}],
                                      response_format={"type": "json_object"}, temperature=1.0, seed=seed,
                                      max_tokens=max_tokens)
        choice = r.choices[0]
        if choice.finish_reason == "stop":
            stops += 1
            assert isinstance(json.loads(choice.message.content or ""), dict), choice.message.content
        else:
            assert choice.finish_reason == "length" and r.usage.completion_tokens == max_tokens, r
    assert stops >= 4, stops  # "{}" alone is one of two choices after "{": most answers end quickly


def test_json_object_streamed_and_on_completions(server: ServerProcess) -> None:  # noqa: F811
    c = client(server)
    text, finish = "", None
    for chunk in c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "JSON please (1)"}],
                                           response_format={"type": "json_object"}, temperature=1.0, seed=0,
                                           max_tokens=1500, stream=True):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert finish == "stop" and isinstance(json.loads(text), dict), (finish, text)
    schema = HAND_WRITTEN[0]
    r = c.completions.create(model=MODEL, prompt="Weather report:", max_tokens=_bound(schema) + 4, temperature=0,
                             extra_body={"response_format": schema_format(schema)})
    check(schema, r.choices[0].text, r.choices[0].finish_reason)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=MODEL, prompt="Weather report:", max_tokens=_bound(schema) + 4, temperature=0, stream=True,
        extra_body={"response_format": schema_format(schema)}) if ch.choices)
    assert streamed == r.choices[0].text
    copies = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "two forms"}], n=2,
                                       temperature=1.0, seed=4, max_tokens=_bound(schema) + 4,
                                       response_format=schema_format(schema))  # type: ignore[arg-type]
    for choice in copies.choices:  # each copy has its own matcher
        check(schema, choice.message.content or "", choice.finish_reason)


def test_mixed_batch_leaves_unconstrained_requests_unchanged(server: ServerProcess) -> None:  # noqa: F811
    c = client(server)
    prompts = [f"free text {i}: the quick brown fox" for i in range(4)]

    def free(prompt: str) -> str:
        r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=48, temperature=0,
                                 extra_body={"ignore_eos": True})
        return r.choices[0].text

    def constrained(i: int) -> tuple[str, str | None, int]:
        return ask_chat(server, HAND_WRITTEN[i % len(HAND_WRITTEN)], f"constrained {i}")

    alone = [free(p) for p in prompts]
    with ThreadPoolExecutor(12) as pool:
        mixed_free = [pool.submit(free, p) for p in prompts]
        mixed_json = [pool.submit(constrained, i) for i in range(8)]
        assert [f.result() for f in mixed_free] == alone
        for i, f in enumerate(mixed_json):
            text, finish, _ = f.result()
            check(HAND_WRITTEN[i % len(HAND_WRITTEN)], text, finish)


@pytest.mark.parametrize("response_format, words", [
    (schema_format({"type": "foo"}), "foo"),
    (schema_format({"type": "integer", "not": {"minimum": 0}}), "'not'"),
    (schema_format({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}), "uniqueItems"),
    (schema_format({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}), "$defs"),
    (schema_format({"type": "string", "pattern": "(("}), "parenthesis"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "json_schema.schema"),
    ({"type": "json_object", "json_schema": {"name": "x", "schema": {}}}, "only allowed"),
    ({"type": "yaml"}, "response_format"),
])
def test_invalid_response_format_is_a_400_naming_it(server: ServerProcess, response_format: dict[str, Any],  # noqa: F811
                                                    words: str) -> None:
    for create in (lambda **kw: client(server).chat.completions.create(
                       messages=[{"role": "user", "content": "hi"}], **kw),
                   lambda **kw: client(server).completions.create(prompt="hi", **kw)):
        with pytest.raises(openai.BadRequestError) as info:
            create(model=MODEL, max_tokens=8, extra_body={"response_format": response_format})
        assert info.value.status_code == 400 and (info.value.param or "").startswith("response_format"), info.value
        assert words in info.value.message, info.value.message
    assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200


def test_registries_are_empty_after_constrained_requests(server_factory) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    from test_serve_registries import PREFIX_CACHE, SNAPSHOT, registries

    proc = server_factory("--max-num-seqs", "4", env={"FLEETSERVE_DEBUG_MEMORY": "1"})
    url = proc.base_url
    before = registries(url)

    def one(i: int) -> str:
        schema = HAND_WRITTEN[i % len(HAND_WRITTEN)]
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"r{i}"}], "max_tokens": _bound(schema) + 4,
                "temperature": 0, "response_format": schema_format(schema)}
        if i % 4 == 3:  # cancelled mid-stream: the client goes away
            with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True},
                              timeout=120) as reply:
                for n, _ in enumerate(reply.iter_lines()):
                    if n >= 2:
                        return "cancelled"
        if i % 4 == 2:  # an invalid schema
            body["response_format"] = schema_format({"type": "object", "if": {}})
        return str(httpx.post(url + "/v1/chat/completions", json=body, timeout=120).status_code)

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(one, range(24)))
    assert sorted(set(outcomes)) <= ["200", "400", "cancelled"] and outcomes.count("400") == 6, outcomes
    wait_for(lambda: metric(url, "fleetserve_requests_running") == 0
             and metric(url, "fleetserve_requests_waiting") == 0, 120, "the engine to go idle")
    deadline = time.monotonic() + 20
    grown: dict[str, tuple[int | None, int]] = {}
    while time.monotonic() < deadline:
        after = registries(url)
        grown = {k: (before.get(k), v) for k, v in after.items()
                 if v > before.get(k, 0) and not k.endswith(PREFIX_CACHE) and not k.startswith(SNAPSHOT)}
        if not grown:
            break
        time.sleep(0.2)
    assert not grown, grown
    assert metric(url, "fleetserve_kv_cache_usage_ratio") == 0
