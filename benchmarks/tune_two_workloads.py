"""`fleetserve tune` on the builtin with two workloads (issue 22 point 4): short chats and long documents.

1. Runs `fleetserve tune` on each workload (JSON report and frontier plot under benchmarks/results/).
2. Confirms each recommendation against the defaults on its own workload: at the recommended
   setting's capacity (the highest rate it met), fresh servers with the default and the recommended
   setting replay the same requests, interleaved A B A B A B; a round counts when the objective holds.

    .venv/bin/python benchmarks/tune_two_workloads.py [--rounds 3] [--only short-chats]
    .venv/bin/python benchmarks/tune_two_workloads.py --only long-documents --skip-tune --confirm-rate 0.1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MODEL = "builtin:smollm2-135m-instruct"
COMMON = ["--model", MODEL, "--device", "cpu", "--threads", "1", "--device-memory", "4Gi", "--max-model-len", "2048",
          "--seed", "1"]
# Objectives (p99 TTFT s, p99 TPOT s): short chats stream to a person (snappy tokens). A long document
# (a summary of a report, say) is sent and then read as it streams: its reader waits half a minute for
# the first token, but the stream must keep up with reading speed (~240 words/min, ~5 tokens/s: 200 ms
# per token), or the reader waits on every line.
OBJECTIVES = {"short-chats": (4.0, 0.17), "long-documents": (30.0, 0.20)}
WORKLOADS = {
    "short-chats": ["--prompt-tokens", "lognormal:80,0.5", "--output-tokens", "lognormal:48,0.4", "--rate", "1.0",
                    "--requests", "48", "--trial-requests", "48", "--start-rate", "2", "--max-num-seqs", "16,32",
                    "--max-batch-tokens", "default,64", "--rate-steps", "3"],
    "long-documents": ["--prompt-tokens", "lognormal:1200,0.25", "--output-tokens", "lognormal:24,0.3",
                       "--rate", "0.2", "--requests", "10", "--trial-requests", "10", "--start-rate", "0.1",
                       # Prefill-bound on one core, ~5-9 s per document: a trial of 10 documents at 0.05 req/s
                       # takes ~3 min, so two rates per setting. maxNumSeqs 1 and 2 keep a second document's
                       # prefill from stalling the first's decode (it waits in the queue instead).
                       "--rate-steps", "2", "--max-num-seqs", "1,2,32"],
}


def tune(name: str, args: list[str]) -> dict:
    out = RESULTS / f"tune-{name}.json"
    ttft, tpot = OBJECTIVES[name]
    cmd = [sys.executable, "-m", "fleetserve_cli.main", "tune", *COMMON, "--ttft-p99", str(ttft), "--tpot-p99", str(tpot),
           *args, "--output", "json",
           "--plot", str(RESULTS / f"tune-{name}.png")]
    print("+", " ".join(cmd), flush=True)
    started = time.monotonic()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode not in (0, 1):
        raise SystemExit(f"fleetserve tune failed ({proc.returncode})")
    report = json.loads(proc.stdout)
    report["wall_s"] = round(time.monotonic() - started, 1)
    report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    out.write_text(json.dumps(report, indent=2))
    print(f"{name}: {report['advice']['notes']} ({report['wall_s']} s)", flush=True)
    return report


def confirm(name: str, args: list[str], report: dict, rounds: int, rate: float | None = None) -> dict:
    from fleetserve_server.memory import parse_quantity
    from fleetserve_server.tune import search, trials, workload

    advice = report["advice"]
    if advice["best"] is None:
        return {"workload": name, "skipped": "no setting met the objective"}
    opts = dict(zip(args[::2], args[1::2], strict=True))
    load = workload.synthetic(prompt=workload.parse_distribution(opts["--prompt-tokens"]),
                              output=workload.parse_distribution(opts["--output-tokens"]),
                              rate=float(opts["--rate"]), requests=int(opts["--requests"]), seed=1).clipped(2048)
    target = trials.Target(MODEL, "cpu", parse_quantity("4Gi"), "4Gi", 2048, threads=1)
    objective = search.Objective(*OBJECTIVES[name])

    def setting(d: dict) -> search.Setting:
        return search.Setting(d["quantization"], d["maxNumSeqs"], d["maxBatchTokens"], d["kvCacheMemoryFraction"])

    arms = {"default": setting(advice["default"]), "recommended": setting(advice["best"])}
    rate = rate or advice["best_capacity_rps"]
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    started = time.monotonic()
    log_dir = Path(tempfile.mkdtemp(prefix=f"tune-confirm-{name}-"))
    for r in range(rounds):
        for arm, s in arms.items():
            res = trials.run_setting(target, s, load, objective, start_rate=rate, steps=1,
                                     trial_requests=len(load.requests), log_dir=log_dir)
            t = res.trials[0]
            runs[arm].append({"meets": t.meets, "reason": t.reason, "ttft_p99_s": t.summary["ttft_s"]["p99"],
                              "tpot_p99_s": t.summary["tpot_s"]["p99"], "output_tok_s": t.summary["output_throughput"],
                              "failures": t.summary["failures"]})
            print(f"{name} round {r + 1}/{rounds} {arm} ({s.label}) @ {rate:.2f} req/s: {runs[arm][-1]}", flush=True)

    def med(arm: str, key: str) -> dict:
        values = [x[key] for x in runs[arm] if x[key] is not None]
        return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else {}

    return {"workload": name, "rate_rps": rate, "wall_s": round(time.monotonic() - started, 1),
            "load_average_end": [round(x, 2) for x in os.getloadavg()], "settings": {a: s.label for a, s in arms.items()},
            "met": {a: sum(x["meets"] for x in runs[a]) for a in arms}, "rounds": rounds,
            "ttft_p99_s": {a: med(a, "ttft_p99_s") for a in arms}, "tpot_p99_s": {a: med(a, "tpot_p99_s") for a in arms},
            "output_tok_s": {a: med(a, "output_tok_s") for a in arms}, "runs": runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=sorted(WORKLOADS), default=None)
    parser.add_argument("--skip-tune", action="store_true", help="reuse benchmarks/results/tune-NAME.json")
    parser.add_argument("--confirm-rate", type=float, default=None,
                        help="offered rate of the confirmation (default: the recommended setting's capacity); "
                             "for a capacity the search only bounded from below (every rate met), a rate it "
                             "measured both settings at")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs, load average {load[0]:.1f} at start", flush=True)
    summary = []
    for name, wargs in WORKLOADS.items():
        if args.only and name != args.only:
            continue
        report = (json.loads((RESULTS / f"tune-{name}.json").read_text()) if args.skip_tune else tune(name, wargs))
        summary.append(confirm(name, wargs, report, args.rounds, args.confirm_rate))
        (RESULTS / f"tune-confirm-{name}.json").write_text(json.dumps(summary[-1], indent=2))
    print(json.dumps([{k: v for k, v in s.items() if k != "runs"} for s in summary], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
