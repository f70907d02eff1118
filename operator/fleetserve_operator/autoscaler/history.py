"""Recommendation history for the stabilization windows.

The algorithm is Kubernetes HPA's (``stabilizeRecommendationWithBehaviors``):
every tick records its raw recommendation; a scale-up may go only as high as
the *lowest* recommendation inside the scale-up window, a scale-down only as
low as the *highest* recommendation inside the scale-down window. With the
defaults (up 0 s, down 300 s) the fleet grows at once and shrinks only after
five minutes of consistently lower recommendations.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recommendation:
    at: float  # seconds, any monotonic-ish clock shared with ``now``
    replicas: int


@dataclass(frozen=True)
class History:
    """An immutable, time-ordered list of recent raw recommendations.

    Invariant: ``entries`` is sorted by ``at``. ``record`` returns a new
    History; the caller keeps it between ticks (kopf's memo in the operator).
    """

    entries: tuple[Recommendation, ...] = ()

    def record(self, at: float, replicas: int, keep_s: float) -> History:
        """Append a recommendation and forget those older than ``keep_s`` seconds."""
        kept = tuple(e for e in self.entries if at - e.at < keep_s and e.at <= at)
        return History(entries=(*kept, Recommendation(at=at, replicas=replicas)))

    def window(self, now: float, seconds: float) -> list[int]:
        """Recommendations made strictly less than ``seconds`` before ``now``."""
        return [e.replicas for e in self.entries if now - e.at < seconds and e.at <= now]

    @classmethod
    def seeded(cls, at: float, replicas: int) -> History:
        """A history that remembers one recommendation, e.g. the last scale-up
        read back from ``status.autoscaler`` after an operator restart, so a
        restart never shortens a scale-down window."""
        return cls(entries=(Recommendation(at=at, replicas=replicas),))


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
