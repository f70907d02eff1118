"""The load generator behind `fleetserve bench serve`: workloads, arrivals, per-request timings, summaries.

Every request is a streamed chat completion through the official ``openai``
client, so the numbers are what a real client sees: TTFT is the time to the
first content chunk, TPOT the mean gap between later tokens, e2e the time to
``[DONE]``. Token counts come from the server's ``usage`` (``include_usage``)
when it reports them, else from the number of content chunks.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

# Common short English words: most BPE vocabularies spend one token on each
# (with its leading space), so N words is close to N prompt tokens.
_WORDS = (
    "time year people way day man thing woman life child world school state family student group "
    "country problem hand part place case week company system program question work government number "
    "night point home water room mother area money story fact month lot right study book eye job word "
    "business issue side kind head house service friend father power hour game line end member law car "
    "city community name president team minute idea kid body information back parent face others level "
    "office door health person art war history party result change morning reason research girl guy "
    "moment air teacher force education"
).split()


@dataclass
class Conversation:
    """A sequence of user turns; each turn is sent with the whole history before it."""

    system: str
    user_turns: list[str]
    output_len: int


@dataclass
class RequestResult:
    conversation: int
    turn: int
    ok: bool
    start: float
    ttft: float | None = None
    e2e: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def random_dataset(num_prompts: int, input_len: int, output_len: int, seed: int) -> list[Conversation]:
    """Independent single-turn chats of ~input_len prompt tokens (distinct prefixes: no cache reuse)."""
    rng = random.Random(seed)
    return [Conversation(system="", user_turns=[f"{i}: " + _words(rng, max(1, input_len - 12))],
                         output_len=output_len) for i in range(num_prompts)]


def multiturn_dataset(num_conversations: int, turns: int, input_len: int, output_len: int,
                      seed: int) -> list[Conversation]:
    """Conversations sharing one long system prompt; later turns resend the history (prefix cache food)."""
    rng = random.Random(seed)
    system = "You are a helpful assistant. Context: " + _words(rng, max(1, input_len // 2))
    per_turn = max(1, input_len // 2 // max(1, turns))
    return [Conversation(system=system, user_turns=[f"({c}.{t}) " + _words(rng, per_turn) for t in range(turns)],
                         output_len=output_len) for c in range(num_conversations)]


async def _one_request(client: Any, model: str, messages: list[dict[str, str]], output_len: int,
                       conversation: int, turn: int, timeout: float,
                       extra_body: dict[str, Any]) -> tuple[RequestResult, str]:
    start = time.perf_counter()
    result = RequestResult(conversation=conversation, turn=turn, ok=False, start=start)
    pieces: list[str] = []
    chunks = 0
    try:
        stream = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=output_len, temperature=0.0, stream=True,
            stream_options={"include_usage": True}, extra_body=extra_body, timeout=timeout)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta and chunk.choices[0].delta.content:
                if result.ttft is None:
                    result.ttft = time.perf_counter() - start
                pieces.append(chunk.choices[0].delta.content)
                chunks += 1
            if getattr(chunk, "usage", None):
                result.prompt_tokens = chunk.usage.prompt_tokens
                result.output_tokens = chunk.usage.completion_tokens
                details = getattr(chunk.usage, "prompt_tokens_details", None)
                cached = getattr(details, "cached_tokens", None) if details is not None else None
                result.cached_tokens = int(cached or 0)
        result.e2e = time.perf_counter() - start
        result.output_tokens = result.output_tokens or chunks
        result.ok = True
    except Exception as exc:  # every failure is a data point, not a crash of the benchmark
        result.error = f"{type(exc).__name__}: {exc}"[:300]
        result.e2e = time.perf_counter() - start
    return result, "".join(pieces)


async def run_workload(
    *,
    base_url: str,
    model: str,
    conversations: Sequence[Conversation],
    request_rate: float,
    concurrency: int,
    api_key: str | None = None,
    seed: int = 0,
    timeout: float = 600.0,
    extra_body: dict[str, Any] | None = None,
    fresh_connections: bool = False,
) -> tuple[list[RequestResult], float]:
    """Start conversations at Poisson arrivals (``request_rate`` per s, or all at once for inf),
    at most ``concurrency`` requests in flight. Returns the results and the wall time.

    ``extra_body`` carries the server-specific way to force exactly ``output_len``
    tokens (``ignore_eos`` for vLLM-style servers), so every server does the same work.
    ``fresh_connections``: every request on a TCP connection of its own (the client keeps no idle
    connection). Many users behind a gateway do not share a keep-alive connection per conversation;
    with the pool, a conversation's next turn reuses its previous answer's connection, and a Service
    balanced per connection (kube-proxy) sends it to the same replica.
    """
    from openai import AsyncOpenAI

    rng = random.Random(seed)
    http = None
    if fresh_connections:
        import httpx2  # the HTTP client the openai SDK is built on here

        http = httpx2.AsyncClient(limits=httpx2.Limits(max_connections=1000, max_keepalive_connections=0),
                                  timeout=timeout, trust_env=False)
    # The SDK's own connection pool (up to 1000 connections) is larger than any --concurrency here.
    client = AsyncOpenAI(base_url=base_url, api_key=api_key or "none", max_retries=0, timeout=timeout,
                         http_client=http)
    gate = asyncio.Semaphore(concurrency)
    results: list[RequestResult] = []

    async def converse(index: int, conv: Conversation) -> None:
        history: list[dict[str, str]] = [{"role": "system", "content": conv.system}] if conv.system else []
        for turn, text in enumerate(conv.user_turns):
            history.append({"role": "user", "content": text})
            async with gate:
                result, reply = await _one_request(client, model, history, conv.output_len, index, turn, timeout,
                                                   extra_body or {})
            results.append(result)
            if not result.ok:
                return
            history.append({"role": "assistant", "content": reply})

    started = time.perf_counter()
    tasks = []
    for index, conv in enumerate(conversations):
        tasks.append(asyncio.create_task(converse(index, conv)))
        if math.isfinite(request_rate) and request_rate > 0:
            await asyncio.sleep(rng.expovariate(request_rate))
    await asyncio.gather(*tasks)
    duration = time.perf_counter() - started
    await client.close()
    if http is not None:
        await http.aclose()
    return results, duration


def percentiles(values: Sequence[float], ps: Sequence[int] = (50, 90, 99)) -> dict[str, float | None]:
    """Nearest-rank percentiles (None when there is no data)."""
    ordered = sorted(values)
    out: dict[str, float | None] = {}
    for p in ps:
        out[f"p{p}"] = ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))] \
            if ordered else None
    return out


@dataclass
class Summary:
    name: str
    requests: int
    failures: int
    duration_s: float
    request_throughput: float
    output_throughput: float
    total_output_tokens: int
    total_prompt_tokens: int
    ttft_s: dict[str, float | None]
    tpot_s: dict[str, float | None]
    e2e_s: dict[str, float | None]
    ttft_by_turn_p50_s: dict[int, float | None] = field(default_factory=dict)
    prefix_cache_hit_rate: float | None = None
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(name: str, results: Sequence[RequestResult], duration: float,
              prefix_hit_rate: float | None = None) -> Summary:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    turns = sorted({r.turn for r in ok})
    return Summary(
        name=name, requests=len(results), failures=len(results) - len(ok), duration_s=round(duration, 3),
        request_throughput=len(ok) / duration if duration else 0.0,
        output_throughput=out_tokens / duration if duration else 0.0,
        total_output_tokens=out_tokens, total_prompt_tokens=sum(r.prompt_tokens for r in ok),
        ttft_s=percentiles([r.ttft for r in ok if r.ttft is not None]),
        tpot_s=percentiles([t for r in ok if (t := r.tpot) is not None]),
        e2e_s=percentiles([r.e2e for r in ok if r.e2e is not None]),
        ttft_by_turn_p50_s={t: percentiles([r.ttft for r in ok if r.turn == t and r.ttft is not None])["p50"]
                            for t in turns} if len(turns) > 1 else {},
        prefix_cache_hit_rate=prefix_hit_rate,
        errors=sorted({r.error for r in results if r.error})[:5],
    )


def format_table(summaries: Sequence[Summary]) -> str:
    """A fixed-width comparison table (one row per server)."""
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.0f}"

    header = (f"{'server':<22} {'ok/total':>9} {'req/s':>7} {'out tok/s':>10} "
              f"{'TTFT p50/p90/p99 ms':>22} {'TPOT p50/p90/p99 ms':>21} {'e2e p50/p90/p99 s':>20}")
    rows = [header, "-" * len(header)]
    for s in summaries:
        e2e = "/".join("-" if s.e2e_s[k] is None else f"{s.e2e_s[k]:.1f}" for k in ("p50", "p90", "p99"))
        rows.append(
            f"{s.name:<22} {s.requests - s.failures:>4}/{s.requests:<4} {s.request_throughput:>7.2f} "
            f"{s.output_throughput:>10.1f} "
            f"{'/'.join(ms(s.ttft_s[k]) for k in ('p50', 'p90', 'p99')):>22} "
            f"{'/'.join(ms(s.tpot_s[k]) for k in ('p50', 'p90', 'p99')):>21} {e2e:>20}")
        if s.ttft_by_turn_p50_s:
            turns = ", ".join(f"turn {t}: {ms(v)} ms" for t, v in s.ttft_by_turn_p50_s.items())
            rows.append(f"{'':<22} TTFT p50 by turn: {turns}")
        if s.prefix_cache_hit_rate is not None:
            rows.append(f"{'':<22} prefix cache hit rate: {s.prefix_cache_hit_rate:.1%}")
        for err in s.errors:
            rows.append(f"{'':<22} error: {err}")
    return "\n".join(rows)
