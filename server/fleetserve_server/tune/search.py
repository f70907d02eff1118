"""The tuner's logic, free of servers: the settings grid, the objective, the capacity search over
arrival rates, the recommendation and the LLMDeployment patch."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Setting:
    """One engine configuration; ``max_batch_tokens`` None is the server's own default."""

    quantization: str = "none"
    max_num_seqs: int = 32
    max_batch_tokens: int | None = None
    kv_cache_memory_fraction: float = 0.9

    @property
    def label(self) -> str:
        mbt = "default" if self.max_batch_tokens is None else str(self.max_batch_tokens)
        return (f"{self.quantization} seqs={self.max_num_seqs} batch={mbt} "
                f"kvfrac={self.kv_cache_memory_fraction:g}")

    def to_dict(self) -> dict[str, Any]:
        return {"quantization": self.quantization, "maxNumSeqs": self.max_num_seqs,
                "maxBatchTokens": self.max_batch_tokens, "kvCacheMemoryFraction": self.kv_cache_memory_fraction}


def grid(*, quantizations: Sequence[str], max_num_seqs: Sequence[int], max_batch_tokens: Sequence[int | None],
         fractions: Sequence[float], default: Setting) -> list[Setting]:
    """Every combination, the default first (it is the baseline every recommendation is compared with)."""
    for n in max_num_seqs:
        if n < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {n}")
    for b in max_batch_tokens:
        if b is not None and b < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {b}")
    for f in fractions:
        if not 0 < f <= 1:
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {f}")
    out = [default]
    for q, n, b, f in itertools.product(quantizations, max_num_seqs, max_batch_tokens, fractions):
        s = Setting(q, n, b, f)
        if s not in out:
            out.append(s)
    return out


@dataclass(frozen=True)
class Objective:
    """Service-level objective of one trial: p99 TTFT and p99 TPOT bounds (seconds), no failed request."""

    ttft_p99_s: float
    tpot_p99_s: float

    def check(self, summary: dict[str, Any]) -> tuple[bool, str]:
        if summary["failures"]:
            return False, f"{summary['failures']} of {summary['requests']} requests failed"
        ttft, tpot = summary["ttft_s"]["p99"], summary["tpot_s"]["p99"]
        if ttft is None:
            return False, "no request produced a token"
        if ttft > self.ttft_p99_s:
            return False, f"TTFT p99 {ttft:.2f} s > {self.ttft_p99_s:g} s"
        if tpot is not None and tpot > self.tpot_p99_s:
            return False, f"TPOT p99 {tpot * 1000:.0f} ms > {self.tpot_p99_s * 1000:.0f} ms"
        return True, "meets the objective"

    def __str__(self) -> str:
        return f"TTFT p99 <= {self.ttft_p99_s:g} s, TPOT p99 <= {self.tpot_p99_s * 1000:.0f} ms"


@dataclass
class Trial:
    setting: Setting
    rate: float  # offered arrival rate, requests/s
    summary: dict[str, Any]
    meets: bool
    reason: str
    sustained: bool = True  # False: the server fell behind the offered rate (see served_rate)
    served_rate: float | None = None  # first tokens per second over the trial (None: not recorded)


# A trial is sustained when the server began answering requests at >= this fraction of the offered
# rate. Not 1: a stable server's first tokens trail the arrivals by its TTFT, which varies from request
# to request (prompt length, arrivals that come together), and over a 10-request trial that jitter alone
# moves the measured rate by several per cent; a queue that grows moves it by (offered - capacity).
SUSTAINED_FRACTION = 0.9


def served_rate(summary: dict[str, Any]) -> float | None:
    """The rate at which the server began answering (first token) over the trial: (k - 1) requests
    between the first and the last first token, k the requests that produced a token. The offered rate
    counts the same way ((n - 1) arrivals between the first and the last), so for a server that keeps
    up the two agree up to the TTFT's jitter, and for one that does not the first tokens fall behind at
    the server's own pace however short the trial. First tokens rather than finishes: a batching
    server's finishes trail the arrivals by a decode time that grows with its batch while its queue
    does not. None when the trial did not record per-request times or fewer than 2 requests produced
    a token."""
    rows = summary.get("per_request_s")
    if not rows:
        return None
    firsts = [arrival + ttft for arrival, ttft, _ in rows if ttft is not None]
    if len(firsts) < 2 or max(firsts) <= min(firsts):
        return None
    return (len(firsts) - 1) / (max(firsts) - min(firsts))


