"""The output-quality metrics of a real `fleetserve serve`: what the histograms add up to equals what the
same requests returned (their token logprobs through the openai SDK) and what transformers computes from
the same model's logits (the entropy), request by request."""

from __future__ import annotations

import pytest
from fleetserve_server.bench.launch import ServerProcess
from serve_util import MODEL, hf, scrape, server, tiny_model  # noqa: F401 - fixtures
from serve_util import openai_client as client

torch = pytest.importorskip("torch")

LABELS = (("model", MODEL),)
FAMILIES = ("fleetserve_output_token_nll_nats", "fleetserve_output_mean_token_entropy_nats",
            "fleetserve_output_tokens", "fleetserve_request_temperature")


def greedy(model, ids: list[int], steps: int) -> list[int]:  # type: ignore[no-untyped-def]
    out = list(ids)
    with torch.inference_mode():
        for _ in range(steps):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids):]


def totals(url: str) -> dict[str, tuple[float, float]]:
    """family -> (_sum, _count), plus the max_tokens counter as ("max_tokens", (value, 0))."""
    samples = scrape(url)
    out = {f: (samples[f][(f + "_sum", LABELS)], samples[f][(f + "_count", LABELS)]) for f in FAMILIES}
    out["max_tokens"] = (samples["fleetserve_requests_max_tokens"][("fleetserve_requests_max_tokens_total",
                                                                     LABELS)], 0.0)
    return out


def delta(after: dict[str, tuple[float, float]], before: dict[str, tuple[float, float]], key: str) -> tuple[float, float]:
    return after[key][0] - before[key][0], after[key][1] - before[key][1]


def test_one_greedy_request_is_observed_exactly(server: ServerProcess, hf) -> None:  # noqa: F811
    model, tok = hf
    prompt = tok.encode("Once upon a time there was a", add_special_tokens=False)
    before = totals(server.base_url)
    r = client(server).completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=1,
                                          extra_body={"ignore_eos": True})
    after = totals(server.base_url)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and len(lp.token_logprobs) == 6
    mean_logprob = sum(lp.token_logprobs) / 6
    got_sum, got_count = delta(after, before, "fleetserve_output_token_nll_nats")
    assert got_count == 1 and got_sum == pytest.approx(-mean_logprob, abs=1e-4)
    # entropy of the model's next-token distribution at each generated position, from transformers
    ids = prompt + greedy(model, prompt, 6)  # the server's greedy output is transformers' (test_llm_identity)
    assert lp.tokens == [tok.decode([t]) for t in ids[len(prompt):]]
    with torch.inference_mode():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    entropies = -(logp.exp() * logp).sum(-1)[len(prompt) - 1 : len(prompt) + 5]
    got_sum, got_count = delta(after, before, "fleetserve_output_mean_token_entropy_nats")
    assert got_count == 1 and got_sum == pytest.approx(float(entropies.mean()), abs=1e-3)
    assert delta(after, before, "fleetserve_output_tokens") == (6, 1)
    assert delta(after, before, "fleetserve_request_temperature") == (0.0, 1)
    assert delta(after, before, "max_tokens")[0] == 1


def test_sampled_requests_add_their_own_means(server: ServerProcess, hf) -> None:  # noqa: F811
    model, tok = hf
    before = totals(server.base_url)
    means, temps = [], [0.7, 1.3]
    for i, temperature in enumerate(temps):
        r = client(server).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Tell me a story number {i}."}], max_tokens=5,
            temperature=temperature, seed=i, logprobs=True, extra_body={"ignore_eos": True})
        content = r.choices[0].logprobs.content  # type: ignore[union-attr]
        assert content is not None and len(content) == 5
        means.append(sum(t.logprob for t in content) / 5)
    # a request that stops before its max_tokens (on a stop token id it is known to produce) is not "cut"
    prompt = tok.encode("a b c", add_special_tokens=False)
    client(server).completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0,
                                      extra_body={"ignore_eos": True})
    second_id = greedy(model, prompt, 2)[1]
    mid = totals(server.base_url)
    r = client(server).completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0,
                                          extra_body={"ignore_eos": True, "stop_token_ids": [second_id]})
    assert r.choices[0].finish_reason == "stop"
    after = totals(server.base_url)
    got_sum, got_count = delta(mid, before, "fleetserve_output_token_nll_nats")
    assert got_count == 3  # the two sampled requests and the probe
    assert got_sum + sum(means) >= -1e-6  # what is left is the probe's: a negative log-probability
    assert delta(mid, before, "fleetserve_request_temperature") == (pytest.approx(sum(temps)), 3)
    assert delta(mid, before, "max_tokens")[0] == 3
    assert delta(after, mid, "max_tokens")[0] == 0
    assert delta(after, mid, "fleetserve_output_tokens")[1] == 1
