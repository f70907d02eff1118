"""Decode roofline on a GPU: achieved HBM bandwidth of a decode step against the device's peak.

A decode step must read every weight once and the KV of every live token once,
and write one token's KV per sequence; nothing else of that size moves. So

    bytes per step = weights + (sum of context lengths + batch) x KV bytes per token

is a known lower bound on its memory traffic, and ``bytes per step / step time``
the bandwidth it achieved; divided by the datasheet peak of the GPU it is the
roofline fraction (1.0 = memory bound at full speed). Run by
``benchmarks/gpu_check.sh``; by hand:

    .venv/bin/python benchmarks/decode_roofline.py [--model builtin:smollm2-135m-instruct | --synthetic DIR]
        [--batch 32] [--context 512] [--steps 32] [--quantization none] [--output FILE]

``--synthetic DIR`` writes (once) and uses the Llama-3.2-1B-shaped random checkpoint of
``benchmarks/streaming_load.py`` (2.5 GB bf16): large enough that weight reads, not kernel
launches, dominate a step. The pure helpers below are unit-tested on the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

# Datasheet peak memory bandwidth (bytes/s), matched by substring of torch's device name, most
# specific first. Sources: NVIDIA product briefs (H200 4.8 TB/s, H100 SXM 3.35, H100 NVL 3.9,
# H100 PCIe 2.0, A100 80GB SXM 2.039, A100 80GB PCIe 1.935, A100 40GB 1.555, L40S 0.864, ...).
PEAK_HBM_BYTES_PER_SECOND: tuple[tuple[str, float], ...] = (
    ("GH200", 4.0e12), ("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
    ("B200", 8.0e12), ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12),
    ("L40S", 864e9), ("L40", 864e9), ("L4", 300e9), ("A10G", 600e9), ("A10", 600e9), ("T4", 320e9),
    ("V100", 900e9), ("RTX 4090", 1008e9), ("RTX 3090", 936e9),
)


def peak_bandwidth(device_name: str) -> float | None:
    """Datasheet peak bytes/s for a torch device name (e.g. "NVIDIA H100 80GB HBM3"), None if unknown."""
    for key, peak in PEAK_HBM_BYTES_PER_SECOND:
        if key.lower() in device_name.lower():
            return peak
    return None


def decode_bytes_per_step(weights_bytes: int, kv_bytes_per_token: int, context_lens: list[int]) -> int:
    """The bytes one decode step must move: every weight read once, the KV of every context token
    read once, and one new token's KV written per sequence (``context_lens`` excludes the new token)."""
    if weights_bytes < 0 or kv_bytes_per_token < 0 or any(n < 0 for n in context_lens):
        raise ValueError("sizes must be >= 0")
    return weights_bytes + (sum(context_lens) + len(context_lens)) * kv_bytes_per_token


def roofline(bytes_per_step: int, step_seconds: float, peak_bytes_per_second: float) -> dict[str, float]:
    """Achieved bandwidth and its fraction of the peak."""
    if step_seconds <= 0 or peak_bytes_per_second <= 0:
        raise ValueError("step time and peak bandwidth must be > 0")
    achieved = bytes_per_step / step_seconds
    return {"achieved_bytes_per_second": achieved, "peak_bytes_per_second": peak_bytes_per_second,
            "fraction_of_peak": achieved / peak_bytes_per_second}


