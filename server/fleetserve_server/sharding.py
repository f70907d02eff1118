"""How a tensor-parallel rank's share of a Llama-family model is cut (counts, not bytes).

Pure Python (no torch): the memory planner sizes every rank from these counts.

The split is Megatron's, as vLLM does it:

* attention: the query heads are split evenly across the ``N`` ranks (so ``N``
  must divide them); the KV heads too when there are at least ``N`` of them,
  otherwise each KV head is replicated on ``N / kv_heads`` ranks and every
  rank holds exactly one (so ``N`` must divide or be divided by ``kv_heads``).
  The fused q/k/v projection is column-parallel (each rank computes its own
  heads), ``o_proj`` is row-parallel (each rank reads its heads' outputs, full
  ``hidden`` out, then an all-reduce).
* MLP: gate/up column-parallel, down row-parallel, the intermediate width
  split as evenly as it divides (rank ``r`` gets one more row while
  ``r < intermediate % N``).
* embedding and LM head: vocabulary-parallel (each rank holds ``vocab / N``
  rows, the same remainder rule). Replicating them instead would cost every
  rank the full ``vocab x hidden`` (2 GiB per copy in bf16 for Llama 3's
  128,256 x 8,192), which is exactly the memory tensor parallelism exists to
  spread; the price, an all-gather of the logits, is ``seqs x vocab`` per step.
* RMSNorm weights and biases are replicated (counted in full on every rank:
  they are < 0.01 % of a model's parameters, so this upper bound costs nothing).

Rank 0 always holds the largest shard (it takes the first remainder row), and
it is also where the sampler gathers the full logits, so it is the rank that
decides whether a model fits.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleetserve_server.architecture import ModelArchitecture


@dataclass(frozen=True)
class RankShard:
    """What rank ``rank`` of a ``tensor_parallel_size``-way split holds.

    ``linear_parameters`` / ``linear_output_rows`` cover the quantizable
    per-layer Linears (q/k/v/o, gate/up/down); ``other_parameters`` is the
    rest (embedding and LM-head shards, replicated norms and biases).
    With ``tensor_parallel_size == 1`` every count equals the whole model's.
    """

    rank: int
    tensor_parallel_size: int
    attention_heads: int
    kv_heads: int
    intermediate_size: int
    vocab_rows: int
    linear_parameters: int
    linear_output_rows: int
    other_parameters: int


def _split(total: int, parts: int, rank: int) -> int:
    """Rank ``rank``'s share of ``total`` rows split ``parts`` ways (first ranks take the remainder)."""
    return total // parts + (1 if rank < total % parts else 0)


def check_tensor_parallel_size(arch: ModelArchitecture, tensor_parallel_size: int) -> None:
    """Raise ValueError, naming the numbers and valid sizes, if ``arch`` cannot be split this way."""
    n = tensor_parallel_size
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {n!r}")
    heads, kv = arch.num_attention_heads, arch.num_kv_heads
    kv_ok = kv % n == 0 if kv >= n else n % kv == 0
    if heads % n or not kv_ok:
        valid = [d for d in range(1, heads + 1) if heads % d == 0 and (kv % d == 0 if kv >= d else d % kv == 0)]
        raise ValueError(
            f"tensor_parallel_size {n} cannot split {arch.name}: it has {heads} attention heads and {kv} KV heads "
            f"(the size must divide the attention heads, and divide or be a multiple of the KV heads); "
            f"valid sizes: {', '.join(map(str, valid))}"
        )


def rank_shard(arch: ModelArchitecture, tensor_parallel_size: int, rank: int) -> RankShard:
    """The counts of ``rank``'s shard; ``tensor_parallel_size`` is checked first."""
    check_tensor_parallel_size(arch, tensor_parallel_size)
    n = tensor_parallel_size
    if not 0 <= rank < n:
        raise ValueError(f"rank must be in [0, {n}), got {rank!r}")
    hidden, hd = arch.hidden_size, arch.head_dim
    heads = arch.num_attention_heads // n
    kv = arch.num_kv_heads // n if arch.num_kv_heads >= n else 1
    inter = _split(arch.intermediate_size, n, rank)
    vocab = _split(arch.vocab_size, n, rank)
    per_layer = hidden * (heads + 2 * kv) * hd + heads * hd * hidden + 3 * hidden * inter
    # out_features per Linear (an int8 scale each): qkv and gate_up are column-parallel
    # (their rows split), o_proj and down row-parallel (full hidden rows out)
    rows = (heads + 2 * kv) * hd + hidden + 2 * inter + hidden
    replicated = arch.num_parameters - arch.linear_parameters - arch.embedding_parameters
    embeddings = vocab * hidden * (1 if arch.tie_word_embeddings else 2)
    return RankShard(
        rank=rank, tensor_parallel_size=n, attention_heads=heads, kv_heads=kv, intermediate_size=inter,
        vocab_rows=vocab, linear_parameters=arch.num_layers * per_layer,
        linear_output_rows=arch.num_layers * rows, other_parameters=embeddings + replicated,
    )


def rank_shards(arch: ModelArchitecture, tensor_parallel_size: int) -> list[RankShard]:
    """Every rank's shard, rank 0 first."""
    return [rank_shard(arch, tensor_parallel_size, r) for r in range(tensor_parallel_size)]
