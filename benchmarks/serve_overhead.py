"""CPU that `fleetserve serve` spends per streamed token outside the model forward.

    .venv/bin/python benchmarks/serve_overhead.py --streams 32 --output-len 64

The real HTTP app, ``AsyncEngine`` and ``LLMEngine`` (scheduler, block manager,
detokenizer with the builtin model's tokenizer) behind uvicorn on loopback;
only the forward is the engine's ``ToyModelRunner``, which sleeps
``--forward-ms`` per step (releasing the GIL, as torch does) instead of
computing. ``--streams`` streamed chat completions (``ignore_eos``) arrive at
once. Reports the CPU time of the event-loop thread (routing, SSE framing,
uvicorn) per token, and that of the engine thread outside the runner per step.
Both compete with the model forward for the same cores (and the GIL), so on a
2-core machine every millisecond here is a millisecond less of matmul.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from typing import Any

import httpx
import uvicorn
from fleetserve_server.api.app import app_context, attach, create_app
from fleetserve_server.api.state import ModelInfo
from fleetserve_server.bench.launch import free_port
from fleetserve_server.bench.loadgen import random_dataset
from fleetserve_server.engine.async_engine import AsyncEngine
from fleetserve_server.engine.config import EngineConfig
from fleetserve_server.engine.interfaces import ScheduledBatch
from fleetserve_server.engine.llm_engine import LLMEngine
from fleetserve_server.engine.toy import ToyModelRunner


class _TimedRunner(ToyModelRunner):
    """The toy runner, counting its own thread CPU so that it can be subtracted."""

    cpu_s = 0.0

    def execute(self, batch: ScheduledBatch) -> dict[int, int]:
        start = time.thread_time()
        try:
            return super().execute(batch)
        finally:
            self.cpu_s += time.thread_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct", help="whose tokenizer to use")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--forward-ms", type=float, default=20.0)
    args = parser.parse_args()

    from fleetserve_server.runner.builtin import resolve_model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model).path)
    vocab = len(tokenizer)
    config = EngineConfig(max_model_len=2048, num_blocks=2048, max_num_seqs=max(32, args.streams))
    runner = _TimedRunner(config.num_blocks, config.block_size, delay_seconds=args.forward_ms / 1000)
    engine = AsyncEngine(LLMEngine(config, runner, tokenizer, vocab_size=vocab))
    cpu: dict[str, float] = {}

    def timed(name: str, target: Any) -> Any:
        def run() -> None:
            start = time.thread_time()
            target()
            cpu[name] = time.thread_time() - start
        return run

    engine._run = timed("engine", engine._run)  # type: ignore[method-assign]
    engine.start()
    app = create_app(None, served_name="m")
    model = ModelInfo(served_name="m", max_model_len=2048, source=args.model)
    attach(app_context(app), engine, tokenizer, model)
    app_context(app).state.mark_ready()
    port = free_port()
    # the loop and parser `fleetserve serve` runs with (the router's uvloop/httptools would be "auto"'s pick)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                                           loop="asyncio", http="h11"))
    thread = threading.Thread(target=timed("loop", server.run))
    thread.start()
    while not server.started:
        time.sleep(0.02)

    prompts = [c.user_turns[0] for c in random_dataset(args.streams, args.input_len, args.output_len, seed=0)]

    async def one(client: httpx.AsyncClient, prompt: str) -> None:
        body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": args.output_len,
                "temperature": 0, "stream": True, "ignore_eos": True}
        async with client.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for _ in response.aiter_lines():
                pass

    async def drive() -> None:
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=args.streams + 4)) as client:
            await asyncio.gather(*(one(client, p) for p in prompts))

    steps_before = engine.engine.num_steps
    start = time.perf_counter()
    asyncio.run(drive())
    wall = time.perf_counter() - start
    steps = engine.engine.num_steps - steps_before
    server.should_exit = True
    thread.join()
    engine.shutdown()
    tokens = args.streams * args.output_len
    print(f"{args.streams} streams x {args.output_len} tokens, forward {args.forward_ms:g} ms: wall {wall:.2f} s, "
          f"{steps} steps; event-loop thread {cpu['loop'] * 1e6 / tokens:.0f} us CPU per token; engine thread "
          f"outside the forward {(cpu['engine'] - runner.cpu_s) * 1e3 / steps:.2f} ms CPU per step")


if __name__ == "__main__":
    main()
