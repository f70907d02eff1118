"""The Hugging Face baselines of ``fleetserve bench offline``.

``hf-sequential``: ``generate`` one prompt at a time (the first
``--sequential-prompts`` prompts; tokens/s over those). ``hf-static``: one
left-padded batch of every prompt, ``max_new_tokens`` = the longest output
(a static batch waits for its longest member; only each request's own output
length counts as useful tokens). ``transformers-cb``: ``generate_batch``,
transformers' continuous batching (one ``max_new_tokens`` for all, so it runs
on the uniform workload only). EOS is disabled everywhere, like the engine's
``ignore_eos``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from fleetserve_server.bench.offline import FlopCounter, Result, Workload


def load_hf(path: Any, dtype: Any) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.eval()


def prepare_baseline(name: str, model: Any, workload: Workload, args: argparse.Namespace,
                     flops: FlopCounter) -> tuple[Result, Callable[[], None]]:
    """The baseline warmed up (its code path once on the first two prompts, a few tokens each), and a
    function that measures one round of the whole workload into the returned result."""
    runner = {"hf-sequential": _sequential, "hf-static": _static, "transformers-cb": _continuous}[name]
    warm = Workload(workload.prompts[:2], [min(4, o) for o in workload.output_lens[:2]])
    if name == "transformers-cb":
        warm = Workload(workload.prompts[:2], [min(4, workload.output_lens[0])] * 2)
    runner(model, warm, argparse.Namespace(**{**vars(args), "sequential_prompts": 2}), flops, Result(name))
    result = Result(name)
    return result, lambda: runner(model, workload, args, flops, result)


def _generate(model: Any, batch: list[list[int]], new_tokens: int) -> Any:
    import torch

    width = max(len(p) for p in batch)
    pad = model.generation_config.pad_token_id
    pad = 0 if pad is None else (pad[0] if isinstance(pad, list) else pad)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    with torch.inference_mode():
        return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, pad_token_id=pad)


def _sequential(model: Any, workload: Workload, args: argparse.Namespace, flops: FlopCounter, result: Result) -> None:
    n = min(args.sequential_prompts, len(workload.prompts))
    t = time.perf_counter()
    for prompt, out_len in zip(workload.prompts[:n], workload.output_lens[:n], strict=True):
        _generate(model, [prompt], out_len)
    result.seconds.append(time.perf_counter() - t)
    result.tokens = sum(workload.output_lens[:n])


def _static(model: Any, workload: Workload, args: argparse.Namespace, flops: FlopCounter, result: Result) -> None:
    longest = max(workload.output_lens)
    t = time.perf_counter()
    _generate(model, workload.prompts, 1)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    out = _generate(model, workload.prompts, longest)
    total = time.perf_counter() - t
    assert out.shape[1] == max(len(p) for p in workload.prompts) + longest
    result.seconds.append(total)
    result.tokens = workload.output_tokens
    # useful FLOPs only (padding and tokens past a request's own output length excluded)
    pre_fl = flops.step([(len(p), 0) for p in workload.prompts], len(workload.prompts))
    dec_fl = sum(
        flops.step([(1, len(p) + i) for i in range(1, o)], o - 1) for p, o in zip(workload.prompts,
                                                                                  workload.output_lens, strict=True)
    )
    decode = max(total - prefill, 1e-9)
    result.phases = {
        "prefill": {"seconds": prefill, "gflops": pre_fl / prefill / 1e9, "steps": 1},
        "decode": {"seconds": decode, "gflops": dec_fl / decode / 1e9, "steps": longest - 1},
    }


def _continuous(model: Any, workload: Workload, args: argparse.Namespace, flops: FlopCounter,
                result: Result) -> None:
    from transformers import GenerationConfig

    if len(set(workload.output_lens)) != 1:
        raise SystemExit("transformers-cb takes one max_new_tokens for all requests: use it with --workload uniform")
    config = GenerationConfig(max_new_tokens=workload.output_lens[0], do_sample=False, eos_token_id=-1,
                              pad_token_id=0)
    t = time.perf_counter()
    outputs = model.generate_batch(inputs=workload.prompts, generation_config=config, progress_bar=False)
    result.seconds.append(time.perf_counter() - t)
    result.tokens = sum(len(o.generated_tokens) for o in outputs.values())
