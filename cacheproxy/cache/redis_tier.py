"""The remote tier: KV blocks in Redis (or a Redis Cluster), shared by every replica.

Keys and values are the disk tier's: key = `key_prefix` + the 16-byte block hash, value = the
checksummed `block_entry.encode` bytes under the namespace digest, so a block written by one
replica is verified by another exactly as the disk tier verifies its own. Every key carries a TTL
(`redis_ttl_s`); a hit refreshes it (GETEX: Redis >= 6.2), so hot prefixes stay while Redis's own
`maxmemory` + `allkeys-lru` bounds the memory of the whole shared store.

URL: `redis://host:6379/0` (or `rediss://`) for one Redis; `redis+cluster://host:7000` (or
`rediss+cluster://`) for a Redis Cluster, through redis-py's cluster client (keys spread over
the slots; no command here touches two keys, so any slot layout works).

Threads: the engine thread is synchronous, so the tier owns a private asyncio loop on a thread of
its own, with redis-py's asyncio client; `get`/`put`/`contains`/`remove` submit a coroutine to
that loop and wait for it at most `timeout_s`. `put_async` queues the entry for a writer thread
(encoding off the request path) and never blocks: a full queue skips the write and counts it.

Failure: Redis down or slow must never fail a request. Every call is bounded by `timeout_s`
(socket timeouts and an asyncio deadline, redis-py's own retries off), a failure is a miss (or an
unstored put), and after `breaker_failures` failures in a row a circuit breaker skips the tier
for `breaker_cooldown_s`; then one call probes Redis again and closes the breaker if it answers.

Accounting: Redis is shared, so the tier cannot know what of it is "its" memory. `used_bytes` is
the bytes this process stored during the last TTL (what of its writes can still be there),
capped at `capacity_bytes` (`redis_max_bytes`); `len()` likewise counts this process's entries.
Entries larger than `max_entry_bytes` are refused.
"""

from __future__ import annotations

import asyncio
import hashlib
import queue
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from cacheproxy.cache.block_entry import BlockEntry, CorruptEntry, decode, encode
from cacheproxy.cache.tier import TierStats
from cacheproxy.log import get_logger

if TYPE_CHECKING:
    from cacheproxy.config import Settings

log = get_logger(__name__)
T = TypeVar("T")

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
# Delete a value only while it is still the damaged one we read: another replica may have
# rewritten a good value meanwhile. Compares a SHA-1 so the megabytes need not travel back.
_DELETE_IF_SAME = (
    "local v = redis.call('GET', KEYS[1]) "
    "if v and redis.sha1hex(v) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
)
# Delete and report the value's size in one round trip (keeps the byte count honest).
_DELETE_SIZED = "local n = redis.call('STRLEN', KEYS[1]) redis.call('DEL', KEYS[1]) return n"
# Entries written concurrently by one writer batch.
_WRITE_BATCH = 32
# Slack on top of timeout_s for the hop between threads.
_HANDOFF_S = 0.05


@dataclass(slots=True)
class RedisTierStats(TierStats):
    timeouts: int = 0  # calls that passed timeout_s
    errors: int = 0  # calls that failed otherwise (connection refused, reset, error replies)
    breaker_opens: int = 0  # times the breaker opened
    breaker_skips: int = 0  # calls not sent because the breaker was open
    too_large: int = 0  # entries refused for their size


class _CircuitBreaker:
    """Closed: every call goes. After `failures` failures in a row: open for `cooldown_s`, no call
    goes. Then half-open: one call probes (others still skip); its success closes the breaker, its
    failure opens it for another cool-down."""

    def __init__(self, failures: int, cooldown_s: float) -> None:
        self._threshold = failures
        self._cooldown_s = cooldown_s
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._probe_since: float | None = None

    @property
    def state(self) -> str:
        with self._lock:
            if self._opened_at is None:
                return "closed"
            return "half_open" if self._probe_since is not None else "open"

    def allow(self) -> bool:
        with self._lock:
            if self._opened_at is None:
                return True
            now = time.monotonic()
            if now - self._opened_at < self._cooldown_s:
                return False
            # One probe at a time; a probe that never reported is replaced after a cool-down.
            if self._probe_since is not None and now - self._probe_since < self._cooldown_s:
                return False
            self._probe_since = now
            return True

    def succeeded(self) -> bool:
        """Records a success; True when it closed an open breaker."""
        with self._lock:
            was_open = self._opened_at is not None
            self._failures, self._opened_at, self._probe_since = 0, None, None
            return was_open

    def failed(self) -> bool:
        """Records a failure; True when it (re)opened the breaker."""
        with self._lock:
            self._failures += 1
            if self._opened_at is not None:  # a failed probe: another cool-down
                self._opened_at, self._probe_since = time.monotonic(), None
                return True
            if self._failures >= self._threshold:
                self._opened_at = time.monotonic()
                return True
            return False


