"""The interface every KV tier below the GPU implements (CPU, disk, later Redis)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from cacheproxy.cache.block_entry import BlockEntry


@dataclass(slots=True)
class TierStats:
    """Counters since the tier was opened (not persisted)."""

    hits: int = 0
    misses: int = 0
    puts: int = 0  # entries stored (a put of a hash already held is not counted)
    evictions: int = 0  # entries removed to make room
    corrupt_dropped: int = 0  # entries found damaged or foreign on read, deleted, never served
    writes_skipped: int = 0  # asynchronous writes dropped because the write queue was full


@runtime_checkable
class KVTier(Protocol):
    """A store of `BlockEntry`s keyed by their 16-byte hash.

    Contracts every implementation keeps:
    - `get` returns an entry whose tensor the caller owns (never shared with the tier), or None.
      It has verified what the tier can verify (checksum, namespace, key); a damaged entry is
      deleted, counted in `corrupt_dropped`, and reported as a miss. The caller must still check
      `entry.matches(parent, token_ids)`: the hash alone does not prove identity.
    - `put` stores a copy of `entry.tensor` (the caller may reuse its tensor afterwards) and
      returns False when the entry cannot be stored (larger than the tier, tier disabled).
      Content is addressed by hash: a put of a hash already held only refreshes its recency.
    - `used_bytes` never exceeds `capacity_bytes`.
    - All methods are safe to call from several threads.
    """

    name: str

    def get(self, block_hash: bytes) -> BlockEntry | None: ...

    def put(self, entry: BlockEntry) -> bool: ...

    def contains(self, block_hash: bytes) -> bool: ...

    def remove(self, block_hash: bytes) -> bool: ...

    @property
    def used_bytes(self) -> int: ...

    @property
    def capacity_bytes(self) -> int: ...

    @property
    def stats(self) -> TierStats: ...
