"""The prefix-affinity router (`cacheproxy route`): an aiohttp reverse proxy in front of replicas
that sends each request to the replica most likely to hold its prefix in its GPU tier.

Affinity key, per request (hashed with xxh3_128, never Python's `hash()`):
- `prompt_cache_key` when the client sends one (OpenAI's field for "these requests share a prefix");
- else the head of the prompt. The router has no tokenizer, so it hashes text: for chat, the JSON
  of `tools` and the messages up to and including the first user message, cut to
  `router_prefix_bytes`; for the Responses API, the same of `instructions`, `tools` and the input
  items up to the first user message; for completions, the first `router_prefix_bytes` of the prompt. Why the
  head and not "the first N KB of everything": a conversation grows at its end, so while it is
  shorter than N KB every turn would hash differently and land elsewhere; the system prompt, the
  tools and the first user message are what every turn of one conversation starts with.
- the Authorization header and `cache_salt` are mixed in: replicas keep tenants' prefixes apart,
  so equal text of two tenants need not meet on one replica.

Placement: a consistent-hash ring with `router_virtual_nodes` points per replica, so adding or
removing a replica moves only about 1/N of the keys. A request goes to the first replica clockwise
from its key that is healthy and has fewer than `router_max_in_flight` requests in flight; when all
healthy ones are that busy, to the least loaded; when a replica refuses (connection error, 429 or
503), to the next one. A request is re-sent only when the replica did not take it (no connection,
or a 429/503 answer) or the connection broke before any answer; once a response has begun, its
bytes stream through to the client chunk by chunk (SSE included) and are never retried.

Health: GET /health on every replica each `router_health_interval_s`, and a replica that fails a
connection or answers non-200 is marked down at once (the next check brings it back); one that lets
two checks in a row time out is marked down too, one slow answer alone is not. The router's own /health is 200
while any replica is healthy; /v1/models comes from a healthy replica; /metrics is the router's.
A Responses API request that continues a response (`previous_response_id`), and GET/DELETE of one by
id, go to the replica that made it: each keeps its responses in its own memory.
`router_policy = round_robin` turns affinity off (for comparisons).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import json
import signal
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import xxhash
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from cacheproxy.config import Settings
from cacheproxy.log import get_logger

log = get_logger(__name__)

# Headers that belong to one hop (RFC 9110 §7.6.1) or that aiohttp sets itself.
_HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
     "transfer-encoding", "upgrade", "host", "content-length"}
)  # fmt: skip
# Answers that mean "this replica did not take the request, another may".
_REFUSALS = frozenset({429, 503})
BACKEND_HEADER = "X-Cacheproxy-Backend"
SLOW_CHECKS_TO_MARK_DOWN = 2
# Responses API ids whose replica the router remembers (the newest; ~100 bytes each).
RESPONSE_OWNERS = 100_000


class HashRing:
    """Consistent hashing: every node owns `virtual_nodes` points on a 64-bit circle; a key belongs
    to the first point clockwise from its own hash."""

    def __init__(self, nodes: Sequence[str] = (), virtual_nodes: int = 64) -> None:
        self.virtual_nodes = virtual_nodes
        self._points: list[int] = []
        self._owners: list[str] = []
        self.nodes: list[str] = []
        for node in nodes:
            self.add(node)

    @staticmethod
    def _hash(data: bytes) -> int:
        return xxhash.xxh3_64_intdigest(data)

    def add(self, node: str) -> None:
        if node in self.nodes:
            return
        self.nodes.append(node)
        for i in range(self.virtual_nodes):
            point = self._hash(f"{node}#{i}".encode())
            at = bisect.bisect(self._points, point)
            self._points.insert(at, point)
            self._owners.insert(at, node)

    def remove(self, node: str) -> None:
        if node not in self.nodes:
            return
        self.nodes.remove(node)
        kept = [(p, o) for p, o in zip(self._points, self._owners, strict=True) if o != node]
        self._points = [p for p, _ in kept]
        self._owners = [o for _, o in kept]

    def walk(self, key: bytes) -> list[str]:
        """Every node once, in ring order from the key's owner: the owner first, then its fallbacks."""
        if not self._points:
            return []
        start = bisect.bisect(self._points, self._hash(key))
        seen: list[str] = []
        n = len(self._points)
        for i in range(n):
            owner = self._owners[(start + i) % n]
            if owner not in seen:
                seen.append(owner)
                if len(seen) == len(self.nodes):
                    break
        return seen

    def owner(self, key: bytes) -> str | None:
        nodes = self.walk(key)
        return nodes[0] if nodes else None


