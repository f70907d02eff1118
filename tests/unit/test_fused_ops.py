"""The fused C++ ops of a decoder layer (csrc/fused_ops.cpp) against the ATen ops they replace,
and whole greedy generations with and without them."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from test_paged_attention import _kernel  # noqa: E402  (the same module carries the fused ops)

torch.set_num_threads(2)


def _hf_rms(x, w, eps):  # type: ignore[no-untyped-def]
    """LlamaRMSNorm's arithmetic (transformers), in float64 as the reference."""
    x64 = x.double()
    return (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)) * w.double()


@pytest.mark.parametrize("rows,hidden", [(1, 576), (7, 64), (2048, 576), (3, 40), (33, 1536)])
def test_rms_norm_matches_aten_and_hf(rows: int, hidden: int) -> None:
    gen = torch.Generator().manual_seed(rows * hidden)
    x = torch.randn(rows, hidden, generator=gen) * 3
    w = torch.randn(hidden, generator=gen)
    out = torch.empty_like(x)
    _kernel().rms_norm(out, x, w, 1e-5)
    torch.testing.assert_close(out, F.rms_norm(x, (hidden,), w, 1e-5), rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(out.double(), _hf_rms(x, w, 1e-5), rtol=2e-6, atol=2e-6)


def test_rms_norm_reads_strided_rows_and_refuses_bad_input() -> None:
    base = torch.randn(5, 100)
    x = base[:, 10:74]  # rows 100 apart, 64 contiguous values each
    w = torch.randn(64)
    out = torch.empty(5, 64)
    _kernel().rms_norm(out, x, w, 1e-6)
    torch.testing.assert_close(out, F.rms_norm(x, (64,), w, 1e-6), rtol=2e-6, atol=2e-6)
    with pytest.raises(RuntimeError, match="float32"):
        _kernel().rms_norm(out, x.double(), w, 1e-6)
    with pytest.raises(RuntimeError, match="w must be"):
        _kernel().rms_norm(out, x, torch.randn(63), 1e-6)


@pytest.mark.parametrize("tokens,inter", [(1, 1536), (2048, 1536), (5, 20), (3, 72)])
def test_silu_mul_matches_aten_and_float64(tokens: int, inter: int) -> None:
    gen = torch.Generator().manual_seed(tokens + inter)
    gate_up = torch.randn(tokens, 2 * inter, generator=gen) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    out = torch.empty(tokens, inter)
    _kernel().silu_mul(out, gate_up)
    exact = gate.double() * torch.sigmoid(gate.double()) * up.double()
    torch.testing.assert_close(out, F.silu(gate) * up, rtol=5e-7, atol=1e-30)
    torch.testing.assert_close(out.double(), exact, rtol=3e-7, atol=1e-30)


def test_silu_mul_at_the_edges_of_exp() -> None:
    gate = torch.tensor([-1e4, -100.0, -88.0, -87.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 87.0, 88.0, 100.0, 1e4,
                         float("inf"), -float("inf"), 3.0, 4.0])
    out = torch.empty(1, gate.numel())
    _kernel().silu_mul(out, torch.cat([gate, torch.ones_like(gate)])[None])
    torch.testing.assert_close(out[0], F.silu(gate), rtol=5e-7, atol=1e-30, equal_nan=True)


def _torch_rope_write(qkv, cos, sin, positions, slots, cache_rows, nh, nkv, hd, num_slots):  # type: ignore[no-untyped-def]
    """The ATen path of PagedCausalLM.forward: rotate q and k together, stack K/V, index_copy_."""
    t = qkv.shape[0]
    half = hd // 2
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    x = qkv[:, : (nh + nkv) * hd].view(t, nh + nkv, hd)
    x1, x2 = x[..., :half], x[..., half:]
    qk = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    q, k = qk[:, :nh], qk[:, nh:]
    v = qkv[:, (nh + nkv) * hd :].view(t, nkv, hd)
    base = torch.arange(2 * nkv)[:, None] * num_slots
    rows = (base + slots[None, :]).view(-1)
    cache_rows.index_copy_(0, rows, torch.stack((k.transpose(0, 1), v.transpose(0, 1))).reshape(-1, hd))
    return q.contiguous()


@pytest.mark.parametrize("nh,nkv,hd,tokens", [(9, 3, 64, 1), (9, 3, 64, 300), (4, 2, 16, 5), (8, 8, 24, 17)])
def test_rope_write_kv_is_bit_identical_to_the_aten_path(nh: int, nkv: int, hd: int, tokens: int) -> None:
    gen = torch.Generator().manual_seed(nh * 1000 + tokens)
    num_slots, max_pos = 512, 1024
    qkv = torch.randn(tokens, (nh + 2 * nkv) * hd, generator=gen)
    angles = torch.rand(max_pos, hd // 2, generator=gen) * 6.3
    cos, sin = angles.cos().contiguous(), angles.sin().contiguous()
    positions = torch.randint(0, max_pos, (tokens,), generator=gen)
    slots = torch.randperm(num_slots, generator=gen)[:tokens]
    expected_cache = torch.randn(2 * nkv * num_slots, hd, generator=gen)
    cache = expected_cache.clone()
    expected_q = _torch_rope_write(qkv, cos, sin, positions, slots, expected_cache, nh, nkv, hd, num_slots)
    q = torch.empty(tokens, nh, hd)
    _kernel().rope_write_kv(q, cache, qkv, cos, sin, positions, slots, nh, nkv, num_slots)
    assert torch.equal(q, expected_q)
    assert torch.equal(cache, expected_cache)  # the step's rows written, every other row untouched


def test_rope_write_kv_refuses_a_slot_or_position_outside_its_table() -> None:
    nh, nkv, hd, num_slots = 2, 1, 16, 8
    qkv = torch.randn(2, (nh + 2 * nkv) * hd)
    cos = sin = torch.ones(4, hd // 2)
    cache = torch.zeros(2 * nkv * num_slots, hd)
    q = torch.empty(2, nh, hd)
    with pytest.raises(RuntimeError, match="slot 8 outside"):
        _kernel().rope_write_kv(q, cache, qkv, cos, sin, torch.tensor([0, 1]), torch.tensor([0, 8]), nh, nkv,
                                num_slots)
    with pytest.raises(RuntimeError, match="position 4 outside"):
        _kernel().rope_write_kv(q, cache, qkv, cos, sin, torch.tensor([4, 1]), torch.tensor([0, 1]), nh, nkv,
                                num_slots)
    assert not cache.any()  # nothing written before the check failed


@pytest.mark.parametrize("architecture", ["llama", "qwen3"])
def test_greedy_generations_identical_with_and_without_fused_ops(tmp_path, architecture: str) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("transformers")
    from fleetserve_server.engine.sampling_params import SamplingParams
    from fleetserve_server.runner.loader import load_model
    from fleetserve_server.runner.model_runner import TorchModelRunner
    from fleetserve_server.testing import make_tiny_llama
    from test_runner_model import _drive, _prompts

    path = make_tiny_llama(tmp_path / "m", num_heads=8, num_kv_heads=2, architecture=architecture)
    prompts = _prompts(8, 259)
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    _kernel()
    results, logits = {}, {}
    for fused in (True, False):
        loaded = load_model(path, dtype="float32", device=torch.device("cpu"), quantization="none",
                            max_positions=256)
        loaded.model.fused_ops = fused
        runner = TorchModelRunner(loaded.model, num_blocks=256, block_size=4, eos_token_ids=frozenset())
        results[fused] = _drive(runner, prompts, [greedy] * len(prompts), steps=12, chunk=7)
        from fleetserve_server.runner.model import StepMetadata

        ids = torch.tensor([5, 9, 11, 3])
        pos = torch.arange(4)
        meta = StepMetadata(positions=pos, write_index=runner._rows(pos), num_decode=0,
                            tables=torch.zeros(1, 1, dtype=torch.int32), token_seq=torch.zeros(4, dtype=torch.int32),
                            token_ctx=(pos + 1).to(torch.int32), logits_idx=torch.arange(4), block_size=4, slots=pos)
        with torch.inference_mode():
            logits[fused] = runner.model(ids, meta, runner.kv_cache)
    assert results[True] == results[False]
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-5)
