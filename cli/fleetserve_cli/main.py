"""Entry point of the `fleetserve` console script.

Each subcommand lives in the package that owns it and is a module exposing
``configure(parser)``; configure adds the arguments and sets
``parser.set_defaults(handler=run)`` where ``run(args) -> int``.  Those modules
import nothing heavy at import time (no torch, no kopf), so `fleetserve --help`
is fast and the operator image, which has no torch, can still run
`fleetserve operator`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("fleetserve_server.cli.serve", "run the OpenAI-compatible inference server"),
    "router": ("fleetserve_router.cli", "the prefix-aware router in front of one LLMDeployment's servers"),
    "operator": ("fleetserve_operator.cli.operator", "run the kopf operator for LLMDeployment resources"),
    "plan": ("fleetserve_server.cli.plan", "memory planner: do the model and its KV cache fit?"),
    "bench": ("fleetserve_server.cli.bench", "benchmarks: `bench offline` and `bench serve`"),
    "tune": ("fleetserve_server.cli.tune", "search engine settings for a workload under a latency objective"),
    "crds": ("fleetserve_operator.cli.crds", "print the generated CRD YAML (the same bytes as crds/)"),
    "dev-cluster": ("fleetserve_devcluster.cli", "the local real Kubernetes control plane for tests and the demo"),
    "healthcheck": ("fleetserve_cli.healthcheck", "check that a Service's ready endpoints (or a URL) answer /healthz"),
    "delete-llmdeployments": ("fleetserve_cli.delete_llmdeployments",
                              "delete LLMDeployments by label and wait until the operator released them"),
}


def package_version() -> str:
    try:
        return version("fleetserve")
    except PackageNotFoundError:
        return "0+unknown"


def _not_implemented(name: str, reason: str) -> object:
    def run(args: argparse.Namespace) -> int:
        print(f"fleetserve {name}: not implemented yet ({reason})", file=sys.stderr)
        return 2

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleetserve",
        description="fleetserve: fleets of LLM inference servers on Kubernetes.",
    )
    parser.add_argument("--version", action="version", version=f"fleetserve {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # Only a missing *subcommand module* means "not built yet"; a missing
            # third-party dependency inside it is reported when the command runs.
            if exc.name is not None and module_name.startswith(exc.name):
                cmd.set_defaults(handler=_not_implemented(name, f"{module_name} does not exist"))
                continue
            cmd.set_defaults(handler=_not_implemented(name, f"missing dependency {exc.name!r}: "
                                                      "install fleetserve with the right extra"))
            continue
        module.configure(cmd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
