"""Offline throughput per quantization, side by side in one process: fleetserve's engine on the
uniform workload for each of ``--quantizations`` (default none,int8,nf4,fp4), every engine loaded
and warmed up first, then measured interleaved round by round (none, int8, nf4, fp4, none, ...),
so a change in the machine's load reaches every variant alike. Ratios are medians of the
per-round ratios against ``none`` (float32).

``--bnb`` adds bitsandbytes' own CPU layers (the path before ``runner.qlinear``) as
``int8-bnb``, ``nf4-bnb``, ``fp4-bnb``: the same quantized weights, loaded with the fast path
switched off.

    .venv/bin/python benchmarks/quantized_throughput.py --threads 2 --runs 3 [--bnb] \\
        [--num-prompts 32 --input-len 128 --output-len 64] [--output benchmarks/results/quantized-throughput.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from fleetserve_server.bench import offline
from fleetserve_server.runner import loader
from fleetserve_server.runner.builtin import resolve_model
from fleetserve_server.runner.loader import read_config


@contextmanager
def bitsandbytes_layers() -> Iterator[None]:
    """Load with the CPU fast path off: the model keeps bitsandbytes' layers (today's path)."""
    fast = loader.use_cpu_fast_path
    loader.use_cpu_fast_path = lambda model: None  # type: ignore[assignment]
    try:
        yield
    finally:
        loader.use_cpu_fast_path = fast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--quantizations", default="none,int8,nf4,fp4")
    parser.add_argument("--bnb", action="store_true", help="also bitsandbytes' own layers (the old path)")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    resolved = resolve_model(args.model)
    cfg = read_config(resolved.path)
    workload = offline.make_workload("uniform", args.num_prompts, args.input_len, args.output_len,
                                     cfg["vocab_size"], args.seed)
    flops = offline.FlopCounter(cfg)
    variants = [q.strip() for q in args.quantizations.split(",")]
    if args.bnb:
        variants += [f"{q}-bnb" for q in variants if q != "none"]
    systems = []
    for variant in variants:
        quantization = variant.removesuffix("-bnb")
        opts = argparse.Namespace(model=args.model, quantization=quantization, dtype="float32", sampling="greedy")
        if variant.endswith("-bnb"):
            with bitsandbytes_layers():
                results, one_round = offline.prepare_fleetserve(opts, workload, flops, resolved.path)
        else:
            results, one_round = offline.prepare_fleetserve(opts, workload, flops, resolved.path)
        results[0].name = variant
        systems.append((results[0], one_round, {"decode": [], "prefill": []}))
        print(f"loaded and warmed up: {variant}", flush=True)
    loads = []
    for i in range(args.runs):
        loads.append(offline._load_average())
        for result, one_round, phase_s in systems:
            one_round()
            for phase in phase_s:
                phase_s[phase].append(result.phases[phase]["seconds"])
        print(f"  round {i + 1}/{args.runs} (load average {loads[-1]:.1f}): "
              + ", ".join(f"{r.name} {r.run_tokens_per_s[-1]:.1f}" for r, _, _ in systems) + " tok/s", flush=True)
    base, _, base_phases = systems[0]
    rows = []
    print(f"\n{'variant':<10}{'tok/s':>8}{'x none':>18}{'decode s':>10}{'decode x none':>20}{'prefill s':>11}"
          f"{'prefill x none':>20}")
    for result, _, phase_s in systems:
        ratio = [a / b for a, b in zip(result.run_tokens_per_s, base.run_tokens_per_s, strict=True)]
        decode = [b / a for a, b in zip(phase_s["decode"], base_phases["decode"], strict=True)]
        prefill = [b / a for a, b in zip(phase_s["prefill"], base_phases["prefill"], strict=True)]

        def fmt(xs: list[float]) -> str:
            return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"

        print(f"{result.name:<10}{result.tokens_per_s:>8.1f}{fmt(ratio):>18}"
              f"{statistics.median(phase_s['decode']):>10.2f}{fmt(decode):>20}"
              f"{statistics.median(phase_s['prefill']):>11.2f}{fmt(prefill):>20}")
        rows.append({"variant": result.name, "tokens_per_s": result.tokens_per_s,
                     "run_tokens_per_s": result.run_tokens_per_s, "vs_none_per_run": ratio,
                     "decode_seconds_per_run": phase_s["decode"], "decode_speed_vs_none_per_run": decode,
                     "prefill_seconds_per_run": phase_s["prefill"], "prefill_speed_vs_none_per_run": prefill})
    loads.append(offline._load_average())
    if args.output:
        with open(args.output, "w") as fh:
            json.dump({"model": args.model, "threads": args.threads, "runs": args.runs,
                       "workload": {"num_prompts": args.num_prompts, "input_len": args.input_len,
                                    "output_len": args.output_len},
                       "load_average_per_round": loads, "variants": rows}, fh, indent=2)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
