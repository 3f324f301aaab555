from __future__ import annotations

import dataclasses
import importlib.util
import os
import random
import shutil
import struct
import subprocess
import sys
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import pytest
import torch
import xxhash

from cacheproxy.cache import fastpath, hashing
from cacheproxy.cache.block_entry import BlockEntry
from cacheproxy.cache.cpu_tier import CpuTier
from cacheproxy.cache.hashing import BlockHasher, Namespace
from cacheproxy.cache.tiered_store import TieredStore
from cacheproxy.engine.block_pool import BlockIdentity, BlockPool

BLOCK = 16
NAMESPACE = Namespace(model_fingerprint=b"weights-digest", kv_dtype="bfloat16", block_size=BLOCK)


def _ids(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 128_000, size=n).tolist()


@pytest.fixture
def hasher() -> BlockHasher:
    return BlockHasher(NAMESPACE, seed=1234)


def test_equal_prefixes_give_equal_hashes(hasher: BlockHasher) -> None:
    prefix = _ids(5 * BLOCK)
    a = hasher.hash_blocks([*prefix, *_ids(3 * BLOCK, seed=1)])
    b = hasher.hash_blocks([*prefix, *_ids(2 * BLOCK, seed=2)])
    assert a[:5] == b[:5]
    assert a[5] != b[5]
    assert all(len(h) == 16 for h in a)


def test_one_changed_token_changes_its_block_and_every_later_one(hasher: BlockHasher) -> None:
    ids = _ids(8 * BLOCK)
    changed = list(ids)
    changed[3 * BLOCK + 7] += 1
    a, b = hasher.hash_blocks(ids), hasher.hash_blocks(changed)
    assert a[:3] == b[:3]
    assert all(x != y for x, y in zip(a[3:], b[3:], strict=True))


def test_a_partial_last_block_is_not_hashed(hasher: BlockHasher) -> None:
    ids = _ids(4 * BLOCK + BLOCK - 1)
    hashes = hasher.hash_blocks(ids)
    assert len(hashes) == 4
    assert hashes == hasher.hash_blocks(ids[: 4 * BLOCK])
    assert hasher.hash_blocks(ids[: BLOCK - 1]) == []


def test_salt_changes_the_root_and_every_block(hasher: BlockHasher) -> None:
    ids = _ids(3 * BLOCK)
    assert hasher.root("tenant-a") != hasher.root("tenant-b") != hasher.root()
    plain, salted = hasher.hash_blocks(ids), hasher.hash_blocks(ids, salt="tenant-a")
    assert all(x != y for x, y in zip(plain, salted, strict=True))
    assert salted == hasher.hash_blocks(ids, salt="tenant-a")


def test_every_namespace_field_changes_the_root() -> None:
    base = BlockHasher(NAMESPACE).root()
    variants = [
        dataclasses.replace(NAMESPACE, model_fingerprint=b"other-weights"),
        dataclasses.replace(NAMESPACE, kv_dtype="float16"),
        dataclasses.replace(NAMESPACE, block_size=32),
        dataclasses.replace(NAMESPACE, layout_version=NAMESPACE.layout_version + 1),
        dataclasses.replace(NAMESPACE, tenant_salt="t"),
    ]
    roots = {BlockHasher(ns).root() for ns in variants}
    assert base not in roots and len(roots) == len(variants)
    # The fixed tenant salt and a per-call salt are different fields, so they cannot alias.
    fixed_salt = BlockHasher(dataclasses.replace(NAMESPACE, tenant_salt="t"))
    assert fixed_salt.root() != BlockHasher(NAMESPACE).root("t")


def test_seed_changes_block_hashes_but_not_the_root() -> None:
    ids = _ids(2 * BLOCK)
    a, b = BlockHasher(NAMESPACE, seed=1), BlockHasher(NAMESPACE, seed=2)
    assert a.root() == b.root() == NAMESPACE.digest
    assert a.hash_blocks(ids)[0] != b.hash_blocks(ids)[0]


def test_chain_is_the_documented_formula(hasher: BlockHasher) -> None:
    ids = _ids(3 * BLOCK)
    expected, h = [], xxhash.xxh3_128_digest(NAMESPACE.to_bytes())
    for i in range(3):
        h = xxhash.xxh3_128_digest(h + struct.pack(f"<{BLOCK}i", *ids[i * BLOCK : (i + 1) * BLOCK]), 1234)
        expected.append(h)
    assert hasher.hash_blocks(ids) == expected


