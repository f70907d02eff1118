"""Operator at cluster scale: 200 LLMDeployments among 5,000 unrelated Pods and ConfigMaps (issue 19, point 5).

On a dev cluster of your own, the benchmark creates ``--fleets`` LLMDeployments of the CPU
example (``--autoscaled`` of them with autoscaling on, in namespace ``scale-on``; the rest with
autoscaling off and ``replicas: 0``, in ``scale-off``; every pod pinned to a node that does not
exist, so no server runs) and runs the operator as its own process, watching all namespaces,
as a ServiceAccount with cluster-admin (so the API server's audit log names its requests).
Each arm starts one operator version (``--tree NAME=DIR``: DIR is a source tree holding
``operator/``, ``cli/``...; ``current`` is this checkout, started with ``--no-leader-election``
when it knows the flag, so there is no Lease traffic), waits until it has reconciled every
LLMDeployment once (its ``fleetserve_operator_reconciles_total`` of the resume, create and update
triggers), lets it
settle ``--settle`` s and then measures over ``--window`` s:

* the operator's RSS (VmRSS at the end, VmHWM: its peak since it started) and CPU seconds/min;
* API requests/min from the API server's ``apiserver_request_total`` (by verb and resource),
  minus the control plane's own, measured the same way with no operator running;
* the operator's requests/min per autoscaling-off LLMDeployment (the audit log's requests of its
  ServiceAccount in ``scale-off``; watches excluded, they are long-running);

then edits ``--edits`` autoscaling-off LLMDeployments one after the other (``resources.memory``)
and times each until the Deployment carries the new value (polled every 20 ms): edit→child
p50/p95. The arms interleave the trees round by round (``--rounds``, alternating which goes
first), first without, then with ``--unrelated`` Pods and ConfigMaps (``scale-unrelated``: pods
with a scheduler that does not exist, so nothing touches them after creation).

    S=~/.cache/fleetserve/dev-cluster-me
    fleetserve dev-cluster up --state-dir $S --port-base 18000
    git archive 6677f3e^ | tar -x -C /tmp/before
    .venv/bin/python benchmarks/operator_scale.py --state-dir $S --tree before=/tmp/before --rounds 3 \\
        --json /tmp/scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
NS_OFF, NS_ON, NS_UNRELATED, NS_OPS = "scale-off", "scale-on", "scale-unrelated", "scale-ops"
SA = "bench-operator"
NOWHERE = {"nodeSelector": {"fleetserve.io/bench-no-such-node": "true"}}
METRIC = re.compile(r'^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$')
PACKAGES = ("operator", "cli", "devcluster", "router", "server")


class Cluster:
    def __init__(self, state: Path) -> None:
        from fleetserve_devcluster.testing import acquire

        self.handle = acquire(state)
        self.state = state

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        proc = self.handle.kubectl(*args, input=input, check=False, timeout=600)
        if check and proc.returncode != 0:
            raise SystemExit(f"kubectl {' '.join(args[:4])}...: {proc.stderr.strip()}")
        return str(proc.stdout)

    def request_totals(self) -> Counter[str]:
        """apiserver_request_total summed by "VERB resource[/subresource]", resource requests only."""
        totals: Counter[str] = Counter()
        for line in self.kubectl("get", "--raw", "/metrics").splitlines():
            m = METRIC.match(line)
            if not m:
                continue
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group("labels")))
            if not labels.get("resource"):
                continue
            resource = labels["resource"] + (f"/{labels['subresource']}" if labels.get("subresource") else "")
            totals[f"{labels.get('verb', '?')} {resource}"] += int(float(m.group("value")))
        return totals


def fleet(name: str, autoscaled: bool) -> dict[str, Any]:
    body = yaml.safe_load((ROOT / "examples" / "smollm2-cpu.yaml").read_text())
    spec = {**body["spec"], "scheduling": NOWHERE, "replicas": 0}
    if autoscaled:  # the autoscaler owns spec.replicas
        del spec["replicas"]
        spec["autoscaling"] = {"enabled": True, "minReplicas": 1, "maxReplicas": 2}
    return {**body, "metadata": {"name": name}, "spec": spec}


def apply_list(cluster: Cluster, ns: str, items: list[dict[str, Any]], chunk: int = 500) -> None:
    for i in range(0, len(items), chunk):
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-n", ns, "-f", "-",
                        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items[i:i + chunk]}))


def unrelated(n: int) -> list[dict[str, Any]]:
    labels = {"app": "unrelated"}
    pods = [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"u-{i}", "labels": labels},
             "spec": {"schedulerName": "bench-no-such-scheduler",
                      "containers": [{"name": "c", "image": "registry.invalid/none:1"}]}} for i in range(n)]
    maps = [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"u-{i}", "labels": labels},
             "data": {"k": "v" * 64}} for i in range(n)]
    return pods + maps


def setup(cluster: Cluster, crds: Path, fleets: int, autoscaled: int) -> Path:
    """Namespaces, the LLMDeployments (created afresh), the operator's ServiceAccount; returns its
    kubeconfig. ``crds``: the oldest tree's CRD, which every version reads (a field a newer CRD
    defaults would be an unknown field to an older operator)."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crds))
    cluster.kubectl("wait", "--for=condition=Established", "crd/llmdeployments.fleetserve.io")
    for ns in (NS_OFF, NS_ON, NS_UNRELATED, NS_OPS):
        cluster.kubectl("create", "namespace", ns, check=False)
    for ns in (NS_OFF, NS_ON):
        cluster.kubectl("delete", "llmd", "--all", "-n", ns, "--wait=true")
    cluster.kubectl("create", "serviceaccount", SA, "-n", NS_OPS, check=False)
    cluster.kubectl("create", "clusterrolebinding", f"{NS_OPS}-{SA}", "--clusterrole=cluster-admin",
                    f"--serviceaccount={NS_OPS}:{SA}", check=False)
    apply_list(cluster, NS_ON, [fleet(f"on-{i}", True) for i in range(autoscaled)])
    apply_list(cluster, NS_OFF, [fleet(f"off-{i}", False) for i in range(fleets - autoscaled)])
    token = cluster.kubectl("create", "token", SA, "-n", NS_OPS, "--duration=6h").strip()
    admin = yaml.safe_load(cluster.handle.kubeconfig.read_text())
    config = {"apiVersion": "v1", "kind": "Config", "clusters": admin["clusters"],
              "users": [{"name": SA, "user": {"token": token}}],
              "contexts": [{"name": SA, "context": {"cluster": admin["clusters"][0]["name"], "user": SA}}],
              "current-context": SA}
    path = cluster.state / "bench-operator.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


