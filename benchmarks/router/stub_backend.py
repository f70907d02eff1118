"""A fast stub of a fleetserve server for the router-overhead benchmark (no model, answers at once).

    .venv/bin/python benchmarks/router/stub_backend.py --port 19801

It speaks just enough of the server's HTTP surface for the router to treat it as a replica:
``/ready``, ``/health``, ``/metrics`` (requests running, KV usage 0), ``/v1/models`` and
``/v1/chat/completions`` / ``/v1/completions`` (a fixed short answer, streamed as SSE when asked),
with the ``x-fleetserve-cached-tokens`` and ``x-fleetserve-cache-epoch`` headers. Every answer
costs the same few hundred microseconds, so what a client measures through the router minus what it
measures against the stub directly is the router's own cost.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid

from aiohttp import web

EPOCH = uuid.uuid4().hex[:12]
HEADERS = {"x-fleetserve-cached-tokens": "0", "x-fleetserve-cache-epoch": EPOCH}


class Stub:
    def __init__(self) -> None:
        self.running = 0
        self.served = 0

    async def ready(self, _: web.Request) -> web.Response:
        return web.Response(text="ready", headers={"x-fleetserve-cache-epoch": EPOCH})

    async def metrics(self, _: web.Request) -> web.Response:
        text = (f"fleetserve_requests_running {self.running}\nfleetserve_requests_waiting 0\n"
                f"fleetserve_kv_cache_usage_ratio 0.0\n")
        return web.Response(text=text, content_type="text/plain", headers={"x-fleetserve-cache-epoch": EPOCH})

    async def models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "stub", "object": "model", "owned_by": "stub"}]})

    async def complete(self, request: web.Request) -> web.StreamResponse:
        self.running += 1
        try:
            body = await request.json()
            self.served += 1
            created = int(time.time())
            chat = request.path.endswith("/chat/completions")
            usage = {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10}
            if not body.get("stream"):
                choice: dict = {"index": 0, "finish_reason": "stop"}
                choice.update({"message": {"role": "assistant", "content": "ok"}} if chat else {"text": "ok"})
                return web.json_response({"id": "cmpl-stub", "object": "chat.completion" if chat else "text_completion",
                                          "created": created, "model": "stub", "choices": [choice], "usage": usage},
                                         headers=HEADERS)
            resp = web.StreamResponse(headers={**HEADERS, "content-type": "text/event-stream"})
            await resp.prepare(request)
            for piece, finish in (("o", None), ("k", "stop")):
                part = {"delta": {"content": piece}} if chat else {"text": piece}
                chunk = {"id": "cmpl-stub", "object": "chat.completion.chunk" if chat else "text_completion",
                         "created": created, "model": "stub",
                         "choices": [{"index": 0, **part, "finish_reason": finish}]}
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if (body.get("stream_options") or {}).get("include_usage"):
                await resp.write(f"data: {json.dumps({'id': 'cmpl-stub', 'choices': [], 'usage': usage})}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        finally:
            self.running -= 1


def build_app() -> web.Application:
    stub = Stub()
    app = web.Application()
    app.add_routes([web.get("/ready", stub.ready), web.get("/health", stub.ready), web.get("/metrics", stub.metrics),
                    web.get("/v1/models", stub.models), web.post("/v1/chat/completions", stub.complete),
                    web.post("/v1/completions", stub.complete)])
    return app


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(build_app(), host=args.host, port=args.port, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
