"""Streaming load: the model's skeleton costs no memory, then each tensor goes straight to its place.

transformers' ``from_pretrained`` materializes the whole model in host memory
in the compute dtype before fleetserve fuses (q|k|v, gate|up: a second copy
of most of the model) and quantizes it: ~2x the unquantized model at peak, 280
GB for a 70B in bf16 even when it ends up as 37 GB of nf4 on a GPU. Here:

1. the HF model is built on the ``meta`` device (shapes only, no storage) and
   wrapped in ``PagedCausalLM`` as usual;
2. every parameter is then read from the safetensors files (``safetensors_io``:
   plain reads through a 16 MiB buffer, no mmap) directly into a tensor of the
   compute dtype on the target device; the fused q|k|v and gate|up weights are
   filled part by part into one tensor, so no unfused copy ever exists;
3. a quantized layer's Linear is quantized as soon as its weight is complete,
   and its full-precision weight freed before the next one is read.

Host memory above the loaded model therefore stays at one fused weight in the
compute dtype (the largest tensor the model computes with — only when it is
quantized or the device is not the CPU) plus the read buffer; the benchmark
``benchmarks/streaming_load.py`` measures it against the old route.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fleetserve_server.runner.model import PagedCausalLM
from fleetserve_server.runner.safetensors_io import CheckpointReader


def load_streaming(
    path: Path, *, dtype: torch.dtype, device: torch.device, quantization: str, max_positions: int,
    keep_layers: tuple[int, ...], blocksize: int,
) -> PagedCausalLM:
    """A ``PagedCausalLM`` of the safetensors checkpoint in ``path``, filled tensor by tensor."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fleetserve_server.runner.loader import import_bnb

    hf_config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    hf.eval()
    hf.requires_grad_(False)
    model = PagedCausalLM(hf, max_positions=max_positions)
    reader = CheckpointReader(path)
    bnb = import_bnb(quantization) if quantization != "none" else None

    def param(name: str) -> nn.Parameter:
        info = reader.info(name)
        out = torch.empty(info.shape, dtype=dtype, device=device)
        reader.read_into(name, out)
        return nn.Parameter(out, requires_grad=False)

    model.embed.weight = param("model.embed_tokens.weight")
    model.norm = param("model.norm.weight")
    for index, layer in enumerate(model.layers):
        prefix = f"model.layers.{index}."
        layer.in_norm = param(prefix + "input_layernorm.weight")
        layer.post_norm = param(prefix + "post_attention_layernorm.weight")
        if layer.q_norm is not None:
            layer.q_norm = param(prefix + "self_attn.q_norm.weight")
            layer.k_norm = param(prefix + "self_attn.k_norm.weight")
        quant = "none" if index in keep_layers else quantization
        attn, mlp = prefix + "self_attn.", prefix + "mlp."
        layer.qkv = _linear(reader, [attn + "q_proj", attn + "k_proj", attn + "v_proj"], dtype, device, quant,
                            bnb, blocksize)
        layer.o_proj = _linear(reader, [attn + "o_proj"], dtype, device, quant, bnb, blocksize)
        layer.gate_up = _linear(reader, [mlp + "gate_proj", mlp + "up_proj"], dtype, device, quant, bnb, blocksize)
        layer.down = _linear(reader, [mlp + "down_proj"], dtype, device, quant, bnb, blocksize)
    if getattr(hf_config, "tie_word_embeddings", False):
        model.lm_head.weight = model.embed.weight
    else:
        model.lm_head.weight = param("lm_head.weight")
    _set_rope_tables(model, hf, hf_config, max_positions, dtype, device)
    model.device = device
    _check_no_meta(model, path)
    return model


def _linear(
    reader: CheckpointReader, names: list[str], dtype: torch.dtype, device: torch.device, quantization: str,
    bnb: object, blocksize: int,
) -> nn.Module:
    """One Linear over the row-wise concatenation of ``names`` (fused when several), quantized
    right away unless ``quantization`` is none."""
    from fleetserve_server.runner.loader import to_bnb

    infos = [reader.info(n + ".weight") for n in names]
    rows, cols = sum(i.shape[0] for i in infos), infos[0].shape[1]
    weight = torch.empty(rows, cols, dtype=dtype, device=device)
    bias = torch.empty(rows, dtype=dtype, device=device) if names[0] + ".bias" in reader else None
    start = 0
    for name, info in zip(names, infos, strict=True):
        stop = start + info.shape[0]
        reader.read_into(name + ".weight", weight[start:stop])
        if bias is not None:
            reader.read_into(name + ".bias", bias[start:stop])
        start = stop
    with torch.device("meta"):  # the constructor's own random weight would cost a full copy
        linear = nn.Linear(cols, rows, bias=bias is not None)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    if quantization == "none":
        return linear
    quantized = to_bnb(bnb, linear, quantization, dtype, blocksize, device="meta")
    del linear, weight
    return quantized.to(device)  # bitsandbytes quantizes on the move; the full-precision weight is freed


def _set_rope_tables(model: PagedCausalLM, hf: nn.Module, hf_config: object, max_positions: int,
                     dtype: torch.dtype, device: torch.device) -> None:
    """cos/sin as ``PagedCausalLM`` computes them, from a rotary module built off the meta device
    (the skeleton's own has a meta ``inv_freq``)."""
    rotary = type(hf.model.rotary_emb)(hf_config).to(device)  # type: ignore[union-attr, operator]
    pos = torch.arange(max_positions, device=device)[None]
    probe = torch.zeros(1, 1, model.head_dim, dtype=dtype, device=device)
    with torch.inference_mode():
        cos, sin = rotary(probe, pos)  # type: ignore[operator]
    half = model.head_dim // 2
    model.cos = cos[0, :, :half].contiguous()
    model.sin = sin[0, :, :half].contiguous()


def _check_no_meta(model: nn.Module, path: Path) -> None:
    missing = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise ValueError(f"model: {path} lacks tensors for {', '.join(missing[:5])}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
