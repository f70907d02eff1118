"""`fleetserve tune` on the builtin with two workloads (issue 22 point 4): short chats and long documents.

1. Runs `fleetserve tune` on each workload (JSON report and frontier plot under benchmarks/results/).
2. Confirms each recommendation against the defaults on its own workload: at the recommended
   setting's capacity (the highest rate it met), fresh servers with the default and the recommended
   setting replay the same requests, interleaved A B A B A B; a round counts when the objective holds.

    .venv/bin/python benchmarks/tune_two_workloads.py [--rounds 3] [--only short-chats]
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
          "--rate-steps", "3", "--seed", "1"]
# Objectives (p99 TTFT s, p99 TPOT s): short chats stream to a person (snappy tokens); long documents
# are read in one piece (the first token is what waits).
OBJECTIVES = {"short-chats": (4.0, 0.17), "long-documents": (10.0, 0.25)}
WORKLOADS = {
    "short-chats": ["--prompt-tokens", "lognormal:80,0.5", "--output-tokens", "lognormal:48,0.4", "--rate", "1.0",
                    "--requests", "48", "--trial-requests", "48", "--start-rate", "2", "--max-num-seqs", "16,32",
                    "--max-batch-tokens", "default,64"],
    "long-documents": ["--prompt-tokens", "lognormal:1200,0.25", "--output-tokens", "lognormal:24,0.3",
                       "--rate", "0.2", "--requests", "6", "--trial-requests", "6", "--start-rate", "0.1",
                       # Prefill-bound on one core: capacities differ by per cents, not by 2x, so the
                       # search bisects further (4 % resolution); maxNumSeqs never binds at these rates.
                       "--rate-steps", "5", "--max-num-seqs", "32", "--max-batch-tokens", "default,1024"],
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
    out.write_text(json.dumps(report, indent=2))
    print(f"{name}: {report['advice']['notes']} ({report['wall_s']} s)", flush=True)
    return report


def confirm(name: str, args: list[str], report: dict, rounds: int) -> dict:
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
    rate = advice["best_capacity_rps"]
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
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

    return {"workload": name, "rate_rps": rate, "settings": {a: s.label for a, s in arms.items()},
            "met": {a: sum(x["meets"] for x in runs[a]) for a in arms}, "rounds": rounds,
            "ttft_p99_s": {a: med(a, "ttft_p99_s") for a in arms}, "tpot_p99_s": {a: med(a, "tpot_p99_s") for a in arms},
            "output_tok_s": {a: med(a, "output_tok_s") for a in arms}, "runs": runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=sorted(WORKLOADS), default=None)
    parser.add_argument("--skip-tune", action="store_true", help="reuse benchmarks/results/tune-NAME.json")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs, load average {load[0]:.1f} at start", flush=True)
    summary = []
    for name, wargs in WORKLOADS.items():
        if args.only and name != args.only:
            continue
        report = (json.loads((RESULTS / f"tune-{name}.json").read_text()) if args.skip_tune else tune(name, wargs))
        summary.append(confirm(name, wargs, report, args.rounds))
        (RESULTS / f"tune-confirm-{name}.json").write_text(json.dumps(summary[-1], indent=2))
    print(json.dumps([{k: v for k, v in s.items() if k != "runs"} for s in summary], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
