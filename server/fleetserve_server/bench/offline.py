"""``fleetserve bench offline``: engine throughput against Hugging Face baselines.

Every figure is measured in the same process, on the same prompts, one after
the other: fleetserve's ``LLM.generate`` (continuous batching over the paged
KV cache) and the baselines ``hf-sequential`` (``generate`` one prompt at a
time), ``hf-static`` (``generate`` on one left-padded batch of all prompts,
which waits for the longest) and ``transformers-cb`` (transformers' own
continuous batching, ``generate_batch``). Greedy, ``ignore_eos``: every request
produces exactly its output length, so tokens/s compare like for like.

Per phase (prefill / decode) it reports achieved GFLOPS against a matmul peak
measured in the same run. ``--quality`` adds weight memory and perplexity per
quantization (fleetserve vs transformers + bitsandbytes), ``--prefix`` the
TTFT of a second conversation turn served from the prefix cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

BASELINES = ("hf-sequential", "hf-static", "transformers-cb")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--workload", choices=("uniform", "mixed"), default="uniform",
                        help="uniform: every request input-len/output-len; mixed: input 32-512 and output "
                             "16-256 drawn per request (fixed seed)")
    parser.add_argument("--baselines", default="hf-static",
                        help=f"comma-separated subset of {','.join(BASELINES)} (or 'none')")
    parser.add_argument("--sequential-prompts", type=int, default=8,
                        help="hf-sequential runs only the first N prompts (its tokens/s is per-prompt steady state)")
    parser.add_argument("--runs", type=int, default=1, help="repeat each measurement; medians are reported")
    parser.add_argument("--sampling", choices=("greedy", "default", "both"), default="greedy",
                        help="fleetserve's sampling: greedy, the model's generation_config defaults (seeded per "
                             "request), or both interleaved run by run (greedy, default, greedy, ...)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quality", action="store_true",
                        help="also: weight memory + perplexity per quantization vs transformers+bitsandbytes")
    parser.add_argument("--ppl-tokens", type=int, default=2048, help="tokens of --text scored for perplexity")
    parser.add_argument("--prefix", action="store_true", help="also: TTFT of a second turn from the prefix cache")
    parser.add_argument("--text", default=None, help="text file for perplexity/prefix (default: shipped file)")
    parser.add_argument("--output", default=None, help="write all results as JSON to this file")
    parser.set_defaults(handler=run)


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


@dataclass
class Result:
    name: str
    seconds: list[float] = field(default_factory=list)
    tokens: int = 0
    phases: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / statistics.median(self.seconds)

    @property
    def run_tokens_per_s(self) -> list[float]:
        return [self.tokens / s for s in self.seconds]


def make_workload(kind: str, n: int, input_len: int, output_len: int, vocab: int, seed: int) -> Workload:
    import random

    rng = random.Random(seed)
    prompts, outs = [], []
    for _ in range(n):
        in_len = input_len if kind == "uniform" else rng.randint(32, 512)
        out_len = output_len if kind == "uniform" else rng.randint(16, 256)
        # ids away from the special tokens at the bottom of the vocabulary
        prompts.append([rng.randrange(100, vocab - 100) for _ in range(in_len)])
        outs.append(out_len)
    return Workload(prompts, outs)


def matmul_peak_gflops(torch: Any, dtype: Any, size: int = 1024, seconds: float = 2.0) -> float:
    """Best GFLOPS of a square matmul in the compute dtype over ~``seconds``."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - t) / 1e9)
    return best


class FlopCounter:
    """Analytic FLOPs of a Llama-family forward, per step, split by phase.

    2 x tokens x linear parameters, + 4 x head_dim x heads x layers per
    (query, key) pair of attention, + 2 x hidden x vocab per sampled row.
    A step with any multi-token chunk counts as prefill.
    """

    def __init__(self, cfg: dict) -> None:
        h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        kv = cfg.get("num_key_value_heads") or heads
        hd = cfg.get("head_dim") or h // heads
        i, layers = cfg["intermediate_size"], cfg["num_hidden_layers"]
        self.linear = layers * (h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * i)
        self.attn_per_pair = 4 * hd * heads * layers
        self.lm_head = 2 * h * cfg["vocab_size"]

    def step(self, chunks: list[tuple[int, int]], sampled: int) -> float:
        """``chunks``: (new tokens, start position) per sequence."""
        flops = float(self.lm_head * sampled)
        for n, start in chunks:
            flops += 2 * n * self.linear
            flops += self.attn_per_pair * (n * start + n * (n + 1) / 2)
        return flops


