"""/admin/*: operator routes behind Settings.admin_key (loopback only when no key is set, see auth.py).

The cache routes act on the engine only through `AsyncEngine.run_on_engine` (the engine's own operator
methods, run between two steps on the engine thread); they never touch the store themselves.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web

from cacheproxy.cache.records import summarize_records
from cacheproxy.engine.request import EngineError
from cacheproxy.server.auth import check_admin
from cacheproxy.server.errors import ApiError
from cacheproxy.server.openai_routes import read_json, require_ready
from cacheproxy.server.state import STATE, ServerState

T = TypeVar("T")

# Most prefixes GET /admin/cache lists when the client names no limit, and the most it may ask for.
DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 10_000
# Admin bodies are a hash and a number; anything larger is a mistake.
MAX_ADMIN_BODY_BYTES = 4096


def _ready_admin(request: web.Request) -> ServerState:
    state = request.app[STATE]
    check_admin(request, state.settings)
    require_ready(state)
    return state


async def _on_engine(state: ServerState, fn: Callable[[Any], T]) -> T:
    try:
        return await state.engine.run_on_engine(fn)
    except EngineError as exc:
        raise ApiError(exc.status, str(exc), code=exc.code) from None


async def _body(request: web.Request) -> dict[str, Any]:
    body = await read_json(request, MAX_ADMIN_BODY_BYTES)
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_value")
    return body


def _hash_field(body: dict[str, Any]) -> str:
    value = body.get("hash")
    if not isinstance(value, str) or not value:
        raise ApiError(400, "'hash' (the prefix hash `cache ls` shows) is required", code="invalid_value",
                       param="hash")
    return value


async def admin_stats(request: web.Request) -> web.Response:
    """The engine's own stats plus hit rate and TTFT percentiles over this process's request records."""
    state = _ready_admin(request)
    recent = list(state.recent)  # a snapshot; summarizing 100k records runs off the event loop
    summary = await state.run_blocking(summarize_records, recent)
    engine_stats: dict[str, Any] | None = await state.run_blocking(state.engine_stats)
    return web.json_response({
        "model": state.engine.model_name,
        "uptime_s": time.time() - state.started_at,
        "block_size": state.settings.block_size,
        "engine": engine_stats,
        "records": summary,
        "records_path": str(state.settings.records_path),
    })


async def list_cache(request: web.Request) -> web.Response:
    """Cached prefixes (one per chain end), most recently used first."""
    state = _ready_admin(request)
    raw = request.query.get("limit", str(DEFAULT_LIST_LIMIT))
    try:
        limit = int(raw)
    except ValueError:
        limit = -1
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise ApiError(400, f"limit must be an integer in [1, {MAX_LIST_LIMIT}], got {raw!r}",
                       code="invalid_value", param="limit")
    entries = await _on_engine(state, lambda engine: engine.cache_entries(limit))
    return web.json_response({"block_size": state.settings.block_size, "entries": entries})


async def pin_prefix(request: web.Request) -> web.Response:
    state = _ready_admin(request)
    body = await _body(request)
    leaf = _hash_field(body)
    ttl = body.get("ttl_s")
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl) or ttl <= 0:
        raise ApiError(400, "'ttl_s' must be a positive number of seconds", code="invalid_value", param="ttl_s")
    blocks = await _on_engine(state, lambda engine: engine.pin_prefix(leaf, float(ttl)))
    return web.json_response({"hash": leaf, "pinned_blocks": blocks, "pinned_until": time.time() + ttl})


async def unpin_prefix(request: web.Request) -> web.Response:
    state = _ready_admin(request)
    leaf = _hash_field(await _body(request))
    blocks = await _on_engine(state, lambda engine: engine.unpin_prefix(leaf))
    return web.json_response({"hash": leaf, "unpinned_blocks": blocks})


async def evict_prefix(request: web.Request) -> web.Response:
    """{"hash": H} drops that prefix from every tier; {"all": true} drops everything not in use."""
    state = _ready_admin(request)
    body = await _body(request)
    everything = body.get("all") is True
    if everything == ("hash" in body):
        raise ApiError(400, "send either {'hash': H} or {'all': true}", code="invalid_value")
    leaf = None if everything else _hash_field(body)
    removed = await _on_engine(state, lambda engine: engine.evict_prefix(leaf))
    return web.json_response({"hash": leaf, "removed": removed})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/stats", admin_stats)
    app.router.add_get("/admin/cache", list_cache)
    app.router.add_post("/admin/cache/pin", pin_prefix)
    app.router.add_post("/admin/cache/unpin", unpin_prefix)
    app.router.add_post("/admin/cache/evict", evict_prefix)
