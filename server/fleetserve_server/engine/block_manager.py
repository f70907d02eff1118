"""The paged KV cache's bookkeeping: fixed-size blocks, reference counts,
prefix caching by chained block hashes, TTL expiry and LRU eviction.

No torch here: the runner owns the tensors; this module only decides which
block holds which positions of which sequence.
"""

from __future__ import annotations

import time
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from hashlib import blake2b

from fleetserve_server.engine.sequence import Sequence


def hash_block(parent: bytes | None, token_ids: list[int]) -> bytes:
    """Chained content hash of one full block: it covers the block's tokens and,
    through ``parent``, every token before them, so equal hashes mean equal
    prefixes (128-bit; tokens are compared too on a hit)."""
    return hash_block_bytes(parent, array("q", token_ids).tobytes())


def hash_block_bytes(parent: bytes | None, token_bytes: bytes | memoryview) -> bytes:
    """``hash_block`` of tokens already laid out as native int64s (the router lays out a whole
    prompt's code points at once and hashes it block by block)."""
    h = blake2b(digest_size=16)
    if parent is not None:
        h.update(parent)
    h.update(token_bytes)
    return h.digest()


@dataclass
class Block:
    """One KV block. ``block_hash``/``token_ids`` are set once its
    ``block_size`` positions are all computed; from then on it is immutable
    and may be shared."""

    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None
    token_ids: tuple[int, ...] = ()
    last_used: float = 0.0


