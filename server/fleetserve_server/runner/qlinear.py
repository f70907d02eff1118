"""CPU forward for the loader's bitsandbytes layers, over bitsandbytes' own storage.

On CPU, bitsandbytes' layers are slow for inference: in eval mode its 4-bit
matmul wants a fused kernel it loads from the ``kernels`` hub (absent), so it
repacks the weight on the first call (bfloat16 absmaxes, no nested quantization) and runs
a bfloat16 GEMV; in training mode (the loader's layers are never put in
eval mode) both dequantize into a fresh tensor on every call and run a float
matmul over it. The layers here keep
the very tensors the loader produced (so ``model_bytes``, the planner's
formula and the layout tests hold unchanged) and only replace the forward:

* ``CpuLinear4bit`` (nf4/fp4): dequantizes the nested absmaxes and then the
  whole 4-bit weight with bitsandbytes' own C kernels into a ``Workspace``
  buffer shared by every layer of the model, then one ``F.linear`` (float32
  or the compute dtype) over it. The dequantized weight equals
  ``bitsandbytes.functional.dequantize_4bit`` bit for bit; the buffer is
  reused by the next layer, so it costs one largest-Linear's worth of memory
  per process, which the planner reserves (``memory.dequant_workspace_bytes``).
* ``CpuLinear8bit`` (int8): what bitsandbytes computes for these layers on
  CPU (``MatMul8bitFp``, since the loader's layers are not in eval mode: the
  float input against the dequantized int8 rows, no activation quantization,
  which is why fleetserve's int8 perplexity beats LLM.int8's), but as int8
  matmuls: the input is split into three int8 terms with per-row scales and
  one ``torch._int_mm`` (AVX-512 VNNI) multiplies all three; the result is
  within ~1e-6 relative of the float32 one. No buffer.

Only CPU layers are replaced (CUDA keeps bitsandbytes' kernels), and only
shapes the C kernels handle (even ``in_features``, a multiple of the absmax
block); anything else stays a bitsandbytes layer.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_LAYER_NAMES = ("qkv", "o_proj", "gate_up", "down")


class Workspace:
    """Reusable buffers for ``CpuLinear4bit``: a dequantized weight and its absmaxes.

    Invariant: ``weight`` holds at least ``out x in`` elements and ``absmax`` at least
    one float32 per absmax block of every layer that shares it; a model runs one
    forward at a time, so one layer's dequantized weight is dead before the next
    layer dequantizes over it."""

    def __init__(self, weight_elements: int, absmax_elements: int, dtype: torch.dtype) -> None:
        self.weight = torch.empty(weight_elements, dtype=dtype)
        self.absmax = torch.empty(absmax_elements, dtype=torch.float32)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size() + self.absmax.numel() * 4


def _lib() -> Any:
    """bitsandbytes' CPU library, or None where it did not load (its stand-in raises on use)."""
    try:
        from bitsandbytes.cextension import lib
    except Exception:  # pragma: no cover - bitsandbytes is a pinned dependency
        return None
    return lib if hasattr(lib, "cdequantize_blockwise_cpu_nf4_fp32") else None


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


_DTYPE_SUFFIX = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class CpuLinear4bit(nn.Module):
    """A bitsandbytes ``Linear4bit`` (nf4/fp4, nested or plain absmaxes) computed by dequantizing
    into ``workspace`` and one ``F.linear``. Holds the original ``Params4bit`` as ``weight``
    (its ``quant_state`` untouched), so memory accounting sees the same tensors."""

    def __init__(self, layer: nn.Module, workspace: Workspace, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.weight = layer.weight
        self.bias = layer.bias
        self.workspace = workspace
        self.dtype = dtype
        state = layer.weight.quant_state
        lib = _lib()
        self._dequantize = getattr(lib, f"cdequantize_blockwise_cpu_{state.quant_type}_{_DTYPE_SUFFIX[dtype]}")
        self._dequantize_absmax = lib.cdequantize_blockwise_cpu_fp32
        self.blocks = state.absmax.numel()

    def dequantized_weight(self) -> torch.Tensor:
        """The weight in the compute dtype, in the workspace (valid until the next layer's call)."""
        state = self.weight.quant_state
        absmax = state.absmax
        if state.nested:
            out = self.workspace.absmax[: self.blocks]
            self._dequantize_absmax(_ptr(state.state2.code), _ptr(state.absmax), _ptr(state.state2.absmax),
                                    _ptr(out), ctypes.c_longlong(state.state2.blocksize),
                                    ctypes.c_longlong(self.blocks))
            absmax = out.add_(state.offset)
        rows, cols = self.out_features, self.in_features
        weight = self.workspace.weight[: rows * cols].view(rows, cols)
        self._dequantize(_ptr(self.weight.data), _ptr(absmax), _ptr(weight), ctypes.c_longlong(state.blocksize),
                         ctypes.c_longlong(rows), ctypes.c_longlong(cols))
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.dtype), self.dequantized_weight(), self.bias)


