from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lmdb
import msgpack
import pytest
import torch

from cacheproxy.cache.block_entry import BlockEntry, CorruptEntry, decode, encode
from cacheproxy.cache.disk_tier import DiskTier
from cacheproxy.cache.hashing import BlockHasher, Namespace
from cacheproxy.cache.tier import KVTier

BLOCK = 16
SHAPE = (2, 2, BLOCK, 2, 8)  # [layers, K|V, block_size, kv_heads, head_dim]
NAMESPACE = Namespace(b"test-model", "float16", BLOCK)
HASHER = BlockHasher(NAMESPACE, seed=7)
ROOT_PATH = Path(__file__).resolve().parents[1]


def _content(i: int, shape: tuple[int, ...] = SHAPE, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(i)).to(dtype)


def _chain(n: int, shape: tuple[int, ...] = SHAPE, dtype: torch.dtype = torch.float16, first_token: int = 0):
    entries, parent = [], HASHER.root()
    for i in range(n):
        ids = tuple(range(first_token + i * BLOCK, first_token + (i + 1) * BLOCK))
        h = HASHER.next_hash(parent, ids)
        entries.append(BlockEntry(h, parent, ids, _content(first_token + i, shape, dtype)))
        parent = h
    return entries


@pytest.fixture
def tier(tmp_path: Path):
    t = DiskTier(tmp_path / "kv.lmdb", NAMESPACE.digest, map_size=16 << 20)
    yield t
    t.close()


def _flip_stored_byte(path: Path, block_hash: bytes, offset_from_end: int) -> None:
    env = lmdb.open(str(path), max_dbs=4)
    blocks = env.open_db(b"blocks")
    with env.begin(write=True, db=blocks) as txn:
        value = bytearray(txn.get(block_hash))
        value[-offset_from_end] ^= 0x40
        txn.put(block_hash, bytes(value))
    env.close()


def test_disk_tier_is_a_kv_tier(tier: DiskTier) -> None:
    assert isinstance(tier, KVTier)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_blocks_of_each_dtype_round_trip_bit_exactly(tmp_path: Path, dtype: torch.dtype) -> None:
    tier = DiskTier(tmp_path / "kv.lmdb", NAMESPACE.digest, map_size=16 << 20)
    entries = _chain(3, dtype=dtype)
    entries[0].tensor.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -0.0], dtype=dtype)
    assert all(tier.put(e) for e in entries)
    for e in entries:
        got = tier.get(e.hash)
        assert got is not None
        assert got.tensor.dtype == dtype and got.tensor.shape == e.tensor.shape
        assert torch.equal(got.tensor.view(torch.uint8), e.tensor.view(torch.uint8))
        assert got.parent_hash == e.parent_hash and got.token_ids == e.token_ids
    assert tier.stats.hits == 3
    tier.close()


def test_committed_entries_survive_a_restart(tmp_path: Path) -> None:
    entries = _chain(5)
    first = DiskTier(tmp_path / "kv.lmdb", NAMESPACE.digest, map_size=16 << 20)
    for e in entries[:3]:
        assert first.put(e)
    for e in entries[3:]:
        assert first.put_async(e)
    used = first.used_bytes
    first.close()  # drains the two queued writes
    second = DiskTier(tmp_path / "kv.lmdb", NAMESPACE.digest, map_size=16 << 20)
    assert len(second) == 5 and second.used_bytes > used > 0
    for e in entries:
        got = second.get(e.hash)
        assert got is not None and torch.equal(got.tensor, e.tensor)
    second.close()


def test_stored_hashes_are_known_across_restarts_and_deletes(tmp_path: Path) -> None:
    entries = _chain(4)
    first = DiskTier(tmp_path / "kv.lmdb", NAMESPACE.digest, map_size=16 << 20)
    for e in entries:
        assert first.put(e)
    assert first.remove(entries[1].hash)
    assert [first.contains(e.hash) for e in entries] == [True, False, True, True]
    first.close()
    second = DiskTier(tmp_path / "kv.lmdb", NAMESPACE.digest, map_size=16 << 20)
    assert [second.contains(e.hash) for e in entries] == [True, False, True, True]
    second.drop_page_cache()  # reads then come from the device; the values are the same
    got = second.get(entries[3].hash)
    assert got is not None and torch.equal(got.tensor, entries[3].tensor)
    second.close()


