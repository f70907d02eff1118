"""Tensor parallelism on CPU (gloo): greedy identity and the decode step time, TP=N against one process.

On a GPU box the ranks are GPUs; here they share the host's cores, so the figure that transfers
is the cost of the collectives (two all-reduces per layer, the embedding's all-reduce, the
logits gather and the plan broadcast), not a speed-up. Each size runs in the same process, in
interleaved rounds, with the same total threads (``--threads`` shared out, at least one per rank):

    .venv/bin/python benchmarks/tp_overhead.py [--model builtin:smollm2-135m-instruct] [--sizes 1,3]
        [--rounds 3] [--prompts 8] [--max-tokens 32] [--threads 2] [--output FILE]

``--model tiny`` writes a random Llama (hidden 512, 8 heads, 4 KV heads, 4 layers) first. Prints,
per size, the median decode step time over the rounds (each round's median step), the median
prefill step, and whether every round's greedy tokens equal the first size's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def _run(model: str, size: int, threads: int, prompts: list[list[int]], max_tokens: int) -> dict:  # type: ignore[type-arg]
    from fleetserve_server import LLM, SamplingParams

    llm = LLM(model, device="cpu", dtype="float32", max_model_len=512, max_num_seqs=len(prompts),
              tensor_parallel_size=size, threads=max(1, threads // size), progress=False)
    decode: list[float] = []
    prefill: list[float] = []
    execute = llm.loaded.runner.execute

    def timed(batch):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        out = execute(batch)
        (decode if all(len(s.token_ids) == 1 for s in batch.sequences) else prefill).append(
            time.perf_counter() - start)
        return out

    llm.loaded.runner.execute = timed  # type: ignore[method-assign]
    try:
        outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                            use_tqdm=False)
    finally:
        llm.loaded.close()
    return {"tokens": [o.outputs[0].token_ids for o in outs], "decode_step": statistics.median(decode),
            "prefill_step": statistics.median(prefill), "weights_bytes_rank0": llm.loaded.weights_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--sizes", default="1,3")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    import torch

    model = args.model
    if model == "tiny":
        from fleetserve_server.testing import make_tiny_llama

        model = str(make_tiny_llama(Path(tempfile.mkdtemp()) / "tiny-wide", num_layers=4, hidden_size=512,
                                    num_heads=8, num_kv_heads=4, intermediate_size=1376))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 250, (16 + 8 * i,), generator=gen).tolist() for i in range(args.prompts)]
    sizes = [int(s) for s in args.sizes.split(",")]
    rounds: dict[int, list[dict]] = {n: [] for n in sizes}  # type: ignore[type-arg]
    for _ in range(args.rounds):
        for n in sizes:
            rounds[n].append(_run(model, n, args.threads, prompts, args.max_tokens))
    reference = rounds[sizes[0]][0]["tokens"]
    result = {"model": args.model, "threads_total": args.threads, "prompts": args.prompts,
              "max_tokens": args.max_tokens, "rounds": args.rounds, "sizes": {}}
    for n in sizes:
        runs = rounds[n]
        row = {"decode_step_ms": 1e3 * statistics.median(r["decode_step"] for r in runs),
               "prefill_step_ms": 1e3 * statistics.median(r["prefill_step"] for r in runs),
               "weights_bytes_rank0": runs[0]["weights_bytes_rank0"],
               "identical_to_first_size": all(r["tokens"] == reference for r in runs)}
        result["sizes"][n] = row
        print(f"TP={n}: decode step {row['decode_step_ms']:.1f} ms, prefill step {row['prefill_step_ms']:.1f} ms "
              f"(medians of {args.rounds} interleaved rounds), rank 0 weights "
              f"{row['weights_bytes_rank0'] / 2**20:.1f} MiB, greedy identical to TP={sizes[0]}: "
              f"{row['identical_to_first_size']}")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    if not all(r["identical_to_first_size"] for r in result["sizes"].values()):
        raise SystemExit("tp_overhead: greedy outputs differ between sizes")


if __name__ == "__main__":
    main()