def run(args: argparse.Namespace) -> int:
    import torch

    from fleetserve_server.bench import offline_baselines as hf_baselines
    from fleetserve_server.runner.builtin import resolve_model
    from fleetserve_server.runner.loader import DTYPES, read_config

    if args.threads:
        torch.set_num_threads(args.threads)
    baselines = [] if args.baselines in ("", "none") else [b.strip() for b in args.baselines.split(",")]
    unknown = set(baselines) - set(BASELINES)
    if unknown:
        raise SystemExit(f"--baselines: unknown {sorted(unknown)}; choose from {', '.join(BASELINES)}")
    resolved = resolve_model(args.model)
    cfg = read_config(resolved.path)
    workload = make_workload(args.workload, args.num_prompts, args.input_len, args.output_len,
                             cfg["vocab_size"], args.seed)
    dtype = DTYPES[args.dtype]
    report: dict[str, Any] = {
        "machine": _machine(torch), "model": args.model, "workload": args.workload,
        "num_prompts": args.num_prompts, "dtype": args.dtype, "quantization": args.quantization,
        "input_tokens": sum(len(p) for p in workload.prompts), "output_tokens": workload.output_tokens,
    }
    peak = matmul_peak_gflops(torch, dtype)
    report["matmul_peak_gflops"] = round(peak, 1)
    print(f"machine: {report['machine']}\nmatmul peak ({args.dtype}, 1024^3): {peak:.1f} GFLOPS", flush=True)
    flops = FlopCounter(cfg)
    # Every system is loaded and warmed up first, then the systems run interleaved round by round
    # (fleetserve, baseline 1, baseline 2, fleetserve, ...), so a change in the machine's load
    # between rounds reaches every system alike; each ratio is the median of the per-round ratios.
    results, fleetserve_round = prepare_fleetserve(args, workload, flops, resolved.path)
    rounds: list[tuple[Result, Callable[[], None]]] = [(r, fleetserve_round) for r in results[:1]]
    hf_model = None
    for name in baselines:
        if hf_model is None:
            hf_model = hf_baselines.load_hf(resolved.path, dtype)
        result, one = hf_baselines.prepare_baseline(name, hf_model, workload, args, flops)
        results.append(result)
        rounds.append((result, one))
    loads: list[float] = []
    for i in range(args.runs):
        loads.append(_load_average())
        for _, one in rounds:
            one()
        print(f"  round {i + 1}/{args.runs} (load average {loads[-1]:.1f} at start): "
              + ", ".join(f"{r.name} {r.run_tokens_per_s[-1]:.1f}" for r in results) + " tok/s", flush=True)
    loads.append(_load_average())
    report["load_average_per_round"] = [round(x, 2) for x in loads]
    for r in results:
        _progress(r)
    if args.sampling == "both":
        ratio = results[1].tokens_per_s / results[0].tokens_per_s
        report["default_vs_greedy"] = ratio
        print(f"  default sampling / greedy (medians of {args.runs} interleaved runs): {ratio:.2f}x", flush=True)
    peak = max(peak, matmul_peak_gflops(torch, dtype, seconds=1.0))
    report["matmul_peak_gflops"] = round(peak, 1)
    _print_throughput(results, peak, report)
    del hf_model
    if args.quality:
        from fleetserve_server.bench import offline_quality

        report["quality"] = offline_quality.quality_report(resolved.path, args)
    if args.prefix:
        from fleetserve_server.bench import offline_quality

        report["prefix"] = offline_quality.prefix_report(args)
    if args.output:
        with open(args.output, "w") as fh:
            json.dump(report, fh, indent=2)
        print(f"wrote {args.output}")
    return 0


