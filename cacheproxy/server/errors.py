"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}`, and the middleware that makes
every failure one of them (a stack trace never reaches a client)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from cacheproxy.log import get_logger

log = get_logger(__name__)

# The error `type` OpenAI's clients see for each status.
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """A request the server answers with an error object instead of a result."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _TYPE_BY_STATUS.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = dict(headers or {})

    def body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.Response(
            status=self.status,
            text=json.dumps(self.body()),
            content_type="application/json",
            headers=self.headers,
        )


def _from_http_exception(exc: web.HTTPException, request: web.Request) -> ApiError:
    """aiohttp's own refusals (unknown route, wrong method, body too large) in OpenAI's shape."""
    headers: dict[str, str] = {}
    if isinstance(exc, web.HTTPMethodNotAllowed):
        headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
        return ApiError(405, f"method {request.method} is not allowed on {request.path}",
                        code="method_not_allowed", headers=headers)
    if exc.status == 404:
        return ApiError(404, f"no route {request.method} {request.path}", code="not_found")
    if exc.status == 413:
        return ApiError(413, "request body is too large", code="request_too_large")
    return ApiError(exc.status, exc.reason or "request failed", code=None, headers=headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:  # redirects and the like pass through untouched
            raise
        return _from_http_exception(exc, request).response()
    except ConnectionResetError:
        # The client went away mid-response: nothing can be sent back; the handler already cleaned up.
        log.info("client_disconnected", path=request.path)
        raise
    except Exception:
        log.exception("unhandled_error", path=request.path, method=request.method)
        return ApiError(500, "internal server error", code="internal_error").response()
