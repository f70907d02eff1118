"""`fleetserve operator`: run the kopf operator for LLMDeployment resources.

With leader election (the default) the process first serves /healthz, /readyz and /metrics
and waits as a standby until it holds the Lease; only then does kopf start. A leader that
cannot renew the Lease exits at once with status 1 (the pod restarts as a standby), so no
two replicas ever reconcile together. ``--no-leader-election`` starts kopf at once (one
process, e.g. `make demo`).
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fleetserve_operator.health import Health

DEFAULT_METRICS_PORT = 8080  # same as fleetserve_operator.metrics.DEFAULT_METRICS_PORT (kept light here)
DEFAULT_LEASE_NAME = "fleetserve-operator"  # same as fleetserve_operator.leader.DEFAULT_LEASE_NAME
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
API_PROBE_SECONDS = 5.0  # without leader election: the SelfSubjectAccessReview's period
WORKER_PROBE_SECONDS = 5.0  # the no-op sent through the reconcile thread pool, this often


def configure(parser: argparse.ArgumentParser) -> None:
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], metavar="NS",
                       help="watch only this namespace (repeatable; glob patterns allowed)")
    scope.add_argument("-A", "--all-namespaces", action="store_true",
                       help="watch every namespace (the default when no --namespace is given)")
    parser.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT,
                        help="port of /healthz, /readyz and /metrics (default %(default)s; 0 disables them)")
    parser.add_argument("--metrics-host", default="0.0.0.0", help="address of /healthz, /readyz and /metrics")
    parser.add_argument("--apply-crd", action="store_true",
                        help="server-side apply this operator's LLMDeployment CRD before watching (Helm never "
                             "upgrades crds/); an older operator never downgrades a newer CRD")
    election = parser.add_argument_group("leader election (several replicas, one active)")
    election.add_argument("--no-leader-election", dest="leader_election", action="store_false",
                          help="start reconciling at once, without a Lease: only for a single operator process")
    election.add_argument("--leader-election-namespace", default="", metavar="NS",
                          help="namespace of the Lease (default: $POD_NAMESPACE, the service account's "
                               "namespace, else `default`)")
    election.add_argument("--leader-election-id", default=DEFAULT_LEASE_NAME, metavar="NAME",
                          help="name of the Lease (default %(default)s; the chart uses the release's name)")
    election.add_argument("--lease-duration", type=float, default=15.0, metavar="SECONDS",
                          help="how long a dead leader's Lease blocks a standby (default %(default)g; the "
                               "leader renews every third of it and exits after failing for two thirds)")
    parser.add_argument("--unhealthy-after", type=float, default=30.0, metavar="SECONDS",
                        help="/healthz turns 503 after this long without API contact or with the reconcile "
                             "workers stuck (default %(default)g)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every handler run")
    parser.add_argument("--debug", action="store_true", help="log kopf's internals too")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.metrics_port <= 65535:
        raise SystemExit(f"fleetserve operator: --metrics-port must be 0..65535, got {args.metrics_port}")
    if args.unhealthy_after <= 0:
        raise SystemExit(f"fleetserve operator: --unhealthy-after must be positive, got {args.unhealthy_after:g}")
    import asyncio

    import kopf

    from fleetserve_operator import handlers
    from fleetserve_operator.health import Health
    from fleetserve_operator.leader import Timing

    try:
        timing = Timing(args.lease_duration)
    except ValueError as exc:
        raise SystemExit(f"fleetserve operator: {exc}") from None
    kopf.configure(debug=args.debug, verbose=args.verbose or args.debug)
    if args.apply_crd:
        from fleetserve_operator.crdsync import apply_own_crd
        from fleetserve_operator.kube import KubeError

        try:
            print(f"fleetserve operator: {apply_own_crd(handlers.kube())}", flush=True)
        except KubeError as exc:
            raise SystemExit(f"fleetserve operator: --apply-crd failed: {exc}") from None
    health = Health(unhealthy_after=args.unhealthy_after)
    try:
        asyncio.run(_serve(args, timing, health))
    except (asyncio.CancelledError, KeyboardInterrupt):
        pass
    return 0


async def _serve(args: argparse.Namespace, timing: Any, health: Health) -> None:
    """/healthz first, then (with leader election) the wait for the Lease, then kopf until it stops."""
    import asyncio
    import logging
    import threading

    import kopf
    from kopf._core.engines.peering import Identity  # the type kopf.operator takes; not re-exported
    from kubernetes import client

    from fleetserve_operator import handlers, metrics
    from fleetserve_operator.kube import Kube, load_configuration
    from fleetserve_operator.leader import LeaderElector

    log = logging.getLogger("fleetserve_operator.cli")
    namespaces = list(args.namespace)
    runner = await metrics.start_http_server(args.metrics_port, args.metrics_host, health) if args.metrics_port else None
    handlers.OPTIONS.metrics_port = 0  # served here for the process's whole life, not by kopf's startup
    # Its own API client (connection pool) for the Lease and the probes, with a timeout that fits a renewal.
    kube = Kube(client.ApiClient(load_configuration()), timeout_seconds=timing.retry_period)
    stop_probe = threading.Event()
    elector: LeaderElector | None = None
    background: list[asyncio.Task[None]] = []
    try:
        if args.leader_election:
            health.role = "standby"
            metrics.LEADER.set(0)
            namespace = lease_namespace(args.leader_election_namespace)
            elector = LeaderElector(kube, namespace, args.leader_election_id, lease_identity(), timing,
                                    on_lost=_exit_lost, on_contact=health.record_contact)
            log.info("leader election: %s campaigns for Lease %s/%s (duration %g s)", elector.identity,
                     namespace, args.leader_election_id, timing.lease_duration)
            elector.start()
            if not await _wait_for_leadership(elector):
                log.info("leader election: stopped while a standby")
                return
            health.role = "leader"
        else:
            health.role = "standalone"
            probe_ns = namespaces[0] if len(namespaces) == 1 and not set("*?[") & set(namespaces[0]) else None
            threading.Thread(target=health.probe_api_forever, args=(kube, probe_ns, API_PROBE_SECONDS, stop_probe),
                             name="api-probe", daemon=True).start()
        metrics.LEADER.set(1)
        settings = kopf.OperatorSettings()
        ready = asyncio.Event()

        async def after_startup() -> None:
            await ready.wait()
            health.started = True
            await health.watch_workers(settings.execution.executor, WORKER_PROBE_SECONDS)

        background.append(asyncio.create_task(after_startup()))
        await kopf.operator(
            registry=handlers.registry,
            settings=settings,
            identity=Identity(own_identity()),
            standalone=True,  # no kopf peering: the Lease above decides who runs
            clusterwide=not namespaces,
            namespaces=namespaces,
            ready_flag=ready,
        )
    finally:
        for task in background:
            task.cancel()
        stop_probe.set()
        if elector is not None:
            await asyncio.to_thread(elector.release)
        if runner is not None:
            await runner.cleanup()


async def _wait_for_leadership(elector: Any) -> bool:
    """Poll the elector; False when SIGTERM/SIGINT arrived first (a standby stops cleanly, status 0)."""
    import asyncio
    import signal

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        while not elector.is_leader():
            if stopping.is_set():
                return False
            await asyncio.sleep(0.2)
        return True
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):  # kopf installs its own
            loop.remove_signal_handler(sig)


def _exit_lost(why: str) -> None:
    """Leadership lost: stop now, from whatever thread, before a standby can take the Lease over."""
    import sys

    sys.stderr.write(f"fleetserve operator: exiting: lost leadership ({why})\n")
    sys.stderr.flush()
    os._exit(1)


def lease_namespace(flag: str) -> str:
    """--leader-election-namespace, else the pod's namespace (POD_NAMESPACE, the service account's), else default."""
    if flag:
        return flag
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE) as f:
            return f.read().strip() or "default"
    except OSError:
        return "default"


def lease_identity() -> str:
    """``<pod or host name>_<random>``: unique per process, readable in `kubectl get lease`."""
    import secrets
    import socket

    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{secrets.token_hex(3)}"


def own_identity() -> str:
    """``user@host/time/random``, as kopf makes it, but without needing a passwd entry for our uid.

    kopf derives it from ``getpass.getuser()``, which raises ``KeyError`` for a uid with no
    ``/etc/passwd`` entry, the usual case for a non-root ``runAsUser`` (the chart's is 10001): the
    operator then died at start, in a crash loop.
    """
    import datetime
    import getpass
    import random
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid{os.getuid()}"
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    suffix = "".join(random.choices("abcdefhijklmnopqrstuvwxyz0123456789", k=3))
    return f"{user}@{socket.gethostname()}/{now}/{suffix}"
