"""`fleetserve crds`: print the LLMDeployment CRD generated from the pydantic models."""

from __future__ import annotations

import argparse
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--check", metavar="FILE",
        help="compare with FILE (e.g. crds/fleetserve.io_llmdeployments.yaml) instead of printing; "
        "exit 1 when it differs",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from fleetserve_operator.api.crd import render_crd_yaml

    text = render_crd_yaml()
    if args.check:
        try:
            with open(args.check, encoding="utf-8") as f:
                current = f.read()
        except OSError as exc:
            print(f"fleetserve crds --check: cannot read {args.check}: {exc.strerror}", file=sys.stderr)
            return 2
        if current != text:
            print(f"{args.check} is out of date; regenerate it with `fleetserve crds > {args.check}`",
                  file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0