def proc_stat(pid: int) -> tuple[float, float, float]:
    """(CPU seconds, VmRSS MB, VmHWM MB) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    mem = {k: int(v.split()[0]) / 1024 for k, v in (line.split(":", 1) for line in
                                                    Path(f"/proc/{pid}/status").read_text().splitlines())
           if k in ("VmRSS", "VmHWM")}
    return cpu, mem["VmRSS"], mem["VmHWM"]


def resumed(port: int) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return 0.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("fleetserve_operator_reconciles_total{")
               and re.search(r'trigger="(resume|create|update)"', line))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def audit_counts(cluster: Cluster, offset: int) -> tuple[Counter[str], int]:
    """The operator's non-watch requests in the audit log after ``offset``, by namespace and
    "VERB resource"; and the new offset (the log rotates at 100 MB: then counted from 0)."""
    from fleetserve_devcluster import controlplane

    path = controlplane.audit_log_path(cluster.state)
    user = f"system:serviceaccount:{NS_OPS}:{SA}"
    counts: Counter[str] = Counter()
    size = path.stat().st_size
    with path.open("rb") as f:
        f.seek(offset if size >= offset else 0)
        for raw in f:
            if user.encode() not in raw:
                continue
            event = json.loads(raw)
            if event.get("stage") != "ResponseComplete" or event.get("verb") == "watch":
                continue
            ref = event.get("objectRef") or {}
            resource = ref.get("resource", "?") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
            counts[f"{ref.get('namespace') or '(cluster)'} {event['verb']} {resource}"] += 1
    return counts, size


def edit_latencies(cluster: Cluster, kube: Any, names: list[str], stamp: int) -> list[float]:
    latencies = []
    for i, name in enumerate(names):
        memory = f"{2048 + stamp * 100 + i}Mi"
        start = time.perf_counter()
        cluster.kubectl("patch", "llmd", name, "-n", NS_OFF, "--type=merge",
                        "-p", json.dumps({"spec": {"resources": {"memory": memory}}}))
        while True:
            dep = kube.get("Deployment", NS_OFF, name) or {}
            containers = (((dep.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers") or []
            if any(((c.get("resources") or {}).get("limits") or {}).get("memory") == memory for c in containers):
                break
            if time.perf_counter() - start > 120:
                raise SystemExit(f"{name}: the Deployment did not follow the edit in 120 s")
            time.sleep(0.02)
        latencies.append(time.perf_counter() - start)
    return latencies


def run_arm(cluster: Cluster, kube: Any, args: argparse.Namespace, tree: str, directory: Path | None,
            kubeconfig: Path, stamp: int) -> dict[str, Any]:
    window, fleets = args.window, args.fleets
    if directory is None:  # the control plane alone
        before = cluster.request_totals()
        time.sleep(window)
        return {"tree": "none", "requests": dict(cluster.request_totals() - before)}
    env = {**cluster.handle.env, "KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1"}
    if directory != ROOT:
        env["PYTHONPATH"] = os.pathsep.join(str(directory / p) for p in PACKAGES)
    help_text = subprocess.run([sys.executable, "-m", "fleetserve_cli.main", "operator", "--help"], env=env,
                               capture_output=True, text=True).stdout
    port = free_port()
    argv = [sys.executable, "-m", "fleetserve_cli.main", "operator", "-A", "--metrics-port", str(port),
            "--metrics-host", "127.0.0.1"]
    if "--no-leader-election" in help_text:
        argv.append("--no-leader-election")
    log = open(Path(tempfile.gettempdir()) / f"operator-scale-{tree}-{stamp}.log", "w")
    op = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        started = time.perf_counter()
        while resumed(port) < fleets:
            if op.poll() is not None or time.perf_counter() - started > 900:
                raise SystemExit(f"{tree}: operator did not resume {fleets} LLMDeployments; see {log.name}")
            time.sleep(0.5)
        resume_s = time.perf_counter() - started
        time.sleep(args.settle)
        quiet(cluster)
        before, cpu0 = cluster.request_totals(), proc_stat(op.pid)[0]
        offset = audit_counts(cluster, 0)[1]
        time.sleep(window)
        cpu1, rss, hwm = proc_stat(op.pid)
        requests = cluster.request_totals() - before
        audit, _ = audit_counts(cluster, offset)
        off_names = [f"off-{(stamp * args.edits + i) % (fleets - args.autoscaled)}" for i in range(args.edits)]
        latencies = edit_latencies(cluster, kube, off_names, stamp)
        return {"tree": tree, "resume_s": round(resume_s, 1), "rss_mb": round(rss, 1), "hwm_mb": round(hwm, 1),
                "cpu_s_per_min": round((cpu1 - cpu0) * 60 / window, 2), "requests": dict(requests),
                "audit": dict(audit), "edit_s": [round(x, 3) for x in latencies]}
    finally:
        op.send_signal(signal.SIGTERM)
        try:
            op.wait(30)
        except subprocess.TimeoutExpired:
            op.kill()
            op.wait()
        log.close()


def quiet(cluster: Cluster, period: float = 10.0, timeout: float = 600.0) -> None:
    """Wait until the Deployments are at rest: no status write for ``period`` s. After a version switch
    the new operator renders the children differently and re-applies all of them; the Deployment
    controller's roll-outs (status writes, each a watch event that wakes a reconcile) then go on
    for minutes on two cores — an upgrade's cost, not the steady state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = cluster.request_totals()
        time.sleep(period)
        if (cluster.request_totals() - before)["PUT deployments/status"] == 0:
            return


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summarize(arms: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for state in ("without", "with"):
        control = [a for a in arms if a["unrelated"] == state and a["tree"] == "none"]
        base = Counter(control[0]["requests"]) if control else Counter()
        for tree in dict.fromkeys(a["tree"] for a in arms if a["tree"] != "none"):
            runs = [a for a in arms if a["unrelated"] == state and a["tree"] == tree]
            if not runs:
                continue
            per_min = []
            for a in runs:
                own = Counter({k: v - base.get(k, 0) for k, v in a["requests"].items()})
                per_min.append({k: v * 60 / args.window for k, v in own.items()})
            keys = sorted({k for p in per_min for k in p}, key=lambda k: -statistics.median(p.get(k, 0) for p in per_min))
            by_verb = {k: round(statistics.median(p.get(k, 0) for p in per_min), 1) for k in keys}
            off = [sum(v for k, v in a["audit"].items() if k.startswith(NS_OFF + " ")) * 60 / args.window
                   / (args.fleets - args.autoscaled) for a in runs]
            on = [sum(v for k, v in a["audit"].items() if k.startswith(NS_ON + " ")) * 60 / args.window
                  / max(args.autoscaled, 1) for a in runs]
            edits = [x for a in runs for x in a["edit_s"]]
            rows.append({
                "unrelated": state, "tree": tree, "n": len(runs),
                "rss_mb": statistics.median(a["rss_mb"] for a in runs),
                "hwm_mb": statistics.median(a["hwm_mb"] for a in runs),
                "cpu_s_per_min": statistics.median(a["cpu_s_per_min"] for a in runs),
                "resume_s": statistics.median(a["resume_s"] for a in runs),
                "requests_per_min": round(statistics.median(
                    sum(v for k, v in p.items() if not k.startswith("WATCH")) for p in per_min), 1),
                "by_verb_resource_per_min": {k: v for k, v in by_verb.items() if abs(v) >= 0.5},
                "per_off_fleet_per_min": round(statistics.median(off), 3),
                "per_on_fleet_per_min": round(statistics.median(on), 2),
                "edit_p50_s": round(statistics.median(edits), 3), "edit_p95_s": round(pct(edits, 0.95), 3),
                "runs_rss": [a["rss_mb"] for a in runs], "runs_cpu": [a["cpu_s_per_min"] for a in runs],
                "runs_off": [round(x, 3) for x in off],
            })
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", type=Path, required=True, help="a dev cluster of your own")
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=DIR",
                        help="another operator source tree to compare with this checkout (`current`)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fleets", type=int, default=200)
    parser.add_argument("--autoscaled", type=int, default=50, help="of --fleets, with autoscaling on")
    parser.add_argument("--unrelated", type=int, default=5000, help="Pods and as many ConfigMaps")
    parser.add_argument("--window", type=float, default=60.0, help="steady-state window, s (>= one 60 s resync)")
    parser.add_argument("--settle", type=float, default=15.0)
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--states", default="without,with", help="unrelated objects: without, with, or both")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    trees: dict[str, Path] = {"current": ROOT}
    for spec in args.tree:
        name, _, directory = spec.partition("=")
        trees[name] = Path(directory).resolve()
    cluster = Cluster(args.state_dir.expanduser())
    from fleetserve_operator.kube import Kube

    kube = Kube(cluster.handle.api_client())
    kubeconfig = setup(cluster, list(trees.values())[-1] / "crds", args.fleets, args.autoscaled)
    arms: list[dict[str, Any]] = []
    stamp = 0
    try:
        for state in args.states.split(","):
            if state == "with":
                t = time.perf_counter()
                apply_list(cluster, NS_UNRELATED, unrelated(args.unrelated))
                print(f"created {args.unrelated} Pods + ConfigMaps in {time.perf_counter() - t:.0f} s", flush=True)
            arms.append({**run_arm(cluster, kube, args, "none", None, kubeconfig, stamp), "unrelated": state})
            print(json.dumps({k: v for k, v in arms[-1].items() if k != "requests"}), flush=True)
            for r in range(args.rounds):
                order = list(trees.items()) if r % 2 == 0 else list(trees.items())[::-1]
                for name, directory in order:
                    stamp += 1
                    arm = run_arm(cluster, kube, args, name, directory, kubeconfig, stamp)
                    arms.append({**arm, "unrelated": state, "round": r})
                    print(json.dumps({k: v for k, v in arms[-1].items() if k not in ("requests", "audit")}),
                          flush=True)
                    if args.json:
                        args.json.write_text(json.dumps({"args": vars(args) | {"state_dir": str(args.state_dir),
                                                                               "json": str(args.json)},
                                                         "arms": arms}, indent=1, default=str))
    finally:
        rows = summarize(arms, args)
        for row in rows:
            print(json.dumps(row), flush=True)
        if args.json:
            args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "arms": arms,
                                             "summary": rows, "load_average_1m": os.getloadavg()[0]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
