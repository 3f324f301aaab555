"""`cacheproxy bench`: replays a seeded workload (workload.py) against a server through the official
openai AsyncOpenAI client, streaming, and measures what a client sees.

TTFT is measured client-side: from sending the request to the first streamed chunk that carries a
choice. Cached tokens come from the stream's final usage chunk (`stream_options.include_usage`,
`usage.prompt_tokens_details.cached_tokens`); each request is classed miss / partial / hit from its own
cached and prompt tokens with the server's rule (records.cache_class). The sessions of a workload run
`concurrency` at a time, the requests inside one session in order.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from cacheproxy.cache.records import cache_class, percentile
from cacheproxy.report import CACHE_CLASSES, CLASS_COLORS, ReportError, fmt_ms, fmt_pct, pyplot
from cacheproxy.workload import BenchRequest, Workload


@dataclass(slots=True)
class RequestResult:
    kind: str
    session: int
    turn: int
    started: float  # seconds since the bench began
    ok: bool
    error: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    cache: str | None = None  # hit | partial | miss, for a request that succeeded


@dataclass(frozen=True, slots=True)
class BenchOptions:
    base_url: str  # the server root; the client talks to base_url + "/v1"
    api_key: str
    model: str | None = None  # default: the first model the server lists
    concurrency: int = 8
    max_tokens: int = 16
    block_size: int = 16  # the server's block size, for the hit / partial / miss rule
    timeout_s: float = 300.0


class BenchSetupError(Exception):
    """The bench cannot start (server unreachable, no model, openai missing); one line to show."""


def _openai() -> Any:
    try:
        import openai
    except ImportError:
        raise BenchSetupError("bench needs the openai client: pip install 'cacheproxy[bench]'") from None
    return openai


async def _pick_model(client: Any, options: BenchOptions) -> str:
    openai = _openai()
    try:
        models = await client.models.list()
    except openai.APIConnectionError:
        raise BenchSetupError(f"cannot reach the server at {options.base_url} (is `cacheproxy serve` "
                              "running there?)") from None
    except openai.AuthenticationError:
        raise BenchSetupError("the server refused the API key; pass --api-key or set OPENAI_API_KEY") from None
    except openai.APIStatusError as exc:
        raise BenchSetupError(f"GET /v1/models failed with {exc.status_code}") from None
    ids = [m.id for m in models.data]
    if options.model is not None:
        if options.model not in ids:
            raise BenchSetupError(f"the server does not serve {options.model!r} (it serves {', '.join(ids)})")
        return options.model
    if not ids:
        raise BenchSetupError(f"{options.base_url} serves no model")
    return str(ids[0])


async def _one(client: Any, model: str, req: BenchRequest, options: BenchOptions, t_bench: float
               ) -> RequestResult:
    openai = _openai()
    t0 = time.perf_counter()
    res = RequestResult(req.kind, req.session, req.turn, t0 - t_bench, ok=False)
    kwargs: dict[str, Any] = {"model": model, "messages": req.messages, "max_tokens": options.max_tokens,
                              "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
                              "prompt_cache_key": req.prompt_cache_key}
    if req.tools:
        kwargs["tools"] = req.tools
    usage = None
    try:
        stream = await client.chat.completions.create(**kwargs)
        async for chunk in stream:
            if res.ttft_s is None and chunk.choices:
                res.ttft_s = time.perf_counter() - t0
            if chunk.usage is not None:
                usage = chunk.usage
    except openai.APIStatusError as exc:
        body = exc.body if isinstance(exc.body, dict) else {}
        res.error = str(body.get("code") or exc.status_code)
    except openai.APIError as exc:  # a connection lost, or an error event inside the stream
        res.error = str(getattr(exc, "code", None) or type(exc).__name__)
    res.e2e_s = time.perf_counter() - t0
    if res.error is None:
        if usage is None:
            res.error = "no_usage"
        else:
            res.ok = True
            res.prompt_tokens = usage.prompt_tokens
            details = usage.prompt_tokens_details
            res.cached_tokens = int(getattr(details, "cached_tokens", 0) or 0) if details is not None else 0
            res.completion_tokens = usage.completion_tokens
            res.cache = cache_class(res.prompt_tokens, res.cached_tokens, options.block_size)
    return res


async def run_bench(workload: Workload, options: BenchOptions,
                    on_done: Callable[[RequestResult], None] | None = None) -> dict[str, Any]:
    """Runs every request of the workload; returns the summary (what --json prints) with the results."""
    openai = _openai()
    async with openai.AsyncOpenAI(base_url=options.base_url.rstrip("/") + "/v1", api_key=options.api_key,
                                  max_retries=0, timeout=options.timeout_s) as client:
        model = await _pick_model(client, options)
        pending: asyncio.Queue[list[BenchRequest]] = asyncio.Queue()
        for session in workload.sessions:
            pending.put_nowait(session)
        results: list[RequestResult] = []
        t_bench = time.perf_counter()

        async def worker() -> None:
            while not pending.empty():
                session = pending.get_nowait()
                for req in session:
                    res = await _one(client, model, req, options, t_bench)
                    results.append(res)
                    if on_done is not None:
                        on_done(res)

        await asyncio.gather(*(worker() for _ in range(max(1, options.concurrency))))
        wall = time.perf_counter() - t_bench
    results.sort(key=lambda r: r.started)
    return summarize_bench(workload, options, model, results, wall)


def _pcts(values: list[float]) -> dict[str, Any]:
    return {"count": len(values), "p50": percentile(values, 50), "p95": percentile(values, 95),
            "p99": percentile(values, 99)}


def _token_rate(results: list[RequestResult]) -> float:
    prompt = sum(r.prompt_tokens for r in results)
    return sum(r.cached_tokens for r in results) / prompt if prompt else 0.0


def summarize_bench(workload: Workload, options: BenchOptions, model: str, results: list[RequestResult],
                    wall_s: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error or "?"] = errors.get(r.error or "?", 0) + 1
    by_kind = {}
    for kind in sorted({r.kind for r in results}):
        rs = [r for r in ok if r.kind == kind]
        by_kind[kind] = {"requests": sum(r.kind == kind for r in results), "ok": len(rs),
                         "prompt_tokens": sum(r.prompt_tokens for r in rs),
                         "cached_tokens": sum(r.cached_tokens for r in rs), "token_hit_rate": _token_rate(rs),
                         "ttft_s": _pcts([r.ttft_s for r in rs if r.ttft_s is not None])}
    return {
        "workload": workload.name, "seed": workload.seed, "model": model, "url": options.base_url,
        "concurrency": options.concurrency, "max_tokens": options.max_tokens, "block_size": options.block_size,
        "sessions": len(workload.sessions),
        "requests": len(results), "ok": len(ok), "failed": len(results) - len(ok), "errors": errors,
        "wall_s": wall_s, "requests_per_s": len(results) / wall_s if wall_s > 0 else None,
        "prompt_tokens": sum(r.prompt_tokens for r in ok), "cached_tokens": sum(r.cached_tokens for r in ok),
        "completion_tokens": sum(r.completion_tokens for r in ok), "token_hit_rate": _token_rate(ok),
        "request_hit_rate": sum(r.cached_tokens > 0 for r in ok) / len(ok) if ok else 0.0,
        "ttft_s": {"all": _pcts([r.ttft_s for r in ok if r.ttft_s is not None]),
                   **{c: _pcts([r.ttft_s for r in ok if r.cache == c and r.ttft_s is not None])
                      for c in CACHE_CLASSES}},
        "by_kind": by_kind,
        "results": [asdict(r) for r in results],
    }


def bench_renderable(summary: dict[str, Any]) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    head = Text(
        f"{summary['workload']} workload, seed {summary['seed']}: {summary['requests']} requests in "
        f"{summary['sessions']} sessions, concurrency {summary['concurrency']}, {summary['wall_s']:.1f} s "
        f"({summary['requests_per_s'] or 0:.1f} req/s); ok {summary['ok']}, failed {summary['failed']}"
        + (f" {summary['errors']}" if summary["errors"] else ""), style="bold")
    hits = Text(f"token hit rate {fmt_pct(summary['token_hit_rate'])} ({summary['cached_tokens']:,} of "
                f"{summary['prompt_tokens']:,} prompt tokens cached); requests with a hit "
                f"{fmt_pct(summary['request_hit_rate'])}")
    ttft = Table(title="Client TTFT by cache state", title_justify="left")
    for col in ("cache", "requests", "p50", "p95", "p99"):
        ttft.add_column(col, justify="left" if col == "cache" else "right")
    for c in (*CACHE_CLASSES, "all"):
        p = summary["ttft_s"][c]
        ttft.add_row(c, str(p["count"]), fmt_ms(p["p50"]), fmt_ms(p["p95"]), fmt_ms(p["p99"]),
                     style="bold" if c == "all" else CLASS_COLORS.get(c, ""))
    kinds = Table(title="By request kind", title_justify="left")
    for col in ("kind", "requests", "prompt tokens", "cached", "hit rate", "TTFT p50", "TTFT p95"):
        kinds.add_column(col, justify="left" if col == "kind" else "right")
    for kind, k in summary["by_kind"].items():
        kinds.add_row(kind, str(k["requests"]), f"{k['prompt_tokens']:,}", f"{k['cached_tokens']:,}",
                      fmt_pct(k["token_hit_rate"]), fmt_ms(k["ttft_s"]["p50"]), fmt_ms(k["ttft_s"]["p95"]))
    return Group(head, hits, ttft, kinds)


def bench_png(summary: dict[str, Any]) -> bytes:
    """TTFT of each request in start order by cache state, and the TTFT distribution of each state."""
    plt = pyplot()
    ok = [r for r in summary["results"] if r["ok"] and r["ttft_s"] is not None]
    if not ok:
        raise ReportError("no successful request to chart")
    fig, (ax_t, ax_cdf) = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    try:
        fig.suptitle(f"cacheproxy bench · {summary['workload']} · {summary['requests']} requests · "
                     f"concurrency {summary['concurrency']} · token hit rate {fmt_pct(summary['token_hit_rate'])}",
                     fontsize=10)
        for c in CACHE_CLASSES:
            pts = [r for r in ok if r["cache"] == c]
            if not pts:
                continue
            ax_t.scatter([r["started"] for r in pts], [r["ttft_s"] * 1000 for r in pts], s=12, alpha=0.7,
                         color=CLASS_COLORS[c], label=f"{c} ({len(pts)})")
            xs = sorted(r["ttft_s"] * 1000 for r in pts)
            ax_cdf.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", color=CLASS_COLORS[c],
                        label=f"{c}: p50 {fmt_ms(summary['ttft_s'][c]['p50'])}")
        ax_t.set_xlabel("request start (s into the bench)")
        ax_t.set_ylabel("client TTFT (ms)")
        ax_t.set_title("TTFT of each request", fontsize=10, loc="left")
        ax_cdf.set_xlabel("client TTFT (ms)")
        ax_cdf.set_ylabel("share of requests")
        ax_cdf.set_title("TTFT distribution by cache state", fontsize=10, loc="left")
        if min(r["ttft_s"] for r in ok) > 0:
            ax_t.set_yscale("log")
            ax_cdf.set_xscale("log")
        for ax in (ax_t, ax_cdf):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        return buf.getvalue()
    finally:
        plt.close(fig)
