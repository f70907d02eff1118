"""Build a ready engine from a model spec: resolve, plan memory, load, allocate.

``create_engine`` is what both the offline ``LLM`` and the HTTP server call.
The KV cache is sized with ``memory.plan_memory`` — the same function the
operator and ``fleetserve plan`` use — so prediction and allocation agree:
``LoadedEngine.memory_plan.kv_capacity_tokens`` is exactly the number of
token slots the runner allocated (``num_blocks x block_size``).

Memory is committed at startup, not under the first traffic: before the KV
cache is allocated the factory checks that the memory it needs is free (the
pod's cgroup limit less what the process already holds on CPU, the device's
free memory on CUDA) and fails with the numbers if not; the runner then
zero-fills the whole cache, so every page is resident before ``/ready``. On
CPU the memory budget is the cgroup memory limit when there is one (the
host's memory otherwise), and torch's thread count and the default step
budget (``max_batch_tokens``) follow the cores the process may use
(``fleetserve_server.resources``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from fleetserve_server import memory, resources
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
    tensor_parallel_size: int = 1

    def rank_memory(self) -> list[dict[str, int]]:
        """Bytes each device holds, rank 0 first: ``{"rank", "weights_bytes", "kv_cache_bytes"}``."""
        from fleetserve_server.runner.loader import model_bytes

        own = {"rank": 0, "weights_bytes": model_bytes(self.runner.model), "kv_cache_bytes": self.kv_cache_bytes}
        workers = self.runner.workers
        return [own, *(workers.rank_memory() if workers is not None else [])]

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (idempotent); they also stop when this process exits."""
        self.runner.close()

    def warmup(self) -> None:
        """A forward over a full step budget, then a decode of a full batch: the step's largest activations
        are allocated (and the allocator's heap grown) and the weights faulted in before
        ``/ready``, as the KV cache already is."""
        config = self.engine.config
        self.runner.warmup(prefill_tokens=min(config.max_batch_tokens, self.max_model_len - 1,
                                              config.num_blocks * config.block_size),
                           decode_batch=config.max_num_seqs)


def _check_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


# CPU step budget: the sustained fp32 GFLOPS one core reaches through oneDNN on a step of the
# builtin (2-core EPYC: ~55 packed-GEMM GFLOPS per core, less the step's other work), and the
# wall time one step may take, so that a long prompt's prefill chunk stalls the decoders for at
# most about this long. See cpu_max_batch_tokens.
CPU_FLOPS_PER_CORE = 35e9
CPU_STEP_SECONDS = 1.0
DEFAULT_MAX_BATCH_TOKENS = 2048  # the step budget on CUDA, and the CPU budget's ceiling
# What Python, torch and transformers hold on CPU before the KV cache (the operator's
# fit.CPU_RUNTIME_RESERVE_BYTES reserves the same for a gpus: 0 pod).
CPU_RUNTIME_RESERVE_BYTES = 1024**3


class InsufficientMemoryError(MemoryError):
    """The planned memory is not free at startup; the message names the numbers and the fix."""


