"""The batched sampler against straightforward per-row references (what HF / vLLM / OpenAI define)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from fleetserve_server.engine.interfaces import ScheduledSequence  # noqa: E402
from fleetserve_server.engine.sampling_params import SamplingParams  # noqa: E402
from fleetserve_server.runner.sampler import (  # noqa: E402
    CANDIDATES,
    Sampler,
    distribution_stats,
    exponential_noise,
    token_stats,
)

VOCAB = 1000
EOS = 2


def row(params: SamplingParams, seq_id: int = 0, pos: int = 10, history: tuple[int, ...] = (),
        num_generated: int = 0) -> ScheduledSequence:
    return ScheduledSequence(seq_id, [1], pos, [0], True, params, num_generated=num_generated, history=history)


def reference_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The per-row definition: temperature, top-k (renormalize), top-p smallest prefix, min-p."""
    probs = torch.softmax(logits / p.temperature, dim=-1)
    if p.top_k:
        kth = torch.topk(probs, p.top_k).values[-1]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
        probs = probs / probs.sum()
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= p.top_p
        probs = probs.masked_fill(torch.zeros_like(drop_sorted).scatter_(0, order, drop_sorted), 0.0)
    if p.min_p:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return probs / probs.sum()


def empirical(sampler: Sampler, logits: torch.Tensor, p: SamplingParams, draws: int) -> torch.Tensor:
    """Token frequencies over ``draws`` rows of the same logits, each its own seed (one batched call)."""
    rows = [row(SamplingParams(**{**_fields(p), "seed": s}), seq_id=s) for s in range(draws)]
    tokens = sampler.sample(logits.expand(draws, -1).contiguous(), rows)
    return torch.bincount(torch.tensor(tokens), minlength=logits.shape[-1]).float() / draws


def _fields(p: SamplingParams) -> dict:
    return {f: getattr(p, f) for f in p.__dataclass_fields__}


@pytest.mark.parametrize("params, flat", [
    (SamplingParams(temperature=0.2, top_p=0.9), False),  # the builtin's defaults
    (SamplingParams(temperature=1.0, top_p=0.8), False),
    (SamplingParams(temperature=0.7, top_k=20), False),
    (SamplingParams(temperature=1.0, top_k=50, top_p=0.6), False),
    (SamplingParams(temperature=1.0, min_p=0.1), False),
    (SamplingParams(temperature=1.0), False),
    (SamplingParams(temperature=1.0, top_p=0.95), True),  # candidates hold < top_p: the full-sort fallback
])
def test_sampled_frequencies_match_the_reference_distribution(params: SamplingParams, flat: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    scale = 0.01 if flat else 4.0
    logits = torch.randn(VOCAB, generator=gen) * scale
    if flat:
        assert torch.softmax(logits, -1).topk(CANDIDATES).values.sum() < params.top_p
    ref = reference_probs(logits, params)
    got = empirical(Sampler(torch.device("cpu")), logits, params, draws=8000)
    sampled = set(torch.nonzero(got).flatten().tolist())
    assert sampled <= set(torch.nonzero(ref).flatten().tolist())
    if flat:  # the nucleus reached past the candidates and was sampled there
        assert len(sampled) > CANDIDATES
    else:  # total variation distance; sampling noise at 8k draws stays below ~0.03 on these supports
        tv = 0.5 * (got - ref).abs().sum().item()
        assert tv < 0.06, tv


def test_seeded_rows_are_batch_independent_and_vary_by_position() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, VOCAB, generator=gen)
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    sampler = Sampler(torch.device("cpu"))
    alone = sampler.sample(logits[3:4], [row(seeded, seq_id=99)])[0]
    others = [row(SamplingParams(temperature=t, top_k=k), seq_id=i) for i, (t, k) in
              enumerate([(0.0, 0), (1.0, 5), (0.5, 0)])]
    mixed = sampler.sample(logits[:4], [*others, row(seeded, seq_id=7)])
    assert mixed[3] == alone
    # a different position draws different noise (otherwise every step would repeat its choice)
    keys = [torch.tensor([s]) for s in (1, 2)]
    assert not torch.equal(exponential_noise(keys[0], torch.arange(50)), exponential_noise(keys[1], torch.arange(50)))


