"""n, batched prompts, stop_token_ids, min_tokens, penalties and logit_bias through the official openai SDK
against a real `fleetserve serve`, with transformers as the reference where one exists."""

from __future__ import annotations

import pytest
from fleetserve_server.bench.launch import ServerProcess
from serve_util import MODEL, hf, metric, server, tiny_model  # noqa: F401 - fixtures
from serve_util import openai_client as client

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT = "The quick brown fox jumps over the lazy dog and then"


def hf_greedy(model, ids: list[int], steps: int, *, presence: float = 0.0, frequency: float = 0.0,  # type: ignore[no-untyped-def]
              repetition: float = 1.0) -> list[int]:
    """Greedy decoding with the penalties as OpenAI (presence, frequency) and HF (repetition) define them."""
    out = list(ids)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([out])).logits[0, -1].float()
        generated = out[len(ids):]
        for t in set(out):
            logits[t] = logits[t] / repetition if logits[t] > 0 else logits[t] * repetition
        for t in set(generated):
            logits[t] -= presence + frequency * generated.count(t)
        out.append(int(logits.argmax()))
    return out[len(ids):]


def complete(proc: ServerProcess, prompt, **kwargs):  # type: ignore[no-untyped-def]
    extra = kwargs.pop("extra_body", {})
    return client(proc).completions.create(model=MODEL, prompt=prompt, temperature=0,
                                           extra_body={"ignore_eos": True, **extra}, **kwargs)


def test_n_copies_share_the_prompt_blocks_and_differ(server: ServerProcess, hf) -> None:  # noqa: F811
    _, tok = hf
    prompt = tok.encode(PROMPT * 6, add_special_tokens=False)  # several full KV blocks
    hits_before = metric(server.base_url, "fleetserve_prefix_cache_hits")
    r = client(server).completions.create(model=MODEL, prompt=prompt, n=3, max_tokens=12, temperature=1.0,
                                          seed=11, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.text for c in r.choices}) > 1  # copy j samples with seed + j
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == 36  # the prompt counts once
    shared = metric(server.base_url, "fleetserve_prefix_cache_hits") - hits_before
    assert shared >= 2 * (len(prompt) // 16) * 16 - 32, shared  # copies 1 and 2 found the prompt's full blocks
    again = client(server).completions.create(model=MODEL, prompt=prompt, n=3, max_tokens=12, temperature=1.0,
                                              seed=11, extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in r.choices]


def test_n_streamed_chat_choices_arrive_by_index(server: ServerProcess) -> None:  # noqa: F811
    c = client(server)
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Say hi"}], n=2, max_tokens=8,
                  temperature=0.9, seed=3, extra_body={"ignore_eos": True})
    plain = c.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    texts = ["", ""]
    finish: list[str | None] = [None, None]
    for chunk in c.chat.completions.create(stream=True, **kwargs):  # type: ignore[call-overload]
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finish[choice.index] = choice.finish_reason or finish[choice.index]
    assert texts == [ch.message.content for ch in plain.choices]
    assert finish == ["length", "length"]


def test_batched_prompts_each_get_their_own_choices(server: ServerProcess) -> None:  # noqa: F811
    prompts = ["Once upon a time", "The capital of France is", "1, 2, 3,"]
    singles = [complete(server, p, max_tokens=6).choices[0].text for p in prompts]
    r = complete(server, prompts, max_tokens=6, n=2)
    assert [c.index for c in r.choices] == list(range(6))
    assert [c.text for c in r.choices] == [t for t in singles for _ in range(2)]  # greedy copies agree
    ids = client(server).completions.create(model=MODEL, prompt=[[5, 6, 7], [8, 9]], max_tokens=2, temperature=0)
    assert len(ids.choices) == 2 and ids.usage.prompt_tokens == 5


def test_stop_token_ids_and_min_tokens(server: ServerProcess, hf) -> None:  # noqa: F811
    model, tok = hf
    prompt = tok.encode(PROMPT, add_special_tokens=False)
    greedy = hf_greedy(model, prompt, 8)
    stop_at = next(i for i in range(1, 8) if greedy[i] not in greedy[:i])
    r = complete(server, prompt, max_tokens=8, extra_body={"stop_token_ids": [greedy[stop_at]]})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == tok.decode(greedy[:stop_at])
    # min_tokens: the stop id may not end the output before 2 tokens exist
    held = complete(server, prompt, max_tokens=8, extra_body={"stop_token_ids": [greedy[0]], "min_tokens": 2})
    assert held.usage.completion_tokens >= 2
    unheld = complete(server, prompt, max_tokens=8, extra_body={"stop_token_ids": [greedy[0]]})
    assert unheld.usage.completion_tokens == 1 and unheld.choices[0].text == ""


def test_logit_bias_forces_and_bans_tokens(server: ServerProcess, hf) -> None:  # noqa: F811
    model, tok = hf
    prompt = tok.encode(PROMPT, add_special_tokens=False)
    blue = tok.encode(" blue", add_special_tokens=False)[0]
    forced = complete(server, prompt, max_tokens=4, logit_bias={str(blue): 100})
    assert forced.choices[0].text == tok.decode([blue] * 4)
    greedy = hf_greedy(model, prompt, 1)[0]
    banned = complete(server, prompt, max_tokens=1, logit_bias={str(greedy): -100})
    assert banned.choices[0].text != tok.decode([greedy])


@pytest.mark.parametrize("penalties", [
    {"presence_penalty": 1.5}, {"frequency_penalty": 1.0}, {"repetition_penalty": 1.5},
    {"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.2},
])
def test_penalties_match_their_reference_definitions(server: ServerProcess, hf, penalties: dict) -> None:  # noqa: F811
    model, tok = hf
    prompt = tok.encode("red red red red red red red", add_special_tokens=False)
    want = hf_greedy(model, prompt, 12, presence=penalties.get("presence_penalty", 0.0),
                     frequency=penalties.get("frequency_penalty", 0.0),
                     repetition=penalties.get("repetition_penalty", 1.0))
    assert want != hf_greedy(model, prompt, 12)  # the penalties change this output
    repetition = penalties.pop("repetition_penalty", None)
    extra = {"repetition_penalty": repetition} if repetition is not None else {}
    r = complete(server, prompt, max_tokens=12, extra_body=extra, **penalties)
    assert r.choices[0].text == tok.decode(want, skip_special_tokens=True)  # the server skips them too