class CpuLinear8bit(nn.Module):
    """A bitsandbytes ``Linear8bitLt`` (``has_fp16_weights=False``): int8 rows ``weight`` with
    float32 row absmaxes ``weight.SCB`` (the original ``Int8Params``, so memory accounting sees the
    same tensors), computing what bitsandbytes computes for fleetserve's layers on CPU
    (``MatMul8bitFp``: ``x @ (rows x SCB / 127).T``, no activation quantization) through int8
    matmuls (``int8_matmul``)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.weight = layer.weight
        if self.weight.SCB is None:  # bitsandbytes' forward moves it into the layer's state
            self.weight.SCB = layer.state.SCB
        self.bias = layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = int8_matmul(x.reshape(-1, shape[-1]), self.weight.data, self.weight.SCB, self.bias)
        return out.view(*shape[:-1], self.out_features)


# Terms of the input's int8 expansion: each term's error is at most 1/254 of the previous
# residual, so three terms leave ~1.2e-7 x the row's absmax, float32's own rounding.
INT8_TERMS = 3
_INT_MM = torch.backends.cpu.get_cpu_capability().startswith("AVX512")  # else torch._int_mm is scalar


def int8_matmul(a: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``a @ (cb x scb / 127).T + bias`` for int8 rows ``cb`` [out, in] and float32 row absmaxes
    ``scb``, in ``a``'s dtype. With AVX-512: ``a`` (float) is written as ``INT8_TERMS`` int8 terms
    with per-row scales (each term quantizes what the previous ones left), all multiplied by
    ``cb`` in one ``torch._int_mm`` (int32 sums, exact) and scaled back: within ~1e-6 relative
    of the float32 matmul over the dequantized weight, at the speed of int8 (VNNI) matmuls.
    Elsewhere the weight is dequantized and multiplied in float (bitsandbytes' own route)."""
    if not _INT_MM:
        weight = cb.to(a.dtype).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))
        return F.linear(a, weight, bias)
    rows = a.shape[0]
    residual = a.float()
    terms = torch.empty(INT8_TERMS, rows, a.shape[1], dtype=torch.int8)
    scales = torch.empty(INT8_TERMS, rows, 1)
    for i in range(INT8_TERMS):
        scale = residual.abs().amax(dim=1, keepdim=True).div_(127.0).clamp_min_(1e-30)
        q = torch.round(residual / scale)
        terms[i] = q
        scales[i] = scale
        if i + 1 < INT8_TERMS:
            residual = torch.addcmul(residual, q, scale, value=-1.0)
    acc = torch._int_mm(terms.view(-1, a.shape[1]), cb.t()).view(INT8_TERMS, rows, -1)
    out = (acc * scales).sum(dim=0)
    out.mul_(scb.mul(1.0 / 127.0))
    if bias is not None:
        out.add_(bias)
    return out.to(a.dtype)


def _fast_4bit_supported(layer: nn.Module, lib: Any) -> bool:
    state = getattr(layer.weight, "quant_state", None)
    return (
        lib is not None and state is not None and state.quant_type in ("nf4", "fp4")
        and layer.in_features % 2 == 0 and layer.in_features % state.blocksize == 0
        and state.blocksize < 2048  # bitsandbytes' own AVX-512 kernel is inexact beyond
        and (not state.nested or state.state2.blocksize == 256)
        and not getattr(state, "packing_format_for_cpu", False)
    )


def use_cpu_fast_path(model: Any) -> Workspace | None:
    """Replace ``model``'s bitsandbytes layers on CPU by ``CpuLinear4bit`` / ``CpuLinear8bit``
    over the same tensors; the 4-bit ones share one ``Workspace`` sized to the largest of them
    (returned, also kept as ``model.dequant_workspace``; None when there is none)."""
    if model.device.type != "cpu":
        return None
    import bitsandbytes as bnb

    lib = _lib()
    four_bit: list[tuple[nn.Module, str, nn.Module]] = []
    for layer in model.layers:
        for name in _LAYER_NAMES:
            linear = getattr(layer, name)
            if isinstance(linear, bnb.nn.Linear8bitLt) and not linear.state.has_fp16_weights:
                setattr(layer, name, CpuLinear8bit(linear))
            elif isinstance(linear, bnb.nn.Linear4bit) and _fast_4bit_supported(linear, lib):
                four_bit.append((layer, name, linear))
    if not four_bit:
        return None
    largest = max(linear.in_features * linear.out_features for _, _, linear in four_bit)
    blocks = max(linear.weight.quant_state.absmax.numel() for _, _, linear in four_bit)
    workspace = Workspace(largest, blocks, model.dtype)
    for layer, name, linear in four_bit:
        setattr(layer, name, CpuLinear4bit(linear, workspace, model.dtype))
    model.dequant_workspace = workspace
    return workspace