def _measured_copy_bandwidth(torch, device) -> float:  # type: ignore[no-untyped-def]
    """Device-to-device copy of 1 GiB (read + write): a stand-in when the GPU is not in the table."""
    a = torch.empty(1024**3, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(5):
        b.copy_(a)
    torch.cuda.synchronize(device)
    return 2 * a.numel() * 5 / (time.perf_counter() - start)


def measure(args: argparse.Namespace) -> dict:  # type: ignore[type-arg]
    import torch
    from fleetserve_server.engine.interfaces import ScheduledBatch, ScheduledSequence
    from fleetserve_server.engine.sampling_params import SamplingParams
    from fleetserve_server.runner.builtin import resolve_model
    from fleetserve_server.runner.loader import load_model
    from fleetserve_server.runner.model_runner import TorchModelRunner

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("decode_roofline: no CUDA device")
    if device.type == "cpu" and not args.peak_gbps:
        raise SystemExit("decode_roofline: on the CPU give the memory's peak with --peak-gbps")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if args.synthetic:
        sys.path.insert(0, str(Path(__file__).parent))
        from streaming_load import write_checkpoint

        path = write_checkpoint(Path(args.synthetic))
    else:
        path = resolve_model(args.model).path
    block_size, batch, context = 16, args.batch, args.context
    per_seq = -(-(context + args.steps + 1) // block_size)
    loaded = load_model(path, dtype=args.dtype, device=device, quantization=args.quantization,
                        max_positions=context + args.steps + 1)
    runner = TorchModelRunner(loaded.model, num_blocks=batch * per_seq, block_size=block_size,
                              eos_token_ids=frozenset())
    kv_per_token = runner.kv_cache_bytes // (runner.num_blocks * block_size)
    greedy = SamplingParams(max_tokens=args.steps + 1, temperature=0.0, ignore_eos=True)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
    gen = torch.Generator().manual_seed(0)
    last: dict[int, int] = {}
    for i in range(batch):  # one prefill each: a full context per sequence
        prompt = torch.randint(0, runner.vocab_size, (context,), generator=gen).tolist()
        last.update(runner.execute(ScheduledBatch([ScheduledSequence(i, prompt, 0, tables[i], True, greedy)])))
    times = []
    for step in range(args.steps):
        seqs = [ScheduledSequence(i, [last[i]], context + step, tables[i], True, greedy) for i in range(batch)]
        sync()
        start = time.perf_counter()
        last = runner.execute(ScheduledBatch(seqs))
        sync()
        times.append(time.perf_counter() - start)
    steady = times[len(times) // 4:]  # the first steps warm up kernels and the allocator
    step_seconds = statistics.median(steady)
    mid_context = context + len(times) // 4 + len(steady) // 2
    moved = decode_bytes_per_step(loaded.weights_bytes, kv_per_token, [mid_context] * batch)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak, peak_source = peak_bandwidth(name), "datasheet"
    if args.peak_gbps:
        peak, peak_source = args.peak_gbps * 1e9, "--peak-gbps"
    if peak is None:
        peak, peak_source = _measured_copy_bandwidth(torch, device), "measured device copy (GPU not in the table)"
    result = {"device": name, "model": str(args.synthetic or args.model), "dtype": args.dtype,
              "quantization": args.quantization, "batch": batch, "context": context, "steps": args.steps,
              "weights_bytes": loaded.weights_bytes, "kv_bytes_per_token": kv_per_token,
              "bytes_per_step": moved, "step_seconds_median": step_seconds, "peak_source": peak_source,
              **roofline(moved, step_seconds, peak)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--synthetic", metavar="DIR", default=None,
                        help="use (and write once) the Llama-3.2-1B-shaped random checkpoint in DIR")
    parser.add_argument("--device", default="cuda:0", help="cuda:N, or cpu (a dry run of the measurement)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--quantization", default="none", choices=["none", "int8", "nf4", "fp4"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--peak-gbps", type=float, default=None, help="override the peak bandwidth (GB/s)")
    parser.add_argument("--output", default=None, help="write the result as JSON here too")
    args = parser.parse_args()
    result = measure(args)
    print(f"decode roofline on {result['device']} ({result['model']}, {result['dtype']}, "
          f"quantization {result['quantization']}, batch {result['batch']} x context {result['context']}): "
          f"{result['bytes_per_step'] / 1e6:.1f} MB/step in {result['step_seconds_median'] * 1e3:.2f} ms = "
          f"{result['achieved_bytes_per_second'] / 1e9:.0f} GB/s of {result['peak_bytes_per_second'] / 1e9:.0f} "
          f"GB/s peak ({result['peak_source']}): {100 * result['fraction_of_peak']:.1f} % of the roofline")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
