"""The disk tier: persisted KV blocks in LMDB, bounded in bytes, evicting the least recently used.

Layout of the LMDB environment (a directory, by default `data_dir/kv.lmdb`), four sub-databases:

- `blocks`: 16-byte hash -> encoded `BlockEntry` (see block_entry.py).
- `index`:  hash -> (sequence number, accounted bytes), big-endian u64 pairs.
- `order`:  sequence number (big-endian u64, so keys sort by age) -> hash.
- `meta`:   b"used_bytes" -> accounted bytes of all entries.

Eviction: entries are evicted oldest sequence number first. A put takes the next number; a hit
asks the writer thread to give the entry a new number (a "touch"), so the order approximates LRU
while readers never take LMDB's single write lock. Touches are best-effort: with a full queue they
are dropped and the entry simply ages as if it had not been read.

Accounting: every entry counts its value rounded up to LMDB pages plus a fixed overhead for its
index and order records. Writes evict until `used + new <= budget` (`fill_fraction` of `map_size`);
the rest of the map (at least 128 pages) is headroom, because pages freed in a transaction are
reusable only by later ones; one transaction adds at most half of (headroom - 64 pages) in new
values, and a larger value is refused. When LMDB still reports the map full (a fragmented free
list, a long-lived reader pinning old pages), a separate transaction evicts the oldest tenth of
the budget and the write is retried, evicting twice as much each round for up to four rounds; then
the write is dropped and counted. So a reader holding an old snapshot for long (another process)
makes the tier shed entries and then drop writes until that reader ends; it recovers by itself.

Durability: every committed write survives a crash of the process (LMDB commits are atomic).
With `sync=True` (default) data pages are flushed at each commit and only the meta page flush is
skipped, so an OS crash may lose the last commit but never corrupts the file. The writer commits
whole batches from its queue in one transaction, which is what makes that flush affordable.

Threads: any thread may call `get`/`contains`/`put`/`remove`; `put_async` hands the entry to the
single writer thread and never blocks (a full queue skips the write and counts it). Several
processes may open the same directory: sequence numbers and byte counts are read inside each write
transaction, and LMDB serializes writers across processes (`used_bytes` is this process's view
as of its last write).
"""

from __future__ import annotations

import os
import queue
import struct
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import lmdb

from cacheproxy.cache.block_entry import BlockEntry, CorruptEntry, decode, encode
from cacheproxy.cache.tier import TierStats
from cacheproxy.log import get_logger

if TYPE_CHECKING:
    from cacheproxy.config import Settings

log = get_logger(__name__)

_U64 = struct.Struct(">Q")
_INDEX = struct.Struct(">QQ")  # sequence number, accounted bytes
_USED_KEY = b"used_bytes"
# Index record + order record + the blocks leaf node, rounded generously: LMDB's per-node header,
# key, half-full leaves and branch pages.
_RECORD_OVERHEAD = 512
# Pages never filled by entries. Even deleting needs free pages (copy-on-write of the B-tree path
# and the free list), so a map filled to its last pages could not evict its way out again.
_RESERVED_PAGES = 128
# Of the headroom, what one transaction may need besides new values: dirty leaf and branch pages.
_TXN_SLACK_PAGES = 64
# Evict-and-retry rounds after LMDB reports the map full, evicting 10%, 20%, 40%... of the budget.
_MAP_FULL_ATTEMPTS = 4


@dataclass(slots=True)
class _Batch:
    entries: list[BlockEntry]
    touches: list[bytes]
    barriers: list[threading.Event]
    stop: bool = False


