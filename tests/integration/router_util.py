"""Real `fleetserve router` processes on loopback for the router's integration tests."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
from fleetserve_server.bench.launch import ServerProcess, free_port, start_server
from prometheus_client.parser import text_string_to_metric_families


def start_router(log_dir: Path, *flags: str, port: int | None = None) -> ServerProcess:
    port = port or free_port()
    argv = [sys.executable, "-m", "fleetserve_cli.main", "router", "--host", "127.0.0.1", "--port", str(port),
            "--poll-interval", "0.2", *flags]
    return start_server(f"router-{port}", argv, port=port, ready_path="/ready", log_dir=log_dir, timeout=60)


def router_metric(base_url: str, name: str, **labels: str) -> float:
    text = httpx.get(base_url + "/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def address(proc: ServerProcess) -> str:
    return proc.base_url.removeprefix("http://")
