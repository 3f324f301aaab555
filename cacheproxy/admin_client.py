"""The HTTP client the admin commands use: /admin/* with the admin key, and the OpenAI routes with an API
key for `cache warm` (a warmed prefix must land in the tenant namespace its requests will use).

Plain stdlib HTTP (one request at a time per call, thread-safe), so the CLI's admin commands start
without aiohttp, torch or openai. Every failure becomes a `ServerError` whose message is one line a
person can act on; the CLI prints it and exits non-zero.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ServerError(Exception):
    """A request to the server failed; str(self) is the one line to show."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True, slots=True)
class WarmPrompt:
    """One line of a warm file: a completion prompt (text) or a chat conversation (messages)."""

    line: int
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None


@dataclass(frozen=True, slots=True)
class WarmResult:
    prompt_tokens: int
    cached_before: int  # tokens of the prompt the server served from its cache
    cached_after: int  # tokens the same prompt sent again will be served from the cache


def read_warm_prompts(path: Path) -> list[WarmPrompt]:
    """One prompt a line: a JSON object {"prompt": "..."} or {"messages": [...]}, or else the line's
    text itself. Blank lines are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ServerError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ServerError(f"{path} is not UTF-8 text") from None
    prompts: list[WarmPrompt] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        data: Any = None
        if line.startswith("{"):
            try:
                data = json.loads(line)
            except ValueError:
                data = None  # text that happens to start with a brace
        if not isinstance(data, dict):
            prompts.append(WarmPrompt(number, prompt=raw))
            continue
        if isinstance(data.get("prompt"), str) and data["prompt"]:
            prompts.append(WarmPrompt(number, prompt=data["prompt"]))
        elif isinstance(data.get("messages"), list) and data["messages"]:
            prompts.append(WarmPrompt(number, messages=data["messages"]))
        else:
            raise ServerError(f"{path}:{number}: a JSON line needs a non-empty 'prompt' string or 'messages' list")
    return prompts


def _error_message(body: bytes) -> tuple[str, str | None]:
    try:
        err = json.loads(body)["error"]
        return str(err.get("message") or "").strip(), err.get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        text = body.decode("utf-8", "replace").strip().splitlines()
        return (text[0][:200] if text else ""), None


class AdminClient:
    def __init__(self, base_url: str, admin_key: str | None = None, api_key: str | None = None,
                 timeout: float = 30.0) -> None:
        url = urllib.parse.urlsplit(base_url if "://" in base_url else "http://" + base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ServerError(f"not an http(s) URL: {base_url!r}")
        self.base_url = f"{url.scheme}://{url.netloc}{url.path.rstrip('/')}"
        self._scheme, self._host, self._port = url.scheme, url.hostname, url.port
        self._prefix = url.path.rstrip("/")
        self.admin_key = admin_key
        self.api_key = api_key
        self.timeout = timeout

    # --- transport ---------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, key: str | None = None) -> Any:
        """One JSON request; the decoded JSON answer, or ServerError."""
        conn_cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        conn = conn_cls(self._host, self._port, timeout=self.timeout)
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if key:
            headers["Authorization"] = f"Bearer {key}"
        try:
            conn.request(method, self._prefix + path, body=data, headers=headers)
            resp = conn.getresponse()
            status, payload = resp.status, resp.read()
        except ConnectionRefusedError:
            raise ServerError(f"cannot reach the server at {self.base_url}: connection refused "
                              "(is `cacheproxy serve` running there?)") from None
        except TimeoutError:
            raise ServerError(f"the server at {self.base_url} did not answer {method} {path} "
                              f"within {self.timeout:g} s") from None
        except (OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise ServerError(f"cannot reach the server at {self.base_url}: {reason}") from None
        finally:
            conn.close()
        if status != 200:
            message, code = _error_message(payload)
            if status == 401 and path.startswith("/admin"):
                hint = ("pass the server's admin key with --admin-key or CACHEPROXY_ADMIN_KEY"
                        if key else "this server needs an admin key: pass --admin-key or set CACHEPROXY_ADMIN_KEY")
                raise ServerError(f"the server refused the admin key ({message or 'unauthorized'}); {hint}",
                                  status, code)
            if status == 401:
                raise ServerError(f"the server refused the API key ({message or 'unauthorized'}); pass "
                                  "--api-key or set OPENAI_API_KEY", status, code)
            raise ServerError(f"{method} {path} failed with {status}: {message or 'no details'}", status, code)
        try:
            return json.loads(payload)
        except ValueError:
            raise ServerError(f"{method} {path} answered 200 but not with JSON; is {self.base_url} a "
                              "cacheproxy server?") from None

    def _admin(self, method: str, path: str, body: Any = None) -> Any:
        return self.request(method, path, body, key=self.admin_key)

    # --- admin routes ------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return self._admin("GET", "/admin/stats")

    def cache_entries(self, limit: int = 100) -> dict[str, Any]:
        return self._admin("GET", f"/admin/cache?limit={int(limit)}")

    def pin(self, prefix_hash: str, ttl_s: float) -> dict[str, Any]:
        return self._admin("POST", "/admin/cache/pin", {"hash": prefix_hash, "ttl_s": ttl_s})

    def unpin(self, prefix_hash: str) -> dict[str, Any]:
        return self._admin("POST", "/admin/cache/unpin", {"hash": prefix_hash})

    def evict(self, prefix_hash: str | None) -> dict[str, Any]:
        """One prefix by hash, or (None) everything not in use, from every tier."""
        body: dict[str, Any] = {"all": True} if prefix_hash is None else {"hash": prefix_hash}
        return self._admin("POST", "/admin/cache/evict", body)

    # --- the OpenAI routes, for warming -----------------------------------------------------------
    def model(self) -> str:
        """The id of the (first) model the server serves."""
        data = self.request("GET", "/v1/models", key=self.api_key)
        models = data.get("data") if isinstance(data, dict) else None
        if not models:
            raise ServerError(f"{self.base_url} serves no model")
        return str(models[0]["id"])

    def warm(self, prompt: WarmPrompt, model: str, block_size: int) -> WarmResult:
        """Sends the prompt through the normal API with max_tokens=1: its prefill fills the cache with
        every full block of the prompt. A repeat reuses them all but the block of the last prompt token,
        which the engine always computes (it matters when the prompt ends on a block boundary)."""
        body: dict[str, Any] = {"model": model, "max_tokens": 1, "temperature": 0}
        if prompt.messages is not None:
            path, body["messages"] = "/v1/chat/completions", prompt.messages
        else:
            path, body["prompt"] = "/v1/completions", prompt.prompt
        try:
            usage = self.request("POST", path, body, key=self.api_key)["usage"]
        except ServerError as exc:
            if exc.status == 400:
                raise ServerError(f"line {prompt.line}: {exc}", exc.status, exc.code) from None
            raise
        prompt_tokens = int(usage["prompt_tokens"])
        cached_before = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        return WarmResult(prompt_tokens, cached_before, (prompt_tokens - 1) // block_size * block_size)
