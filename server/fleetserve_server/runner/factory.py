"""Build a ready engine from a model spec: resolve, plan memory, load, allocate.

``create_engine`` is what both the offline ``LLM`` and the HTTP server call.
The KV cache is sized with ``memory.plan_memory`` — the same function the
operator and ``fleetserve plan`` use — so prediction and allocation agree:
``LoadedEngine.memory_plan.kv_capacity_tokens`` is exactly the number of
token slots the runner allocated (``num_blocks x block_size``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from fleetserve_server import memory
from fleetserve_server.engine.config import EngineConfig
from fleetserve_server.runner.builtin import DEFAULT_MODEL, resolve_model
from fleetserve_server.runner.loader import (
    QUANTIZATIONS,
    load_model,
    read_config,
    resolve_device,
    resolve_dtype,
)
from fleetserve_server.runner.model_runner import TorchModelRunner

log = logging.getLogger(__name__)


@dataclass
class LoadedEngine:
    """An engine plus what the server reports about it (metrics, /v1/models)."""

    engine: Any  # engine.llm_engine.LLMEngine
    runner: TorchModelRunner
    tokenizer: Any  # transformers.PreTrainedTokenizerFast with a chat template
    model_name: str
    model_path: str
    memory_plan: memory.MemoryPlan
    quantization: str
    dtype: str
    device: str
    weights_bytes: int
    kv_cache_bytes: int
    max_model_len: int

    def warmup(self) -> None:
        """One tiny forward (allocates workspaces, faults in weight pages)."""
        self.runner.warmup()


def _check_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def device_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    import psutil

    return int(psutil.virtual_memory().total)


def create_engine(
    model: str = DEFAULT_MODEL,
    *,
    quantization: str = "none",
    dtype: str = "auto",
    device: str = "auto",
    max_model_len: int = 2048,
    max_num_seqs: int = 32,
    max_batch_tokens: int = 2048,
    kv_cache_tokens: int | None = None,
    kv_cache_memory_fraction: float = 0.9,
    block_size: int = 16,
    enable_prefix_caching: bool = True,
    cache_ttl_seconds: float = 600.0,
    max_queue_length: int | None = None,
    seed: int = 0,
    served_model_name: str | None = None,
    keep_layers: tuple[int, ...] = (),
    clock: Any = time.monotonic,
    progress: bool = True,
) -> LoadedEngine:
    """Resolve ``model``, size the KV cache with the planner, load and wire up an engine.

    On CUDA the KV cache takes what the plan leaves of the device memory
    (``kv_cache_memory_fraction``); on CPU, where RAM is shared with everything
    else, it defaults to ``max_num_seqs x max_model_len`` tokens, capped by the
    plan over system RAM. ``kv_cache_tokens`` overrides both (rounded down to
    whole blocks; it may not exceed what the plan allows).
    """
    from fleetserve_server.engine.llm_engine import LLMEngine

    for name, value in (("max_model_len", max_model_len), ("max_num_seqs", max_num_seqs),
                        ("max_batch_tokens", max_batch_tokens), ("block_size", block_size)):
        _check_int(name, value)
    if kv_cache_tokens is not None:
        _check_int("kv_cache_tokens", kv_cache_tokens, block_size)
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}; got {quantization!r}")
    if not 0.0 < kv_cache_memory_fraction <= 1.0:
        raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {kv_cache_memory_fraction!r}")
    dev = resolve_device(device)
    if device == "auto" and dev.type == "cpu":
        log.warning("no CUDA device available: running on the CPU")
    dt = resolve_dtype(dtype, dev)
    _check_quantization_supported(quantization, dev)
    resolved = resolve_model(model, progress=progress)
    config = read_config(resolved.path)
    arch = memory.architecture_from_config(config, name=resolved.served_name)
    plan = memory.plan_memory(
        arch, quantization=quantization, dtype=dt, device=dev.type, device_memory_bytes=device_memory_bytes(dev),
        kv_cache_memory_fraction=kv_cache_memory_fraction, max_model_len=max_model_len,
        max_num_seqs=max_num_seqs, block_size=block_size, max_batch_tokens=max_batch_tokens,
    )
    capacity = _kv_capacity(plan, dev, kv_cache_tokens, max_num_seqs, max_model_len, block_size)
    if capacity != plan.kv_capacity_tokens:
        # The plan records what is actually allocated (a user cap, or the CPU default).
        seq_tokens = -(-max_model_len // block_size) * block_size
        plan = dataclasses.replace(
            plan, kv_capacity_tokens=capacity, max_concurrent_sequences=min(max_num_seqs, capacity // seq_tokens),
            fits=capacity >= max_model_len,
        )
    num_blocks = capacity // block_size
    engine_config = EngineConfig(
        max_model_len=max_model_len, num_blocks=num_blocks, max_num_seqs=max_num_seqs,
        max_batch_tokens=max_batch_tokens, block_size=block_size, enable_prefix_caching=enable_prefix_caching,
        cache_ttl_seconds=cache_ttl_seconds, max_queue_length=max_queue_length,
    )
    loaded = load_model(resolved.path, dtype=dt, device=dev, quantization=quantization,
                        max_positions=max_model_len, keep_layers=keep_layers)
    tokenizer = load_tokenizer(resolved.path)
    runner = TorchModelRunner(loaded.model, num_blocks=num_blocks, block_size=block_size,
                              eos_token_ids=eos_token_ids(resolved.path, config, tokenizer), seed=seed)
    engine = LLMEngine(engine_config, runner, tokenizer, clock)
    return LoadedEngine(
        engine=engine, runner=runner, tokenizer=tokenizer,
        model_name=served_model_name or resolved.served_name, model_path=str(resolved.path),
        memory_plan=plan, quantization=quantization, dtype=dt, device=dev.type,
        weights_bytes=loaded.weights_bytes, kv_cache_bytes=runner.kv_cache_bytes, max_model_len=max_model_len,
    )


def _kv_capacity(plan: memory.MemoryPlan, dev: torch.device, kv_cache_tokens: int | None,
                 max_num_seqs: int, max_model_len: int, block_size: int) -> int:
    if kv_cache_tokens is not None:
        capacity = kv_cache_tokens // block_size * block_size
        if capacity > plan.kv_capacity_tokens:
            raise ValueError(
                f"kv_cache_tokens={kv_cache_tokens} exceeds what the memory plan allows "
                f"({plan.kv_capacity_tokens} tokens: {plan.message}); lower kv_cache_tokens"
            )
    elif dev.type == "cpu":
        wanted = -(-max_num_seqs * max_model_len // block_size) * block_size
        capacity = min(wanted, plan.kv_capacity_tokens)
    else:
        capacity = plan.kv_capacity_tokens
    if capacity < max_model_len:
        raise ValueError(
            f"the KV cache holds {capacity} tokens, less than one sequence of max_model_len={max_model_len}: "
            f"{plan.message}; lower max_model_len"
            + (" or raise kv_cache_tokens" if kv_cache_tokens is not None else "")
        )
    return capacity


def _check_quantization_supported(quantization: str, dev: torch.device) -> None:
    if quantization == "none":
        return
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:
        raise ValueError(
            f"quantization={quantization!r} needs a working bitsandbytes on {dev.type} ({exc}); "
            "use quantization='none'"
        ) from exc


def load_tokenizer(path: Any) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"model: {path} has no fast tokenizer (tokenizer.json); fleetserve needs one")
    return tokenizer


def eos_token_ids(path: Any, config: dict, tokenizer: Any) -> frozenset[int]:
    """EOS ids from generation_config.json, config.json and the tokenizer, merged."""
    import json
    from pathlib import Path

    ids: set[int] = set()

    def add(value: Any) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))

    gen = Path(path) / "generation_config.json"
    if gen.is_file():
        add(json.loads(gen.read_text()).get("eos_token_id"))
    add(config.get("eos_token_id"))
    add(tokenizer.eos_token_id)
    return frozenset(ids)
