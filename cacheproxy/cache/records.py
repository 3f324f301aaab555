"""The request records log: one JSON line per request at `Settings.records_path`.

The server appends from the event loop without blocking it: `RecordsLog.append` only puts the record on a
queue, and a writer thread does the file I/O. `read_records` and `summarize_records` are the reading side
(the admin stats route and `cacheproxy report`).
"""

from __future__ import annotations

import json
import math
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from cacheproxy.log import get_logger

log = get_logger(__name__)

CacheClass = Literal["hit", "partial", "miss"]


def cache_class(prompt_tokens: int, cached_tokens: int, block_size: int) -> CacheClass:
    """hit: every block but the last (which the engine always computes) came from the cache;
    miss: nothing did; partial: in between."""
    if cached_tokens <= 0:
        return "miss"
    if prompt_tokens - cached_tokens <= block_size:
        return "hit"
    return "partial"


@dataclass(slots=True)
class RequestRecord:
    id: str
    time: float  # unix seconds at arrival
    endpoint: str  # "chat" | "completions" | "responses"
    tenant: str
    model: str
    status: int  # HTTP status; 499: the client went away
    prompt_cache_key: str | None = None
    stream: bool = False
    n: int = 1
    prompt_tokens: int = 0
    cached_tokens: int = 0
    cached_tokens_by_tier: dict[str, int] = field(default_factory=dict)
    completion_tokens: int = 0
    cache: CacheClass = "miss"
    queue_time_s: float | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    finish_reason: str | None = None
    error: str | None = None  # the error code, when status is not 200

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


_STOP = object()


class RecordsLog:
    """Appends records as JSON lines from a writer thread; `close()` writes what is queued, then stops."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._queue: queue.SimpleQueue[RequestRecord | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.written = 0

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._write_loop, name="records-writer", daemon=True)
        self._thread.start()

    def append(self, record: RequestRecord) -> None:
        self._queue.put(record)

    def close(self) -> None:
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join()
        self._thread = None

    def _write_loop(self) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            while True:
                item = self._queue.get()
                if item is _STOP:
                    return
                lines = [item]
                # Drain whatever else is waiting so a burst costs one flush.
                while True:
                    try:
                        lines.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                stop = _STOP in lines
                for rec in lines:
                    if isinstance(rec, RequestRecord):
                        fh.write(rec.to_json() + "\n")
                        self.written += 1
                try:
                    fh.flush()
                except OSError as exc:  # a full disk must not take the server down
                    log.warning("records_flush_failed", error=str(exc))
                if stop:
                    return


def read_records(path: Path) -> Iterator[RequestRecord]:
    """Every record in the log, oldest first; a torn or foreign line is skipped."""
    if not path.is_file():
        return
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                data = json.loads(line)
                if isinstance(data, dict):
                    yield RequestRecord.from_dict(data)
            except (ValueError, TypeError):
                continue


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize_records(records: Iterable[RequestRecord]) -> dict[str, Any]:
    """Hit rates and TTFT percentiles (all, and split by hit/partial/miss) over successful requests."""
    total = ok = 0
    prompt_tokens = cached_tokens = completion_tokens = 0
    by_tier: dict[str, int] = {}
    requests_with_hit = 0
    ttft: dict[str, list[float]] = {"hit": [], "partial": [], "miss": []}
    e2e: list[float] = []
    for rec in records:
        total += 1
        if rec.status != 200:
            continue
        ok += 1
        prompt_tokens += rec.prompt_tokens
        cached_tokens += rec.cached_tokens
        completion_tokens += rec.completion_tokens
        requests_with_hit += rec.cached_tokens > 0
        for tier, n in rec.cached_tokens_by_tier.items():
            by_tier[tier] = by_tier.get(tier, 0) + n
        if rec.ttft_s is not None:
            ttft[rec.cache].append(rec.ttft_s)
        if rec.e2e_s is not None:
            e2e.append(rec.e2e_s)

    def pcts(values: list[float]) -> dict[str, float | int | None]:
        return {"count": len(values), "p50": percentile(values, 50), "p95": percentile(values, 95),
                "p99": percentile(values, 99)}

    every_ttft = ttft["hit"] + ttft["partial"] + ttft["miss"]
    return {
        "requests": total,
        "requests_ok": ok,
        "requests_failed": total - ok,
        "prompt_tokens": prompt_tokens,
        "cached_tokens": cached_tokens,
        "cached_tokens_by_tier": by_tier,
        "completion_tokens": completion_tokens,
        "token_hit_rate": cached_tokens / prompt_tokens if prompt_tokens else 0.0,
        "request_hit_rate": requests_with_hit / ok if ok else 0.0,
        "ttft_s": {"all": pcts(every_ttft), **{k: pcts(v) for k, v in ttft.items()}},
        "e2e_s": pcts(e2e),
    }
