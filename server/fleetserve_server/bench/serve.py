"""`fleetserve bench serve`: load-test OpenAI-compatible servers and compare them in one run.

Targets, all started and warmed up first, then measured interleaved round by
round (``--runs``) with the same workload within a round (the same seed, so the
same prompts and arrival times; a new seed each round):

* fleetserve: ``--base-url`` of a running server, or (default) a
  ``fleetserve serve`` the bench starts itself on a free loopback port;
* ``--baseline naive``: a one-request-at-a-time HF ``generate`` server;
* ``--baseline transformers-serve``: ``transformers serve --continuous-batching``
  on the same model directory, when the installed transformers has it.

Prints a table (throughput, req/s, TTFT / TPOT / e2e p50/p90/p99, failures)
and writes everything to ``--output-json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BASELINES = ("naive", "transformers-serve")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0] if __doc__ else None
    parser.add_argument("--base-url", default=None,
                        help="OpenAI base URL of a running fleetserve (e.g. http://127.0.0.1:8000/v1); "
                             "default: start `fleetserve serve` here")
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct",
                        help="model spec the bench starts servers with (default: the builtin model)")
    parser.add_argument("--served-model-name", default=None,
                        help="model name sent in requests (default: asked from GET /v1/models)")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for the fleetserve server the bench starts (repeatable), "
                             "e.g. --server-arg=--max-num-seqs=64")
    parser.add_argument("--baseline", action="append", choices=BASELINES, default=[],
                        help="also measure this baseline in the same run (repeatable)")
    parser.add_argument("--no-fleetserve", action="store_true", help="measure only the baselines")
    parser.add_argument("--dataset", choices=("random", "multiturn"), default="random")
    parser.add_argument("--num-prompts", type=int, default=32,
                        help="requests (random) or conversations (multiturn)")
    parser.add_argument("--turns", type=int, default=2, help="user turns per conversation (multiturn)")
    parser.add_argument("--input-len", type=int, default=128, help="approximate prompt tokens")
    parser.add_argument("--output-len", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--request-rate", type=float, default=math.inf,
                        help="Poisson arrival rate in requests/s, or inf (default) to send all at once")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight at most")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key", default=None, help="API key for --base-url")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per request")
    parser.add_argument("--startup-timeout", type=float, default=900.0, help="seconds for a server to be ready")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of every server the bench starts (OMP_NUM_THREADS; the naive "
                             "baseline also calls torch.set_num_threads); default: torch's own choice")
    parser.add_argument("--runs", type=int, default=1,
                        help="rounds: every server is measured once per round, the servers interleaved "
                             "(A B A B ...) after a warm-up of each; ratios are medians over the rounds")
    parser.add_argument("--output-json", type=Path, default=None)
    parser.add_argument("--log-dir", type=Path, default=None, help="where server logs go (default: a temp dir)")
    parser.set_defaults(handler=run)


def _workload(args: argparse.Namespace) -> list[Any]:
    from fleetserve_server.bench.loadgen import multiturn_dataset, random_dataset

    if args.dataset == "multiturn":
        return multiturn_dataset(args.num_prompts, args.turns, args.input_len, args.output_len, args.seed)
    return random_dataset(args.num_prompts, args.input_len, args.output_len, args.seed)


def _served_name(base_url: str, api_key: str | None) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(base_url.rstrip("/") + "/models", headers=headers, timeout=30)
    response.raise_for_status()
    return str(response.json()["data"][0]["id"])


def _scrape_prefix_cache(root_url: str) -> tuple[float, float] | None:
    """(queries, hits) token counters from /metrics, or None if the server has none."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        response = httpx.get(root_url + "/metrics", timeout=10)
        if response.status_code != 200:
            return None
        values = {f.name: sum(s.value for s in f.samples) for f in text_string_to_metric_families(response.text)}
    except (httpx.HTTPError, ValueError):  # no server or no Prometheus text (a baseline)
        return None
    if "fleetserve_prefix_cache_queries" not in values:
        return None
    return values["fleetserve_prefix_cache_queries"], values.get("fleetserve_prefix_cache_hits", 0.0)


