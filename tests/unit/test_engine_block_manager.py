"""Block manager: reference counts, prefix caching, TTL expiry and LRU eviction."""

from __future__ import annotations

import pytest
from fleetserve_server.engine import block_manager as bm_module
from fleetserve_server.engine.block_manager import BlockManager
from fleetserve_server.engine.sampling_params import SamplingParams
from fleetserve_server.engine.sequence import Sequence
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

BS = 4


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def seq(tokens: list[int]) -> Sequence:
    return Sequence("r", list(tokens), SamplingParams(), arrival_time=0.0)


def compute_all(bm: BlockManager, s: Sequence) -> None:
    """What the scheduler does after the runner wrote the KV of every token."""
    s.num_computed_tokens = len(s.token_ids)
    bm.mark_computed(s)


def make(num_blocks: int = 8, **kw) -> tuple[BlockManager, FakeClock]:
    clock = FakeClock()
    return BlockManager(num_blocks, BS, clock=clock, **kw), clock


def test_allocate_and_free_keep_counts():
    bm, _ = make()
    a = seq(list(range(10)))  # 3 blocks
    assert bm.can_allocate(a)
    bm.allocate(a)
    assert len(a.block_table) == 3 and a.num_computed_tokens == 0
    assert bm.num_used_blocks == 3 and bm.num_free_blocks == 5
    assert all(bm.blocks[b].ref_count == 1 for b in a.block_table)
    bm.check_invariants([a])
    bm.free(a)
    assert a.block_table == [] and bm.num_used_blocks == 0 and bm.num_free_blocks == 8
    bm.check_invariants([])


def test_cannot_allocate_beyond_capacity():
    bm, _ = make(num_blocks=3)
    a = seq(list(range(13)))  # needs 4 blocks
    assert not bm.can_allocate(a)
    with pytest.raises(RuntimeError, match="can_allocate"):
        bm.allocate(a)
    bm.check_invariants([])


def test_append_takes_a_block_only_at_a_boundary():
    bm, _ = make(num_blocks=3)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8])
    bm.allocate(a)
    compute_all(bm, a)
    assert bm.can_append(a)
    bm.append(a)
    assert len(a.block_table) == 2  # all 8 tokens covered already
    a.append_token(9)
    bm.append(a)
    assert len(a.block_table) == 3
    a.token_ids.extend([10, 11, 12, 13])  # a 4th block would be needed
    assert not bm.can_append(a)
    with pytest.raises(RuntimeError, match="can_append"):
        bm.append(a)


def test_prefix_shared_between_live_sequences():
    bm, _ = make()
    a = seq(list(range(10)))
    bm.allocate(a)
    compute_all(bm, a)  # blocks 0 and 1 are full and computed -> cached by hash
    b = seq(list(range(8)) + [99, 98, 97])
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2]
    assert b.num_computed_tokens == 8 and b.num_cached_tokens is None  # the scheduler sets num_cached_tokens
    assert [bm.blocks[x].ref_count for x in a.block_table] == [2, 2, 1]
    assert b.block_table[2] not in a.block_table
    assert bm.prefix_hits_tokens == 8 and bm.prefix_queries_tokens == 10 + 11
    bm.check_invariants([a, b])


def test_uncomputed_blocks_are_not_shared():
    bm, _ = make()
    a = seq(list(range(10)))
    bm.allocate(a)  # KV not computed yet
    b = seq(list(range(10)))
    bm.allocate(b)
    assert b.num_computed_tokens == 0
    assert not set(a.block_table) & set(b.block_table)


def test_same_block_tokens_after_a_different_prefix_do_not_hit():
    bm, _ = make()
    a = seq([1, 1, 1, 1, 5, 6, 7, 8, 0])
    bm.allocate(a)
    compute_all(bm, a)
    b = seq([2, 2, 2, 2, 5, 6, 7, 8, 0])  # block 1 equal, block 0 differs: chained hash differs
    bm.allocate(b)
    assert b.num_computed_tokens == 0


def test_fully_cached_prompt_still_computes_its_last_token():
    bm, _ = make()
    a = seq(list(range(8)))  # exactly two full blocks
    bm.allocate(a)
    compute_all(bm, a)
    bm.free(a)
    b = seq(list(range(8)))
    bm.allocate(b)
    assert b.num_computed_tokens == 4  # block 1 holds the last token: recomputed in a private block
    assert bm.blocks[b.block_table[1]].block_hash is None


def test_hash_collision_is_caught_by_token_comparison(monkeypatch):
    monkeypatch.setattr(bm_module, "hash_block", lambda parent, tokens: b"\0" * 16)
    bm, _ = make()
    a = seq([1, 2, 3, 4, 5])
    bm.allocate(a)
    compute_all(bm, a)
    b = seq([9, 9, 9, 9, 5])  # same (colliding) hash, other tokens
    bm.allocate(b)
    assert b.num_computed_tokens == 0
    assert b.block_table[0] != a.block_table[0]
    bm.check_invariants([a, b])


def test_freed_blocks_stay_cached_until_ttl_then_expire():
    bm, clock = make(cache_ttl_seconds=600)
    a = seq(list(range(9)))
    bm.allocate(a)
    compute_all(bm, a)
    bm.free(a)
    assert bm.num_cached_blocks == 2 and bm.num_free_blocks == 8 and bm.num_used_blocks == 0
    clock.now = 599.9
    assert bm.expire() == 0
    b = seq(list(range(9)))
    bm.allocate(b)  # a hit refreshes the blocks' idle time
    assert b.num_computed_tokens == 8
    clock.now = 700.0
    bm.free(b)
    clock.now = 1299.0
    assert bm.expire() == 0
    clock.now = 1300.0
    assert bm.expire() == 2
    assert bm.evictions == {"expired": 2, "pressure": 0}
    assert bm.num_cached_blocks == 0
    c = seq(list(range(9)))
    bm.allocate(c)
    assert c.num_computed_tokens == 0
    bm.check_invariants([c])


