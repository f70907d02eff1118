"""`fleetserve tune` end to end: a real server's JSON request log is the workload, the tuner starts real
servers with each setting and replays that workload's lengths (exactly: ignore_eos) and arrivals; the
planner's verdict skips a setting that cannot fit before any server starts. About 2 minutes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from fleetserve_server.bench.launch import ServerProcess
from serve_util import MODEL, openai_client, server_factory, tiny_model  # noqa: F401 - fixtures

PROMPTS = [("one two three four five", 6), ("the quick brown fox jumps over the lazy dog " * 3, 9),
           ("hello", 4), ("a b c d e f g h i j k l m n o p", 12), ("what is the time", 5)]


def tune(model: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleetserve_cli.main", "tune", "--model", str(model),
                           "--device", "cpu", "--threads", "1", "--max-model-len", "256", "--ttft-p99", "5",
                           "--tpot-p99", "1", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_tune_replays_a_recorded_log_against_real_servers(server_factory, tiny_model: Path,  # noqa: F811
                                                          tmp_path: Path) -> None:
    proc: ServerProcess = server_factory()
    client = openai_client(proc)
    for prompt, max_tokens in PROMPTS:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0)
        time.sleep(0.3)
    proc.stop()
    log = proc.log_path.read_text()
    recorded = [json.loads(line[line.index("{"):]) for line in log.splitlines()
                if '"request_finished"' in line]
    assert len(recorded) == len(PROMPTS), log[-2000:]

    out = tune(tiny_model, "--from-log", str(proc.log_path), "--log-model", MODEL, "--device-memory", "1100Mi",
               "--max-num-seqs", "4", "--kv-cache-memory-fraction", "0.9,0.0001", "--rate-steps", "3",
               "--trial-requests", "5", "--output", "json", "--log-dir", str(tmp_path / "logs"),
               "--plot", str(tmp_path / "frontier.png"))
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["workload"]["requests"] == len(PROMPTS)
    by_label = {(r["setting"]["maxNumSeqs"], r["setting"]["kvCacheMemoryFraction"]): r for r in report["results"]}
    assert set(by_label) == {(32, 0.9), (4, 0.9), (4, 0.0001)}  # the default first, then the grid
    assert report["results"][0]["setting"]["maxNumSeqs"] == 32
    unfit = by_label[(4, 0.0001)]
    assert not unfit["fits"] and unfit["trials"] == [] and "does not fit" in unfit["plan"], unfit["plan"]
    want_prompt = sum(r["prompt_tokens"] for r in recorded)
    want_output = sum(r["completion_tokens"] for r in recorded)
    for key in ((32, 0.9), (4, 0.9)):
        r = by_label[key]
        assert r["fits"] and r["error"] is None and 1 <= len(r["trials"]) <= 3, r
        for trial in r["trials"]:
            s = trial["summary"]
            assert s["failures"] == 0 and s["requests"] == len(PROMPTS), s
            # The replay sent the recorded lengths exactly: the same prompt and output tokens.
            assert (s["total_prompt_tokens"], s["total_output_tokens"]) == (want_prompt, want_output), s
            # Every trial (the later ones run on the same server) sends prompts the server has not seen:
            # a repeated replay would be served from the prefix cache and look faster than it is.
            assert s["cached_prompt_tokens"] == 0, s
            # Each request's [arrival, TTFT, e2e], in arrival order: what the sustained-rate rule reads.
            rows = s["per_request_s"]
            assert len(rows) == len(PROMPTS) and rows[0][0] == 0.0, rows
            assert [a for a, _, _ in rows] == sorted(a for a, _, _ in rows), rows
            # (TTFT None: every token the tiny model sent decoded to empty text, so the client saw none.)
            assert all(ttft is None or 0 < ttft <= e2e for _, ttft, e2e in rows), rows
            assert sum(ttft is not None for _, ttft, _ in rows) >= 2, rows
            assert trial["served_rps"] > 0 and isinstance(trial["sustained"], bool), trial
        assert r["capacity_rps"] > 0  # a 5 s TTFT bound on a tiny model: met
    assert report["advice"]["best"] is not None and report["advice"]["replicas_best"] >= 1
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
    assert "tune:" in out.stderr  # the progress bar

    patch = tune(tiny_model, "--from-log", str(proc.log_path), "--device-memory", "1100Mi", "--max-num-seqs", "4",
                 "--rate-steps", "1", "--trial-requests", "3", "--output", "patch")
    assert patch.returncode == 0, patch.stderr[-3000:]
    spec = yaml.safe_load(patch.stdout)["spec"]
    assert spec["quantization"] == "none" and spec["engine"]["maxNumSeqs"] in (4, 32)
    assert spec["replicas"] == spec["autoscaling"]["maxReplicas"] >= 1