def prepare_fleetserve(args: argparse.Namespace, workload: Workload, flops: FlopCounter,
                       model_path: Any = None) -> tuple[list[Result], Callable[[], None]]:
    """fleetserve's engine, loaded and warmed up, and a function that measures one round: the whole
    workload once per sampling mode (with ``--sampling both`` two results, greedy and default,
    measured one after the other on one engine)."""
    from fleetserve_server import LLM, SamplingParams
    from fleetserve_server.api.server import sampling_defaults

    longest = max(len(p) + o for p, o in zip(workload.prompts, workload.output_lens, strict=True))
    block = 16
    kv_tokens = sum(-(-(len(p) + o) // block) * block for p, o in zip(workload.prompts, workload.output_lens,
                                                                     strict=True))
    llm = LLM(args.model, quantization=args.quantization, dtype=args.dtype, device="cpu",
              max_model_len=-(-longest // block) * block, max_num_seqs=len(workload.prompts),
              max_batch_tokens=2048, kv_cache_tokens=max(kv_tokens, longest + block), block_size=block,
              enable_prefix_caching=False)
    defaults = sampling_defaults(str(model_path)) if model_path is not None else {}
    modes = {"greedy": ["greedy"], "default": ["default"], "both": ["greedy", "default"]}[args.sampling]
    params = {
        "greedy": [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for o in workload.output_lens],
        "default": [SamplingParams(max_tokens=o, temperature=float(defaults.get("temperature", 1.0)),
                                   top_p=float(defaults.get("top_p", 1.0)), top_k=int(defaults.get("top_k", 0)),
                                   seed=i, ignore_eos=True) for i, o in enumerate(workload.output_lens)],
    }
    for mode in modes:  # warm-up, each sampling path once
        llm.generate(workload.prompts[:2], params[mode][:2], use_tqdm=False)
    runner = llm.loaded.runner
    execute = runner.execute
    steps: list[tuple[bool, float, float]] = []

    def timed(batch):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        out = execute(batch)
        chunks = [(len(s.token_ids), s.start_pos) for s in batch.sequences]
        prefill = any(n > 1 for n, _ in chunks)
        steps.append((prefill, time.perf_counter() - t, flops.step(chunks, sum(s.sample for s in batch.sequences))))
        return out

    runner.execute = timed  # type: ignore[method-assign]
    results = {mode: Result("fleetserve" if mode == "greedy" or len(modes) == 1 else f"fleetserve-{mode}")
               for mode in modes}
    if len(modes) == 1 and modes[0] == "default":
        results["default"].name = "fleetserve-default"
    def one_round() -> None:
        for mode in modes:
            result = results[mode]
            steps.clear()
            t = time.perf_counter()
            outs = llm.generate(workload.prompts, params[mode], use_tqdm=False)
            result.seconds.append(time.perf_counter() - t)
            result.tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            for phase, is_prefill in (("prefill", True), ("decode", False)):
                secs = sum(s for p, s, _ in steps if p == is_prefill)
                fl = sum(f for p, _, f in steps if p == is_prefill)
                result.phases[phase] = {"seconds": secs, "gflops": fl / secs / 1e9 if secs else 0.0,
                                        "steps": sum(1 for p, _, _ in steps if p == is_prefill)}
            if result.tokens != workload.output_tokens:
                raise RuntimeError(f"fleetserve produced {result.tokens} tokens, expected {workload.output_tokens}")

    return list(results.values()), one_round


def _progress(r: Result) -> None:
    print(f"  {r.name}: {r.tokens} tokens in {statistics.median(r.seconds):.2f}s = {r.tokens_per_s:.1f} tok/s",
          flush=True)


def round_ratios(ours: Result, other: Result) -> list[float]:
    """fleetserve's tok/s over ``other``'s, round by round (the two ran back to back in each round)."""
    return [a / b for a, b in zip(ours.run_tokens_per_s, other.run_tokens_per_s, strict=True)]


def _print_throughput(results: list[Result], peak: float, report: dict) -> None:
    ours = results[0]
    print(f"\n{'system':<18}{'output tok/s':>14}{'median s':>10}{'fleetserve x (min-max)':>26}"
          "   phases of the last round (GFLOPS, % of peak)")
    rows = []
    for r in results:
        ratios = round_ratios(ours, r)
        ratio = statistics.median(ratios)
        spread = f"{ratio:.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        phases = ", ".join(
            f"{k} {v['gflops']:.1f} ({100 * v['gflops'] / peak:.0f}%) in {v['seconds']:.2f}s"
            for k, v in r.phases.items()
        )
        print(f"{r.name:<18}{r.tokens_per_s:>14.1f}{statistics.median(r.seconds):>10.2f}{spread:>26}   {phases}")
        rows.append({"name": r.name, "tokens_per_s": r.tokens_per_s, "seconds": r.seconds, "tokens": r.tokens,
                     "run_tokens_per_s": r.run_tokens_per_s, "fleetserve_ratio": ratio,
                     "fleetserve_ratio_per_run": ratios, "phases": r.phases})
    report["throughput"] = rows


def _load_average() -> float:
    import os

    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _machine(torch: Any) -> str:
    import os
    import platform

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, load average {load:.1f} at start")
