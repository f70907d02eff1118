"""Micro-benchmark: one quantized Linear's forward on CPU, bitsandbytes' path against the fast path
(``runner.qlinear``) and the float32 layers it replaces, per shape of SmolLM2-135M's fused layers.

Variants (same random weights, quantized once per shape):

* ``fp32-packed``: the runner's float32 layer (oneDNN, weight packed once; the baseline);
  ``fp32-linear``: plain ``F.linear`` (MKL).
* ``{int8,nf4,fp4}-bnb``: bitsandbytes' layer as the loader leaves it (training mode), today's path.
* ``int8-fast``: the input as three int8 terms, one ``torch._int_mm`` (float32-exact to ~1e-6).
* ``int8-dequant``: the option not taken: dequantize the int8 rows into a float32 buffer, F.linear.
* ``{nf4,fp4}-fast``: dequantize into the shared workspace with bitsandbytes' C kernel, F.linear.
* ``nf4-dequant-only``: just the dequantization (the fast path's overhead over fp32-linear).
* ``nf4-fast-onednn``: the option not taken: oneDNN's linear over the dequantized (unpacked) weight.
* ``nf4-fast-bf16``: the option not taken (yet): dequantize to bfloat16 and multiply in bfloat16
  (inputs rounded to bfloat16: ~4e-3 relative error against the float32 result).

Every variant runs once per round, rounds interleaved (v1, v2, ..., v1, v2, ...) after a
warm-up; figures are the median of the rounds' per-call times (each round: the mean of
``--calls`` calls), with min and max.

    .venv/bin/python benchmarks/qlinear_bench.py [--threads 2] [--rounds 7] [--calls 20] [--tokens 32,512]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from fleetserve_server.runner.loader import import_bnb, to_bnb
from fleetserve_server.runner.model import PackedLinear
from fleetserve_server.runner.qlinear import CpuLinear4bit, CpuLinear8bit, Workspace

# SmolLM2-135M: hidden 576, 9 q heads + 3 + 3 kv heads of 64, intermediate 1536 (out, in)
SHAPES = {"qkv": (960, 576), "o_proj": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}


def variants(out_features: int, in_features: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    linear.requires_grad_(False)
    bnb = import_bnb("int8")
    layers = {q: to_bnb(bnb, linear, q, torch.float32, 32).to("cpu") for q in ("int8", "nf4", "fp4")}  # as loaded
    workspace = Workspace(out_features * in_features, out_features * in_features // 32, torch.float32)
    fast4 = {q: CpuLinear4bit(copy.deepcopy(layers[q]), workspace, torch.float32) for q in ("nf4", "fp4")}
    fast8 = CpuLinear8bit(copy.deepcopy(layers["int8"]))
    bf16 = CpuLinear4bit(copy.deepcopy(layers["nf4"]), Workspace(out_features * in_features,
                                                                  out_features * in_features // 32, torch.bfloat16),
                         torch.bfloat16)
    packed = PackedLinear(linear)
    cb, scale = fast8.weight.data, (fast8.weight.SCB / 127.0).unsqueeze(1)
    int8_buffer = torch.empty(out_features, in_features)

    def int8_dequant(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, torch.mul(cb, scale, out=int8_buffer))

    def nf4_onednn(x: torch.Tensor) -> torch.Tensor:
        w = fast4["nf4"].dequantized_weight()
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")

    return {
        "fp32-packed": packed, "fp32-linear": lambda x: F.linear(x, linear.weight),
        "int8-bnb": layers["int8"], "int8-fast": fast8, "int8-dequant": int8_dequant,
        "nf4-bnb": layers["nf4"], "nf4-fast": fast4["nf4"], "nf4-dequant-only": lambda x: fast4["nf4"].dequantized_weight(),
        "nf4-fast-onednn": nf4_onednn, "nf4-fast-bf16": lambda x: bf16(x).float(),
        "fp4-bnb": layers["fp4"], "fp4-fast": fast4["fp4"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--tokens", default="32,512", help="rows of the input: 32 = a decode step of 32 sequences")
    parser.add_argument("--output", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report: dict[str, dict[str, dict[str, float]]] = {}
    with torch.inference_mode():
        for name, (out_f, in_f) in SHAPES.items():
            fns = variants(out_f, in_f)
            for m in (int(t) for t in args.tokens.split(",")):
                x = torch.randn(m, in_f)
                times: dict[str, list[float]] = {v: [] for v in fns}
                for fn in fns.values():  # warm-up (bitsandbytes repacks its 4-bit weight on the first call)
                    fn(x), fn(x)
                for _ in range(args.rounds):
                    for v, fn in fns.items():
                        t = time.perf_counter()
                        for _ in range(args.calls):
                            fn(x)
                        times[v].append((time.perf_counter() - t) / args.calls * 1e3)
                key = f"{name} [{m}x{in_f}] x [{in_f}x{out_f}]"
                base = statistics.median(times["fp32-packed"])
                report[key] = {}
                print(f"\n{key}: ms per call, median of {args.rounds} interleaved rounds (min-max), fp32-packed / it")
                for v, ts in times.items():
                    med = statistics.median(ts)
                    report[key][v] = {"ms": med, "min": min(ts), "max": max(ts), "vs_fp32_packed": base / med}
                    print(f"  {v:<18}{med:>9.3f}  ({min(ts):.3f}-{max(ts):.3f})  {base / med:>6.2f}x")
    if args.output:
        with open(args.output, "w") as fh:
            json.dump({"threads": args.threads, "rounds": args.rounds, "calls": args.calls, "shapes": report}, fh,
                      indent=2)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
