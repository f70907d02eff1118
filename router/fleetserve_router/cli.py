"""`fleetserve router`: the prefix-aware router in front of one LLMDeployment's server pods."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Generator
from typing import Any


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--service", metavar="NS/NAME",
                        help="the Service whose EndpointSlices list the server pods (ready endpoints only)")
    parser.add_argument("--endpoints", metavar="HOST:PORT,...",
                        help="a fixed list of servers instead of --service (readiness from their /ready)")
    parser.add_argument("--port-name", default="http", help="the EndpointSlice port to send to (default http)")
    parser.add_argument("--kubeconfig", default=None, help="kubeconfig (default: in-cluster, then ~/.kube/config)")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--hold-timeout", type=float, default=900.0,
                        help="seconds a request may wait for a ready replica (default 900 = 15 min)")
    parser.add_argument("--max-held", type=int, default=1000,
                        help="requests held at once; more get 429 with Retry-After (default 1000)")
    parser.add_argument("--cache-ttl", type=float, default=600.0,
                        help="the servers' cacheTTLSeconds: prefix credit older than this is dropped")
    parser.add_argument("--chunk-chars", type=int, default=64,
                        help="characters per prefix-index chunk (~ one 16-token KV block; default 64)")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="seconds between /metrics scrapes")
    parser.add_argument("--load-factor", type=float, default=1.25,
                        help="bounded load: no replica over this times the mean load (default 1.25)")
    parser.add_argument("--keepalive-seconds", type=float, default=5.0,
                        help="SSE keep-alive comment interval for held streams")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="on SIGTERM, seconds to let in-flight requests finish")
    parser.add_argument("--max-request-bytes", type=int, default=16 << 20)
    parser.set_defaults(handler=run)


def _check(args: argparse.Namespace) -> str | None:
    if (args.service is None) == (args.endpoints is None):
        return "give exactly one of --service NS/NAME and --endpoints HOST:PORT,..."
    if args.service is not None:
        ns, _, name = args.service.partition("/")
        if not ns or not name or "/" in name:
            return f"--service must be NAMESPACE/NAME, got {args.service!r}"
    for name in ("hold_timeout", "cache_ttl", "poll_interval", "keepalive_seconds"):
        if getattr(args, name) <= 0:
            return f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}"
    if args.max_held < 0 or args.chunk_chars < 1 or args.load_factor < 1.0:
        return "--max-held must be >= 0, --chunk-chars >= 1 and --load-factor >= 1"
    return None


def run(args: argparse.Namespace) -> int:
    problem = _check(args)
    if problem:
        print(f"fleetserve router: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    import uvloop

    # uvloop and httptools (below): the router is one process on one core in front of the whole
    # fleet, and the stock loop and h11 parser cost more per request than all its routing does.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(args))


async def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from fleetserve_router.fleet import Fleet
    from fleetserve_router.hold import HoldQueue
    from fleetserve_router.metrics import RouterMetrics
    from fleetserve_router.prefix_index import PrefixIndex
    from fleetserve_router.prompt import CHARS_PER_TOKEN
    from fleetserve_router.proxy import RouterApp, RouterConfig

    log = logging.getLogger("fleetserve.router")
    metrics = RouterMetrics()
    hold = HoldQueue(args.max_held)
    index = PrefixIndex(args.cache_ttl)
    fleet = Fleet(index, hold, metrics, static=args.endpoints is not None, poll_interval=args.poll_interval,
                  load_factor=args.load_factor, chunk_tokens=args.chunk_chars / CHARS_PER_TOKEN)
    watcher: Any = None
    background: list[asyncio.Task[Any]] = []
    if args.endpoints is not None:
        fleet.set_endpoints({e.strip() for e in args.endpoints.split(",") if e.strip()})
    else:
        from fleetserve_router.discovery import KubeAPI, SliceWatcher

        namespace, _, name = args.service.partition("/")
        watcher = SliceWatcher(KubeAPI(args.kubeconfig), namespace, name, fleet.set_endpoints,
                               port_name=args.port_name)
        background.append(asyncio.create_task(watcher.run(), name="endpointslices"))

    def health() -> tuple[bool, str]:
        if watcher is None:
            return True, "ok"
        if background[0].done():
            return False, "the EndpointSlice watch stopped"
        if watcher.last_ok is None or time.monotonic() - watcher.last_ok > 180:
            return False, "no answer from the API server's EndpointSlice watch for 180 s"
        return True, "ok"

    async def expire_loop() -> None:
        while True:
            await asyncio.sleep(min(30.0, args.cache_ttl / 4))
            index.expire()
            metrics.index_entries.set(len(index))

    background.append(asyncio.create_task(expire_loop(), name="index-expiry"))
    app = RouterApp(fleet, hold, metrics, RouterConfig(hold_timeout=args.hold_timeout,
                                                       keepalive_seconds=args.keepalive_seconds,
                                                       max_request_bytes=args.max_request_bytes,
                                                       chunk_chars=args.chunk_chars), health=health)
    server = _Server(uvicorn.Config(app, host=args.host, port=args.port, log_config=None, access_log=False,
                                    timeout_graceful_shutdown=5, lifespan="on", http="httptools",
                                    proxy_headers=False))  # forwarded headers go on to the servers as sent
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server_task = asyncio.create_task(server.serve(), name="uvicorn")
    while not server.started and not server_task.done():
        await asyncio.sleep(0.02)
    exit_code = 0
    if server_task.done():
        log.error("could not listen on %s:%s", args.host, args.port)
        exit_code = 1
    else:
        port = server.servers[0].sockets[0].getsockname()[1] if server.servers else args.port
        print(f"fleetserve router: listening on http://{args.host}:{port}", flush=True)
        stop_wait = asyncio.create_task(stop.wait())
        await asyncio.wait({stop_wait, server_task}, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        if stop.is_set():
            # Drain: /ready turns 503 (the Service stops sending), in-flight and held requests finish.
            app.start_drain()
            log.info("draining: %d request(s) in flight", app.inflight)
            try:
                await asyncio.wait_for(app.idle.wait(), timeout=args.drain_timeout)
            except TimeoutError:
                log.warning("drain timeout: %d request(s) still in flight", app.inflight)
        else:
            exit_code = 1
    server.should_exit = True
    with contextlib.suppress(asyncio.CancelledError):
        await server_task
    for task in background:
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)
    await fleet.close()
    await app.aclose()
    return exit_code


class _Server:
    """uvicorn.Server without its own signal handling (SIGTERM means drain first)."""

    def __new__(cls, config: Any) -> Any:
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Generator[None, None, None]:
                yield

        return Server(config)
