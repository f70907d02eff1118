"""The CPU fast path for quantized layers (``runner.qlinear``) against bitsandbytes' own layers.

Same quantized tensors, two forwards: bitsandbytes' (today's path) and the fast one. The fast
4-bit layer must dequantize to exactly ``bitsandbytes.functional.dequantize_4bit`` and then
equal ``F.linear`` over it; the fast int8 layer must equal the float matmul over its
dequantized rows, which is what bitsandbytes computes for the loader's (training-mode) layers. On a tiny Llama, the loader's fast model must give the same greedy tokens and
the same perplexity as the same weights run through bitsandbytes.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

from fleetserve_server.memory import (  # noqa: E402
    MiB,
    architecture_from_config,
    dequant_workspace_bytes,
    plan_memory,
    rank_shard,
)
from fleetserve_server.runner import loader as loader_module  # noqa: E402
from fleetserve_server.runner.loader import import_bnb, load_model, to_bnb  # noqa: E402
from fleetserve_server.runner.qlinear import CpuLinear4bit, CpuLinear8bit, use_cpu_fast_path  # noqa: E402
from fleetserve_server.testing import make_tiny_llama  # noqa: E402

CPU = torch.device("cpu")
NAMES = ("qkv", "o_proj", "gate_up", "down")


def _quantized(quantization: str, in_features: int = 256, out_features: int = 192, bias: bool = True):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    linear.requires_grad_(False)
    bnb = import_bnb(quantization)
    return to_bnb(bnb, linear, quantization, torch.float32, 32).to("cpu")  # as the loader leaves it


class _Model:
    """What ``use_cpu_fast_path`` reads of a ``PagedCausalLM``: layers, device, dtype."""

    def __init__(self, layers: list[torch.nn.Module]) -> None:
        self.layers = layers
        self.device = CPU
        self.dtype = torch.float32


def _fast(layer: torch.nn.Module) -> torch.nn.Module:
    holder = torch.nn.Module()
    for name in NAMES:
        setattr(holder, name, copy.deepcopy(layer) if name == "qkv" else torch.nn.Identity())
    use_cpu_fast_path(_Model([holder]))
    return holder.qkv


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_fast_path_is_linear_over_bitsandbytes_dequantized_weight(quant_type: str) -> None:
    layer = _quantized(quant_type)
    fast = _fast(layer)
    assert isinstance(fast, CpuLinear4bit)
    expected_w = bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    assert torch.equal(fast.dequantized_weight(), expected_w)
    x = torch.randn(7, 256)
    with torch.inference_mode():
        got = fast(x)
        reference = torch.nn.functional.linear(x, expected_w, layer.bias)
        today = layer(x)  # bitsandbytes' own forward, the path before the fast one
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, today, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 5, 32])
@pytest.mark.parametrize("outliers", [False, True])
def test_int8_fast_path_equals_float_matmul_over_dequantized_rows(rows: int, outliers: bool) -> None:
    layer = _quantized("int8")
    fast = _fast(layer)
    assert isinstance(fast, CpuLinear8bit)
    torch.manual_seed(1)
    x = torch.randn(rows, 256)
    if outliers:  # a few large activation columns, as LLMs have: the int8 terms must still resolve the rest
        x[:, 3] *= 40.0
        x[0, 100] = -90.0
    with torch.inference_mode():
        got = fast(x)
        today = layer(x)  # bitsandbytes: float input against the dequantized int8 rows
    scale = float(today.abs().max())
    torch.testing.assert_close(got, today, rtol=1e-5, atol=1e-5 * scale)
    w = fast.weight.data.float() * fast.weight.SCB.view(-1, 1) / 127.0
    torch.testing.assert_close(got, torch.nn.functional.linear(x, w, layer.bias), rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("quantization", ["nf4", "fp4"])
def test_4bit_layers_share_one_workspace_the_planner_reserves(tmp_path: Path, quantization: str) -> None:
    path = make_tiny_llama(tmp_path / "m", hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=256)
    model = load_model(path, dtype="float32", device=CPU, quantization=quantization, max_positions=64).model
    layers = [getattr(layer, name) for layer in model.layers for name in NAMES]
    assert all(isinstance(q, CpuLinear4bit) for q in layers)
    assert len({id(q.workspace) for q in layers}) == 1
    largest = max(q.in_features * q.out_features for q in layers)
    assert model.dequant_workspace.weight.numel() == largest  # gate_up: 2 x 256 x 128

    # the planner's activation reserve holds exactly this buffer, on CPU, for 4-bit only
    arch = architecture_from_config(json.loads((path / "config.json").read_text()), name="tiny")
    shard = rank_shard(arch, 1, 0)
    assert dequant_workspace_bytes(arch, shard, quantization, "float32", "cpu") == model.dequant_workspace.nbytes
    assert dequant_workspace_bytes(arch, shard, "int8", "float32", "cpu") == 0
    assert dequant_workspace_bytes(arch, shard, quantization, "bfloat16", "cuda") == 0

    def reserve(q: str) -> int:
        plan = plan_memory(arch, quantization=q, dtype="float32", device="cpu", device_memory_bytes=64 * MiB,
                           max_model_len=64, max_num_seqs=2, max_batch_tokens=64)
        return plan.ranks[0].activation_reserve_bytes

    assert reserve(quantization) - reserve("none") == model.dequant_workspace.nbytes
    assert reserve("int8") == reserve("none")


def test_int8_layers_need_no_workspace(tmp_path: Path) -> None:
    path = make_tiny_llama(tmp_path / "m", hidden_size=128, intermediate_size=256)
    model = load_model(path, dtype="float32", device=CPU, quantization="int8", max_positions=64).model
    assert all(isinstance(getattr(layer, name), CpuLinear8bit) for layer in model.layers for name in NAMES)
    assert getattr(model, "dequant_workspace", None) is None


@pytest.mark.parametrize("quantization", ["int8", "nf4", "fp4"])
def test_tiny_model_greedy_tokens_match_bitsandbytes(tmp_path: Path, monkeypatch, quantization: str) -> None:
    from fleetserve_server import LLM, SamplingParams

    path = make_tiny_llama(tmp_path / "m", hidden_size=128, intermediate_size=256)
    prompts = [[5, 17, 42, 7, 99, 3], [11, 12, 13], [200, 201, 5, 9, 64, 33, 2, 8, 1]]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    def generate() -> tuple[list[list[int]], object]:
        llm = LLM(str(path), quantization=quantization, max_model_len=64, max_num_seqs=4, device="cpu")
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs], llm.loaded.runner.model

    fast_tokens, fast_model = generate()
    assert any(isinstance(getattr(fast_model.layers[0], n), (CpuLinear4bit, CpuLinear8bit)) for n in NAMES)
    monkeypatch.setattr(loader_module, "use_cpu_fast_path", lambda model: None)  # today's path: bitsandbytes
    bnb_tokens, bnb_model = generate()
    assert not any(isinstance(getattr(bnb_model.layers[0], n), (CpuLinear4bit, CpuLinear8bit)) for n in NAMES)
    assert fast_tokens == bnb_tokens


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_tiny_model_perplexity_equals_bitsandbytes(tmp_path: Path, monkeypatch, quantization: str) -> None:
    """The quality benchmark's perplexity (``bench.offline_quality.perplexity_paged``) of the same
    quantized weights, fast path vs bitsandbytes' layers: equal to 1e-4, and within 10 % of float32's."""
    from fleetserve_server.bench.offline_quality import perplexity_paged

    path = make_tiny_llama(tmp_path / "m", hidden_size=128, intermediate_size=256)
    ids = [(7 * i * i + 3 * i) % 250 + 2 for i in range(100)]

    def ppl(q: str) -> float:
        model = load_model(path, dtype="float32", device=CPU, quantization=q, max_positions=128).model
        return perplexity_paged(model, ids)

    fast = ppl(quantization)
    monkeypatch.setattr(loader_module, "use_cpu_fast_path", lambda model: None)
    today = ppl(quantization)
    assert fast == pytest.approx(today, rel=1e-4)
    assert fast == pytest.approx(ppl("none"), rel=0.1)