def test_a_flipped_byte_on_disk_is_dropped_counted_and_never_served(tmp_path: Path) -> None:
    path = tmp_path / "kv.lmdb"
    tier = DiskTier(path, NAMESPACE.digest, map_size=16 << 20)
    good, damaged = _chain(2)
    tier.put(good)
    tier.put(damaged)
    tier.close()
    _flip_stored_byte(path, damaged.hash, offset_from_end=100)  # inside the payload
    tier = DiskTier(path, NAMESPACE.digest, map_size=16 << 20)
    used_before = tier.used_bytes
    assert tier.get(damaged.hash) is None
    assert tier.stats.corrupt_dropped == 1 and tier.stats.misses == 1
    assert not tier.contains(damaged.hash) and tier.used_bytes < used_before
    assert tier.get(damaged.hash) is None and tier.stats.corrupt_dropped == 1  # gone, not re-counted
    assert tier.get(good.hash) is not None
    tier.close()


def test_an_entry_of_another_namespace_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "kv.lmdb"
    entry = _chain(1)[0]
    writer = DiskTier(path, NAMESPACE.digest, map_size=16 << 20)
    writer.put(entry)
    writer.close()
    other = Namespace(b"test-model", "bfloat16", BLOCK).digest
    reader = DiskTier(path, other, map_size=16 << 20)
    assert reader.get(entry.hash) is None
    assert reader.stats.corrupt_dropped == 1
    reader.close()


def test_a_forged_hash_collision_is_refused_by_the_callers_match(tier: DiskTier) -> None:
    stored = _chain(1)[0]
    tier.put(stored)
    # Another request's block with different tokens (or another parent) claiming the same hash.
    forged_tokens = tuple(t + 1 for t in stored.token_ids)
    got = tier.get(stored.hash)
    assert got is not None
    assert got.matches(stored.parent_hash, stored.token_ids)
    assert not got.matches(stored.parent_hash, forged_tokens)
    assert not got.matches(b"\x01" * 16, stored.token_ids)
    assert not got.matches(stored.parent_hash, stored.token_ids[:-1])


def test_every_single_byte_corruption_of_a_value_is_refused() -> None:
    entry = _chain(1, shape=(1, 2, BLOCK, 1, 4))[0]
    value = encode(entry, NAMESPACE.digest)
    assert decode(value, NAMESPACE.digest, entry.hash).token_ids == entry.token_ids
    for i in range(len(value)):
        for mask in (0x01, 0x80, 0xFF):
            damaged = bytearray(value)
            damaged[i] ^= mask
            with pytest.raises(CorruptEntry):
                decode(bytes(damaged), NAMESPACE.digest, entry.hash)


def test_malformed_truncated_and_mismatched_values_are_refused() -> None:
    entry = _chain(1)[0]
    value = encode(entry, NAMESPACE.digest)
    header, payload = msgpack.unpackb(value)
    cases = {
        "not msgpack": b"\xc1\xc1\xc1",
        "empty": b"",
        "truncated": value[:-1],
        "trailing byte": value + b"\x00",
        "wrong key": value,
        "other version": msgpack.packb([{**header, "v": 2}, payload]),
        "shape disagrees with payload": msgpack.packb([{**header, "shape": [2, 2, BLOCK, 2, 4]}, payload]),
        "three elements": msgpack.packb([header, payload, 0]),
    }
    for name, bad in cases.items():
        key = b"\x00" * 16 if name == "wrong key" else entry.hash
        with pytest.raises(CorruptEntry):
            decode(bad, NAMESPACE.digest, key)
            pytest.fail(name)


