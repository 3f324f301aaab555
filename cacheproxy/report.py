"""Hit-rate and TTFT reports, live (`cacheproxy stats`, from GET /admin/stats) or offline (`cacheproxy
report`, from the records log over a time window): the figures as a dict (what --json prints), as rich
tables, as a PNG (matplotlib, the [report] extra, Agg backend) and as one self-contained HTML page.

Both read the same records summary (`cache.records.summarize_records`), so a live and an offline view of
the same requests show the same numbers; the live one adds what only the engine knows (tier use and
capacity, evictions, requests running and waiting).
"""

from __future__ import annotations

import base64
import html
import io
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from cacheproxy.cache.records import RequestRecord, percentile, summarize_records

CACHE_CLASSES = ("hit", "partial", "miss")
CLASS_COLORS = {"hit": "#2ca02c", "partial": "#ff7f0e", "miss": "#d62728"}
TIER_COLORS = {"gpu": "#1f77b4", "cpu": "#9467bd", "disk": "#8c564b", "remote": "#17becf"}
# Tenants drawn in the PNG (the tables and JSON keep them all).
MAX_TENANT_BARS = 12
TIER_ORDER = ("gpu", "cpu", "disk", "remote")
# Rows of the per-prompt_cache_key table in the terminal and HTML views (JSON keeps them all).
TOP_KEYS = 20
NO_KEY = "(none)"


class ReportError(Exception):
    """The report cannot be made (no records, matplotlib missing ...); str(self) is the one line to show."""


# --- figures -------------------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)")
_UNIT_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str) -> float:
    """Seconds in '90', '90s', '15m', '1h', '1h30m', '2d', '1w'."""
    s = text.strip().lower()
    pos, total = 0, 0.0
    for m in _DURATION.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_S[m.group(2)]
        pos = m.end()
    if not s or pos != len(s) or total <= 0:
        raise ValueError(f"not a duration: {text!r} (say 30s, 15m, 1h, 2d)")
    return total


def hit_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """What both views show, from one `summarize_records` result."""
    prompt, cached = summary["prompt_tokens"], summary["cached_tokens"]
    by_tier = {t: summary["cached_tokens_by_tier"].get(t, 0) for t in _tiers(summary["cached_tokens_by_tier"])}
    ttft = summary["ttft_s"]
    return {
        "requests": {"total": summary["requests"], "ok": summary["requests_ok"],
                     "failed": summary["requests_failed"]},
        "requests_by_cache": {c: ttft[c]["count"] for c in CACHE_CLASSES},
        "tokens": {"prompt": prompt, "cached": cached, "computed": prompt - cached,
                   "completion": summary["completion_tokens"]},
        "prefill_saved_tokens": cached,
        "token_hit_rate": summary["token_hit_rate"],
        "request_hit_rate": summary["request_hit_rate"],
        "cached_tokens_by_tier": by_tier,
        "hit_rate_by_tier": {t: (n / prompt if prompt else 0.0) for t, n in by_tier.items()},
        "ttft_s": ttft,
        "e2e_s": summary["e2e_s"],
    }


def live_figures(admin_stats: dict[str, Any], url: str = "") -> dict[str, Any]:
    """The `cacheproxy stats` view of one GET /admin/stats answer."""
    figures = hit_figures(admin_stats["records"])
    engine = admin_stats.get("engine") or {}
    running = engine.get("requests", {})
    figures["requests"].update(running=running.get("running", 0), waiting=running.get("waiting", 0))
    prefix = engine.get("prefix_cache", {})
    queried = int(prefix.get("queries_tokens", 0))
    hits = {t: int(n) for t, n in prefix.get("hits_tokens", {}).items()}
    for key in ("cached_tokens_by_tier", "hit_rate_by_tier"):  # every tier the engine has, 0 where none came
        known = figures[key]
        figures[key] = {t: known.get(t, 0) for t in _tiers([*known, *engine.get("tiers", {})])}
    tiers = {}
    for name in _tiers(engine.get("tiers", {})):
        t = engine["tiers"][name]
        cap = int(t.get("capacity_bytes", 0))
        tiers[name] = {"used_bytes": int(t.get("used_bytes", 0)), "capacity_bytes": cap,
                       "used_fraction": (t.get("used_bytes", 0) / cap) if cap else 0.0,
                       "entries": int(t.get("entries", 0)), "evictions": int(t.get("evictions", 0))}
        if "active_bytes" in t:  # the pool: what running requests hold now
            tiers[name]["active_bytes"] = int(t["active_bytes"])
    return {
        "url": url,
        "model": admin_stats.get("model"),
        "uptime_s": admin_stats.get("uptime_s"),
        "block_size": admin_stats.get("block_size"),
        **figures,
        # The engine's own counters: every lookup, including requests whose answer never reached a client.
        "engine_prefix_cache": {"queried_tokens": queried, "hit_tokens": hits,
                                "token_hit_rate": sum(hits.values()) / queried if queried else 0.0},
        "tiers": tiers,
        "evictions": sum(t["evictions"] for t in tiers.values()),
        # chat prompts' tokens: reused from a recent prompt of the same namespace, or tokenized
        "chat_prompt_tokens": {k: int(v) for k, v in (engine.get("prompt_tokens") or {}).items()},
    }


