"""What every route of one running server shares: settings, the engine, metrics, the records log."""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web

from cacheproxy.cache.records import RecordsLog, RequestRecord
from cacheproxy.config import Settings
from cacheproxy.server.metrics import ServerMetrics
from cacheproxy.server.response_store import ResponseStore

if TYPE_CHECKING:
    from cacheproxy.engine.async_engine import AsyncEngine
    from cacheproxy.server.prompt_encoder import PromptEncoder

T = TypeVar("T")

# Records kept in memory for /admin/stats; the log file keeps them all.
RECENT_RECORDS = 100_000
# Threads for tokenization and chat templating (the tokenizers library releases the GIL while encoding).
TOKENIZER_THREADS = 4


class ServerState:
    def __init__(self, settings: Settings, engine: AsyncEngine) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = ServerMetrics(self.engine_stats)
        self.records = RecordsLog(settings.records_path)
        self.recent: collections.deque[RequestRecord] = collections.deque(maxlen=RECENT_RECORDS)
        self.executor = ThreadPoolExecutor(max_workers=TOKENIZER_THREADS, thread_name_prefix="tokenize")
        self.engine_start_task: asyncio.Task[None] | None = None
        self.engine_start_error: BaseException | None = None
        self.started_at = time.time()
        self.responses = ResponseStore(settings.responses_store_bytes)
        self.prompt_encoder: PromptEncoder | None = None  # made once the model's tokenizer is loaded

    def engine_stats(self) -> dict[str, Any] | None:
        """The engine's stats, with the server's prompt tokenization beside them."""
        if not self.engine.ready:
            return None
        stats = self.engine.stats()
        encoder = self.prompt_encoder
        if encoder is not None:
            stats = {**stats, "prompt_tokens": {"reused": encoder.tokens_reused, "tokenized": encoder.tokens_encoded}}
        return stats

    def record(self, rec: RequestRecord) -> None:
        self.recent.append(rec)
        self.records.append(rec)

    async def run_blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))


STATE: web.AppKey[ServerState] = web.AppKey("cacheproxy_state", ServerState)
REQUEST_ID: web.RequestKey[str] = web.RequestKey("cacheproxy_request_id", str)
