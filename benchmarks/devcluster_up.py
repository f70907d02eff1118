"""Dev cluster benchmark: how long `fleetserve dev-cluster up` takes to a ready
control plane, per component, and how long `down` takes.

Each run uses a fresh state dir with its own ports (the shared cluster in the
default state dir is left alone), so every run is a cold start: new PKI, empty
etcd.  Baseline measured in the same run: etcd alone (start -> /health ok),
the floor under any API server start.

    .venv/bin/python benchmarks/devcluster_up.py [--runs 3]
"""

from __future__ import annotations

import argparse
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port_base() -> int:
    for base in range(19000, 30000, 100):
        ok = True
        for off in (257, 259, 379, 380, 443):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", base + off))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise SystemExit("no free block of loopback ports")


def fleetserve(*args: str) -> tuple[float, str]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "fleetserve_cli.main", *args], capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"fleetserve {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return time.monotonic() - t0, proc.stdout


def etcd_alone(base: int) -> float:
    """Baseline: start etcd with the same flags the dev cluster uses, until /health is ok."""
    from fleetserve_devcluster import controlplane, processes

    with tempfile.TemporaryDirectory() as tmp:
        cluster = controlplane.Cluster(Path(tmp), controlplane.ClusterConfig(port_base=base))
        t0 = time.monotonic()
        processes.start(Path(tmp), "etcd", controlplane.etcd_argv(cluster))
        while not controlplane.etcd_healthy(cluster):
            time.sleep(0.02)
        took = time.monotonic() - t0
        processes.stop(processes.tracked(Path(tmp)))
        return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    ups, downs, etcds = [], [], []
    per_component: dict[str, list[float]] = {}
    for i in range(args.runs):
        base = free_port_base()
        etcds.append(etcd_alone(base))
        with tempfile.TemporaryDirectory() as tmp:
            state = str(Path(tmp) / "state")
            took, out = fleetserve("dev-cluster", "up", "--state-dir", state, "--port-base", str(base))
            ups.append(took)
            for name, secs in re.findall(r"^(\S+)\s+pid \d+\s+healthy after ([\d.]+)s", out, re.M):
                per_component.setdefault(name, []).append(float(secs))
            took, _ = fleetserve("dev-cluster", "down", "--state-dir", state)
            downs.append(took)
        print(f"run {i + 1}: up {ups[-1]:.1f}s, down {downs[-1]:.1f}s, etcd alone {etcds[-1]:.2f}s", flush=True)
    med = statistics.median
    print("\n| measure | median | min | max |\n| --- | --- | --- | --- |")
    print(f"| baseline: etcd alone to /health | {med(etcds):.2f}s | {min(etcds):.2f}s | {max(etcds):.2f}s |")
    for name, vals in per_component.items():
        print(f"| {name} start to healthy | {med(vals):.1f}s | {min(vals):.1f}s | {max(vals):.1f}s |")
    print(f"| `dev-cluster up` total (cold state dir) | {med(ups):.1f}s | {min(ups):.1f}s | {max(ups):.1f}s |")
    print(f"| `dev-cluster down` | {med(downs):.1f}s | {min(downs):.1f}s | {max(downs):.1f}s |")


if __name__ == "__main__":
    main()
