"""`fleetserve tune`: search engine settings for a recorded (or described) workload under an objective."""

from __future__ import annotations

import argparse
import math
import sys


def _list(kind):  # type: ignore[no-untyped-def]
    def parse(text: str) -> list:  # type: ignore[type-arg]
        try:
            return [None if kind is int and v == "default" else kind(v) for v in text.split(",") if v != ""]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}") from None
    return parse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Replay a workload against the real server over a search of engine settings (skipping those the "
        "memory planner proves cannot fit), and report the throughput-vs-latency table, the best setting "
        "under the objective, the replicas it needs at the workload's peak, and the LLMDeployment patch.")
    w = parser.add_argument_group("workload (a request log, or distributions)")
    w.add_argument("--from-log", metavar="FILE", help="the server's JSON request log (kubectl logs output works)")
    w.add_argument("--log-model", default=None, help="only this served model's records of the log")
    w.add_argument("--prompt-tokens", default=None, help="N, uniform:A-B or lognormal:MEDIAN,SIGMA")
    w.add_argument("--output-tokens", default=None, help="N, uniform:A-B or lognormal:MEDIAN,SIGMA")
    w.add_argument("--rate", type=float, default=None, help="arrival rate of the described workload (req/s)")
    w.add_argument("--requests", type=int, default=40, help="requests of the described workload (default 40)")
    w.add_argument("--peak-window", type=float, default=60.0,
                   help="seconds over which the peak load is measured (default 60)")
    w.add_argument("--seed", type=int, default=0)
    o = parser.add_argument_group("objective (p99 over each trial)")
    o.add_argument("--ttft-p99", type=float, required=True, help="seconds")
    o.add_argument("--tpot-p99", type=float, required=True, help="seconds")
    t = parser.add_argument_group("where the settings run")
    t.add_argument("--model", default="builtin:smollm2-135m-instruct")
    t.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    t.add_argument("--device-memory", required=True,
                   help="memory of one device (a GPU's, or a CPU pod's memory limit), e.g. 4Gi")
    t.add_argument("--larger-device-memory", default=None,
                   help="also measure the best setting on a device with this much memory (vertical advice)")
    t.add_argument("--max-model-len", type=int, default=2048)
    t.add_argument("--threads", type=int, default=None, help="torch threads of each server (CPU)")
    s = parser.add_argument_group("search")
    s.add_argument("--quantization", type=_list(str), default=["none"], help="e.g. none,int8,nf4")
    s.add_argument("--max-num-seqs", type=_list(int), default=[8, 32], help="e.g. 8,32")
    s.add_argument("--max-batch-tokens", type=_list(int), default=[None],
                   help="e.g. default,512 (default = the server's own)")
    s.add_argument("--kv-cache-memory-fraction", type=_list(float), default=[0.9], help="e.g. 0.5,0.9")
    s.add_argument("--rate-steps", type=int, default=4, help="trials per setting in the capacity search (default 4)")
    s.add_argument("--start-rate", type=float, default=None,
                   help="first offered rate (default: the workload's peak rate)")
    s.add_argument("--trial-requests", type=int, default=40, help="requests replayed per trial (default 40)")
    r = parser.add_argument_group("report")
    r.add_argument("--output", default="table", choices=["table", "json", "patch"])
    r.add_argument("--plot", default=None, metavar="PNG", help="draw the throughput-vs-TTFT frontier")
    r.add_argument("--log-dir", default=None, help="where the servers' logs go (default: a temporary directory)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from tqdm import tqdm

    from fleetserve_server.memory import parse_quantity
    from fleetserve_server.tune import report, search, trials, workload

    try:
        if args.from_log:
            if args.prompt_tokens or args.output_tokens or args.rate:
                raise workload.WorkloadError("--from-log replays a recorded workload; leave out "
                                             "--prompt-tokens/--output-tokens/--rate")
            load = workload.read_request_log(args.from_log, model=args.log_model)
        else:
            if not (args.prompt_tokens and args.output_tokens and args.rate):
                raise workload.WorkloadError("give --from-log FILE, or all of --prompt-tokens, --output-tokens "
                                             "and --rate")
            load = workload.synthetic(prompt=workload.parse_distribution(args.prompt_tokens, "--prompt-tokens"),
                                      output=workload.parse_distribution(args.output_tokens, "--output-tokens"),
                                      rate=args.rate, requests=args.requests, seed=args.seed)
        load = load.clipped(args.max_model_len)
        if not (args.ttft_p99 > 0 and args.tpot_p99 > 0):
            raise ValueError("--ttft-p99 and --tpot-p99 must be > 0 seconds")
        objective = search.Objective(args.ttft_p99, args.tpot_p99)
        peak = load.peak_rate(args.peak_window)
        start_rate = args.start_rate or peak
        if not math.isfinite(start_rate):
            raise ValueError("the workload's requests all arrived at once; give --start-rate")
        if args.trial_requests < 1:
            raise ValueError("--trial-requests must be >= 1")
        memory = parse_quantity(args.device_memory)
        target = trials.Target(args.model, args.device, memory, args.device_memory, args.max_model_len, args.threads)
        default = search.Setting()
        settings = search.grid(quantizations=args.quantization, max_num_seqs=args.max_num_seqs,
                               max_batch_tokens=args.max_batch_tokens, fractions=args.kv_cache_memory_fraction,
                               default=default)
        larger_target = None
        if args.larger_device_memory:
            larger = parse_quantity(args.larger_device_memory)
            if larger <= memory:
                raise ValueError(f"--larger-device-memory {args.larger_device_memory} is not larger than "
                                 f"--device-memory {args.device_memory}")
            larger_target = trials.Target(args.model, args.device, larger, args.larger_device_memory,
                                          args.max_model_len, args.threads)
        for setting in settings:  # a model the planner cannot read is an error before any server starts
            trials.plan(target, setting)
    except ValueError as exc:
        print(f"fleetserve tune: error: {exc}", file=sys.stderr)
        return 2

    print(load.describe(), file=sys.stderr)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="fleetserve-tune-"))
    bar = tqdm(total=len(settings) * args.rate_steps + (args.rate_steps if larger_target else 0),
               desc="tune", unit="trial", file=sys.stderr)

    def progress(trial: search.Trial) -> None:
        bar.set_postfix_str(f"{trial.setting.label} @ {trial.rate:.2f} req/s: {'met' if trial.meets else 'missed'}")
        bar.update(1)

    results = []
    for setting in settings:
        result = trials.run_setting(target, setting, load, objective, start_rate=start_rate, steps=args.rate_steps,
                                    trial_requests=args.trial_requests, log_dir=log_dir, on_trial=progress)
        bar.update(args.rate_steps - len(result.trials))  # skipped or stopped early
        results.append(result)
    advice = search.recommend(results, results[0], peak)
    larger_results = []
    if larger_target is not None and advice.best is not None:
        best = advice.best
        larger_results.append(trials.run_setting(
            larger_target, best.setting, load, objective, start_rate=best.first_missed_rate or best.capacity,
            steps=args.rate_steps, trial_requests=args.trial_requests, log_dir=log_dir, on_trial=progress))
        advice = search.recommend(results, results[0], peak, larger_results)
    bar.close()

    summary = {"description": load.describe(), "requests": len(load.requests), "peak_rate_rps": peak}
    if args.plot:
        report.plot(results, objective, advice, Path(args.plot), load.name)
    if args.output == "json":
        print(report.to_json(summary, objective, results, larger_results, advice))
    elif args.output == "patch":
        if advice.best is None:
            print("fleetserve tune: no setting met the objective; nothing to patch\n" + report.advice_text(advice),
                  file=sys.stderr)
            return 1
        print(report.patch_yaml(advice), end="")
    else:
        print(report.table(results + larger_results, objective))
        print()
        print(report.advice_text(advice))
    print(f"server logs: {log_dir}", file=sys.stderr)
    return 0 if advice.best is not None else 1
