"""Where the replicas are: a Service's EndpointSlices, followed with a watch (or a static list).

The watch is plain HTTP (httpx) against the API server with the credentials the ``kubernetes``
package's config loaders find (in-cluster service account, or a kubeconfig): list, then watch from
the list's resourceVersion, so a change reaches the router as soon as the API server has it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

import httpx

log = logging.getLogger("fleetserve.router")

# (host, port) of every ready endpoint, as "host:port" keys
Endpoints = set[str]


def endpoint_key(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def ready_endpoints(slices: dict[str, dict[str, Any]], port_name: str) -> Endpoints:
    """The ready, non-terminating endpoints of a Service's slices, on the port named ``port_name``
    (the only port when the Service has one unnamed port)."""
    out: Endpoints = set()
    for body in slices.values():
        ports = body.get("ports") or []
        port = next((p.get("port") for p in ports if p.get("name") == port_name), None)
        if port is None and len(ports) == 1:
            port = ports[0].get("port")
        if port is None:
            continue
        for ep in body.get("endpoints") or []:
            conditions = ep.get("conditions") or {}
            # A nil `ready` means ready (discovery.k8s.io/v1); terminating endpoints take no new work.
            if conditions.get("ready") is False or conditions.get("terminating") is True:
                continue
            for address in (ep.get("addresses") or [])[:1]:
                out.add(endpoint_key(address, int(port)))
    return out


class KubeAPI:
    """Base URL, TLS and auth for the API server, from the kubernetes package's config loaders."""

    def __init__(self, kubeconfig: str | None = None) -> None:
        from kubernetes import client, config  # only here: the static mode needs no kubernetes

        cfg = client.Configuration()
        if kubeconfig is None:
            try:
                config.load_incluster_config(client_configuration=cfg)
            except config.ConfigException:
                config.load_kube_config(client_configuration=cfg)
        else:
            config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        self.cfg = cfg

    def client(self) -> httpx.AsyncClient:
        cfg = self.cfg
        refresh = getattr(cfg, "refresh_api_key_hook", None)
        if refresh is not None:
            refresh(cfg)  # in-cluster tokens rotate
        verify: ssl.SSLContext | bool = True
        if cfg.verify_ssl:
            verify = ssl.create_default_context(cafile=cfg.ssl_ca_cert) if cfg.ssl_ca_cert \
                else ssl.create_default_context()
            if cfg.cert_file:
                verify.load_cert_chain(cfg.cert_file, cfg.key_file)
        else:
            verify = False
        headers = {}
        # The in-cluster loader keeps the service account's token under "BearerToken" (and refreshes
        # it through the hook), a kubeconfig's token under "authorization".
        token = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization")
        if token:
            headers["Authorization"] = token
        return httpx.AsyncClient(base_url=cfg.host, verify=verify, headers=headers,
                                 timeout=httpx.Timeout(10.0, read=None))


class SliceWatcher:
    """Follows ``namespace/service``'s EndpointSlices and calls ``on_change(endpoints)`` with the
    ready set whenever it changes. ``last_ok`` is the monotonic time the watch last answered
    (the router's /health fails when it is too old)."""

    def __init__(self, api: KubeAPI, namespace: str, service: str, on_change: Callable[[Endpoints], None], *,
                 port_name: str = "http", watch_timeout: int = 60) -> None:
        self.api = api
        self.namespace = namespace
        self.service = service
        self.on_change = on_change
        self.port_name = port_name
        self.watch_timeout = watch_timeout
        self.slices: dict[str, dict[str, Any]] = {}
        self.last_ok: float | None = None
        self.synced = asyncio.Event()
        self._current: Endpoints | None = None

    @property
    def _path(self) -> str:
        return f"/apis/discovery.k8s.io/v1/namespaces/{self.namespace}/endpointslices"

    def _publish(self) -> None:
        endpoints = ready_endpoints(self.slices, self.port_name)
        if endpoints != self._current:
            self._current = endpoints
            log.info("endpoints of %s/%s: %s", self.namespace, self.service, sorted(endpoints))
            self.on_change(endpoints)

    async def run(self) -> None:
        selector = f"kubernetes.io/service-name={self.service}"
        while True:
            try:
                async with self.api.client() as http:
                    resp = await http.get(self._path, params={"labelSelector": selector})
                    resp.raise_for_status()
                    listing = resp.json()
                    self.slices = {s["metadata"]["name"]: s for s in listing.get("items") or []}
                    self.last_ok = time.monotonic()
                    self._publish()
                    self.synced.set()
                    version = listing["metadata"]["resourceVersion"]
                    while True:
                        version = await self._watch(http, selector, version)
            except asyncio.CancelledError:
                raise
            except _Relist:
                continue
            except Exception as exc:  # API server away, auth error: keep the last endpoints, retry
                log.warning("watching EndpointSlices of %s/%s failed (%s); retrying in 1 s",
                            self.namespace, self.service, exc)
                await asyncio.sleep(1.0)

    async def _watch(self, http: httpx.AsyncClient, selector: str, version: str) -> str:
        params = {"labelSelector": selector, "watch": "1", "resourceVersion": version,
                  "allowWatchBookmarks": "true", "timeoutSeconds": str(self.watch_timeout)}
        async with http.stream("GET", self._path, params=params) as resp:
            if resp.status_code == 410:
                raise _Relist()
            resp.raise_for_status()
            self.last_ok = time.monotonic()
            async for line in resp.aiter_lines():
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                self.last_ok = time.monotonic()
                if kind == "ERROR":
                    raise _Relist()  # e.g. 410 Gone: the version is too old
                version = obj.get("metadata", {}).get("resourceVersion", version)
                name = obj.get("metadata", {}).get("name")
                if kind in ("ADDED", "MODIFIED") and name:
                    self.slices[name] = obj
                elif kind == "DELETED" and name:
                    self.slices.pop(name, None)
                else:
                    continue  # BOOKMARK
                self._publish()
        self.last_ok = time.monotonic()
        return version


class _Relist(Exception):
    pass
