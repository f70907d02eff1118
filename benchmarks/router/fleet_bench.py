"""Router vs no router on a real fleet on the dev cluster (issue 16 point 3a and 3b).

    # once: the fleet (3 server replicas + the operator-deployed router), left running
    .venv/bin/python benchmarks/router/fleet_bench.py up --state-dir ~/.cache/fleetserve/dev-cluster-b16
    # multi-turn chat: router vs the Service's round-robin, and one replica alone (hit rate)
    .venv/bin/python benchmarks/router/fleet_bench.py run --scenario multiturn --rounds 3 ...
    # unique prompts: router vs least-load
    .venv/bin/python benchmarks/router/fleet_bench.py run --scenario unique --rounds 3 ...
    .venv/bin/python benchmarks/router/fleet_bench.py down --state-dir ...

The fleet: one LLMDeployment ``rt`` with ``router.enabled`` and 3 replicas (autoscaling off), the
operator running as ``fleetserve operator`` in the background. Its arms, all on the same pods:

* ``router``: the LLMDeployment's Service ``rt`` (the dev cluster's kube-proxy stand-in) -> the router
  pod -> a server pod the router picks;
* ``round_robin``: the Service ``rt-servers`` (kube-proxy stand-in, round-robin per connection over
  the ready server pods) -> a server pod: what a fleet without the router does;
* ``least_load``: a second ``fleetserve router`` on the host with ``--cache-ttl 1e-6``, so its prefix
  index never holds credit and every pick is the least-loaded replica (scored like the real router
  otherwise); reached directly, one proxy hop fewer than ``router`` (``--router-direct`` sends the
  ``router`` arm to the router pod's own address instead, so both arms have one proxy hop);
* ``single``: one server pod directly, the same conversations at a lighter load: the prefix hit rate
  one replica alone achieves.

Load (default ``--loadgen inference-perf``): inference-perf, the Kubernetes serving working group's
load generator (``setup_inference_perf.sh`` installs it in its own venv), streamed
``/v1/completions`` with Poisson arrivals at ``--rate`` requests/s:

* ``multiturn``: its ``shared_prefix`` data with ``enable_multi_turn_chat``: ``--sessions``
  conversations sharing one system prompt of ``--system-tokens``; request k is turn k // sessions of
  conversation k % sessions, sent with the whole conversation so far (context + previous answers)
  once the previous turn has finished; rate x duration = ``--turns`` x sessions requests. inference-perf
  sends these as completions (a growing text prompt), not as chat messages;
* ``unique``: its ``random`` data, every prompt ``--system-tokens + --question-tokens`` random tokens.

Each arm and round gets its own seed (the same shape with fresh text: no arm finds another's
prompts in the cache). TTFT, output tokens/s come from inference-perf's summary report; the prefix
hit rate is the servers' own (``fleetserve_prefix_cache_hits_total / queries_total`` over the pods
the arm used, before/after). ``--loadgen bench-serve`` uses `fleetserve bench serve`'s load
generator instead (chat messages, hit rate from ``usage.prompt_tokens_details``); there ``--rate`` is
the rate at which conversations *start* (Poisson), each sending its next turn when the previous answer
has ended (closed loop per conversation).

* ``docs`` (bench-serve only): multi-turn chat where a conversation's own history dominates its prompt:
  a short shared system prompt (``--system-tokens``), a first turn that pastes a ``--doc-tokens``
  document plus a question, then ``--turns - 1`` short ``--question-tokens`` questions, short answers
  (``--output-len``). inference-perf's multi-turn data has one question length for every turn, so it
  cannot express it.
* ``--fresh-connections`` (bench-serve only): every request on a new TCP connection in every arm. A
  pooled client sends a conversation's next turn on the keep-alive connection its previous answer
  came on; the Service balances per connection (kube-proxy, and the dev cluster's stand-in), so the
  round-robin arm became sticky per conversation, which many users behind a gateway are not.

Each round runs the arms in alternating order; ratios are medians over rounds. The text depends on
``--seed`` (and the arm and round): on a warm fleet give every invocation its own ``--seed``, or the
servers' prefix caches (TTL ``cacheTTLSeconds``) still hold an earlier invocation's prompts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "e2e"))
sys.path.insert(0, str(REPO / "benchmarks" / "router"))

from autoscaler_harness import Fleet, apply_crds, free_port  # noqa: E402
from common import percentile, start_process, stop_process  # noqa: E402
from fleetserve_devcluster.testing import DevClusterHandle, acquire, wait_until  # noqa: E402
from fleetserve_server.bench.loadgen import Conversation, RequestResult, run_workload  # noqa: E402

NAME = "rt"
NAMESPACE = "router-bench"
SERVED = "smollm2"
MODEL_COPY = Path("/var/tmp/fleetserve-router-bench/smollm2-135m-instruct")
WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue "
         "side kind head house service friend father power hour game line end member law car city community name "
         "team minute idea body information back parent face level office door health person art war history "
         "party result change morning reason research girl moment air teacher force education").split()


# ---- the fleet ---------------------------------------------------------------------------------

def converted_builtin() -> Path:
    """A world-readable copy of the builtin model's converted safetensors (pods run as non-root and
    would otherwise each dequantize the GGUF again into their own emptyDir)."""
    if (MODEL_COPY / "config.json").exists():
        return MODEL_COPY
    cache = Path.home() / ".cache" / "fleetserve" / "models" / "smollm2-135m-instruct"
    src = max((p for p in cache.iterdir() if p.is_dir() and (p / "config.json").exists()),
              key=lambda p: p.stat().st_mtime)
    MODEL_COPY.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, MODEL_COPY, dirs_exist_ok=True)
    for path in [MODEL_COPY.parent, MODEL_COPY, *MODEL_COPY.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return MODEL_COPY


def manifest(model: Path, replicas: int, threads: int) -> dict[str, Any]:
    return {"apiVersion": "fleetserve.io/v1alpha1", "kind": "LLMDeployment", "metadata": {"name": NAME},
            "spec": {
                "model": {"source": str(model), "servedName": SERVED},
                "resources": {"gpus": 0, "memory": "3Gi"},
                "engine": {"maxModelLen": 2048, "maxNumSeqs": 8, "maxBatchTokens": 512, "cacheTTLSeconds": 600},
                "replicas": replicas,
                "autoscaling": {"enabled": False},
                "env": [{"name": "OMP_NUM_THREADS", "value": str(threads)}],
                "router": {"enabled": True, "replicas": 1},
            }}


def server_pods(fleet: Fleet) -> list[Any]:
    return [p for p in fleet.ready_pods() if (p.metadata.labels or {}).get("app.kubernetes.io/name")
            == "fleetserve-server"]


def cmd_up(cluster: DevClusterHandle, args: argparse.Namespace) -> int:
    work = args.work_dir
    apply_crds(cluster)
    if cluster.kubectl("get", "namespace", NAMESPACE, check=False).returncode != 0:
        cluster.kubectl("create", "namespace", NAMESPACE)
    pid_file = work / "operator.pid"
    if not (pid_file.exists() and Path(f"/proc/{pid_file.read_text().strip()}").exists()):
        log = open(work / "operator.log", "ab")  # noqa: SIM115 - the operator keeps it
        proc = subprocess.Popen([sys.executable, "-m", "fleetserve_cli.main", "operator", "--namespace", NAMESPACE,
                                 "--metrics-port", str(free_port()), "--metrics-host", "127.0.0.1"],
                                env=cluster.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        pid_file.write_text(str(proc.pid))
    fleet = Fleet(cluster, NAMESPACE, NAME)
    fleet.apply(manifest(converted_builtin(), args.replicas, args.threads))
    t0 = time.monotonic()
    wait_until(lambda: len(server_pods(fleet)) >= args.replicas, 900, f"{args.replicas} server pods Ready", 2)
    wait_until(lambda: fleet.condition("RouterReady").get("status") == "True", 300, "RouterReady", 1)
    print(f"fleet up: {args.replicas} replicas Ready after {time.monotonic() - t0:.0f} s; "
          f"Service {NAME} at {fleet.proxy_address()}")
    return 0


def cmd_down(cluster: DevClusterHandle, args: argparse.Namespace) -> int:
    cluster.kubectl("delete", "llmd", NAME, "-n", NAMESPACE, "--wait=true", "--timeout=120s", check=False,
                    timeout=150)
    pid_file = args.work_dir / "operator.pid"
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
        except ProcessLookupError:
            pass
        pid_file.unlink()
    return 0


# ---- the load ----------------------------------------------------------------------------------

def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def conversations(scenario: str, n: int, turns: int, system_words: int, turn_words: int, output_len: int,
                  seed: int, doc_words: int = 0) -> list[Conversation]:
    """The same conversations for every arm; ``tag`` them per arm and round."""
    rng = random.Random(seed)
    if scenario == "unique":  # no shared system prompt, one turn: nothing to share
        return [Conversation(system="", user_turns=[words(rng, system_words + turn_words)], output_len=output_len)
                for _ in range(n)]
    system = "You are a helpful assistant for a city library. Policies: " + words(random.Random(0), system_words)
    if scenario == "docs":  # a document pasted in the first turn, then short questions about it
        return [Conversation(system=system, user_turns=[
            "Read this document, then answer my questions about it.\n\n" + words(rng, doc_words)
            + "\n\nFirst question: " + words(rng, turn_words),
            *(words(rng, turn_words) + "?" for _ in range(turns - 1))], output_len=output_len) for _ in range(n)]
    return [Conversation(system=system, user_turns=[words(rng, turn_words) for _ in range(turns)],
                         output_len=output_len) for _ in range(n)]


def tagged(convs: list[Conversation], tag: str) -> list[Conversation]:
    return [Conversation(system=c.system, user_turns=[f"[{tag}-{i}] {c.user_turns[0]}", *c.user_turns[1:]],
                         output_len=c.output_len) for i, c in enumerate(convs)]


def summary(results: list[RequestResult], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    prompt = sum(r.prompt_tokens for r in ok)
    later = [r for r in ok if r.turn > 0]
    t0 = min((r.start for r in results), default=0.0)
    return {
        "requests": len(results), "failures": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:3],
        "duration_s": round(duration, 2),
        "output_tok_s": round(sum(r.output_tokens for r in ok) / duration, 2),
        "ttft_p50_s": percentile(ttft, 50), "ttft_p90_s": percentile(ttft, 90), "ttft_p99_s": percentile(ttft, 99),
        "e2e_p90_s": percentile([r.e2e for r in ok if r.e2e is not None], 90),
        "ttft_p90_first_turn_s": percentile([r.ttft for r in ok if r.turn == 0 and r.ttft is not None], 90),
        "ttft_p90_later_turns_s": percentile([r.ttft for r in later if r.ttft is not None], 90),
        "prefix_hit_rate": round(sum(r.cached_tokens for r in ok) / prompt, 4) if prompt else None,
        "later_turns_hit_rate": round(sum(r.cached_tokens for r in later) / max(1, sum(r.prompt_tokens for r in later)),
                                      4) if later else None,
        "prompt_tokens": prompt,
        # every request: conversation, turn, start (s from the first), TTFT, e2e, prompt and cached tokens
        "per_request_fields": ["conversation", "turn", "start_s", "ttft_s", "e2e_s", "prompt_tokens", "cached_tokens"],
        "per_request": [[r.conversation, r.turn, round(r.start - t0, 3),
                         None if r.ttft is None else round(r.ttft, 3), None if r.e2e is None else round(r.e2e, 3),
                         r.prompt_tokens, r.cached_tokens] for r in sorted(results, key=lambda r: r.start)],
    }


def pod_prefix_counters(ips: list[str]) -> tuple[float, float]:
    """Summed prefix-cache (hit tokens, queried tokens) over the given server pods' /metrics."""
    import httpx

    hits = queries = 0.0
    for ip in ips:
        for line in httpx.get(f"http://{ip}:8000/metrics", timeout=10, trust_env=False).text.splitlines():
            if line.startswith("fleetserve_prefix_cache_hits_total"):
                hits += float(line.split()[-1])
            elif line.startswith("fleetserve_prefix_cache_queries_total"):
                queries += float(line.split()[-1])
    return hits, queries