class BlockManager:
    """Allocates KV blocks to sequences.

    Every block is in exactly one of three states:
      * used: ``ref_count > 0`` (held by one or more sequences);
      * cached: ``ref_count == 0`` with a hash — kept for prefix reuse, in LRU
        order of release, until ``cache_ttl_seconds`` of idleness (evicted,
        reason ``expired``) or until a new block is needed and nothing is free
        (least recently used first, reason ``pressure``);
      * free: ``ref_count == 0`` and no hash.

    Invariants (checked by ``check_invariants`` and property tests):
      * ref counts are never negative; ``ref_count`` equals the number of
        block-table entries of live sequences that name the block;
      * free + cached + used = ``num_blocks``; cached blocks count as free
        capacity (``num_free_blocks``) because they can be evicted at once;
      * a block is shared (``ref_count > 1``) only when it is full and every
        sharer's tokens up to its end equal the block's (the hash covers the
        whole prefix, and tokens are compared on every hit);
      * a block with a hash is never written again: a sequence writes only to
        its own not-yet-full blocks, which nobody else references.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        enable_prefix_caching: bool = True,
        cache_ttl_seconds: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.cache_ttl_seconds = cache_ttl_seconds
        self.clock = clock
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))
        self._cached: OrderedDict[int, None] = OrderedDict()  # LRU first
        self._hash_to_block: dict[bytes, int] = {}
        self.num_used_blocks = 0
        self.evictions: dict[str, int] = {"expired": 0, "pressure": 0}
        self.prefix_queries_tokens = 0
        self.prefix_hits_tokens = 0

    # ---- capacity -------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation can take: free plus evictable cached ones."""
        return len(self._free) + len(self._cached)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage_ratio(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- hashing and lookup --------------------------------------------

    def _block_hashes(self, seq: Sequence, num_full_blocks: int) -> list[bytes]:
        """The sequence's chained hashes of its first ``num_full_blocks`` blocks (memoized on it)."""
        hashes = seq.block_hashes
        bs = self.block_size
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else None, seq.token_ids[i * bs : (i + 1) * bs]))
        return hashes

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix of ``seq``.

        Looks only at full blocks before the last token, so at least that token
        is always computed (its logits are needed) and never into a shared block.
        A request for prompt logprobs needs the logits of every prompt position: no hits.
        """
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []
        bs = self.block_size
        hits: list[int] = []
        for i, h in enumerate(self._block_hashes(seq, (len(seq.token_ids) - 1) // bs)):
            block_id = self._hash_to_block.get(h)
            if block_id is None or list(self.blocks[block_id].token_ids) != seq.token_ids[i * bs : (i + 1) * bs]:
                break
            hits.append(block_id)
        return hits

    # ---- allocate / free -------------------------------------------------

    def can_allocate(self, seq: Sequence) -> bool:
        """Whether ``allocate(seq)`` would succeed now."""
        hits = self._cached_prefix(seq)
        evictable_hits = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        new_blocks = self.blocks_needed(len(seq.token_ids)) - len(hits)
        return new_blocks + evictable_hits <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence blocks for all its tokens, reusing the cached
        prefix; sets ``num_computed_tokens`` to the cached token count."""
        if seq.block_table:
            raise RuntimeError(f"{seq!r} already holds blocks")
        if not self.can_allocate(seq):
            raise RuntimeError(f"not enough free KV blocks for {seq!r}; call can_allocate first")
        hits = self._cached_prefix(seq)
        now = self.clock()
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._cached[block_id]
                self.num_used_blocks += 1
            block.ref_count += 1
            block.last_used = now
        seq.block_table = list(hits)
        seq.num_registered_blocks = len(hits)
        for _ in range(self.blocks_needed(len(seq.token_ids)) - len(hits)):
            seq.block_table.append(self._take_block())
        cached_tokens = len(hits) * self.block_size
        seq.num_computed_tokens = cached_tokens
        if self.enable_prefix_caching:
            self.prefix_queries_tokens += len(seq.token_ids)
            self.prefix_hits_tokens += cached_tokens

    def can_append(self, seq: Sequence) -> bool:
        """Whether the blocks for every known token of ``seq`` are (or can be) there."""
        missing = self.blocks_needed(len(seq.token_ids)) - len(seq.block_table)
        return missing <= self.num_free_blocks

    def append(self, seq: Sequence) -> None:
        """Extend ``seq``'s block table to cover all its tokens (one new block per
        ``block_size`` decoded tokens)."""
        if not self.can_append(seq):
            raise RuntimeError(f"no free KV block to extend {seq!r}; call can_append first")
        while len(seq.block_table) < self.blocks_needed(len(seq.token_ids)):
            seq.block_table.append(self._take_block())

    def mark_computed(self, seq: Sequence) -> None:
        """Register the hashes of ``seq``'s blocks that became full and computed,
        so later sequences with the same prefix can share them."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if num_full <= seq.num_registered_blocks:
            return
        hashes = self._block_hashes(seq, num_full)
        bs = self.block_size
        for i in range(seq.num_registered_blocks, num_full):
            h = hashes[i]
            block = self.blocks[seq.block_table[i]]
            if block.block_hash is None and h not in self._hash_to_block:
                block.block_hash = h
                block.token_ids = tuple(seq.token_ids[i * bs : (i + 1) * bs])
                self._hash_to_block[h] = block.block_id
            # else: an identical block is already cached; this copy stays private
        seq.num_registered_blocks = num_full

    def free(self, seq: Sequence) -> None:
        """Release ``seq``'s blocks (newest first, so the cache's LRU order
        evicts a sequence's tail before its shared prefix)."""
        now = self.clock()
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"block {block_id} freed more often than allocated")
            block.ref_count -= 1
            if block.ref_count == 0:
                self.num_used_blocks -= 1
                block.last_used = now
                if block.block_hash is not None:
                    self._cached[block_id] = None
                else:
                    block.token_ids = ()
                    self._free.append(block_id)
        seq.block_table = []
        seq.num_registered_blocks = 0

    # ---- eviction --------------------------------------------------------

    def expire(self) -> int:
        """Free cached blocks idle for ``cache_ttl_seconds`` or longer; returns how many."""
        now = self.clock()
        expired = 0
        while self._cached:
            block_id = next(iter(self._cached))
            if now - self.blocks[block_id].last_used < self.cache_ttl_seconds:
                break  # LRU order: all later ones are younger
            self._evict(block_id, "expired")
            expired += 1
        return expired

    def _evict(self, block_id: int, reason: str) -> None:
        block = self.blocks[block_id]
        del self._cached[block_id]
        assert block.block_hash is not None
        del self._hash_to_block[block.block_hash]
        block.block_hash = None
        block.token_ids = ()
        self._free.append(block_id)
        self.evictions[reason] += 1

    def _take_block(self) -> int:
        if not self._free:
            if not self._cached:
                raise RuntimeError("KV cache exhausted")
            self._evict(next(iter(self._cached)), "pressure")
        block_id = self._free.popleft()
        block = self.blocks[block_id]
        block.ref_count = 1
        block.last_used = self.clock()
        self.num_used_blocks += 1
        return block_id

    def reset_prefix_cache(self) -> int:
        """Drop every cached (unreferenced) block; returns how many (not counted as evictions)."""
        dropped = 0
        for block_id in list(self._cached):
            self._evict(block_id, "expired")
            self.evictions["expired"] -= 1
            dropped += 1
        return dropped

    def check_invariants(self, live: list[Sequence] | None = None) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (for tests).

        With ``live`` (every sequence that holds blocks), reference counts are
        also checked against the block tables."""
        used = [b for b in self.blocks if b.ref_count > 0]
        if any(b.ref_count < 0 for b in self.blocks):
            raise AssertionError("negative ref_count")
        if len(used) != self.num_used_blocks:
            raise AssertionError(f"num_used_blocks={self.num_used_blocks} but {len(used)} blocks are referenced")
        free_set, cached_set = set(self._free), set(self._cached)
        if len(free_set) != len(self._free) or free_set & cached_set:
            raise AssertionError("a block is listed twice among free/cached")
        if len(free_set) + len(cached_set) + len(used) != self.num_blocks:
            raise AssertionError("free + cached + used != total")
        for b in self.blocks:
            if b.block_id in free_set and (b.ref_count or b.block_hash is not None):
                raise AssertionError(f"free block {b.block_id} is referenced or hashed")
            if b.block_id in cached_set and (b.ref_count or b.block_hash is None):
                raise AssertionError(f"cached block {b.block_id} is referenced or unhashed")
            if b.block_hash is not None and self._hash_to_block.get(b.block_hash) != b.block_id:
                raise AssertionError(f"block {b.block_id} hash not indexed")
        if len(self._hash_to_block) != sum(1 for b in self.blocks if b.block_hash is not None):
            raise AssertionError("hash index has stale entries")
        if live is not None:
            refs: dict[int, int] = {}
            bs = self.block_size
            for seq in live:
                for i, block_id in enumerate(seq.block_table):
                    refs[block_id] = refs.get(block_id, 0) + 1
                    block = self.blocks[block_id]
                    if block.block_hash is not None and list(block.token_ids) != seq.token_ids[i * bs : (i + 1) * bs]:
                        raise AssertionError(f"{seq!r} shares block {block_id} with different tokens")
            for b in self.blocks:
                if refs.get(b.block_id, 0) != b.ref_count:
                    raise AssertionError(f"block {b.block_id}: ref_count {b.ref_count} != {refs.get(b.block_id, 0)}")
                if b.ref_count > 1 and b.block_hash is None:
                    raise AssertionError(f"block {b.block_id} shared without a hash")
