"""The CPU tier: KV blocks in host memory (pinned where CUDA is present), LRU, bounded in bytes."""

from __future__ import annotations

import heapq
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from cacheproxy.cache.block_entry import BlockEntry
from cacheproxy.cache.fastpath import count_leading_in, identity_key
from cacheproxy.cache.tier import TierStats
from cacheproxy.log import get_logger

log = get_logger(__name__)


@dataclass(slots=True)
class _Resident:
    slot: int
    parent_hash: bytes
    token_ids: tuple[int, ...]
    key: bytes | None  # fastpath.identity_key(parent_hash, token_ids): what `read_chain` compares


class CpuTier:
    """Blocks of one shape and dtype in a host slab `[capacity_blocks, *block_shape]`.

    - The slab is allocated on the first put (pinned when CUDA is available, so that copies to
      the GPU can run asynchronously), never grown: `used_bytes <= capacity_bytes` always.
    - `get` returns a *clone* (the caller owns it; the slot may be reused by the next put).
      `get_into(hash, out)` copies straight into a caller's tensor instead (e.g. a GPU pool block)
      and saves that clone; the copy has finished when it returns, since the slot may be reused
      as soon as the lock is released.
    - `put` copies the entry's tensor (from any device) into a slot; when none is free the least
      recently used block is evicted. `on_evict`, if given, receives each evicted block (a clone)
      after the lock is released: the tiered store uses it to demote blocks to disk.
    - A lock serializes every method: the engine thread and writer threads share the tier.
    """

    name = "cpu"

    def __init__(
        self,
        block_shape: Sequence[int],
        dtype: torch.dtype,
        capacity_bytes: int,
        pin_memory: bool | None = None,
        on_evict: Callable[[BlockEntry], None] | None = None,
    ) -> None:
        self.block_shape = tuple(int(d) for d in block_shape)
        if len(self.block_shape) != 5 or self.block_shape[1] != 2:
            raise ValueError(f"block shape must be [L, 2, block_size, H, D], got {self.block_shape}")
        self.dtype = dtype
        self.block_nbytes = math.prod(self.block_shape) * dtype.itemsize
        self.capacity_blocks = max(0, capacity_bytes) // self.block_nbytes
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._on_evict = on_evict
        self._lock = threading.Lock()
        self._slab: torch.Tensor | None = None
        # A min-heap: the lowest free slot goes first, so a chain put in order fills neighbouring
        # slots even after removals, and loads it back in a few large copies (`copy_runs`).
        self._free: list[int] = []
        self._lru: OrderedDict[bytes, _Resident] = OrderedDict()  # oldest first
        self._stats = TierStats()

    # --- KVTier --------------------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        return len(self._lru) * self.block_nbytes

    @property
    def capacity_bytes(self) -> int:
        return self.capacity_blocks * self.block_nbytes

    @property
    def stats(self) -> TierStats:
        with self._lock:
            return replace(self._stats)

    def __len__(self) -> int:
        return len(self._lru)

    def contains(self, block_hash: bytes) -> bool:
        return block_hash in self._lru

    def count_held(self, hashes: Sequence[bytes], start: int) -> int:
        """How many of `hashes[start:]`, from the first, are held here (not verified, as `contains`)."""
        return count_leading_in(hashes[start:], self._lru)

    def get(self, block_hash: bytes) -> BlockEntry | None:
        with self._lock:
            resident = self._touch(block_hash)
            if resident is None:
                return None
            assert self._slab is not None
            tensor = self._slab[resident.slot].clone()
        return BlockEntry(block_hash, resident.parent_hash, resident.token_ids, tensor)

    def get_view(self, block_hash: bytes) -> BlockEntry | None:
        """The entry with a *view* of its slab slot, no copy: valid only until the next put or
        remove on this tier. The tiered store uses it to start an asynchronous copy from pinned
        memory straight into the pool, and waits for that copy before it puts again."""
        with self._lock:
            resident = self._touch(block_hash)
            if resident is None:
                return None
            assert self._slab is not None
            return BlockEntry(block_hash, resident.parent_hash, resident.token_ids, self._slab[resident.slot])

    def get_slot(self, block_hash: bytes) -> tuple[bytes, tuple[int, ...], int] | None:
        """(parent hash, token ids, slot) of a resident block, with no tensor made: the tiered store
        copies runs of neighbouring slots straight out of `slab` (valid until the next put or remove,
        as a view is). A view per block cost its admission walk ~4 us a block (CPU sandbox)."""
        with self._lock:
            resident = self._touch(block_hash)
            return None if resident is None else (resident.parent_hash, resident.token_ids, resident.slot)

    def read_chain(
        self, hashes: Sequence[bytes], start: int, parent: bytes, packed: bytes, block_size: int, limit: int
    ) -> list[tuple[int, tuple[int, ...], bytes]]:
        """(slot, token ids, identity key) of `hashes[start:]`, at most `limit`, for as long as each block
        is held here as the child of the one before (the first of `parent`) and holds its `block_size`
        ids of `packed` (a prompt's ids as int32-LE bytes): `get_slot` and its checks for a run of
        blocks, under one lock, comparing bytes. The admission walk of a prefix held here took ~13 us
        a block on an H200's host, one block at a time."""
        width = 4 * block_size
        lru = self._lru
        found: list[tuple[int, tuple[int, ...], bytes]] = []
        with self._lock:
            for i in range(start, min(len(hashes), start + limit)):
                h = hashes[i]
                resident = lru.get(h)
                if resident is None or resident.parent_hash != parent or resident.key is None:
                    break
                key = resident.key
                if key != parent + packed[i * width : (i + 1) * width]:
                    break
                lru.move_to_end(h)
                found.append((resident.slot, resident.token_ids, key))
                parent = h
            self._stats.hits += len(found)
        return found

    @property
    def slab(self) -> torch.Tensor | None:
        """`[capacity_blocks, *block_shape]`; None until the first put."""
        return self._slab

    def get_into(self, block_hash: bytes, out: torch.Tensor) -> BlockEntry | None:
        """Copy a block into `out` (same shape and dtype, any device); None on a miss."""
        if tuple(out.shape) != self.block_shape or out.dtype != self.dtype:
            raise ValueError(
                f"out must be {self.block_shape} {self.dtype}, got {tuple(out.shape)} {out.dtype}"
            )
        with self._lock:
            resident = self._touch(block_hash)
            if resident is None:
                return None
            assert self._slab is not None
            out.copy_(self._slab[resident.slot])
        return BlockEntry(block_hash, resident.parent_hash, resident.token_ids, out)

    def put(self, entry: BlockEntry) -> bool:
        if tuple(entry.tensor.shape) != self.block_shape or entry.tensor.dtype != self.dtype:
            raise ValueError(
                f"tier holds {self.block_shape} {self.dtype}, "
                f"got {tuple(entry.tensor.shape)} {entry.tensor.dtype}"
            )
        evicted: BlockEntry | None = None
        with self._lock:
            if entry.hash in self._lru:
                self._lru.move_to_end(entry.hash)
                return True
            if self.capacity_blocks == 0:
                return False
            if self._slab is None:
                self._slab = torch.empty(
                    (self.capacity_blocks, *self.block_shape), dtype=self.dtype, pin_memory=self.pin_memory
                )
                self._free = list(range(self.capacity_blocks))  # sorted: a heap already
            if not self._free:
                old_hash, old = self._lru.popitem(last=False)
                self._stats.evictions += 1
                if self._on_evict is not None:
                    evicted = BlockEntry(
                        old_hash, old.parent_hash, old.token_ids, self._slab[old.slot].clone()
                    )
                heapq.heappush(self._free, old.slot)
            slot = heapq.heappop(self._free)
            try:
                self._slab[slot].copy_(entry.tensor)
            except BaseException:
                heapq.heappush(self._free, slot)
                raise
            self._lru[entry.hash] = _Resident(
                slot, entry.parent_hash, entry.token_ids, identity_key(entry.parent_hash, entry.token_ids)
            )
            self._stats.puts += 1
        if evicted is not None:
            self._demote(evicted)
        return True

    def remove(self, block_hash: bytes) -> bool:
        with self._lock:
            resident = self._lru.pop(block_hash, None)
            if resident is None:
                return False
            heapq.heappush(self._free, resident.slot)
            return True

    # --- helpers -------------------------------------------------------------------------
    def hashes(self) -> list[bytes]:
        """Held hashes, least recently used first (for listing, not for lookups)."""
        with self._lock:
            return list(self._lru)

    def _touch(self, block_hash: bytes) -> _Resident | None:
        resident = self._lru.get(block_hash)
        if resident is None:
            self._stats.misses += 1
            return None
        self._lru.move_to_end(block_hash)
        self._stats.hits += 1
        return resident

    def _demote(self, entry: BlockEntry) -> None:
        assert self._on_evict is not None
        try:
            self._on_evict(entry)
        except Exception:
            # A failed demotion loses a cache entry, never the put that caused it.
            log.exception("cpu_tier.on_evict_failed", hash=entry.hash.hex())