class _RecentWrites:
    """Bytes and entries stored during the last `window_s` seconds, in time slices: a slice
    older than the window is forgotten, as Redis forgets keys whose TTL ran out."""

    def __init__(self, window_s: float, slices: int = 64) -> None:
        self._window_s = window_s
        self._slice_s = window_s / slices
        self._slices: deque[list[float]] = deque()  # [start, bytes, entries], oldest first
        self._bytes = 0
        self._entries = 0
        self._lock = threading.Lock()

    def _expire(self, now: float) -> None:
        while self._slices and self._slices[0][0] <= now - self._window_s:
            _, nbytes, entries = self._slices.popleft()
            self._bytes -= int(nbytes)
            self._entries -= int(entries)

    def add(self, nbytes: int, entries: int = 1) -> None:
        with self._lock:
            now = time.monotonic()
            self._expire(now)
            if not self._slices or self._slices[-1][0] <= now - self._slice_s:
                self._slices.append([now, 0, 0])
            last = self._slices[-1]
            last[1] += nbytes
            last[2] += entries
            self._bytes += nbytes
            self._entries += entries

    def totals(self) -> tuple[int, int]:
        with self._lock:
            self._expire(time.monotonic())
            return max(0, self._bytes), max(0, self._entries)


class RedisTier:
    """Redis-backed `KVTier` shared by replicas. Call `close()` to drain queued writes."""

    name = "remote"

    def __init__(
        self,
        url: str,
        namespace_digest: bytes,
        *,
        ttl_s: int = 24 * 3600,
        max_bytes: int = 8 << 30,
        timeout_s: float = 0.25,
        max_entry_bytes: int = 32 << 20,
        write_queue: int = 1024,
        key_prefix: str = "cacheproxy:kv:",
        breaker_failures: int = 3,
        breaker_cooldown_s: float = 5.0,
    ) -> None:
        self.url = url
        self.namespace_digest = namespace_digest
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.max_entry_bytes = min(max_entry_bytes, max_bytes) if max_bytes > 0 else 0
        self.key_prefix = key_prefix.encode()
        scheme, sep, rest = url.partition("://")
        self.cluster = scheme in CLUSTER_SCHEMES
        self._client_url = f"{CLUSTER_SCHEMES.get(scheme, scheme)}{sep}{rest}"
        self._client: aioredis.Redis | RedisCluster | None = None
        self._breaker = _CircuitBreaker(breaker_failures, breaker_cooldown_s)
        self._recent = _RecentWrites(float(ttl_s))
        self._stats = RedisTierStats()
        self._stats_lock = threading.Lock()
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(
            target=self._loop.run_forever, name="redis-tier-loop", daemon=True
        )
        self._loop_thread.start()
        self._queue: queue.Queue[BlockEntry | threading.Event | None] = queue.Queue(maxsize=write_queue)
        self._writer = threading.Thread(target=self._writer_loop, name="redis-tier-writer", daemon=True)
        self._writer.start()

    @classmethod
    def from_settings(cls, settings: Settings, namespace_digest: bytes) -> RedisTier:
        if not settings.redis_url:
            raise ValueError("redis_url is not set")
        return cls(
            settings.redis_url,
            namespace_digest,
            ttl_s=settings.redis_ttl_s,
            max_bytes=settings.redis_max_bytes,
            timeout_s=settings.redis_timeout_s,
            max_entry_bytes=settings.redis_max_entry_bytes,
            write_queue=settings.redis_write_queue,
            key_prefix=settings.redis_key_prefix,
            breaker_failures=settings.redis_breaker_failures,
            breaker_cooldown_s=settings.redis_breaker_cooldown_s,
        )

    def key(self, block_hash: bytes) -> bytes:
        return self.key_prefix + block_hash

    # --- KVTier --------------------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        return min(self._recent.totals()[0], self.capacity_bytes)

    @property
    def capacity_bytes(self) -> int:
        return self.max_bytes

    @property
    def stats(self) -> RedisTierStats:
        with self._stats_lock:
            return replace(self._stats)

    @property
    def breaker_state(self) -> str:
        return self._breaker.state

    def __len__(self) -> int:
        return self._recent.totals()[1]

    def get(self, block_hash: bytes) -> BlockEntry | None:
        """The verified entry, or None (absent, damaged, or Redis unreachable: all misses)."""
        key = self.key(block_hash)
        ttl = self.ttl_s
        raw = self._call(lambda c: c.getex(key, ex=ttl), None)
        entry = None
        if raw is not None:
            try:
                entry = decode(raw, self.namespace_digest, block_hash)
            except CorruptEntry as exc:
                log.warning("redis_tier.corrupt_entry", hash=block_hash.hex(), reason=str(exc))
                with self._stats_lock:
                    self._stats.corrupt_dropped += 1
                digest = hashlib.sha1(raw).hexdigest()
                self._call(lambda c: c.eval(_DELETE_IF_SAME, 1, key, digest), 0)
        with self._stats_lock:
            if entry is None:
                self._stats.misses += 1
            else:
                self._stats.hits += 1
        return entry

    def put(self, entry: BlockEntry) -> bool:
        """Store synchronously: True once Redis holds the entry (new, or already held: refreshed)."""
        value = self._encode(entry)
        if value is None:
            return False
        return self._call(lambda c: self._store(c, entry.hash, value), False)

    def put_async(self, entry: BlockEntry) -> bool:
        """Queue a write for the writer thread; False (counted) when the queue is full. The writer
        encodes `entry.tensor` later: hand over a tensor nobody modifies afterwards. While the
        breaker is open the writer drops what it dequeues (counted in `breaker_skips`)."""
        if self._closed:
            return False
        try:
            self._queue.put_nowait(entry)
        except queue.Full:
            with self._stats_lock:
                self._stats.writes_skipped += 1
            return False
        return True

    def contains(self, block_hash: bytes) -> bool:
        """Whether Redis holds a value under the hash (not verified: `get` may still drop it)."""
        key = self.key(block_hash)
        return bool(self._call(lambda c: c.exists(key), 0))

    def remove(self, block_hash: bytes) -> bool:
        key = self.key(block_hash)
        size = int(self._call(lambda c: c.eval(_DELETE_SIZED, 1, key), 0))
        if size > 0:
            self._recent.add(-size, -1)
        return size > 0

    # --- lifecycle -----------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every write queued before this call was sent (or skipped)."""
        if self._closed:
            return True
        done = threading.Event()
        try:
            self._queue.put(done, timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout)

    def close(self) -> None:
        """Drain queued writes, stop the writer, close the client and the loop. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._writer.join()
        if self._client is not None:
            client, self._client = self._client, None
            close = asyncio.run_coroutine_threadsafe(client.aclose(), self._loop)
            try:
                close.result(max(1.0, self.timeout_s * 4))
            except Exception as exc:
                log.warning("redis_tier.close_failed", error=repr(exc))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join()
        self._loop.close()

    # --- calls ---------------------------------------------------------------------------
    def _make_client(self) -> aioredis.Redis | RedisCluster:
        # Retries off: the caller waits at most timeout_s, and the breaker decides when to retry.
        opts: dict[str, Any] = {
            "socket_timeout": self.timeout_s,
            "socket_connect_timeout": self.timeout_s,
            "retry": Retry(NoBackoff(), 0),
        }
        if self.cluster:
            return RedisCluster.from_url(self._client_url, **opts)
        return aioredis.Redis.from_url(self._client_url, **opts)

    async def _bounded(self, op: Callable[[Any], Awaitable[T]]) -> T:
        if self._client is None:  # made on the loop's thread: the client belongs to this loop
            self._client = self._make_client()
        return await asyncio.wait_for(op(self._client), self.timeout_s)

    def _submit(self, op: Callable[[Any], Awaitable[T]]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(self._bounded(op), self._loop)

    def _call(self, op: Callable[[Any], Awaitable[T]], default: T) -> T:
        """Runs `op(client)` on the loop within timeout_s; `default` when it fails or is skipped."""
        if self._closed:
            return default
        if not self._breaker.allow():
            with self._stats_lock:
                self._stats.breaker_skips += 1
            return default
        future = self._submit(op)
        try:
            result = future.result(self.timeout_s + _HANDOFF_S)
        except BaseException as exc:
            future.cancel()
            self._failed(exc)
            return default
        self._succeeded()
        return result

    def _succeeded(self) -> None:
        if self._breaker.succeeded():
            log.info("redis_tier.breaker_closed", url=self._safe_url)

    def _failed(self, exc: BaseException) -> None:
        timed_out = isinstance(exc, TimeoutError) or "Timeout" in type(exc).__name__
        if isinstance(exc, ResponseError):
            # Redis answered (an error reply): alive, so the breaker is not involved.
            with self._stats_lock:
                self._stats.errors += 1
            log.warning("redis_tier.error_reply", error=str(exc))
            return
        if not (timed_out or isinstance(exc, RedisError | OSError)):
            log.error("redis_tier.unexpected_error", error=repr(exc))
        opened = self._breaker.failed()
        with self._stats_lock:
            if timed_out:
                self._stats.timeouts += 1
            else:
                self._stats.errors += 1
            if opened:
                self._stats.breaker_opens += 1
        if opened:
            log.warning("redis_tier.breaker_open", url=self._safe_url, error=repr(exc))

    @property
    def _safe_url(self) -> str:
        scheme, _, rest = self.url.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}"  # no password in the logs

    # --- writes --------------------------------------------------------------------------
    def _encode(self, entry: BlockEntry) -> bytes | None:
        value = None if entry.nbytes > self.max_entry_bytes else encode(entry, self.namespace_digest)
        if value is None or len(value) > self.max_entry_bytes:
            with self._stats_lock:
                self._stats.too_large += 1
            return None
        return value

    async def _store(self, client: Any, block_hash: bytes, value: bytes) -> bool:
        key = self.key(block_hash)
        # Content is addressed by hash: when the key exists, refresh its TTL and do not send the
        # (megabytes of) value again. Several replicas often write the same popular prefix.
        if await client.expire(key, self.ttl_s):
            return True
        if await client.set(key, value, ex=self.ttl_s, nx=True):
            self._recent.add(len(value))
            with self._stats_lock:
                self._stats.puts += 1
        return True

    async def _store_many(self, client: Any, values: list[tuple[bytes, bytes]]) -> list[bool]:
        return list(await asyncio.gather(*(self._store(client, h, v) for h, v in values)))

    def _writer_loop(self) -> None:
        while True:
            item = self._queue.get()
            batch: list[BlockEntry] = []
            barriers: list[threading.Event] = []
            stop = False
            while True:
                if item is None:
                    stop = True
                elif isinstance(item, threading.Event):
                    barriers.append(item)
                else:
                    batch.append(item)
                if stop or barriers or len(batch) >= _WRITE_BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            try:
                self._write_batch(batch)
            except Exception:
                # A failed batch loses cache writes, never the writer.
                log.exception("redis_tier.batch_failed", entries=len(batch))
            for done in barriers:
                done.set()
            if stop:
                return

    def _write_batch(self, batch: list[BlockEntry]) -> None:
        values = [(e.hash, v) for e in batch if (v := self._encode(e)) is not None]
        if not values:
            return
        if not self._breaker.allow():
            with self._stats_lock:
                self._stats.breaker_skips += len(values)
            return
        # One deadline for the batch: its writes run concurrently on the loop.
        future = self._submit(lambda c: self._store_many(c, values))
        try:
            future.result(self.timeout_s + _HANDOFF_S)
        except BaseException as exc:
            future.cancel()
            self._failed(exc)
            return
        self._succeeded()
