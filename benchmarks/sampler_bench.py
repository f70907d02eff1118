"""Micro-benchmark: the batched sampler against the per-row sampler it replaced.

One decode step's sampling on a [rows, vocab] float32 logits batch with the
builtin's default sampling (temperature 0.2, top_p 0.9), each row seeded.
The two samplers run interleaved (old, new, old, new, ...) after a warm-up;
the figure is the median per-step time of each, with min and max.

    .venv/bin/python benchmarks/sampler_bench.py [--rows 32] [--vocab 49152] [--repeats 15]

Logits are N(0, 1) x ``--scale`` (3 is about the spread of SmolLM2's logits);
``--real`` takes them from the builtin model's forward over a prompt instead.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from fleetserve_server.engine.interfaces import ScheduledSequence
from fleetserve_server.engine.sampling_params import SamplingParams
from fleetserve_server.runner.sampler import Sampler


class OldSampler:
    """The per-row sampler as it was before the batched path (commit 7f60ca4^), verbatim in substance."""

    def __init__(self) -> None:
        self._generators: dict[int, torch.Generator] = {}

    def sample(self, logits: torch.Tensor, seq_ids: list[int], params: list[SamplingParams]) -> list[int]:
        out = logits.argmax(dim=-1).tolist()
        for row, (seq_id, p) in enumerate(zip(seq_ids, params, strict=True)):
            if p.greedy:
                continue
            gen = self._generators.get(seq_id)
            if gen is None:
                gen = torch.Generator().manual_seed(p.seed if p.seed is not None else seq_id)
                self._generators[seq_id] = gen
            scaled = logits[row] / p.temperature
            if p.top_k and p.top_k < scaled.shape[-1]:
                kth = torch.topk(scaled, p.top_k).values[-1]
                scaled = scaled.masked_fill(scaled < kth, float("-inf"))
            probs = torch.softmax(scaled, dim=-1)
            if p.top_p < 1.0:
                sorted_probs, order = torch.sort(probs, descending=True)
                drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= p.top_p
                drop = torch.zeros_like(drop_sorted).scatter_(0, order, drop_sorted)
                probs = probs.masked_fill(drop, 0.0)
            noise = torch.empty_like(probs).exponential_(1.0, generator=gen)
            out[row] = int(torch.argmax(probs / noise))
        return out


def real_logits(rows: int) -> torch.Tensor:
    from fleetserve_server.runner.builtin import resolve_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model("builtin:smollm2-135m-instruct").path
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    text = ("The history of the city begins with a small settlement on the river, where fishermen and "
            "traders built wooden houses along the bank. Over the centuries the town grew into a market "
            "centre, and its bridges, churches and guild halls still stand today.")
    ids = tok(text, return_tensors="pt").input_ids
    with torch.inference_mode():
        logits = model(ids).logits[0, -rows:].float()
    return logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--scale", type=float, default=3.0)
    ap.add_argument("--temperature", type=float, default=0.2)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--real", action="store_true", help="logits of the builtin model (rows <= prompt length)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.real:
        logits = real_logits(args.rows)
    else:
        logits = torch.randn(args.rows, args.vocab, generator=torch.Generator().manual_seed(0)) * args.scale
    rows = logits.shape[0]
    params = [SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=i)
              for i in range(rows)]
    scheduled = [ScheduledSequence(i, [1], 100, [0], True, p) for i, p in enumerate(params)]
    old, new = OldSampler(), Sampler(torch.device("cpu"))
    seq_ids = list(range(rows))

    def run_old() -> None:
        old.sample(logits, seq_ids, params)

    def run_new() -> None:
        new.sample(logits, scheduled)

    for fn in (run_old, run_new, run_old, run_new):  # warm-up
        fn()
    times: dict[str, list[float]] = {"old (per-row, full sort)": [], "new (batched, candidate cut)": []}
    for _ in range(args.repeats):
        for name, fn in zip(times, (run_old, run_new), strict=True):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    print(f"logits [{rows}, {logits.shape[1]}], temperature {args.temperature}, top_p {args.top_p}, "
          f"top_k {args.top_k}, {args.threads} threads, {args.repeats} interleaved runs")
    for name, ts in times.items():
        ms = [t * 1000 for t in ts]
        print(f"  {name:30s} median {statistics.median(ms):8.2f} ms  (min {min(ms):.2f}, max {max(ms):.2f})")
    ratio = statistics.median(times["old (per-row, full sort)"]) / statistics.median(
        times["new (batched, candidate cut)"])
    print(f"  speed-up (median): {ratio:.1f}x")


if __name__ == "__main__":
    main()
