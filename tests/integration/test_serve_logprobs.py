"""logprobs / top_logprobs (chat), logprobs + echo (completions) through the official openai SDK against a
real `fleetserve serve`, compared with transformers' log-softmax of the same model's logits."""

from __future__ import annotations

import pytest
from fleetserve_server.bench.launch import ServerProcess
from serve_util import MODEL, hf, server, tiny_model  # noqa: F401 - fixtures
from serve_util import openai_client as client

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-3
MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """[len(ids), vocab]: row i is the log-softmax of the logits after ids[: i + 1]."""
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def hf_greedy(model, ids: list[int], steps: int) -> list[int]:  # type: ignore[no-untyped-def]
    out = list(ids)
    for _ in range(steps):
        out.append(int(hf_logprobs(model, out)[-1].argmax()))
    return out[len(ids):]


def test_completion_echo_logprobs_are_the_models_log_softmax(server: ServerProcess, hf) -> None:  # noqa: F811
    model, tok = hf
    prompt = tok.encode("The quick brown fox jumps over the lazy dog", add_special_tokens=False)
    r = client(server).completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, logprobs=5,
                                          echo=True, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert lp is not None and len(lp.tokens) == len(prompt) + 3
    generated = hf_greedy(model, prompt, 3)
    ids = prompt + generated
    ref = hf_logprobs(model, ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    for i in range(1, len(ids)):
        want = ref[i - 1, ids[i]].item()
        assert abs(lp.token_logprobs[i] - want) < TOL, (i, lp.token_logprobs[i], want)
        top = lp.top_logprobs[i]
        want_top = ref[i - 1].topk(5)
        seen: set[str] = set()
        for token_id, value in zip(want_top.indices.tolist(), want_top.values.tolist(), strict=True):
            token = tok.decode([token_id])
            if token not in seen:  # two ids may decode alike: the more likely one keeps the key
                assert abs(top[token] - value) < TOL, (i, token, top[token], value)
            seen.add(token)
    assert lp.tokens == [tok.decode([t]) for t in ids]
    assert r.choices[0].text == tok.decode(prompt) + "".join(tok.decode([t]) for t in generated)
    # text_offset: where each token's text starts in the returned text
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])


def test_completion_logprobs_stream_equal_the_plain_response(server: ServerProcess) -> None:  # noqa: F811
    c = client(server)
    kwargs = dict(model=MODEL, prompt="Once upon a time there was", max_tokens=6, temperature=0, logprobs=2,
                  echo=True, extra_body={"ignore_eos": True})
    plain = c.completions.create(**kwargs).choices[0]  # type: ignore[call-overload]
    chunks = [ch.choices[0] for ch in c.completions.create(stream=True, **kwargs) if ch.choices]  # type: ignore[call-overload]
    assert "".join(ch.text for ch in chunks) == plain.text
    streamed = [v for ch in chunks if ch.logprobs for v in ch.logprobs.token_logprobs]
    assert streamed == plain.logprobs.token_logprobs
    assert [t for ch in chunks if ch.logprobs for t in ch.logprobs.tokens] == plain.logprobs.tokens


def test_chat_logprobs_and_top_logprobs_match_transformers(server: ServerProcess, hf) -> None:  # noqa: F811
    model, tok = hf
    c = client(server)
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3,
                  extra_body={"ignore_eos": True})
    r = c.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    content = r.choices[0].logprobs.content
    assert len(content) == 8
    prompt = tok.encode(tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True),
                        add_special_tokens=False)
    generated = hf_greedy(model, prompt, 8)
    ref = hf_logprobs(model, prompt + generated)
    for j, entry in enumerate(content):
        row = ref[len(prompt) - 1 + j]
        assert entry.token == tok.decode([generated[j]])
        assert abs(entry.logprob - row[generated[j]].item()) < TOL
        assert entry.bytes == list(entry.token.encode())
        want = row.topk(3)
        assert [round(t.logprob, 3) for t in entry.top_logprobs] == [round(v, 3) for v in want.values.tolist()]
    # streamed: the same entries, spread over the chunks
    stream = c.chat.completions.create(stream=True, **kwargs)  # type: ignore[call-overload]
    streamed = [e for ch in stream if ch.choices and ch.choices[0].logprobs
                for e in (ch.choices[0].logprobs.content or [])]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]


def test_sampled_tokens_report_the_raw_distribution_not_the_tempered_one(server: ServerProcess, hf) -> None:  # noqa: F811
    """OpenAI and vLLM report the model's log-softmax, whatever temperature / top_p did to the draw."""
    model, tok = hf
    prompt = tok.encode("Colours: red, green,", add_special_tokens=False)
    r = client(server).completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0.3, top_p=0.5,
                                          seed=5, logprobs=0, echo=True)
    lp = r.choices[0].logprobs
    chosen = tok.encode(lp.tokens[-1], add_special_tokens=False)
    ref = hf_logprobs(model, prompt)[-1]
    assert len(chosen) == 1 and abs(lp.token_logprobs[-1] - ref[chosen[0]].item()) < TOL
