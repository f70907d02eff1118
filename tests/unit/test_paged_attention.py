"""The paged attention kernel, its torch fallback and the previous padded-gather decode path
compute the same attention (random caches, shuffled block tables, ragged lengths, GQA), and
whole greedy generations are identical whichever of them runs."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from fleetserve_server.runner import paged_attention as pa  # noqa: E402

torch.set_num_threads(2)


def _kernel():  # type: ignore[no-untyped-def]
    module = pa.extension()
    assert module is not None, "the C++ kernels (paged attention, fused ops) did not build (see the log for why)"
    return module


def _case(block_size: int, heads: int, kv: int, head_dim: int, lens: list[int], dtype=torch.float32, seed=0):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed)
    width = max((n + block_size - 1) // block_size for n in lens)
    num_blocks = len(lens) * width + 3
    cache = torch.randn(2, kv, num_blocks * block_size, head_dim, generator=gen).to(dtype)
    # every sequence gets distinct blocks in a shuffled order; padding names block 0
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = []
    for i, n in enumerate(lens):
        own = order[i * width : i * width + (n + block_size - 1) // block_size]
        tables.append(own + [0] * (width - len(own)))
    return cache, torch.tensor(tables, dtype=torch.int32)


def _dense_reference(q, cache, tables, seq, ctx, block_size, scale):  # type: ignore[no-untyped-def]
    """Plain SDPA per token over its context, read position by position (float64)."""
    out = torch.empty(q.shape, dtype=torch.float64)
    kv = cache.shape[1]
    for t in range(q.shape[0]):
        n = int(ctx[t])
        table = tables[int(seq[t])]
        slots = torch.tensor([int(table[p // block_size]) * block_size + p % block_size for p in range(n)])
        keys = cache[0][:, slots].double()  # [kv, n, hd]
        vals = cache[1][:, slots].double()
        qs = q[t].double().view(kv, -1, q.shape[-1])  # [kv, g, hd]
        o = F.scaled_dot_product_attention(qs, keys, vals, scale=scale)
        out[t] = o.reshape(q.shape[1], q.shape[2])
    return out


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("heads,kv,head_dim", [(4, 4, 16), (6, 2, 64), (9, 3, 40), (8, 1, 24)])
def test_decode_kernel_fallback_and_gather_agree(block_size: int, heads: int, kv: int, head_dim: int) -> None:
    lens = [1, 5, 17, 64, 3, 33, 100]  # ragged
    cache, tables = _case(block_size, heads, kv, head_dim, lens)
    q = torch.randn(len(lens), heads, head_dim, generator=torch.Generator().manual_seed(1))
    seq = torch.arange(len(lens), dtype=torch.int32)
    ctx = torch.tensor(lens, dtype=torch.int32)
    scale = head_dim**-0.5
    _kernel()
    kernel = pa.paged_attention(q, cache, tables, seq, ctx, block_size, scale)
    fallback = pa.paged_attention_torch(q, cache, tables, seq, ctx, block_size, scale)
    gathered = pa.gathered_decode_attention(q, cache, tables, ctx, block_size, scale)
    reference = _dense_reference(q, cache, tables, seq, ctx, block_size, scale)
    for got in (kernel, fallback, gathered):
        torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernel, fallback, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_mixed_step_decode_and_prefill_chunks_in_one_call(block_size: int) -> None:
    """Decode tokens, a fresh prefill and a chunk continuing a cached prefix, in one call:
    a prefill token at position p attends to positions 0 .. p (causal)."""
    heads, kv, hd = 6, 2, 32
    lens = [9, 40, 70, 23]  # seq 0, 1: decode; seq 2: prefill of positions 50..69; seq 3: prefill 0..22
    cache, tables = _case(block_size, heads, kv, hd, lens, seed=3)
    seq = [0, 1] + [2] * 20 + [3] * 23
    ctx = [9, 40] + list(range(51, 71)) + list(range(1, 24))
    q = torch.randn(len(seq), heads, hd, generator=torch.Generator().manual_seed(4))
    seq_t, ctx_t = torch.tensor(seq, dtype=torch.int32), torch.tensor(ctx, dtype=torch.int32)
    _kernel()
    kernel = pa.paged_attention(q, cache, tables, seq_t, ctx_t, block_size, 0.2)
    fallback = pa.paged_attention_torch(q, cache, tables, seq_t, ctx_t, block_size, 0.2)
    reference = _dense_reference(q, cache, tables, seq_t, ctx_t, block_size, 0.2)
    torch.testing.assert_close(kernel.double(), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fallback.double(), reference, rtol=1e-5, atol=1e-5)
    # the fresh prefill equals causal SDPA over the chunk's own K/V
    slots = torch.tensor([int(tables[3][p // block_size]) * block_size + p % block_size for p in range(23)])
    qs = q[22:].transpose(0, 1)[None]
    ks, vs = cache[0][:, slots][None], cache[1][:, slots][None]
    sdpa = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=0.2, enable_gqa=True)
    torch.testing.assert_close(kernel[22:], sdpa[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window_bytes", [1, 3 * 40_000, 10**9])
def test_fallback_windows_merge_to_the_same_result(monkeypatch: pytest.MonkeyPatch, window_bytes: int) -> None:
    """Pairs over the fallback's working set are taken in windows (one pair, a few, all), split
    inside one token's context too, and merge to the one-window result."""
    cache, tables = _case(4, 4, 2, 16, [30, 50])
    seq = torch.tensor([0] * 30 + [1], dtype=torch.int32)
    ctx = torch.tensor(list(range(1, 31)) + [50], dtype=torch.int32)
    q = torch.randn(31, 4, 16, generator=torch.Generator().manual_seed(5))
    reference = _dense_reference(q, cache, tables, seq, ctx, 4, 0.25)
    monkeypatch.setattr(pa, "FALLBACK_ATTENTION_BYTES", window_bytes)
    got = pa.paged_attention_torch(q, cache, tables, seq, ctx, 4, 0.25)
    torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_half_precision_cache(dtype: torch.dtype) -> None:
    lens = [3, 31, 64]
    cache, tables = _case(8, 6, 2, 32, lens, dtype=dtype)
    q = torch.randn(3, 6, 32, generator=torch.Generator().manual_seed(2)).to(dtype)
    seq, ctx = torch.arange(3, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32)
    _kernel()
    kernel = pa.paged_attention(q, cache, tables, seq, ctx, 8, 32**-0.5)
    reference = _dense_reference(q, cache, tables, seq, ctx, 8, 32**-0.5)
    assert kernel.dtype == dtype
    torch.testing.assert_close(kernel.double(), reference, rtol=2e-2, atol=2e-2)


