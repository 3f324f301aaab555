from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from cacheproxy.cache.block_entry import BlockEntry
from cacheproxy.cache.cpu_tier import CpuTier
from cacheproxy.cache.disk_tier import DiskTier
from cacheproxy.cache.hashing import BlockHasher, Namespace
from cacheproxy.cache.tier import KVTier

BLOCK = 4
SHAPE = (2, 2, BLOCK, 2, 8)
NAMESPACE = Namespace(b"test-model", "float16", BLOCK)
HASHER = BlockHasher(NAMESPACE, seed=3)


def _entries(n: int, dtype: torch.dtype = torch.float16, first_token: int = 0) -> list[BlockEntry]:
    out, parent = [], HASHER.root()
    for i in range(n):
        ids = tuple(range(first_token + i * BLOCK, first_token + (i + 1) * BLOCK))
        h = HASHER.next_hash(parent, ids)
        tensor = torch.randn(SHAPE, generator=torch.Generator().manual_seed(first_token + i)).to(dtype)
        out.append(BlockEntry(h, parent, ids, tensor))
        parent = h
    return out


def _tier(blocks: int, dtype: torch.dtype = torch.float16, **kwargs) -> CpuTier:
    nbytes = torch.empty(SHAPE, dtype=dtype).nbytes
    return CpuTier(SHAPE, dtype, capacity_bytes=blocks * nbytes + nbytes - 1, **kwargs)


def test_cpu_tier_is_a_kv_tier() -> None:
    assert isinstance(_tier(2), KVTier)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_blocks_round_trip_and_get_returns_a_copy_the_caller_owns(dtype: torch.dtype) -> None:
    tier = _tier(4, dtype)
    entries = _entries(3, dtype)
    for e in entries:
        assert tier.put(e)
    entries[0].tensor.zero_()  # the tier copied on put
    got = tier.get(entries[0].hash)
    assert got is not None and got.tensor.dtype == dtype and got.token_ids == entries[0].token_ids
    assert torch.equal(got.tensor, _entries(1, dtype)[0].tensor)
    got.tensor.fill_(7)  # and copies on get
    again = tier.get(entries[0].hash)
    assert again is not None and not torch.equal(again.tensor, got.tensor)
    assert tier.stats.hits == 2 and tier.get(b"\x00" * 16) is None and tier.stats.misses == 1


def test_get_into_copies_into_the_callers_tensor() -> None:
    tier = _tier(2)
    e = _entries(1)[0]
    tier.put(e)
    out = torch.zeros(SHAPE, dtype=torch.float16)
    got = tier.get_into(e.hash, out)
    assert got is not None and got.tensor is out and torch.equal(out, e.tensor)
    assert tier.get_into(b"\x00" * 16, out) is None
    with pytest.raises(ValueError):
        tier.get_into(e.hash, torch.zeros(SHAPE, dtype=torch.float32))


def test_least_recently_used_is_evicted_first_and_a_read_refreshes() -> None:
    tier = _tier(3)
    a, b, c, d = _entries(4)
    for e in (a, b, c):
        tier.put(e)
    assert tier.get(a.hash) is not None
    tier.put(d)
    assert not tier.contains(b.hash)
    assert all(tier.contains(e.hash) for e in (a, c, d))
    assert tier.stats.evictions == 1
    assert tier.hashes() == [c.hash, a.hash, d.hash]


def test_a_stream_of_blocks_never_exceeds_capacity() -> None:
    tier = _tier(5)
    assert tier.capacity_blocks == 5
    entries = _entries(50)
    for e in entries:
        assert tier.put(e)
        assert tier.used_bytes <= tier.capacity_bytes
    assert len(tier) == 5 and tier.used_bytes == tier.capacity_bytes
    assert tier.stats.puts == 50 and tier.stats.evictions == 45
    for e in entries[-5:]:
        got = tier.get(e.hash)
        assert got is not None and torch.equal(got.tensor, e.tensor)


