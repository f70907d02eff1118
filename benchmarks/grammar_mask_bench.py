"""Micro-benchmark: what ``response_format`` costs per decode step.

One decode step's sampling on a [rows, vocab] float32 logits batch (the builtin's vocabulary and
tokenizer), with none of the rows constrained (A) and with ``--constrained`` of them under a JSON
schema grammar (B), run interleaved (A B A B ...) after a warm-up; medians with min and max. B's
matchers sit inside a string value (the widest mask: almost every token allowed) or at a structural
point (a handful allowed), alternately. Also timed: the engine-side cost per constrained token
(``RequestGrammar.accept``: advance the matcher and fill its next mask), and compiling a schema
(cold, then from the cache).

    .venv/bin/python benchmarks/grammar_mask_bench.py [--rows 32] [--constrained 8] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from fleetserve_server.engine.interfaces import ScheduledSequence
from fleetserve_server.engine.sampling_params import SamplingParams
from fleetserve_server.runner.grammar import GrammarCompiler
from fleetserve_server.runner.sampler import Sampler

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 4},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city", "zip"]}},
    "required": ["name", "age", "tags", "address"]}


def stats(ts: list[float]) -> str:
    ms = [t * 1000 for t in ts]
    return f"median {statistics.median(ms):8.3f} ms  (min {min(ms):.3f}, max {max(ms):.3f})"


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--constrained", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--temperature", type=float, default=0.2)
    ap.add_argument("--top-p", type=float, default=0.9)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from fleetserve_server.runner.builtin import resolve_model
    from fleetserve_server.runner.factory import load_tokenizer

    path = resolve_model("builtin:smollm2-135m-instruct", progress=False).path
    tok = load_tokenizer(path)
    vocab = 49152  # the builtin's logits width
    t_cold = timed(lambda: GrammarCompiler(tok, vocab, [tok.eos_token_id]))
    compiler = GrammarCompiler(tok, vocab, [tok.eos_token_id])
    t_compile = timed(lambda: compiler.compile("json_schema", SCHEMA))
    t_cached = [timed(lambda: compiler.compile("json_schema", SCHEMA)) for _ in range(5)]
    grammar = compiler.compile("json_schema", SCHEMA)

    in_string = list(tok.encode('{"name": "Ada', add_special_tokens=False))
    structural = list(tok.encode('{"name": "Ada", "age": 36, "tags": [', add_special_tokens=False))
    matchers = []
    for i in range(args.constrained):
        m = grammar.matcher()
        for t in in_string if i % 2 == 0 else structural:
            m.accept(t)
        matchers.append(m)

    logits = torch.randn(args.rows, vocab, generator=torch.Generator().manual_seed(0)) * 3
    params = [SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=i) for i in range(args.rows)]
    plain = [ScheduledSequence(i, [1], 100, [0], True, p) for i, p in enumerate(params)]
    constrained = [ScheduledSequence(i, [1], 100, [0], True, p, grammar=matchers[i] if i < len(matchers) else None)
                   for i, p in enumerate(params)]
    greedy = [SamplingParams(temperature=0.0) for _ in range(args.rows)]
    plain_g = [ScheduledSequence(i, [1], 100, [0], True, p) for i, p in enumerate(greedy)]
    constrained_g = [ScheduledSequence(i, [1], 100, [0], True, p, grammar=matchers[i] if i < len(matchers) else None)
                     for i, p in enumerate(greedy)]
    sampler = Sampler(torch.device("cpu"))
    cases = {
        f"default sampling, 0 of {args.rows} constrained": lambda: sampler.sample(logits, plain),
        f"default sampling, {args.constrained} of {args.rows} constrained": lambda: sampler.sample(logits, constrained),
        f"greedy, 0 of {args.rows} constrained": lambda: sampler.sample(logits, plain_g),
        f"greedy, {args.constrained} of {args.rows} constrained": lambda: sampler.sample(logits, constrained_g),
    }
    for fn in list(cases.values()) * 2:  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            times[name].append(timed(fn))

    # the engine's per-token work for one constrained row: accept a token, fill the next mask
    text = list(tok.encode('{"name": "Ada Lovelace", "age": 36, "tags": ["red", "blue"], '
                           '"address": {"city": "London", "zip": "W1"}}', add_special_tokens=False))
    accept_times: list[float] = []
    for _ in range(args.repeats):
        m = grammar.matcher()
        start = time.perf_counter()
        for t in text:
            m.accept(t)
        accept_times.append((time.perf_counter() - start) / len(text))
        assert m.is_complete

    print(f"logits [{args.rows}, {vocab}] (builtin vocabulary), {args.threads} threads, "
          f"{args.repeats} interleaved runs; default sampling = temperature {args.temperature}, top_p {args.top_p}")
    for name, ts in times.items():
        print(f"  sampler.sample, {name:42s} {stats(ts)}")
    for mode in ("default sampling", "greedy"):
        a = statistics.median(times[f"{mode}, 0 of {args.rows} constrained"])
        b = statistics.median(times[f"{mode}, {args.constrained} of {args.rows} constrained"])
        print(f"  masking cost per step ({mode}): {1000 * (b - a):+.3f} ms")
    print(f"  engine side, per constrained token (accept + next mask): {stats(accept_times)}")
    print(f"  tokenizer info + compiler: {t_cold * 1000:.1f} ms; compile the schema cold: {t_compile * 1000:.1f} ms; "
          f"cached: {stats(t_cached)}")


if __name__ == "__main__":
    main()
