"""lm-eval-harness (``local-completions``) against a real `fleetserve serve` of the builtin model gives the
same answers and scores as lm-eval's own Hugging Face backend (``hf``) on the same weights.

This is what proves ``logprobs`` + ``echo`` on /v1/completions right for evaluation harnesses: lm-eval
scores a multiple-choice question by sending context + choice as token ids with ``echo: true,
logprobs: 1, max_tokens: 1`` and summing the prompt's token logprobs after the context; a
generate_until question is a greedy completion with ``stop``. A subset of the local tasks in
benchmarks/lm_eval/ keeps this within a couple of minutes on 2 cores; benchmarks/lm_eval_check.py
runs them in full.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleetserve_server.bench.launch import ServerProcess
from fleetserve_server.runner.builtin import DEFAULT_MODEL, ResolvedModel, resolve_model

pytest.importorskip("torch")
import lm_eval  # noqa: E402,F401 - a dev dependency: missing is a failure, not a skip

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MCQ, SHORT = "fleetserve_mcq", "fleetserve_short_answer"
LIMITS = {MCQ: 16, SHORT: 8}  # first questions of each task (the full run: benchmarks/lm_eval_check.py)
TOLERANCE_POINTS = 1.0
LOGPROB_TOL = 1e-3  # per token, as the logprobs test checks them against transformers


def _load_check() -> Any:
    spec = importlib.util.spec_from_file_location("lm_eval_check", ROOT / "benchmarks" / "lm_eval_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


check = _load_check()


@pytest.fixture(scope="module")
def builtin() -> ResolvedModel:
    return resolve_model(DEFAULT_MODEL, progress=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = check.start_fleetserve(DEFAULT_MODEL, tmp_path_factory.mktemp("logs"))
    try:
        yield proc
    finally:
        code = proc.stop()
        assert code == 0, f"server exited with {code}:\n{proc.log_tail()}"


def run_tasks(model_type: str, model_args: dict[str, Any], *, batch_size: int,
              limits: dict[str, int]) -> dict[str, Any]:
    """Each task with its own limit (lm-eval takes one limit per run); samples kept."""
    merged: dict[str, Any] = {"results": {}, "samples": {}}
    for task, limit in limits.items():
        out = check.run_lm_eval(model_type, model_args, [task], limit=limit, batch_size=batch_size,
                                log_samples=True)
        merged["results"].update(out["results"])
        merged["samples"].update(out["samples"])
    return merged


@pytest.fixture(scope="module")
def hf(builtin: ResolvedModel) -> dict[str, Any]:
    return run_tasks("hf", check.hf_model_args(builtin.path), batch_size=8, limits=LIMITS)


def assert_same_answers(ours: dict[str, Any], theirs: dict[str, Any], limits: dict[str, int]) -> None:
    for task in limits:
        mine, ref = check.answers(ours, task), check.answers(theirs, task)
        assert sorted(mine) == sorted(ref) and len(ref) == limits[task], (task, sorted(mine), sorted(ref))
        for doc_id, ref_answers in ref.items():
            got = mine[doc_id]
            if isinstance(ref_answers[0], tuple):  # (loglikelihood of the choice, is it the greedy text)
                for (ll, greedy), (ref_ll, ref_greedy) in zip(got, ref_answers, strict=True):
                    assert ll == pytest.approx(ref_ll, abs=LOGPROB_TOL * 8), (task, doc_id, got, ref_answers)
                    assert greedy == ref_greedy, (task, doc_id, got, ref_answers)
            else:
                assert got == ref_answers, (task, doc_id, got, ref_answers)
    rows = check.compare(check.scores(ours, list(limits)), check.scores(theirs, list(limits)))
    assert {(task, metric) for task, metric, *_ in rows} == {
        (MCQ, "acc,none"), (MCQ, "acc_norm,none"), (SHORT, "exact_match,none")}
    for task, metric, mine_score, ref_score, diff in rows:
        assert diff <= TOLERANCE_POINTS, (task, metric, mine_score, ref_score)


def test_local_completions_matches_the_hf_backend(server: ServerProcess, builtin: ResolvedModel,
                                                  hf: dict[str, Any]) -> None:
    """Token-id prompts, 8 per request, 2 requests in flight (lm-eval's batched, concurrent path)."""
    args = check.fleetserve_model_args(server, builtin.served_name, builtin.path, num_concurrent=2)
    ours = run_tasks("local-completions", args, batch_size=8, limits=LIMITS)
    assert_same_answers(ours, hf, LIMITS)


def test_text_prompts_score_like_token_prompts(server: ServerProcess, builtin: ResolvedModel,
                                               hf: dict[str, Any]) -> None:
    """``tokenized_requests=False``: lm-eval sends text and the server tokenizes it; the scored tokens
    must be the same ones lm-eval counted (no BOS or other special token added in front)."""
    limits = {MCQ: 4}
    args = check.fleetserve_model_args(server, builtin.served_name, builtin.path, tokenized_requests=False)
    ours = run_tasks("local-completions", args, batch_size=4, limits=limits)
    hf_subset = {"results": {MCQ: None}, "samples": {MCQ: [s for s in hf["samples"][MCQ] if s["doc_id"] < 4]}}
    for doc_id, ref_answers in check.answers(hf_subset, MCQ).items():
        got = check.answers(ours, MCQ)[doc_id]
        for (ll, greedy), (ref_ll, ref_greedy) in zip(got, ref_answers, strict=True):
            assert ll == pytest.approx(ref_ll, abs=LOGPROB_TOL * 8) and greedy == ref_greedy, (doc_id, got)
