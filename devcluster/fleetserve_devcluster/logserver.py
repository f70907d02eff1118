"""The slice of the kubelet's HTTPS API that `kubectl logs` needs: `/containerLogs/<ns>/<pod>/<container>`.

The API server proxies `kubectl logs` to `https://<node InternalIP>:<kubeletEndpoint port>`,
presenting its kubelet-client certificate.  One server per agent (port
10250 + its network block) answers for all of its nodes from the pods' log
files `<state>/pods/<ns>_<pod>_<uid>/<container>.log`.  Supported: `tailLines`,
`follow` (until the pod's directory goes), `limitBytes`; not `previous`
(restarts append to one file) nor `timestamps`.  The serving certificate is
self-signed: the dev cluster's API server does not verify kubelets
(no --kubelet-certificate-authority), and this server does not authorize
callers — it listens only on the agent's pod-network addresses.
"""

from __future__ import annotations

import logging
import ssl
import subprocess
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

log = logging.getLogger("fleetserve.devcluster.agent")
BASE_PORT = 10250


def log_file(state_dir: Path, namespace: str, pod: str, container: str) -> Path | None:
    """The newest log file of that container (pods of one name but different uids may coexist)."""
    candidates = sorted((state_dir / "pods").glob(f"{namespace}_{pod}_*/{container}.log"),
                        key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


def tail(data: bytes, lines: int | None) -> bytes:
    """The last `lines` lines of `data` (all of it when None)."""
    if lines is None:
        return data
    if lines <= 0:
        return b""
    parts = data.splitlines(keepends=True)
    return b"".join(parts[-lines:])


def _self_signed(directory: Path) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    crt, key = directory / "kubelet.crt", directory / "kubelet.key"
    if not crt.exists() or not key.exists():
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-subj", "/CN=fleetserve-node-agent", "-days", "3650", "-keyout", str(key), "-out", str(crt)],
                       check=True, capture_output=True)
    return crt, key


def make_handler(state_dir: Path) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _fail(self, code: int, message: str) -> None:
            body = message.encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            parts = url.path.strip("/").split("/")
            if len(parts) != 4 or parts[0] != "containerLogs":
                self._fail(404, f"{url.path}: the dev-cluster node agent serves only /containerLogs/NS/POD/CONTAINER")
                return
            query = dict(urllib.parse.parse_qsl(url.query))
            path = log_file(state_dir, parts[1], parts[2], parts[3])
            if path is None:
                self._fail(404, f"no logs of container {parts[3]!r} in pod {parts[1]}/{parts[2]} on this node agent")
                return
            lines = int(query["tailLines"]) if "tailLines" in query else None
            limit = int(query["limitBytes"]) if "limitBytes" in query else None
            data = tail(path.read_bytes(), lines)
            if limit is not None:
                data = data[:limit]
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                self._chunk(data)
                if query.get("follow") == "true":
                    self._follow(path, path.stat().st_size)
                self._chunk(b"")
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                pass

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _follow(self, path: Path, offset: int) -> None:
            """Stream what is appended until the pod's directory is removed (the pod is gone)."""
            while path.exists():
                size = path.stat().st_size
                if size > offset:
                    with open(path, "rb") as f:
                        f.seek(offset)
                        data = f.read(size - offset)
                    offset = size
                    if data:
                        self._chunk(data)
                time.sleep(0.3)

    return Handler


class LogServer:
    """HTTPS on 0.0.0.0:`port` in a daemon thread."""

    def __init__(self, state_dir: Path, port: int) -> None:
        crt, key = _self_signed(state_dir / "node-agent")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(crt, key)
        self.port = port
        self.server = ThreadingHTTPServer(("0.0.0.0", port), make_handler(state_dir))
        self.server.daemon_threads = True
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)

    def start(self) -> None:
        threading.Thread(target=self.server.serve_forever, name="kubelet-logs", daemon=True).start()
        log.info("kubelet log endpoint on port %d (kubectl logs)", self.port)

    def close(self) -> None:
        self.server.shutdown()