@pytest.mark.parametrize("fill_fraction", [0.9, 0.99])
def test_a_stream_of_blocks_never_exceeds_the_budget(tmp_path: Path, fill_fraction: float) -> None:
    shape = (4, 2, BLOCK, 2, 64)  # 32 KiB a block
    tier = DiskTier(tmp_path / "kv.lmdb", NAMESPACE.digest, map_size=4 << 20, fill_fraction=fill_fraction)
    entries = _chain(300, shape=shape)  # ~10 MB through a 4 MiB map
    for e in entries:
        assert tier.put(e)
        assert tier.used_bytes <= tier.capacity_bytes <= 4 << 20
        info = tier.storage_info()
        assert info["last_pgno"] * info["psize"] <= info["map_size"]
    queued = _chain(300, shape=shape, first_token=10**6)  # the writer thread's batches too
    assert all(tier.put_async(e) for e in queued)
    tier.flush()
    stats = tier.stats
    held = len(tier)
    assert stats.puts == 600 and stats.writes_skipped == 0 and stats.evictions == 600 - held
    assert tier.used_bytes <= tier.capacity_bytes
    assert held * 32 * 1024 <= tier.capacity_bytes < (held + 3) * 37 * 1024  # full, not just bounded
    # Oldest first out: the newest blocks are all still there, the first ones are gone.
    assert all(tier.get(e.hash) is not None for e in queued[-held:])
    assert tier.get(entries[-1].hash) is None
    assert os.path.getsize(tmp_path / "kv.lmdb" / "data.mdb") <= 4 << 20
    tier.close()


_HOLD_READ_SNAPSHOT = """
import sys, lmdb
env = lmdb.open(sys.argv[1], max_dbs=4, readonly=True)
txn = env.begin()
print("reading", flush=True)
sys.stdin.readline()
txn.abort()
"""