def test_incremental_hashing_extends_the_same_chain(hasher: BlockHasher) -> None:
    ids = _ids(6 * BLOCK)
    whole = hasher.hash_blocks(ids, salt="s")
    h, chain = hasher.root("s"), []
    for i in range(6):
        h = hasher.next_hash(h, ids[i * BLOCK : (i + 1) * BLOCK])
        chain.append(h)
    assert chain == whole
    assert hasher.hash_blocks(ids[2 * BLOCK :], parent=whole[1]) == whole[2:]
    with pytest.raises(ValueError):
        hasher.next_hash(whole[0], ids[: BLOCK - 1])


def test_lists_and_numpy_arrays_of_any_int_dtype_hash_alike(hasher: BlockHasher) -> None:
    ids = _ids(4 * BLOCK)
    expected = hasher.hash_blocks(ids)
    for dtype in ("<i4", ">i4", "int64", "uint32"):
        assert hasher.hash_blocks(np.asarray(ids, dtype=dtype)) == expected


def test_token_ids_outside_int32_are_refused(hasher: BlockHasher) -> None:
    with pytest.raises(OverflowError):
        hasher.hash_blocks([2**31] + [0] * (BLOCK - 1))
    with pytest.raises(OverflowError):
        hasher.hash_blocks(np.array([2**32 + 5] + [0] * (BLOCK - 1), dtype=np.int64))
    with pytest.raises(TypeError):
        hasher.hash_blocks(np.zeros(BLOCK, dtype=np.float32))


_HASH_IN_CHILD = """
import sys
from cacheproxy.cache import hashing
from cacheproxy.cache.hashing import BlockHasher, Namespace
ns = Namespace(model_fingerprint=b"weights-digest", kv_dtype="bfloat16", block_size=16)
print(",".join(h.hex() for h in BlockHasher(ns, seed=1234).hash_blocks(list(range(40)), salt="tenant")))
"""


