"""Model architectures for the memory planner: the config numbers that decide memory.

Pure Python (no torch). ``architecture_from_config`` reads a Hugging Face
``config.json``; ``known_architecture`` resolves a model spec offline, from a
local directory or the built-in catalog of common models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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