ROUTER_COUNTERS = {"fleetserve_router_prefix_predicted_hits_total": "predicted",
                   "fleetserve_router_prefix_confirmed_hits_total": "confirmed",
                   "fleetserve_router_prefix_false_credit_total": "false_credit",
                   "fleetserve_router_cached_tokens_total": "cached_tokens"}


def router_counters(base_url: str) -> dict[str, float]:
    """The router's prefix-prediction counters (predicted / confirmed by the servers / false credit)."""
    import httpx

    found = dict.fromkeys(ROUTER_COUNTERS.values(), 0.0)
    for line in httpx.get(base_url + "/metrics", timeout=10, trust_env=False).text.splitlines():
        name, _, value = line.partition(" ")
        if name in ROUTER_COUNTERS:
            found[ROUTER_COUNTERS[name]] += float(value)
    return found


def measure(arm: str, url: str, convs: list[Conversation], rate: float, concurrency: int, seed: int,
            pod_ips: list[str], fresh_connections: bool) -> dict[str, Any]:
    base = url.removesuffix("/v1")
    before = pod_prefix_counters(pod_ips)
    routed = arm in ("router", "least_load")
    router_before = router_counters(base) if routed else {}
    load = time.time()
    results, duration = asyncio.run(run_workload(base_url=url, model=SERVED, conversations=convs,
                                                 request_rate=rate, concurrency=concurrency, seed=seed,
                                                 timeout=600.0, extra_body={"ignore_eos": True},
                                                 fresh_connections=fresh_connections))
    after = pod_prefix_counters(pod_ips)
    queried = after[1] - before[1]
    out = summary(results, duration)
    out["servers_prefix_hit_rate"] = round((after[0] - before[0]) / queried, 4) if queried else None
    out["loadavg_1m_end"] = os.getloadavg()[0]
    out["started_unix"] = round(load, 1)
    if routed:
        router_after = router_counters(base)
        out["router_prefix"] = {k: router_after[k] - router_before[k] for k in router_after}
    return out


