"""The slice of the kubelet's HTTPS API that `kubectl logs` needs: `/containerLogs/<ns>/<pod>/<container>`.

The API server proxies `kubectl logs` to `https://<node InternalIP>:<kubeletEndpoint port>`,
presenting its kubelet-client certificate.  One server per agent (port
10250 + its network block) answers for all of its nodes from the pods' log
files `<state>/pods/<ns>_<pod>_<uid>/<container>.log`.  Supported: `tailLines`,
`follow` (until the pod's directory goes), `limitBytes`; not `previous`
(restarts append to one file) nor `timestamps`.

Safety on a shared machine, as a kubelet with `--client-ca-file`:
* it listens only on its nodes' own addresses, which live on `lo` (never 0.0.0.0);
* it answers only a client certificate signed by the cluster CA (the API
  server's kubelet-client identity), so another local user cannot read logs;
* it serves one pod's own log by exact name: namespace, pod and container must
  be valid Kubernetes names (no `/`, `..`, `*` or `[`), the pod directory is
  matched by exact string comparison (no globbing) and the file must be a
  regular file directly in it (no symlink followed).
The serving certificate is self-signed: the dev cluster's API server does not
verify kubelets (no --kubelet-certificate-authority).
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import stat
import subprocess
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

log = logging.getLogger("fleetserve.devcluster.agent")
BASE_PORT = 10250
# A DNS-1123 subdomain (pod and namespace names), a DNS-1123 label (container names), and a pod uid.
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_UID = re.compile(r"[0-9a-f-]{1,64}")


def log_file(state_dir: Path, namespace: str, pod: str, container: str) -> Path | None:
    """The newest log file of that container (pods of one name but different uids may coexist).

    None for anything that is not a valid name or not a regular file directly in a pod's directory.
    """
    if not (_SUBDOMAIN.fullmatch(namespace) and _SUBDOMAIN.fullmatch(pod) and _LABEL.fullmatch(container)):
        return None
    if len(namespace) > 63 or len(pod) > 253 or len(container) > 63:
        return None
    prefix = f"{namespace}_{pod}_"
    found: list[tuple[float, Path]] = []
    try:
        entries = os.listdir(state_dir / "pods")
    except FileNotFoundError:
        return None
    for entry in entries:
        if not (entry.startswith(prefix) and _UID.fullmatch(entry[len(prefix):])):
            continue
        path = state_dir / "pods" / entry / f"{container}.log"
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode):
            found.append((st.st_mtime, path))
    return max(found)[1] if found else None


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
            try:
                lines = int(query["tailLines"]) if "tailLines" in query else None
                limit = int(query["limitBytes"]) if "limitBytes" in query else None
            except ValueError:
                self._fail(400, "tailLines and limitBytes must be whole numbers")
                return
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
    """HTTPS on `port` of each node address given to `serve_on`, one daemon thread per address.

    Only clients with a certificate from `client_ca` (the cluster CA) get an answer.
    """

    def __init__(self, state_dir: Path, port: int, client_ca: Path) -> None:
        crt, key = _self_signed(state_dir / "node-agent")
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(crt, key)
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.ctx.load_verify_locations(cafile=str(client_ca))
        self.port = port
        self.handler = make_handler(state_dir)
        self.servers: dict[str, ThreadingHTTPServer] = {}

    def serve_on(self, addresses: set[str]) -> None:
        """Listen on exactly `addresses` (each must be a local address already)."""
        for address in set(self.servers) - addresses:
            self.servers.pop(address).shutdown()
        for address in addresses - set(self.servers):
            server = ThreadingHTTPServer((address, self.port), self.handler)
            server.daemon_threads = True
            # The handshake runs in the connection's thread: a client that never sends one blocks nothing.
            server.socket = self.ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
            server.handle_error = lambda request, client_address: None  # type: ignore[method-assign]
            self.servers[address] = server
            threading.Thread(target=server.serve_forever, name=f"kubelet-logs-{address}", daemon=True).start()
            log.info("kubelet log endpoint on %s:%d (kubectl logs)", address, self.port)

    def close(self) -> None:
        for server in self.servers.values():
            server.shutdown()
            server.server_close()
        self.servers.clear()
