"""Incremental detokenization and stop-string helpers."""

from __future__ import annotations

import pytest
from fleetserve_server.engine.detokenizer import IncrementalDetokenizer, find_stop, partial_stop_len
from fleetserve_server.engine.toy import EOS_TOKEN_ID, ByteTokenizer

TEXT = "héllo wörld — 20 € 😀!"


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.add(t) for t in ids]


def test_multibyte_characters_are_held_until_complete():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    pieces = stream(IncrementalDetokenizer(tok, tok.encode("prompt: ")), ids)
    assert "".join(pieces) == TEXT
    assert not any("\ufffd" in p for p in pieces)
    assert pieces.count("") == len(ids) - len(TEXT)  # one empty piece per continuation byte


def test_flush_releases_an_incomplete_tail():
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, [])
    ids = tok.encode("ok €")[:-1]  # cut inside the euro sign
    assert "".join(stream(detok, ids)) == "ok "
    assert detok.flush() == "\ufffd"


def test_special_tokens_are_skipped():
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    assert "".join(stream(detok, [*tok.encode("hi"), EOS_TOKEN_ID, *tok.encode("!")])) == "hi!"


def test_hf_fast_tokenizer_satisfies_the_protocol_and_streams_exactly():
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    # a byte-level BPE with a few merges: multi-byte characters split across tokens, words merged
    byte_level = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    merges = [("h", "Ã"), ("Ġ", "w"), ("l", "l"), ("ll", "o")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<eos>"] = len(vocab)
    model = tokenizers.models.BPE(vocab=vocab, merges=merges)
    raw = tokenizers.Tokenizer(model)
    raw.pre_tokenizer = byte_level
    raw.decoder = tokenizers.decoders.ByteLevel()
    raw.add_special_tokens(["<eos>"])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>")
    ids = tok.encode(TEXT, add_special_tokens=True)
    assert len(ids) < len(TEXT.encode())  # merges applied
    detok = IncrementalDetokenizer(tok, tok.encode("say: "))
    assert detok.uses_backend  # the fast path: the Rust decoder, without the Python wrapper
    pieces = stream(detok, [*ids, tok.eos_token_id])
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == TEXT
    # the wrapper path gives the same pieces
    slow = IncrementalDetokenizer(tok, tok.encode("say: "))
    slow._backend_decode = None
    assert stream(slow, [*ids, tok.eos_token_id]) == pieces


def test_find_stop_only_reports_stops_completed_by_new_text():
    assert find_stop("abcSTOPdef", ("STOP",), new_from=5) == 3  # ends inside the new text
    assert find_stop("abcSTOPdef", ("STOP",), new_from=8) == -1  # already seen before
    assert find_stop("xx END yy STOP", ("STOP", "END"), new_from=0) == 3  # earliest wins
    assert find_stop("nothing", ("STOP",), new_from=0) == -1


def test_partial_stop_len():
    assert partial_stop_len("hello wor", ("world",)) == 3
    assert partial_stop_len("hello", ("world",)) == 0
    assert partial_stop_len("aab", ("abc", "bx")) == 2  # "ab" could become "abc"
    assert partial_stop_len("x", ("x",)) == 0  # a complete stop is found by find_stop, not held
