"""The aiohttp application: middlewares, routes, the engine's lifecycle, and `serve` (what `cacheproxy
serve` runs until SIGINT/SIGTERM).

The port opens before the model is loaded: /health answers 503 while `engine.start()` runs in the
background and 200 once it is done; the OpenAI routes answer 503 until then.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import uuid
from typing import TYPE_CHECKING

import structlog
from aiohttp import web

from cacheproxy.config import Settings
from cacheproxy.engine.request import EngineError
from cacheproxy.log import get_logger
from cacheproxy.server import admin_routes, openai_routes
from cacheproxy.server.errors import ApiError, Handler, error_middleware
from cacheproxy.server.prompt_encoder import PromptEncoder
from cacheproxy.server.state import REQUEST_ID, STATE, ServerState

if TYPE_CHECKING:
    from cacheproxy.engine.async_engine import AsyncEngine

log = get_logger(__name__)

# Seconds a graceful shutdown waits for requests in flight before cancelling them.
SHUTDOWN_GRACE_S = 15.0


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Names each request; every structlog line logged while serving it carries `request_id`."""
    request_id = uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    response = await handler(request)
    if not response.prepared:
        response.headers["X-Request-Id"] = request_id
    return response


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.engine_start_error is not None:
        raise ApiError(503, f"the model failed to load: {state.engine_start_error}", code="model_load_failed")
    openai_routes.require_ready(state)
    return web.json_response({"status": "ok", "model": state.engine.model_name})


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await state.run_blocking(state.metrics.exposition)  # reads engine.stats(): off the loop
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


_frozen_by_a_server = False


def _freeze_startup_objects() -> None:
    """Moves what start-up made (torch, Triton, the model, the tokenizer: ~300k objects, all alive as
    long as the server) out of the cyclic collector's sight. A full collection walked them in ~150 ms,
    inside whichever request's TTFT it happened to land. The server's cleanup hands them back, so a
    process that starts servers one after another (tests) frees each one's objects in turn."""
    global _frozen_by_a_server
    if not _frozen_by_a_server:
        _frozen_by_a_server = True
        gc.collect()
        gc.freeze()


def _unfreeze_startup_objects() -> None:
    global _frozen_by_a_server
    if _frozen_by_a_server:
        _frozen_by_a_server = False
        gc.unfreeze()


async def _start_engine(state: ServerState) -> None:
    try:
        await state.engine.start()
    except Exception as exc:
        state.engine_start_error = exc
        if isinstance(exc, EngineError):  # a model it cannot serve: the message says why; no traceback
            log.error("engine_start_failed", error=str(exc))
        else:
            log.exception("engine_start_failed")
        raise
    state.prompt_encoder = await state.run_blocking(
        PromptEncoder, state.engine.tokenizer, state.settings.tokenized_prompts_bytes
    )
    _freeze_startup_objects()
    log.info("engine_ready", model=state.engine.model_name, max_model_len=state.engine.max_model_len)


def launch_engine(app: web.Application) -> asyncio.Task[None]:
    """Starts loading the model in the background; /health turns 200 when it is done."""
    state = app[STATE]
    state.engine_start_task = asyncio.create_task(_start_engine(state))
    return state.engine_start_task


def create_app(settings: Settings, engine: AsyncEngine | None = None, *, start_engine: bool = True
               ) -> web.Application:
    """The app around `engine` (a new AsyncEngine(settings) by default). With start_engine=False the caller
    starts the engine itself; until then every model route answers 503."""
    if engine is None:
        from cacheproxy.engine.async_engine import AsyncEngine

        engine = AsyncEngine(settings)
    state = ServerState(settings, engine)
    app = web.Application(middlewares=[request_id_middleware, error_middleware],
                          client_max_size=settings.max_body_bytes)
    app[STATE] = state
    openai_routes.add_routes(app)
    admin_routes.add_routes(app)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)

    async def on_startup(app: web.Application) -> None:
        state.records.start()
        if start_engine:
            launch_engine(app)

    async def on_cleanup(app: web.Application) -> None:
        task = state.engine_start_task
        if task is not None and not task.done():
            task.cancel()
        if task is not None:
            with contextlib.suppress(BaseException):
                await task
        if state.engine.ready:
            await state.engine.shutdown()
        await asyncio.get_running_loop().run_in_executor(None, state.records.close)
        state.executor.shutdown(wait=False, cancel_futures=True)
        _unfreeze_startup_objects()  # back to the collector: the process ends or goes on without this server
        log.info("server_stopped")

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def make_runner(app: web.Application) -> web.AppRunner:
    # handler_cancellation: a client that disconnects cancels its handler, which closes the engine
    # iterators and so aborts the request and frees its KV blocks.
    return web.AppRunner(app, handler_cancellation=True, shutdown_timeout=SHUTDOWN_GRACE_S, access_log=None)


async def serve(settings: Settings) -> int:
    """Serves until SIGINT/SIGTERM (0) or until the model fails to load (1); always shuts down gracefully."""
    app = create_app(settings, start_engine=False)  # the model loads once the port is ours
    runner = make_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    try:
        await site.start()
    except OSError as exc:
        log.error("listen_failed", host=settings.host, port=settings.port, error=str(exc))
        await runner.cleanup()
        return 1
    log.info("listening", url=f"http://{settings.host}:{settings.port}", model=settings.model or "built-in tiny")

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stop_wait = asyncio.create_task(stop.wait())
    start_task = launch_engine(app)
    await asyncio.wait({stop_wait, start_task}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if start_task.done() and not start_task.cancelled() and start_task.exception() is not None:
        code = 1
    elif not stop.is_set():
        await stop_wait
    stop_wait.cancel()
    log.info("shutting_down", reason="signal" if stop.is_set() else "engine_start_failed")
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)
    await runner.cleanup()
    return code
