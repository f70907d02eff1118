"""Workloads for `fleetserve tune`: token lengths and arrival times only, never text.

A workload comes from the server's own JSON request log (``request_finished`` records: prompt and
completion tokens, and the arrival ``ts - e2e_s``), or from distributions given on the command line
(``512``, ``uniform:100-800``, ``lognormal:300,0.6``) with Poisson arrivals at a rate.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


class WorkloadError(ValueError):
    """The workload cannot be read or described as given; the message names the problem."""


@dataclass(frozen=True)
class Request:
    arrival_s: float  # seconds after the workload's first request
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Workload:
    name: str
    requests: tuple[Request, ...]

    @property
    def span_s(self) -> float:
        return self.requests[-1].arrival_s - self.requests[0].arrival_s if self.requests else 0.0

    @property
    def rate(self) -> float:
        """Mean arrival rate (requests/s) over the recorded span; inf when they all came at once."""
        n = len(self.requests)
        return (n - 1) / self.span_s if n > 1 and self.span_s > 0 else math.inf

    def peak_rate(self, window_s: float = 60.0) -> float:
        """The most requests that arrived in any ``window_s`` window, per second (the load the
        fleet must carry at its busiest minute). A workload shorter than the window: its mean rate."""
        if window_s <= 0:
            raise WorkloadError(f"peak window must be > 0 s, got {window_s}")
        times = [r.arrival_s for r in self.requests]
        if len(times) < 2 or self.span_s < window_s:
            return self.rate
        best, lo = 0, 0
        for hi, t in enumerate(times):
            while t - times[lo] > window_s:
                lo += 1
            best = max(best, hi - lo + 1)
        return best / window_s

    def at_rate(self, rate: float) -> Workload:
        """The same requests with their gaps scaled so that the mean rate is ``rate``."""
        if not rate > 0:
            raise WorkloadError(f"rate must be > 0, got {rate}")
        own = self.rate
        factor = 0.0 if math.isinf(rate) else (own / rate if math.isfinite(own) else 0.0)
        if math.isinf(own) and math.isfinite(rate):
            # Recorded all at once: spread them evenly at the asked rate.
            return Workload(self.name, tuple(Request(i / rate, r.prompt_tokens, r.output_tokens)
                                             for i, r in enumerate(self.requests)))
        return Workload(self.name, tuple(Request(r.arrival_s * factor, r.prompt_tokens, r.output_tokens)
                                         for r in self.requests))

    def head(self, n: int) -> Workload:
        """The first ``n`` requests (a trial replays a bounded slice)."""
        return Workload(self.name, self.requests[:n])

    def clipped(self, max_model_len: int) -> Workload:
        """Every request within ``max_model_len`` (prompt first, at least one output token)."""
        out = []
        for r in self.requests:
            prompt = min(r.prompt_tokens, max_model_len - 1)
            out.append(Request(r.arrival_s, prompt, max(1, min(r.output_tokens, max_model_len - prompt))))
        return Workload(self.name, tuple(out))

    def describe(self) -> str:
        p = sorted(r.prompt_tokens for r in self.requests)
        o = sorted(r.output_tokens for r in self.requests)
        rate = "all at once" if math.isinf(self.rate) else f"{self.rate:.2f} req/s"
        return (f"{self.name}: {len(self.requests)} requests, {rate} (peak {self.peak_rate():.2f} req/s per 60 s), "
                f"prompt tokens p50 {p[len(p) // 2]} max {p[-1]}, output tokens p50 {o[len(o) // 2]} max {o[-1]}")


def _normalize(name: str, items: list[tuple[float, int, int]]) -> Workload:
    if not items:
        raise WorkloadError(f"{name}: no requests")
    items.sort()
    t0 = items[0][0]
    return Workload(name, tuple(Request(t - t0, p, o) for t, p, o in items))


def from_request_log(lines: Iterable[str], *, name: str = "request log", model: str | None = None) -> Workload:
    """Read ``request_finished`` records of the server's JSON log (also ``kubectl logs --prefix``
    output: text before the first ``{`` is ignored; other lines are skipped). Requests rejected
    before they ran (no prompt tokens, or an error) are left out; arrival = ``ts - e2e_s``."""
    items: list[tuple[float, int, int]] = []
    records = 0
    for line in lines:
        start = line.find("{")
        if start < 0:
            continue
        try:
            record = json.loads(line[start:])
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or record.get("event") != "request_finished":
            continue
        records += 1
        if model is not None and record.get("model") != model:
            continue
        prompt, output = record.get("prompt_tokens"), record.get("completion_tokens")
        ts, e2e = record.get("ts"), record.get("e2e_s")
        if record.get("error") or not isinstance(prompt, int) or prompt < 1 or not isinstance(output, int):
            continue
        if not isinstance(ts, (int, float)) or not isinstance(e2e, (int, float)):
            continue
        items.append((float(ts) - float(e2e), prompt, max(1, output)))
    if not items:
        which = f" for model {model!r}" if model is not None else ""
        raise WorkloadError(f"{name}: no usable request_finished records{which} ({records} request records read); "
                            "is it the server's JSON log (--log-format json)?")
    return _normalize(name, items)


def read_request_log(path: str | Path, *, model: str | None = None) -> Workload:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return from_request_log(f, name=str(path), model=model)
    except OSError as exc:
        raise WorkloadError(f"cannot read request log {path}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class Distribution:
    """Token counts: ``N`` (fixed), ``uniform:A-B``, ``lognormal:MEDIAN,SIGMA``."""

    kind: str
    a: float
    b: float = 0.0

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        return max(1, round(rng.lognormvariate(math.log(self.a), self.b)))

    def __str__(self) -> str:
        return {"fixed": f"{int(self.a)}", "uniform": f"uniform:{int(self.a)}-{int(self.b)}",
                "lognormal": f"lognormal:{self.a:g},{self.b:g}"}[self.kind]


_UNIFORM = re.compile(r"uniform:(\d+)-(\d+)")
_LOGNORMAL = re.compile(r"lognormal:(\d+(?:\.\d+)?),(\d+(?:\.\d+)?)")


def parse_distribution(spec: str, what: str = "tokens") -> Distribution:
    s = spec.strip().replace(" ", "")
    if s.isdigit() and int(s) >= 1:
        return Distribution("fixed", int(s))
    if m := _UNIFORM.fullmatch(s):
        lo, hi = int(m.group(1)), int(m.group(2))
        if 1 <= lo <= hi:
            return Distribution("uniform", lo, hi)
    if m := _LOGNORMAL.fullmatch(s):
        median, sigma = float(m.group(1)), float(m.group(2))
        if median >= 1 and sigma >= 0:
            return Distribution("lognormal", median, sigma)
    raise WorkloadError(f"{what}: {spec!r} is not a token distribution; use N (>= 1), uniform:A-B (1 <= A <= B) "
                        "or lognormal:MEDIAN,SIGMA (MEDIAN >= 1, SIGMA >= 0)")


def synthetic(*, prompt: Distribution, output: Distribution, rate: float, requests: int, seed: int = 0,
              name: str | None = None) -> Workload:
    """``requests`` requests with Poisson arrivals at ``rate`` per second (all at once for inf)."""
    if requests < 1:
        raise WorkloadError(f"requests must be >= 1, got {requests}")
    if not rate > 0:
        raise WorkloadError(f"rate must be > 0 requests/s, got {rate}")
    rng = random.Random(seed)
    t, items = 0.0, []
    for _ in range(requests):
        items.append((t, prompt.sample(rng), output.sample(rng)))
        if math.isfinite(rate):
            t += rng.expovariate(rate)
    return _normalize(name or f"prompt {prompt}, output {output}", items)
