"""4-bit layout of the loader's bitsandbytes layers, on a tiny random Llama.

The loader quantizes the fused q/k/v and gate/up tensors in absmax blocks of
``memory.BNB4_BLOCKSIZE`` (32) with nested quantization; these tests pin that
layout down (so the planner's byte formula stays true), check that it is the
plain bitsandbytes quantization of the same float32 weights, and that it is
more accurate than bitsandbytes' default blocks of 64, the reason for it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

from fleetserve_server.memory import BNB4_BLOCKSIZE  # noqa: E402
from fleetserve_server.runner.loader import load_model  # noqa: E402
from fleetserve_server.testing import make_tiny_llama  # noqa: E402

NAMES = ("qkv", "o_proj", "gate_up", "down")
CPU = torch.device("cpu")


def _load(path: Path, quantization: str, **kwargs):  # type: ignore[no-untyped-def]
    return load_model(path, dtype="float32", device=CPU, quantization=quantization, max_positions=64,
                      **kwargs).model


def _dequantized(linear) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return bnb_functional.dequantize_4bit(linear.weight.data, linear.weight.quant_state).float()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_layers_are_bnb_blocks_of_32_of_the_float_weights(tmp_path, quant_type: str) -> None:
    path = make_tiny_llama(tmp_path / "m", hidden_size=128, intermediate_size=256)
    reference = _load(path, "none")
    model = _load(path, quant_type)
    for ref_layer, layer in zip(reference.layers, model.layers, strict=True):
        for name in NAMES:
            linear, weight = getattr(layer, name), getattr(ref_layer, name).weight.data
            state = linear.weight.quant_state
            assert (state.blocksize, state.quant_type, state.nested) == (BNB4_BLOCKSIZE, quant_type, True)
            q, expected_state = bnb_functional.quantize_4bit(
                weight, blocksize=BNB4_BLOCKSIZE, compress_statistics=True, quant_type=quant_type)
            assert torch.equal(_dequantized(linear), bnb_functional.dequantize_4bit(q, expected_state).float())


def test_blocks_of_32_are_more_accurate_than_64(tmp_path) -> None:
    path = make_tiny_llama(tmp_path / "m", hidden_size=128, intermediate_size=256)
    reference = _load(path, "none")
    errors = {}
    for blocksize in (32, 64):
        model = _load(path, "nf4", blocksize=blocksize)
        errors[blocksize] = sum(
            float((_dequantized(getattr(layer, name)) - getattr(ref_layer, name).weight.data).pow(2).sum())
            for ref_layer, layer in zip(reference.layers, model.layers, strict=True) for name in NAMES)
    assert errors[32] < 0.95 * errors[64], errors


def test_bad_blocksize_is_a_clear_error(tmp_path) -> None:
    path = make_tiny_llama(tmp_path / "m")
    with pytest.raises(ValueError, match="blocksize .* must be 32, 64, 128 or 256; got 48"):
        _load(path, "nf4", blocksize=48)