def judge(objective: Objective, setting: Setting, rate: float, summary: dict[str, Any]) -> Trial:
    """The trial's verdict: the objective first (a miss keeps its reason); a trial that meets it but in
    which the server served less than :data:`SUSTAINED_FRACTION` of the offered rate is not met either —
    its queue was still growing when the trial ended, and a longer trial at that rate would miss."""
    meets, reason = objective.check(summary)
    served = served_rate(summary)
    sustained = served is None or served >= SUSTAINED_FRACTION * rate
    if meets and not sustained:
        assert served is not None
        meets, reason = False, f"not sustained: offered {rate:.2f} req/s, served {served:.2f} req/s"
    return Trial(setting, rate, summary, meets, reason, sustained, served)


@dataclass
class SettingResult:
    setting: Setting
    fits: bool
    plan_message: str
    kv_tokens: int = 0
    device_memory: str = ""
    trials: list[Trial] = field(default_factory=list)
    error: str | None = None

    @property
    def capacity(self) -> float:
        """The highest offered rate that met the objective (0 when none did)."""
        return max((t.rate for t in self.trials if t.meets), default=0.0)

    @property
    def limit_found(self) -> bool:
        """Whether a trial above the capacity missed the objective; when not, the capacity is only a
        lower bound (the search ran out of steps while every rate was still met)."""
        return any(not t.meets and t.rate > self.capacity for t in self.trials)

    @property
    def first_missed_rate(self) -> float | None:
        missed = [t.rate for t in self.trials if not t.meets and t.rate > self.capacity]
        return min(missed) if missed else None

    def capacity_text(self) -> str:
        if self.capacity <= 0:
            return "none (no rate tried met the objective)"
        return f"{'>= ' if not self.limit_found else ''}{self.capacity:.2f} req/s per replica"

    @property
    def best_trial(self) -> Trial | None:
        met = [t for t in self.trials if t.meets]
        return max(met, key=lambda t: t.rate) if met else None