def _tiers(names: Iterable[str]) -> list[str]:
    names = list(names)
    return [t for t in TIER_ORDER if t in names] + sorted(t for t in names if t not in TIER_ORDER)


def _group_figures(records: list[RequestRecord]) -> dict[str, Any]:
    s = summarize_records(records)
    return {"requests": s["requests"], "ok": s["requests_ok"], "failed": s["requests_failed"],
            "prompt_tokens": s["prompt_tokens"], "cached_tokens": s["cached_tokens"],
            "token_hit_rate": s["token_hit_rate"], "cached_tokens_by_tier": s["cached_tokens_by_tier"],
            "ttft_p50_s": s["ttft_s"]["all"]["p50"], "ttft_p95_s": s["ttft_s"]["all"]["p95"]}


@dataclass
class OfflineReport:
    records_path: Path
    since_s: float | None
    start: float  # the window, unix seconds
    end: float
    records: list[RequestRecord]  # those in the window, oldest first
    figures: dict[str, Any]
    tenants: dict[str, dict[str, Any]]
    prompt_cache_keys: dict[str, dict[str, Any]]
    timeline: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "records_path": str(self.records_path),
            "window": {"since_s": self.since_s, "start": self.start, "end": self.end},
            **self.figures,
            "tenants": self.tenants,
            "prompt_cache_keys": self.prompt_cache_keys,
            "timeline": self.timeline,
        }


def build_report(records: Iterable[RequestRecord], records_path: Path, since_s: float | None = None,
                 now: float | None = None, buckets: int = 24) -> OfflineReport:
    """The report over the records that arrived in the last `since_s` seconds (all, for None)."""
    now = time.time() if now is None else now
    cutoff = None if since_s is None else now - since_s
    window = sorted((r for r in records if cutoff is None or r.time >= cutoff), key=lambda r: r.time)
    if not window:
        where = f"since {since_s:g} s ago " if since_s is not None else ""
        raise ReportError(f"no request records {where}in {records_path}")
    start = cutoff if cutoff is not None else window[0].time
    end = max(now if cutoff is not None else window[-1].time, window[-1].time)
    by_tenant: dict[str, list[RequestRecord]] = {}
    by_key: dict[str, list[RequestRecord]] = {}
    for r in window:
        by_tenant.setdefault(r.tenant or "?", []).append(r)
        by_key.setdefault(r.prompt_cache_key or NO_KEY, []).append(r)
    tenants = {t: _group_figures(rs) for t, rs in sorted(by_tenant.items())}
    keys = {k: _group_figures(rs) for k, rs in sorted(by_key.items(), key=lambda kv: (-len(kv[1]), kv[0]))}
    report = OfflineReport(records_path, since_s, start, end, window,
                           hit_figures(summarize_records(window)), tenants, keys)
    report.timeline = _timeline(window, start, end, buckets)
    return report


def _timeline(records: list[RequestRecord], start: float, end: float, buckets: int) -> list[dict[str, Any]]:
    """Equal time slices of the window: requests, TTFT p50/p95, token hit rate (all and by tier)."""
    width = max((end - start) / buckets, 1e-3)
    slices: list[list[RequestRecord]] = [[] for _ in range(buckets)]
    for r in records:
        slices[min(int((r.time - start) / width), buckets - 1)].append(r)
    out = []
    for i, rs in enumerate(slices):
        ok = [r for r in rs if r.status == 200]
        prompt = sum(r.prompt_tokens for r in ok)
        by_tier: dict[str, int] = {}
        for r in ok:
            for t, n in r.cached_tokens_by_tier.items():
                by_tier[t] = by_tier.get(t, 0) + n
        ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
        out.append({
            "start": start + i * width, "end": start + (i + 1) * width, "requests": len(rs),
            "prompt_tokens": prompt, "cached_tokens": sum(r.cached_tokens for r in ok),
            "token_hit_rate": sum(r.cached_tokens for r in ok) / prompt if prompt else None,
            "hit_rate_by_tier": {t: n / prompt for t, n in by_tier.items()} if prompt else {},
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p95_s": percentile(ttfts, 95),
        })
    return out


