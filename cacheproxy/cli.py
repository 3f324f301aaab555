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
import json
import logging
import os
import sys
import time
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from pydantic import ValidationError

from cacheproxy.config import Settings
from cacheproxy.log import configure as configure_logging

if TYPE_CHECKING:
    from rich.console import Console

    from cacheproxy.admin_client import AdminClient


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


# --- shared by the client commands -----------------------------------------------------------------

class CommandFailed(Exception):
    """A client command cannot go on; the message is the one line printed on stderr."""


def _fails_in_one_line(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turns the errors a person can act on (server down, wrong key, empty log, bad file ...) into one
    line on stderr and exit status 1, never a traceback; Ctrl-C exits with 130."""

    def wrapped(args: argparse.Namespace) -> int:
        from cacheproxy.admin_client import ServerError
        from cacheproxy.report import ReportError

        try:
            return run(args)
        except (CommandFailed, ServerError, ReportError) as exc:
            name = " ".join(n for n in (args.command, getattr(args, "cache_action", None)) if n)
            print(f"cacheproxy {name}: error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130

    return wrapped


def _duration(text: str) -> float:
    from cacheproxy.report import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def _add_url_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None,
                        help="the server, e.g. http://127.0.0.1:8000 (default: from the host and port settings)")


def _add_admin_arguments(parser: argparse.ArgumentParser) -> None:
    _add_url_argument(parser)
    # dest admin_key is the Settings field: unset, CACHEPROXY_ADMIN_KEY (or the TOML file) gives it.
    parser.add_argument("--admin-key", dest="admin_key", default=argparse.SUPPRESS,
                        help="the server's admin key (default: CACHEPROXY_ADMIN_KEY)")


def _add_api_key_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-key", dest="client_api_key", default=None, metavar="KEY",
                        help="API key of the tenant to send requests as (default: OPENAI_API_KEY, else none)")


def _server_url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url)
    settings: Settings = args.settings
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "", "::") else settings.host
    return f"http://{f'[{host}]' if ':' in host else host}:{settings.port}"


def _client_api_key(args: argparse.Namespace) -> str:
    return args.client_api_key or os.environ.get("OPENAI_API_KEY") or "none"


def _admin_client(args: argparse.Namespace, api_key: str | None = None) -> AdminClient:
    from cacheproxy.admin_client import AdminClient

    return AdminClient(_server_url(args), admin_key=args.settings.admin_key, api_key=api_key)


def _console(stderr: bool = False) -> Console:
    from rich.console import Console

    return Console(stderr=stderr)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _write_output(path: Path, data: bytes | str, what: str) -> None:
    from cacheproxy.report import write_file

    write_file(path, data)
    print(f"wrote {what} to {path}", file=sys.stderr)


# --- stats --------------------------------------------------------------------------------------

def _stats_arguments(parser: argparse.ArgumentParser) -> None:
    _add_admin_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON (one line per refresh "
                        "with --watch)")
    parser.add_argument("--watch", type=_duration, metavar="SECONDS", default=None,
                        help="refresh every SECONDS until Ctrl-C")
    parser.add_argument("--count", type=_positive_int, default=None,
                        help="with --watch: stop after this many refreshes")
    add_settings_arguments(parser, only=("host", "port"))


def cmd_stats(args: argparse.Namespace) -> int:
    from cacheproxy.report import live_figures, live_renderable

    client = _admin_client(args)

    def figures() -> dict[str, Any]:
        return live_figures(client.stats(), client.base_url)

    if args.watch is None:
        fig = figures()
        if args.json:
            _print_json(fig)
        else:
            _console().print(live_renderable(fig))
        return 0
    done = 0
    if args.json:
        while args.count is None or done < args.count:
            if done:
                time.sleep(args.watch)
            print(json.dumps(figures(), default=str), flush=True)
            done += 1
        return 0
    from rich.live import Live

    with Live(live_renderable(figures()), console=_console(), auto_refresh=False) as live:
        done = 1
        while args.count is None or done < args.count:
            time.sleep(args.watch)
            live.update(live_renderable(figures()), refresh=True)
            done += 1
    return 0


# --- report -------------------------------------------------------------------------------------

def _report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", type=_duration, default=None,
                        help="only requests that arrived this long ago or later: 30m, 1h, 2d (default: all)")
    parser.add_argument("--png", type=Path, default=None, help="write the charts to this PNG file")
    parser.add_argument("--html", type=Path, default=None, help="write a self-contained HTML report")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    add_settings_arguments(parser, only=("data_dir", "records_file"))


def cmd_report(args: argparse.Namespace) -> int:
    from cacheproxy.cache.records import read_records
    from cacheproxy.report import build_report, report_html, report_png, report_renderable

    path = args.settings.records_path
    if not path.is_file():
        raise CommandFailed(f"no records log at {path} (a server with --data-dir "
                            f"{args.settings.data_dir} writes it)")
    try:
        report = build_report(read_records(path), path, args.since)
    except OSError as exc:
        raise CommandFailed(f"cannot read {path}: {exc.strerror or exc}") from None
    png = report_png(report) if args.png or args.html else None
    if args.png:
        _write_output(args.png, png or b"", "the charts")
    if args.html:
        _write_output(args.html, report_html(report, png), "the HTML report")
    if args.json:
        _print_json(report.to_json())
    else:
        _console().print(report_renderable(report))
    return 0


# --- cache ----------------------------------------------------------------------------------------

def _cache_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="cache_action", required=True, metavar="ACTION")
    ls = actions.add_parser("ls", help="list cached prefixes, most recently used first")
    ls.add_argument("--limit", type=_positive_int, default=50)
    ls.add_argument("--json", action="store_true")
    pin = actions.add_parser("pin", help="keep a prefix in the GPU tier for a while")
    pin.add_argument("hash", help="the prefix hash `cache ls` shows (its first 6+ digits will do)")
    pin.add_argument("--ttl", type=_duration, default=3600.0, help="how long: 90s, 30m, 1h (default 1h)")
    unpin = actions.add_parser("unpin", help="release a pin")
    unpin.add_argument("hash")
    evict = actions.add_parser("evict", help="drop one prefix (or --all) from every tier")
    target = evict.add_mutually_exclusive_group(required=True)
    target.add_argument("hash", nargs="?", default=None)
    target.add_argument("--all", action="store_true", help="everything no running request uses")
    warm = actions.add_parser("warm", help="send the prompts of FILE with max_tokens=1 so their prefixes "
                              "are cached")
    warm.add_argument("file", type=Path, help='one prompt a line: text, or JSON {"prompt": ...} or '
                      '{"messages": [...]}')
    warm.add_argument("--concurrency", type=_positive_int, default=4)
    warm.add_argument("--json", action="store_true")
    _add_api_key_argument(warm)
    for sub in (ls, pin, unpin, evict, warm):
        _add_admin_arguments(sub)
        add_settings_arguments(sub, only=("host", "port"))


def _ago(t: float | None, now: float) -> str:
    if not t:
        return "—"
    dt = now - t
    return f"{dt:.0f} s ago" if dt < 120 else f"{dt / 60:.0f} min ago" if dt < 7200 else f"{dt / 3600:.1f} h ago"


SHORT_HASH = 12  # hex digits of a prefix hash `cache ls` shows in a narrow terminal
_LISTED_AT_MOST = 10_000  # the most entries GET /admin/cache gives


def _whole_hash(client: AdminClient, given: str) -> str:
    """A hash as given, or the one listed prefix it is the start of (6 to 31 hex digits)."""
    start = given.lower()
    if not 6 <= len(start) < 32 or any(c not in "0123456789abcdef" for c in start):
        return given  # whole, or not a hash at all: the server says which
    listed = client.cache_entries(_LISTED_AT_MOST)["entries"]
    matches = sorted({e["hash"] for e in listed if e["hash"].startswith(start)})
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise CommandFailed(f"no cached prefix `cache ls` lists starts with {given}")
    raise CommandFailed(f"{given} starts {len(matches)} cached prefixes; give more of its digits")


def cmd_cache(args: argparse.Namespace) -> int:
    action = args.cache_action
    if action == "warm":
        return _cache_warm(args)
    client = _admin_client(args)
    if action == "ls":
        answer = client.cache_entries(args.limit)
        if args.json:
            _print_json(answer)
            return 0
        from rich import box
        from rich.table import Table

        now = time.time()
        console = _console()
        # Whole hashes need ~100 columns; narrower, the first 12 digits (pin, unpin and evict take those).
        shown = 32 if console.width >= 100 else SHORT_HASH
        table = Table(title=f"Cached prefixes at {client.base_url} (block size {answer['block_size']})",
                      title_justify="left", box=box.SIMPLE_HEAD)  # fmt: skip
        table.add_column("hash", no_wrap=True, min_width=shown)
        for col in ("tokens", "blocks", "tier", "hits", "last use", "pinned", "in use"):
            table.add_column(col, justify="left" if col == "tier" else "right", no_wrap=True)
        for e in answer["entries"]:
            until = e.get("pinned_until")
            table.add_row(e["hash"][:shown], f"{e['tokens']:,}", str(e["cached_blocks"]), str(e["tier"]),
                          str(e["hits"]), _ago(e.get("last_use"), now), f"{until - now:.0f} s" if until else "—",
                          "yes" if e.get("in_use") else "")  # fmt: skip
        if not answer["entries"]:
            table.caption = "nothing cached"
        elif shown < 32:
            table.caption = "hashes cut to fit; --json or a wider terminal shows them whole"
        console.print(table)
    elif action == "pin":
        prefix = _whole_hash(client, args.hash)
        answer = client.pin(prefix, args.ttl)
        print(f"pinned {prefix}: {answer['pinned_blocks']} blocks for {args.ttl:g} s")
    elif action == "unpin":
        prefix = _whole_hash(client, args.hash)
        answer = client.unpin(prefix)
        print(f"unpinned {prefix}: {answer['unpinned_blocks']} blocks released")
    else:
        if not args.all:
            args.hash = _whole_hash(client, args.hash)
        answer = client.evict(None if args.all else args.hash)
        removed = answer["removed"]
        what = "everything unused" if args.all else args.hash
        print(f"evicted {what}: " + (", ".join(f"{n} from {t}" for t, n in removed.items()) or "nothing held"))
    return 0


def _cache_warm(args: argparse.Namespace) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from cacheproxy.admin_client import ServerError, WarmResult, read_warm_prompts

    prompts = read_warm_prompts(args.file)
    if not prompts:
        raise CommandFailed(f"{args.file} holds no prompt")
    client = _admin_client(args, api_key=_client_api_key(args))
    block_size = int(client.stats()["block_size"])  # also checks the admin key before any prompt is sent
    model = client.model()
    results: list[WarmResult] = []
    progress = Progress(TextColumn("warming"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=_console(stderr=True), transient=True)
    with progress, ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        task = progress.add_task("warm", total=len(prompts))
        futures = [pool.submit(client.warm, p, model, block_size) for p in prompts]
        try:
            for fut in futures:
                results.append(fut.result())
                progress.advance(task)
        except ServerError:
            for f in futures:
                f.cancel()
            raise
    summary = {
        "prompts": len(results),
        "prompt_tokens": sum(r.prompt_tokens for r in results),
        "cached_tokens": sum(r.cached_after for r in results),
        "already_cached_tokens": sum(min(r.cached_before, r.cached_after) for r in results),
        "newly_cached_tokens": sum(max(0, r.cached_after - r.cached_before) for r in results),
        "block_size": block_size,
    }
    if args.json:
        _print_json(summary)
    else:
        print(f"warmed {summary['prompts']} prompts ({summary['prompt_tokens']:,} prompt tokens): "
              f"{summary['cached_tokens']:,} tokens are cached now (what sending them again reuses), "
              f"{summary['newly_cached_tokens']:,} of them new, "
              f"{summary['already_cached_tokens']:,} were cached already")
    return 0


# --- bench ----------------------------------------------------------------------------------------

def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    from cacheproxy.workload import WORKLOADS, WorkloadSizes

    _add_url_argument(parser)
    _add_api_key_argument(parser)
    parser.add_argument("--workload", choices=WORKLOADS, default="mixed")
    parser.add_argument("--requests", type=_positive_int, default=100)
    parser.add_argument("--concurrency", type=_positive_int, default=8, help="sessions running at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="default: the first model the server lists")
    parser.add_argument("--max-tokens", type=_positive_int, default=16, help="output tokens per request")
    parser.add_argument("--block-size", type=_positive_int, default=16,
                        help="the server's block size, for classing requests hit / partial / miss")
    parser.add_argument("--png", type=Path, default=None, help="write TTFT charts to this PNG file")
    parser.add_argument("--json", action="store_true", help="print the summary and every request as JSON")
    sizes = parser.add_argument_group("sizes (words; a word is one to three tokens)")
    for name, info in WorkloadSizes.__dataclass_fields__.items():
        sizes.add_argument("--" + name.replace("_", "-"), dest=f"size_{name}", type=_positive_int, metavar="N",
                           default=info.default, help=f"(default: {info.default})")
    add_settings_arguments(parser, only=("host", "port"))


def cmd_bench(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cacheproxy.bench import BenchOptions, BenchSetupError, bench_png, bench_renderable, run_bench
    from cacheproxy.workload import WorkloadSizes, build_workload

    try:
        sizes = WorkloadSizes(**{k.removeprefix("size_"): v for k, v in vars(args).items() if k.startswith("size_")})
        workload = build_workload(args.workload, args.requests, args.seed, sizes)
    except ValueError as exc:
        raise CommandFailed(str(exc)) from None
    options = BenchOptions(_server_url(args), _client_api_key(args), args.model, args.concurrency,
                           args.max_tokens, args.block_size)
    for noisy in ("httpx", "httpx2", "httpcore", "openai"):  # a line per request would bury the progress bar
        logging.getLogger(noisy).setLevel(logging.WARNING)
    progress = Progress(TextColumn(f"bench {workload.name}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[hits]}"), TimeElapsedColumn(),
                        console=_console(stderr=True), transient=True)
    with progress:
        task = progress.add_task("bench", total=workload.requests, hits="")
        seen = {"prompt": 0, "cached": 0, "failed": 0}

        def on_done(r: Any) -> None:
            seen["prompt"] += r.prompt_tokens
            seen["cached"] += r.cached_tokens
            seen["failed"] += not r.ok
            rate = seen["cached"] / seen["prompt"] if seen["prompt"] else 0.0
            progress.update(task, advance=1, hits=f"hit rate {rate:.0%}, failed {seen['failed']}")

        try:
            summary = asyncio.run(run_bench(workload, options, on_done))
        except BenchSetupError as exc:
            raise CommandFailed(str(exc)) from None
    if args.png:
        _write_output(args.png, bench_png(summary), "the charts")
    if args.json:
        _print_json(summary)
    else:
        _console().print(bench_renderable(summary))
    return 0 if summary["ok"] else 1


SUBCOMMANDS: list[Subcommand] = [
    Subcommand("serve", "serve the OpenAI-compatible API (default model: the built-in tiny one)",
               _serve_arguments, cmd_serve),
    Subcommand("route", "route requests to replicas by prompt prefix (--backend URL, repeated)",
               _route_arguments, cmd_route),
    Subcommand("stats", "live hit rate, TTFT, tier use and queue of a running server (GET /admin/stats)",
               _stats_arguments, _fails_in_one_line(cmd_stats)),
    Subcommand("report", "hit rate and TTFT from the records log over a window; PNG, HTML, JSON",
               _report_arguments, _fails_in_one_line(cmd_report)),
    Subcommand("cache", "list, pin, unpin, evict and warm cached prefixes of a running server",
               _cache_arguments, _fails_in_one_line(cmd_cache)),
    Subcommand("bench", "replay seeded agent / chat / RAG traffic and measure hit rate and client TTFT",
               _bench_arguments, _fails_in_one_line(cmd_bench)),
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
