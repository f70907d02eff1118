"""Decode step time against the total live tokens: the paged kernel vs the previous padded gather.

Every case is one decode step of a batch of sequences whose contexts are already in the KV cache
(filled with random values: attention's cost does not depend on them), timed on the whole model
(``TorchModelRunner.execute``: projections, attention, lm_head, sampling). Two shapes per total:
*uniform* (every sequence the same context) and *skewed* (one sequence at the longest context,
the rest short), so the live tokens and batch x longest context come apart. The paged kernel's
step time should follow the live tokens; the padded gather's follows batch x longest context.
Both paths run interleaved, case by case, in one process; medians of ``--repeats`` steps.

    flock /tmp/fleetserve-heavy.lock nice -n 19 .venv/bin/python benchmarks/paged_decode_steps.py \\
        --threads 2 --output benchmarks/results/paged_decode_steps.json \\
        --plot benchmarks/results/paged_decode_steps.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

PATHS = ("paged", "gather")


def cases(batch: int, longest: int) -> list[tuple[str, list[int]]]:
    """(shape, context lengths): uniform batches of growing context, then skewed batches with one
    sequence at ``longest`` and the rest at growing short contexts."""
    out: list[tuple[str, list[int]]] = []
    for ctx in sorted({c for c in (64, 256, 512, 1024) if c < longest} | {longest}):
        out.append(("uniform", [ctx] * batch))
    for short in (c for c in (16, 64, 256, 512) if c < longest):
        out.append(("skewed", [longest] + [short] * (batch - 1)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--longest", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/paged_decode_steps.json"))
    parser.add_argument("--plot", type=Path, default=Path("benchmarks/results/paged_decode_steps.png"))
    parser.add_argument("--profile", action="store_true",
                        help="instead: torch.profiler's top ops of decode steps at the mixed workload's shape")
    args = parser.parse_args(argv)

    import torch
    from fleetserve_server.engine.interfaces import ScheduledBatch, ScheduledSequence
    from fleetserve_server.engine.sampling_params import SamplingParams
    from fleetserve_server.runner import paged_attention
    from fleetserve_server.runner.builtin import resolve_model
    from fleetserve_server.runner.loader import load_model
    from fleetserve_server.runner.model_runner import TorchModelRunner

    torch.set_num_threads(args.threads)
    if paged_attention.extension() is None:
        raise SystemExit("paged_decode_steps: the C++ kernel did not build; nothing to compare")
    block_size = 16
    per_seq = -(-(args.longest + 1) // block_size)
    loaded = load_model(resolve_model(args.model).path, dtype="float32", device=torch.device("cpu"),
                        quantization="none", max_positions=args.longest + 1)
    model = loaded.model
    runner = TorchModelRunner(model, num_blocks=args.batch * per_seq, block_size=block_size,
                              eos_token_ids=frozenset())
    runner.kv_cache.normal_()
    greedy = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(args.batch)]

    def step(lens: list[int]) -> float:
        # the new token sits at position len - 1: the step attends to len positions per sequence
        seqs = [ScheduledSequence(i, [7], n - 1, tables[i], True, greedy) for i, n in enumerate(lens)]
        start = time.perf_counter()
        runner.execute(ScheduledBatch(seqs))
        return time.perf_counter() - start

    if args.profile:
        profile(model, step, args)
        return 0
    rows = []
    for shape, lens in cases(args.batch, args.longest):
        times: dict[str, list[float]] = {p: [] for p in PATHS}
        for path in PATHS:  # warm-up of each path at this shape
            model.attention = path
            step(lens)
        for _ in range(args.repeats):
            for path in PATHS:  # interleaved: paged, gather, paged, gather...
                model.attention = path
                times[path].append(step(lens))
        row = {"shape": shape, "batch": len(lens), "longest": max(lens), "live_tokens": sum(lens),
               "batch_x_longest": len(lens) * max(lens),
               **{f"{p}_step_ms": 1e3 * statistics.median(times[p]) for p in PATHS}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"model": args.model, "threads": args.threads, "block_size": block_size,
                                       "repeats": args.repeats, "rows": rows}, indent=2) + "\n")
    plot(rows, args.plot, args.threads)
    return 0


def profile(model, step, args: argparse.Namespace) -> None:  # type: ignore[no-untyped-def]
    """Top ops by self CPU time over ``--repeats`` decode steps of ``--batch`` sequences with the
    mixed workload's contexts (input 32-512 plus half of an output of 16-256), for each path;
    the attention call of every layer is labelled ``attention``."""
    import random

    import torch
    from torch.profiler import ProfilerActivity, record_function

    rng = random.Random(0)
    lens = [min(args.longest, rng.randint(32, 512) + rng.randint(16, 256) // 2) for _ in range(args.batch)]
    inner = model._attention

    def labelled(*a, **kw):  # type: ignore[no-untyped-def]
        with record_function("attention"):
            return inner(*a, **kw)

    model._attention = labelled
    for path in PATHS:
        model.attention = path
        step(lens)
        with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.repeats):
                step(lens)
        print(f"== {path}: {args.repeats} decode steps, batch {len(lens)}, live tokens {sum(lens)}, "
              f"longest {max(lens)}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    model._attention = inner


def plot(rows: list[dict], path: Path, threads: int) -> None:  # type: ignore[type-arg]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, x_key, title in ((axes[0], "live_tokens", "total live tokens"),
                             (axes[1], "batch_x_longest", "batch x longest context")):
        for p, color in zip(PATHS, ("tab:blue", "tab:red"), strict=True):
            for shape, marker in (("uniform", "o"), ("skewed", "^")):
                pts = sorted((r[x_key], r[f"{p}_step_ms"]) for r in rows if r["shape"] == shape)
                label = f"{'paged kernel' if p == 'paged' else 'padded gather (before)'}, {shape}"
                ax.plot([a for a, _ in pts], [b for _, b in pts], marker=marker, color=color,
                        linestyle="-" if shape == "uniform" else "--", label=label)
        ax.set_xlabel(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"decode step time, ms (whole model, {threads} threads)")
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M fp32 decode step, batch 32: paged kernel vs padded gather")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