def test_a_zero_capacity_tier_refuses_puts() -> None:
    tier = CpuTier(SHAPE, torch.float16, capacity_bytes=0)
    assert not tier.put(_entries(1)[0]) and tier.used_bytes == 0


def test_a_block_of_another_shape_or_dtype_is_a_programming_error() -> None:
    tier = _tier(2)
    e = _entries(1)[0]
    with pytest.raises(ValueError):
        tier.put(BlockEntry(e.hash, e.parent_hash, e.token_ids, e.tensor.float()))
    wide = torch.zeros((2, 2, BLOCK, 4, 8), dtype=torch.float16)
    with pytest.raises(ValueError):
        tier.put(BlockEntry(e.hash, e.parent_hash, e.token_ids, wide))


def test_remove_frees_the_slot() -> None:
    tier = _tier(1)
    a, b = _entries(2)
    tier.put(a)
    assert tier.remove(a.hash) and not tier.remove(a.hash)
    tier.put(b)
    assert tier.stats.evictions == 0 and tier.contains(b.hash)


def test_a_chain_put_after_removals_fills_neighbouring_slots_in_order() -> None:
    """Freed slots go back lowest first: a chain put after others were removed (in any order) sits in
    ascending, neighbouring slots, so loading it back is a few large copies, not one per block."""
    from cacheproxy.cache.tiered_store import SlabSlot, copy_runs

    tier = _tier(12)
    old = _entries(10)
    for e in old:
        tier.put(e)
    for e in [*old[5:], *reversed(old[:5])]:  # removed out of order
        tier.remove(e.hash)
    chain = _entries(8, first_token=1000)
    for e in chain:
        tier.put(e)
    views = [tier.get_view(e.hash) for e in chain]
    assert all(v is not None for v in views)
    runs = copy_runs([(i, v.tensor) for i, v in enumerate(views) if v is not None])
    assert [(first, count) for first, count, _ in runs] == [(0, 8)]
    assert torch.equal(runs[0][2], torch.stack([e.tensor for e in chain]))
    # The same by slots, as the tiered store reads them (no view per block).
    found = [tier.get_slot(e.hash) for e in chain]
    assert [(f[0], f[1]) for f in found if f is not None] == [(e.parent_hash, e.token_ids) for e in chain]
    assert tier.slab is not None
    by_slot = copy_runs([(i, SlabSlot(tier.slab, f[2])) for i, f in enumerate(found) if f is not None])
    assert [(first, count) for first, count, _ in by_slot] == [(0, 8)]
    assert torch.equal(by_slot[0][2], runs[0][2])
    assert tier.get_slot(b"\x01" * 16) is None


def test_evicted_blocks_are_demoted_to_the_disk_tier(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path / "kv.lmdb", NAMESPACE.digest, map_size=8 << 20)
    tier = _tier(2, on_evict=disk.put_async)
    entries = _entries(5)
    for e in entries:
        tier.put(e)
    disk.flush()
    for e in entries[:3]:
        got = disk.get(e.hash)
        assert (
            got is not None and got.matches(e.parent_hash, e.token_ids) and torch.equal(got.tensor, e.tensor)
        )
    assert not disk.contains(entries[4].hash)
    disk.close()


def test_concurrent_puts_and_gets_keep_content_and_capacity() -> None:
    tier = _tier(8)
    entries = _entries(64)
    errors: list[str] = []

    def worker(offset: int) -> None:
        for rnd in range(20):
            for e in entries[offset::4]:
                tier.put(e)
                got = tier.get(entries[(offset + rnd) % 64].hash)
                if got is not None:
                    want = entries[(offset + rnd) % 64]
                    if not (
                        got.matches(want.parent_hash, want.token_ids) and torch.equal(got.tensor, want.tensor)
                    ):
                        errors.append(f"wrong content for block {(offset + rnd) % 64}")
                if tier.used_bytes > tier.capacity_bytes:
                    errors.append("over capacity")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(tier) == 8
    stats = tier.stats
    assert stats.puts - stats.evictions == 8
