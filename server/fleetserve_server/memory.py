"""The memory planner: will a model, quantized or not, and its KV cache fit a device?

Pure Python (no torch): the operator imports it to fill ``status.memory`` and
the ``MemoryFits`` condition, the server sizes its KV cache with the same
``plan_memory`` so prediction and allocation agree, and ``fleetserve plan``
prints it.

The arithmetic, in bytes:

* weights: every parameter at the dtype's size, except that with ``int8`` the
  transformer's Linear weights take 1 byte per parameter plus one float32
  scale per output row (bitsandbytes LLM.int8), and with ``nf4``/``fp4`` half a
  byte per parameter plus a uint8 absmax per 32-value block, itself quantized
  with one float32 scale per 256 blocks (bitsandbytes' nested "double"
  quantization). Embeddings, norms, biases and the lm_head stay at the dtype's
  size; tied embeddings are counted once — except unquantized on CPU in
  float32, where the runner packs the lm_head for oneDNN
  (``runner.model.pack_cpu_linears``) and a tied lm_head's packed copy adds
  ``vocab x hidden x 4`` bytes.
* KV per token: ``2 (K and V) x layers x kv_heads x head_dim x dtype bytes``.
* KV capacity: ``(device memory x fraction - weights - activation reserve) /
  KV per token``, rounded down to whole blocks.

Every number is per device. With ``tensor_parallel_size`` N each rank holds
its Megatron shard (``fleetserve_server.sharding``: heads, KV heads, MLP
width and vocabulary split N ways; norms replicated), so weights, KV bytes per
token and the activation reserve are computed per rank, and the model fits only
when every rank holds one ``max_model_len`` sequence.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

# re-exported: the operator and the CLI import the model catalog from here
from fleetserve_server.architecture import (  # noqa: F401
    ModelArchitecture,
    architecture_from_config,
    catalog_names,
    count_parameters,
    known_architecture,
)
from fleetserve_server.sharding import RankShard, check_tensor_parallel_size, rank_shard, rank_shards

QUANTIZATIONS = ("none", "int8", "nf4", "fp4")
DTYPES = ("auto", "float32", "bfloat16", "float16")
GiB = 1024**3
MiB = 1024**2

# The largest tensor-parallel size `fleetserve serve --tensor-parallel-size` runs:
# one process per GPU of one pod (one host, NCCL over its NVLink/PCIe), as the
# operator passes resources.gpus. Eight is a node's usual GPU count; a pod asking
# for more is planned (and served) as eight ranks, the others idle.
SERVER_MAX_TENSOR_PARALLEL_SIZE = 8

# bitsandbytes 4-bit layout as the loader quantizes: one absmax per 32 values
# (bitsandbytes' default is 64; see runner/loader.py for why 32); with nested
# quantization the absmaxes are uint8 with a float32 scale per 256 of them.
BNB4_BLOCKSIZE = 32
_BNB4_NESTED_BLOCK = 256


_QUANTITY = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")
_BINARY = {"ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4, "pi": 1024**5, "ei": 1024**6}
_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15, "e": 10**18}


def parse_quantity(s: str) -> int:
    """Bytes from a Kubernetes quantity: ``80Gi``, ``24GiB``, ``16G``, ``512Mi``, ``1e9``, ``1024``.

    Binary suffixes (Ki..Ei, with or without a trailing ``B``) are powers of
    1024, decimal ones (k, M, G, T, P, E, or kB, MB, GB...) powers of 1000.
    """
    match = _QUANTITY.match(str(s))
    if not match:
        raise ValueError(f"{s!r} is not a memory quantity; write e.g. 24GiB, 80Gi, 16G, 512Mi or plain bytes")
    number, suffix = float(match.group(1)), match.group(2)
    unit = suffix.lower()
    if unit.endswith("b") and unit not in ("b",):
        unit = unit[:-1]
    if unit in ("", "b"):
        factor = 1
    elif unit in _BINARY:
        factor = _BINARY[unit]
    elif unit in _DECIMAL and suffix != "m":  # Kubernetes "m" is milli, meaningless for bytes
        factor = _DECIMAL[unit]
    else:
        raise ValueError(
            f"{s!r} has an unknown unit {suffix!r}; use Ki, Mi, Gi, Ti (powers of 1024) or k, M, G, T"
        )
    return int(number * factor)


def dtype_bytes(dtype: str, device: str) -> int:
    """Bytes per element of the compute dtype; ``auto`` is float32 on CPU and bfloat16 on CUDA."""
    dtype = dtype.lower()
    if dtype == "auto":
        return 4 if device.lower() == "cpu" else 2
    sizes = {"float32": 4, "bfloat16": 2, "float16": 2}
    if dtype not in sizes:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return sizes[dtype]


def resolved_dtype(dtype: str, device: str) -> str:
    """The concrete dtype ``auto`` stands for on ``device``."""
    if dtype.lower() != "auto":
        return dtype.lower()
    return "float32" if device.lower() == "cpu" else "bfloat16"


def _check_quantization(quantization: str) -> str:
    q = quantization.lower()
    if q not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r} is not supported; use one of {', '.join(QUANTIZATIONS)}")
    return q


def weight_bytes(
    arch: ModelArchitecture, quantization: str, dtype: str, device: str, *, tensor_parallel_size: int = 1,
    rank: int = 0,
) -> int:
    """Bytes of the parameters and quantization state one device holds: rank
    ``rank`` of a ``tensor_parallel_size``-way split (the whole model at 1)."""
    q = _check_quantization(quantization)
    return _shard_weight_bytes(arch, rank_shard(arch, tensor_parallel_size, rank), q, dtype, device)


def _shard_weight_bytes(arch: ModelArchitecture, shard: RankShard, q: str, dtype: str, device: str) -> int:
    elem = dtype_bytes(dtype, device)
    if q == "none":
        packed_lm_head = 0
        if device.lower() == "cpu" and resolved_dtype(dtype, device) == "float32" and arch.tie_word_embeddings:
            packed_lm_head = shard.vocab_rows * arch.hidden_size * elem  # the packed copy of the tied lm_head
        return (shard.linear_parameters + shard.other_parameters) * elem + packed_lm_head
    # each rank quantizes its own shard of every Linear
    linear = shard.linear_parameters
    unquantized = shard.other_parameters * elem
    if q == "int8":
        return unquantized + linear + shard.linear_output_rows * 4
    # nf4/fp4: two values per byte, uint8 absmax per 32 values, float32 per 256 absmaxes
    blocks = math.ceil(linear / BNB4_BLOCKSIZE)
    return unquantized + math.ceil(linear / 2) + blocks + math.ceil(blocks / _BNB4_NESTED_BLOCK) * 4


def dequant_workspace_bytes(arch: ModelArchitecture, shard: RankShard, quantization: str, dtype: str,
                            device: str) -> int:
    """The CPU 4-bit layers' one shared dequantization buffer (``runner.qlinear.Workspace``): this
    rank's largest quantized Linear (out x in, fused q/k/v and gate/up) in the compute dtype plus a
    float32 absmax per 32-value block. 0 unquantized, for int8 (no buffer) and off CPU (CUDA keeps
    bitsandbytes' kernels)."""
    if quantization not in ("nf4", "fp4") or device.lower() != "cpu":
        return 0
    q, kv, hidden = shard.attention_heads * arch.head_dim, shard.kv_heads * arch.head_dim, arch.hidden_size
    largest = max((q + 2 * kv) * hidden, hidden * q, 2 * shard.intermediate_size * hidden,
                  hidden * shard.intermediate_size)
    return largest * dtype_bytes(dtype, device) + math.ceil(largest / BNB4_BLOCKSIZE) * 4


# The paged attention's working memory (``runner.paged_attention``): the CPU kernel's per-thread
# scores (a tile of ATTENTION_QUERY_TILE tokens x ``group`` query heads x the context) for at most
# ATTENTION_MAX_THREADS threads, and the torch fallback's (CUDA) window of (query, key) pairs,
# FALLBACK_ATTENTION_BYTES at most.
ATTENTION_MAX_THREADS = 64
ATTENTION_QUERY_TILE = 16  # kTile in runner/csrc/paged_attention.cpp
FALLBACK_ATTENTION_BYTES = 64 * MiB


def fallback_attention_pair_bytes(heads: int, kv_heads: int, head_dim: int) -> int:
    """Bytes the torch fallback holds per (query, key) pair: the pair's query heads and the
    probability-weighted values (float32, ``heads x head_dim`` each), its key and value rows
    (float32, ``kv_heads x head_dim`` each), scores and weights per head, and five int64 indices."""
    return (2 * heads * head_dim + 2 * kv_heads * head_dim + 2 * heads) * 4 + 5 * 8


def attention_workspace_bytes(arch: ModelArchitecture, shard: RankShard, *, device: str, max_model_len: int,
                              max_batch_tokens: int) -> int:
    """The paged attention's working memory on one rank (no per-step copy of the KV cache:
    attention reads it in place). CPU: each thread's float32 scores, query and accumulator rows for
    one (query tile, kv head) at ``max_model_len`` context. Elsewhere: the torch fallback's pair window
    plus its running float32 maximum, sum and weighted values per token and head."""
    heads, kv = shard.attention_heads, shard.kv_heads
    group = max(1, heads // kv)
    if device.lower() == "cpu":
        rows = ATTENTION_QUERY_TILE * group
        return ATTENTION_MAX_THREADS * rows * (max_model_len + 2 * arch.head_dim + 2) * 4
    return FALLBACK_ATTENTION_BYTES + max_batch_tokens * heads * (arch.head_dim + 2) * 4


def activation_reserve_bytes(
    arch: ModelArchitecture, *, dtype: str, device: str, max_batch_tokens: int, max_num_seqs: int,
    tensor_parallel_size: int = 1, rank: int = 0, quantization: str = "none", max_model_len: int = 0,
) -> int:
    """Memory one device sets aside for a step's activations, not given to the KV cache.

    The widest live tensors of a step over ``max_batch_tokens`` tokens: the
    residual stream, this rank's q/k/v heads, and its share of the MLP's gate,
    up and product (three ``intermediate / N`` wide), plus float32 logits and
    probabilities: the full vocabulary on rank 0, where the sampler gathers
    them, and a ``vocab / N`` shard on the other ranks. On CUDA 256 MiB more
    for the allocator's fragmentation and library workspaces. With
    ``tensor_parallel_size > 1`` one more ``hidden``-wide buffer per token for
    the all-reduce, and on CUDA 256 MiB for NCCL's communicator buffers (its
    default 4 MiB per channel x up to 32 channels x send and receive).
    With ``nf4``/``fp4`` on CPU the dequantization buffer the 4-bit layers share
    (``dequant_workspace_bytes``). The attention phase's per-token temporaries (the roped q|k,
    the K/V stacked for the cache write, a contiguous q and the output) are counted when they
    exceed the MLP's three ``intermediate`` rows (they never do for Llama-family shapes), and
    the paged attention's fixed workspace for ``max_model_len`` (``attention_workspace_bytes``).
    """
    n = tensor_parallel_size
    shard = rank_shard(arch, n, rank)
    elem = dtype_bytes(dtype, device)
    qkv = (shard.attention_heads + 2 * shard.kv_heads) * arch.head_dim
    attention = (shard.attention_heads + shard.kv_heads + 2 * shard.kv_heads + 2 * shard.attention_heads) * arch.head_dim
    per_token = (2 * arch.hidden_size + qkv + max(3 * shard.intermediate_size, attention)) * elem
    if rank == 0:
        logits = max_num_seqs * (arch.vocab_size * 2 + (shard.vocab_rows if n > 1 else 0)) * 4
    else:
        logits = max_num_seqs * shard.vocab_rows * 4
    fixed = 256 * MiB if device.lower() != "cpu" else 0
    if n > 1:
        per_token += arch.hidden_size * elem
        fixed += 256 * MiB if device.lower() != "cpu" else 0
    fixed += dequant_workspace_bytes(arch, shard, quantization, dtype, device)
    fixed += attention_workspace_bytes(arch, shard, device=device, max_model_len=max_model_len,
                                       max_batch_tokens=max_batch_tokens)
    return max_batch_tokens * per_token + logits + fixed


def kv_bytes_per_token(arch: ModelArchitecture, dtype: str, device: str, *, tensor_parallel_size: int = 1) -> int:
    """K and V of every layer for one token on one device:
    ``2 x layers x kv_heads_per_rank x head_dim x dtype bytes``, where a rank
    holds ``kv_heads / N`` heads, or one (replicated) when ``kv_heads < N``."""
    shard = rank_shard(arch, tensor_parallel_size, 0)
    return 2 * arch.num_layers * shard.kv_heads * arch.head_dim * dtype_bytes(dtype, device)


@dataclass(frozen=True)
class RankPlan:
    """One device's share of a plan (bytes). ``kv_capacity_tokens`` is what this
    device alone would hold; every rank holds the same tokens, so the plan's
    capacity is the smallest of them."""

    rank: int
    weights_bytes: int
    activation_reserve_bytes: int
    kv_bytes_per_token: int
    kv_capacity_tokens: int
    headroom_bytes: int  # usable - weights - reserve; negative: the weights alone do not fit


@dataclass(frozen=True)
class MemoryPlan:
    """What ``plan_memory`` decided; all sizes in bytes, per device.

    ``device_memory_bytes`` and ``usable_bytes`` are one device's;
    ``weights_bytes``, ``activation_reserve_bytes`` and ``kv_bytes_per_token``
    are rank 0's (the largest shard, the one that decides; with
    ``tensor_parallel_size`` 1 the whole model). ``kv_capacity_tokens`` is a
    whole number of blocks that every rank holds; ``fits`` is true iff it holds
    at least one sequence of ``max_model_len`` tokens. ``ranks`` has every
    device's numbers.
    """

    model: str
    quantization: str
    dtype: str
    device: str
    device_memory_bytes: int
    usable_bytes: int
    weights_bytes: int
    activation_reserve_bytes: int
    kv_bytes_per_token: int
    kv_capacity_tokens: int
    max_model_len: int
    max_concurrent_sequences: int
    fits: bool
    message: str
    tensor_parallel_size: int = 1
    ranks: tuple[RankPlan, ...] = ()

    @property
    def kv_cache_bytes(self) -> int:
        """KV-cache bytes on each device."""
        return self.kv_capacity_tokens * self.kv_bytes_per_token

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


@dataclass(frozen=True)
class _Sizing:
    """The arguments every rank is planned with."""

    arch: ModelArchitecture
    quantization: str
    dtype: str
    device: str
    usable: int
    max_batch_tokens: int
    max_num_seqs: int
    block_size: int
    max_model_len: int = 0


def _rank_plans(s: _Sizing, quantization: str, tensor_parallel_size: int) -> list[RankPlan]:
    per_token = kv_bytes_per_token(s.arch, s.dtype, s.device, tensor_parallel_size=tensor_parallel_size)
    plans = []
    for shard in rank_shards(s.arch, tensor_parallel_size):
        weights = _shard_weight_bytes(s.arch, shard, quantization, s.dtype, s.device)
        reserve = activation_reserve_bytes(
            s.arch, dtype=s.dtype, device=s.device, max_batch_tokens=s.max_batch_tokens,
            max_num_seqs=s.max_num_seqs, tensor_parallel_size=tensor_parallel_size, rank=shard.rank,
            quantization=quantization, max_model_len=s.max_model_len,
        )
        headroom = s.usable - weights - reserve
        capacity = (max(0, headroom) // per_token) // s.block_size * s.block_size
        plans.append(RankPlan(shard.rank, weights, reserve, per_token, capacity, headroom))
    return plans


def plan_memory(
    arch: ModelArchitecture,
    *,
    quantization: str,
    dtype: str,
    device: str,
    device_memory_bytes: int,
    kv_cache_memory_fraction: float = 0.9,
    max_model_len: int,
    max_num_seqs: int = 32,
    block_size: int = 16,
    max_batch_tokens: int = 2048,
    tensor_parallel_size: int = 1,
    max_tensor_parallel_size: int = 8,
) -> MemoryPlan:
    """Split each device's ``device_memory_bytes x kv_cache_memory_fraction``
    into its weight shard, an activation reserve and its share of the KV cache.

    The model is split ``tensor_parallel_size`` ways (``fleetserve_server.sharding``);
    it fits only when every rank holds one ``max_model_len`` sequence.
    ``max_concurrent_sequences`` is how many ``max_model_len`` sequences the KV
    cache holds at once, capped at ``max_num_seqs``. When it does not fit, the
    message suggests more GPUs only up to ``max_tensor_parallel_size``.
    """
    q = _check_quantization(quantization)
    if not 0.0 < kv_cache_memory_fraction <= 1.0:
        raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {kv_cache_memory_fraction!r}")
    for field_name, value in (("device_memory_bytes", device_memory_bytes), ("max_model_len", max_model_len),
                              ("max_num_seqs", max_num_seqs), ("block_size", block_size),
                              ("max_batch_tokens", max_batch_tokens)):
        if value < 1:
            raise ValueError(f"{field_name} must be >= 1, got {value!r}")
    check_tensor_parallel_size(arch, tensor_parallel_size)
    sizing = _Sizing(arch, q, dtype, device, int(device_memory_bytes * kv_cache_memory_fraction),
                     max_batch_tokens, max_num_seqs, block_size, max_model_len)
    ranks = _rank_plans(sizing, q, tensor_parallel_size)
    top = ranks[0]  # the largest shard and the sampler's logits: never more room than any other rank
    capacity = min(r.kv_capacity_tokens for r in ranks)
    seq_tokens = math.ceil(max_model_len / block_size) * block_size
    concurrent = min(max_num_seqs, capacity // seq_tokens)
    fits = capacity >= max_model_len
    where = "" if tensor_parallel_size == 1 else (
        f" on each of {tensor_parallel_size} devices (rank 0, the largest shard)")
    if fits:
        message = (
            f"fits{where}: {_gib(top.weights_bytes)} weights + {_gib(top.activation_reserve_bytes)} activations "
            f"leave {_gib(capacity * top.kv_bytes_per_token)} for {capacity} KV tokens = "
            f"{capacity // seq_tokens} sequences of maxModelLen {max_model_len}"
        )
    else:
        message = _not_fitting_message(
            sizing, top, tensor_parallel_size=tensor_parallel_size, max_tp=max_tensor_parallel_size,
            device_memory_bytes=device_memory_bytes, fraction=kv_cache_memory_fraction,
            max_model_len=max_model_len, capacity=capacity,
        )
    return MemoryPlan(
        model=arch.name,
        quantization=q,
        dtype=resolved_dtype(dtype, device),
        device=device,
        device_memory_bytes=device_memory_bytes,
        usable_bytes=sizing.usable,
        weights_bytes=top.weights_bytes,
        activation_reserve_bytes=top.activation_reserve_bytes,
        kv_bytes_per_token=top.kv_bytes_per_token,
        kv_capacity_tokens=capacity,
        max_model_len=max_model_len,
        max_concurrent_sequences=concurrent,
        fits=fits,
        message=message,
        tensor_parallel_size=tensor_parallel_size,
        ranks=tuple(ranks),
    )


def _fits(s: _Sizing, quantization: str, tensor_parallel_size: int, max_model_len: int) -> RankPlan | None:
    """Rank 0's plan when every rank would hold one ``max_model_len`` sequence, else None."""
    try:
        ranks = _rank_plans(s, quantization, tensor_parallel_size)
    except ValueError:  # this size cannot split the model's heads
        return None
    return ranks[0] if min(r.kv_capacity_tokens for r in ranks) >= max_model_len else None


def _not_fitting_message(
    s: _Sizing, top: RankPlan, *, tensor_parallel_size: int, max_tp: int, device_memory_bytes: int,
    fraction: float, max_model_len: int, capacity: int,
) -> str:
    n = tensor_parallel_size
    kv_needed = max_model_len * top.kv_bytes_per_token
    short = top.weights_bytes + top.activation_reserve_bytes + kv_needed - s.usable
    where = "one device" if n == 1 else f"each of {n} devices (tensor-parallel size {n}; rank 0's shard)"
    head = (
        f"does not fit on {where}: needs {_gib(top.weights_bytes)} for weights + "
        f"{_gib(top.activation_reserve_bytes)} activations + {_gib(kv_needed)} KV at maxModelLen "
        f"{max_model_len}; {_gib(s.usable)} usable ({_gib(device_memory_bytes)} x kvCacheMemoryFraction "
        f"{fraction:g}), {_gib(max(short, 0))} short per device"
    )
    ways: list[str] = []
    # suggest the least aggressive quantization that would fit
    for smaller in {"none": ("int8", "nf4"), "int8": ("nf4",)}.get(s.quantization, ()):
        if _fits(s, smaller, n, max_model_len):
            ways.append(f"use quantization {smaller}")
            break
    more = 2 * n
    while more <= max_tp:
        rank0 = _fits(s, s.quantization, more, max_model_len)
        if rank0 is not None:
            ways.append(f"use {more} GPUs (tensor-parallel size {more}: {_gib(rank0.weights_bytes)} of weights "
                        f"per device)")
            break
        more *= 2
    if capacity >= 16 and capacity < max_model_len:
        ways.append(f"lower maxModelLen to {capacity} or less")
    ways.append("use a GPU with more memory")
    return f"{head} — " + ", or ".join(ways)


def num_kv_blocks(plan: MemoryPlan, block_size: int) -> int:
    """KV blocks of ``block_size`` tokens the plan's capacity makes."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size!r}")
    return plan.kv_capacity_tokens // block_size
