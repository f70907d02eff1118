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
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

QUANTIZATIONS = ("none", "int8", "nf4", "fp4")
DTYPES = ("auto", "float32", "bfloat16", "float16")
GiB = 1024**3
MiB = 1024**2

# bitsandbytes 4-bit layout as the loader quantizes: one absmax per 32 values
# (bitsandbytes' default is 64; see runner/loader.py for why 32); with nested
# quantization the absmaxes are uint8 with a float32 scale per 256 of them.
BNB4_BLOCKSIZE = 32
_BNB4_NESTED_BLOCK = 256


@dataclass(frozen=True)
class ModelArchitecture:
    """The config numbers that decide a Llama-family model's memory.

    ``num_parameters`` counts every parameter once (tied embeddings once).
    """

    name: str
    num_parameters: int
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool

    @property
    def linear_parameters(self) -> int:
        """Weights of the per-layer Linear layers (q, k, v, o, gate, up, down):
        the ones bitsandbytes quantizes."""
        q, kv = self.num_attention_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return self.num_layers * _linear_weights_per_layer(self.hidden_size, self.intermediate_size, q, kv)

    @property
    def linear_output_rows(self) -> int:
        """Sum of out_features over the quantized Linear layers (one int8 scale each)."""
        q, kv = self.num_attention_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = q + 2 * kv + self.hidden_size + 2 * self.intermediate_size + self.hidden_size
        return self.num_layers * per_layer

    @property
    def embedding_parameters(self) -> int:
        """Input embedding plus lm_head (once if tied); never quantized."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)


def _linear_weights_per_layer(hidden: int, intermediate: int, q: int, kv: int) -> int:
    """Weights of one layer's q, k, v, o projections and its MLP's gate, up, down
    (``q``/``kv``: query and key/value widths, heads x head_dim)."""
    return hidden * q + 2 * hidden * kv + q * hidden + 3 * hidden * intermediate


def count_parameters(
    *,
    num_layers: int,
    hidden_size: int,
    intermediate_size: int,
    num_attention_heads: int,
    num_kv_heads: int,
    head_dim: int,
    vocab_size: int,
    tie_word_embeddings: bool,
    attention_bias: bool = False,
    qk_norm: bool = False,
    mlp_bias: bool = False,
) -> int:
    """Parameters of a Llama-family decoder (Llama, Mistral, Qwen2 with qkv
    bias, Qwen3 with per-head q/k norms)."""
    h, i = hidden_size, intermediate_size
    q, kv = num_attention_heads * head_dim, num_kv_heads * head_dim
    per_layer = _linear_weights_per_layer(h, i, q, kv) + 2 * h  # projections + two RMSNorms
    if attention_bias:
        per_layer += q + 2 * kv
    if qk_norm:
        per_layer += 2 * head_dim
    if mlp_bias:
        per_layer += 2 * i + h
    embeddings = vocab_size * h * (1 if tie_word_embeddings else 2)
    return num_layers * per_layer + embeddings + h  # + final norm


_SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def architecture_from_config(config: dict[str, Any], name: str = "") -> ModelArchitecture:
    """Read a Hugging Face ``config.json`` dict (Llama, Mistral, Qwen2, Qwen3)."""
    model_type = str(config.get("model_type", "")).lower()
    if model_type not in _SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"config.json model_type {model_type!r} is not supported by the memory planner; "
            f"supported: {', '.join(_SUPPORTED_MODEL_TYPES)}"
        )
    try:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        # the shape fields shared by count_parameters and ModelArchitecture
        shape: dict[str, Any] = {
            "num_layers": int(config["num_hidden_layers"]),
            "hidden_size": hidden,
            "intermediate_size": int(config["intermediate_size"]),
            "num_attention_heads": heads,
            "num_kv_heads": int(config.get("num_key_value_heads") or heads),
            "head_dim": int(config.get("head_dim") or hidden // heads),
            "vocab_size": int(config["vocab_size"]),
            "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
        }
    except KeyError as exc:
        raise ValueError(f"config.json lacks the field {exc.args[0]!r}") from exc
    num_parameters = count_parameters(
        **shape,
        # Qwen2 always has q/k/v biases; Llama and Qwen3 say so in the config
        attention_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
        qk_norm=model_type == "qwen3",
        mlp_bias=bool(config.get("mlp_bias", False)),
    )
    return ModelArchitecture(
        name=name or str(config.get("_name_or_path") or model_type), num_parameters=num_parameters, **shape
    )


def _config(
    model_type: str, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int,
    vocab: int, tied: bool, head_dim: int | None = None,
) -> dict[str, Any]:
    return {
        "model_type": model_type, "num_hidden_layers": layers, "hidden_size": hidden,
        "intermediate_size": intermediate, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "tie_word_embeddings": tied,
        "head_dim": head_dim or hidden // heads,
    }


# Canonical name -> (config numbers from the model's config.json, aliases).
_CATALOG: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "SmolLM2-135M-Instruct": (
        _config("llama", 30, 576, 1536, 9, 3, 49152, True),
        ("smollm2-135m-instruct", "smollm2-135m", "huggingfacetb/smollm2-135m-instruct",
         "huggingfacetb/smollm2-135m"),
    ),
    "SmolLM2-360M-Instruct": (
        _config("llama", 32, 960, 2560, 15, 5, 49152, True),
        ("smollm2-360m-instruct", "smollm2-360m", "huggingfacetb/smollm2-360m-instruct",
         "huggingfacetb/smollm2-360m"),
    ),
    "SmolLM2-1.7B-Instruct": (
        _config("llama", 24, 2048, 8192, 32, 32, 49152, True),
        ("smollm2-1.7b-instruct", "smollm2-1.7b", "huggingfacetb/smollm2-1.7b-instruct",
         "huggingfacetb/smollm2-1.7b"),
    ),
    "Llama-3.1-8B-Instruct": (
        _config("llama", 32, 4096, 14336, 32, 8, 128256, False),
        ("llama-3.1-8b-instruct", "llama-3.1-8b", "meta-llama/llama-3.1-8b-instruct",
         "meta-llama/llama-3.1-8b", "meta-llama/meta-llama-3.1-8b-instruct",
         "meta-llama/meta-llama-3.1-8b"),
    ),
    "Llama-3.1-70B-Instruct": (
        _config("llama", 80, 8192, 28672, 64, 8, 128256, False),
        ("llama-3.1-70b-instruct", "llama-3.1-70b", "meta-llama/llama-3.1-70b-instruct",
         "meta-llama/llama-3.1-70b", "meta-llama/meta-llama-3.1-70b-instruct",
         "meta-llama/meta-llama-3.1-70b"),
    ),
    "Mistral-7B-Instruct-v0.3": (
        _config("mistral", 32, 4096, 14336, 32, 8, 32768, False),
        ("mistral-7b-instruct-v0.3", "mistral-7b-v0.3", "mistral-7b", "mistral-7b-instruct",
         "mistralai/mistral-7b-instruct-v0.3", "mistralai/mistral-7b-v0.3"),
    ),
    "Mistral-7B-Instruct-v0.1": (
        _config("mistral", 32, 4096, 14336, 32, 8, 32000, False),
        ("mistral-7b-instruct-v0.1", "mistral-7b-v0.1", "mistral-7b-instruct-v0.2",
         "mistralai/mistral-7b-v0.1", "mistralai/mistral-7b-instruct-v0.1",
         "mistralai/mistral-7b-instruct-v0.2"),
    ),
    "Qwen2.5-7B-Instruct": (
        _config("qwen2", 28, 3584, 18944, 28, 4, 152064, False),
        ("qwen2.5-7b-instruct", "qwen2.5-7b", "qwen/qwen2.5-7b-instruct", "qwen/qwen2.5-7b"),
    ),
    "Qwen2.5-72B-Instruct": (
        _config("qwen2", 80, 8192, 29568, 64, 8, 152064, False),
        ("qwen2.5-72b-instruct", "qwen2.5-72b", "qwen/qwen2.5-72b-instruct", "qwen/qwen2.5-72b"),
    ),
}

_ALIASES: dict[str, str] = {
    alias: canonical for canonical, (_, aliases) in _CATALOG.items() for alias in (canonical.lower(), *aliases)
}


def catalog_names() -> list[str]:
    """The canonical names of the built-in catalog."""
    return list(_CATALOG)


def known_architecture(model_spec: str) -> ModelArchitecture | None:
    """The architecture for a model spec, offline, or None if unknown.

    Accepts ``builtin:smollm2-135m-instruct``, ``hf:org/name``, ``org/name``
    and plain catalog names, case-insensitively; a local directory with a
    ``config.json`` is read instead.
    """
    spec = model_spec.strip()
    path = Path(spec).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            return None
        return architecture_from_config(json.loads(config_file.read_text()), name=path.name)
    key = spec.lower()
    for prefix in ("builtin:", "hf:"):
        if key.startswith(prefix):
            key = key[len(prefix):]
    key = key.split("@", 1)[0]  # hf:org/name@revision
    canonical = _ALIASES.get(key) or _ALIASES.get(key.rsplit("/", 1)[-1])
    if canonical is None:
        return None
    return architecture_from_config(_CATALOG[canonical][0], name=canonical)


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


def weight_bytes(arch: ModelArchitecture, quantization: str, dtype: str, device: str) -> int:
    """Bytes of the loaded model's parameters and quantization state."""
    q = _check_quantization(quantization)
    elem = dtype_bytes(dtype, device)
    packed_lm_head = 0
    if q == "none" and device.lower() == "cpu" and resolved_dtype(dtype, device) == "float32" \
            and arch.tie_word_embeddings:
        packed_lm_head = arch.vocab_size * arch.hidden_size * elem  # the packed copy of the tied lm_head
    if q == "none":
        return arch.num_parameters * elem + packed_lm_head
    linear = arch.linear_parameters
    unquantized = (arch.num_parameters - linear) * elem
    if q == "int8":
        return unquantized + linear + arch.linear_output_rows * 4
    # nf4/fp4: two values per byte, uint8 absmax per 32 values, float32 per 256 absmaxes
    blocks = math.ceil(linear / BNB4_BLOCKSIZE)
    return unquantized + math.ceil(linear / 2) + blocks + math.ceil(blocks / _BNB4_NESTED_BLOCK) * 4