def _force_length(name: str, output_len: int) -> dict[str, Any]:
    """How each server is told to generate exactly ``output_len`` tokens (no early EOS)."""
    if name == "transformers-serve":  # rejects unknown fields; takes a GenerationConfig as JSON
        return {"generation_config": json.dumps({"max_new_tokens": output_len, "min_new_tokens": output_len,
                                                 "do_sample": False})}
    return {"ignore_eos": True}


def _measure(name: str, base_url: str, args: argparse.Namespace, model_name: str | None,
             force_name: str | None = None) -> Any:
    import asyncio

    from fleetserve_server.bench.loadgen import run_workload, summarize

    model = model_name or _served_name(base_url, args.api_key)
    root = base_url.rstrip("/").removesuffix("/v1")
    before = _scrape_prefix_cache(root)
    print(f"[bench] {name}: {args.num_prompts} x {args.dataset} at rate {args.request_rate}, "
          f"concurrency {args.concurrency} ...", flush=True)
    results, duration = asyncio.run(run_workload(
        base_url=base_url, model=model, conversations=_workload(args), request_rate=args.request_rate,
        concurrency=args.concurrency, api_key=args.api_key, seed=args.seed, timeout=args.timeout,
        extra_body=_force_length(force_name or name, args.output_len)))
    after = _scrape_prefix_cache(root)
    hit_rate = None
    if before is not None and after is not None and after[0] > before[0]:
        hit_rate = (after[1] - before[1]) / (after[0] - before[0])
    return summarize(name, results, duration, hit_rate)


def _with_architectures(model_dir: Path, scratch: Path) -> Path:
    """``model_dir``, or a copy of it (symlinks plus a fixed config.json) under ``scratch`` when its
    config.json names no ``architectures``: `transformers serve` picks the model class from
    ``architectures[0]`` and fails with a TypeError without it (the builtin model's converted config
    has only ``model_type``)."""
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("architectures"):
        return model_dir
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architecture = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(str(config.get("model_type")))
    if architecture is None:
        raise ValueError(f"{model_dir}/config.json has no 'architectures' and its model_type "
                         f"{config.get('model_type')!r} has no causal-LM class in transformers")
    overlay = scratch / f"{model_dir.name}-transformers-serve"
    overlay.mkdir(parents=True, exist_ok=True)
    for item in model_dir.iterdir():
        link = overlay / item.name
        if item.name != "config.json" and not link.exists():
            link.symlink_to(item.resolve())
    (overlay / "config.json").write_text(json.dumps({**config, "architectures": [architecture]}, indent=2))
    return overlay


