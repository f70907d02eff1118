"""The router's prefix index and prompt hashing on plain data."""

from __future__ import annotations

from fake_clock import Clock
from fleetserve_router.prefix_index import PrefixIndex
from fleetserve_router.prompt import ChunkHasher, chunk_hashes, render_chat, render_request
from fleetserve_server.engine.block_manager import hash_block
from hypothesis import given
from hypothesis import strategies as st


def hashes(text: str, n: int = 4) -> list[bytes]:
    return chunk_hashes(text, n)


def test_chunk_hashes_are_the_servers_chained_block_hashes() -> None:
    got = chunk_hashes("abcdefghij", 4)
    first = hash_block(None, [ord(c) for c in "abcd"])
    assert got == [first, hash_block(first, [ord(c) for c in "efgh"])]  # the partial tail is not hashed


# every code point, lone surrogates included (json.loads makes them from "\\ud800")
ANY_TEXT = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=()),
                   max_size=60)


@given(ANY_TEXT, st.integers(1, 9))
def test_chunk_hashes_are_hash_block_on_every_text(text: str, n: int) -> None:
    expected: list[bytes] = []
    parent = None
    for start in range(0, len(text) - n + 1, n):
        parent = hash_block(parent, [ord(c) for c in text[start : start + n]])
        expected.append(parent)
    assert chunk_hashes(text, n) == expected


@given(st.lists(st.tuples(st.integers(0, 3), ANY_TEXT), max_size=12), st.integers(1, 6), st.integers(1, 8))
def test_the_memo_never_changes_a_hash(texts: list[tuple[int, str]], n: int, max_entries: int) -> None:
    hasher = ChunkHasher(n, max_entries=max_entries)
    shared = ["", "You are terse. " * 3, "sys\x1d" + "ab" * 9, "\ud800" * 7]
    for i, tail in [*texts, *texts]:  # twice: the second pass is served from the memo where it kept them
        text = shared[i] + tail
        assert hasher.hashes(text) == chunk_hashes(text, n)
        assert len(hasher) <= max_entries


@given(st.text(max_size=80), st.text(max_size=80))
def test_equal_hashes_mean_equal_prefixes(a: str, b: str) -> None:
    ha, hb = chunk_hashes(a, 4), chunk_hashes(b, 4)
    for i, (x, y) in enumerate(zip(ha, hb, strict=False)):
        assert (x == y) == (a[: 4 * (i + 1)] == b[: 4 * (i + 1)])


def test_next_turn_rendering_extends_this_turn() -> None:
    turn1 = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    turn2 = [*turn1, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    assert render_chat("m", turn2).startswith(render_chat("m", turn1))
    assert render_request("/v1/chat/completions", {"model": "m", "messages": turn1}) == render_chat("m", turn1)
    assert render_request("/v1/completions", {"model": "m", "prompt": "abc"}).endswith("abc")
    assert render_request("/v1/completions", {"model": "m", "prompt": [1, 2]}) != ""
    assert render_request("/v1/chat/completions", {"messages": "nonsense"}) == ""


def test_match_counts_leading_chunks_per_replica() -> None:
    index = PrefixIndex(60, clock=Clock(1000.0))
    index.record("a", hashes("0123456789abcdef"))           # 4 chunks
    index.record("b", hashes("0123456789ab"))               # first 3 chunks
    assert index.match(hashes("0123456789abcdefXYZW")) == {"a": 4, "b": 3}
    assert index.match(hashes("0123XXXX89abcdef")) == {"a": 1, "b": 1}  # chained: a break ends the run
    assert index.match(hashes("ZZZZ0123")) == {}
    assert index.match(hashes("0123456789abcdef"), replicas=["b"]) == {"b": 3}


def test_ttl_expires_credit_like_the_servers_idle_expiry() -> None:
    clock = Clock(1000.0)
    index = PrefixIndex(60, clock=clock)
    index.record("a", hashes("01234567"))
    clock.now += 59
    assert index.match(hashes("01234567")) == {"a": 2}
    index.record("a", hashes("0123"))  # used again: its TTL restarts, the second chunk's does not
    clock.now += 2
    assert index.match(hashes("01234567")) == {"a": 1}
    clock.now += 60
    assert index.match(hashes("01234567")) == {}
    assert index.expire() == 2 and len(index) == 0


def test_forget_replica_and_older_credit() -> None:
    clock = Clock(1000.0)
    index = PrefixIndex(600, clock=clock)
    index.record("a", hashes("AAAAAAAA"))
    clock.now += 1
    index.record("a", hashes("BBBBBBBB"))
    index.record("b", hashes("AAAAAAAA"))
    credit = index.last_used("a", hashes("AAAA")[0])
    assert credit is not None
    index.forget_older("a", credit)  # a evicted AAAA..: everything older went too, BBBB stays
    assert index.match(hashes("AAAAAAAA")) == {"b": 2}
    assert index.match(hashes("BBBBBBBB")) == {"a": 2}
    assert index.forget_replica("a") == 2
    assert index.match(hashes("BBBBBBBB")) == {}


def test_size_is_bounded_lru() -> None:
    index = PrefixIndex(600, max_entries=3, clock=Clock(1000.0))
    index.record("a", hashes("0000111122223333"))
    assert len(index) == 3
    assert index.match(hashes("0000111122223333")) == {}  # the oldest (first) chunk went: no leading run


@given(st.lists(st.tuples(st.sampled_from("abc"), st.text(alphabet="xy", max_size=16)), max_size=30),
       st.text(alphabet="xy", max_size=16))
def test_match_never_credits_a_replica_that_was_not_sent_the_prefix(records: list[tuple[str, str]],
                                                                    query: str) -> None:
    index = PrefixIndex(600, clock=Clock(1000.0))
    for replica, text in records:
        index.record(replica, hashes(text, 2))
    for replica, n in index.match(hashes(query, 2)).items():
        assert any(r == replica and t[: 2 * n] == query[: 2 * n] and len(t) >= 2 * n for r, t in records)