def test_noise_is_exponential() -> None:
    noise = exponential_noise(torch.arange(200), torch.arange(1000))
    assert noise.min() > 0 and abs(noise.mean().item() - 1.0) < 0.01 and abs(noise.var().item() - 1.0) < 0.02


def test_penalties_match_their_definitions() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, VOCAB, generator=gen) * 3
    prompt, output = (5, 6, 7, 7), (7, 8, 8, 8, 9)
    p = SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.3)
    rows = [row(p, history=prompt + output, num_generated=len(output)), row(SamplingParams(temperature=0.0))]
    got = Sampler(torch.device("cpu")).process_logits(logits, rows)
    want = logits[0].clone()
    for t in set(prompt + output):  # HF's RepetitionPenaltyLogitsProcessor
        want[t] = want[t] / 1.3 if want[t] > 0 else want[t] * 1.3
    for t in set(output):  # OpenAI: mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence
        want[t] -= output.count(t) * 0.25 + 0.5
    assert torch.allclose(got[0], want) and torch.equal(got[1], logits[1])


def test_logit_bias_and_min_tokens_steer_greedy_choice() -> None:
    logits = torch.zeros(3, VOCAB)
    logits[:, EOS] = 10.0
    sampler = Sampler(torch.device("cpu"), eos_token_ids=frozenset({EOS}))
    rows = [
        row(SamplingParams(temperature=0.0, logit_bias={42: 100.0})),
        row(SamplingParams(temperature=0.0, min_tokens=3, max_tokens=8, logit_bias={7: 1.0}), num_generated=2),
        row(SamplingParams(temperature=0.0, min_tokens=3, max_tokens=8), num_generated=3),
    ]
    assert sampler.sample(logits, rows) == [42, 7, EOS]
    banned = row(SamplingParams(temperature=1.0, seed=3, logit_bias={EOS: -100.0}))
    assert EOS not in [sampler.sample(logits[:1], [banned])[0] for _ in range(20)]


def test_min_tokens_holds_back_stop_token_ids_too() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 11] = 10.0
    p = SamplingParams(temperature=0.0, min_tokens=2, max_tokens=4, stop_token_ids=(11,))
    sampler = Sampler(torch.device("cpu"))
    assert sampler.sample(logits, [row(p, num_generated=1)])[0] != 11
    assert sampler.sample(logits, [row(p, num_generated=2)])[0] == 11


def test_output_statistics_by_hand() -> None:
    """Two rows worked out on paper: p = (1/2, 1/2) and p = (1/4, 3/4) (logits 0 and ln 3)."""
    import math

    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])
    lse, entropy = distribution_stats(logits)
    assert lse.tolist() == pytest.approx([math.log(2.0), math.log(4.0)], abs=1e-6)
    assert entropy.tolist() == pytest.approx([math.log(2.0), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))],
                                             abs=1e-6)
    stats = token_stats(logits, lse, entropy, [1, 0])
    assert [s[0] for s in stats] == pytest.approx([math.log(0.5), math.log(0.25)], abs=1e-6)


def test_output_statistics_equal_the_log_softmax_definition() -> None:
    """Against -sum(p log p) and log_softmax on peaked and flat rows, large logits included (no overflow)."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.cat([torch.randn(3, VOCAB, generator=gen) * 8.0, torch.randn(2, VOCAB, generator=gen) * 0.01,
                        torch.randn(1, VOCAB, generator=gen) + 500.0])
    lse, entropy = distribution_stats(logits)
    logp = torch.log_softmax(logits.double(), dim=-1)
    assert entropy.double().tolist() == pytest.approx((-(logp.exp() * logp).sum(-1)).tolist(), rel=1e-4, abs=1e-4)
    tokens = [int(t) for t in torch.randint(0, VOCAB, (6,), generator=gen)]
    got = [s[0] for s in token_stats(logits, lse, entropy, tokens)]
    assert got == pytest.approx([logp[i, t].item() for i, t in enumerate(tokens)], abs=1e-4)