class DiskTier:
    """LMDB-backed `KVTier`. Call `close()` (or `flush()`) to drain queued writes."""

    name = "disk"

    def __init__(
        self,
        path: Path | str,
        namespace_digest: bytes,
        map_size: int,
        write_queue: int = 1024,
        fill_fraction: float = 0.9,
        sync: bool = True,
        max_readers: int = 512,
        max_batch_entries: int = 64,
    ) -> None:
        if not 0.0 < fill_fraction < 1.0:
            raise ValueError("fill_fraction must be in (0, 1): LMDB needs headroom to free pages")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.namespace_digest = namespace_digest
        self._env = lmdb.open(
            str(self.path),
            map_size=map_size,
            subdir=True,
            max_dbs=4,
            max_readers=max_readers,
            lock=True,
            sync=sync,
            metasync=False,
        )
        # A process killed with a read transaction open leaves its reader slot behind; clearing
        # stale slots lets LMDB reuse the pages that reader pinned.
        self._env.reader_check()
        self._blocks = self._env.open_db(b"blocks")
        self._index = self._env.open_db(b"index")
        self._order = self._env.open_db(b"order")
        self._meta = self._env.open_db(b"meta")
        self._psize: int = self._env.stat()["psize"]
        self.map_size: int = self._env.info()["map_size"]
        reserved = _RESERVED_PAGES * self._psize
        self._budget = max(0, min(int(self.map_size * fill_fraction), self.map_size - reserved))
        # New values of one transaction must fit in the headroom: pages freed by its evictions
        # become reusable only a transaction or two after it commits, hence half of it.
        self._txn_bytes = max(0, self.map_size - self._budget - _TXN_SLACK_PAGES * self._psize) // 2
        self._max_batch_entries = max_batch_entries
        with self._env.begin() as txn:
            self._used = self._read_used(txn)
            # Hashes stored, kept in memory: a prefix lookup asks for hundreds at once, and after a
            # restart or with a cold page cache each LMDB lookup may fault pages in from the device
            # (0.4 s for 512 blocks measured on a VM disk). A hint: added after a commit, dropped at a
            # delete, and a miss here still asks LMDB (another process may have written it).
            self._known: set[bytes] = set(txn.cursor(db=self._index).iternext(keys=True, values=False))
        self._stats = TierStats()
        self._stats_lock = threading.Lock()
        # Entries queued for the writer, readable at once: a block demoted from the CPU tier must
        # not miss everywhere while it waits for its commit.
        self._in_flight: dict[bytes, BlockEntry] = {}
        self._write_lock = threading.Lock()
        self._queue: queue.Queue[tuple[str, object]] = queue.Queue(maxsize=write_queue)
        self._closed = False
        self._writer = threading.Thread(target=self._writer_loop, name="disk-tier-writer", daemon=True)
        self._writer.start()

    @classmethod
    def from_settings(cls, settings: Settings, namespace_digest: bytes) -> DiskTier:
        return cls(
            settings.data_dir / "kv.lmdb",
            namespace_digest,
            map_size=settings.disk_cache_bytes,
            write_queue=settings.disk_write_queue,
            fill_fraction=settings.disk_cache_fill,
        )

    # --- KVTier --------------------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def capacity_bytes(self) -> int:
        return self._budget

    @property
    def stats(self) -> TierStats:
        with self._stats_lock:
            return replace(self._stats)

    def __len__(self) -> int:
        with self._env.begin() as txn:
            return txn.stat(self._blocks)["entries"]

    def contains(self, block_hash: bytes) -> bool:
        """Whether a value is stored under the hash (not verified: `get` may still drop it)."""
        if block_hash in self._in_flight or block_hash in self._known:
            return True
        with self._env.begin(db=self._index, buffers=True) as txn:
            found = txn.get(block_hash) is not None
        if found:
            self._known.add(block_hash)
        return found

    def get(self, block_hash: bytes) -> BlockEntry | None:
        """The verified entry, or None; a damaged or foreign entry is deleted and counted."""
        pending = self._in_flight.get(block_hash)
        if pending is not None:
            with self._stats_lock:
                self._stats.hits += 1
            return BlockEntry(pending.hash, pending.parent_hash, pending.token_ids, pending.tensor.clone())
        try:
            with self._env.begin(db=self._blocks, buffers=True) as txn:
                raw = txn.get(block_hash)
                entry = None if raw is None else decode(raw, self.namespace_digest, block_hash)
        except CorruptEntry as exc:
            log.warning("disk_tier.corrupt_entry", hash=block_hash.hex(), reason=str(exc))
            self._drop_corrupt(block_hash)
            entry = None
        with self._stats_lock:
            if entry is None:
                self._stats.misses += 1
            else:
                self._stats.hits += 1
        if entry is not None:
            self._enqueue(("touch", block_hash))
        return entry

    def put(self, entry: BlockEntry) -> bool:
        """Store synchronously: the entry is committed when this returns True."""
        return self._commit([(entry.hash, encode(entry, self.namespace_digest))], [])[0]

    def put_async(self, entry: BlockEntry) -> bool:
        """Queue a write for the writer thread; False (counted) when the queue is full.

        The writer encodes `entry.tensor` later, so the caller must not modify that tensor after
        this call (hand over a copy, not a live pool block).
        """
        self._in_flight[entry.hash] = entry
        if self._enqueue(("put", entry)):
            return True
        self._in_flight.pop(entry.hash, None)
        with self._stats_lock:
            self._stats.writes_skipped += 1
        return False

    def remove(self, block_hash: bytes) -> bool:
        self._in_flight.pop(block_hash, None)
        with self._write_lock, self._env.begin(write=True) as txn:
            freed = self._delete(txn, block_hash)
            if freed is None:
                return False
            used = self._read_used(txn) - freed
            txn.put(_USED_KEY, _U64.pack(max(0, used)), db=self._meta)
        self._used = max(0, used)
        return True

    # --- lifecycle -----------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every write queued before this call is committed (or skipped)."""
        if self._closed:
            return True
        done = threading.Event()
        self._queue.put(("barrier", done))
        return done.wait(timeout)

    def close(self) -> None:
        """Drain the queue, stop the writer and close the environment. Idempotent."""
        if self._closed:
            return
        self._closed = True  # refuse new queued work; what is queued already is still written
        self._queue.put(("stop", None))
        self._writer.join()
        self._env.close()

    def drop_page_cache(self) -> None:
        """Asks the OS to forget the data file's cached pages (committed ones are clean), so that the
        next reads come from the device: what a restart or memory pressure leaves. Best effort."""
        fadvise = getattr(os, "posix_fadvise", None)
        if fadvise is None:
            return
        try:
            fd = os.open(self.path / "data.mdb", os.O_RDONLY)
        except OSError:
            return
        try:
            fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
        finally:
            os.close(fd)

    def storage_info(self) -> dict[str, int]:
        """What LMDB itself reports: map_size, psize, last_pgno (pages in use), entries, readers."""
        info, stat = self._env.info(), self._env.stat()
        with self._env.begin() as txn:
            entries = txn.stat(self._blocks)["entries"]
        return {
            "map_size": info["map_size"],
            "psize": stat["psize"],
            "last_pgno": info["last_pgno"],
            "entries": entries,
            "num_readers": info["num_readers"],
        }

    def hashes(self) -> list[bytes]:
        """Stored hashes, next to be evicted first (for listing, not for lookups)."""
        with self._env.begin(db=self._order) as txn:
            return [bytes(h) for _, h in txn.cursor()]

    # --- writer --------------------------------------------------------------------------
    def _enqueue(self, item: tuple[str, object]) -> bool:
        if self._closed:
            return False
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            return False
        return True

    def _next_batch(self) -> _Batch:
        batch = _Batch([], [], [])
        item: tuple[str, object] | None = self._queue.get()
        size = 0
        while item is not None:
            kind, value = item
            if kind == "put":
                assert isinstance(value, BlockEntry)
                batch.entries.append(value)
                size += value.nbytes
            elif kind == "touch":
                assert isinstance(value, bytes)
                batch.touches.append(value)
            elif kind == "barrier":
                assert isinstance(value, threading.Event)
                batch.barriers.append(value)
            else:
                batch.stop = True
            if batch.stop or batch.barriers or len(batch.entries) >= self._max_batch_entries:
                break
            if size >= self._txn_bytes:
                break
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                item = None
        return batch

    def _writer_loop(self) -> None:
        while True:
            batch = self._next_batch()
            try:
                values = [(e.hash, encode(e, self.namespace_digest)) for e in batch.entries]
                if values or batch.touches:
                    self._commit(values, batch.touches)
            except Exception:
                # A failed batch loses cache writes, never the writer: later writes still work.
                log.exception("disk_tier.batch_failed", entries=len(batch.entries))
                with self._stats_lock:
                    self._stats.writes_skipped += len(batch.entries)
            for e in batch.entries:
                if self._in_flight.get(e.hash) is e:
                    del self._in_flight[e.hash]
            for done in batch.barriers:
                done.set()
            if batch.stop:
                return

    def _commit(self, values: list[tuple[bytes, bytes]], touches: list[bytes]) -> list[bool]:
        """Write `values` and apply `touches`; per value: stored or not.

        Values go in as few transactions as the headroom allows (usually one).
        """
        stored: list[bool] = []
        chunk: list[tuple[bytes, bytes]] = []
        chunk_bytes = 0
        for block_hash, value in values:
            footprint = self._footprint(len(value))
            if chunk and chunk_bytes + footprint > self._txn_bytes:
                stored += self._commit_one(chunk, touches)
                chunk, chunk_bytes, touches = [], 0, []
            chunk.append((block_hash, value))
            chunk_bytes += footprint
        if chunk or touches:
            stored += self._commit_one(chunk, touches)
        return stored

    def _commit_one(self, values: list[tuple[bytes, bytes]], touches: list[bytes]) -> list[bool]:
        with self._write_lock:
            for attempt in range(_MAP_FULL_ATTEMPTS):
                try:
                    with self._env.begin(write=True) as txn:
                        stored, puts, evictions, used = self._apply(txn, values, touches)
                except lmdb.MapFullError:
                    # The transaction was aborted; free pages in a transaction of their own, more
                    # each time: a value needs *contiguous* free pages, and a fragmented free list
                    # may not have them although the byte count says there is room.
                    log.warning("disk_tier.map_full", attempt=attempt, used=self._used)
                    needed = sum(self._footprint(len(v)) for _, v in values)
                    self._evict_oldest(max(self._budget // 10, needed) << attempt)
                    continue
                self._used = used
                self._known.update(h for (h, _), ok in zip(values, stored, strict=True) if ok)
                with self._stats_lock:
                    self._stats.puts += puts
                    self._stats.evictions += evictions
                return stored
        log.error("disk_tier.write_dropped", entries=len(values))
        with self._stats_lock:
            self._stats.writes_skipped += len(values)
        return [False] * len(values)

    def _apply(
        self, txn: lmdb.Transaction, values: list[tuple[bytes, bytes]], touches: list[bytes]
    ) -> tuple[list[bool], int, int, int]:
        used = self._read_used(txn)
        seq = self._next_seq(txn)
        stored: list[bool] = []
        puts = evictions = 0
        for block_hash, value in values:
            footprint = self._footprint(len(value))
            if footprint > min(self._budget, self._txn_bytes):
                stored.append(False)
                continue
            if txn.get(block_hash, db=self._index) is not None:
                seq = self._resequence(txn, block_hash, seq)
                stored.append(True)
                continue
            while used + footprint > self._budget:
                freed = self._delete_oldest(txn)
                if freed is None:
                    break
                used -= freed
                evictions += 1
            txn.put(block_hash, value, db=self._blocks)
            txn.put(block_hash, _INDEX.pack(seq, footprint), db=self._index)
            txn.put(_U64.pack(seq), block_hash, db=self._order)
            seq += 1
            used += footprint
            puts += 1
            stored.append(True)
        for block_hash in touches:
            seq = self._resequence(txn, block_hash, seq)
        txn.put(_USED_KEY, _U64.pack(used), db=self._meta)
        return stored, puts, evictions, used

    def _evict_oldest(self, nbytes: int) -> None:
        try:
            with self._env.begin(write=True) as txn:
                used, evicted, freed_total = self._read_used(txn), 0, 0
                while freed_total < nbytes:
                    freed = self._delete_oldest(txn)
                    if freed is None:
                        break
                    freed_total += freed
                    evicted += 1
                used = max(0, used - freed_total)
                txn.put(_USED_KEY, _U64.pack(used), db=self._meta)
        except lmdb.MapFullError:
            log.error("disk_tier.evict_failed_map_full")
            return
        self._used = used
        with self._stats_lock:
            self._stats.evictions += evicted

    def _drop_corrupt(self, block_hash: bytes) -> None:
        with self._write_lock, self._env.begin(write=True, buffers=True) as txn:
            raw = txn.get(block_hash, db=self._blocks)
            if raw is None:
                return  # another reader dropped it first
            try:
                decode(raw, self.namespace_digest, block_hash)
                return  # rewritten with a good value since we read it
            except CorruptEntry:
                pass
            freed = self._delete(txn, block_hash)
            used = max(0, self._read_used(txn) - (freed or 0))
            txn.put(_USED_KEY, _U64.pack(used), db=self._meta)
        self._used = used
        with self._stats_lock:
            self._stats.corrupt_dropped += 1

    # --- records -------------------------------------------------------------------------
    def _footprint(self, value_len: int) -> int:
        # Values larger than about half a page go to their own overflow pages.
        if value_len + 16 > self._psize // 2:
            return -(-(value_len + 16) // self._psize) * self._psize + _RECORD_OVERHEAD
        return value_len + 16 + _RECORD_OVERHEAD

    def _read_used(self, txn: lmdb.Transaction) -> int:
        raw = txn.get(_USED_KEY, db=self._meta)
        return 0 if raw is None else _U64.unpack(bytes(raw))[0]

    def _next_seq(self, txn: lmdb.Transaction) -> int:
        with txn.cursor(db=self._order) as cursor:
            return _U64.unpack(bytes(cursor.key()))[0] + 1 if cursor.last() else 0

    def _resequence(self, txn: lmdb.Transaction, block_hash: bytes, seq: int) -> int:
        raw = txn.get(block_hash, db=self._index)
        if raw is None:
            return seq  # evicted since it was read
        old_seq, footprint = _INDEX.unpack(bytes(raw))
        txn.delete(_U64.pack(old_seq), db=self._order)
        txn.put(_U64.pack(seq), block_hash, db=self._order)
        txn.put(block_hash, _INDEX.pack(seq, footprint), db=self._index)
        return seq + 1

    def _delete(self, txn: lmdb.Transaction, block_hash: bytes) -> int | None:
        """Delete one entry's records; its accounted bytes, or None when it was not stored."""
        self._known.discard(block_hash)
        raw = txn.get(block_hash, db=self._index)
        deleted_value = txn.delete(block_hash, db=self._blocks)
        if raw is None:
            return 0 if deleted_value else None
        seq, footprint = _INDEX.unpack(bytes(raw))
        txn.delete(_U64.pack(seq), db=self._order)
        txn.delete(block_hash, db=self._index)
        return footprint

    def _delete_oldest(self, txn: lmdb.Transaction) -> int | None:
        with txn.cursor(db=self._order) as cursor:
            if not cursor.first():
                return None
            block_hash = bytes(cursor.value())
        return self._delete(txn, block_hash)
