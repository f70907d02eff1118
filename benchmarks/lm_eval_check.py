"""lm-eval-harness against `fleetserve serve` (model type ``local-completions``) and against lm-eval's own
Hugging Face backend (``hf``) on the same weights, on the local tasks in benchmarks/lm_eval/.

    .venv/bin/python benchmarks/lm_eval_check.py                      # all three tasks, full
    .venv/bin/python benchmarks/lm_eval_check.py --tasks fleetserve_mcq --limit 20

The server is the builtin model (or ``--model``) on CPU on a free loopback port. lm-eval tokenizes with
the model directory's tokenizer (``tokenizer_backend=huggingface``) and sends token ids
(``tokenized_requests``), ``--batch-size`` prompts per /v1/completions request; loglikelihood requests
are ``echo: true, logprobs: 1, max_tokens: 1`` (it reads the prompt's token logprobs), generate_until
requests greedy completions with ``stop``. Prints one row per task and metric with both backends' scores
in points (percent) and exits 1 when any pair differs by more than ``--tolerance`` points.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from fleetserve_server.bench.launch import ServerProcess, fleetserve_argv, free_port, start_server
from fleetserve_server.runner.builtin import DEFAULT_MODEL, resolve_model

TASK_DIR = Path(__file__).resolve().parent / "lm_eval"
DEFAULT_TASKS = ["fleetserve_mcq", "fleetserve_mcq_letter", "fleetserve_short_answer"]
# metric keys lm-eval reports, per output type (the filter name follows the comma)
METRICS = ("acc,none", "acc_norm,none", "exact_match,none", "exact_match,letter")


def start_fleetserve(model: str, log_dir: Path, *flags: str, env: dict[str, str] | None = None) -> ServerProcess:
    """`fleetserve serve --model MODEL --device cpu` on a free loopback port, ready when this returns."""
    port = free_port()
    argv = fleetserve_argv(model, port, ["--device", "cpu", "--log-format", "json", *flags])
    return start_server(f"fleetserve-lm-eval-{port}", argv, port=port, ready_path="/ready", log_dir=log_dir,
                        timeout=600, env={"FLEETSERVE_API_KEY": "", **(env or {})})


def run_lm_eval(model_type: str, model_args: dict[str, Any], tasks: list[str], *, limit: int | None,
                batch_size: int | str = 1, log_samples: bool = False) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on the local tasks (its results dict, with per-question samples if asked)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model=model_type, model_args=model_args, tasks=tasks, limit=limit, batch_size=batch_size,
        task_manager=TaskManager(include_path=str(TASK_DIR)), log_samples=log_samples, bootstrap_iters=0,
    )
    assert results is not None, "lm-eval returned no results"
    return results


def scores(results: dict[str, Any], tasks: list[str]) -> dict[str, dict[str, float]]:
    """{task: {metric: value in points (percent)}}."""
    return {task: {metric: 100.0 * float(values[metric]) for metric in METRICS if metric in values}
            for task, values in results["results"].items() if task in tasks}


def answers(results: dict[str, Any], task: str) -> dict[int, list[Any]]:
    """Per question: the model's raw answers (multiple choice: (loglikelihood, is_greedy) per choice;
    generate_until: the generated text)."""
    return {s["doc_id"]: [tuple(r[0]) if isinstance(r[0], list | tuple) else r[0] for r in s["resps"]]
            for s in results["samples"][task]}


def fleetserve_model_args(server: ServerProcess, served_name: str, tokenizer: Path, *,
                          num_concurrent: int = 1, tokenized_requests: bool = True) -> dict[str, Any]:
    """``local-completions`` against ``server``; ``tokenized_requests=False`` sends text prompts (the
    server tokenizes), otherwise token ids from the model directory's tokenizer."""
    return {
        "base_url": server.base_url + "/v1/completions",
        "model": served_name,
        "tokenizer": str(tokenizer),
        "tokenizer_backend": "huggingface",
        "tokenized_requests": tokenized_requests,
        "num_concurrent": num_concurrent,
        "max_retries": 1,  # an error is a finding here, not something to retry past
        "timeout": 600,
    }


