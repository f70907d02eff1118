"""Operator failover: how long nothing reconciles after the leader dies (issue 19, point 1).

Two `fleetserve operator` processes elect a leader on a Lease (as the chart's two replicas do).
Each round scales an LLMDeployment up and stops the leader right after the edit, either with
SIGKILL (a crash: the standby waits for the Lease to expire) or SIGTERM (a clean stop, e.g. a
rolling update or a drain: the leader hands the Lease back). Measured from the stop: when the
Lease names the standby, and when the Deployment has the new size (the edit made in the gap is
applied). Pods never get a node, so only the control plane and the operators are measured.

    .venv/bin/python benchmarks/operator_failover.py [--rounds 3] [--lease-duration 15] [--json out.json] [--state-dir DIR]

Rounds alternate SIGKILL and SIGTERM (interleaved); the medians are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
LEASE = "fleetserve-operator"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per stop signal (default %(default)s)")
    parser.add_argument("--lease-duration", type=float, default=15.0)
    parser.add_argument("--json", type=Path, help="write the raw results here")
    parser.add_argument("--state-dir", type=Path, help="the dev cluster's state dir (default: the default one)")
    args = parser.parse_args()
    from fleetserve_devcluster.testing import acquire

    cluster = acquire(args.state_dir)
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "crd/llmdeployments.fleetserve.io")
    ns = f"failover-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", ns)
    body = yaml.safe_load((ROOT / "examples" / "smollm2-cpu.yaml").read_text())
    body["spec"]["scheduling"] = {"nodeSelector": {"fleetserve.io/bench-no-such-node": "true"}}
    results: list[dict[str, Any]] = []
    try:
        for i in range(args.rounds * 2):
            sig = signal.SIGKILL if i % 2 == 0 else signal.SIGTERM
            results.append(one_round(cluster, ns, body, f"r{i}", sig, args.lease_duration))
            print(json.dumps(results[-1]), flush=True)
    finally:
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
    for name in ("SIGKILL", "SIGTERM"):
        rows = [r for r in results if r["signal"] == name]
        print(f"{name}: lease to the standby median {statistics.median(r['lease_s'] for r in rows):.1f} s, "
              f"scale-up done median {statistics.median(r['done_s'] for r in rows):.1f} s "
              f"(n={len(rows)}, lease {args.lease_duration:g} s)")
    if args.json:
        args.json.write_text(json.dumps({"lease_duration": args.lease_duration, "rounds": results}, indent=1))
    return 0


def one_round(cluster: Any, ns: str, body: dict[str, Any], name: str, sig: signal.Signals,
              lease_duration: float) -> dict[str, Any]:
    def holder() -> str:
        out = cluster.kubectl("get", "lease", LEASE, "-n", ns, "-o", "jsonpath={.spec.holderIdentity}",
                              check=False).stdout
        return str(out).strip()

    def replicas() -> int:
        out = cluster.kubectl("get", "deployment", name, "-n", ns, "-o", "jsonpath={.spec.replicas}",
                              check=False).stdout
        return int(out) if str(out).strip().isdigit() else -1

    procs = {}
    for who in ("op-a", "op-b"):
        procs[who] = subprocess.Popen(
            [sys.executable, "-m", "fleetserve_cli.main", "operator", "-n", ns, "--leader-election-namespace", ns,
             "--lease-duration", str(lease_duration), "--metrics-port", "0"],
            env={**cluster.env, "POD_NAME": who}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait(lambda: holder().startswith("op-"), 60)
        leader = holder().split("_")[0]
        cr = {**body, "metadata": {"name": name}, "spec": {**body["spec"], "replicas": 1}}
        cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(cr))
        wait(lambda: replicas() == 1, 60)
        # A random phase: the stop must not fall at the same point of the renewals and reads every round.
        time.sleep(random.uniform(0, lease_duration / 3))
        cluster.kubectl("patch", "llmd", name, "-n", ns, "--type=merge", "-p", '{"spec":{"replicas":3}}')
        stopped = time.monotonic()
        os.kill(procs[leader].pid, sig)
        lease_s = wait(lambda: holder().startswith("op-") and not holder().startswith(leader), 120) - stopped
        done_s = wait(lambda: replicas() == 3, 120) - stopped
        return {"signal": sig.name, "lease_s": round(lease_s, 2), "done_s": round(done_s, 2)}
    finally:
        cluster.kubectl("delete", "llmd", name, "-n", ns, "--wait=true", check=False)
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
            proc.wait(30)
        cluster.kubectl("delete", "lease", LEASE, "-n", ns, "--ignore-not-found", check=False)


def wait(fn: Any, timeout: float) -> float:
    """Poll every 0.2 s; the monotonic time when ``fn`` first held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return time.monotonic()
        time.sleep(0.2)
    raise SystemExit(f"timed out after {timeout:g} s")


if __name__ == "__main__":
    sys.exit(main())
