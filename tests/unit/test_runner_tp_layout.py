"""The loader's per-rank ranges (runner/tp.py) are the planner's per-rank counts (sharding.py), and
together they cover the model exactly once (replicated KV heads excepted), with each rank's q
heads attending only to the KV heads it holds."""

from __future__ import annotations

import pytest
from fleetserve_server.memory import known_architecture
from fleetserve_server.sharding import rank_shard

pytest.importorskip("torch")
from fleetserve_server.runner.tp import shard_layout  # noqa: E402

CASES = [("Llama-3.1-70B-Instruct", n) for n in (1, 2, 4, 8)] + [
    ("builtin:smollm2-135m-instruct", 3), ("builtin:smollm2-135m-instruct", 9), ("Llama-3.1-8B-Instruct", 8)]


@pytest.mark.parametrize(("model", "size"), CASES)
def test_layout_tiles_the_model_and_matches_the_planner(model: str, size: int) -> None:
    arch = known_architecture(model)
    assert arch is not None
    layouts = [shard_layout(arch, size, r) for r in range(size)]
    for rank, layout in enumerate(layouts):
        shard = rank_shard(arch, size, rank)
        assert (layout.num_heads, layout.num_kv_heads) == (shard.attention_heads, shard.kv_heads)
        assert layout.intermediate[1] - layout.intermediate[0] == shard.intermediate_size
        assert layout.vocab[1] - layout.vocab[0] == shard.vocab_rows
        # grouped-query attention: q head j reads KV head j // group, which this rank must hold
        group = arch.num_attention_heads // arch.num_kv_heads
        needed = {j // group for j in range(*layout.heads)}
        assert needed <= set(range(*layout.kv_heads)), (rank, layout)
    for field, total in (("heads", arch.num_attention_heads), ("intermediate", arch.intermediate_size),
                         ("vocab", arch.vocab_size)):
        spans = [getattr(layout, field) for layout in layouts]
        assert spans[0][0] == 0 and spans[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))  # contiguous, no overlap
    assert layouts[0].vocab_rows_max == max(b - a for a, b in (layout.vocab for layout in layouts))
    kv_spans = {layout.kv_heads for layout in layouts}
    assert set().union(*(set(range(*s)) for s in kv_spans)) == set(range(arch.num_kv_heads))


def test_a_size_that_cannot_split_the_heads_is_refused_with_the_valid_sizes() -> None:
    arch = known_architecture("builtin:smollm2-135m-instruct")
    assert arch is not None
    with pytest.raises(ValueError, match="valid sizes: 1, 3, 9"):
        shard_layout(arch, 2, 0)
