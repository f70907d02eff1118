"""The `--baseline naive` server: Hugging Face `generate`, one request at a time, OpenAI-shaped HTTP.

This is what serving looks like without an inference engine: a lock around
``model.generate`` (no batching, no paged KV cache, no prefix reuse), streamed
with ``TextIteratorStreamer``. It speaks just enough of the chat completions
API for the load generator (streaming, ``usage``, ``ignore_eos``).

Run: ``python -m fleetserve_server.bench.naive_server --model SPEC --port P``.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request`
# class on the route functions, which are defined inside build_app.
import argparse
import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any


def build_app(model_spec: str, threads: int | None = None) -> Any:
    import torch
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

    from fleetserve_server.runner.builtin import resolve_model

    if threads:
        torch.set_num_threads(threads)
    resolved = resolve_model(model_spec)
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch.float32)
    model.eval()
    lock = threading.Lock()  # one generate() at a time: the point of this baseline
    app = FastAPI(title="naive HF generate server")

    def generate(ids: list[int], max_tokens: int, ignore_eos: bool, streamer: Any) -> list[int]:
        with lock, torch.inference_mode():
            kwargs: dict[str, Any] = {"max_new_tokens": max_tokens, "do_sample": False, "streamer": streamer}
            if ignore_eos:
                kwargs["min_new_tokens"] = max_tokens
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 pad_token_id=tokenizer.eos_token_id, **kwargs)
        return [int(t) for t in out[0, len(ids):]]

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": resolved.served_name, "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        text = tokenizer.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        ignore_eos = bool(body.get("ignore_eos"))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.get("stream"):
            out = await asyncio.to_thread(generate, ids, max_tokens, ignore_eos, None)
            return JSONResponse({
                "id": rid, "object": "chat.completion", "created": created, "model": resolved.served_name,
                "choices": [{"index": 0, "finish_reason": "length",
                             "message": {"role": "assistant",
                                         "content": tokenizer.decode(out, skip_special_tokens=True)}}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(out),
                          "total_tokens": len(ids) + len(out)}})
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict[str, list[int]] = {}
        worker = threading.Thread(target=lambda: result.setdefault(
            "out", generate(ids, max_tokens, ignore_eos, streamer)), daemon=True)

        async def events() -> AsyncIterator[str]:
            def chunk(delta: dict[str, Any], finish: str | None = None, usage: Any = None) -> str:
                choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]
                return "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "created": created,
                                              "model": resolved.served_name, "choices": choices,
                                              "usage": usage}) + "\n\n"

            worker.start()
            iterator = iter(streamer)
            while True:
                piece = await asyncio.to_thread(next, iterator, None)
                if piece is None:
                    break
                if piece:
                    yield chunk({"content": piece})
            await asyncio.to_thread(worker.join)
            out = result.get("out", [])
            yield chunk({}, "length")
            yield chunk({}, usage={"prompt_tokens": len(ids), "completion_tokens": len(out),
                                   "total_tokens": len(ids) + len(out)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    # the stock loop and parser named (the router's extra installs uvloop and httptools, which "auto"
    # would pick), so this baseline stays the one BENCHMARKS.md measured
    uvicorn.run(build_app(args.model, args.threads), host=args.host, port=args.port, log_level="warning",
                loop="asyncio", http="h11")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
