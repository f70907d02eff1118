"""`fleetserve plan`: do the model, quantized or not, and its KV cache fit every device?

With ``--tensor-parallel-size N`` the model is planned as N Megatron shards
(``fleetserve_server.sharding``), one per GPU of ``--gpu-memory`` each, and a
row per device shows what that GPU holds.

Exit status: 0 when a plan was made — whether it fits is in the output
(``fits`` true/false) — unless ``--check`` is given, then 1 when it does not
fit; 2 for bad input (unknown model, unparsable memory quantity).
Imports only the pure-Python planner, so it runs without torch.
"""

from __future__ import annotations

import argparse
import json
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="builtin:smollm2-135m-instruct",
        help="catalog name (e.g. Llama-3.1-8B-Instruct, hf:Qwen/Qwen2.5-7B-Instruct, "
             "builtin:smollm2-135m-instruct) or a local directory with config.json",
    )
    parser.add_argument("--quantization", default="none", choices=["none", "int8", "nf4", "fp4"])
    parser.add_argument("--gpu-memory", required=True,
                        help="device memory as a Kubernetes quantity: 24GiB, 80Gi, 16G, 512Mi, bytes")
    parser.add_argument("--max-model-len", type=int, required=True, help="context limit (prompt + output tokens)")
    parser.add_argument("--max-num-seqs", type=int, default=32, help="sequences per engine step (default 32)")
    parser.add_argument("--max-batch-tokens", type=int, default=2048, help="tokens per engine step (default 2048)")
    parser.add_argument("--block-size", type=int, default=16, help="KV block size in tokens (default 16)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="compute dtype; auto = bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--kv-cache-memory-fraction", type=float, default=0.9,
                        help="share of device memory the server may use (default 0.9)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="GPUs the model is split across, each of --gpu-memory (default 1)")
    parser.add_argument("--output", default="table", choices=["table", "json"])
    parser.add_argument("--check", action="store_true", help="exit 1 when the plan does not fit")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from fleetserve_server.memory import (
        SERVER_MAX_TENSOR_PARALLEL_SIZE,
        GiB,
        catalog_names,
        known_architecture,
        parse_quantity,
        plan_memory,
    )

    try:
        arch = known_architecture(args.model)
        if arch is None:
            print(
                f"error: --model {args.model!r} is not in the catalog and is not a directory with config.json; "
                f"known models: {', '.join(catalog_names())}",
                file=sys.stderr,
            )
            return 2
        plan = plan_memory(
            arch,
            quantization=args.quantization,
            dtype=args.dtype,
            device=args.device,
            device_memory_bytes=parse_quantity(args.gpu_memory),
            kv_cache_memory_fraction=args.kv_cache_memory_fraction,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            block_size=args.block_size,
            max_batch_tokens=args.max_batch_tokens,
            tensor_parallel_size=args.tensor_parallel_size,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.output == "json":
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        n = plan.tensor_parallel_size
        rows = [
            ("model", plan.model),
            ("parameters", f"{arch.num_parameters / 1e9:.2f} B"),
            ("quantization / dtype", f"{plan.quantization} / {plan.dtype} on {plan.device}"),
            ("devices", f"{n} (tensor-parallel size {n})" if n > 1 else "1"),
            ("device memory", f"{plan.device_memory_bytes / GiB:.2f} GiB per device"),
            ("usable (x fraction)", f"{plan.usable_bytes / GiB:.2f} GiB per device"),
            ("weights", f"{plan.weights_bytes / GiB:.2f} GiB" + (" (rank 0, the largest shard)" if n > 1 else "")),
            ("activation reserve", f"{plan.activation_reserve_bytes / GiB:.2f} GiB"),
            ("KV per token", f"{plan.kv_bytes_per_token / 1024:.1f} KiB" + (" per device" if n > 1 else "")),
            ("KV cache", f"{plan.kv_cache_bytes / GiB:.2f} GiB" + (" per device" if n > 1 else "")),
            ("KV capacity tokens", str(plan.kv_capacity_tokens)),
            ("max model len", str(plan.max_model_len)),
            ("max concurrent sequences", str(plan.max_concurrent_sequences)),
            ("fits", "yes" if plan.fits else "NO"),
        ]
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            print(f"{key:<{width}}  {value}")
        print()
        print(f"{'device':<8}{'weights':>12}{'activations':>13}{'KV/token':>12}{'KV tokens':>11}{'headroom':>12}")
        for r in plan.ranks:
            print(f"rank {r.rank:<3}{r.weights_bytes / GiB:>8.2f} GiB{r.activation_reserve_bytes / GiB:>9.2f} GiB"
                  f"{r.kv_bytes_per_token / 1024:>8.1f} KiB{r.kv_capacity_tokens:>11}"
                  f"{r.headroom_bytes / GiB:>8.2f} GiB")
        print(plan.message)
        if n > SERVER_MAX_TENSOR_PARALLEL_SIZE:
            print(f"note: fleetserve serve runs at most {SERVER_MAX_TENSOR_PARALLEL_SIZE} tensor-parallel ranks; "
                  f"these are the per-device numbers of the Megatron split over {n} GPUs")
    return 1 if args.check and not plan.fits else 0
