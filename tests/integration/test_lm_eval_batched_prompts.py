"""A batch of prompts in one /v1/completions request is computed together, as lm-eval's
``local-completions`` expects when it sends ``batch_size`` scoring requests at once (``echo: true,
logprobs: 1, max_tokens: 1``, token-id prompts) against a real `fleetserve serve`.

Before, the server admitted the batch's prompts one after another, each waiting for its first output
(or a quarter second) before the next: a batch of loglikelihood requests ran one prompt per engine
step, so lm-eval's batch size bought nothing.
"""

from __future__ import annotations

import httpx
from fleetserve_server.bench.launch import ServerProcess
from serve_util import MODEL, scrape, server, tiny_model  # noqa: F401 - fixtures

BATCH = 16


def engine_steps(base_url: str) -> tuple[float, float]:
    """(engine steps so far, steps that computed a single sequence), from fleetserve_batch_size."""
    family = scrape(base_url)["fleetserve_batch_size"]
    count = sum(v for (name, _), v in family.items() if name.endswith("_count"))
    single = sum(v for (name, labels), v in family.items()
                 if name.endswith("_bucket") and dict(labels).get("le") == "1.0")
    return count, single


def test_a_batch_of_scoring_prompts_shares_engine_steps(server: ServerProcess) -> None:  # noqa: F811
    prompts = [[5 + i, 17, 23 + i, 42, 7 + 2 * i, 11, 99 + i, 3] for i in range(BATCH)]
    body = {"model": MODEL, "prompt": prompts, "max_tokens": 1, "logprobs": 1, "echo": True,
            "temperature": 0, "seed": 1234}  # what lm-eval's local-completions sends for loglikelihood
    steps_before, single_before = engine_steps(server.base_url)
    r = httpx.post(server.base_url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == list(range(BATCH))
    for choice, prompt in zip(choices, prompts, strict=True):  # each prompt's own tokens, + 1 generated
        assert len(choice["logprobs"]["token_logprobs"]) == len(prompt) + 1
        assert choice["logprobs"]["token_logprobs"][0] is None
    steps_after, single_after = engine_steps(server.base_url)
    steps = steps_after - steps_before
    assert steps >= 1
    # one prompt per step (16 steps of 1 sequence) is the serial admission this guards against
    assert steps < BATCH / 2, f"{BATCH} prompts took {steps:.0f} engine steps"
    assert single_after - single_before < BATCH / 2
