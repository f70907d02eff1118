"""The streaming loader builds the same model as loading through transformers, without its memory.

Same tensors bit for bit (fused, quantized or not, for every supported
architecture), the same greedy tokens, and clear errors for a broken
checkpoint. Peak memory is measured by benchmarks/streaming_load.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from fleetserve_server.runner.loader import load_model, model_bytes  # noqa: E402
from fleetserve_server.runner.safetensors_io import CheckpointReader, write_safetensors  # noqa: E402
from fleetserve_server.testing import make_tiny_llama  # noqa: E402

CPU = torch.device("cpu")


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    state.update({k: v for k, v in model.named_buffers() if k in ("cos", "sin")})
    return state


def _load(path: Path, streaming: bool, quantization: str = "none", dtype: str = "float32"):  # type: ignore[no-untyped-def]
    return load_model(path, dtype=dtype, device=CPU, quantization=quantization, max_positions=128,
                      streaming=streaming).model


@pytest.mark.parametrize(("arch", "kwargs"), [
    ("llama", {}), ("llama", {"tie_word_embeddings": False}), ("qwen2", {}), ("qwen3", {}), ("mistral", {}),
])
def test_same_tensors_as_the_transformers_route(tmp_path: Path, arch: str, kwargs: dict) -> None:
    path = make_tiny_llama(tmp_path / arch, architecture=arch, **kwargs)
    old, new = _load(path, streaming=False), _load(path, streaming=True)
    a, b = _state(old), _state(new)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert (new.lm_head.weight is new.embed.weight) == (kwargs.get("tie_word_embeddings", True))
    assert model_bytes(new) == model_bytes(old)


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_quantized_layers_are_identical(tmp_path: Path, quantization: str) -> None:
    pytest.importorskip("bitsandbytes")
    path = make_tiny_llama(tmp_path / "m", hidden_size=128, intermediate_size=256)
    old, new = _load(path, False, quantization), _load(path, True, quantization)
    a, b = _state(old), _state(new)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert model_bytes(new) == model_bytes(old)
    x = torch.randn(3, 128)
    assert torch.equal(old.layers[0].gate_up(x), new.layers[0].gate_up(x))


def test_bfloat16_checkpoint_into_float32(tmp_path: Path) -> None:
    """A checkpoint stored in another dtype is converted chunk by chunk."""
    path = make_tiny_llama(tmp_path / "m")
    reader = CheckpointReader(path)
    [file] = list(path.glob("*.safetensors"))
    names = list(reader.tensors)
    full = {n: torch.empty(reader.info(n).shape) for n in names}
    for n in names:
        reader.read_into(n, full[n])
    write_safetensors(file, [(n, torch.bfloat16, tuple(full[n].shape)) for n in names],
                      lambda n, shape, dtype: full[n].to(dtype))
    new = _load(path, streaming=True)
    old = _load(path, streaming=False)
    for name, t in _state(old).items():
        assert torch.equal(t, _state(new)[name]), name


def test_partial_rows_and_clear_errors(tmp_path: Path) -> None:
    path = make_tiny_llama(tmp_path / "m")
    reader = CheckpointReader(path)
    name = "model.layers.0.mlp.gate_proj.weight"
    whole = torch.empty(reader.info(name).shape)
    reader.read_into(name, whole)
    part = torch.empty(5, whole.shape[1])
    reader.read_into(name, part, rows=(3, 8))
    assert torch.equal(part, whole[3:8])
    with pytest.raises(ValueError, match="destination"):
        reader.read_into(name, torch.empty(4, whole.shape[1]), rows=(3, 8))
    with pytest.raises(KeyError, match="no tensor 'nope'"):
        reader.info("nope")
    # a checkpoint missing a layer's tensor names what is missing
    [file] = list(path.glob("*.safetensors"))
    keep = [n for n in reader.tensors if "layers.1.mlp.down_proj" not in n]
    full = {n: torch.empty(reader.info(n).shape) for n in keep}
    for n in keep:
        reader.read_into(n, full[n])
    write_safetensors(file, [(n, torch.float32, tuple(full[n].shape)) for n in keep], lambda n, s, d: full[n])
    with pytest.raises(KeyError, match="layers.1.mlp.down_proj.weight"):
        _load(path, streaming=True)
    config = json.loads((path / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
