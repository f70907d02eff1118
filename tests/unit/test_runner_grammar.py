"""response_format grammars: schema checks, per-request matchers, the sampler's batched mask, and the
engine's use of them (completion ends a sequence, a grammar fault fails its request alone, preemption
keeps the matcher consistent)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("xgrammar")

from fleetserve_server.engine.config import EngineConfig  # noqa: E402
from fleetserve_server.engine.errors import GrammarError  # noqa: E402
from fleetserve_server.engine.interfaces import ScheduledSequence  # noqa: E402
from fleetserve_server.engine.llm_engine import LLMEngine  # noqa: E402
from fleetserve_server.engine.sampling_params import SamplingParams  # noqa: E402
from fleetserve_server.engine.toy import ByteTokenizer, ToyModelRunner  # noqa: E402
from fleetserve_server.runner.grammar import (  # noqa: E402
    GrammarCompiler,
    GrammarSpecError,
    apply_token_masks,
    check_schema,
)
from fleetserve_server.runner.sampler import Sampler  # noqa: E402
from fleetserve_server.testing import build_tokenizer  # noqa: E402

EOS = 2  # <|im_end|> in the test tokenizer
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"]}


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return build_tokenizer()


@pytest.fixture(scope="module")
def compiler(tok) -> GrammarCompiler:  # type: ignore[no-untyped-def]
    return GrammarCompiler(tok, len(tok), [EOS])


def allowed(mask: torch.Tensor, vocab: int) -> set[int]:
    bits = (mask[0, :, None] >> torch.arange(32, dtype=torch.int32)) & 1
    return set(torch.nonzero(bits.reshape(-1)[:vocab]).flatten().tolist())


def ids(tok, text: str) -> list[int]:  # type: ignore[no-untyped-def]
    return list(tok.encode(text, add_special_tokens=False))


# ---- schema checks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("schema, words", [
    ({"type": "integer", "not": {"minimum": 0}}, "'not'"),
    ({"type": "integer", "if": {"minimum": 5}, "then": {"maximum": 3}}, "'if'"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"allOf": [{"type": "integer"}, {"minimum": 3}]}, "allOf"),
    ({"type": "object", "properties": {"a": {"type": "array", "contains": {"const": 1}}}}, "schema.properties.a"),
    ({"type": "object", "properties": []}, "properties must be an object"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "no string fits"),
    ({"type": "string", "maxLength": 3, "pattern": "^a+$"}, "pattern"),
    ([1, 2], "must be an object or a boolean"),
    ({"type": ["string", "null"], "maxLength": 3}, "anyOf"),
])
def test_schemas_the_grammar_cannot_enforce_are_refused_by_name(schema, words: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(GrammarSpecError, match=None) as info:
        check_schema(schema)
    assert words in str(info.value), str(info.value)


def test_too_deep_a_schema_is_refused() -> None:
    schema: dict = {"type": "integer"}
    for _ in range(40):
        schema = {"type": "object", "properties": {"a": schema}}
    with pytest.raises(GrammarSpecError, match="deeper than"):
        check_schema(schema)


def test_length_bounds_become_a_pattern_of_unescaped_characters() -> None:
    out = check_schema({"type": "object", "properties": {"s": {"type": "string", "minLength": 1, "maxLength": 4}}})
    pattern = out["properties"]["s"]["pattern"]
    assert set(out["properties"]["s"]) == {"type", "pattern"} and pattern.endswith("{1,4}$"), out
    for text, ok in (("ab", True), ("é中", True), ("abcd", True), ("", False), ("abcde", False), ('a"', False),
                     ("a\\", False), ("a\n", False), ("😀", False)):
        assert bool(re.fullmatch(pattern, text)) is ok, text


def test_bounded_strings_are_valid_utf8_of_the_bounded_length(compiler: GrammarCompiler, tok) -> None:  # type: ignore[no-untyped-def]
    """Random logits through the grammar (what a random model does): every string decodes without U+FFFD
    and has 1..3 characters (a negated character class, or one range across UTF-8 lengths, let overlong
    byte runs through)."""
    grammar = compiler.compile("json_schema", {"type": "string", "minLength": 1, "maxLength": 3})
    gen = torch.Generator().manual_seed(0)
    sampler = Sampler(torch.device("cpu"))
    for trial in range(300):
        m = grammar.matcher()
        out: list[int] = []
        while not m.is_complete:
            token = sampler.sample(torch.randn(1, len(tok), generator=gen),
                                   [_row(SamplingParams(temperature=0.0), trial, m)])[0]
            m.accept(token)
            out.append(token)
        value = json.loads(tok.decode(out))
        assert "\ufffd" not in value and 1 <= len(value) <= 3, value


@pytest.mark.parametrize("schema, words", [
    ({"type": "foo"}, "foo"),
    ({"$ref": "#/$defs/missing"}, "$defs"),
    ({"enum": []}, "enum"),
    ({"type": "string", "pattern": "(("}, "parenthesis"),
])
def test_compile_errors_name_the_problem(compiler: GrammarCompiler, schema, words: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(GrammarSpecError) as info:
        compiler.compile("json_schema", schema)
    assert words in str(info.value) and "/project/" not in str(info.value), str(info.value)


def test_the_same_schema_compiles_once(compiler: GrammarCompiler) -> None:
    schema = {"type": "object", "properties": {"only_here": {"type": "boolean"}}, "required": ["only_here"]}
    compiler.compile("json_schema", schema)
    size = compiler._compiler.get_cache_size_bytes()  # noqa: SLF001
    compiler.compile("json_schema", json.loads(json.dumps(schema, indent=2)))  # another request, same schema

    assert compiler._compiler.get_cache_size_bytes() == size  # noqa: SLF001


# ---- the per-request matcher ----------------------------------------------------------------------------

def test_matcher_walks_a_valid_value_to_completion(compiler: GrammarCompiler, tok) -> None:  # type: ignore[no-untyped-def]
    grammar = compiler.compile("json_schema", PERSON)
    m = grammar.matcher()
    assert allowed(m.next_mask, len(tok)) == set(ids(tok, "{"))
    text = '{"name": "ab", "age": 42}'
    for i, t in enumerate(ids(tok, text)):
        assert not m.is_complete, text[:i]
        m.accept(t)
    assert m.is_complete
    other = grammar.matcher()  # a second request starts from the beginning, unaffected
    assert not other.is_complete and allowed(other.next_mask, len(tok)) == set(ids(tok, "{"))


def test_sampling_params_with_a_grammar_can_be_logged(compiler: GrammarCompiler) -> None:
    grammar = compiler.compile("json_schema", PERSON)
    fields = dataclasses.asdict(SamplingParams(grammar=grammar))  # the request log's "sampling"
    assert fields["grammar"] is grammar and "CompiledJSONGrammar" in json.dumps(fields, default=str)


def test_a_token_the_grammar_forbids_raises(compiler: GrammarCompiler, tok) -> None:  # type: ignore[no-untyped-def]
    m = compiler.compile("json_object").matcher()
    with pytest.raises(GrammarError, match="not allowed"):
        m.accept(ids(tok, "x")[0])


def test_an_extendable_value_is_not_complete_until_nothing_else_fits(compiler: GrammarCompiler, tok) -> None:  # type: ignore[no-untyped-def]
    m = compiler.compile("json_schema", {"type": "integer", "minimum": 0, "maximum": 99}).matcher()
    m.accept(ids(tok, "9")[0])
    assert not m.is_complete and EOS in allowed(m.next_mask, len(tok))  # "9" may end, or go on to "99"
    m.accept(ids(tok, "9")[0])
    assert m.is_complete  # 99 is the largest: only a stop token could follow


# ---- the sampler's mask ---------------------------------------------------------------------------------

class MaskOnly:
    """A TokenGrammar that allows a fixed set of tokens (the sampler reads only next_mask)."""

    def __init__(self, allowed_ids: list[int], vocab: int) -> None:
        bits = torch.zeros((vocab + 31) // 32 * 32, dtype=torch.int64)
        bits[allowed_ids] = 1
        words = (bits.view(-1, 32) << torch.arange(32)).sum(-1)
        self.next_mask = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)[None, :]
        self.is_complete = False

    def accept(self, token_id: int) -> None:
        pass


def _row(params: SamplingParams, seq_id: int, grammar=None) -> ScheduledSequence:  # type: ignore[no-untyped-def]
    return ScheduledSequence(seq_id, [1], 10, [0], True, params, grammar=grammar)


def test_apply_token_masks_matches_a_boolean_reference() -> None:
    vocab = 1000
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, vocab, generator=gen)
    sets = {1: [3, 999, 500], 3: list(range(0, vocab, 7))}
    masked = logits.clone()
    apply_token_masks(masked, [MaskOnly(s, vocab).next_mask for s in sets.values()], list(sets))
    expected = logits.clone()
    for row, keep in sets.items():
        drop = torch.ones(vocab, dtype=torch.bool)
        drop[keep] = False
        expected[row, drop] = float("-inf")
    assert torch.equal(masked, expected)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=20),
    SamplingParams(temperature=1.0, top_p=0.9),
    SamplingParams(temperature=1.0, min_p=0.05, presence_penalty=1.0),
])
def test_constrained_rows_pick_only_allowed_tokens_and_the_others_are_unchanged(params: SamplingParams) -> None:
    vocab, n = 1000, 12
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(n, vocab, generator=gen) * 4
    keep = [[(r * 37 + j * 11) % vocab for j in range(1 + r % 4)] for r in range(n)]
    sampler = Sampler(torch.device("cpu"), base_seed=5, eos_token_ids=frozenset({EOS}))
    plain = [_row(SamplingParams(**{**_fields(params), "seed": r}), r) for r in range(n)]
    free = sampler.sample(logits, plain)
    constrained = {r for r in range(n) if r % 3 == 0}
    # constrained rows that ask for logprobs keep their raw logits (the runner reads them afterwards)
    rows = [_row(dataclasses.replace(p.params, logprobs=0 if r % 2 else None), r,
                 MaskOnly(keep[r], vocab) if r in constrained else None) for r, p in enumerate(plain)]
    before = logits.clone()
    got = sampler.sample(logits, rows)
    assert torch.equal(logits, before)
    masked_in_place = logits.clone()
    sampler.sample(masked_in_place, [dataclasses.replace(r, params=dataclasses.replace(r.params, logprobs=None))
                                     for r in rows])
    changed = {r for r in range(n) if not torch.equal(masked_in_place[r], before[r])}
    # without logprobs: masked in place, only the constrained rows (penalties work on a copy anyway)
    assert changed == (set() if params.needs_logits_processing else constrained)
    for r in range(n):
        if r in constrained:
            assert got[r] in keep[r], (r, got[r], keep[r])
        else:
            assert got[r] == free[r], r  # same token as without any constrained neighbour


def _fields(p: SamplingParams) -> dict:
    return {f: getattr(p, f) for f in p.__dataclass_fields__}


def test_a_mask_of_the_wrong_width_fails_its_row_alone() -> None:
    from fleetserve_server.engine.errors import SequenceError

    sampler = Sampler(torch.device("cpu"))
    rows = [_row(SamplingParams(temperature=0.0), 0), _row(SamplingParams(temperature=0.0), 7, MaskOnly([1], 64))]
    with pytest.raises(SequenceError) as info:
        sampler.sample(torch.randn(2, 1000), rows)
    assert info.value.seq_ids == [7]


# ---- the engine -------------------------------------------------------------------------------------------

class Refuses:
    """A grammar whose matcher refuses the third token (a stand-in for a grammar fault)."""

    def matcher(self):  # type: ignore[no-untyped-def]
        return RefusingMatcher()


class RefusingMatcher:
    next_mask = None
    is_complete = False

    def __init__(self) -> None:
        self.n = 0

    def accept(self, token_id: int) -> None:
        self.n += 1
        if self.n == 3:
            raise GrammarError("token refused (test)")


def test_a_grammar_fault_fails_its_request_alone_and_frees_it() -> None:
    config = EngineConfig(max_model_len=128, num_blocks=64, block_size=4, max_batch_tokens=64, max_num_seqs=8)
    engine = LLMEngine(config, ToyModelRunner(config.num_blocks, config.block_size), ByteTokenizer())
    engine.add_request("bad", "hello there", SamplingParams(max_tokens=10, temperature=0.0, grammar=Refuses()))
    engine.add_request("good", "hello there", SamplingParams(max_tokens=10, temperature=0.0))
    final = {}
    for _ in range(100):
        for d in engine.step():
            if d.finish_reason:
                final[d.request_id] = d
        if not engine.has_unfinished():
            break
    assert final["bad"].finish_reason == "error" and "token refused" in (final["bad"].error or "")
    assert final["good"].finish_reason == "length" and final["good"].completion_tokens == 10
    assert engine.block_manager.num_free_blocks + len(engine.block_manager._cached) >= config.num_blocks - 1  # noqa: SLF001
    assert not engine._requests  # noqa: SLF001


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fleetserve_server.testing import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


def _run(llm_engine: LLMEngine, params: dict[str, SamplingParams], preempt_at: int | None = None
         ) -> dict[str, tuple[str, str | None]]:
    for rid, p in params.items():
        llm_engine.add_request(rid, f"prompt {rid}", p)
    text: dict[str, str] = {rid: "" for rid in params}
    reason: dict[str, str | None] = {}
    steps = 0
    while llm_engine.has_unfinished():
        for d in llm_engine.step():
            text[d.request_id] += d.text
            if d.finish_reason:
                reason[d.request_id] = d.finish_reason
        steps += 1
        if preempt_at is not None and steps == preempt_at:
            # recompute every running sequence (as the scheduler does when KV blocks run out)
            for seq in list(llm_engine.scheduler.running):
                llm_engine.scheduler._preempt(seq)  # noqa: SLF001
    return {rid: (text[rid], reason.get(rid)) for rid in params}


def test_engine_output_validates_finishes_with_stop_and_survives_preemption(tiny: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    from fleetserve_server.llm import LLM

    llm = LLM(str(tiny), device="cpu", max_model_len=512, kv_cache_tokens=8192)
    tok = llm.get_tokenizer()
    compiler = GrammarCompiler(tok, llm.loaded.runner.vocab_size, sorted(llm.loaded.runner.eos_token_ids))
    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 8}, "n": {"type": "integer", "minimum": -5, "maximum": 5000},
        "tags": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "maxItems": 3}, "ok": {"type": "boolean"}},
        "required": ["name", "n", "tags", "ok"]}
    grammar = compiler.compile("json_schema", schema)
    params = {"greedy": SamplingParams(max_tokens=300, temperature=0.0, grammar=grammar),
              "sampled": SamplingParams(max_tokens=300, temperature=1.0, seed=3, grammar=grammar),
              "free": SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)}
    plain = _run(llm.engine, params)
    for rid in ("greedy", "sampled"):
        text, reason = plain[rid]
        assert reason == "stop", plain[rid]
        jsonschema.validate(json.loads(text), schema)
    assert plain["free"][1] == "length"
    again = _run(llm.engine, params, preempt_at=6)
    assert again == plain  # the recomputed sequences continue where their matchers are
    assert llm.engine.scheduler.num_preemptions >= 3
    assert not llm.engine._requests  # noqa: SLF001
