"""Counts every HTTP request a Python process sends to the API server (benchmarks only).

benchmarks/operator_reconcile.py puts this directory on the operator's PYTHONPATH with
FLEETSERVE_BENCH_API_COUNT=<file>: both clients the operator uses are wrapped — urllib3 (the
kubernetes client, i.e. fleetserve's own reads and writes) and aiohttp (kopf: watches, its
annotation and finalizer patches, its events) — and the counts per (method, resource) are
written to <file> as JSON every 0.5 s. The same wrapping works on any version of the operator,
so "API calls per reconcile" compares like with like before and after a change.
"""

from __future__ import annotations

import os

_target = os.environ.get("FLEETSERVE_BENCH_API_COUNT")

if _target:
    import collections
    import json
    import re
    import threading
    import time

    _counts: collections.Counter[str] = collections.Counter()
    _lock = threading.Lock()
    _resource = re.compile(r"^/(?:api/v1|apis/[^/]+/[^/]+)(?:/namespaces/[^/]+)?/([^/?]+)(?:/[^/?]+)?(/[^/?]+)?")

    def _count(method: str, url: str) -> None:
        path = "/" + url.split("://", 1)[-1].split("/", 1)[-1] if "://" in url else url
        match = _resource.match(path)
        resource = (match.group(1) + (match.group(2) or "")) if match else "other"
        if "watch=" in path:
            method = "WATCH"
        with _lock:
            _counts[f"{method.upper()} {resource}"] += 1

    def _dump() -> None:
        while True:
            time.sleep(0.5)
            with _lock:
                text = json.dumps(dict(_counts))
            tmp = _target + ".tmp"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, _target)

    threading.Thread(target=_dump, daemon=True, name="api-count").start()

    import urllib3.connectionpool

    _urlopen = urllib3.connectionpool.HTTPConnectionPool.urlopen

    def urlopen(self, method, url, *args, **kwargs):  # type: ignore[no-untyped-def]
        _count(method, url)
        return _urlopen(self, method, url, *args, **kwargs)

    urllib3.connectionpool.HTTPConnectionPool.urlopen = urlopen  # type: ignore[method-assign]

    import aiohttp

    _request = aiohttp.ClientSession._request

    async def request(self, method, str_or_url, *args, **kwargs):  # type: ignore[no-untyped-def]
        url = str(str_or_url)
        params = kwargs.get("params")
        if params and "watch" in str(params):
            url += "?watch=true"
        _count(method, url)
        return await _request(self, method, str_or_url, *args, **kwargs)

    aiohttp.ClientSession._request = request  # type: ignore[method-assign]
