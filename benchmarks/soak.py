"""Soak: a real `fleetserve serve` under steady mixed load for N minutes — does memory stay flat?

    .venv/bin/python benchmarks/soak.py --minutes 30 --warmup-minutes 2 [--rate R] [--label after]

1. Starts the server (the builtin unless ``--model``) with
   ``FLEETSERVE_DEBUG_MEMORY=1`` (object counts come from ``/debug/memory``;
   a server without it — an older build — is soaked all the same, without them).
2. Unless ``--rate`` is given, measures saturation: ``--clients`` closed-loop
   clients for ``--probe-seconds``, requests completed per second.
3. Sends an open-loop Poisson stream at ``--load`` (0.8) of that rate for
   warm-up + ``--minutes``: chat requests of mixed prompt length (10-600
   words) and output length (8-128 tokens), half streamed; 10 % are streams
   the client closes after a few chunks (cancelled), 3 % are invalid
   (``temperature: -1``, expected 400). With ``--same-windows`` every window
   replays one identical stream (see ``schedule``).
4. Every ``--sample-seconds``: RSS (``/proc/PID/status``), free/total KV blocks
   (``/metrics``), running/waiting; every 4th sample the gc object count.
   Per window (``--window-minutes``): p50/p99 TTFT and TPOT of the streamed
   requests, errors.

Reports the RSS slope (least squares over the samples after warm-up, MB/min),
the targets of issue 23 (slope <= 1 MB/min, no p99 window > 1.10x the first,
0 errors other than the deliberate 400s, free KV blocks == total at the end),
and writes ``--out`` (JSON) and a PNG of RSS over time next to it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
from fleetserve_server.bench.launch import fleetserve_argv, free_port, start_server  # noqa: E402

WORDS = "the a cat dog model server memory token cache block request stream window minute".split()


@dataclass
class Result:
    start: float  # seconds since the soak began
    kind: str  # stream | plain | cancel | invalid
    status: str  # "ok", "cancelled", "400", or the error
    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None


@dataclass
class Sample:
    t: float
    rss_bytes: int
    kv_free: float | None
    kv_total: float | None
    running: float | None
    waiting: float | None
    gc_objects: int | None = None


@dataclass
class Soak:
    results: list[Result] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def prompt(rng: random.Random) -> str:
    n = int(rng.choice([10, 30, 80, 200, 600]) * rng.uniform(0.7, 1.3))
    return " ".join(rng.choice(WORDS) for _ in range(n))


async def one(client: httpx.AsyncClient, model: str, kind: str, rng: random.Random, t0: float,
              soak: Soak, salt: str = "") -> None:
    start = time.monotonic()
    max_tokens = rng.choice([8, 32, 64, 128])
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": salt + prompt(rng)}],
                            "max_tokens": max_tokens, "ignore_eos": True}
    result = Result(start - t0, kind, "ok")
    try:
        if kind == "invalid":
            reply = await client.post("/v1/chat/completions", json={**body, "temperature": -1})
            result.status = str(reply.status_code) if reply.status_code != 400 else "400"
        elif kind == "plain":
            reply = await client.post("/v1/chat/completions", json=body)
            result.status = "ok" if reply.status_code == 200 else str(reply.status_code)
            result.e2e = time.monotonic() - start
        else:
            body = {**body, "stream": True, "stream_options": {"include_usage": True}}
            first: float | None = None
            chunks = 0
            async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
                if reply.status_code != 200:
                    result.status = str(reply.status_code)
                else:
                    async for line in reply.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        try:
                            data = json.loads(line[6:])
                        except ValueError:
                            result.status = f"bad SSE line {line[:80]!r}"
                            break
                        if data.get("choices") and data["choices"][0].get("delta", {}).get("content"):
                            chunks += 1
                            first = first or time.monotonic()
                        if kind == "cancel" and chunks >= 3:
                            result.status = "cancelled"
                            break
            end = time.monotonic()
            if result.status == "ok" and first is not None:
                result.ttft, result.e2e = first - start, end - start
                if chunks > 1:
                    result.tpot = (end - first) / (chunks - 1)
    except Exception as exc:  # noqa: BLE001 - every failure is counted, never fatal to the soak
        result.status = type(exc).__name__
    soak.results.append(result)


def pick_kind(rng: random.Random) -> str:
    x = rng.random()
    if x < 0.03:
        return "invalid"
    if x < 0.13:
        return "cancel"
    return "stream" if x < 0.565 else "plain"


async def probe_saturation(client: httpx.AsyncClient, model: str, clients: int, seconds: float) -> float:
    """Requests per second ``clients`` closed-loop clients complete (the same request mix, valid only)."""
    done = 0
    deadline = time.monotonic() + seconds
    scratch = Soak()

    async def loop(i: int) -> None:
        nonlocal done
        rng = random.Random(1000 + i)
        while time.monotonic() < deadline:
            await one(client, model, rng.choice(["stream", "plain"]), rng, 0.0, scratch)
            done += 1

    t = time.monotonic()
    await asyncio.gather(*(loop(i) for i in range(clients)))
    return done / (time.monotonic() - t)


def metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("fleetserve_") and " " in line:
            name, _, value = line.rpartition(" ")
            try:
                out[name.split("{")[0]] = float(value)
            except ValueError:
                pass
    return out


async def sampler(client: httpx.AsyncClient, pid: int, t0: float, every: float, stop: asyncio.Event,
                  soak: Soak) -> None:
    n = 0
    while not stop.is_set():
        m: dict[str, float] = {}
        try:
            m = metrics((await client.get("/metrics")).text)
        except httpx.HTTPError:
            pass
        sample = Sample(time.monotonic() - t0, rss(pid), m.get("fleetserve_kv_cache_blocks_free"),
                        m.get("fleetserve_kv_cache_blocks_total"), m.get("fleetserve_requests_running"),
                        m.get("fleetserve_requests_waiting"))
        if n % 4 == 0:
            try:
                reply = await client.get("/debug/memory", timeout=60)
                if reply.status_code == 200:
                    sample.gc_objects = reply.json()["gc"]["objects"]
            except httpx.HTTPError:
                pass
        soak.samples.append(sample)
        n += 1
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass


def schedule(args: argparse.Namespace, rate: float, total: float) -> list[tuple[float, str, float, str]]:
    """Every request of the soak: (seconds after the start, kind, seed of its prompt and lengths, salt).

    Default: one Poisson stream over the whole soak. ``--same-windows``: the warm-up has a stream of its
    own, then every ``--window-minutes`` window replays one identical stream (the same arrival times,
    kinds, prompt and output lengths), so the windows' latency percentiles compare the server with
    itself over time, not one random sample of arrivals with another. Each window's prompts start with
    their own salt, so no window is served from the prefix cache the previous one filled.
    """
    def stream(rng: random.Random, start: float, stop: float, salt: str) -> list[tuple[float, str, float, str]]:
        out, t = [], start
        while t < stop:
            out.append((t, pick_kind(rng), rng.random(), salt))
            t += rng.expovariate(rate)
        return out

    if not args.same_windows:
        return stream(random.Random(args.seed), 0.0, total, "")
    warm, width = args.warmup_minutes * 60, args.window_minutes * 60
    plan = stream(random.Random(args.seed + 1), 0.0, warm, "warm-up: ")
    start, index = warm, 0
    while start < total - 1:
        stop = min(start + width, total)
        plan += [(start + dt, kind, seed, f"window {index}: ")
                 for dt, kind, seed, _ in stream(random.Random(args.seed), 0.0, stop - start, "")]
        start, index = stop, index + 1
    return plan


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def slope_mb_per_min(samples: list[Sample], after: float) -> float | None:
    pts = [(s.t / 60, s.rss_bytes / 1e6) for s in samples if s.t >= after]
    if len(pts) < 3:
        return None
    mx, my = statistics.fmean(p[0] for p in pts), statistics.fmean(p[1] for p in pts)
    den = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / den if den else None


def windows(results: list[Result], warmup: float, width: float, end: float) -> list[dict[str, Any]]:
    out = []
    start = warmup
    while start < end - 1:
        stop = min(start + width, end)
        rs = [r for r in results if start <= r.start < stop]
        ttft = [r.ttft for r in rs if r.ttft is not None]
        tpot = [r.tpot for r in rs if r.tpot is not None]
        out.append({
            "from_s": round(start), "to_s": round(stop), "requests": len(rs),
            "errors": sum(r.status not in ("ok", "cancelled", "400") for r in rs),
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "tpot_p50_s": pct(tpot, 50), "tpot_p99_s": pct(tpot, 99),
        })
        start = stop
    return out


def plot(path: Path, samples: list[Sample], title: str, warmup: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([s.t / 60 for s in samples], [s.rss_bytes / 2**20 for s in samples], label="RSS (MiB)")
    ax.axvline(warmup / 60, color="grey", linestyle=":", label="end of warm-up")
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    env = {"FLEETSERVE_DEBUG_MEMORY": args.debug_memory, **({"MALLOC_ARENA_MAX": args.malloc_arena_max}
                                               if args.malloc_arena_max else {})}
    extra = ["--device", "cpu", "--log-format", "json", *args.server_flag]
    proc = start_server(f"soak-{args.label}", fleetserve_argv(args.model, port, extra), port=port,
                        ready_path="/ready", log_dir=Path(args.log_dir), timeout=900, env=env)
    pid = proc.process.pid
    try:
        async with httpx.AsyncClient(base_url=proc.base_url, timeout=600,
                                     limits=httpx.Limits(max_connections=256)) as client:
            model = (await client.get("/v1/models")).json()["data"][0]["id"]
            rss_ready = rss(pid)
            saturation = None
            rate = args.rate
            if rate is None:
                saturation = await probe_saturation(client, model, args.clients, args.probe_seconds)
                rate = args.load * saturation
                print(f"saturation {saturation:.3f} req/s -> soak at {rate:.3f} req/s", flush=True)
            soak = Soak()
            t0 = time.monotonic()
            total = (args.warmup_minutes + args.minutes) * 60
            stop = asyncio.Event()
            sampling = asyncio.create_task(sampler(client, pid, t0, args.sample_seconds, stop, soak))
            tasks: set[asyncio.Task[None]] = set()
            for offset, kind, seed, salt in schedule(args, rate, total):
                await asyncio.sleep(max(0.0, t0 + offset - time.monotonic()))
                task = asyncio.create_task(one(client, model, kind, random.Random(seed), t0, soak, salt))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(tasks, timeout=600)
            await asyncio.sleep(2 * args.sample_seconds)  # idle samples: blocks released, aborts applied
            stop.set()
            await sampling
            end_metrics = metrics((await client.get("/metrics")).text)
            debug = await client.get("/debug/memory?trim=1&collect=1", timeout=300)
            trim = debug.json().get("trim") if debug.status_code == 200 else None
            debug_end = debug.json() if debug.status_code == 200 else None
    finally:
        code = proc.stop(timeout=60)
    warm = args.warmup_minutes * 60
    wins = windows(soak.results, warm, args.window_minutes * 60, total)
    first_p99 = [w for w in wins if w["ttft_p99_s"] is not None][:1]
    worst = {k: max((w[k] / first_p99[0][k] for w in wins if w[k] and first_p99 and first_p99[0][k]),
                    default=None) for k in ("ttft_p99_s", "tpot_p99_s")}
    measured = [r for r in soak.results if r.start >= warm]
    statuses: dict[str, int] = {}
    for r in soak.results:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    report = {
        "label": args.label, "minutes": args.minutes, "warmup_minutes": args.warmup_minutes,
        "rate_req_s": rate, "saturation_req_s": saturation, "load": args.load, "exit_code": code,
        "requests": len(soak.results), "requests_after_warmup": len(measured), "statuses": statuses,
        "errors": sum(v for k, v in statuses.items() if k not in ("ok", "cancelled", "400")),
        "rss_ready_bytes": rss_ready,
        "rss_end_warmup_bytes": next((s.rss_bytes for s in soak.samples if s.t >= warm), None),
        "rss_end_bytes": soak.samples[-1].rss_bytes if soak.samples else None,
        "rss_slope_mb_per_min": slope_mb_per_min(soak.samples, warm),
        "kv_blocks_free_end": end_metrics.get("fleetserve_kv_cache_blocks_free"),
        "kv_blocks_total": end_metrics.get("fleetserve_kv_cache_blocks_total"),
        "malloc_trim_at_end": trim, "debug_memory_end": debug_end, "windows": wins, "p99_worst_over_first": worst,
        "malloc_arena_max": args.malloc_arena_max, "server_flags": args.server_flag,
        "same_windows": args.same_windows,
        "load_average_end": os.getloadavg(),
        "samples": [asdict(s) for s in soak.samples],
    }
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--warmup-minutes", type=float, default=2.0)
    parser.add_argument("--window-minutes", type=float, default=5.0)
    parser.add_argument("--rate", type=float, default=None, help="requests/s (default: --load x measured saturation)")
    parser.add_argument("--load", type=float, default=0.8)
    parser.add_argument("--clients", type=int, default=8, help="closed-loop clients of the saturation probe")
    parser.add_argument("--probe-seconds", type=float, default=90.0)
    parser.add_argument("--sample-seconds", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--same-windows", action="store_true",
                        help="replay one identical request stream in every window (salted against the prefix "
                             "cache), so the windows' p99s compare the server over time, not two random samples")
    parser.add_argument("--label", default="soak")
    parser.add_argument("--malloc-arena-max", default=None, help="MALLOC_ARENA_MAX for the server process")
    parser.add_argument("--debug-memory", default="1", help="FLEETSERVE_DEBUG_MEMORY for the server (tracemalloc: "
                        "also trace Python allocations; slower)")
    parser.add_argument("--server-flag", action="append", default=[], help="extra `fleetserve serve` flag (repeat)")
    parser.add_argument("--out", default="benchmarks/results/soak.json")
    parser.add_argument("--log-dir", default="/tmp/fleetserve-soak-logs", help="where the server's log goes")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = asyncio.run(run(args))
    out.write_text(json.dumps(report, indent=1))
    plot(out.with_suffix(".png"), [Sample(**s) for s in report["samples"]],
         f"fleetserve soak ({args.label}): RSS over time", args.warmup_minutes * 60)
    slope = report["rss_slope_mb_per_min"]
    print(json.dumps({k: v for k, v in report.items() if k not in ("samples", "windows")}, indent=1))
    for w in report["windows"]:
        print(w)
    checks = {
        "rss slope <= 1 MB/min": slope is not None and slope <= 1.0,
        "p99 windows <= 1.10x the first": all(v is None or v <= 1.10 for v in report["p99_worst_over_first"].values()),
        "0 errors besides the invalid ones": report["errors"] == 0,
        "free KV blocks == total at the end": report["kv_blocks_free_end"] == report["kv_blocks_total"],
    }
    for name, ok in checks.items():
        print(f"{'MET ' if ok else 'MISSED'}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