def _head_to_first_user(items: list[Any]) -> list[Any]:
    end = next((i + 1 for i, m in enumerate(items) if isinstance(m, dict) and m.get("role") == "user"), len(items))
    return items[:end]


def affinity_key(body: Any, prefix_bytes: int, authorization: str = "", responses: bool = False) -> bytes | None:
    """The bytes that name a request's prefix (see the module docstring); None when the body has
    no prompt the router understands (the request then goes to the least loaded replica).
    responses: the body is a Responses API one (its `input` is the conversation)."""
    if not isinstance(body, dict):
        return None
    scope = json.dumps([authorization, body.get("cache_salt")]).encode()
    cache_key = body.get("prompt_cache_key")
    if isinstance(cache_key, str) and cache_key:
        head = b"key:" + cache_key.encode()
    elif isinstance(body.get("messages"), list):
        rendered = json.dumps(
            {"tools": body.get("tools"), "messages": _head_to_first_user(body["messages"])},
            sort_keys=True, separators=(",", ":"), ensure_ascii=False,
        )  # fmt: skip
        head = b"chat:" + rendered.encode()[:prefix_bytes]
    elif responses and isinstance(body.get("input"), str | list):
        items = body["input"]
        rendered = json.dumps(
            {"instructions": body.get("instructions"), "tools": body.get("tools"),
             "input": _head_to_first_user(items) if isinstance(items, list) else items},
            sort_keys=True, separators=(",", ":"), ensure_ascii=False,
        )  # fmt: skip
        head = b"responses:" + rendered.encode()[:prefix_bytes]
    elif "prompt" in body:
        prompt = body["prompt"]
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            prompt = prompt[0]  # a batch of prompts: place it by its first
        text = prompt if isinstance(prompt, str) else json.dumps(prompt, separators=(",", ":"))
        head = b"text:" + text.encode()[:prefix_bytes]
    else:
        return None
    return xxhash.xxh3_128_digest(scope + b"\0" + head)


@dataclass(slots=True)
class Backend:
    url: str
    healthy: bool = True  # until the first check says otherwise
    in_flight: int = 0
    slow_checks: int = 0  # health checks in a row that timed out