def hf_model_args(path: Path) -> dict[str, Any]:
    return {"pretrained": str(path), "dtype": "float32", "device": "cpu"}


def compare(fleetserve: dict[str, dict[str, float]], hf: dict[str, dict[str, float]]
            ) -> list[tuple[str, str, float, float, float]]:
    """Rows (task, metric, fleetserve, hf, |difference|) for every metric both backends report."""
    rows = []
    for task in sorted(hf):
        for metric, hf_value in hf[task].items():
            ours = fleetserve.get(task, {}).get(metric)
            if ours is None:
                raise AssertionError(f"fleetserve's run reported no {metric} for {task}: {fleetserve}")
            rows.append((task, metric, ours, hf_value, abs(ours - hf_value)))
    return rows


def format_table(rows: list[tuple[str, str, float, float, float]], counts: dict[str, int]) -> str:
    lines = ["| task | questions | metric | fleetserve (local-completions) | lm-eval hf | difference |",
             "| --- | ---: | --- | ---: | ---: | ---: |"]
    for task, metric, ours, theirs, diff in rows:
        lines.append(f"| {task} | {counts.get(task, '?')} | {metric.replace(',none', '')} | {ours:.1f} | "
                     f"{theirs:.1f} | {diff:.1f} |")
    return "\n".join(lines)


def task_sizes(tasks: list[str], limit: int | None) -> dict[str, int]:
    sizes = {"fleetserve_mcq": 50, "fleetserve_mcq_letter": 50, "fleetserve_short_answer": 20}
    return {t: min(sizes.get(t, 0), limit) if limit else sizes.get(t, 0) for t in tasks}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model spec, as for `fleetserve serve --model`")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated local task names")
    parser.add_argument("--limit", type=int, default=None, help="first N questions of each task")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per request / hf batch")
    parser.add_argument("--num-concurrent", type=int, default=1, help="requests in flight (local-completions)")
    parser.add_argument("--threads", type=int, default=None, help="the server's --threads")
    parser.add_argument("--tolerance", type=float, default=1.0, help="largest allowed difference, in points")
    parser.add_argument("--log-dir", type=Path, default=Path("benchmarks/out/lm_eval"), help="server logs")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    tasks = [t for t in args.tasks.split(",") if t]
    resolved = resolve_model(args.model, progress=False)

    flags = ["--threads", str(args.threads)] if args.threads else []
    started = time.monotonic()
    server = start_fleetserve(args.model, args.log_dir, *flags)
    try:
        ours = scores(run_lm_eval("local-completions",
                                  fleetserve_model_args(server, resolved.served_name, resolved.path,
                                                        num_concurrent=args.num_concurrent),
                                  tasks, limit=args.limit, batch_size=args.batch_size), tasks)
    finally:
        code = server.stop()
    fleetserve_seconds = time.monotonic() - started
    if code != 0:
        print(f"fleetserve serve exited with {code}; log: {server.log_path}", file=sys.stderr)
        return 2
    started = time.monotonic()
    theirs = scores(run_lm_eval("hf", hf_model_args(resolved.path), tasks, limit=args.limit,
                                batch_size=args.batch_size), tasks)
    hf_seconds = time.monotonic() - started

    rows = compare(ours, theirs)
    print(f"\nmodel {args.model} ({resolved.path}), lm-eval local-completions against fleetserve serve "
          f"(CPU, batch {args.batch_size}, {args.num_concurrent} in flight) vs lm-eval hf (float32, CPU)")
    print(format_table(rows, task_sizes(tasks, args.limit)))
    print(f"\nwall time: fleetserve {fleetserve_seconds:.0f} s (incl. server start), hf {hf_seconds:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "rows": rows, "fleetserve_seconds": fleetserve_seconds,
                                         "hf_seconds": hf_seconds}, indent=2))
    worst = max((r[4] for r in rows), default=0.0)
    if worst > args.tolerance:
        print(f"FAIL: a score differs by {worst:.1f} points (> {args.tolerance})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
