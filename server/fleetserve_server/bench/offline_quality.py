"""Quality side of ``fleetserve bench offline``: quantized weight memory and
perplexity (fleetserve's loader vs transformers + bitsandbytes directly, same
run, same text), and the prefix cache's effect on a second turn's TTFT."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

DEFAULT_TEXT = Path(__file__).resolve().parents[3] / "benchmarks" / "data" / "apache-2.0.txt"
PPL_TOKENS = 2048
CHUNK = 512


def _text(args: argparse.Namespace) -> str:
    path = Path(args.text) if args.text else DEFAULT_TEXT
    if not path.is_file():
        raise SystemExit(f"--text: {path} does not exist")
    return path.read_text()


def perplexity_paged(model: Any, ids: list[int]) -> float:
    """Perplexity of ``ids`` under fleetserve's paged forward (prefill in chunks
    of ``CHUNK`` tokens over the KV cache, logits for every position)."""
    import torch

    from fleetserve_server.engine.interfaces import ScheduledBatch, ScheduledSequence
    from fleetserve_server.engine.sampling_params import SamplingParams
    from fleetserve_server.runner.model_runner import TorchModelRunner

    block = 16
    runner = TorchModelRunner(model, num_blocks=-(-len(ids) // block), block_size=block, eos_token_ids=frozenset())
    table = list(range(runner.num_blocks))
    greedy = SamplingParams(temperature=0.0)
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, CHUNK):
            chunk = ids[start : start + CHUNK]
            batch = ScheduledBatch([ScheduledSequence(0, chunk, start, table, True, greedy)])
            plan, _, _ = runner._prepare(batch)
            input_ids, meta = runner._tensors(plan)
            meta.logits_idx = torch.arange(len(chunk))
            logits = model(input_ids, meta, runner.kv_cache)
            targets = torch.tensor(ids[start + 1 : start + 1 + len(chunk)])
            logits = logits[: len(targets)]
            nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            count += len(targets)
    return math.exp(nll / count)


def perplexity_hf(model: Any, ids: list[int]) -> float:
    import torch

    with torch.inference_mode():
        x = torch.tensor([ids])
        logits = model(x).logits[0, :-1].float()
        return math.exp(float(torch.nn.functional.cross_entropy(logits, x[0, 1:])))


def _linear_bytes(model: Any) -> tuple[int, int]:
    """(bytes now, parameters) of the per-layer Linear layers bitsandbytes quantizes."""
    from fleetserve_server.runner.loader import model_bytes

    total = params = 0
    for layer in model.layers:
        for name in ("qkv", "o_proj", "gate_up", "down"):
            module = getattr(layer, name)
            total += model_bytes(module)
            params += _in_out(module)
    return total, params


def _in_out(module: Any) -> int:
    if hasattr(module, "in_features"):
        return module.in_features * module.out_features
    return sum(_in_out(p) for p in module.parts)


def quality_report(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from fleetserve_server.memory import BNB4_BLOCKSIZE
    from fleetserve_server.runner.loader import load_model, model_bytes

    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.encode(_text(args))[: getattr(args, "ppl_tokens", PPL_TOKENS)]
    rows: dict[str, Any] = {"tokens": len(ids), "fleetserve": {}, "transformers_bnb": {}}
    cfg_layers = int(__import__("json").loads((path / "config.json").read_text())["num_hidden_layers"])
    # (quantization, decoder layers kept in float32, 4-bit absmax blocksize); blocksize 64 is
    # bitsandbytes' default and the old layout (fused q/k/v, gate/up): the diagnosis in loader.py
    last = (0, cfg_layers - 1)
    variants = [("none", (), BNB4_BLOCKSIZE), ("int8", (), BNB4_BLOCKSIZE), ("nf4", (), BNB4_BLOCKSIZE),
                ("fp4", (), BNB4_BLOCKSIZE), ("nf4", (), 64), ("fp4", (), 64),
                ("nf4", last, BNB4_BLOCKSIZE), ("fp4", last, BNB4_BLOCKSIZE)]
    print(f"\nperplexity over {len(ids)} tokens of {args.text or DEFAULT_TEXT.name}; "
          "Linear bytes vs their 16-bit size")
    print(f"{'variant':<40}{'ppl':>9}{'vs none':>9}{'Linear MB':>11}{'/16-bit':>9}{'model MB':>10}")
    base_ppl = None
    for q, keep, blocksize in variants:
        loaded = load_model(path, dtype="float32", device=torch.device("cpu"), quantization=q,
                            max_positions=len(ids), keep_layers=keep, blocksize=blocksize)
        lin, params = _linear_bytes(loaded.model)
        ppl = perplexity_paged(loaded.model, ids)
        base_ppl = base_ppl or ppl
        old_layout = q in ("nf4", "fp4") and blocksize != BNB4_BLOCKSIZE
        name = f"fleetserve {q}" + (f" (layers {keep} fp32)" if keep else "") + (f" bs{blocksize}" if old_layout else "")
        row = {"ppl": ppl, "ppl_increase": ppl / base_ppl - 1, "linear_bytes": lin,
               "linear_16bit_bytes": params * 2, "linear_ratio_vs_16bit": lin / (params * 2),
               "model_bytes": model_bytes(loaded.model)}
        rows["fleetserve"][q + ("-keep" if keep else "") + (f"-bs{blocksize}" if old_layout else "")] = row
        print(f"{name:<40}{ppl:>9.3f}{100 * row['ppl_increase']:>+8.1f}%{lin / 1e6:>11.1f}"
              f"{row['linear_ratio_vs_16bit']:>9.3f}{row['model_bytes'] / 1e6:>10.1f}", flush=True)
        del loaded
    configs = {
        "none": None,
        "int8": BitsAndBytesConfig(load_in_8bit=True),
        # blocksize 64 (transformers has no setting for it); with and without double quant
        # (transformers' default is without)
        **{f"{qt}{'' if dq else '-nodq'}": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=qt, bnb_4bit_use_double_quant=dq,
            bnb_4bit_compute_dtype=torch.float32) for qt in ("nf4", "fp4") for dq in (True, False)},
    }
    hf_base = None
    for q, qc in configs.items():
        kwargs: dict[str, Any] = {"dtype": torch.float32}
        if qc is not None:
            kwargs.update(quantization_config=qc, device_map="cpu")
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
        except Exception as exc:  # report, do not hide: the baseline could not run
            rows["transformers_bnb"][q] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"transformers+bnb {q:<15} failed: {exc}")
            continue
        ppl = perplexity_hf(model, ids)
        hf_base = hf_base or ppl
        rows["transformers_bnb"][q] = {"ppl": ppl, "ppl_increase": ppl / hf_base - 1,
                                       "model_bytes": int(model.get_memory_footprint())}
        print(f"{'transformers+bnb ' + q:<40}{ppl:>9.3f}{100 * (ppl / hf_base - 1):>+8.1f}%"
              f"{'':>20}{model.get_memory_footprint() / 1e6:>10.1f}", flush=True)
        del model
    return rows


def prefix_report(args: argparse.Namespace) -> dict[str, Any]:
    """TTFT of turn 2 of a conversation with a ~1,000-token history: cold (never
    seen) vs warm (turn 1 of the same history served before, blocks cached)."""
    from fleetserve_server import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, device="cpu", max_model_len=2048, max_num_seqs=4,
              kv_cache_tokens=8192, enable_prefix_caching=True)
    tok = llm.get_tokenizer()
    ids = tok.encode(_text(args))
    one = SamplingParams(max_tokens=1, temperature=0.0)
    llm.generate(["warm up"], one, use_tqdm=False)

    def turns(history: str) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        first = [{"role": "user", "content": f"Read this document:\n{history}\nWhat is it about?"}]
        second = first + [{"role": "assistant", "content": "It is a software license."},
                          {"role": "user", "content": "Who may use the work?"}]
        return first, second

    def ttft(conv: list[dict[str, str]]) -> tuple[float, int, int]:
        t = time.perf_counter()
        out = llm.chat(conv, one, use_tqdm=False)[0]
        return time.perf_counter() - t, len(out.prompt_token_ids), out.num_cached_tokens

    cold_first, cold_second = turns(tok.decode(ids[:1000]))
    warm_first, warm_second = turns(tok.decode(ids[1000:2000]))
    cold, prompt_len, _ = ttft(cold_second)
    ttft(warm_first)
    warm, _, cached = ttft(warm_second)
    print(f"\nprefix cache: turn-2 TTFT with a {prompt_len}-token prompt: cold {cold * 1000:.0f} ms, "
          f"after turn 1 ({cached} tokens from cache) {warm * 1000:.0f} ms = {warm / cold:.2f}x cold")
    return {"prompt_tokens": prompt_len, "cold_ttft_s": cold, "warm_ttft_s": warm, "cached_tokens": cached,
            "ratio": warm / cold}
