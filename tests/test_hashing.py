from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import xxhash

from cacheproxy.cache import hashing
from cacheproxy.cache.hashing import BlockHasher, Namespace

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
