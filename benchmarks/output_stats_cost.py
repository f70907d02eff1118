"""What the output statistics cost per engine step: `distribution_stats` + `token_stats` (one pass of exp
over the step's [batch, vocab] logits) against the builtin's own decode step at the same batch size.

The decode step is the real runner (`TorchModelRunner.execute`) on the builtin model (SmolLM2-135M,
vocab 49,152), with the statistics inside it; the statistics are then timed alone on that step's logits
shape. Both are timed interleaved (step, stats, step, stats, ...) after a warm-up, medians of --repeats.

    .venv/bin/python benchmarks/output_stats_cost.py --threads 2 --out benchmarks/results/output_stats_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "server"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--context", type=int, default=256, help="tokens of context per sequence")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import torch
    from fleetserve_server.engine.interfaces import ScheduledBatch, ScheduledSequence
    from fleetserve_server.engine.sampling_params import SamplingParams
    from fleetserve_server.llm import LLM
    from fleetserve_server.runner.sampler import distribution_stats, token_stats

    llm = LLM(model=args.model, device="cpu", threads=args.threads,
              kv_cache_tokens=max(8192, 64 * (args.context + 32)))
    runner = llm.engine.runner
    params = SamplingParams(max_tokens=4, temperature=0.8, seed=1)
    bs = runner.block_size
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        per = args.context // bs + 2
        tables = [list(range(i * per, (i + 1) * per)) for i in range(batch)]
        seqs = [ScheduledSequence(i, [11], args.context, tables[i], True, params) for i in range(batch)]
        vocab = runner.model.vocab_size
        logits = torch.randn(batch, vocab) * 4
        tokens = [0] * batch
        step_times, stat_times = [], []
        for r in range(args.repeats + 3):
            t0 = time.perf_counter()
            runner.execute(ScheduledBatch(seqs))
            t1 = time.perf_counter()
            lse, ent = distribution_stats(logits)
            token_stats(logits, lse, ent, tokens)
            t2 = time.perf_counter()
            if r >= 3:
                step_times.append(t1 - t0)
                stat_times.append(t2 - t1)
        step, stat = statistics.median(step_times), statistics.median(stat_times)
        rows.append({"batch": batch, "vocab": vocab, "decode_step_ms": step * 1e3, "stats_ms": stat * 1e3,
                     "stats_share_of_step": stat / step})
        print(f"batch {batch:4d}: decode step {step * 1e3:8.2f} ms (stats inside), stats alone {stat * 1e3:6.3f} ms"
              f" = {100 * stat / step:.2f} % of the step", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"threads": args.threads, "context": args.context, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
