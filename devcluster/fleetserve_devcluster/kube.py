"""A small Kubernetes REST client on plain dicts, for the node agent and the service proxy.

Why not the `kubernetes` package: the agent works on whole objects as JSON
(status patches, EndpointSlices, TokenRequests) and the typed models only get
in the way; this client is ~150 lines, depends on the standard library alone,
and keeps one keep-alive connection per thread.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import select
import ssl
import tempfile
import threading
import urllib.parse
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

JsonObj = dict[str, Any]


class KubeError(Exception):
    """The API server answered with a non-2xx status."""

    def __init__(self, status: int, method: str, path: str, body: str) -> None:
        self.status = status
        try:
            self.reason = str(json.loads(body).get("reason", ""))
            message = str(json.loads(body).get("message", body))
        except (ValueError, AttributeError):
            self.reason, message = "", body
        super().__init__(f"{method} {path}: HTTP {status}: {message}")


@dataclass(frozen=True)
class ApiServer:
    """Where the API server is and how to talk to it (taken from a kubeconfig)."""

    host: str
    port: int
    ca_data: bytes
    client_cert_file: str | None
    client_key_file: str | None
    token: str | None


def _read_data(entry: JsonObj, key: str, base_dir: Path) -> bytes | None:
    """`key-data` (base64) or `key` (a file path relative to the kubeconfig)."""
    if entry.get(f"{key}-data"):
        return base64.b64decode(entry[f"{key}-data"])
    if entry.get(key):
        return (base_dir / entry[key]).read_bytes()
    return None


def load_kubeconfig(path: str | Path, secrets_dir: str | Path | None = None) -> ApiServer:
    """Read the current context of a kubeconfig.

    Inline client certificates are written (mode 0600) under `secrets_dir` because
    `ssl` loads a client certificate only from files.
    """
    path = Path(path)
    config = yaml.safe_load(path.read_text())
    current = config.get("current-context")
    contexts = {c["name"]: c["context"] for c in config.get("contexts", [])}
    if current not in contexts:
        raise ValueError(f"{path}: current-context {current!r} is not among the contexts {sorted(contexts)}")
    context = contexts[current]
    cluster = {c["name"]: c["cluster"] for c in config["clusters"]}[context["cluster"]]
    user = {u["name"]: u["user"] for u in config.get("users", [])}.get(context.get("user"), {})
    url = urllib.parse.urlsplit(cluster["server"])
    if url.scheme != "https" or not url.hostname:
        raise ValueError(f"{path}: cluster server {cluster['server']!r} must be an https:// URL")
    ca = _read_data(cluster, "certificate-authority", path.parent) or b""
    cert = _read_data(user, "client-certificate", path.parent)
    key = _read_data(user, "client-key", path.parent)
    cert_file = key_file = None
    if cert and key:
        out = Path(secrets_dir or tempfile.mkdtemp(prefix="fleetserve-kube-"))
        out.mkdir(parents=True, exist_ok=True)
        cert_file, key_file = str(out / "client.crt"), str(out / "client.key")
        for name, data in ((cert_file, cert), (key_file, key)):
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
    return ApiServer(url.hostname, url.port or 443, ca, cert_file, key_file, user.get("token"))


class Kube:
    """JSON over HTTPS to one API server. Thread-safe: one connection per thread."""

    def __init__(self, server: ApiServer, timeout: float = 30.0) -> None:
        self.server = server
        self.timeout = timeout
        self._ctx = ssl.create_default_context(cadata=server.ca_data.decode() if server.ca_data else None)
        if server.client_cert_file and server.client_key_file:
            self._ctx.load_cert_chain(server.client_cert_file, server.client_key_file)
        self._local = threading.local()
        # Requests sent, by apiserver-style verb and resource ("LIST pods", "PATCH nodes/status",
        # "WATCH services"): what `fleetserve dev-cluster` components cost the API server.
        self.counts: Counter[str] = Counter()
        self._count_lock = threading.Lock()

    def _count(self, method: str, path: str, query: dict[str, str] | None) -> None:
        key = request_kind(method, path, query)
        with self._count_lock:
            self.counts[key] += 1

    def request_counts(self) -> dict[str, int]:
        """A copy of `counts` (taken under its lock: other threads add to it)."""
        with self._count_lock:
            return dict(sorted(self.counts.items()))

    @classmethod
    def from_kubeconfig(cls, path: str | Path, secrets_dir: str | Path | None = None) -> Kube:
        return cls(load_kubeconfig(path, secrets_dir))

    def _conn(self, fresh: bool = False) -> http.client.HTTPSConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None or fresh:
            if conn is not None:
                conn.close()
            conn = http.client.HTTPSConnection(self.server.host, self.server.port,
                                               context=self._ctx, timeout=self.timeout)
            self._local.conn = conn
        return conn

    def request(self, method: str, path: str, body: Any = None, query: dict[str, str] | None = None,
                content_type: str = "application/json") -> JsonObj:
        """Send one request; return the decoded JSON answer or raise KubeError."""
        kind_path, kind_query = path, query
        if query:
            path = f"{path}?{urllib.parse.urlencode(query)}"
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        if self.server.token:
            headers["Authorization"] = f"Bearer {self.server.token}"
        # Only a request that is safe to repeat is resent after a connection error: a GET, or a
        # PUT/PATCH with a resourceVersion precondition (a repeat after success answers 409). A POST,
        # a DELETE or a plain PATCH may have taken effect before the connection broke, so the error
        # goes to the caller, whose loop re-reads the state and decides again.  So that an idle
        # keep-alive connection the server closed does not make such a request fail, it is replaced
        # before sending when the server has already closed it.
        retry = method in ("GET", "HEAD") or (method in ("PUT", "PATCH") and _has_resource_version(body))
        for attempt in (0, 1) if retry else (0,):
            try:
                conn = self._conn(fresh=attempt == 1 or (not retry and _closed_by_peer(self._local)))
                self._count(method, kind_path, kind_query)
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read().decode()
                break
            except (http.client.HTTPException, ConnectionError, OSError) as exc:
                self._conn(fresh=True)  # never reuse a broken connection
                if attempt == 1 or not retry:
                    if isinstance(exc, OSError):
                        raise
                    raise ConnectionError(f"{method} {path}: {exc!r}") from exc
        if resp.status >= 300:
            raise KubeError(resp.status, method, path, raw)
        return json.loads(raw) if raw else {}

    def open_watch(self, path: str, query: dict[str, str],
                   read_timeout: float) -> tuple[http.client.HTTPSConnection, http.client.HTTPResponse]:
        """Start a streaming GET (a watch) on a connection of its own; the caller reads and closes it.

        Not on the thread's shared keep-alive connection: a watch holds its connection for minutes.
        """
        headers = {"Accept": "application/json"}
        if self.server.token:
            headers["Authorization"] = f"Bearer {self.server.token}"
        conn = http.client.HTTPSConnection(self.server.host, self.server.port, context=self._ctx,
                                           timeout=read_timeout)
        self._count("GET", path, query)
        try:
            conn.request("GET", f"{path}?{urllib.parse.urlencode(query)}", headers=headers)
            return conn, conn.getresponse()
        except BaseException:
            conn.close()
            raise

    def get(self, path: str, **query: str) -> JsonObj:
        return self.request("GET", path, query=query or None)

    def get_or_none(self, path: str) -> JsonObj | None:
        try:
            return self.get(path)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    def create(self, path: str, body: JsonObj) -> JsonObj:
        return self.request("POST", path, body)

    def patch(self, path: str, body: JsonObj, strategic: bool = False) -> JsonObj:
        kind = "strategic-merge-patch" if strategic else "merge-patch"
        return self.request("PATCH", path, body, content_type=f"application/{kind}+json")

    def delete(self, path: str, body: JsonObj | None = None) -> JsonObj:
        return self.request("DELETE", path, body)


def _has_resource_version(body: Any) -> bool:
    return isinstance(body, dict) and bool((body.get("metadata") or {}).get("resourceVersion"))


def _closed_by_peer(local: threading.local) -> bool:
    """True when this thread's idle keep-alive connection is readable: the server closed it (EOF)."""
    conn = getattr(local, "conn", None)
    sock = getattr(conn, "sock", None)
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def request_kind(method: str, path: str, query: dict[str, str] | None = None) -> str:
    """A request as the API server's metrics name it: verb and resource, e.g. "LIST pods",
    "WATCH endpointslices", "PATCH nodes/status", "CREATE serviceaccounts/token"."""
    parts = [p for p in path.split("?", 1)[0].split("/") if p]
    rest = parts[2:] if parts[:1] == ["api"] else parts[3:]  # /api/v1/... or /apis/<group>/<version>/...
    if len(rest) >= 3 and rest[0] == "namespaces":
        rest = rest[2:]
    resource = "/".join([rest[0], *rest[2:3]]) if rest else "/"
    named = len(rest) >= 2
    verb = {"POST": "CREATE", "PUT": "UPDATE"}.get(method, method)
    if method == "GET" and not named:
        verb = "WATCH" if (query or {}).get("watch") in ("1", "true") else "LIST"
    return f"{verb} {resource}"


def ns_path(namespace: str, resource: str, name: str = "", group: str = "") -> str:
    """The REST path of a namespaced resource: core (group "") or `group/version`."""
    base = f"/apis/{group}" if group else "/api/v1"
    return f"{base}/namespaces/{namespace}/{resource}" + (f"/{name}" if name else "")
