"""The engine as the server sees it: submit a request, iterate over its outputs.

The model runs on its own thread (torch releases the GIL inside kernels); the event loop only
moves messages. Requests and aborts enter through a thread-safe inbox; outputs come back through
`loop.call_soon_threadsafe` into one asyncio queue per request.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import torch

from cacheproxy.config import Settings
from cacheproxy.engine.engine import LLMEngine
from cacheproxy.engine.request import (
    EngineError,
    EngineOverloaded,
    GenerationOutput,
    GenerationRequest,
    StructuredOutput,
)
from cacheproxy.engine.tokenizer import Tokenizer
from cacheproxy.log import get_logger

log = get_logger(__name__)
T = TypeVar("T")


class AsyncEngine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._engine: LLMEngine | None = None
        self._thread: threading.Thread | None = None
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._pending_lock = threading.Lock()
        self._stats: dict[str, Any] = {}
        self._stats_time = 0.0
        self._queues: dict[str, asyncio.Queue[GenerationOutput | BaseException]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending = 0  # submitted, not yet admitted by the engine thread

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._engine = await self._loop.run_in_executor(None, self._build)
        self._thread = threading.Thread(target=self._run, name="cacheproxy-engine", daemon=True)
        self._thread.start()

    def _build(self) -> LLMEngine:
        engine = LLMEngine.from_settings(self.settings)
        # Before the server reports ready: offered tools are guided (tool_choice "auto"), so most agent
        # requests need the grammar engine's view of the vocabulary.
        if not engine.grammars.warm():
            log.warning("structured outputs and tool-call guidance are unavailable for this tokenizer")
        return engine

    async def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._thread = None
        if self._engine is not None:
            engine, self._engine = self._engine, None
            await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)

    @property
    def ready(self) -> bool:
        return self._engine is not None and self._thread is not None

    def _require(self) -> LLMEngine:
        if self._engine is None:
            raise EngineError("the model is still loading", "model_loading", 503)
        return self._engine

    @property
    def tokenizer(self) -> Tokenizer:
        return self._require().tokenizer

    @property
    def max_model_len(self) -> int:
        return self._require().max_model_len

    @property
    def model_name(self) -> str:
        s = self.settings
        return s.served_model_name or s.model or "cacheproxy-tiny"

    # --- requests -----------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        engine = self._require()
        engine.check_request(request)
        if request.params.structured is not None:
            await self.check_structured(request.params.structured)
        if engine.num_waiting + self._pending >= self.settings.max_waiting_requests:
            raise EngineOverloaded()
        rid = request.request_id
        if rid in self._queues:
            raise EngineError(f"request id {rid} is already running", "duplicate_request")
        q: asyncio.Queue[GenerationOutput | BaseException] = asyncio.Queue()
        self._queues[rid] = q
        with self._pending_lock:
            self._pending += 1
        self._inbox.put(("add", request))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finish_reason is not None:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(rid, None)
            if not finished:
                self._inbox.put(("abort", rid))
                self._wake.set()

    async def check_structured(self, spec: StructuredOutput) -> None:
        """Raises EngineError when the constraint does not compile. Compiling may take a while (a
        second for the first on a large vocabulary), so it runs off the event loop."""
        engine = self._require()
        if engine.structured_compiled(spec):  # the route checked it already, or an earlier request did
            return
        await asyncio.get_running_loop().run_in_executor(None, engine.check_structured, spec)

    async def run_on_engine(self, fn: Callable[[LLMEngine], T]) -> T:
        """Runs fn(engine) on the engine thread between two steps (admin operations)."""
        self._require()
        fut: Future[T] = Future()
        self._inbox.put(("call", (fn, fut)))
        self._wake.set()
        return await asyncio.wrap_future(fut)

    def stats(self) -> dict[str, Any]:
        """The engine's counters as of its last step (published by the engine thread)."""
        self._require()
        return self._stats

    # --- the engine thread ----------------------------------------------------------------
    def _deliver(self, rid: str, item: GenerationOutput | BaseException) -> None:
        loop = self._loop
        assert loop is not None
        loop.call_soon_threadsafe(self._put, rid, item)

    def _put(self, rid: str, item: GenerationOutput | BaseException) -> None:
        q = self._queues.get(rid)
        if q is not None:
            q.put_nowait(item)

    def _drain_inbox(self, engine: LLMEngine) -> None:
        while True:
            try:
                kind, arg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                with self._pending_lock:
                    self._pending -= 1
                try:
                    engine.add_request(arg)
                except EngineError as e:
                    self._deliver(arg.request_id, e)
                except Exception as e:  # a request the checks missed must not stop the engine thread
                    log.exception("request refused by the engine", request_id=arg.request_id)
                    engine.abort(arg.request_id)
                    self._deliver(arg.request_id, EngineError(f"the engine could not take this request: {e}"))
            elif kind == "abort":
                engine.abort(arg)
            elif kind == "call":
                fn, fut = arg
                try:
                    fut.set_result(fn(engine))
                except Exception as e:  # the caller gets it; the engine keeps running
                    fut.set_exception(e)

    def _run(self) -> None:
        engine = self._engine
        assert engine is not None
        self._stats = engine.stats()
        while not self._stop.is_set():
            self._drain_inbox(engine)
            busy = engine.has_work()
            outputs: list[GenerationOutput] = []
            if busy:
                try:
                    outputs = engine.step()
                except Exception as e:
                    log.exception("engine step failed; failing its requests")
                    self._fail_all(engine, e)
            for out in outputs:
                self._deliver(out.request_id, out)
            now = time.monotonic()
            if not busy or now - self._stats_time > 0.05:
                self._stats, self._stats_time = engine.stats(), now
            if not busy:
                self._wake.wait(0.05)
                self._wake.clear()

    def _fail_all(self, engine: LLMEngine, cause: Exception) -> None:
        if isinstance(cause, torch.OutOfMemoryError):
            torch.cuda.empty_cache()
            error = EngineError(
                "the device ran out of memory for this batch; retry, or lower max_num_batched_tokens or "
                "gpu_memory_utilization on the server",
                "insufficient_memory",
                503,
            )
        else:
            error = EngineError(f"internal engine error: {type(cause).__name__}", "server_error", 500)
        for rid in list(engine.seqs):
            engine.abort(rid)
            self._deliver(rid, error)
