"""Does the output-quality signal separate a damaged model from a healthy one, where latency does not?

Two real `fleetserve serve` processes on the builtin model, side by side: arm A as configured (default
`--quantization none`), arm B damaged (default: a wrong chat template, `--chat-template` with plain
"role: content" lines instead of the model's role markers; `--arm-b=--quantization=fp4` for a coarse
quantization instead). The same chat requests (same prompts, same seeds, sampled at
`--temperature`) go to both, interleaved batch by batch so both see the same machine load. Afterwards
each server's own /metrics is read — exactly what Prometheus would scrape — and the script prints, per arm:
the median and p10/p90 of the per-request mean token NLL (`fleetserve_output_token_nll_nats`, bucket
interpolation as histogram_quantile does it), the mean NLL and entropy (`_sum / _count`), the share of
requests cut at max_tokens, mean output tokens, and the latency histograms' means (TTFT, TPOT).

    .venv/bin/python benchmarks/output_drift.py --requests 48 --out benchmarks/results/output_drift.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "server"))
from fleetserve_server.bench.launch import fleetserve_argv, free_port, start_server  # noqa: E402

TOPICS = ["the ocean", "a small town", "winter mornings", "bread baking", "the moon", "old trains", "a lost key",
          "learning to swim", "city gardens", "a thunderstorm", "chess", "honey bees", "a library", "mountain roads",
          "the first computer", "autumn leaves"]
ASKS = ["Write two sentences about {}.", "Explain {} to a child in a short paragraph.",
        "Give three facts about {}.", "Describe {} in the style of a travel guide."]


# What a deployment that lost the model's chat template might render: the roles as plain words, none of
# the model's own markers (SmolLM2's <|im_start|>role ... <|im_end|>).
WRONG_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant:{% endif %}")


def prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(ASKS).format(rng.choice(TOPICS)) for _ in range(n)]


def histogram(families: dict[str, Any], name: str) -> tuple[list[tuple[float, float]], float, float]:
    """(cumulative buckets [(le, count)], sum, count) of a histogram family (one model)."""
    buckets, total, count = [], 0.0, 0.0
    for s in families[name].samples:
        if s.name == name + "_bucket":
            buckets.append((float(s.labels["le"]), s.value))
        elif s.name == name + "_sum":
            total = s.value
        elif s.name == name + "_count":
            count = s.value
    return sorted(buckets), total, count


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """histogram_quantile's linear interpolation inside the bucket that holds rank q * count."""
    count = buckets[-1][1]
    if count == 0:
        return None
    rank = q * count
    prev_le, prev_count = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_count) / (c - prev_count) if c > prev_count else 0.0)
        prev_le, prev_count = le, c
    return prev_le


def summarize(url: str) -> dict[str, Any]:
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text)}
    out: dict[str, Any] = {}
    nll_b, nll_sum, nll_n = histogram(families, "fleetserve_output_token_nll_nats")
    out.update(requests=nll_n, nll_mean=nll_sum / nll_n if nll_n else None, nll_p10=quantile(0.1, nll_b),
               nll_median=quantile(0.5, nll_b), nll_p90=quantile(0.9, nll_b),
               nll_buckets={str(le): c for le, c in nll_b})
    _, ent_sum, ent_n = histogram(families, "fleetserve_output_mean_token_entropy_nats")
    _, tok_sum, tok_n = histogram(families, "fleetserve_output_tokens")
    cut = sum(s.value for s in families["fleetserve_requests_max_tokens"].samples
              if s.name == "fleetserve_requests_max_tokens_total")
    out.update(entropy_mean=ent_sum / ent_n if ent_n else None, output_tokens_mean=tok_sum / tok_n if tok_n else None,
               max_tokens_share=cut / tok_n if tok_n else None)
    for key, name in (("ttft", "fleetserve_time_to_first_token_seconds"),
                      ("tpot", "fleetserve_time_per_output_token_seconds"),
                      ("e2e", "fleetserve_e2e_request_latency_seconds")):
        b, total, n = histogram(families, name)
        out[f"{key}_mean_s"] = total / n if n else None
        out[f"{key}_median_s"] = quantile(0.5, b)
    return out


async def one(client: httpx.AsyncClient, url: str, prompt: str, seed: int, args: argparse.Namespace) -> None:
    body = {"model": args.served_name[url], "messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens,
            "temperature": args.temperature, "seed": seed}
    r = await client.post(url + "/v1/chat/completions", json=body)
    if r.status_code != 200:
        raise RuntimeError(f"{url}: {r.status_code} {r.text[:500]}")


async def drive(urls: list[str], args: argparse.Namespace) -> None:
    texts = prompts(args.requests, args.seed)
    async with httpx.AsyncClient(timeout=600) as client:
        for start in range(0, len(texts), args.concurrency):
            batch = list(enumerate(texts))[start : start + args.concurrency]
            order = urls if (start // args.concurrency) % 2 == 0 else urls[::-1]  # A B, then B A, ...
            for url in order:
                await asyncio.gather(*(one(client, url, p, args.seed + i, args) for i, p in batch))
            print(f"  {min(start + args.concurrency, len(texts))}/{len(texts)} prompts on both arms", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--arm-a", default="--quantization=none", help="server flags of arm A (space-separated)")
    ap.add_argument("--arm-b", default="wrong-template",
                    help="server flags of arm B, the damaged one; 'wrong-template' (default): --chat-template with "
                         "a plain 'role: content' template that drops the model's own role markers; e.g. "
                         "'--quantization=fp4' for a coarse quantization")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per server")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--log-dir", type=Path, default=Path("/tmp/fleetserve-output-drift"))
    args = ap.parse_args()
    if args.arm_b == "wrong-template":
        args.log_dir.mkdir(parents=True, exist_ok=True)
        template = args.log_dir / "wrong-template.jinja"
        template.write_text(WRONG_TEMPLATE)
        args.arm_b = f"--chat-template={template}"
    arms = {"A": args.arm_a.split(), "B": args.arm_b.split()}
    servers = {}
    try:
        for name, flags in arms.items():
            port = free_port()
            extra = ["--device", "cpu", f"--threads={args.threads}", "--kv-cache-tokens=8192", *flags]
            t0 = time.time()
            servers[name] = start_server(f"drift-{name}", fleetserve_argv(args.model, port, extra), port=port,
                                         ready_path="/ready", log_dir=args.log_dir)
            print(f"arm {name} ({' '.join(flags)}) ready in {time.time() - t0:.0f} s", flush=True)
        # No separate warm-up: the server warms up before /ready, and both arms' first batches are alike.
        args.served_name = {s.base_url: httpx.get(s.base_url + "/v1/models", timeout=30).json()["data"][0]["id"]
                            for s in servers.values()}
        asyncio.run(drive([servers["A"].base_url, servers["B"].base_url], args))
        result = {name: {"flags": arms[name], **summarize(servers[name].base_url)} for name in arms}
    finally:
        for s in servers.values():
            s.stop()
    a, b = result["A"], result["B"]
    result["ratio_b_over_a"] = {k: (b[k] / a[k] if a.get(k) and b.get(k) is not None else None)
                                for k in ("nll_median", "nll_mean", "entropy_mean", "ttft_mean_s", "tpot_mean_s",
                                          "e2e_mean_s", "output_tokens_mean")}
    result["settings"] = {k: str(v) for k, v in vars(args).items() if k != "served_name"}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
