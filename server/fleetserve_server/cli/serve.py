"""`fleetserve serve`: flags (one per ServerConfig key) and the entry point.

Imports nothing heavy at module level: `fleetserve --help` must stay fast and
work without torch.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from typing import Any, Literal, get_args, get_origin

from fleetserve_server.config import API_KEY_ENV, ConfigError, ServerConfig, build_config, field_names

# Flags whose spelling differs from "--" + key with dashes.
_BOOLEAN_FLAGS = {"prefix_caching", "log_prompts", "capture_default_redaction"}
# Flags that may be repeated, each adding one item to a list.
_LIST_FLAGS = {"capture_redact"}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Serve a model over an OpenAI-compatible HTTP API. With no flags it serves the embedded "
        "SmolLM2-135M-Instruct on port 8000. Every flag can also be set in --config FILE "
        "(a YAML mapping with the same names in snake_case); a flag on the command line wins."
    )
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="YAML file of settings, e.g. the ConfigMap the operator writes (server.yaml)")
    for name, info in ServerConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = info.get_default(call_default_factory=True)
        help_text = (info.description or "") + (f" (default: {default})" if default not in (None, []) else "")
        if name == "api_key":
            help_text += f"; prefer ${API_KEY_ENV} so the key stays out of the process list"
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if name in _BOOLEAN_FLAGS:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if name in _LIST_FLAGS:
            parser.add_argument(flag, action="append", **kwargs)
            continue
        choices = _literal_choices(info.annotation)
        if choices:
            kwargs["choices"] = choices
        else:
            kwargs["type"] = _scalar_type(info.annotation)
        parser.add_argument(flag, **kwargs)
    parser.set_defaults(handler=run)


def _literal_choices(annotation: Any) -> list[str] | None:
    return list(get_args(annotation)) if get_origin(annotation) is Literal else None


def _scalar_type(annotation: Any) -> type:
    # `int | None` -> int; `float` -> float; anything else is a string.
    if get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    return annotation if annotation in (int, float) else str


def run(args: argparse.Namespace) -> int:
    cli = {name: getattr(args, name) for name in field_names() if hasattr(args, name)}
    try:
        config = build_config(cli, config_file=getattr(args, "config", None))
    except ConfigError as exc:
        print(f"fleetserve serve: {exc}", file=sys.stderr)
        return 2
    import asyncio

    from fleetserve_server.resources import bound_native_caches

    bound_native_caches()  # before torch loads: oneDNN's shape caches otherwise grow RSS for hours
    from fleetserve_server.api.logs import configure_logging
    from fleetserve_server.api.server import serve

    configure_logging(config.log_format)
    return asyncio.run(serve(config))