def test_hashes_are_equal_in_another_process(hasher: BlockHasher) -> None:
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # a different str hash() than ours
    out = subprocess.run(
        [sys.executable, "-c", _HASH_IN_CHILD],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.strip()
    assert out.split(",") == [h.hex() for h in hasher.hash_blocks(list(range(40)), salt="tenant")]


def test_known_chain_value_is_stable(hasher: BlockHasher) -> None:
    # Persisted entries are keyed by these bytes: if this changes, bump LAYOUT_VERSION on purpose.
    assert [h.hex() for h in hasher.hash_blocks(list(range(40)), salt="tenant")] == [
        "5aa9808d7ef99a47a647f9e68b422eb8",
        "35031ffd3346fc49c535f36767e87101",
    ]


# --- the C chain ------------------------------------------------------------------------------

_C_BUILT = importlib.util.find_spec("cacheproxy.cache._hashchain") is not None
needs_c_chain = pytest.mark.skipif(not _C_BUILT, reason="cacheproxy.cache._hashchain is not built here")


def test_the_c_chain_is_built_where_its_header_and_a_compiler_are() -> None:
    # setup.py declares the extension optional, so a failed build would otherwise go unnoticed and
    # every prompt would be hashed by the slow loop; scripts/setup.sh installs libxxhash-dev.
    if not (os.path.exists("/usr/include/xxhash.h") and shutil.which("cc")):
        pytest.skip("no xxhash.h or no C compiler on this machine")
    assert _C_BUILT


@needs_c_chain
def test_the_c_chain_is_in_use_when_it_is_built() -> None:
    from cacheproxy.cache import _hashchain

    assert hashing.CHAIN_IN_C
    assert hashing._chain_in_c is _hashchain.chain


@needs_c_chain
@pytest.mark.parametrize("block_size", [1, 3, 16, 64, 257])
def test_the_c_and_python_chains_give_the_same_bytes(block_size: int) -> None:
    rng = np.random.default_rng(block_size)
    for seed in (0, 1, 1234, 2**64 - 1, int(rng.integers(0, 2**63))):
        root = rng.bytes(16)
        for n_blocks in (0, 1, 2, 7, 40):
            # Full blocks, then a partial block of every kind: none, one id, all but one id.
            for extra in {0, 1, block_size - 1}:
                ids = rng.integers(-(2**31), 2**31, size=n_blocks * block_size + extra).astype("<i4")
                expected = hashing._chain_in_python(ids, block_size, root, seed)
                assert len(expected) == len(ids) // block_size
                assert hashing._chain_in_c(ids, block_size, root, seed) == expected
                assert hashing._chain_in_c(ids.tobytes(), block_size, root, seed) == expected
                assert hashing._chain_in_c(ids.tolist(), block_size, root, seed) == expected
                assert hashing._chain_in_c(tuple(ids.tolist()), block_size, root, seed) == expected


@needs_c_chain
def test_block_hasher_gives_the_same_hashes_with_and_without_the_c_chain(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(7)
    cases = []
    for block_size in (1, 16, 32):
        hasher = BlockHasher(dataclasses.replace(NAMESPACE, block_size=block_size), seed=99)
        for salt in ("", "tenant-a"):
            for parent in (None, rng.bytes(16)):
                ids = rng.integers(0, 128_000, size=int(rng.integers(0, 50 * block_size))).tolist()
                cases.append((hasher, ids, salt, parent))
    with_c = [
        [h.hash_blocks(form, salt=s, parent=p) for form in (ids, np.asarray(ids, dtype=np.int64))]
        for h, ids, s, p in cases
    ]
    monkeypatch.setattr(hashing, "_chain_in_c", None)
    for (h, ids, s, p), results in zip(cases, with_c, strict=True):
        assert results == [h.hash_blocks(ids, salt=s, parent=p)] * 2


def test_a_strided_array_hashes_like_its_copy(hasher: BlockHasher) -> None:
    ids = np.asarray(_ids(8 * BLOCK), dtype="<i4")
    strided = ids[::2]
    assert not strided.flags.c_contiguous
    assert (
        hasher.hash_blocks(strided)
        == hasher.hash_blocks(strided.copy())
        == hasher.hash_blocks(strided.tolist())
    )


@needs_c_chain
def test_the_c_chain_refuses_what_the_python_path_refuses() -> None:
    root = bytes(16)
    with pytest.raises(OverflowError):
        hashing._chain_in_c([0, -(2**31) - 1], 1, root, 0)
    with pytest.raises(OverflowError):
        hashing._chain_in_c([2**70], 1, root, 0)
    with pytest.raises(TypeError):
        hashing._chain_in_c([1.5], 1, root, 0)
    with pytest.raises(ValueError):
        hashing._chain_in_c(b"\0" * 6, 1, root, 0)  # not whole int32 ids
    with pytest.raises(ValueError):
        hashing._chain_in_c(b"", 1, bytes(15), 0)
    with pytest.raises(ValueError):
        hashing._chain_in_c(b"", 0, root, 0)
    with pytest.raises(OverflowError):
        hashing._chain_in_c(b"", 1, root, 2**64)


# --- the admission loops (cacheproxy.cache.fastpath) --------------------------------------------

_FASTPATH_IN_C = _C_BUILT and fastpath.IN_C
needs_c_fastpath = pytest.mark.skipif(not _FASTPATH_IN_C, reason="the C admission loops are not built here")


@needs_c_chain
def test_the_c_admission_loops_are_in_use_when_the_chain_is_built() -> None:
    # Both live in _hashchain: a stale build of the chain alone would quietly run the Python loops.
    assert fastpath.IN_C


def _outcome(fn: Callable[..., object], *args: object) -> tuple[str, object]:
    try:
        return "ok", fn(*args)
    except Exception as e:  # the type is what both twins must agree on
        return "raised", type(e)


class _Index:
    """An integer that is not an int, as numpy's integers are."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


@needs_c_fastpath
def test_token_bounds_in_c_and_in_python_agree_on_random_and_bad_input() -> None:
    rng = random.Random(5)
    cases: list[object] = [[], [0], [-1], [True, 2], (3, 1, 2), [2**63 - 1, -(2**63)]]
    cases += [[2**63], [-(2**63) - 1], [2**70, 1.5], [1.5, 2**70], [1, "2"], [None], 5, "abc"]
    cases += [[_Index(7), 3, _Index(-9)], [np.int64(4), np.int32(-2)], np.arange(5), range(3, 9)]
    for _ in range(200):
        n = rng.randrange(1, 300)
        bound = rng.choice([10, 2**31, 2**62, 2**63, 2**64, 2**100])
        # int(str(x)) gives every value an object of its own, as a tokenizer's output has
        ids = [int(str(rng.randrange(-bound, bound))) for _ in range(n)]
        cases.append(ids)
        cases.append(tuple(ids))
    for ids in cases:
        expected = _outcome(fastpath._token_bounds_in_python, ids)
        assert _outcome(fastpath._token_bounds_in_c, ids) == expected, ids
        if expected[0] == "ok":
            assert all(type(v) is int for v in expected[1])  # type: ignore[attr-defined]
            assert expected[1] == (min(map(int, ids)), max(map(int, ids)))  # type: ignore[call-overload]
    assert fastpath._token_bounds_in_c(iter([4, 2, 8])) == fastpath._token_bounds_in_python(iter([4, 2, 8]))


def _pool_state(
    rng: random.Random, n_blocks: int, block_size: int, num_pool_blocks: int
) -> tuple[
    list[bytes],
    list[int],
    bytes,
    dict[bytes, int],
    list[BlockIdentity | None],
    list[int],
    OrderedDict[int, None],
]:
    """A chain and a pool holding some of it, with every way a block can fail its check."""
    big = [0, 1, -1, 2**31, -(2**31) - 1, 2**63, -(2**64), 2**100]
    token_ids = [
        int(str(rng.choice(big) if rng.random() < 0.1 else rng.randrange(128_000)))
        for _ in range(n_blocks * block_size)
    ]
    token_ids = token_ids[: len(token_ids) - rng.choice([0, 0, 0, 1, block_size])]  # a partial last block
    root = rng.randbytes(16)
    hashes = [rng.randbytes(16) for _ in range(n_blocks)]
    if n_blocks > 3 and rng.random() < 0.2:
        hashes[-1] = hashes[1]  # a chain that revisits a hash: its block is acquired twice
    by_hash: dict[bytes, int] = {}
    identity: list[BlockIdentity | None] = [None] * num_pool_blocks
    slots = rng.sample(range(num_pool_blocks), n_blocks)
    parent = root
    for i, h in enumerate(hashes):
        toks: tuple[int, ...] | list[int] = tuple(token_ids[i * block_size : (i + 1) * block_size])
        ident_parent = parent
        fault = rng.random() if rng.random() < 0.15 else 1.0
        if fault < 0.1:
            continue  # not in the pool
        if fault < 0.2:
            ident_parent = rng.randbytes(16)  # a forged block: the hash, another parent
        elif fault < 0.3:
            toks = (*toks[:-1], toks[-1] + 1) if toks else (1,)  # the hash, other tokens
        elif fault < 0.4:
            toks = toks[:-1]  # one token short
        elif fault < 0.5:
            toks = (*toks, 0)  # one token too many
        elif fault < 0.6:
            toks = list(toks)  # a list never equals a tuple
        elif fault < 0.7:
            toks = tuple(int(str(t)) + 0.0 if abs(t) < 2**52 else t for t in toks)  # equal floats
        elif fault < 0.8:
            # not bytes: equal, or not
            ident_parent = bytearray(ident_parent if rng.random() < 0.5 else rng.randbytes(16))  # type: ignore[assignment]
        if h not in by_hash:
            by_hash[h] = slots[i]
            gone = 0.8 <= fault < 0.9  # the dict names a block whose identity is gone
            identity[slots[i]] = None if gone else BlockIdentity(h, ident_parent, toks, i)  # type: ignore[arg-type]
        parent = h
    ref_counts = [rng.choice([0, 0, 1, 2]) for _ in range(num_pool_blocks)]
    free = OrderedDict(
        (b, None) for b in rng.sample(range(num_pool_blocks), num_pool_blocks) if ref_counts[b] == 0
    )
    return hashes, token_ids, root, by_hash, identity, ref_counts, free


@needs_c_fastpath
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_resident_prefix_in_c_and_in_python_agree(block_size: int) -> None:
    rng = random.Random(block_size)
    for _ in range(300):
        n_blocks = rng.randrange(0, 40)
        args = _pool_state(rng, n_blocks, block_size, 64)
        hashes, token_ids, root, by_hash, identity, ref_counts, free = args
        for tokens in (token_ids, tuple(token_ids)):
            assert fastpath._resident_prefix_in_c(
                hashes, tokens, root, block_size, by_hash, identity
            ) == fastpath._resident_prefix_in_python(hashes, tokens, root, block_size, by_hash, identity)
        states = []
        for walk in (fastpath._resident_prefix_in_c, fastpath._resident_prefix_in_python):
            counts, free_copy = list(ref_counts), OrderedDict(free)
            result = _outcome(walk, hashes, token_ids, root, block_size, by_hash, identity, counts, free_copy)
            states.append((result, counts, list(free_copy)))
        assert states[0] == states[1]
        blocks = states[0][0][1]
        assert isinstance(blocks, list) and len(blocks) <= n_blocks
        # what the walk accepted is what BlockPool.lookup accepts, block by block
        parent = root
        for i, block in enumerate(blocks):
            ident = identity[block]
            assert ident is not None and ident.parent == parent
            assert ident.token_ids == tuple(token_ids[i * block_size : (i + 1) * block_size])
            parent = hashes[i]


@needs_c_fastpath
def test_resident_prefix_in_c_refuses_what_python_refuses() -> None:
    root, h = bytes(16), bytes(range(16))
    ident = BlockIdentity(h, root, (1, 2), 0)
    cases: list[tuple[object, ...]] = [
        ([h], [1, 2], root, 0, {h: 0}, [ident]),  # block size
        ([h], [1, 2], root, 2, {h: 0}, [ident], [0], None),  # counts without the free list
        ([h], [1, 2], root, 2, {h: 5}, [ident]),  # a block outside the pool
        ([h], [1, 2], root, 2, {h: -1}, [ident]),  # negative: from the end, as a list reads it
        ([h], [1, 2], root, 2, {h: "0"}, [ident]),
        ([h], [1, 2], root, 2, {h: 2**70}, [ident]),
        ([h], [1, 2], root, 2, {h: 0}, [object()]),  # no .parent
        ([h], [1, 2], root, 2, {h: 0}, [ident], [0], OrderedDict()),  # count 0 but not in the free list
        ([h], [1, 2], root, 2, {h: 0}, [ident], [0], OrderedDict({0: None})),
        ([[1]], [1, 2], root, 2, {h: 0}, [ident]),  # an unhashable hash
        ([h], [1, 2.5], root, 2, {h: 0}, [ident]),
        ([h], [1, 2], root, 2**62, {h: 0}, [ident]),
        ([h, h], [1, 2], bytes(16), 2, {h: 0}, [ident]),
    ]
    for args in cases:
        expected = _outcome(fastpath._resident_prefix_in_python, *args)
        assert _outcome(fastpath._resident_prefix_in_c, *args) == expected, args


def _store_with_a_chain(seed: int, block_size: int = 4) -> tuple[TieredStore, bytes, list[bytes], list[int]]:
    """A pool of 24 blocks and a CPU tier, a 12-block chain spread over both with forged blocks."""
    rng = random.Random(seed)
    pool = BlockPool(torch.zeros(24, 1, 2, block_size, 1, 2))
    tier = CpuTier((1, 2, block_size, 1, 2), torch.float32, 64 * pool.block_bytes, pin_memory=False)
    store = TieredStore(pool, [tier])
    hasher = BlockHasher(dataclasses.replace(NAMESPACE, block_size=block_size), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    token_ids = [rng.randrange(1000) for _ in range(12 * block_size + 2)]
    root = hasher.root()
    hashes = hasher.hash_blocks(token_ids)
    parent = root
    for i, h in enumerate(hashes):
        toks = tuple(token_ids[i * block_size : (i + 1) * block_size])
        where = "gpu" if seed % 4 == 0 else rng.choice(["gpu", "gpu", "gpu", "cpu", "forged", "none"])
        if where == "gpu" or where == "forged":
            block = pool.allocate()
            forged = (*toks[:-1], toks[-1] + 1)
            pool.register(block, BlockIdentity(h, parent, forged if where == "forged" else toks, i))
            if rng.random() < 0.7:
                pool.release(block)
        elif where == "cpu":
            tier.put(BlockEntry(h, parent, toks, torch.randn(1, 2, block_size, 1, 2, generator=gen)))
        parent = h
    return store, root, hashes, token_ids


@needs_c_fastpath
def test_a_match_is_the_same_with_the_c_walk_and_the_python_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    for seed in range(60):
        results = []
        for in_c in (True, False):
            if not in_c:
                monkeypatch.setattr(fastpath, "_resident_prefix_in_c", None)
            store, root, hashes, token_ids = _store_with_a_chain(seed)
            pool = store.pool
            before = list(pool.last_use)
            match = store._match_now(root, hashes, token_ids)
            touched = [b for b in range(pool.num_blocks) if pool.last_use[b] != before[b]]
            identities = [None if i is None else (i.hash, i.parent, i.token_ids) for i in pool.identity]
            results.append(
                (
                    match,
                    list(pool.ref_counts),
                    list(pool.free),
                    list(pool.hits),
                    dict(pool.by_hash),
                    identities,
                    touched,
                    store.counters.hits_tokens,
                    [pool.kv[b].tolist() for b in match.blocks],
                )
            )
            monkeypatch.undo()
        assert results[0] == results[1], seed
