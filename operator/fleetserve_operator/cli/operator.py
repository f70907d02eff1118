"""`fleetserve operator`: run the kopf operator for LLMDeployment resources."""

from __future__ import annotations

import argparse

DEFAULT_METRICS_PORT = 8080  # same as fleetserve_operator.metrics.DEFAULT_METRICS_PORT (kept light here)


def configure(parser: argparse.ArgumentParser) -> None:
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], metavar="NS",
                       help="watch only this namespace (repeatable; glob patterns allowed)")
    scope.add_argument("-A", "--all-namespaces", action="store_true",
                       help="watch every namespace (the default when no --namespace is given)")
    parser.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT,
                        help="port of /healthz and /metrics (default %(default)s; 0 disables them)")
    parser.add_argument("--metrics-host", default="0.0.0.0", help="address of /healthz and /metrics")
    parser.add_argument("--apply-crd", action="store_true",
                        help="server-side apply this operator's LLMDeployment CRD before watching (Helm never "
                             "upgrades crds/); an older operator never downgrades a newer CRD")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every handler run")
    parser.add_argument("--debug", action="store_true", help="log kopf's internals too")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.metrics_port <= 65535:
        raise SystemExit(f"fleetserve operator: --metrics-port must be 0..65535, got {args.metrics_port}")
    import kopf
    from kopf._core.engines.peering import Identity  # the type kopf.run takes; not re-exported

    from fleetserve_operator import handlers

    handlers.OPTIONS.metrics_port = args.metrics_port
    handlers.OPTIONS.metrics_host = args.metrics_host
    kopf.configure(debug=args.debug, verbose=args.verbose or args.debug)
    if args.apply_crd:
        from fleetserve_operator.crdsync import apply_own_crd
        from fleetserve_operator.kube import KubeError

        try:
            print(f"fleetserve operator: {apply_own_crd(handlers.kube())}", flush=True)
        except KubeError as exc:
            raise SystemExit(f"fleetserve operator: --apply-crd failed: {exc}") from None
    namespaces = list(args.namespace)
    kopf.run(
        registry=handlers.registry,
        identity=Identity(own_identity()),
        standalone=True,  # one operator replica; the Helm chart runs exactly one
        clusterwide=not namespaces,
        namespaces=namespaces,
    )
    return 0


def own_identity() -> str:
    """``user@host/time/random``, as kopf makes it, but without needing a passwd entry for our uid.

    kopf derives it from ``getpass.getuser()``, which raises ``KeyError`` for a uid with no
    ``/etc/passwd`` entry, the usual case for a non-root ``runAsUser`` (the chart's is 10001): the
    operator then died at start, in a crash loop.
    """
    import datetime
    import getpass
    import os
    import random
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid{os.getuid()}"
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    suffix = "".join(random.choices("abcdefhijklmnopqrstuvwxyz0123456789", k=3))
    return f"{user}@{socket.gethostname()}/{now}/{suffix}"
