"""Where a tensor-parallel rank's rows come from: the index ranges of its Megatron shard.

``fleetserve_server.sharding`` counts a rank's shard (the planner sizes memory
from it); this module turns the same counts into the row and column ranges the
loader reads, so the planner and the real per-rank layout cannot drift apart
(``shard_layout`` takes its sizes from ``sharding.rank_shard``).

* q heads ``[r h/N, (r+1) h/N)``; KV heads ``[r kv/N, ...)`` when ``kv >= N``,
  else the one KV head its q heads attend to (``r // (N / kv)``, replicated);
* the MLP's intermediate rows and the vocabulary rows: contiguous, the first
  ``total % N`` ranks one row more;
* column-parallel Linears (q|k|v, gate|up, an untied lm_head) take rows of the
  checkpoint's weight, row-parallel ones (o_proj, down) take columns.

Vocabulary-parallel embedding and LM head, not replicated: the planner counts
``vocab / N`` rows per rank (a replicated 128,256 x 8,192 Llama-3 embedding
is 2 GiB per GPU in bf16, the memory tensor parallelism exists to spread),
and the price is one all-reduce of ``tokens x hidden`` for the lookup and one
gather of ``seqs x vocab / N`` logits per step.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleetserve_server.architecture import ModelArchitecture
from fleetserve_server.sharding import rank_shard


@dataclass(frozen=True)
class ShardLayout:
    """Rank ``rank``'s ranges (start, stop) in the full model's index space."""

    rank: int
    size: int
    heads: tuple[int, int]
    kv_heads: tuple[int, int]
    intermediate: tuple[int, int]
    vocab: tuple[int, int]
    vocab_rows_max: int  # the largest rank's vocabulary rows (rank 0's): the logits gather's width

    @property
    def num_heads(self) -> int:
        return self.heads[1] - self.heads[0]

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]


def _offset(sizes: list[int], rank: int) -> tuple[int, int]:
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def shard_layout(arch: ModelArchitecture, size: int, rank: int) -> ShardLayout:
    """The ranges of ``rank``'s shard of a ``size``-way split (checked by ``sharding``)."""
    shards = [rank_shard(arch, size, r) for r in range(size)]
    mine = shards[rank]
    heads = (rank * mine.attention_heads, (rank + 1) * mine.attention_heads)
    if arch.num_kv_heads >= size:
        kv = (rank * mine.kv_heads, (rank + 1) * mine.kv_heads)
    else:
        head = rank // (size // arch.num_kv_heads)
        kv = (head, head + 1)
    return ShardLayout(
        rank=rank, size=size, heads=heads, kv_heads=kv,
        intermediate=_offset([s.intermediate_size for s in shards], rank),
        vocab=_offset([s.vocab_rows for s in shards], rank),
        vocab_rows_max=max(s.vocab_rows for s in shards),
    )