# --- terminal -------------------------------------------------------------------------------------

def fmt_ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.1f} ms"


def fmt_pct(fraction: float | None) -> str:
    return "—" if fraction is None else f"{fraction * 100:.1f}%"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _tokens_table(fig: dict[str, Any]) -> Table:
    t = Table(title="Prefix cache (prompt tokens)", title_justify="left")
    for col in ("", "tokens", "share of prompt tokens"):
        t.add_column(col, justify="right" if col else "left")
    tok = fig["tokens"]
    t.add_row("prompt", f"{tok['prompt']:,}", "")
    t.add_row("cached = prefill saved", f"{tok['cached']:,}", fmt_pct(fig["token_hit_rate"]), style="bold")
    for tier, n in fig["cached_tokens_by_tier"].items():
        t.add_row(f"  from {tier}", f"{n:,}", fmt_pct(fig["hit_rate_by_tier"][tier]))
    t.add_row("computed", f"{tok['computed']:,}", fmt_pct(1 - fig["token_hit_rate"] if tok["prompt"] else None))
    return t


def _ttft_table(fig: dict[str, Any]) -> Table:
    t = Table(title="Time to first token", title_justify="left")
    for col in ("cache", "requests", "p50", "p95", "p99"):
        t.add_column(col, justify="left" if col == "cache" else "right")
    for cls in (*CACHE_CLASSES, "all"):
        p = fig["ttft_s"][cls]
        t.add_row(cls, str(p["count"]), fmt_ms(p["p50"]), fmt_ms(p["p95"]), fmt_ms(p["p99"]),
                  style="bold" if cls == "all" else CLASS_COLORS.get(cls, ""))
    return t


def _requests_line(fig: dict[str, Any]) -> Text:
    r = fig["requests"]
    parts = [f"requests {r['total']:,}", f"ok {r['ok']:,}", f"failed {r['failed']:,}"]
    if "running" in r:
        parts += [f"running {r['running']}", f"waiting {r['waiting']}"]
    parts.append(f"with a cache hit {fmt_pct(fig['request_hit_rate'])}")
    return Text(" · ".join(parts))


def live_renderable(fig: dict[str, Any]) -> RenderableType:
    head = Text(f"{fig.get('model')} at {fig.get('url')} · up {fig.get('uptime_s') or 0:.0f} s", style="bold")
    tiers = Table(title="Tiers", title_justify="left")
    for col in ("tier", "used", "capacity", "use", "entries", "evictions"):
        tiers.add_column(col, justify="left" if col == "tier" else "right")
    for name, t in fig["tiers"].items():
        tiers.add_row(name, fmt_bytes(t["used_bytes"]), fmt_bytes(t["capacity_bytes"]),
                      fmt_pct(t["used_fraction"]), f"{t['entries']:,}", f"{t['evictions']:,}")
    parts: list[RenderableType] = [head, _requests_line(fig), _tokens_table(fig), _ttft_table(fig), tiers]
    chat = fig.get("chat_prompt_tokens") or {}
    total = sum(chat.values())
    if total:
        parts.append(Text(f"Chat prompt tokens: {chat.get('reused', 0):,} reused from recent prompts, "
                          f"{chat.get('tokenized', 0):,} tokenized ({fmt_pct(chat.get('reused', 0) / total)} reused)"))  # fmt: skip
    return Group(*parts)


def _groups_table(title: str, label: str, groups: dict[str, dict[str, Any]], top: int | None = None) -> Table:
    t = Table(title=title, title_justify="left")
    for col in (label, "requests", "failed", "prompt tokens", "cached", "hit rate", "TTFT p50", "TTFT p95"):
        t.add_column(col, justify="left" if col == label else "right")
    items = list(groups.items())
    for name, g in items[:top] if top else items:
        t.add_row(name, f"{g['requests']:,}", f"{g['failed']:,}", f"{g['prompt_tokens']:,}",
                  f"{g['cached_tokens']:,}", fmt_pct(g["token_hit_rate"]), fmt_ms(g["ttft_p50_s"]),
                  fmt_ms(g["ttft_p95_s"]))
    if top and len(items) > top:
        t.caption = f"{len(items) - top} more keys in --json"
    return t