def test_kernel_rejects_out_of_range_tables() -> None:
    cache, tables = _case(4, 4, 2, 16, [8])
    q = torch.randn(1, 4, 16)
    module = _kernel()
    out = torch.empty_like(q)
    bad = tables.clone()
    bad[0, 0] = cache.shape[2] // 4  # one past the last block
    with pytest.raises(RuntimeError, match="outside"):
        module.paged_attention(out, q, cache, bad, torch.tensor([0], dtype=torch.int32),
                               torch.tensor([8], dtype=torch.int32), 4, 1.0)
    with pytest.raises(RuntimeError, match="context"):
        module.paged_attention(out, q, cache, tables, torch.tensor([0], dtype=torch.int32),
                               torch.tensor([9], dtype=torch.int32), 4, 1.0)


@pytest.mark.parametrize("changed", [0, 1])
def test_cache_key_depends_on_every_source(monkeypatch: pytest.MonkeyPatch, tmp_path, changed: int) -> None:  # type: ignore[no-untyped-def]
    key = pa.cache_key()
    sources = list(pa.SOURCES)
    other = tmp_path / sources[changed].name
    other.write_bytes(sources[changed].read_bytes() + b"\n// changed\n")
    sources[changed] = other
    monkeypatch.setattr(pa, "SOURCES", tuple(sources))
    assert pa.cache_key() != key


def test_greedy_generations_identical_with_kernel_fallback_and_gather(tmp_path) -> None:  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")  # noqa: F841
    from fleetserve_server.engine.sampling_params import SamplingParams
    from fleetserve_server.runner.loader import load_model
    from fleetserve_server.runner.model_runner import TorchModelRunner
    from fleetserve_server.testing import make_tiny_llama
    from test_runner_model import _drive, _prompts

    path = make_tiny_llama(tmp_path / "m", num_heads=8, num_kv_heads=2)
    prompts = _prompts(8, 259)
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    _kernel()
    results = {}
    for backend in ("paged", "torch", "gather"):
        loaded = load_model(path, dtype="float32", device=torch.device("cpu"), quantization="none",
                            max_positions=256)
        loaded.model.attention = backend
        runner = TorchModelRunner(loaded.model, num_blocks=256, block_size=4, eos_token_ids=frozenset())
        results[backend] = _drive(runner, prompts, [greedy] * len(prompts), steps=12, chunk=7)
    assert results["paged"] == results["torch"] == results["gather"]


def test_a_kernel_that_cannot_build_falls_back_to_torch_and_says_why_once(monkeypatch: pytest.MonkeyPatch,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    def broken(verbose: bool = False):  # type: ignore[no-untyped-def]
        raise RuntimeError("Error building extension: no compiler")

    cache, tables = _case(4, 4, 2, 16, [8, 3])
    q = torch.randn(2, 4, 16)
    seq, ctx = torch.arange(2, dtype=torch.int32), torch.tensor([8, 3], dtype=torch.int32)
    monkeypatch.setattr(pa, "build", broken)
    pa.extension.cache_clear()
    try:
        with caplog.at_level("WARNING", logger=pa.__name__):
            first = pa.paged_attention(q, cache, tables, seq, ctx, 4, 0.25)
            pa.paged_attention(q, cache, tables, seq, ctx, 4, 0.25)
        warnings = [r for r in caplog.records if "torch fallback" in r.getMessage()]
        assert len(warnings) == 1 and "no compiler" in warnings[0].getMessage()
        torch.testing.assert_close(first, pa.paged_attention_torch(q, cache, tables, seq, ctx, 4, 0.25))
    finally:
        pa.extension.cache_clear()  # the next caller loads the real kernel again
