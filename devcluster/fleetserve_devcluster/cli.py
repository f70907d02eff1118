"""`fleetserve dev-cluster up|down|status|env`: the local real control plane.

Only argument parsing and printing live here; the work is in controlplane.py.
Imports nothing heavy (no kubernetes client).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path


def _state_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", type=Path, default=None,
                   help="where the cluster keeps its data, certs, pids and logs "
                        "(default: $FLEETSERVE_CACHE_DIR/dev-cluster, i.e. ~/.cache/fleetserve/dev-cluster)")


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dev_cluster_command", metavar="ACTION")
    up = sub.add_parser("up", help="start etcd, kube-apiserver, kube-controller-manager, kube-scheduler "
                                   "(idempotent) and wait until /readyz is ok",
                        description="Start the dev cluster's control plane on 127.0.0.1 (idempotent).")
    up.add_argument("--nodes", type=_non_negative, default=2, help="GPU nodes the node agent registers (default 2)")
    up.add_argument("--gpus-per-node", type=_non_negative, default=2,
                    help="nvidia.com/gpu capacity of each node (default 2)")
    up.add_argument("--port-base", type=int, default=None,
                    help="first of the loopback ports used (apiserver = base+443, etcd = base+379, ...; default 16000)")
    up.add_argument("--allow-host-path", action="append", default=[], metavar="DIR",
                    help="a host directory pods may mount as a hostPath volume (repeatable; default: none, "
                         "and a pod with any other hostPath fails with reason HostPathNotAllowed)")
    up.add_argument("--proxy-retry-next-backend", action="store_true",
                    help="let the service proxy retry a refused connect on the next ready backend (kube-proxy "
                         "does not: off by default, so e2e results hold on a real cluster)")
    up.add_argument("--karpenter", action="store_true",
                    help="run Karpenter's kwok provider (built from the Go module proxy on first use, minutes) with "
                         "a NodePool `gpu` of GPU nodes the node agent adopts: real node autoscaling")
    up.add_argument("--max-gpu-nodes", type=_non_negative, default=3,
                    help="with --karpenter: the NodePool's limits.nodes (default 3)")
    up.add_argument("--node-provision-seconds", type=_non_negative, default=20,
                    help="with --karpenter: the KWOKNodeClass's nodeRegistrationDelay, a GPU node's boot (default 20)")
    up.add_argument("--monitoring", action="store_true",
                    help="run the Prometheus Operator and a Prometheus with Kubernetes discovery (both built from "
                         "the Go module proxy on first use, minutes); see fleetserve_devcluster/monitoring.py")
    up.add_argument("--real-nodes", type=_non_negative, default=0,
                    help="also run N (at most 4) real nodes: a kubelet with its own containerd each and one "
                         "kube-proxy, tools from `make install`; the Service range moves to 198.19.255.0/24 "
                         "(see fleetserve_devcluster/realnodes.py)")
    _state_dir_arg(up)
    up.set_defaults(handler=run_up)

    down = sub.add_parser("down", help="stop every process of the dev cluster and delete its state dir",
                          description="Stop everything the dev cluster started (by pid) and delete its state dir.")
    _state_dir_arg(down)
    down.set_defaults(handler=run_down)

    status = sub.add_parser("status", help="components, their pids and health",
                            description="Print the dev cluster's components, their pids and health.")
    _state_dir_arg(status)
    status.set_defaults(handler=run_status)

    env = sub.add_parser("env", help="print `export KUBECONFIG=... PATH=...` for eval in a shell",
                         description='Print shell exports; use as: eval "$(fleetserve dev-cluster env)". '
                                     "The tools' PATH is printed even when no cluster is up.")
    _state_dir_arg(env)
    env.set_defaults(handler=run_env)

    from . import echo  # light: standard library only

    # Hidden (no help=): a test/demo process for dev-cluster pods only, not part of the product's CLI listing.
    echo_parser = sub.add_parser("echo", description=(echo.__doc__ or "").strip(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    echo.configure(echo_parser)
    # Hidden: how `up` starts the node agent + service proxy (see agent.py).
    agent = sub.add_parser("agent")  # no help=: argparse then leaves it out of the listing
    _state_dir_arg(agent)
    agent.set_defaults(handler=run_agent)

    parser.set_defaults(handler=lambda args: _usage(parser))


def run_agent(args: argparse.Namespace) -> int:
    from .agent import run_agent as agent_main
    from .controlplane import ClusterConfig, DevClusterError, main_error

    state_dir = _state_dir(args)
    try:
        config = ClusterConfig.load(state_dir)
    except DevClusterError as exc:
        return main_error(exc)
    return agent_main(state_dir, config.nodes, config.gpus_per_node, config.host_path_allow,
                      config.proxy_retry_next_backend)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _state_dir(args: argparse.Namespace) -> Path:
    from .controlplane import default_state_dir

    return (args.state_dir or default_state_dir()).expanduser().resolve()


def run_up(args: argparse.Namespace) -> int:
    from .controlplane import DEFAULT_PORT_BASE, ClusterConfig, DevClusterError, main_error, up

    try:
        config = ClusterConfig(nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                               port_base=args.port_base if args.port_base is not None else DEFAULT_PORT_BASE,
                               host_path_allow=tuple(str(Path(p).expanduser().resolve())
                                                     for p in args.allow_host_path),
                               proxy_retry_next_backend=args.proxy_retry_next_backend,
                               karpenter=args.karpenter, max_gpu_nodes=args.max_gpu_nodes,
                               node_provision_seconds=float(args.node_provision_seconds),
                               node_provision_delay_s=0.0 if args.karpenter else None,
                               real_nodes=args.real_nodes)
        if args.karpenter:
            from . import karpenter, tools

            try:
                karpenter.build()
            except tools.ToolMissingError as exc:
                raise DevClusterError(str(exc)) from None
        from . import monitoring, tools  # monitoring registers its components, enabled per state dir

        if args.monitoring:
            try:
                monitoring.build()
            except tools.ToolMissingError as exc:
                raise DevClusterError(str(exc)) from None
            monitoring.enable(_state_dir(args))
        up(_state_dir(args), config)
    except DevClusterError as exc:
        return main_error(exc)
    print(f'use it with: eval "$(fleetserve dev-cluster env{_state_flag(args)})"')
    return 0


def _state_flag(args: argparse.Namespace) -> str:
    return f" --state-dir {shlex.quote(str(args.state_dir))}" if args.state_dir else ""


def run_down(args: argparse.Namespace) -> int:
    from . import monitoring  # noqa: F401  (its components stop before the control plane)
    from .controlplane import down

    down(_state_dir(args))
    return 0


def run_status(args: argparse.Namespace) -> int:
    from . import monitoring
    from .controlplane import DevClusterError, main_error, status

    try:
        cluster, rows = status(_state_dir(args))
    except DevClusterError as exc:
        return main_error(exc)
    print(f"state dir  {cluster.state_dir}")
    print(f"server     {cluster.server_url}")
    print(f"kubeconfig {cluster.kubeconfig}")
    print(f"nodes      {cluster.config.nodes} x {cluster.config.gpus_per_node} nvidia.com/gpu")
    if cluster.config.real_nodes:
        from . import realnodes

        for i in range(cluster.config.real_nodes):
            print(f"real node  {realnodes.node_name(i)} {realnodes.node_ip(i)} on {realnodes.bridge(i)}, pods "
                  f"{realnodes.pod_cidr(i)}, containerd {realnodes.socket_path(cluster.state_dir, i)}")
        print(f"services   {realnodes.SERVICE_CIDR} (kube-proxy, iptables)")
    print(f"{'COMPONENT':<24} {'PID':<8} {'STATE':<8} HEALTH")
    for r in rows:
        health = "-" if r.healthy is None else ("ok" if r.healthy else "failing")
        print(f"{r.name:<24} {r.pid if r.pid is not None else '-':<8} "
              f"{'running' if r.running else 'stopped':<8} {health}")
    if monitoring.enabled(cluster.state_dir):
        print(f"prometheus {monitoring.prometheus_url(cluster.state_dir)}")
    from .proxy import proxy_addresses

    for service, address in sorted(proxy_addresses(cluster.state_dir).items()):
        print(f"service    {service:<40} {address}")
    if cluster.config.karpenter:
        from .tools import tool_path

        # Karpenter's view: the NodePool, its NodeClaims (instance type, node, Ready) and their nodes.
        for kinds in ("nodepools,nodeclaims", "nodes"):
            listing = subprocess.run([str(tool_path("kubectl")), f"--kubeconfig={cluster.kubeconfig}", "get", kinds,
                                      *(["-l", "karpenter.sh/nodepool"] if kinds == "nodes" else []), "-o", "wide"],
                                     capture_output=True, text=True, timeout=30)
            print(listing.stdout.rstrip() or listing.stderr.rstrip())
    from .processes import log_file

    for r in rows:
        if not r.running or r.healthy is False:
            print(f"{r.name} is {'not running' if not r.running else 'unhealthy'}: see "
                  f"{log_file(cluster.state_dir, r.name)}; `fleetserve dev-cluster up` restarts what stopped",
                  file=sys.stderr)
    return 0 if all(r.running and r.healthy is not False for r in rows) else 1


def env_lines(state_dir: Path, bin_dir: Path) -> list[str]:
    """The shell exports `env` prints (bash/zsh/sh syntax)."""
    return [
        f"export KUBECONFIG={shlex.quote(str(state_dir / 'kubeconfig'))}",
        f'export PATH={shlex.quote(str(bin_dir))}:"$PATH"',
    ]


def run_env(args: argparse.Namespace) -> int:
    from .controlplane import is_up
    from .tools import missing_tools, tools_bin_dir

    state_dir = _state_dir(args)
    for line in env_lines(state_dir, tools_bin_dir()):
        print(line)
    missing = missing_tools()
    if missing:
        print(f"# note: not provisioned yet: {', '.join(missing)} (run `make install`)", file=sys.stderr)
    if not is_up(state_dir):
        print(f"# note: no dev cluster is running in {state_dir}; start one with `fleetserve dev-cluster up`",
              file=sys.stderr)
    return 0
