"""The `cacheproxy` command.

Each subcommand is one `Subcommand` in `SUBCOMMANDS`: a name, a help line, a function adding its
arguments and a function running it. To add one, write the two functions and append a row.

Every field of Settings is also a flag (`--data-dir`, `--max-num-seqs`, `--no-cuda-graphs`, `--api-key
KEY=TENANT` ...), generated from the Settings model, so a flag can never drift from its setting. Only the
flags given on the command line override; the rest come from CACHEPROXY_* variables, .env and the TOML
file, as Settings reads them.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import ValidationError

from cacheproxy.config import Settings
from cacheproxy.log import configure as configure_logging


class Subcommand(NamedTuple):
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# --- Settings as flags ---------------------------------------------------------------------------

# Flags whose natural spelling differs from the field name.
_FLAG_NAMES = {"api_keys": "--api-key", "router_backends": "--backend"}


def _flag(field_name: str) -> str:
    return _FLAG_NAMES.get(field_name, "--" + field_name.replace("_", "-"))


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _unwrap_optional(annotation: Any) -> Any:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def add_settings_arguments(parser: argparse.ArgumentParser, only: Sequence[str] | None = None) -> None:
    """One flag per Settings field (or per field named in `only`); absent flags leave the setting alone."""
    group = parser.add_argument_group("settings (each also CACHEPROXY_<NAME> or cacheproxy.toml)")
    for name, info in Settings.model_fields.items():
        if only is not None and name not in only:
            continue
        annotation = _unwrap_optional(info.annotation)
        help_text = info.description or ""
        if info.default is not None and not callable(info.default_factory):
            help_text = f"{help_text} (default: {info.default})".strip()
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        origin = typing.get_origin(annotation)
        if annotation is bool:
            group.add_argument(_flag(name), action=argparse.BooleanOptionalAction, **kwargs)
        elif origin is typing.Literal:
            group.add_argument(_flag(name), choices=[str(c) for c in typing.get_args(annotation)], **kwargs)
        elif origin is dict:
            group.add_argument(_flag(name), action="append", type=_key_value, metavar="KEY=VALUE", **kwargs)
        elif origin is list and typing.get_args(annotation)[0] in (int, float, str):
            kwargs["help"] = f"{help_text} (repeat the flag for several)".strip()
            group.add_argument(_flag(name), action="append", type=typing.get_args(annotation)[0], **kwargs)
        elif annotation in (int, float, str, Path):
            group.add_argument(_flag(name), type=annotation, **kwargs)
        else:  # a type argparse cannot spell: settings file or environment only
            continue


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the flags given, then the environment, .env and TOML (Settings' own order)."""
    given: dict[str, Any] = {}
    for name in Settings.model_fields:
        if hasattr(args, name):
            value = getattr(args, name)
            if typing.get_origin(_unwrap_optional(Settings.model_fields[name].annotation)) is dict:
                value = dict(value)
            given[name] = value
    return Settings(**given)


# --- serve --------------------------------------------------------------------------------------

def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser)


def cmd_serve(args: argparse.Namespace) -> int:
    settings = args.settings
    from cacheproxy.server.app import serve  # aiohttp and the engine load only for this command

    return asyncio.run(serve(settings))


# --- route --------------------------------------------------------------------------------------

_ROUTE_SETTINGS = ("host", "port", "max_body_bytes", "log_level", "log_json",
                   *(name for name in Settings.model_fields if name.startswith("router_")))


def _route_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, only=_ROUTE_SETTINGS)


def cmd_route(args: argparse.Namespace) -> int:
    from cacheproxy.server.router import route

    return asyncio.run(route(args.settings))


SUBCOMMANDS: list[Subcommand] = [
    Subcommand("serve", "serve the OpenAI-compatible API (default model: the built-in tiny one)",
               _serve_arguments, cmd_serve),
    Subcommand("route", "route requests to replicas by prompt prefix (--backend URL, repeated)",
               _route_arguments, cmd_route),
]


# --- entry point ----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cacheproxy", description="A prompt-caching proxy and prefix-KV store.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in SUBCOMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.settings = settings_from_args(args)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False))
        parser.error(f"invalid settings: {problems}")
    configure_logging(args.settings.log_level, args.settings.log_json)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