def test_referenced_blocks_never_expire():
    bm, clock = make(cache_ttl_seconds=10)
    a = seq(list(range(9)))
    bm.allocate(a)
    compute_all(bm, a)
    clock.now = 1e6
    assert bm.expire() == 0
    bm.check_invariants([a])


def test_pressure_evicts_least_recently_used_first():
    bm, clock = make(num_blocks=6)
    old = seq([1] * 9)  # 3 blocks, 2 of them full
    bm.allocate(old)
    compute_all(bm, old)
    bm.free(old)
    clock.now = 1.0
    recent = seq([2] * 9)
    bm.allocate(recent)
    compute_all(bm, recent)
    bm.free(recent)
    assert bm.num_cached_blocks == 4 and bm.num_free_blocks == 6
    big = seq([3] * 16)  # 4 blocks: 2 truly free, then 2 cached evicted
    assert bm.can_allocate(big)
    bm.allocate(big)
    assert bm.evictions == {"expired": 0, "pressure": 2}
    bm.free(big)
    again_recent = seq([2] * 9)
    bm.allocate(again_recent)
    assert again_recent.num_computed_tokens == 8  # the recently used prefix survived
    again_old = seq([1] * 9)
    assert bm.can_allocate(again_old)
    bm.allocate(again_old)
    assert again_old.num_computed_tokens == 0  # the old one was evicted
    bm.check_invariants([again_recent, again_old])


def test_cached_hits_count_against_free_capacity():
    bm, _ = make(num_blocks=4)
    a = seq(list(range(9)))
    bm.allocate(a)
    compute_all(bm, a)
    bm.free(a)  # 2 cached + 2 free
    b = seq(list(range(8)) + [50] * 8)  # 2 hits (taken out of the cache) + 2 new = all 4
    assert bm.can_allocate(b)
    c = seq(list(range(8)) + [50] * 9)  # 2 hits + 3 new: one too many
    assert not bm.can_allocate(c)
    bm.allocate(b)
    assert bm.num_free_blocks == 0
    bm.check_invariants([b])


def test_without_prefix_caching_nothing_is_cached():
    bm, _ = make(enable_prefix_caching=False)
    a = seq(list(range(9)))
    bm.allocate(a)
    compute_all(bm, a)
    bm.free(a)
    assert bm.num_cached_blocks == 0
    b = seq(list(range(9)))
    bm.allocate(b)
    assert b.num_computed_tokens == 0
    assert bm.prefix_queries_tokens == 0


def test_double_free_is_detected():
    bm, _ = make()
    a = seq([1, 2, 3])
    bm.allocate(a)
    table = list(a.block_table)
    bm.free(a)
    a.block_table = table
    with pytest.raises(RuntimeError, match="freed more often"):
        bm.free(a)


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / compute / decode / free / clock sequences keep every invariant."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.bm = BlockManager(12, BS, cache_ttl_seconds=5.0, clock=self.clock)
        self.live: list[Sequence] = []

    # tokens from a tiny alphabet so that prefixes (and whole blocks) repeat often
    @rule(tokens=st.lists(st.integers(0, 2), min_size=1, max_size=20))
    def allocate(self, tokens):
        s = seq(tokens)
        if self.bm.can_allocate(s):
            before = self.bm.num_free_blocks
            self.bm.allocate(s)
            assert s.num_computed_tokens % BS == 0 and s.num_computed_tokens < len(tokens)
            for i in range(s.num_computed_tokens // BS):  # a hit block holds exactly our tokens
                assert list(self.bm.blocks[s.block_table[i]].token_ids) == tokens[i * BS:(i + 1) * BS]
            assert self.bm.num_free_blocks <= before
            self.live.append(s)
        else:
            with pytest.raises(RuntimeError):
                self.bm.allocate(s)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def compute(self, data):
        s = data.draw(st.sampled_from(self.live))
        s.num_computed_tokens = data.draw(st.integers(s.num_computed_tokens, len(s.token_ids)))
        self.bm.mark_computed(s)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), token=st.integers(0, 2))
    def decode(self, data, token):
        s = data.draw(st.sampled_from(self.live))
        s.num_computed_tokens = len(s.token_ids)
        self.bm.mark_computed(s)
        s.append_token(token)
        if self.bm.can_append(s):
            self.bm.append(s)
        else:
            self.free_seq(s)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        self.free_seq(data.draw(st.sampled_from(self.live)))

    def free_seq(self, s: Sequence) -> None:
        self.bm.free(s)
        self.live.remove(s)

    @rule(dt=st.floats(0, 4))
    def tick_and_expire(self, dt):
        self.clock.now += dt
        self.bm.expire()
        for b in self.bm.blocks:  # nothing unreferenced outlives the TTL after expire()
            if b.ref_count == 0 and b.block_hash is not None:
                assert self.clock.now - b.last_used < 5.0

    @invariant()
    def consistent(self):
        self.bm.check_invariants(self.live)
        assert self.bm.num_free_blocks + self.bm.num_used_blocks == self.bm.num_blocks
        assert all(b.ref_count >= 0 for b in self.bm.blocks)


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
