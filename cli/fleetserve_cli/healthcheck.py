"""`fleetserve healthcheck`: do a Service's ready endpoints (or one URL) answer a health path with 200?

The Helm chart's `helm test` pod runs it against the operator Service. It
finds the pods through the Service's EndpointSlices instead of the Service's
DNS name, so it works the same on a real cluster and on the dev cluster
(which has no cluster DNS), and it checks *every* ready endpoint, not
whichever one a ClusterIP would pick.

Exit status 0 only when at least one endpoint exists and all of them
answered 200 before the deadline; 1 otherwise, with the reason on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request


def configure(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="check this URL only (e.g. http://127.0.0.1:8080/healthz)")
    target.add_argument("--service", help="check every ready endpoint of this Service")
    parser.add_argument("--namespace", default=None,
                        help="namespace of --service (default: the pod's own namespace, else `default`)")
    parser.add_argument("--port-name", default="metrics", help="the EndpointSlice port to use (default: metrics)")
    parser.add_argument("--path", default="/healthz", help="path to GET on each endpoint (default: /healthz)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to keep retrying until every endpoint is healthy (default: 60)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout
    last_problem = "no attempt made"
    while True:
        try:
            urls = [args.url] if args.url else _endpoint_urls(args)
            if not urls:
                last_problem = f"Service {args.service!r} has no ready endpoint with a port named {args.port_name!r}"
            else:
                failures = [f"{url}: {problem}" for url in urls if (problem := _probe(url)) is not None]
                if not failures:
                    for url in urls:
                        print(f"healthy: {url}")
                    return 0
                last_problem = "; ".join(failures)
        except Exception as exc:  # an API error is retried like an unhealthy endpoint until the deadline
            last_problem = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            print(f"fleetserve healthcheck: unhealthy after {args.timeout:g}s: {last_problem}", file=sys.stderr)
            return 1
        time.sleep(1.0)


def _probe(url: str) -> str | None:
    """None when `url` answers 200, else what went wrong."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))


def _own_namespace() -> str:
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip()
    except OSError:
        return "default"


def _endpoint_urls(args: argparse.Namespace) -> list[str]:
    """http://<address>:<port><path> for each ready endpoint of the Service, via its EndpointSlices."""
    from kubernetes import client, config  # imported here: `fleetserve --help` stays light

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    namespace = args.namespace or _own_namespace()
    slices = client.DiscoveryV1Api().list_namespaced_endpoint_slice(
        namespace, label_selector=f"kubernetes.io/service-name={args.service}"
    )
    urls = []
    for endpoint_slice in slices.items:
        ports = [p.port for p in endpoint_slice.ports or [] if p.name == args.port_name]
        if not ports:
            continue
        for endpoint in endpoint_slice.endpoints or []:
            # `ready` unset means ready (EndpointSlice API semantics).
            if endpoint.conditions is not None and endpoint.conditions.ready is False:
                continue
            for address in endpoint.addresses:
                host = f"[{address}]" if ":" in address else address
                urls.append(f"http://{host}:{ports[0]}{args.path}")
    return sorted(urls)
