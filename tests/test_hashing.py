from __future__ import annotations

import dataclasses
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import xxhash

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