def device_memory_bytes(device: torch.device) -> int:
    """Memory the plan may divide: the GPU's, or on CPU what the process may still take
    (the cgroup limit less its working set now, i.e. the runtime already loaded; the host's
    memory when there is no limit)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    budget = resources.memory_budget()
    if budget.source == "host memory":
        return budget.limit_bytes
    # The runtime grows while the model loads (transformers, tokenizers, allocator arenas: ~0.9 GiB
    # RSS for a tiny model): hold back at least CPU_RUNTIME_RESERVE_BYTES, the operator's figure.
    used = budget.limit_bytes - budget.available_bytes
    return max(0, budget.limit_bytes - max(used, CPU_RUNTIME_RESERVE_BYTES))


def cpu_max_batch_tokens(arch: memory.ModelArchitecture, *, cores: int, max_model_len: int,
                         max_num_seqs: int, block_size: int) -> int:
    """The default step budget on CPU: the tokens ``cores`` cores compute in about
    ``CPU_STEP_SECONDS`` (``CPU_FLOPS_PER_CORE`` each), counting 2 FLOPs per weight of the
    transformer layers and attention over half of ``max_model_len``; a multiple of
    ``block_size``, at least ``max_num_seqs`` (every running sequence decodes each step) and at
    most ``DEFAULT_MAX_BATCH_TOKENS``."""
    embedding = arch.vocab_size * arch.hidden_size
    layer_weights = max(1, arch.num_parameters - embedding * (1 if arch.tie_word_embeddings else 2))
    attention = 4 * arch.num_layers * arch.num_attention_heads * arch.head_dim * (min(max_model_len, 4096) // 2)
    per_token = 2 * layer_weights + attention
    tokens = int(cores * CPU_FLOPS_PER_CORE * CPU_STEP_SECONDS // per_token)
    tokens = tokens // block_size * block_size
    floor = -(-max_num_seqs // block_size) * block_size
    return max(floor, block_size, min(tokens, DEFAULT_MAX_BATCH_TOKENS))


def create_engine(
    model: str = DEFAULT_MODEL,
    *,
    quantization: str = "none",
    dtype: str = "auto",
    device: str = "auto",
    max_model_len: int = 2048,
    max_num_seqs: int = 32,
    max_batch_tokens: int | None = None,
    threads: int | None = None,
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
    tensor_parallel_size: int = 1,
) -> LoadedEngine:
    """Resolve ``model``, size the KV cache with the planner, load and wire up an engine.

    On CUDA the KV cache takes what the plan leaves of the device memory
    (``kv_cache_memory_fraction``); on CPU, where RAM is shared with everything
    else, it defaults to ``max_num_seqs x max_model_len`` tokens, capped by the
    plan over system RAM. ``kv_cache_tokens`` overrides both (rounded down to
    whole blocks; it may not exceed what the plan allows) — except on a CPU that
    stands in for a missing GPU (``device="auto"`` without CUDA), where a size
    planned for the GPU would commit GPU-sized memory in RAM: there the CPU
    default applies, capped by ``kv_cache_tokens``.

    ``max_batch_tokens=None``: 2048 on CUDA, ``cpu_max_batch_tokens`` on CPU.
    ``threads``: torch's intra-op threads (``resources.choose_threads``: never
    more than the usable cores); with tensor parallelism on CPU, per rank
    (default: the usable cores shared out, at least one each).

    ``tensor_parallel_size`` N > 1 splits the model over N processes, one per
    GPU (``runner.distributed``; on CPU N processes share the host, a test
    setup): this process is rank 0, with the scheduler, the block manager and
    the sampler; the plan is per device (``memory.plan_memory``) and every rank
    allocates the same KV blocks for its share of the KV heads.
    """
    from fleetserve_server.engine.llm_engine import LLMEngine

    resources.bound_native_caches()  # effective if no oneDNN primitive exists yet (`fleetserve serve` sets it earlier)

    for name, value in (("max_model_len", max_model_len), ("max_num_seqs", max_num_seqs),
                        ("block_size", block_size)):
        _check_int(name, value)
    if max_batch_tokens is not None:
        _check_int("max_batch_tokens", max_batch_tokens)
    if threads is not None:
        _check_int("threads", threads)
    _check_int("tensor_parallel_size", tensor_parallel_size)
    tp_size = tensor_parallel_size
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
    num_threads, why = resources.choose_threads(threads)
    if tp_size > 1 and threads is None:
        num_threads, why = max(1, num_threads // tp_size), f"{why}, shared by {tp_size} tensor-parallel ranks"
    torch.set_num_threads(num_threads)
    log.info("torch uses %d intra-op thread(s) (%s)", num_threads, why)
    resolved = resolve_model(model, progress=progress)
    config = read_config(resolved.path)
    arch = memory.architecture_from_config(config, name=resolved.served_name)
    if tp_size > 1:
        _check_tensor_parallel(arch, tp_size, device, dev)
    if max_batch_tokens is None:
        max_batch_tokens = DEFAULT_MAX_BATCH_TOKENS if dev.type != "cpu" else cpu_max_batch_tokens(
            arch, cores=num_threads * tp_size, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            block_size=block_size)
        log.info("max_batch_tokens %d (the default on %s)", max_batch_tokens, dev.type)
    if kv_cache_tokens is not None and device == "auto" and dev.type == "cpu":
        log.warning("kv_cache_tokens=%d was planned for a GPU; on this CPU the KV cache takes at most "
                    "max_num_seqs x max_model_len tokens", kv_cache_tokens)
        kv_cache_tokens = min(kv_cache_tokens, -(-max_num_seqs * max_model_len // block_size) * block_size)
    # CPU ranks share one host: each plans with its share of it
    per_device = device_memory_bytes(dev) // (tp_size if dev.type == "cpu" else 1)
    plan = memory.plan_memory(
        arch, quantization=quantization, dtype=dt, device=dev.type, device_memory_bytes=per_device,
        kv_cache_memory_fraction=kv_cache_memory_fraction, max_model_len=max_model_len,
        max_num_seqs=max_num_seqs, block_size=block_size, max_batch_tokens=max_batch_tokens,
        tensor_parallel_size=tp_size, max_tensor_parallel_size=max(tp_size, memory.SERVER_MAX_TENSOR_PARALLEL_SIZE),
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
    workers = None
    if tp_size > 1:  # started first: every rank loads its shard at the same time
        from fleetserve_server.runner.distributed import Workers, WorkerSpec, rank_device

        dev = rank_device(dev, 0)
        workers = Workers(tp_size, WorkerSpec(
            path=str(resolved.path), dtype=dt, device=dev.type, quantization=quantization,
            max_positions=max_model_len, num_blocks=num_blocks, block_size=block_size, threads=num_threads,
            keep_layers=tuple(keep_layers)), dev)
    try:
        loaded = load_model(resolved.path, dtype=dt, device=dev, quantization=quantization,
                            max_positions=max_model_len, keep_layers=keep_layers,
                            tp=workers.tp if workers is not None else None)
        tokenizer = load_tokenizer(resolved.path)
        host_ranks = tp_size if dev.type == "cpu" else 1  # CPU ranks commit their caches in one host's memory
        check_memory_free(dev, kv_bytes=capacity * plan.kv_bytes_per_token * host_ranks,
                          reserve_bytes=plan.activation_reserve_bytes * host_ranks, capacity=capacity)
        runner = TorchModelRunner(loaded.model, num_blocks=num_blocks, block_size=block_size,
                                  eos_token_ids=eos_token_ids(resolved.path, config, tokenizer), seed=seed,
                                  workers=workers)
        if workers is not None:
            workers.wait_loaded()
    except BaseException:
        if workers is not None:
            workers.stop()
        raise
    engine = LLMEngine(engine_config, runner, tokenizer, clock)
    return LoadedEngine(
        engine=engine, runner=runner, tokenizer=tokenizer,
        model_name=served_model_name or resolved.served_name, model_path=str(resolved.path),
        memory_plan=plan, quantization=quantization, dtype=dt, device=dev.type,
        weights_bytes=loaded.weights_bytes, kv_cache_bytes=runner.kv_cache_bytes, max_model_len=max_model_len,
        tensor_parallel_size=tp_size,
    )


def _check_tensor_parallel(arch: memory.ModelArchitecture, size: int, device: str, dev: torch.device) -> None:
    """Raise ValueError unless ``size`` ranks can split ``arch`` on this machine's devices."""
    from fleetserve_server.sharding import check_tensor_parallel_size

    check_tensor_parallel_size(arch, size)  # names the valid sizes
    if dev.type == "cuda":
        if device.startswith("cuda:"):
            raise ValueError(f"device={device!r} names one GPU; tensor_parallel_size {size} uses cuda:0 .. "
                             f"cuda:{size - 1}: use device='cuda' or 'auto'")
        if torch.cuda.device_count() < size:
            raise ValueError(f"tensor_parallel_size {size} needs {size} GPUs; this machine has "
                             f"{torch.cuda.device_count()}")


def check_memory_free(dev: torch.device, *, kv_bytes: int, reserve_bytes: int, capacity: int) -> None:
    """Raise ``InsufficientMemoryError`` (naming the numbers) unless the KV cache and the
    activation reserve fit in the memory still free now, after the weights are loaded.

    Checked before the cache is touched: on CPU an overcommitted page fault is answered by
    the OOM killer (SIGKILL, no message), on CUDA by an allocator error without the plan.
    """
    need = kv_bytes + reserve_bytes
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        where = f"free on {dev}"
    else:
        budget = resources.memory_budget()
        free = budget.available_bytes
        where = (f"free of the {budget.source} ({_gib(budget.limit_bytes)}; this process holds "
                 f"{_gib(resources.process_rss_bytes())} after loading the weights)")
    if need > free:
        raise InsufficientMemoryError(
            f"cannot commit the planned memory: the KV cache ({capacity} tokens = {_gib(kv_bytes)}) plus "
            f"{_gib(reserve_bytes)} of activations need {_gib(need)}, but only {_gib(free)} is {where}; "
            "lower kv_cache_tokens (or max_num_seqs / max_model_len), or raise the memory limit"
        )


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB"


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
