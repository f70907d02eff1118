"""Load a Hugging Face checkpoint into a ``PagedCausalLM``: dtype, device, quantization.

Quantization replaces the per-layer Linear layers (q/k/v/o, gate/up/down,
fused as qkv and gate_up first) with bitsandbytes layers: ``int8`` →
``Linear8bitLt`` (LLM.int8, outlier threshold 6.0), ``nf4`` / ``fp4`` →
``Linear4bit`` in blocks of ``memory.BNB4_BLOCKSIZE`` (32) values with nested
("double") quantization of the absmax statistics. Embeddings, norms, biases
and the lm_head stay in the compute dtype — the same split
``memory.weight_bytes`` assumes, so planner and loader agree.

Why blocks of 32, not bitsandbytes' (and transformers') 64: fleetserve
quantizes the fused q/k/v and gate/up tensors, and with nested quantization
the absmax offset (their mean) and the 256-absmax groups then span q, k and v
together, so the fused tensor's absmaxes are coarser than the separate
layers' (k/v's absmaxes are smaller than q's): at 64, fleetserve's fused
weights were a little worse than transformers + bitsandbytes' separate ones
(o_proj/down_proj, never fused, are bit-identical). 32-value blocks cut the
4-bit weight error by ~11 % (nf4) / ~16 % (fp4) for 1/16 bit per weight more
(0.266x of 16-bit instead of 0.258x); the fused/separate difference at 32 is
0.01 %. ``blocksize=64`` reproduces the old layout (a benchmark knob).

``keep_layers`` keeps the Linear layers of the given decoder layer indices in
the compute dtype (the first and last layers are the most sensitive in small
models); the planner does not know about it, so it is a benchmark knob only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fleetserve_server.memory import BNB4_BLOCKSIZE
from fleetserve_server.runner.model import SUPPORTED_ARCHITECTURES, PagedCausalLM
from fleetserve_server.runner.qlinear import use_cpu_fast_path

_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
}
QUANTIZATIONS = ("none", "int8", "nf4", "fp4")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LoadedModel:
    model: PagedCausalLM
    config: dict
    dtype: str
    device: str
    quantization: str

    @property
    def weights_bytes(self) -> int:
        """Actual bytes of every parameter and buffer (quantization state included),
        tied tensors counted once; the cos/sin tables are not weights."""
        return model_bytes(self.model)


def resolve_device(device: str) -> torch.device:
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA device is available; use device='cpu' or 'auto'")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> str:
    if dtype == "auto":
        return "float32" if device.type == "cpu" else "bfloat16"
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return dtype


def read_config(path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    archs = config.get("architectures") or [_BY_MODEL_TYPE.get(str(config.get("model_type")), "")]
    if archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"model: architecture {archs[0] or config.get('model_type')!r} in {path}/config.json "
            f"is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return config


def load_model(
    path: Path,
    *,
    dtype: str,
    device: torch.device,
    quantization: str,
    max_positions: int,
    keep_layers: tuple[int, ...] = (),
    blocksize: int = BNB4_BLOCKSIZE,
    streaming: bool = True,
    tp: Any = None,
) -> LoadedModel:
    """Load ``path`` (a HF directory) and wrap it for paged execution.

    A safetensors checkpoint is streamed (``runner.streaming``): one tensor at
    a time, straight into its place on ``device``, quantized layer by layer, so
    host memory never holds the unquantized model. ``streaming=False`` (or a
    checkpoint without safetensors) loads it whole through transformers first —
    the old route, kept as the benchmark's baseline.

    ``tp`` (a ``runner.distributed.TensorParallel``): load only this rank's
    shard (``runner.tp.shard_layout``), quantizing each shard on its own; needs
    a safetensors checkpoint (nothing else is read a slice at a time)."""
    from transformers import AutoModelForCausalLM

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}; got {quantization!r}")
    if blocksize not in (32, 64, 128, 256):
        raise ValueError(f"blocksize (4-bit absmax block) must be 32, 64, 128 or 256; got {blocksize!r}")
    config = read_config(path)
    if max_positions > int(config.get("max_position_embeddings", max_positions)):
        raise ValueError(
            f"max_model_len={max_positions} exceeds the model's max_position_embeddings="
            f"{config['max_position_embeddings']}; lower max_model_len"
        )
    torch_dtype = DTYPES[dtype]
    if device.type == "cpu" and dtype == "float16":
        raise ValueError("dtype=float16 is not supported on CPU; use float32 or bfloat16")
    layout = None
    if tp is not None:
        from fleetserve_server.memory import architecture_from_config
        from fleetserve_server.runner.tp import shard_layout

        arch = architecture_from_config(config, name=path.name)
        layout = shard_layout(arch, tp.size, tp.rank)
        tp.vocab_rows = [b - a for a, b in (shard_layout(arch, tp.size, r).vocab for r in range(tp.size))]
        if not any(path.glob("*.safetensors")):
            raise ValueError(f"model: tensor parallelism loads each rank's shard from safetensors files; "
                             f"{path} has none (convert the checkpoint, or use tensor_parallel_size 1)")
    if (streaming or layout is not None) and any(path.glob("*.safetensors")):
        from fleetserve_server.runner.streaming import load_streaming

        model = load_streaming(path, dtype=torch_dtype, device=device, quantization=quantization,
                               max_positions=max_positions, keep_layers=keep_layers, blocksize=blocksize,
                               layout=layout, tp=tp)
        use_cpu_fast_path(model)
        return LoadedModel(model, config, dtype, device.type, quantization)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    hf.eval()
    hf.requires_grad_(False)
    model = PagedCausalLM(hf, max_positions=max_positions)
    if quantization != "none":
        _quantize_layers(model, quantization, torch_dtype, keep_layers, blocksize)
    model.to(device)
    model.device = device
    use_cpu_fast_path(model)
    return LoadedModel(model, config, dtype, device.type, quantization)


def import_bnb(quantization: str):  # type: ignore[no-untyped-def]
    """bitsandbytes, with its expected per-matmul int8 cast warning silenced."""
    import warnings

    # bnb warns on every int8 matmul that float32 inputs are cast to float16 (expected)
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    try:
        import bitsandbytes as bnb
    except ImportError as exc:  # pragma: no cover - it is a pinned dependency
        raise RuntimeError(f"quantization={quantization!r} needs bitsandbytes: pip install bitsandbytes") from exc
    return bnb


def _quantize_layers(
    model: PagedCausalLM, quantization: str, dtype: torch.dtype, keep: tuple[int, ...], blocksize: int
) -> None:
    bnb = import_bnb(quantization)
    for index, layer in enumerate(model.layers):
        if index in keep:
            continue
        for name in ("qkv", "o_proj", "gate_up", "down"):
            linear = getattr(layer, name)
            if type(linear) is not nn.Linear:
                raise ValueError(f"model: cannot quantize {type(linear).__name__} layers (already quantized?)")
            setattr(layer, name, to_bnb(bnb, linear, quantization, dtype, blocksize))


def to_bnb(  # type: ignore[no-untyped-def]
    bnb, linear: nn.Linear, quantization: str, dtype: torch.dtype, blocksize: int, device: str | None = None
) -> nn.Module:
    """The bitsandbytes layer for ``linear`` (quantized when moved to a device); ``device="meta"``
    builds it without allocating the constructor's throwaway weight."""
    weight = linear.weight.data
    has_bias = linear.bias is not None
    if quantization == "int8":
        q = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False, threshold=6.0,
            device=device,
        )
        q.weight = bnb.nn.Int8Params(weight.contiguous(), requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=has_bias, compute_dtype=dtype,
            compress_statistics=True, quant_type=quantization, quant_storage=torch.uint8, device=device,
        )
        q.weight = bnb.nn.Params4bit(
            weight.contiguous(), requires_grad=False, compress_statistics=True, quant_type=quantization,
            blocksize=blocksize,
        )
    if has_bias:
        q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)  # type: ignore[union-attr]
    return q


def model_bytes(model: nn.Module) -> int:
    """Bytes of unique parameters and buffers plus bitsandbytes quantization state."""
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if t is None or not isinstance(t, torch.Tensor):
            return
        key = id(t) if t.is_mkldnn else t.data_ptr()  # a oneDNN-packed weight has no data_ptr
        if key in seen or t.numel() == 0:
            return
        seen.add(key)
        total += t.numel() * t.element_size()

    for p in model.parameters():
        add(p)
        state = getattr(p, "quant_state", None)
        if state is not None:
            add(state.absmax)
            if state.state2 is not None:
                add(state.state2.absmax)
                add(state.state2.code)
            add(state.code)
        add(getattr(p, "SCB", None))
    for name, b in model.named_buffers():
        if name in ("cos", "sin"):
            continue
        add(b)
    for module in model.modules():
        state = getattr(module, "state", None)
        if state is not None and hasattr(state, "SCB"):
            add(state.SCB)
    return total
