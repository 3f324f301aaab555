"""Server-sent events as OpenAI streams them: `data: {json}\\n\\n` per chunk, `data: [DONE]\\n\\n` last."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


class SSEStream:
    def __init__(self, request: web.Request, headers: dict[str, str] | None = None, named_events: bool = False) -> None:
        """named_events: each payload's "type" also goes out as its `event:` line, and no `[DONE]` ends the
        stream (the Responses API's framing)."""
        self._request = request
        self._named = named_events
        self.response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # proxies (nginx) must not hold chunks back
                **(headers or {}),
            },
        )

    async def open(self) -> None:
        await self.response.prepare(self._request)

    def _frame(self, payload: dict[str, Any]) -> bytes:
        data = b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
        return b"event: " + str(payload["type"]).encode() + b"\n" + data if self._named else data

    async def send(self, payload: dict[str, Any]) -> None:
        await self.response.write(self._frame(payload))

    async def send_many(self, payloads: list[dict[str, Any]]) -> None:
        """Several chunks in one write: fewer syscalls when a step finishes many choices at once."""
        if payloads:
            await self.response.write(b"".join(self._frame(p) for p in payloads))

    async def close(self) -> None:
        if not self._named:
            await self.response.write(b"data: [DONE]\n\n")
        await self.response.write_eof()