def test_a_reader_pinning_old_pages_makes_writes_fail_soft_until_it_ends(tmp_path: Path) -> None:
    path = tmp_path / "kv.lmdb"
    tier = DiskTier(path, NAMESPACE.digest, map_size=4 << 20)
    shape = (4, 2, BLOCK, 2, 64)
    for e in _chain(150, shape=shape):
        tier.put(e)
    # While another process reads an old snapshot, LMDB may not reuse the pages evictions free.
    reader = subprocess.Popen(
        [sys.executable, "-c", _HOLD_READ_SNAPSHOT, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout is not None and reader.stdout.readline().strip() == "reading"
        results = [tier.put(e) for e in _chain(150, shape=shape, first_token=10**6)]
    finally:
        assert reader.stdin is not None
        reader.stdin.write("\n")
        reader.stdin.close()
        reader.wait(timeout=60)
    assert not all(results)  # refused, not raised
    assert tier.stats.writes_skipped == results.count(False)
    later = _chain(150, shape=shape, first_token=2 * 10**6)
    assert all(tier.put(e) for e in later)
    assert all(tier.get(e.hash) is not None for e in later[-50:])
    assert tier.used_bytes <= tier.capacity_bytes
    tier.close()


def test_a_read_refreshes_recency_so_hot_blocks_outlive_cold_ones(tmp_path: Path) -> None:
    shape = (4, 2, BLOCK, 2, 64)
    tier = DiskTier(tmp_path / "kv.lmdb", NAMESPACE.digest, map_size=4 << 20)
    entries = _chain(200, shape=shape)
    hot = entries[0]
    for e in entries:
        tier.put(e)
        assert tier.get(hot.hash) is not None
        tier.flush()  # let the writer apply the touch before the next put
    assert tier.get(hot.hash) is not None
    assert tier.get(entries[1].hash) is None
    tier.close()


def test_an_entry_larger_than_the_budget_is_refused(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path / "kv.lmdb", NAMESPACE.digest, map_size=1 << 20)
    big = _chain(1, shape=(128, 2, BLOCK, 2, 64))[0]  # 1 MiB of fp16 > 90% of the 1 MiB map
    assert not tier.put(big)
    assert not tier.contains(big.hash) and tier.used_bytes == 0
    tier.close()


def test_remove_deletes_and_releases_bytes(tier: DiskTier) -> None:
    e = _chain(1)[0]
    tier.put(e)
    assert tier.used_bytes > 0
    assert tier.remove(e.hash) and not tier.remove(e.hash)
    assert tier.get(e.hash) is None and tier.used_bytes == 0


_HOLD_WRITE_LOCK = """
import sys, lmdb
env = lmdb.open(sys.argv[1], max_dbs=4)
txn = env.begin(write=True)
print("locked", flush=True)
sys.stdin.readline()
txn.abort()
"""


def test_a_full_write_queue_skips_writes_and_counts_them(tmp_path: Path) -> None:
    path = tmp_path / "kv.lmdb"
    tier = DiskTier(path, NAMESPACE.digest, map_size=16 << 20, write_queue=2, max_batch_entries=1)
    # Another process holds LMDB's write lock, so the writer thread stalls on its first batch.
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_WRITE_LOCK, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        entries = _chain(10)
        accepted = [tier.put_async(e) for e in entries]
    finally:
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.close()
        holder.wait(timeout=60)
    # One entry in the writer's hands, two in the queue; the rest were skipped, not waited for.
    assert 2 <= sum(accepted) <= 3
    assert tier.stats.writes_skipped == accepted.count(False)
    tier.flush()
    for e, ok in zip(entries, accepted, strict=True):
        assert tier.contains(e.hash) == ok
    tier.close()


_WRITE_UNTIL_KILLED = textwrap.dedent(
    """
    import sys, torch
    from cacheproxy.cache.block_entry import BlockEntry
    from cacheproxy.cache.disk_tier import DiskTier
    from cacheproxy.cache.hashing import BlockHasher, Namespace
    hasher = BlockHasher(Namespace(b"test-model", "float16", 16), seed=7)
    tier = DiskTier(sys.argv[1], hasher.namespace.digest, map_size=256 << 20)
    shape, parent, i = (8, 2, 16, 4, 64), hasher.root(), 0
    while True:
        ids = tuple(range(i * 16, (i + 1) * 16))
        h = hasher.next_hash(parent, ids)
        t = torch.randn(shape, generator=torch.Generator().manual_seed(i)).half()
        side = BlockEntry(hasher.next_hash(parent, tuple(x + 1 for x in ids)), parent, ids, t)
        tier.put_async(side)  # keeps the writer thread committing too when the kill lands
        assert tier.put(BlockEntry(h, parent, ids, t))
        print(i, h.hex(), flush=True)  # committed
        parent, i = h, i + 1
    """
)


def test_sigkill_mid_write_loses_no_committed_entry_and_serves_no_corrupt_one(tmp_path: Path) -> None:
    path = tmp_path / "kv.lmdb"
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITE_UNTIL_KILLED, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT_PATH,
    )
    assert child.stdout is not None
    reported: list[tuple[int, bytes]] = []
    try:
        while len(reported) < 40:
            line = child.stdout.readline()
            assert line, child.stderr.read() if child.stderr else "writer died"
            i, h = line.split()
            reported.append((int(i), bytes.fromhex(h)))
    finally:
        os.kill(child.pid, signal.SIGKILL)
        rest, _ = child.communicate(timeout=60)
    reported += [(int(i), bytes.fromhex(h)) for i, h in (line.split() for line in rest.splitlines())]
    assert child.returncode == -signal.SIGKILL

    tier = DiskTier(path, NAMESPACE.digest, map_size=256 << 20)
    for i, h in reported:
        got = tier.get(h)
        assert got is not None, f"committed entry {i} lost"
        assert torch.equal(got.tensor, _content(i, (8, 2, 16, 4, 64)).half())
    for h in tier.hashes():  # side entries too: whatever LMDB holds must verify
        assert tier.get(h) is not None
    assert tier.stats.corrupt_dropped == 0
    assert tier.put(_chain(1, first_token=10**6)[0])  # and the store still takes writes
    tier.close()
