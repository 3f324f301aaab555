"""/admin/*: operator routes behind Settings.admin_key (loopback only when no key is set, see auth.py)."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from cacheproxy.cache.records import summarize_records
from cacheproxy.server.auth import check_admin
from cacheproxy.server.openai_routes import require_ready
from cacheproxy.server.state import STATE


async def admin_stats(request: web.Request) -> web.Response:
    """The engine's own stats plus hit rate and TTFT percentiles over this process's request records."""
    state = request.app[STATE]
    check_admin(request, state.settings)
    require_ready(state)
    recent = list(state.recent)  # a snapshot; summarizing 100k records runs off the event loop
    summary = await state.run_blocking(summarize_records, recent)
    engine_stats: dict[str, Any] = await state.run_blocking(state.engine.stats)
    return web.json_response({
        "model": state.engine.model_name,
        "uptime_s": time.time() - state.started_at,
        "engine": engine_stats,
        "records": summary,
        "records_path": str(state.settings.records_path),
    })


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/stats", admin_stats)
