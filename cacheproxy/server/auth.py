"""Who is asking: API keys map to tenants, the tenant salts the prefix cache; admin routes have their own key.

- `Settings.api_keys` empty: any key (or none) is accepted and the tenant is "default".
- `Settings.admin_key` unset: /admin/* is served only to loopback clients (127.0.0.0/8, ::1), so a
  local operator needs no key while a server bound to 0.0.0.0 does not expose its admin routes.
"""

from __future__ import annotations

import hmac
import ipaddress

from aiohttp import web

from cacheproxy.config import Settings
from cacheproxy.server.errors import ApiError

DEFAULT_TENANT = "default"
# Joins the tenant and a request's own cache_salt; a control character no tenant name contains.
_SALT_SEPARATOR = "\x1f"


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def tenant_of(request: web.Request, settings: Settings) -> str:
    """The tenant the request's API key belongs to; 401 when keys are configured and this one is not."""
    if not settings.api_keys:
        return DEFAULT_TENANT
    token = bearer_token(request)
    if token is None:
        raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    for key, tenant in settings.api_keys.items():
        if hmac.compare_digest(token.encode(), key.encode()):
            return tenant
    raise ApiError(401, "incorrect API key provided", code="invalid_api_key")


def cache_salt(tenant: str, request_salt: str | None, settings: Settings) -> str:
    """The prefix-cache namespace of a request: its tenant (unless the scope is global), narrowed by the
    request's own `cache_salt`."""
    base = "" if settings.cache_scope == "global" else tenant
    if not request_salt:
        return base
    return f"{base}{_SALT_SEPARATOR}{request_salt}" if base else request_salt


def is_loopback(remote: str | None) -> bool:
    if not remote:
        return False
    try:
        return ipaddress.ip_address(remote.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def check_admin(request: web.Request, settings: Settings) -> None:
    if settings.admin_key is None:
        if not is_loopback(request.remote):
            raise ApiError(401, "admin routes are served only to loopback clients when no admin key is set",
                           code="invalid_api_key")
        return
    token = bearer_token(request)
    if token is None or not hmac.compare_digest(token.encode(), settings.admin_key.encode()):
        raise ApiError(401, "incorrect admin key", code="invalid_api_key")
