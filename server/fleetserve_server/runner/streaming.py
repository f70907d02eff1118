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
from typing import Any

import torch
from torch import nn

from fleetserve_server.runner.model import PagedCausalLM
from fleetserve_server.runner.safetensors_io import CheckpointReader
from fleetserve_server.runner.tp import ShardLayout


def load_streaming(
    path: Path, *, dtype: torch.dtype, device: torch.device, quantization: str, max_positions: int,
    keep_layers: tuple[int, ...], blocksize: int, layout: ShardLayout | None = None, tp: Any = None,
) -> PagedCausalLM:
    """A ``PagedCausalLM`` of the safetensors checkpoint in ``path``, filled tensor by tensor.

    With ``layout`` (tensor parallelism) only that rank's rows and columns are read
    (``runner.tp``): q|k|v and gate|up take their rows, o_proj and down their input columns
    (through a bounded buffer of whole rows), the embedding and an untied lm_head their
    vocabulary rows; norms are read whole."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fleetserve_server.runner.loader import import_bnb

    hf_config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    hf.eval()
    hf.requires_grad_(False)
    model = PagedCausalLM(hf, max_positions=max_positions)
    if layout is not None:
        model.shard(layout, tp)
    reader = CheckpointReader(path)
    hd = model.head_dim
    rows_q = cols_o = rows_kv = rows_mlp = cols_down = vocab = None
    if layout is not None:
        rows_q = cols_o = (layout.heads[0] * hd, layout.heads[1] * hd)
        rows_kv = (layout.kv_heads[0] * hd, layout.kv_heads[1] * hd)
        rows_mlp = cols_down = layout.intermediate
        vocab = layout.vocab
    # a row-parallel layer's bias is added once, after the all-reduce: rank 0 holds it
    row_parallel_bias = layout is None or layout.rank == 0
    bnb = import_bnb(quantization) if quantization != "none" else None

    def param(name: str, rows: tuple[int, int] | None = None) -> nn.Parameter:
        info = reader.info(name)
        shape = info.shape if rows is None else (rows[1] - rows[0], *info.shape[1:])
        out = torch.empty(shape, dtype=dtype, device=device)
        reader.read_into(name, out, rows)
        return nn.Parameter(out, requires_grad=False)

    model.embed.weight = param("model.embed_tokens.weight", vocab)
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
        layer.qkv = _linear(reader, [(attn + "q_proj", rows_q), (attn + "k_proj", rows_kv),
                                     (attn + "v_proj", rows_kv)], dtype, device, quant, bnb, blocksize)
        layer.o_proj = _linear(reader, [(attn + "o_proj", None)], dtype, device, quant, bnb, blocksize,
                               cols=cols_o, bias=row_parallel_bias)
        layer.gate_up = _linear(reader, [(mlp + "gate_proj", rows_mlp), (mlp + "up_proj", rows_mlp)], dtype, device,
                                quant, bnb, blocksize)
        layer.down = _linear(reader, [(mlp + "down_proj", None)], dtype, device, quant, bnb, blocksize,
                             cols=cols_down, bias=row_parallel_bias)
    if getattr(hf_config, "tie_word_embeddings", False):
        model.lm_head.weight = model.embed.weight
    else:
        model.lm_head.weight = param("lm_head.weight", vocab)
    _set_rope_tables(model, hf, hf_config, max_positions, dtype, device)
    model.device = device
    _check_no_meta(model, path)
    return model


def _linear(
    reader: CheckpointReader, parts: list[tuple[str, tuple[int, int] | None]], dtype: torch.dtype,
    device: torch.device, quantization: str, bnb: object, blocksize: int, *,
    cols: tuple[int, int] | None = None, bias: bool = True,
) -> nn.Module:
    """One Linear over the row-wise concatenation of ``parts`` (name, row range or None for every
    row; fused when several), restricted to the input columns ``cols`` when given, quantized right
    away unless ``quantization`` is none. ``bias=False`` drops the checkpoint's bias."""
    from fleetserve_server.runner.loader import to_bnb

    infos = [reader.info(n + ".weight") for n, _ in parts]
    spans = [r if r is not None else (0, i.shape[0]) for (_, r), i in zip(parts, infos, strict=True)]
    rows = sum(b - a for a, b in spans)
    width = infos[0].shape[1] if cols is None else cols[1] - cols[0]
    weight = torch.empty(rows, width, dtype=dtype, device=device)
    has_bias = bias and parts[0][0] + ".bias" in reader
    bias_t = torch.empty(rows, dtype=dtype, device=device) if has_bias else None
    start = 0
    for (name, _), span in zip(parts, spans, strict=True):
        stop = start + span[1] - span[0]
        if cols is None:
            reader.read_into(name + ".weight", weight[start:stop], span)
        else:
            _read_columns(reader, name + ".weight", weight[start:stop], span, cols, dtype)
        if bias_t is not None:
            reader.read_into(name + ".bias", bias_t[start:stop], span)
        start = stop
    with torch.device("meta"):  # the constructor's own random weight would cost a full copy
        linear = nn.Linear(width, rows, bias=bias_t is not None)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias_t is not None:
        linear.bias = nn.Parameter(bias_t, requires_grad=False)
    if quantization == "none":
        return linear
    quantized = to_bnb(bnb, linear, quantization, dtype, blocksize, device="meta")
    del linear, weight
    return quantized.to(device)  # bitsandbytes quantizes on the move; the full-precision weight is freed


# rows of a column slice read at a time: bounds the host buffer to this many full rows
_COLUMN_READ_ROWS = 256


def _read_columns(reader: CheckpointReader, name: str, out: torch.Tensor, rows: tuple[int, int],
                  cols: tuple[int, int], dtype: torch.dtype) -> None:
    """Columns ``cols`` of rows ``rows`` of ``name`` into ``out``, a few full rows at a time."""
    full = reader.info(name).shape[1]
    buf = torch.empty(min(_COLUMN_READ_ROWS, rows[1] - rows[0]), full, dtype=dtype)
    for start in range(rows[0], rows[1], _COLUMN_READ_ROWS):
        stop = min(start + _COLUMN_READ_ROWS, rows[1])
        chunk = buf[: stop - start]
        reader.read_into(name, chunk, (start, stop))
        out[start - rows[0] : stop - rows[0]].copy_(chunk[:, cols[0] : cols[1]])


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
