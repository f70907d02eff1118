"""`fleetserve dev-cluster echo`: a tiny HTTP process to run as a dev-cluster pod (demos, node-agent tests).

Dev-cluster only: a hidden subcommand that serves on the pod's own address
($FLEETSERVE_HOST, which the node agent sets to the pod's IP) and nowhere
else, and exposes nothing of the machine: no file read or write, no
environment.  Tests look inside a pod the way `crictl exec` would, through
/proc/<container pid>/root and /proc/<container pid>/environ.

Endpoints (all GET unless said otherwise):
  /               JSON: pod name ($HOSTNAME), bound host and port, pid
  /ready, /health 200 or 503/500 (flip with POST /control/ready|health?value=false|true);
                  /ready answers 503 once SIGTERM started a drain
  /prestop        records `prestop` (for an httpGet preStop hook) and answers 200
With `--record FILE` every event (start, signals, prestop, exit) is appended to FILE
as `<event> <unix time>`, so a test can see what the process received and when.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--record", default=None, metavar="FILE", help="append received signals/events to FILE")
    parser.add_argument("--drain-seconds", type=float, default=0.0,
                        help="after SIGTERM, answer /ready with 503 this long, then exit 0")
    parser.add_argument("--ignore-sigterm", action="store_true", help="record SIGTERM but keep running")
    parser.add_argument("--exit-after", type=float, default=None, metavar="SECONDS",
                        help="exit on its own after SECONDS (to test crash restarts)")
    parser.add_argument("--exit-code", type=int, default=1, help="exit status for --exit-after")
    parser.set_defaults(handler=run)


class EchoState:
    """Flags shared by the HTTP handler threads and the signal handler."""

    def __init__(self, record: str | None) -> None:
        self.ready = True
        self.healthy = True
        self.draining = False
        self.record_path = record
        self.lock = threading.Lock()

    def record(self, event: str) -> None:
        if self.record_path:
            with self.lock, open(self.record_path, "a") as f:
                f.write(f"{event} {time.time():.3f}\n")


def make_handler(state: EchoState, host: str, port: int) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, code: int, body: str | bytes, ctype: str = "text/plain") -> None:
            data = body.encode() if isinstance(body, str) else body
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # keep pod logs quiet
            pass

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            if url.path == "/ready":
                ok = state.ready and not state.draining
                self._send(200 if ok else 503, "ok" if ok else "not ready")
            elif url.path == "/health":
                self._send(200 if state.healthy else 500, "ok" if state.healthy else "unhealthy")
            elif url.path == "/prestop":
                state.record("prestop")
                self._send(200, "ok")
            elif url.path == "/":
                body = {"pod": os.environ.get("HOSTNAME", ""), "host": host, "port": port, "pid": os.getpid()}
                self._send(200, json.dumps(body), "application/json")
            else:
                self._send(404, "not found")

        def do_POST(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(url.query))
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            value = query.get("value", "true") == "true"
            if url.path == "/control/ready":
                state.ready = value
                self._send(200, "ok")
            elif url.path == "/control/health":
                state.healthy = value
                self._send(200, "ok")
            else:
                self._send(404, "not found")

    return Handler


def _is_pod_address(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return not address.is_unspecified and not address.is_multicast


def run(args: argparse.Namespace) -> int:
    host = os.environ.get("FLEETSERVE_HOST", "")
    if not _is_pod_address(host):
        print("fleetserve dev-cluster echo: runs only as a dev-cluster pod: $FLEETSERVE_HOST must be the pod's "
              f"own IP address (got {host!r}; a wildcard such as 0.0.0.0 is refused)", file=sys.stderr)
        return 2
    state = EchoState(args.record)
    try:
        server = ThreadingHTTPServer((host, args.port), make_handler(state, host, args.port))
    except OSError as exc:
        print(f"fleetserve dev-cluster echo: cannot listen on {host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    done = threading.Event()
    exit_code = [0]

    def on_signal(signum: int, _frame: object) -> None:
        state.record(f"signal {signal.Signals(signum).name}")
        if signum == signal.SIGTERM and args.ignore_sigterm:
            return
        state.draining = True
        exit_code[0] = 0
        threading.Timer(args.drain_seconds, done.set).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if args.exit_after is not None:
        exit_code[0] = args.exit_code
        threading.Timer(args.exit_after, done.set).start()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state.record(f"start {os.getpid()}")
    print(f"echo listening on {host}:{args.port}", flush=True)
    while not done.wait(0.5):  # a short wait so signal handlers run promptly in the main thread
        pass
    server.shutdown()
    state.record(f"exit {exit_code[0]}")
    return exit_code[0]
