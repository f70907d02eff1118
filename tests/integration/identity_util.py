"""Comparing greedy outputs where float arithmetic differs (a GPU in half precision, another batch
shape, a tensor-parallel sum): identical, or diverging only where the model's own top two
logits are within ``tolerance`` — a near-tie that a different rounding may break either way.

Pure Python over token lists plus a logits callback, so the rule itself is unit-tested on the CPU
(tests/unit/test_gpu_check.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Divergence:
    prompt: int
    position: int  # index into the generated tokens
    got: int
    expected: int
    gap: float  # logit(expected) - logit(got) under the reference logits at that position


def first_divergence(got: Sequence[int], expected: Sequence[int]) -> int | None:
    """Index of the first generated token that differs (or where one output stops early), None if equal."""
    for i, (a, b) in enumerate(zip(got, expected, strict=False)):
        if a != b:
            return i
    return None if len(got) == len(expected) else min(len(got), len(expected))


def check_greedy_close(
    prompts: Sequence[Sequence[int]], got: Sequence[Sequence[int]], expected: Sequence[Sequence[int]],
    logits_at: Callable[[list[int]], Sequence[float]], tolerance: float,
) -> list[Divergence]:
    """Return the divergences that are *not* near-ties (empty = the outputs are close).

    ``logits_at(context)`` gives the reference model's logits for the token after ``context``.
    A divergence at generated position ``i`` is a near-tie when both tokens' logits there are
    within ``tolerance`` of each other; everything after the first divergence is not compared
    (the contexts differ from then on)."""
    bad = []
    for p, (prompt, a, b) in enumerate(zip(prompts, got, expected, strict=True)):
        i = first_divergence(a, b)
        if i is None:
            continue
        if i >= len(a) or i >= len(b):  # one stopped (EOS) where the other went on: compare EOS's logit
            bad.append(Divergence(p, i, a[i] if i < len(a) else -1, b[i] if i < len(b) else -1, float("inf")))
            continue
        logits = logits_at([*prompt, *b[:i]])
        gap = float(logits[b[i]]) - float(logits[a[i]])
        if abs(gap) > tolerance:
            bad.append(Divergence(p, i, a[i], b[i], gap))
    return bad
