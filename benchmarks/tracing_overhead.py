"""What request tracing and sample capture cost per request: one real server per setting, same requests.

Settings: off (the default), ``--otlp-endpoint`` to a real OpenTelemetry Collector (hack/otelcol), and
``--capture-path`` with ``--capture-fraction 1`` (every request redacted and written). Each round starts
the three servers at once and sends the same short requests to each, interleaved in a random order per
request (the HTTP path dominates: 1-token answers from a tiny random model); the figure is each
setting's median client latency per round over off's, and the median of those ratios.

    nice -n 19 .venv/bin/python benchmarks/tracing_overhead.py --rounds 3 --requests 200
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from fleetserve_server.bench.launch import ServerProcess, fleetserve_argv, free_port, start_server
from fleetserve_server.testing import make_tiny_llama

REPO = Path(__file__).resolve().parents[1]


def start_collector(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    out = subprocess.run(["bash", str(REPO / "hack/otelcol/build.sh")], check=True, capture_output=True, text=True)
    binary = Path(out.stdout.strip().split(" in ")[-1]) / "fleetserve-otelcol"
    port = free_port()
    config = workdir / "otelcol.yaml"
    config.write_text(json.dumps({
        "receivers": {"otlp": {"protocols": {"http": {"endpoint": f"127.0.0.1:{port}"}}}},
        "exporters": {"file": {"path": str(workdir / "traces.jsonl")}},
        "service": {"telemetry": {"metrics": {"level": "none"}},
                    "pipelines": {"traces": {"receivers": ["otlp"], "exporters": ["file"]}}},
    }))
    proc = subprocess.Popen([str(binary), "--config", f"file:{config}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            httpx.get(endpoint + "/v1/traces", timeout=1)
            return proc, endpoint
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError("the collector did not start")


def start_setting(model: Path, workdir: Path, flags: list[str]) -> ServerProcess:
    port = free_port()
    argv = fleetserve_argv(str(model), port, ["--device", "cpu", "--max-model-len", "512", "--log-format", "json",
                                              *flags])
    return start_server(f"bench-{port}", argv, port=port, ready_path="/ready", log_dir=workdir, timeout=300,
                        env={"OMP_NUM_THREADS": "1", "FLEETSERVE_API_KEY": ""})


def run_round(model: Path, workdir: Path, settings: dict[str, list[str]], requests: int) -> dict[str, list[float]]:
    """The three servers up at once; request i goes to each of them in a fresh random order, so a change
    in the machine's load (other processes) hits every setting alike."""
    procs = {name: start_setting(model, workdir, flags) for name, flags in settings.items()}
    latencies: dict[str, list[float]] = {name: [] for name in settings}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Contact me at a@b.io"}],
            "max_tokens": 1, "temperature": 0}
    try:
        clients = {name: httpx.Client(base_url=proc.base_url, timeout=60) for name, proc in procs.items()}
        for client in clients.values():
            for _ in range(20):  # warm-up
                client.post("/v1/chat/completions", json=body)
        order = list(settings)
        for _ in range(requests):
            random.shuffle(order)
            for name in order:
                t0 = time.perf_counter()
                r = clients[name].post("/v1/chat/completions", json=body)
                latencies[name].append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text
    finally:
        for proc in procs.values():
            proc.stop()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_tiny_llama(work / "tiny")
        collector, endpoint = start_collector(work)
        settings = {"off": [], "tracing": ["--otlp-endpoint", endpoint],
                    "capture": ["--capture-path", str(work / "samples.jsonl"), "--capture-fraction", "1"]}
        results: dict[str, list[float]] = {name: [] for name in settings}
        ratios: dict[str, list[float]] = {name: [] for name in settings}
        try:
            for round_ in range(args.rounds):
                lat = run_round(model, work, settings, args.requests)
                base = statistics.median(lat["off"])
                for name, values in lat.items():
                    results[name].extend(values)
                    ratios[name].append(statistics.median(values) / base)
                print(f"round {round_ + 1}: " + ", ".join(f"{n} {statistics.median(v) * 1e3:.2f} ms"
                                                          for n, v in lat.items()), flush=True)
        finally:
            collector.terminate()
            collector.wait(timeout=30)
        for name, lat in results.items():
            print(f"{name}: median {statistics.median(lat) * 1e3:.2f} ms, "
                  f"p90 {statistics.quantiles(lat, n=10)[-1] * 1e3:.2f} ms ({len(lat)} requests); "
                  f"median of the rounds' ratios to off x{statistics.median(ratios[name]):.3f} "
                  f"(rounds {', '.join(f'{r:.3f}' for r in ratios[name])})")


if __name__ == "__main__":
    main()