class _RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "cacheproxy_router_requests",
            "Requests answered, by replica and status.",
            ["backend", "status"],
            registry=self.registry,
        )
        self.retries = Counter(
            "cacheproxy_router_retries",
            "Requests sent on to the next replica, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.up = Gauge(
            "cacheproxy_router_backend_up",
            "1 while the replica passes its health check.",
            ["backend"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "cacheproxy_router_in_flight",
            "Requests in flight per replica.",
            ["backend"],
            registry=self.registry,
        )


class NoBackend(Exception):
    """Every replica refused or could not be reached."""


class Router:
    def __init__(self, settings: Settings, backends: Sequence[str] | None = None) -> None:
        urls = [u.rstrip("/") for u in (backends if backends is not None else settings.router_backends)]
        if not urls:
            raise ValueError("the router needs at least one backend (--backend URL)")
        self.settings = settings
        self.backends = {u: Backend(u) for u in urls}
        self.ring = HashRing(urls, settings.router_virtual_nodes)
        self.metrics = _RouterMetrics()
        self._round_robin = itertools.count()
        # Responses API ids -> the replica that keeps them (previous_response_id, GET/DELETE by id): a
        # replica keeps its responses in its own memory.
        self.response_owners: OrderedDict[str, str] = OrderedDict()
        self._session: aiohttp.ClientSession | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._checks: set[asyncio.Task[None]] = set()

    # --- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        self._session = aiohttp.ClientSession(
            # Bytes pass through as the replica wrote them (compressed or not).
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=s.router_upstream_timeout_s, sock_connect=5.0),
            connector=aiohttp.TCPConnector(limit=0),
        )
        await self.check_health()
        self._health_task = asyncio.create_task(self._health_loop())

    async def close(self) -> None:
        tasks = [*self._checks, *([self._health_task] if self._health_task is not None else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("the router is not started")
        return self._session

    # --- health --------------------------------------------------------------------------
    async def _check_one(self, backend: Backend) -> None:
        timeout = aiohttp.ClientTimeout(total=min(5.0, max(1.0, self.settings.router_health_interval_s)))
        try:
            async with self.session.get(backend.url + "/health", timeout=timeout) as resp:
                await resp.read()
                healthy = resp.status == 200
        except TimeoutError:
            # A replica busy with a long prefill can answer late once; down only when it stays silent.
            backend.slow_checks += 1
            if backend.slow_checks >= SLOW_CHECKS_TO_MARK_DOWN:
                self._set_health(backend, False)
            return
        except aiohttp.ClientError:
            healthy = False
        backend.slow_checks = 0
        self._set_health(backend, healthy)

    async def check_health(self) -> None:
        await asyncio.gather(*(self._check_one(b) for b in self.backends.values()))

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.router_health_interval_s)
            try:
                await self.check_health()
            except Exception:
                log.exception("router.health_check_failed")

    def _set_health(self, backend: Backend, healthy: bool) -> None:
        if backend.healthy != healthy:
            log.warning("router.backend_up" if healthy else "router.backend_down", backend=backend.url)
        backend.healthy = healthy
        self.metrics.up.labels(backend.url).set(1 if healthy else 0)

    # --- placement -----------------------------------------------------------------------
    def plan(self, key: bytes | None, owner: str | None = None) -> list[Backend]:
        """The replicas to try, in order: `owner` first when it is up (it keeps the state the request
        names), then the key's ring order (or round robin, or least loaded without a key), healthy and
        not busy first, then healthy by load, then the rest."""
        first = self.backends.get(owner) if owner is not None else None
        if first is not None and first.healthy:
            return [first, *(b for b in self.plan(key) if b is not first)]
        if self.settings.router_policy == "round_robin":
            urls = list(self.backends)
            k = next(self._round_robin) % len(urls)
            order = [self.backends[u] for u in urls[k:] + urls[:k]]
        elif key is None:
            order = sorted(self.backends.values(), key=lambda b: b.in_flight)
        else:
            order = [self.backends[u] for u in self.ring.walk(key)]
        limit = self.settings.router_max_in_flight
        free = [b for b in order if b.healthy and b.in_flight < limit]
        busy = sorted((b for b in order if b.healthy and b.in_flight >= limit), key=lambda b: b.in_flight)
        down = [b for b in order if not b.healthy]
        return free + busy + down

    # --- forwarding ----------------------------------------------------------------------
    def note_response(self, request_id: str, backend: Backend) -> None:
        # A replica names a response "resp_" + the request id it sent back (openai_routes).
        self.response_owners["resp_" + request_id] = backend.url
        while len(self.response_owners) > RESPONSE_OWNERS:
            self.response_owners.popitem(last=False)

    async def forward(self, request: web.Request, body: bytes, key: bytes | None,
                      owner: str | None = None) -> web.StreamResponse:
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS)
        peer = request.remote or ""
        prior = request.headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
        plan = self.plan(key, owner)
        for attempt, backend in enumerate(plan):
            last = attempt == len(plan) - 1
            backend.in_flight += 1
            self.metrics.in_flight.labels(backend.url).set(backend.in_flight)
            try:
                try:
                    upstream = await self.session.request(
                        request.method,
                        backend.url + request.rel_url.path_qs,
                        data=body or None,
                        headers=headers,
                    )
                except aiohttp.ClientConnectorError as exc:
                    # Nothing listens there: down until a health check says otherwise.
                    self._set_health(backend, False)
                    self.metrics.retries.labels("connect").inc()
                    log.warning("router.backend_unreachable", backend=backend.url, error=repr(exc))
                    continue
                except aiohttp.ClientConnectionError as exc:
                    # The connection broke before any answer (a replica going away, or a pooled
                    # connection it had closed): the next replica gets the request, a health
                    # check decides about this one.
                    self.metrics.retries.labels("disconnect").inc()
                    log.warning("router.backend_disconnected", backend=backend.url, error=repr(exc))
                    self._spawn_check(backend)
                    continue
                try:
                    if upstream.status in _REFUSALS and not last:
                        self.metrics.retries.labels(str(upstream.status)).inc()
                        await upstream.read()
                        continue
                    request_id = upstream.headers.get("X-Request-Id")
                    if request.method == "POST" and request.path == "/v1/responses" and request_id:
                        self.note_response(request_id, backend)
                    return await self._relay(request, upstream, backend)
                finally:
                    upstream.release()
            finally:
                backend.in_flight -= 1
                self.metrics.in_flight.labels(backend.url).set(backend.in_flight)
        raise NoBackend()

    def _spawn_check(self, backend: Backend) -> None:
        task = asyncio.create_task(self._check_one(backend))
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    async def _relay(
        self, request: web.Request, upstream: aiohttp.ClientResponse, backend: Backend
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for name, value in upstream.headers.items():
            if name.lower() not in _HOP_HEADERS:
                response.headers.add(name, value)
        response.headers[BACKEND_HEADER] = backend.url
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        await response.prepare(request)
        # Chunk by chunk as the replica sends them: SSE events reach the client as they are made.
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        self.metrics.requests.labels(backend.url, str(upstream.status)).inc()
        return response


# --- the app -------------------------------------------------------------------------------------

ROUTER: web.AppKey[Router] = web.AppKey("cacheproxy_router", Router)


def _error(status: int, message: str, code: str) -> web.Response:
    body = {"error": {"message": message, "type": "service_unavailable", "param": None, "code": code}}
    headers = {"Retry-After": "1"} if status == 503 else None
    return web.json_response(body, status=status, headers=headers)


async def _proxy(request: web.Request, body: bytes, key: bytes | None, owner: str | None = None) -> web.StreamResponse:
    try:
        return await request.app[ROUTER].forward(request, body, key, owner)
    except NoBackend:
        return _error(503, "no replica is available; retry later", "no_backend")
    except TimeoutError:
        return _error(504, "the replica did not answer in time", "upstream_timeout")


async def _routed(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions, /v1/completions and /v1/responses: placed by their prefix."""
    body = await request.read()
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        parsed = None  # the replica answers the 400
    settings = request.app[ROUTER].settings
    responses = request.path == "/v1/responses"
    key = affinity_key(parsed, settings.router_prefix_bytes, request.headers.get("Authorization", ""),
                       responses=responses)  # fmt: skip
    previous = parsed.get("previous_response_id") if responses and isinstance(parsed, dict) else None
    owner = request.app[ROUTER].response_owners.get(previous) if isinstance(previous, str) else None
    return await _proxy(request, body, key, owner)


async def _response_by_id(request: web.Request) -> web.StreamResponse:
    """GET/DELETE /v1/responses/{id}: the replica that keeps it."""
    owner = request.app[ROUTER].response_owners.get(request.match_info["response_id"])
    return await _proxy(request, await request.read(), None, owner)


async def _unplaced(request: web.Request) -> web.StreamResponse:
    """Everything else under /v1 (GET /v1/models ...): the least loaded healthy replica."""
    return await _proxy(request, await request.read(), None)


async def _health(request: web.Request) -> web.Response:
    router = request.app[ROUTER]
    backends = [
        {"url": b.url, "healthy": b.healthy, "in_flight": b.in_flight} for b in router.backends.values()
    ]
    ok = any(b.healthy for b in router.backends.values())
    return web.json_response(
        {"status": "ok" if ok else "unavailable", "backends": backends}, status=200 if ok else 503
    )


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[ROUTER].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def create_router_app(settings: Settings, backends: Sequence[str] | None = None) -> web.Application:
    router = Router(settings, backends)
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[ROUTER] = router
    app.router.add_post("/v1/chat/completions", _routed)
    app.router.add_post("/v1/completions", _routed)
    app.router.add_post("/v1/responses", _routed)
    app.router.add_route("*", "/v1/responses/{response_id}", _response_by_id)
    app.router.add_route("*", "/v1/{tail:.*}", _unplaced)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)

    async def on_startup(app: web.Application) -> None:
        await router.start()
        log.info(
            "router_ready",
            backends=[b.url for b in router.backends.values()],
            healthy=sum(b.healthy for b in router.backends.values()),
            policy=settings.router_policy,
        )

    async def on_cleanup(app: web.Application) -> None:
        await router.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


async def route(settings: Settings) -> int:
    """Serves the router until SIGINT/SIGTERM (0); 2 without any backend, 1 when the port is taken."""
    try:
        app = create_router_app(settings)
    except ValueError as exc:
        log.error("router_not_started", error=str(exc))
        return 2
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    try:
        await site.start()
    except OSError as exc:
        log.error("listen_failed", host=settings.host, port=settings.port, error=str(exc))
        await runner.cleanup()
        return 1
    log.info(
        "listening",
        url=f"http://{settings.host}:{settings.port}",
        role="router",
        backends=[b.url for b in app[ROUTER].backends.values()],
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)
    await runner.cleanup()
    return 0