def _transformers_serve_argv(model_dir: Path, port: int) -> list[str] | None:
    exe = shutil.which("transformers") or str(Path(sys.executable).with_name("transformers"))
    if not Path(exe).exists():
        return None
    import subprocess

    probe = subprocess.run([exe, "serve", "--help"], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0 or "continuous" not in probe.stdout:
        return None
    return [exe, "serve", "--continuous-batching", "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
            str(model_dir)]


def _start_servers(args: argparse.Namespace, log_dir: Path, notes: list[str]) -> list[tuple[str, str, Any, Any]]:
    """Every system to measure, started and ready: (name, OpenAI base URL, served model name or None,
    the server process or None for ``--base-url``)."""
    from fleetserve_server.bench import launch

    threads_env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    targets: list[tuple[str, str, Any, Any]] = []
    if not args.no_fleetserve:
        if args.base_url:
            targets.append(("fleetserve", args.base_url, args.served_model_name, None))
        else:
            port = launch.free_port()
            server = launch.start_server(
                "fleetserve", launch.fleetserve_argv(args.model, port, args.server_arg), port=port,
                ready_path="/ready", log_dir=log_dir, timeout=args.startup_timeout, env=threads_env)
            targets.append(("fleetserve", server.base_url + "/v1", args.served_model_name, server))
    for baseline in args.baseline:
        port = launch.free_port()
        model_name = None
        if baseline == "naive":
            argv = [sys.executable, "-m", "fleetserve_server.bench.naive_server", "--model", args.model,
                    "--port", str(port)] + (["--threads", str(args.threads)] if args.threads else [])
        else:
            from fleetserve_server.runner.builtin import resolve_model

            maybe = _transformers_serve_argv(_with_architectures(resolve_model(args.model).path, log_dir), port)
            if maybe is None:
                notes.append("transformers-serve: skipped (the installed transformers has no "
                             "`transformers serve --continuous-batching`, or its [serving] extra is missing)")
                print(f"[bench] {notes[-1]}", flush=True)
                continue
            argv = maybe
            model_name = argv[-1]  # transformers serve names the model by the path it was given
        try:
            server = launch.start_server(baseline, argv, port=port, ready_path="/v1/models", log_dir=log_dir,
                                         timeout=args.startup_timeout,
                                         env={"HF_HUB_OFFLINE": "1", **threads_env})
        except (RuntimeError, TimeoutError) as exc:
            notes.append(f"{baseline}: could not start ({str(exc).splitlines()[0]}); log: {log_dir}/{baseline}.log")
            print(f"[bench] {notes[-1]}", flush=True)
            continue
        targets.append((baseline, server.base_url + "/v1", model_name, server))
    return targets


def run(args: argparse.Namespace) -> int:
    from fleetserve_server.bench.loadgen import format_table

    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="fleetserve-bench-"))
    notes: list[str] = []
    # Every server is started and warmed up first (a few requests of the workload's shape), then the
    # servers are measured interleaved, round by round (A B A B A B), so a change in the machine's load
    # reaches all of them alike. Each round draws new prompts (seed + round): the same for every server
    # within a round, never one that fleetserve's prefix cache has already seen in an earlier round.
    targets = _start_servers(args, log_dir, notes)
    rounds: list[list[Any]] = []
    try:
        warm = argparse.Namespace(**{**vars(args), "num_prompts": min(2, args.num_prompts),
                                     "output_len": min(8, args.output_len), "seed": args.seed + 10_000})
        for name, url, model_name, _ in targets:
            _measure(f"{name} (warm-up)", url, warm, model_name, force_name=name)
        for i in range(args.runs):
            this = argparse.Namespace(**{**vars(args), "seed": args.seed + i})
            rounds.append([_measure(name, url, this, model_name) for name, url, model_name, _ in targets])
            print(f"[bench] round {i + 1}/{args.runs} (load average {os.getloadavg()[0]:.1f}): "
                  + ", ".join(f"{s.name} {s.output_throughput:.1f}" for s in rounds[-1]) + " output tok/s",
                  flush=True)
    finally:
        for _, _, _, server in targets:
            if server is not None:
                server.stop()
    summaries = [summary for one in rounds for summary in one]
    for i, one in enumerate(rounds):
        for summary in one:
            if args.runs > 1:
                summary.name = f"{summary.name} #{i + 1}"
    print(format_table(summaries))
    for note in notes:
        print(note)
    ratios = _round_ratios(rounds)
    for name, values in ratios.items():
        print(f"fleetserve / {name}: {statistics.median(values):.2f}x output tokens/s (median of {len(values)} "
              f"interleaved rounds; min {min(values):.2f}x, max {max(values):.2f}x)")
    if args.output_json:
        report = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("handler", "api_key")},
            "results": [s.to_dict() for s in summaries],
            "rounds": [[s.to_dict() for s in one] for one in rounds],
            "fleetserve_ratios": {name: {"per_round": values, "median": statistics.median(values),
                                         "min": min(values), "max": max(values)} for name, values in ratios.items()},
            "notes": notes,
        }
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps(report, indent=2, default=str))
        print(f"[bench] wrote {args.output_json}")
    return 0 if all(s.failures == 0 for s in summaries) else 1


def _round_ratios(rounds: list[list[Any]]) -> dict[str, list[float]]:
    """fleetserve's output tok/s over each baseline's, per round (both measured back to back)."""
    ratios: dict[str, list[float]] = {}
    for one in rounds:
        if not one or not one[0].name.startswith("fleetserve"):
            continue
        for other in one[1:]:
            if other.output_throughput > 0:
                ratios.setdefault(other.name.split(" #")[0], []).append(
                    one[0].output_throughput / other.output_throughput)
    return ratios