def _window_text(report: OfflineReport) -> str:
    span = f"{_utc(report.start)} → {_utc(report.end)} UTC"
    since = f"last {report.since_s:g} s" if report.since_s is not None else "everything"
    return f"{report.records_path} · {since}: {span}"


def report_renderable(report: OfflineReport) -> RenderableType:
    fig = report.figures
    return Group(Text(_window_text(report), style="bold"), _requests_line(fig), _tokens_table(fig),
                 _ttft_table(fig), _groups_table("Tenants", "tenant", report.tenants),
                 _groups_table("prompt_cache_key", "key", report.prompt_cache_keys, TOP_KEYS))


def _utc(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")


# --- PNG and HTML ----------------------------------------------------------------------------------

def pyplot() -> ModuleType:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ReportError("charts need matplotlib: pip install 'cacheproxy[report]'") from None
    return plt


def report_png(report: OfflineReport) -> bytes:
    """Three panels: TTFT of each request over time by cache outcome (with the p50 of each time slice),
    token hit rate by tier over time (stacked), and token hit rate per tenant."""
    plt = pyplot()
    import matplotlib.dates as mdates

    fig, (ax_ttft, ax_hit, ax_ten) = plt.subplots(3, 1, figsize=(11, 10), height_ratios=[3, 2, 2],
                                                  layout="constrained")
    try:
        fig.suptitle(f"cacheproxy · {_window_text(report)}", fontsize=10)
        ok = [r for r in report.records if r.status == 200 and r.ttft_s is not None]
        for cls in CACHE_CLASSES:
            pts = [r for r in ok if r.cache == cls]
            if pts:
                ax_ttft.scatter([_dt(r.time) for r in pts], [r.ttft_s * 1000 for r in pts], s=10, alpha=0.7,
                                color=CLASS_COLORS[cls], label=f"{cls} ({len(pts)})", zorder=2)
        # The p50 of each time slice with traffic, as a bar across the slice (under the points).
        slices = [b for b in report.timeline if b["ttft_p50_s"] is not None]
        if slices:
            ax_ttft.hlines([b["ttft_p50_s"] * 1000 for b in slices], [_dt(b["start"]) for b in slices],
                           [_dt(b["end"]) for b in slices], color="black", linewidth=2, zorder=1,
                           label="p50 per time slice")
        if ok and min(r.ttft_s for r in ok) > 0:
            ax_ttft.set_yscale("log")
        ax_ttft.set_ylabel("TTFT (ms)")
        ax_ttft.set_title("Time to first token by cache outcome", fontsize=10, loc="left")
        # beside the axes: the newest requests are at the right edge, where a legend inside would sit
        ax_ttft.legend(loc="upper left", bbox_to_anchor=(1.005, 1), fontsize=8)
        ax_ttft.grid(alpha=0.3)

        # Stacked bars, one per slice with traffic: a slice without requests has no bar (not a 0% one).
        busy = [b for b in report.timeline if b["prompt_tokens"]]
        tiers = _tiers({t for b in busy for t in b["hit_rate_by_tier"]})
        width = (report.timeline[0]["end"] - report.timeline[0]["start"]) / 86400 * 0.9  # in days, as dates
        bottom = [0.0] * len(busy)
        for tier in tiers:
            heights = [100 * b["hit_rate_by_tier"].get(tier, 0.0) for b in busy]
            ax_hit.bar([_dt((b["start"] + b["end"]) / 2) for b in busy], heights, width=width, bottom=bottom,
                       label=tier, color=TIER_COLORS.get(tier))
            bottom = [x + h for x, h in zip(bottom, heights, strict=True)]
        if tiers:
            ax_hit.legend(loc="upper left", bbox_to_anchor=(1.005, 1), fontsize=8, title="tier", title_fontsize=8)
        ax_hit.set_ylim(0, 100)
        ax_hit.set_ylabel("cached / prompt tokens (%)")
        ax_hit.set_title("Token hit rate by tier, per time slice", fontsize=10, loc="left")
        ax_hit.grid(alpha=0.3)
        pad = max(report.end - report.start, 1.0) * 0.02
        for ax in (ax_ttft, ax_hit):
            ax.set_xlim(_dt(report.start - pad), _dt(report.end + pad))
            locator = mdates.AutoDateLocator()
            ax.xaxis.set_major_locator(locator)
            ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
            ax.set_xlabel("time (UTC)")

        names = list(report.tenants)[:MAX_TENANT_BARS]
        rates = [100 * report.tenants[n]["token_hit_rate"] for n in names]
        bars = ax_ten.barh(names, rates, height=0.6, color="#1f77b4")
        for bar, n in zip(bars, names, strict=True):
            g = report.tenants[n]
            label = f" {g['token_hit_rate']:.0%}: {g['cached_tokens']:,} of {g['prompt_tokens']:,} tokens, {g['requests']} requests "
            inside = bar.get_width() > 50
            ax_ten.annotate(label, (bar.get_width(), bar.get_y() + bar.get_height() / 2), va="center",
                            ha="right" if inside else "left", color="white" if inside else "black", fontsize=8)
        ax_ten.set_xlim(0, 100)
        ax_ten.set_ylim(max(len(names), 3) - 0.5, -0.5)  # a few tenants keep thin bars, top down
        ax_ten.set_xlabel("token hit rate (%)")
        ax_ten.set_title("Token hit rate by tenant", fontsize=10, loc="left")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        return buf.getvalue()
    finally:
        plt.close(fig)


def _dt(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def _html_table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def report_html(report: OfflineReport, png: bytes | None) -> str:
    """One page, no outside resources: the tables and (when given) the chart inlined as a data URI."""
    fig = report.figures
    tok = fig["tokens"]
    cache_rows = [["prompt", f"{tok['prompt']:,}", ""],
                  ["cached = prefill saved", f"{tok['cached']:,}", fmt_pct(fig["token_hit_rate"])]]
    cache_rows += [[f"from {t}", f"{n:,}", fmt_pct(fig["hit_rate_by_tier"][t])]
                   for t, n in fig["cached_tokens_by_tier"].items()]
    ttft_rows = [[c, str(fig["ttft_s"][c]["count"]), fmt_ms(fig["ttft_s"][c]["p50"]),
                  fmt_ms(fig["ttft_s"][c]["p95"]), fmt_ms(fig["ttft_s"][c]["p99"])] for c in (*CACHE_CLASSES, "all")]

    def group_rows(groups: dict[str, dict[str, Any]]) -> list[list[str]]:
        return [[n, f"{g['requests']:,}", f"{g['failed']:,}", f"{g['prompt_tokens']:,}", f"{g['cached_tokens']:,}",
                 fmt_pct(g["token_hit_rate"]), fmt_ms(g["ttft_p50_s"]), fmt_ms(g["ttft_p95_s"])]
                for n, g in list(groups.items())[:TOP_KEYS * 5]]

    group_head = ["requests", "failed", "prompt tokens", "cached", "hit rate", "TTFT p50", "TTFT p95"]
    chart = (f'<img alt="TTFT over time, hit rate by tier, hit rate by tenant" '
             f'src="data:image/png;base64,{base64.b64encode(png).decode()}">' if png else
             "<p>(no chart: matplotlib is not installed)</p>")
    r = fig["requests"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cacheproxy report</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse;margin:0 0 1.5em}}
th,td{{border:1px solid #ccc;padding:3px 8px;text-align:right}}th:first-child,td:first-child{{text-align:left}}
img{{max-width:100%}}</style></head><body>
<h1>cacheproxy report</h1>
<p>{html.escape(_window_text(report))}</p>
<p>{r['total']:,} requests, {r['ok']:,} ok, {r['failed']:,} failed; {fmt_pct(fig['request_hit_rate'])} with a cache hit.</p>
<h2>Prefix cache (prompt tokens)</h2>{_html_table(["", "tokens", "share"], cache_rows)}
<h2>Time to first token</h2>{_html_table(["cache", "requests", "p50", "p95", "p99"], ttft_rows)}
<h2>Charts</h2>{chart}
<h2>Tenants</h2>{_html_table(["tenant", *group_head], group_rows(report.tenants))}
<h2>prompt_cache_key</h2>{_html_table(["key", *group_head], group_rows(report.prompt_cache_keys))}
</body></html>
"""


def write_file(path: Path, data: bytes | str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            path.write_text(data, encoding="utf-8")
        else:
            path.write_bytes(data)
    except OSError as exc:
        raise ReportError(f"cannot write {path}: {exc.strerror or exc}") from None