def inference_perf_config(args: argparse.Namespace, base_url: str, seed: int, out: Path, *, sessions: int,
                          rate: float) -> dict[str, Any]:
    """inference-perf's config for one arm: the same shape for every arm, a different seed (fresh text)."""
    if args.scenario == "multiturn":
        # shared_prefix with enable_multi_turn_chat: `sessions` conversations in one group (one shared
        # system prompt); request k goes to conversation k % sessions as its turn k // sessions, and a
        # turn waits for the previous one, so rate x duration = turns x sessions requests.
        data = {"type": "shared_prefix", "shared_prefix": {
            "num_groups": 1, "num_prompts_per_group": sessions, "system_prompt_len": args.system_tokens,
            "question_len": args.question_tokens, "output_len": args.output_len, "seed": seed,
            "enable_multi_turn_chat": True}}
        requests = args.turns * sessions
    else:
        length = args.system_tokens + args.question_tokens
        data = {"type": "random", "input_distribution": {"min": length, "max": length, "mean": length, "std_dev": 0},
                "output_distribution": {"min": args.output_len, "max": args.output_len, "mean": args.output_len,
                                        "std_dev": 0}}
        requests = sessions
    return {
        "api": {"type": "completion", "streaming": True},
        "data": data,
        "load": {"type": "poisson", "stages": [{"rate": rate, "duration": max(1, round(requests / rate))}],
                 "num_workers": 1, "worker_max_concurrency": args.concurrency, "base_seed": seed,
                 "request_timeout": 600},
        "server": {"type": "vllm", "model_name": SERVED, "base_url": base_url, "ignore_eos": True},
        "tokenizer": {"pretrained_model_name_or_path": str(MODEL_COPY)},
        "report": {"request_lifecycle": {"summary": True, "per_stage": False, "per_request": False}},
        "storage": {"local_storage": {"path": str(out)}},
    }