def capacity_search(measure: Callable[[float], Trial], start_rate: float, steps: int,
                    factor: float = 2.0) -> list[Trial]:
    """Offer ``start_rate``; while trials meet the objective multiply the rate by ``factor``, while
    they miss it divide; stop at the first change of verdict or after ``steps`` trials. After a
    change of verdict the remaining trials bisect (geometrically) the bracket between the highest
    rate met and the lowest missed, so each step halves its width in log terms: settings a few per
    cent apart get different capacities when the budget allows. Returns the trials in order."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not (start_rate > 0 and math.isfinite(start_rate)):
        raise ValueError(f"start rate must be a finite rate > 0, got {start_rate}")
    trials = [measure(start_rate)]
    direction = factor if trials[0].meets else 1 / factor
    rate = start_rate
    while len(trials) < steps:
        rate *= direction
        trial = measure(rate)
        trials.append(trial)
        if trial.meets != trials[-2].meets:
            break
    while len(trials) < steps:
        met = [t.rate for t in trials if t.meets]
        missed = [t.rate for t in trials if not t.meets]
        if not (met and missed) or max(met) >= min(missed):
            break  # no bracket, or a noisy verdict (a higher rate met than one missed): nothing to bisect
        trials.append(measure(math.sqrt(max(met) * min(missed))))
    return trials


def replicas_needed(peak_rate: float, capacity: float) -> int | None:
    """Replicas that carry ``peak_rate`` at ``capacity`` each (None: the setting never met the objective)."""
    if capacity <= 0:
        return None
    return max(1, math.ceil(peak_rate / capacity - 1e-9))


@dataclass
class Advice:
    best: SettingResult | None
    default: SettingResult
    peak_rate: float
    replicas_best: int | None
    replicas_default: int | None
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"best": self.best.setting.to_dict() if self.best else None,
                "best_capacity_rps": self.best.capacity if self.best else 0.0,
                "default": self.default.setting.to_dict(), "default_capacity_rps": self.default.capacity,
                "peak_rate_rps": self.peak_rate, "replicas_best": self.replicas_best,
                "replicas_default": self.replicas_default, "notes": self.notes}


def _throughput(r: SettingResult) -> float:
    t = r.best_trial
    return float(t.summary["output_throughput"]) if t else 0.0


def recommend(results: Sequence[SettingResult], default: SettingResult, peak_rate: float,
              larger: Sequence[SettingResult] = ()) -> Advice:
    """The best setting is the one with the highest capacity under the objective (ties: the default,
    then the higher output throughput at that rate, then the smaller memory fraction). ``larger`` are settings
    measured on a bigger device: advice when one needs fewer replicas."""
    candidates = [r for r in results if r.fits and r.capacity > 0]
    best = max(candidates, key=lambda r: (r.capacity, _throughput(r), -r.setting.kv_cache_memory_fraction),
               default=None)
    if best is not None and default in candidates and default.capacity >= best.capacity:
        best = default  # no change without a measured gain in capacity
    notes: list[str] = []
    rb = replicas_needed(peak_rate, best.capacity) if best else None
    rd = replicas_needed(peak_rate, default.capacity)
    if best is None:
        notes.append("no setting met the objective at any rate tried: relax the objective, or try a bigger "
                     "device or another quantization")
    else:
        if not best.limit_found:
            notes.append(f"every rate tried met the objective with {best.setting.label}: its capacity is at least "
                         f"{best.capacity:.2f} req/s per replica (more --rate-steps or a higher --start-rate "
                         "find the limit)")
        if best.setting == default.setting:
            notes.append("the default setting is the best of those tried")
        elif rd is None:
            notes.append(f"the default never met the objective; {best.setting.label} does, at up to "
                         f"{best.capacity:.2f} req/s per replica")
        else:
            notes.append(f"{best.setting.label} carries {best.capacity:.2f} req/s per replica against the "
                         f"default's {default.capacity:.2f}: {rb} replica(s) instead of {rd} for the peak "
                         f"{peak_rate:.2f} req/s")
    by_quant: dict[str, SettingResult] = {}
    for r in candidates:
        if r.setting.quantization not in by_quant or r.capacity > by_quant[r.setting.quantization].capacity:
            by_quant[r.setting.quantization] = r
    if best is not None:
        for q, r in sorted(by_quant.items()):
            if q != best.setting.quantization:
                notes.append(f"best with quantization {q}: {r.capacity:.2f} req/s per replica, "
                             f"{replicas_needed(peak_rate, r.capacity)} replica(s)")
    for r in larger:
        if not r.fits or r.capacity <= 0:
            continue
        n = replicas_needed(peak_rate, r.capacity)
        if best is not None and not best.limit_found and r.capacity > best.capacity:
            notes.append(f"vertical: on a device with {r.device_memory}, {r.setting.label} met the objective at "
                         f"{r.capacity:.2f} req/s per replica ({n} replica(s)), but the smaller device's limit "
                         "was not found, so this is no proof of fewer replicas")
        elif rb is None or (n is not None and n < rb):
            notes.append(f"vertical: on a device with {r.device_memory}, {r.setting.label} carries "
                         f"{r.capacity:.2f} req/s per replica: {n} replica(s)"
                         + (f" instead of {rb}" if rb is not None else ""))
        else:
            notes.append(f"vertical: a device with {r.device_memory} does not reduce the replicas "
                         f"({r.setting.label}: {r.capacity:.2f} req/s per replica, {n} replica(s))")
    for r in (*results, *larger):
        for t in r.trials:
            if t.reason.startswith("not sustained: "):
                notes.append(f"{r.setting.label}: {t.reason.removeprefix('not sustained: ')}: not sustained (the "
                             f"queue was still growing when the {t.summary['requests']}-request trial ended, so "
                             "its latency met the objective only because the trial was short); not counted as "
                             "capacity")
    return Advice(best, default, peak_rate, rb, rd, notes)


def patch(advice: Advice) -> dict[str, Any]:
    """The LLMDeployment spec change for the recommended setting (ARCHITECTURE's field names)."""
    if advice.best is None:
        raise ValueError("no setting met the objective; there is nothing to patch")
    s = advice.best.setting
    engine: dict[str, Any] = {"maxNumSeqs": s.max_num_seqs, "kvCacheMemoryFraction": s.kv_cache_memory_fraction}
    if s.max_batch_tokens is not None:
        engine["maxBatchTokens"] = s.max_batch_tokens
    spec: dict[str, Any] = {"quantization": s.quantization, "engine": engine}
    if advice.replicas_best is not None:
        # The peak's replicas: `replicas` when autoscaling is off, the autoscaler's ceiling when it is on.
        spec["replicas"] = advice.replicas_best
        spec["autoscaling"] = {"maxReplicas": advice.replicas_best}
    return {"spec": spec}