def activation_reserve_bytes(
    arch: ModelArchitecture, *, dtype: str, device: str, max_batch_tokens: int, max_num_seqs: int
) -> int:
    """Memory set aside for one step's activations, not given to the KV cache.

    The widest live tensors of a step over ``max_batch_tokens`` tokens: the
    residual stream, q/k/v, and the MLP's gate, up and product (three
    ``intermediate`` wide), plus float32 logits and probabilities for the
    sampled sequences; on CUDA 256 MiB more for the allocator's fragmentation
    and library workspaces.
    """
    elem = dtype_bytes(dtype, device)
    qkv = (arch.num_attention_heads + 2 * arch.num_kv_heads) * arch.head_dim
    per_token = (2 * arch.hidden_size + qkv + 3 * arch.intermediate_size) * elem
    logits = max_num_seqs * arch.vocab_size * 4 * 2
    fixed = 256 * MiB if device.lower() != "cpu" else 0
    return max_batch_tokens * per_token + logits + fixed


def kv_bytes_per_token(arch: ModelArchitecture, dtype: str, device: str) -> int:
    """``2 x layers x kv_heads x head_dim x dtype bytes`` (K and V of every layer)."""
    return 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * dtype_bytes(dtype, device)


@dataclass(frozen=True)
class MemoryPlan:
    """What ``plan_memory`` decided; all sizes in bytes.

    ``kv_capacity_tokens`` is a whole number of blocks; ``fits`` is true iff it
    holds at least one sequence of ``max_model_len`` tokens.
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

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_capacity_tokens * self.kv_bytes_per_token

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


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
) -> MemoryPlan:
    """Split ``device_memory_bytes x kv_cache_memory_fraction`` into weights,
    an activation reserve and the KV cache.

    ``max_concurrent_sequences`` is how many ``max_model_len`` sequences the KV
    cache holds at once, capped at ``max_num_seqs``.
    """
    q = _check_quantization(quantization)
    if not 0.0 < kv_cache_memory_fraction <= 1.0:
        raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {kv_cache_memory_fraction!r}")
    for field_name, value in (("device_memory_bytes", device_memory_bytes), ("max_model_len", max_model_len),
                              ("max_num_seqs", max_num_seqs), ("block_size", block_size),
                              ("max_batch_tokens", max_batch_tokens)):
        if value < 1:
            raise ValueError(f"{field_name} must be >= 1, got {value!r}")
    usable = int(device_memory_bytes * kv_cache_memory_fraction)
    weights = weight_bytes(arch, q, dtype, device)
    reserve = activation_reserve_bytes(
        arch, dtype=dtype, device=device, max_batch_tokens=max_batch_tokens, max_num_seqs=max_num_seqs
    )
    per_token = kv_bytes_per_token(arch, dtype, device)
    free = max(0, usable - weights - reserve)
    capacity = (free // per_token) // block_size * block_size
    seq_tokens = math.ceil(max_model_len / block_size) * block_size
    concurrent = min(max_num_seqs, capacity // seq_tokens)
    fits = capacity >= max_model_len
    if fits:
        message = (
            f"fits: {_gib(weights)} weights + {_gib(reserve)} activations leave {_gib(capacity * per_token)} "
            f"for {capacity} KV tokens = {capacity // seq_tokens} sequences of maxModelLen {max_model_len}"
        )
    else:
        message = _not_fitting_message(
            arch, q=q, dtype=dtype, device=device, usable=usable, device_memory_bytes=device_memory_bytes,
            fraction=kv_cache_memory_fraction, weights=weights, reserve=reserve, per_token=per_token,
            max_model_len=max_model_len, capacity=capacity,
        )
    return MemoryPlan(
        model=arch.name,
        quantization=q,
        dtype=resolved_dtype(dtype, device),
        device=device,
        device_memory_bytes=device_memory_bytes,
        usable_bytes=usable,
        weights_bytes=weights,
        activation_reserve_bytes=reserve,
        kv_bytes_per_token=per_token,
        kv_capacity_tokens=capacity,
        max_model_len=max_model_len,
        max_concurrent_sequences=concurrent,
        fits=fits,
        message=message,
    )


def _not_fitting_message(
    arch: ModelArchitecture, *, q: str, dtype: str, device: str, usable: int, device_memory_bytes: int,
    fraction: float, weights: int, reserve: int, per_token: int, max_model_len: int, capacity: int,
) -> str:
    kv_needed = max_model_len * per_token
    head = (
        f"does not fit: needs {_gib(weights)} for weights + {_gib(reserve)} activations + "
        f"{_gib(kv_needed)} KV at maxModelLen {max_model_len}; {_gib(usable)} usable "
        f"({_gib(device_memory_bytes)} x kvCacheMemoryFraction {fraction:g})"
    )
    ways: list[str] = []
    # suggest the least aggressive quantization that would fit
    smaller_options = {"none": ("int8", "nf4"), "int8": ("nf4",)}.get(q, ())
    for smaller in smaller_options:
        if usable - weight_bytes(arch, smaller, dtype, device) - reserve >= kv_needed:
            ways.append(f"use quantization {smaller}")
            break
    if capacity >= 16 and capacity < max_model_len:
        ways.append(f"lower maxModelLen to {capacity} or less")
    ways.append("use a GPU with more memory")
    return f"{head} — " + ", or ".join(ways)


def num_kv_blocks(plan: MemoryPlan, block_size: int) -> int:
    """KV blocks of ``block_size`` tokens the plan's capacity makes."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size!r}")
    return plan.kv_capacity_tokens // block_size