def measure_inference_perf(args: argparse.Namespace, arm: str, base_url: str, seed: int, pod_ips: list[str], *,
                           sessions: int, rate: float) -> dict[str, Any]:
    import yaml

    out = args.work_dir / "inference-perf" / f"{arm}-{seed}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    config = inference_perf_config(args, base_url, seed, out, sessions=sessions, rate=rate)
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    before = pod_prefix_counters(pod_ips)
    routed = arm in ("router", "least_load")
    router_before = router_counters(base_url) if routed else {}
    started = time.monotonic()
    proc = subprocess.run([args.inference_perf, "--config_file", str(out / "config.yaml")], capture_output=True,
                          text=True, timeout=3600)
    wall = time.monotonic() - started
    (out / "inference-perf.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"inference-perf failed ({proc.returncode}): {(proc.stdout + proc.stderr)[-2000:]}")
    after = pod_prefix_counters(pod_ips)
    router_after = router_counters(base_url) if routed else {}
    report = json.loads((out / "summary_lifecycle_metrics.json").read_text())
    ok = report["successes"]
    lat = ok["latency"]
    failures = (report.get("failures") or {}).get("count", 0)
    queried = after[1] - before[1]
    return {
        "requests": ok["count"] + failures, "failures": failures,
        "duration_s": round(report.get("benchmark_time_seconds") or wall, 2),
        "output_tok_s": round(ok["throughput"]["output_tokens_per_sec"], 2),
        "ttft_p50_s": round(lat["time_to_first_token"]["median"], 4),
        "ttft_p90_s": round(lat["time_to_first_token"]["p90"], 4),
        "ttft_p99_s": round(lat["time_to_first_token"]["p99"], 4),
        "e2e_p90_s": round(lat["request_latency"]["p90"], 4),
        "prefix_hit_rate": round((after[0] - before[0]) / queried, 4) if queried else None,
        "schedule_delay_p90_s": round(report["load_summary"]["schedule_delay"]["p90"], 4),
        "report": str(out / "summary_lifecycle_metrics.json"),
        **({"router_prefix": {k: router_after[k] - router_before[k] for k in router_after}} if routed else {}),
    }


def cmd_run(cluster: DevClusterHandle, args: argparse.Namespace) -> int:
    fleet = Fleet(cluster, NAMESPACE, NAME)
    pods = server_pods(fleet)
    if len(pods) < args.replicas:
        raise SystemExit(f"{len(pods)} server pods Ready, want {args.replicas}: run `up` first")
    core = fleet.core
    rt_svc = core.read_namespaced_service(NAME, NAMESPACE)
    servers_svc = core.read_namespaced_service(f"{NAME}-servers", NAMESPACE)
    annotation = "fleetserve.io/proxy-address"
    urls = {"router": f"http://{rt_svc.metadata.annotations[annotation]}/v1",
            "round_robin": f"http://{servers_svc.metadata.annotations[annotation]}/v1",
            "single": f"http://{pods[0].status.pod_ip}:8000/v1"}
    if args.router_direct:
        # the router pod itself, not through the Service's proxy: one proxy hop, like the host-side
        # least-load router, so a unique-prompt comparison measures the pick and not the extra hop
        routers = [p for p in fleet.ready_pods()
                   if (p.metadata.labels or {}).get("app.kubernetes.io/name") == "fleetserve-router"]
        if not routers:
            raise SystemExit("--router-direct: no router pod is Ready")
        urls["router"] = f"http://{routers[0].status.pod_ip}:8000/v1"
    arms = ["router", "round_robin"] if args.scenario in ("multiturn", "docs") else ["router", "least_load"]
    least_load = None
    if "least_load" in arms:
        port = free_port()
        least_load = start_process("least-load-router", [
            sys.executable, "-m", "fleetserve_cli.main", "router", "--service", f"{NAMESPACE}/{NAME}-servers",
            "--kubeconfig", str(cluster.kubeconfig), "--host", "127.0.0.1", "--port", str(port),
            "--cache-ttl", "1e-6"], f"http://127.0.0.1:{port}/ready", args.work_dir)
        urls["least_load"] = f"http://127.0.0.1:{port}/v1"
    pod_ips = [p.status.pod_ip for p in pods]
    report: dict[str, Any] = {"scenario": args.scenario, "loadgen": args.loadgen,
                              "args": {k: str(v) for k, v in vars(args).items()},
                              "urls": urls, "replicas": [p.metadata.name for p in pods], "rounds": []}

    def arm_run(arm: str, seed: int, sessions: int, rate: float, ips: list[str],
                arrivals_seed: int | None = None) -> dict[str, Any]:
        if args.loadgen == "inference-perf":
            return measure_inference_perf(args, arm, urls[arm].removesuffix("/v1"), seed, ips, sessions=sessions,
                                          rate=rate)
        convs = tagged(conversations(args.scenario, sessions, args.turns, args.system_tokens, args.question_tokens,
                                     args.output_len, args.seed, args.doc_tokens), f"{arm}{seed}")
        return measure(arm, urls[arm], convs, rate, args.concurrency, seed if arrivals_seed is None else arrivals_seed,
                       ips, args.fresh_connections)

    try:
        # idle: a light load through the baseline arm (what "its idle p90 TTFT" means here)
        other = arms[1]
        report["idle"] = {other: arm_run(other, 901, args.idle_sessions, args.idle_rate, pod_ips)}
        print("idle:", json.dumps(report["idle"]), flush=True)
        rate, sessions = args.rate, args.sessions
        if args.rate_auto:
            # the load: raise it until the baseline's p90 TTFT is --auto-factor x its idle value. A
            # multi-turn conversation sends its next turn only after the previous answer, so there the
            # load is the number of conversations in flight: raise that, not the rate
            report["probes"] = []
            idle_p90 = report["idle"][other]["ttft_p90_s"]
            probe_sessions = args.probe_sessions
            for i in range(args.max_probes):
                probe = arm_run(other, 950 + i, probe_sessions, rate, pod_ips)
                report["probes"].append({"rate": rate, "sessions": probe_sessions, **probe})
                print(f"probe {other} at {rate:.2f}/s, {probe_sessions} sessions: p90 {probe['ttft_p90_s']} s = "
                      f"{probe['ttft_p90_s'] / idle_p90:.1f}x idle", flush=True)
                if probe["ttft_p90_s"] >= args.auto_factor * idle_p90:
                    break
                if args.scenario in ("multiturn", "docs") and args.loadgen == "inference-perf":
                    probe_sessions = round(probe_sessions * 1.5)
                else:
                    rate = round(rate * 1.5, 2)
            if args.scenario in ("multiturn", "docs") and args.loadgen == "inference-perf":
                sessions = max(sessions, probe_sessions)
        report["sessions"] = sessions
        report["rate"] = rate
        if args.scenario in ("multiturn", "docs") and args.single_sessions:
            report["single_replica"] = arm_run("single", 902, args.single_sessions, args.single_rate, pod_ips[:1])
            print("single replica:", json.dumps(report["single_replica"]), flush=True)
        for r in range(args.rounds):
            order = arms if r % 2 == 0 else arms[::-1]
            row: dict[str, Any] = {}
            for arm in order:
                # the same seed for both arms of a round would let the second find the first's text
                # cached; a seed per arm and round gives the same shape with fresh text. The arrival
                # times (bench-serve) come from one seed per round, the same for both arms: with 30
                # Poisson starts the realised rate varies by +-30 % between seeds, which would hand one
                # arm a heavier load than the other
                row[arm] = arm_run(arm, 100 * r + arms.index(arm) + 1, sessions, rate, pod_ips,
                                   arrivals_seed=100 * r + 50)
                print(f"round {r} {arm}: {json.dumps(row[arm])}", flush=True)
            report["rounds"].append(row)
            write(report, args)
    finally:
        if least_load is not None:
            stop_process(least_load)
    write(report, args)
    print(json.dumps({k: v for k, v in report.items() if k in ("ratios", "medians")}, indent=1))
    return 0


def write(report: dict[str, Any], args: argparse.Namespace) -> None:
    rounds = report["rounds"]
    if rounds:
        arms = list(rounds[0])
        keys = ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "output_tok_s", "prefix_hit_rate", "e2e_p90_s",
                "servers_prefix_hit_rate", "ttft_p90_first_turn_s", "ttft_p90_later_turns_s")
        report["medians"] = {arm: {k: statistics.median(vals) for k in keys
                                   if (vals := [r[arm][k] for r in rounds if r[arm].get(k) is not None])}
                             for arm in arms}
        other = "round_robin" if "round_robin" in arms else "least_load"

        def ratio(key: str) -> float:
            return round(statistics.median(r["router"][key] / r[other][key] for r in rounds), 3)

        report["ratios"] = {f"router/{other} ttft_p90 (median of rounds)": ratio("ttft_p90_s"),
                            f"router/{other} output_tok_s": ratio("output_tok_s")}
        if "single_replica" in report:
            report["ratios"]["router hit rate / single replica"] = round(
                report["medians"]["router"]["prefix_hit_rate"] / report["single_replica"]["prefix_hit_rate"], 3)
        idle = report.get("idle", {}).get(other, {}).get("ttft_p90_s")
        if idle:
            report["ratios"][f"{other} ttft_p90 under load / idle"] = round(
                report["medians"][other]["ttft_p90_s"] / idle, 2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("up", "run", "down"))
    parser.add_argument("--state-dir", type=Path, required=True, help="the dev cluster (started if not running)")
    parser.add_argument("--port-base", type=int, default=None,
                        help="the dev cluster's first loopback port when this starts it (`dev-cluster up --port-base`); "
                             "keep it off the test suite's default 16000 (a benchmark fleet on the default ports "
                             "makes a concurrent `make test` fail at setup)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/fleetserve-router-bench"))
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each server pod")
    parser.add_argument("--scenario", choices=("multiturn", "docs", "unique"), default="multiturn",
                        help="docs: multi-turn chat whose first turn pastes a --doc-tokens document, later turns "
                             "short --question-tokens questions (bench-serve only)")
    parser.add_argument("--loadgen", choices=("inference-perf", "bench-serve"), default="inference-perf")
    parser.add_argument("--inference-perf", default=None,
                        help="the inference-perf executable (default: benchmarks/router/setup_inference_perf.sh)")
    parser.add_argument("--sessions", type=int, default=12,
                        help="conversations (multiturn, docs) or requests (unique)")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--system-tokens", type=int, default=250, help="shared system prompt (multiturn)")
    parser.add_argument("--question-tokens", type=int, default=100)
    parser.add_argument("--doc-tokens", type=int, default=800, help="the document of a docs conversation's first turn")
    parser.add_argument("--fresh-connections", action="store_true",
                        help="bench-serve: every request on a new TCP connection (no keep-alive), in every arm")
    parser.add_argument("--router-direct", action="store_true",
                        help="send the router arm to the router pod's address, not through the Service's proxy "
                             "(the least-load arm is reached directly too: the same number of hops)")
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--rate", type=float, default=1.0,
                        help="requests per s (Poisson); with bench-serve, conversations started per s")
    parser.add_argument("--rate-auto", action="store_true",
                        help="raise the load x1.5 (multiturn: --probe-sessions; unique: --rate) until the baseline arm's p90 TTFT >= --auto-factor x idle")
    parser.add_argument("--auto-factor", type=float, default=3.0, help="--rate-auto's target p90 / idle p90")
    parser.add_argument("--probe-sessions", type=int, default=6)
    parser.add_argument("--max-probes", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle-sessions", type=int, default=2)
    parser.add_argument("--idle-rate", type=float, default=0.5)
    parser.add_argument("--single-sessions", type=int, default=4)
    parser.add_argument("--single-rate", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.command == "run" and (args.scenario == "docs" or args.fresh_connections) and args.loadgen != "bench-serve":
        parser.error("--scenario docs and --fresh-connections need --loadgen bench-serve (inference-perf has one "
                     "question length for every turn and its own keep-alive pool)")
    if args.command == "run" and args.loadgen == "inference-perf" and not args.inference_perf:
        setup = subprocess.run(["bash", str(REPO / "benchmarks/router/setup_inference_perf.sh")], check=True,
                               capture_output=True, text=True)
        args.inference_perf = setup.stdout.strip().splitlines()[-1]
    cluster = acquire(args.state_dir, args.port_base)
    return {"up": cmd_up, "run": cmd_run, "down": cmd_down}[args.command](cluster, args)


if __name__ == "__main__":
    raise SystemExit(main())
