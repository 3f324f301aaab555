from __future__ import annotations

import dataclasses
import importlib.util
import operator
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
    """A chain and a pool holding some of it, with every way a block can fail its check, and blocks
    that pass the field check but whose types the byte walk does not vouch for."""
    edge = [0, 1, -1, 2**31 - 1, -(2**31)]
    token_ids = [
        int(str(rng.choice(edge) if rng.random() < 0.1 else rng.randrange(128_000)))
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
        toks: tuple[object, ...] | list[int] = tuple(token_ids[i * block_size : (i + 1) * block_size])
        ident_parent: object = parent
        fault = rng.random() if rng.random() < 0.2 else 1.0
        if fault < 0.07:
            continue  # not in the pool
        if fault < 0.14:
            ident_parent = rng.randbytes(16)  # a forged block: the hash, another parent
        elif fault < 0.21:
            toks = (*toks[:-1], toks[-1] + 1) if toks else (1,)  # the hash, other tokens
        elif fault < 0.28:
            toks = toks[:-1]  # one token short
        elif fault < 0.35:
            toks = (*toks, 0)  # one token too many
        elif fault < 0.42:
            toks = list(toks)  # a list never equals a tuple
        elif fault < 0.49:
            toks = tuple(float(t) for t in toks)  # equal floats: the field check passes, no key
        elif fault < 0.56:
            toks = tuple(np.int64(t) for t in toks)  # equal numpy ints: likewise
        elif fault < 0.63:
            toks = (*toks[:-1], toks[-1] + 2**32) if toks else (2**32,)  # equal as int32, not as ints
        elif fault < 0.7:
            # not bytes: equal, or not
            ident_parent = bytearray(ident_parent if rng.random() < 0.5 else rng.randbytes(16))  # type: ignore[arg-type]
        if h not in by_hash:
            by_hash[h] = slots[i]
            gone = 0.7 <= fault < 0.8  # the dict names a block whose identity is gone
            identity[slots[i]] = None if gone else BlockIdentity(h, ident_parent, toks, i)  # type: ignore[arg-type]
        parent = h
    ref_counts = [rng.choice([0, 0, 1, 2]) for _ in range(num_pool_blocks)]
    free = OrderedDict(
        (b, None) for b in rng.sample(range(num_pool_blocks), num_pool_blocks) if ref_counts[b] == 0
    )
    return hashes, token_ids, root, by_hash, identity, ref_counts, free


def _fields_walk(
    hashes: list[bytes],
    token_ids: list[int],
    root: bytes,
    block_size: int,
    by_hash: dict[bytes, int],
    identity: list[BlockIdentity | None],
    trusted_types_only: bool,
) -> list[int]:
    """BlockPool.lookup's check of each block in turn, on the fields themselves; with
    `trusted_types_only`, also stopping at a block whose fields are not bytes and a tuple of ints."""
    blocks, parent = [], root
    for i, h in enumerate(hashes):
        block = by_hash.get(h)
        ident = identity[block] if block is not None else None
        toks = tuple(token_ids[i * block_size : (i + 1) * block_size])
        if ident is None or ident.parent != parent or ident.token_ids != toks:
            break
        exact = type(ident.parent) is bytes and type(ident.token_ids) is tuple
        if trusted_types_only and not (exact and all(type(t) is int for t in ident.token_ids)):
            break
        blocks.append(block)
        parent = h
    return blocks


def _packed(token_ids: list[int]) -> bytes:
    return struct.pack(f"<{len(token_ids)}i", *token_ids)


@needs_c_fastpath
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_resident_prefix_in_c_and_in_python_agree(block_size: int) -> None:
    rng = random.Random(block_size)
    for _ in range(400):
        n_blocks = rng.randrange(0, 40)
        args = _pool_state(rng, n_blocks, block_size, 64)
        hashes, token_ids, root, by_hash, identity, ref_counts, free = args
        packed = _packed(token_ids)
        for form in (packed, bytearray(packed), memoryview(packed)):
            assert fastpath._resident_prefix_in_c(
                hashes, form, root, block_size, by_hash, identity
            ) == fastpath._resident_prefix_in_python(hashes, form, root, block_size, by_hash, identity)
        states = []
        for walk in (fastpath._resident_prefix_in_c, fastpath._resident_prefix_in_python):
            counts, free_copy = list(ref_counts), OrderedDict(free)
            result = _outcome(walk, hashes, packed, root, block_size, by_hash, identity, counts, free_copy)
            states.append((result, counts, list(free_copy)))
        assert states[0] == states[1]
        blocks = states[0][0][1]
        assert isinstance(blocks, list) and len(blocks) <= n_blocks
        # Never more than BlockPool.lookup accepts; and all of it where the identities' fields are
        # of the types the engine makes (exact bytes, a tuple of ints).
        walk = (hashes, token_ids, root, block_size, by_hash, identity)
        assert blocks == _fields_walk(*walk, trusted_types_only=True)
        assert blocks == _fields_walk(*walk, trusted_types_only=False)[: len(blocks)]


@needs_c_fastpath
def test_resident_prefix_accepts_a_whole_chain_of_real_identities() -> None:
    rng = random.Random(3)
    hasher = BlockHasher(NAMESPACE, seed=5)
    token_ids = [rng.randrange(128_000) for _ in range(50 * BLOCK + 3)]
    root = hasher.root()
    hashes = hasher.hash_blocks(token_ids)
    pool = BlockPool(torch.zeros(64, 1, 2, BLOCK, 1, 1))
    parent = root
    for i, h in enumerate(hashes):
        pool.register(
            pool.allocate(), BlockIdentity(h, parent, tuple(token_ids[i * BLOCK : (i + 1) * BLOCK]), i)
        )
        parent = h
    packed = _packed(token_ids)
    for walk in (fastpath._resident_prefix_in_c, fastpath._resident_prefix_in_python):
        assert walk(hashes, packed, root, BLOCK, pool.by_hash, pool.identity) == [
            pool.by_hash[h] for h in hashes
        ]
        # one id changed: the chain stops at its block, whatever the hashes say
        changed = bytearray(packed)
        changed[4 * (17 * BLOCK + 5)] ^= 1
        assert walk(hashes, bytes(changed), root, BLOCK, pool.by_hash, pool.identity) == [
            pool.by_hash[h] for h in hashes[:17]
        ]
        assert walk(hashes, packed, bytes(16), BLOCK, pool.by_hash, pool.identity) == []  # another root
        assert walk(hashes, packed[: 4 * 20 * BLOCK], root, BLOCK, pool.by_hash, pool.identity) == [
            pool.by_hash[h] for h in hashes[:20]
        ]


def test_an_identity_key_is_made_from_its_own_fields_only() -> None:
    root, h = bytes(16), bytes(range(16))
    ident = BlockIdentity(h, root, (1, 2**31 - 1, -(2**31)), 0)
    assert ident.key == root + struct.pack("<3i", 1, 2**31 - 1, -(2**31))
    with pytest.raises(dataclasses.FrozenInstanceError):
        ident.token_ids = (1, 2, 4)  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ident.key = b"forged"  # type: ignore[misc]
    assert dataclasses.replace(ident, token_ids=(7,)).key == root + struct.pack("<i", 7)
    assert BlockIdentity(h, root, (), 0).key == root
    # Types the byte walk does not vouch for: no key, so only the field comparison can accept them.
    for parent, toks in [
        (bytearray(root), (1, 2)),
        (root, [1, 2]),
        (root, (1.0, 2)),
        (root, (np.int64(1), 2)),
        (root, (True, 2)),
        (root, (2**31, 2)),
        (root, (-(2**31) - 1,)),
        (root, (2**70,)),
        (root, ("1",)),
    ]:
        assert BlockIdentity(h, parent, toks, 0).key is None  # type: ignore[arg-type]
        assert fastpath.identity_key(parent, toks) is None


@needs_c_fastpath
def test_resident_prefix_in_c_refuses_what_python_refuses() -> None:
    root, h = bytes(16), bytes(range(16))
    ident = BlockIdentity(h, root, (1, 2), 0)
    ids = struct.pack("<2i", 1, 2)

    class _Keyed:
        def __init__(self, key: object) -> None:
            self.key = key

    cases: list[tuple[object, ...]] = [
        ([h], ids, root, 0, {h: 0}, [ident]),  # block size
        ([h], ids, root, 2, {h: 0}, [ident], [0], None),  # counts without the free list
        ([h], ids, root, 2, {h: 0}, [ident], (0,), OrderedDict()),  # counts not a list
        ([h], ids, root, 2, {h: 5}, [ident]),  # a block outside the pool
        ([h], ids, root, 2, {h: -1}, [ident]),  # negative: from the end, as a list reads it
        ([h], ids, root, 2, {h: "0"}, [ident]),
        ([h], ids, root, 2, {h: 2**70}, [ident]),
        ([h], ids, root, 2, {h: 0}, [object()]),  # no .key
        ([h], ids, root, 2, {h: 0}, [_Keyed(None)]),
        ([h], ids, root, 2, {h: 0}, [_Keyed(bytearray(ident.key or b""))]),  # not bytes: never equal
        ([h], ids, root, 2, {h: 0}, [_Keyed(ident.key)]),
        ([h], ids, root, 2, {h: 0}, [ident], [0], OrderedDict()),  # count 0 but not in the free list
        ([h], ids, root, 2, {h: 0}, [ident], [0], OrderedDict({0: None})),
        ([[1]], ids, root, 2, {h: 0}, [ident]),  # an unhashable hash
        ([h], ids[:6], root, 2, {h: 0}, [ident]),  # not whole int32 ids
        ([h], [1, 2], root, 2, {h: 0}, [ident]),  # ids not packed
        ([h], "ab", root, 2, {h: 0}, [ident]),
        ([h], ids, bytearray(root), 2, {h: 0}, [ident]),  # a root that is not bytes
        ([h], ids, None, 2, {h: 0}, [ident]),
        ([h], ids, root, 2, [(h, 0)], [ident]),  # by_hash not a dict
        ([h], ids, root, 2, {h: 0}, (ident,)),  # identity not a list
        ([h], ids, root, 2**62, {h: 0}, [ident]),
        ([h, h], ids, bytes(16), 2, {h: 0}, [ident]),
        ([h, h], ids * 2, root, 2, {h: 0}, [ident]),  # block 1's parent is h, not root
    ]
    for args in cases:
        expected = _outcome(fastpath._resident_prefix_in_python, *args)
        assert _outcome(fastpath._resident_prefix_in_c, *args) == expected, args


@needs_c_fastpath
def test_pack_token_ids_in_c_and_in_python_agree_on_random_and_bad_input() -> None:
    rng = random.Random(6)
    cases: list[object] = [
        [],
        [0],
        [-1],
        [True, 2],
        (3, 1, 2),
        [2**31 - 1, -(2**31)],
        [2**31],
        [-(2**31) - 1],
    ]
    cases += [[2**63], [2**70, 1.5], [1.5, 2**70], [1, "2"], [None], 5, "abc", b"ab", iter([4, 2, 8])]
    cases += [[_Index(7), 3, _Index(-9)], [np.int64(4), np.int32(-2)], np.arange(5), range(3, 9)]
    cases += [[_Index(2**40), 1], [1, _Index(1.5)], [2**30, -(2**30), 2**30 - 1, -(2**30) + 1]]  # type: ignore[arg-type]
    for _ in range(200):
        n = rng.randrange(1, 300)
        bound = rng.choice([10, 2**30, 2**31, 2**32, 2**62, 2**64, 2**100])
        # int(str(x)) gives every value an object of its own, as a tokenizer's output has
        ids = [int(str(rng.randrange(-bound, bound))) for _ in range(n)]
        cases.append(ids)
        cases.append(tuple(ids))
    for ids in cases:
        fresh = [list(ids) if isinstance(ids, list) else ids for _ in range(2)]
        if isinstance(ids, type(iter([]))):
            fresh = [iter([4, 2, 8]), iter([4, 2, 8])]
        expected = _outcome(fastpath._pack_token_ids_in_python, fresh[1])
        assert _outcome(fastpath._pack_token_ids_in_c, fresh[0]) == expected, ids
        if expected[0] == "ok":
            copy, packed, lo, hi = expected[1]  # type: ignore[misc]
            values = [operator.index(v) for v in copy]
            assert type(copy) is list and copy == list(
                ids if not isinstance(ids, type(iter([]))) else [4, 2, 8]
            )
            assert packed == np.asarray(values, dtype="<i4").tobytes()
            assert (lo, hi) == (min(values), max(values)) and type(lo) is int and type(hi) is int


class _Mutating:
    """An integer whose __index__ changes the list it sits in (as a hostile caller could)."""

    def __init__(self, value: int, target: list[object], action: str) -> None:
        self.value, self.target, self.action = value, target, action

    def __index__(self) -> int:
        if self.action == "clear":
            self.target.clear()
        elif self.action == "append":
            self.target.append(2**40)
        else:
            self.target[-1] = "not an int"
        return self.value


@needs_c_fastpath
@pytest.mark.parametrize("action", ["clear", "append", "replace"])
def test_pack_token_ids_packs_a_snapshot_of_a_list_that_changes_under_it(action: str) -> None:
    results = []
    for pack in (fastpath._pack_token_ids_in_c, fastpath._pack_token_ids_in_python):
        ids: list[object] = [5, 6]
        ids += [_Mutating(7, ids, action), 8, 9]
        copy, packed, lo, hi = pack(ids)
        assert copy[:2] == [5, 6] and copy[3:] == [8, 9] and len(copy) == 5
        results.append((packed, lo, hi))
    assert results[0] == results[1] == (struct.pack("<5i", 5, 6, 7, 8, 9), 5, 9)


def test_int32_bytes_is_none_for_ids_that_do_not_pack() -> None:
    assert fastpath.int32_bytes([]) == b""
    assert fastpath.int32_bytes([1, -2]) == struct.pack("<2i", 1, -2)
    assert fastpath.int32_bytes([2**31]) is None
    assert fastpath.int32_bytes([1.0]) is None


def test_packed_ids_hash_in_place_as_the_ids_do(hasher: BlockHasher, monkeypatch: pytest.MonkeyPatch) -> None:
    # The engine packs a prompt once (pack_token_ids) and hashes a view of those bytes.
    rng = random.Random(8)
    for in_c in (True, False):
        if not in_c:
            monkeypatch.setattr(hashing, "_chain_in_c", None)
        for n in (1, BLOCK - 1, BLOCK, 5 * BLOCK + 3, 300):
            ids = [rng.randrange(-(2**31), 2**31) for _ in range(n)]
            view = np.frombuffer(fastpath.pack_token_ids(ids)[1], dtype="<i4")
            for salt, parent in (("", None), ("t", None), ("", rng.randbytes(16))):
                assert hasher.hash_blocks(view, salt=salt, parent=parent) == hasher.hash_blocks(
                    ids, salt=salt, parent=parent
                )


@needs_c_fastpath
def test_count_leading_in_in_c_and_in_python_agree() -> None:
    rng = random.Random(9)
    for _ in range(300):
        universe = [rng.randbytes(2) for _ in range(12)]
        mapping = {k: 0 for k in rng.sample(universe, rng.randrange(0, 12))}
        keys = [rng.choice(universe) for _ in range(rng.randrange(0, 20))]
        for form in (keys, tuple(keys)):
            assert fastpath._count_leading_in_in_c(form, mapping) == fastpath._count_leading_in_python(
                form, mapping
            )
    for args in [([[1]], {}), ([b"a", [1]], {b"a": 1}), ([[1]], {b"a": 1}), (5, {}), ([b"a"], [b"a"])]:
        assert _outcome(fastpath._count_leading_in_in_c, *args) == _outcome(
            fastpath._count_leading_in_python, *args
        )


@needs_c_fastpath
def test_release_all_in_c_and_in_python_agree() -> None:
    rng = random.Random(10)
    n = 32
    for _ in range(400):
        ref_counts = [rng.choice([0, 1, 1, 2, 3]) for _ in range(n)]
        identity: list[object] = [
            None if rng.random() < 0.3 else BlockIdentity(bytes(16), bytes(16), (), b) for b in range(n)
        ]
        free = OrderedDict((b, None) for b in rng.sample(range(n), n) if ref_counts[b] == 0)
        held = [b for b in range(n) for _ in range(ref_counts[b])]
        blocks = rng.sample(held, rng.randrange(0, len(held) + 1))
        if rng.random() < 0.1:
            blocks.append(rng.randrange(n))  # perhaps released once too often: counts go below zero
        states = []
        for release in (fastpath._release_all_in_c, fastpath._release_all_in_python):
            counts, free_copy = list(ref_counts), OrderedDict(free)
            result = _outcome(release, blocks, counts, free_copy, identity)
            states.append((result, counts, list(free_copy)))
        assert states[0] == states[1]
    ident = BlockIdentity(bytes(16), bytes(16), (), 0)
    bad: list[tuple[object, ...]] = [
        ([5], [1], OrderedDict(), [ident]),  # outside the pool
        ([-1], [1], OrderedDict(), [None]),  # from the end, as a list reads it
        (["0"], [1], OrderedDict(), [ident]),
        ([0], (1,), OrderedDict(), [ident]),  # counts not a list
        ([0], [1], OrderedDict(), (ident,)),  # identity not a list
        ([0], [1], {}, [None]),  # a free "list" without move_to_end
        ([0], [1.0], OrderedDict(), [None]),  # a count that is not an int
        ([0], [2**70], OrderedDict(), [ident]),
        ([0, 0], [2], OrderedDict(), [None]),
        (5, [1], OrderedDict(), [ident]),
    ]
    for args in bad:
        states = []
        for release in (fastpath._release_all_in_c, fastpath._release_all_in_python):
            copied = [
                list(a) if isinstance(a, list) else OrderedDict(a) if isinstance(a, OrderedDict) else a
                for a in args
            ]
            states.append((_outcome(release, *copied), copied))
        assert states[0] == states[1], args


def test_release_many_is_release_of_each_block_in_order() -> None:
    rng = random.Random(11)
    for _ in range(50):
        pools = [BlockPool(torch.zeros(16, 1, 2, 2, 1, 1)) for _ in range(2)]
        taken: list[int] = []
        seed = rng.random()
        for pool in pools:  # the same state in both
            state = random.Random(seed)
            taken = [pool.allocate() for _ in range(10)]
            for b in taken[:6]:
                pool.register(b, BlockIdentity(bytes([b]) * 16, bytes(16), (b,), 0))
            for b in state.sample(taken, 4):
                pool.acquire(b)
        order = rng.sample(taken, len(taken))
        pools[0].release_many(order)
        for b in order:
            pools[1].release(b)
        assert pools[0].ref_counts == pools[1].ref_counts
        assert list(pools[0].free) == list(pools[1].free)


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
            match = store.match(root, hashes, token_ids, len(hashes))
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


def test_a_match_reads_cpu_tier_runs_as_it_reads_block_by_block() -> None:
    """The CPU tier's run read (`count_held`, `read_chain`) against the block-by-block lookups it
    stands in for, on chains of CPU-tier blocks with forged tokens, wrong parents, ids the byte
    comparison does not vouch for, gaps and pool blocks: the same match, pool, tier and counters."""
    block_size = 4
    for seed in range(80):
        results = []
        for runs in (True, False):
            rng = random.Random(seed)
            pool = BlockPool(torch.zeros(40, 1, 2, block_size, 1, 2))
            tier = CpuTier((1, 2, block_size, 1, 2), torch.float32, 64 * pool.block_bytes, pin_memory=False)
            if not runs:
                tier.read_chain = None  # type: ignore[method-assign]
                tier.count_held = None  # type: ignore[method-assign]
            store = TieredStore(pool, [tier])
            hasher = BlockHasher(dataclasses.replace(NAMESPACE, block_size=block_size), seed=seed)
            gen = torch.Generator().manual_seed(seed)
            token_ids = [rng.randrange(1000) for _ in range(16 * block_size + 3)]
            root, hashes = hasher.root(), hasher.hash_blocks(token_ids)
            lead = rng.randrange(4)
            parent = root
            for i, h in enumerate(hashes):
                toks = tuple(token_ids[i * block_size : (i + 1) * block_size])
                kind = "gpu" if i < lead else rng.choice(["cpu"] * 8 + ["tokens", "parent", "numpy", "none", "gpu"])
                if kind == "gpu":
                    block = pool.allocate()
                    pool.register(block, BlockIdentity(h, parent, toks, i))
                    pool.release(block)
                elif kind != "none":
                    stored_parent, stored = parent, toks
                    if kind == "tokens":
                        stored = (*toks[:-1], toks[-1] + 1)
                    elif kind == "parent":
                        stored_parent = bytes(len(parent))
                    elif kind == "numpy":  # equal under ==, but no identity key
                        stored = tuple(np.int64(t) for t in toks)
                    tensor = torch.randn(1, 2, block_size, 1, 2, generator=gen)
                    tier.put(BlockEntry(h, stored_parent, stored, tensor))
                parent = h
            match = store.match(root, hashes, token_ids, len(hashes))
            identities = [None if i is None else (i.hash, i.parent, i.token_ids, i.index, i.key) for i in pool.identity]
            results.append(
                (
                    match,
                    identities,
                    list(pool.ref_counts),
                    list(pool.free),
                    tier.hashes(),
                    tier.stats,
                    store.counters,
                    [pool.kv[b].tolist() for b in match.blocks],
                )
            )
        assert results[0] == results[1], seed


def test_an_identity_keyed_by_its_caller_equals_one_made_here() -> None:
    root, h = bytes(16), bytes(range(16))
    made = BlockIdentity(h, root, (5, 6, 7), 3)
    assert made.key is not None
    keyed = BlockIdentity.keyed(h, root, (5, 6, 7), 3, made.key)
    assert keyed == made and keyed.key == made.key and hash(keyed) == hash(made)
    with pytest.raises(dataclasses.FrozenInstanceError):
        keyed.key = b"forged"  # type: ignore[misc]
    assert dataclasses.replace(keyed, token_ids=(8,)).key == root + struct.pack("<i", 8)
