"""From zero behind the router (issue 16 point 3d): 0 server replicas, N concurrent requests arrive.

    .venv/bin/python benchmarks/router/from_zero.py --state-dir ~/.cache/fleetserve/dev-cluster-b16 \\
        --requests 50 --runs 3 --json benchmarks/results/router-from-zero.json \\
        --plot benchmarks/results/router-from-zero.png

What runs is what the e2e test ``tests/e2e/test_router_scale_from_zero.py`` runs, at 50 requests and
with a plot: the operator (``fleetserve operator``), one LLMDeployment with ``router.enabled`` and
``autoscaling{minReplicas: 0, maxReplicas: 1}``, the router pod, server pods started by the node agent.
Each run waits until the fleet is at zero server pods, then sends ``--requests`` chat completions
at once (half streamed) to the LLMDeployment's Service. Recorded (unix times, from a 0.1 s poll of
the API and of the router's /metrics, plus each request's own times): request arrival, router holds,
scale decision (``desiredReplicas`` 1), server pod created, node Ready (``--gpus 1`` on a Karpenter
dev cluster: the GPU node is provisioned first), pod Ready (the poll, and the pod's condition at
1 s resolution), each request's first token and end. Errors: any non-200, error event, or a
finish_reason other than stop/length.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "e2e"))
sys.path.insert(0, str(REPO / "benchmarks" / "router"))

from autoscaler_harness import Fleet, apply_crds, llmd_manifest, make_model, running_operator  # noqa: E402
from fleetserve_devcluster.testing import DevClusterHandle, acquire, release, wait_until  # noqa: E402

SERVED = "tiny"
POD_READY_S = 900


def is_ready(pod: Any) -> bool:
    return pod.metadata.deletion_timestamp is None and any(
        c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def pods_of(fleet: Fleet, kind: str) -> list[Any]:
    return [p for p in fleet.pods() if (p.metadata.labels or {}).get("app.kubernetes.io/name") == kind]


def router_held(fleet: Fleet) -> float | None:
    pods = [p for p in pods_of(fleet, "fleetserve-router") if is_ready(p)]
    if not pods:
        return None
    try:
        text = httpx.get(f"http://{pods[0].status.pod_ip}:8000/metrics", timeout=2, trust_env=False).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith("fleetserve_router_requests_held "):
            return float(line.split()[1])
    return None


class Watch:
    """Polls the fleet and the router every ``period`` s in a thread: first-seen marks and a series."""

    def __init__(self, fleet: Fleet, period: float = 0.1) -> None:
        self.fleet, self.period = fleet, period
        self.marks: dict[str, float] = {}
        self.series: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Watch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _mark(self, key: str) -> None:
        self.marks.setdefault(key, time.time())

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                held = router_held(self.fleet)
                status = self.fleet.status()
                servers = pods_of(self.fleet, "fleetserve-server")
                ready = [p for p in servers if is_ready(p)]
                if held:
                    self._mark("router holds requests")
                if (status.get("desiredReplicas") or 0) >= 1:
                    self._mark("scale decision")
                if servers:
                    self._mark("server pod created")
                    if servers[0].spec.node_name:
                        self._mark("server pod scheduled")
                if ready:
                    self._mark("server pod Ready (poll)")
                self.series.append({"t": time.time(), "held": held, "desired": status.get("desiredReplicas"),
                                    "ready": len(ready)})
            except Exception as exc:  # noqa: BLE001 - a missed sample must not end the watch
                self.series.append({"t": time.time(), "error": str(exc)[:200]})
            self._stop.wait(self.period)


async def one_request(address: str, stream: bool, i: int, max_tokens: int) -> dict[str, Any]:
    body = {"model": SERVED, "messages": [{"role": "user", "content": f"Request {i} from zero: say hello."}],
            "max_tokens": max_tokens, "stream": stream}
    out: dict[str, Any] = {"i": i, "stream": stream, "sent": time.time(), "error": None}
    try:
        async with httpx.AsyncClient(timeout=POD_READY_S + 60, trust_env=False) as client:
            if not stream:
                resp = await client.post(f"http://{address}/v1/chat/completions", json=body)
                out["first_token"] = out["done"] = time.time()
                choice = (resp.json().get("choices") or [{}])[0] if resp.status_code == 200 else {}
                if resp.status_code != 200 or choice.get("finish_reason") not in ("stop", "length"):
                    out["error"] = f"HTTP {resp.status_code}: {resp.text[:200]}"
                return out
            async with client.stream("POST", f"http://{address}/v1/chat/completions", json=body) as resp:
                out["status_at"] = time.time()
                finish = None
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        out["error"] = f"error event: {event['error']}"
                    for choice in event.get("choices") or []:
                        if (choice.get("delta") or {}).get("content") and "first_token" not in out:
                            out["first_token"] = time.time()
                        finish = choice.get("finish_reason") or finish
                out["done"] = time.time()
                if resp.status_code != 200 or finish not in ("stop", "length"):
                    out["error"] = out["error"] or f"HTTP {resp.status_code}, finish_reason {finish}"
    except httpx.HTTPError as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def manifest(model: Path, args: argparse.Namespace) -> dict[str, Any]:
    body = llmd_manifest("zero", model, gpus=args.gpus, autoscaling={
        "enabled": True, "minReplicas": 0, "maxReplicas": 1, "targetQueueLength": 2,
        "scaleDownStabilizationSeconds": args.down_window, "scrapeIntervalSeconds": 2,
        "scaleDownPolicy": {"percent": 100, "periodSeconds": 60}},
        engine={"maxNumSeqs": 16, "maxBatchTokens": 512})
    body["spec"]["router"] = {"enabled": True, "replicas": 1, "holdTimeoutSeconds": POD_READY_S}
    body["spec"]["model"]["servedName"] = SERVED
    return body


def one_run(fleet: Fleet, address: str, args: argparse.Namespace) -> dict[str, Any]:
    wait_until(lambda: fleet.status().get("desiredReplicas") == 0, 600, "desiredReplicas 0", 1)
    wait_until(lambda: not pods_of(fleet, "fleetserve-server"), 300, "no server pod", 1)
    if args.gpus:
        wait_until(lambda: not gpu_nodes(fleet), 600, "the GPU node consolidated away", 2)
    watch = Watch(fleet).start()
    time.sleep(0.5)

    async def burst() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(one_request(address, i % 2 == 0, i, args.max_tokens)
                                           for i in range(args.requests))))

    arrival = time.time()
    results = asyncio.run(burst())
    time.sleep(0.3)
    watch.stop()
    marks = dict(watch.marks)
    for pod in pods_of(fleet, "fleetserve-server"):
        for c in pod.status.conditions or []:
            if c.type == "Ready" and c.status == "True":
                marks["server pod Ready (condition, 1 s resolution)"] = c.last_transition_time.timestamp()
    if args.gpus:
        for node in gpu_nodes(fleet):
            for c in node.status.conditions or []:
                if c.type == "Ready" and c.status == "True":
                    marks["GPU node Ready (condition)"] = c.last_transition_time.timestamp()
            marks["GPU node created"] = node.metadata.creation_timestamp.timestamp()
    firsts = [r["first_token"] for r in results if r.get("first_token") and r["stream"]]
    ready = marks.get("server pod Ready (poll)")
    ready_cond = marks.get("server pod Ready (condition, 1 s resolution)")
    out = {
        "arrival": arrival, "marks": {k: round(v - arrival, 3) for k, v in sorted(marks.items(), key=lambda kv: kv[1])},
        "errors": [r["error"] for r in results if r["error"]],
        "first_token_s": round(min(firsts) - arrival, 3) if firsts else None,
        "last_answer_s": round(max(r.get("done", arrival) for r in results) - arrival, 3),
        "first_token_after_ready_poll_s": round(min(firsts) - ready, 3) if firsts and ready else None,
        "first_token_after_ready_condition_s": round(min(firsts) - ready_cond, 3) if firsts and ready_cond else None,
        "last_answer_after_ready_poll_s": round(max(r.get("done", arrival) for r in results) - ready, 3)
        if ready else None,
        "held_max": max((s.get("held") or 0) for s in watch.series),
        "decision": (fleet.status().get("autoscaler") or {}).get("lastDecision"),
        "requests": [{k: (round(v - arrival, 3) if isinstance(v, float) else v) for k, v in r.items()}
                     for r in results],
        "series": [{k: (round(v - arrival, 3) if k == "t" else v) for k, v in s.items()} for s in watch.series],
    }
    print(f"run: errors {len(out['errors'])}/{args.requests}, marks {out['marks']}, first token "
          f"{out['first_token_s']} s ({out['first_token_after_ready_poll_s']} s after Ready (poll)), "
          f"last answer {out['last_answer_s']} s", flush=True)
    return out


def gpu_nodes(fleet: Fleet) -> list[Any]:
    return [n for n in fleet.core.list_node().items if (n.metadata.labels or {}).get("karpenter.sh/nodepool")]


def plot(run: dict[str, Any], path: Path, title: str) -> None:
    """Held requests and replicas over time; each request's wait and answer; a zoom on pod Ready."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, middle, zoom) = plt.subplots(3, 1, figsize=(10, 10), gridspec_kw={"height_ratios": [1, 2, 2]})
    series = [s for s in run["series"] if "error" not in s]
    top.step([s["t"] for s in series], [s["held"] or 0 for s in series], where="post", label="router: held requests")
    top.step([s["t"] for s in series], [(s["ready"] or 0) * 10 for s in series], where="post",
             label="server pods Ready (x10)")
    top.set_ylabel("requests")
    top.legend(loc="upper left", fontsize=8)
    reqs = sorted(run["requests"], key=lambda r: r.get("first_token") or 1e9)
    for ax in (middle, zoom):
        for y, r in enumerate(reqs):
            ax.plot([r["sent"], r.get("first_token", r["sent"])], [y, y], color="tab:orange", lw=1)
            ax.plot([r.get("first_token", r["sent"]), r.get("done", r["sent"])], [y, y], color="tab:green", lw=2)
        ax.set_ylabel("request")
    middle.plot([], [], color="tab:orange", label="waiting (held in the router)")
    middle.plot([], [], color="tab:green", label="first token -> answer complete")
    colors = iter(["grey", "tab:red", "tab:purple", "tab:brown", "tab:blue", "black", "tab:olive", "tab:cyan"])
    for what, t in run["marks"].items():
        c = next(colors, "grey")
        for ax in (top, middle, zoom):
            ax.axvline(t, color=c, ls=":", lw=1)
        middle.plot([], [], color=c, ls=":", label=f"{what} ({t:.1f} s)")
    middle.legend(loc="lower right", fontsize=7)
    ready = run["marks"].get("server pod Ready (poll)")
    if ready is not None:
        zoom.set_xlim(ready - 2, max(r.get("done", ready) for r in reqs) + 0.5)
        zoom.set_title("zoom: from 2 s before the pod turned Ready to the last answer", fontsize=9)
    zoom.set_xlabel("seconds since the requests arrived")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def replot(json_path: Path, path: Path) -> None:
    report = json.loads(json_path.read_text())
    plot(report["runs"][0], path, f"fleetserve router: {report['requests']} concurrent requests at 0 server replicas "
                                  f"(dev cluster, 2-core CPU; run 1 of {len(report['runs'])})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--gpus", type=int, default=0, help="1 on a `--karpenter` dev cluster: a GPU node from zero")
    parser.add_argument("--down-window", type=int, default=15, help="scaleDownStabilizationSeconds")
    parser.add_argument("--model", type=Path, default=None, help="model dir (default: the tests' tiny Llama)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/fleetserve-router-from-zero"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    cluster: DevClusterHandle = acquire(args.state_dir)
    model = args.model or make_model(cluster.state_dir / "test-models" / "tiny-llama")
    namespace = f"zero-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", namespace)
    runs: list[dict[str, Any]] = []
    report: dict[str, Any] = {"requests": args.requests, "gpus": args.gpus, "model": str(model), "runs": runs}

    def save() -> None:
        ok = [r for r in runs if r["first_token_after_ready_poll_s"] is not None]
        report["errors_total"] = sum(len(r["errors"]) for r in runs)
        if ok:
            for key in ("first_token_after_ready_poll_s", "first_token_after_ready_condition_s", "first_token_s",
                        "last_answer_s", "last_answer_after_ready_poll_s"):
                vals = [r[key] for r in ok if r[key] is not None]
                report[f"median_{key}"] = statistics.median(vals) if vals else None
            for mark in ok[0]["marks"]:
                vals = [r["marks"][mark] for r in ok if mark in r["marks"]]
                report.setdefault("median_marks_s", {})[mark] = statistics.median(vals)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1) + "\n")

    try:
        apply_crds(cluster)
        with running_operator(cluster, namespace, args.work_dir / "operator.log"):
            fleet = Fleet(cluster, namespace, "zero")
            fleet.apply(manifest(model, args))
            wait_until(lambda: any(is_ready(p) for p in pods_of(fleet, "fleetserve-router")), POD_READY_S,
                       "the router pod Ready", 1)
            wait_until(lambda: fleet.core.read_namespaced_service("zero", namespace).spec.selector.get(
                "app.kubernetes.io/name") == "fleetserve-router", 120, "Service zero to select the router", 1)
            address = fleet.proxy_address()
            for i in range(args.runs):
                runs.append(one_run(fleet, address, args))
                save()
                if i == 0 and args.plot:
                    plot(runs[0], args.plot, f"fleetserve router: {args.requests} concurrent requests at 0 "
                                             f"server replicas{' and 0 GPU nodes' if args.gpus else ''} "
                                             f"(dev cluster, 2-core CPU; run 1 of {args.runs})")
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        release(cluster)
    save()
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
