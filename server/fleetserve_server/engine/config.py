"""The engine's configuration: one frozen dataclass, validated when made."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    """Limits of the scheduler and the KV block pool.

    ``num_blocks`` blocks of ``block_size`` tokens make up the paged KV cache;
    the server sizes it with ``fleetserve_server.memory.plan_memory``.
    ``max_batch_tokens`` bounds the tokens computed in one step (prefill chunks
    plus one per decode). ``max_queue_length`` bounds the waiting queue
    (``None`` = unbounded). Cached blocks nobody references are freed after
    ``cache_ttl_seconds`` of idleness.

    Invariants checked here: every limit is positive, one sequence of
    ``max_model_len`` tokens fits in the block pool, and without chunked
    prefill a whole ``max_model_len`` prompt fits in one step's token budget.
    """

    max_model_len: int
    num_blocks: int
    max_num_seqs: int = 32
    max_batch_tokens: int = 2048
    block_size: int = 16
    enable_prefix_caching: bool = True
    cache_ttl_seconds: float = 600.0
    max_queue_length: int | None = None
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        for name in ("max_model_len", "num_blocks", "max_num_seqs", "max_batch_tokens", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.cache_ttl_seconds > 0:
            raise ValueError(
                f"cache_ttl_seconds must be > 0, got {self.cache_ttl_seconds!r} "
                "(disable prefix caching with enable_prefix_caching=False instead)"
            )
        if self.max_queue_length is not None and (
            isinstance(self.max_queue_length, bool)
            or not isinstance(self.max_queue_length, int)
            or self.max_queue_length < 1
        ):
            raise ValueError(
                f"max_queue_length must be an integer >= 1 or None (unbounded), got {self.max_queue_length!r}"
            )
        blocks_needed = -(-self.max_model_len // self.block_size)
        if blocks_needed > self.num_blocks:
            raise ValueError(
                f"num_blocks={self.num_blocks} x block_size={self.block_size} = "
                f"{self.num_blocks * self.block_size} KV tokens cannot hold one sequence of "
                f"max_model_len={self.max_model_len}; lower max_model_len or give the KV cache more memory"
            )
        if not self.enable_chunked_prefill and self.max_batch_tokens < self.max_model_len:
            raise ValueError(
                f"max_batch_tokens={self.max_batch_tokens} is below max_model_len={self.max_model_len}: "
                "without chunked prefill a long prompt could never be scheduled; "
                "raise max_batch_tokens or enable chunked prefill"
            )

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the block pool can hold."""
        return self.num_blocks * self.block_size


def default_max_queue_length(config: EngineConfig) -> int:
    """The server's waiting-queue bound when none is configured.

    Four times the number of ``max_model_len`` sequences the KV cache holds (a
    queued request then waits at most about four "rounds" of the cache), and
    never below ``max_num_seqs``. Past it a client gets 429 + Retry-After at
    once instead of a queue that only grows (and an autoscaler or router can
    send it elsewhere).
    """
    return max(config.max_num_seqs, 4 * config.kv_capacity_tokens // config.max_model_len)
