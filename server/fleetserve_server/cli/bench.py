"""`fleetserve bench offline|serve`: dispatch to the benchmark modules."""

from __future__ import annotations

import argparse
import importlib

_SUBCOMMANDS = {
    "offline": ("fleetserve_server.bench.offline", "offline engine throughput against HF baselines"),
    "serve": ("fleetserve_server.bench.serve", "HTTP load generator against a running server"),
}


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCH")
    for name, (module_name, help_text) in _SUBCOMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module_name.startswith(exc.name):
                cmd.set_defaults(handler=_not_implemented(name))
                continue
            raise
        module.configure(cmd)
    parser.set_defaults(handler=lambda args: (parser.print_help(), 2)[1])


def _not_implemented(name: str):  # type: ignore[no-untyped-def]
    def run(args: argparse.Namespace) -> int:
        print(f"fleetserve bench {name}: not implemented yet", flush=True)
        return 2

    return run
