"""Recommendation history for the stabilization windows.

The algorithm is Kubernetes HPA's (``stabilizeRecommendationWithBehaviors``):
every tick records its raw recommendation; a scale-up may go only as high as
the *lowest* recommendation inside the scale-up window, a scale-down only as
low as the *highest* recommendation inside the scale-down window. With the
defaults (up 0 s, down 300 s) the fleet grows at once and shrinks only after
five minutes of consistently lower recommendations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Recommendation:
    at: float  # seconds, any monotonic-ish clock shared with ``now``
    replicas: int


@dataclass(frozen=True)
class ScaleDown:
    at: float
    removed: int


@dataclass(frozen=True)
class History:
    """An immutable, time-ordered list of recent raw recommendations, and of the recent
    scale-downs (for the scale-down rate policy).

    Invariant: ``entries`` and ``scale_downs`` are sorted by ``at``. ``record``
    and ``scaled`` return a new History; the caller keeps it between ticks.
    """

    entries: tuple[Recommendation, ...] = ()
    scale_downs: tuple[ScaleDown, ...] = ()
    # When the first recommendation was recorded: how far back the history knows the fleet (a
    # scale to zero needs it to cover the whole scale-down window, see decision._to_zero_allowed).
    first_at: float | None = None

    def record(self, at: float, replicas: int, keep_s: float) -> History:
        """Append a recommendation and forget those older than ``keep_s`` seconds."""
        kept = tuple(e for e in self.entries if at - e.at < keep_s and e.at <= at)
        return History(entries=(*kept, Recommendation(at=at, replicas=replicas)), scale_downs=self.scale_downs,
                       first_at=at if self.first_at is None else self.first_at)

    def scaled(self, at: float, current: int, desired: int, keep_s: float) -> History:
        """Remember a scale-down from ``current`` to ``desired`` for ``keep_s`` seconds."""
        kept = tuple(e for e in self.scale_downs if at - e.at < keep_s and e.at <= at)
        if desired < current:
            kept = (*kept, ScaleDown(at=at, removed=current - desired))
        return History(entries=self.entries, scale_downs=kept, first_at=self.first_at)

    def known_for(self, now: float) -> float:
        """Seconds of recommendations behind ``now`` (0 when none was recorded)."""
        return 0.0 if self.first_at is None else now - self.first_at

    def removed_within(self, now: float, seconds: float) -> int:
        """Replicas removed by scale-downs strictly less than ``seconds`` before ``now``."""
        return sum(e.removed for e in self.scale_downs if now - e.at < seconds and e.at <= now)

    def window(self, now: float, seconds: float) -> list[int]:
        """Recommendations made strictly less than ``seconds`` before ``now``."""
        return [e.replicas for e in self.entries if now - e.at < seconds and e.at <= now]

    @classmethod
    def seeded(cls, at: float, replicas: int, removed: int = 0) -> History:
        """A history that remembers one recommendation, e.g. the last scale decision
        read back from ``status.autoscaler`` after an operator restart, so a
        restart never shortens a scale-down window (nor, with ``removed``, the
        scale-down rate period)."""
        downs = (ScaleDown(at=at, removed=removed),) if removed > 0 else ()
        return cls(entries=(Recommendation(at=at, replicas=replicas),), scale_downs=downs, first_at=at)


def scale_down_floor(current: int, history: History, now: float, percent: int, period_s: float) -> int:
    """The fewest replicas a scale-down may reach now (HPA's Percent policy): at most
    ``percent`` % of the size at the start of the last ``period_s`` seconds may go — but at
    least one replica per period, so a small percentage never pins a small fleet for good."""
    period_start = current + history.removed_within(now, period_s)
    allowed = max(1, math.floor(period_start * percent / 100 + 1e-9))
    return max(0, period_start - allowed)


def stabilize(current: int, recommendation: int, history: History, now: float,
              up_window_s: float, down_window_s: float) -> int:
    """The stabilized size for ``recommendation`` given the recent ones.

    Monotone non-decreasing in ``recommendation``; equal to ``recommendation``
    when both windows are empty.
    """
    up = min([recommendation, *history.window(now, up_window_s)])
    down = max([recommendation, *history.window(now, down_window_s)])
    stabilized = current
    if stabilized < up:
        stabilized = up
    if stabilized > down:
        stabilized = down
    return stabilized
