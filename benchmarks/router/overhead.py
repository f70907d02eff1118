"""The router's own latency: the same open-loop load against a fast stub backend, directly and through
`fleetserve router`, arms interleaved; the added p99 is the router's cost (issue 16 point 3c).

    .venv/bin/python benchmarks/router/overhead.py --rate 500 --seconds 10 --rounds 3 \\
        --pin --json benchmarks/results/router-overhead.json

Processes: the stub backend (``stub_backend.py``, aiohttp), one ``fleetserve router --endpoints``
in front of it, and this client (aiohttp, one connection pool, keep-alive). The client sends
requests at fixed intervals (``--rate`` per second, open loop: a slow answer does not delay the
next send) for ``--seconds`` per arm; each round runs arm ``direct`` (client -> stub) then
``router`` (client -> router -> stub), or the reverse on odd rounds. Latency is from the send to
the last byte of the answer. ``--pin`` puts the router on CPU 1 and the stub and the client on
CPU 0 (taskset), so the three do not preempt each other more than two cores force them to.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks" / "router"))
from common import free_port, percentile, start_process, stop_process  # noqa: E402


async def one_arm(url: str, rate: float, seconds: float, stream: bool, body_chars: int) -> dict[str, Any]:
    n = int(rate * seconds)
    body = {"model": "stub", "max_tokens": 2, "stream": stream,
            "messages": [{"role": "system", "content": "You are terse. " * (body_chars // 15)},
                         {"role": "user", "content": "ping"}]}
    latencies: list[float] = []
    late: list[float] = []
    errors: list[str] = []
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        # warm the pool: connections opened during the measurement would add connect time to both arms
        await asyncio.gather(*(session.get(url.rsplit("/v1/", 1)[0] + "/ready") for _ in range(32)))

        async def send(i: int, due: float) -> None:
            body["messages"][1]["content"] = f"ping {i}"
            payload = json.dumps(body).encode()
            start = time.perf_counter()
            late.append(start - due)
            try:
                async with session.post(url, data=payload, headers={"content-type": "application/json"}) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors.append(f"HTTP {resp.status}")
                        return
                latencies.append(time.perf_counter() - start)
            except (TimeoutError, aiohttp.ClientError) as exc:
                errors.append(type(exc).__name__)

        tasks = []
        t0 = time.perf_counter() + 0.1
        for i in range(n):
            due = t0 + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(i, due)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    ms = [x * 1000 for x in latencies]
    return {"sent": n, "ok": len(latencies), "errors": len(errors), "error_kinds": sorted(set(errors))[:5],
            "achieved_rate": round(n / wall, 1),
            "p50_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90), "p99_ms": percentile(ms, 99),
            "mean_ms": round(statistics.fmean(ms), 3) if ms else None,
            "send_late_p99_ms": percentile([x * 1000 for x in late], 99)}


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of ``pid`` so far (Linux /proc), None where there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=500.0, help="requests per second (open loop)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per arm and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stream", action="store_true", help="streamed answers (SSE) instead of JSON")
    parser.add_argument("--body-chars", type=int, default=600, help="system prompt size (the router hashes it)")
    parser.add_argument("--pin", action="store_true", help="router on CPU 1, stub + client on CPU 0")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/fleetserve-router-overhead"))
    args = parser.parse_args()
    args.log_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    if args.pin:
        os.sched_setaffinity(0, {0})
    stub_port, router_port = free_port(), free_port()
    pin_router = ["taskset", "-c", "1"] if args.pin else []
    pin_stub = ["taskset", "-c", "0"] if args.pin else []
    stub = start_process("stub", [*pin_stub, sys.executable, str(REPO / "benchmarks/router/stub_backend.py"),
                                  "--port", str(stub_port)], f"http://127.0.0.1:{stub_port}/ready", args.log_dir)
    router = start_process("router", [*pin_router, sys.executable, "-m", "fleetserve_cli.main", "router",
                                      "--endpoints", f"127.0.0.1:{stub_port}", "--host", "127.0.0.1",
                                      "--port", str(router_port)],
                           f"http://127.0.0.1:{router_port}/ready", args.log_dir)
    urls = {"direct": f"http://127.0.0.1:{stub_port}/v1/chat/completions",
            "router": f"http://127.0.0.1:{router_port}/v1/chat/completions"}
    rounds: list[dict[str, Any]] = []
    try:
        # the router marks the stub ready after its first /ready poll
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            probe = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-d",
                                    '{"model":"stub","messages":[{"role":"user","content":"x"}]}',
                                    "-H", "content-type: application/json", urls["router"]],
                                   capture_output=True, text=True, timeout=10)
            if probe.stdout == "200":
                break
            time.sleep(0.2)
        for arm in ("direct", "router"):  # warm-up, not recorded
            asyncio.run(one_arm(urls[arm], args.rate, 2.0, args.stream, args.body_chars))
        for r in range(args.rounds):
            order = ("direct", "router") if r % 2 == 0 else ("router", "direct")
            result: dict[str, Any] = {}
            for arm in order:
                cpu_before = cpu_seconds(router.pid)
                result[arm] = asyncio.run(one_arm(urls[arm], args.rate, args.seconds, args.stream, args.body_chars))
                cpu_after = cpu_seconds(router.pid)
                if arm == "router" and cpu_before is not None and cpu_after is not None:
                    # the router's own CPU per request (includes its 1/s /metrics poll): what sets
                    # how far below one core's capacity it runs at this rate
                    result[arm]["router_cpu_us_per_request"] = round(
                        (cpu_after - cpu_before) / result[arm]["sent"] * 1e6)
                print(f"round {r} {arm}: {result[arm]}", flush=True)
            result["added_p50_ms"] = round(result["router"]["p50_ms"] - result["direct"]["p50_ms"], 3)
            result["added_p99_ms"] = round(result["router"]["p99_ms"] - result["direct"]["p99_ms"], 3)
            rounds.append(result)
    finally:
        stop_process(router)
        stop_process(stub)
    summary = {
        "what": "router overhead vs a stub backend on loopback (open-loop client)",
        "rate_per_s": args.rate, "seconds_per_arm": args.seconds, "stream": args.stream, "pinned": args.pin,
        "machine": f"{os.cpu_count()} CPUs, load average {load_before:.2f} at the start, "
                   f"{os.getloadavg()[0]:.2f} at the end",
        "added_p99_ms_median": statistics.median(r["added_p99_ms"] for r in rounds),
        "added_p50_ms_median": statistics.median(r["added_p50_ms"] for r in rounds),
        "errors": sum(r[a]["errors"] for r in rounds for a in ("direct", "router")),
        "rounds": rounds,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "rounds"}, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
