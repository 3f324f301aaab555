"""Prefix identity: the chain of block hashes that names a prompt's full blocks.

`h_0 = xxh3_128(namespace bytes [+ salt])` and `h_i = xxh3_128(h_{i-1} ‖ int32-LE ids of block i, seed)`.
A block's hash therefore names its whole prefix, so "the longest cached prefix" is the longest run of
leading hashes a tier holds. Digests are 16 raw bytes; they are equal across processes, restarts and
machines (never Python's `hash()`). Only full blocks are hashed: a partial last block has no hash.

The chain runs in C (`_hashchain`, built from `_hashchain.c` when xxhash.h and a compiler are present,
GIL released) or, without it, in a Python loop; both give the same bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import xxhash

try:
    from cacheproxy.cache._hashchain import chain as _chain_in_c
except ImportError:  # built only where xxhash.h and a compiler were present: setup.py
    _chain_in_c = None

HASH_BYTES = 16
# Bump when the bytes a block hash covers, or the KV layout those hashes name, change: old disk
# entries then stop matching instead of being served under a new meaning.
LAYOUT_VERSION = 1
_NAMESPACE_MAGIC = b"cacheproxy/kv-namespace"
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def _field(data: bytes) -> bytes:
    # Length-prefixed so that distinct field tuples can never serialize to the same bytes.
    return struct.pack("<I", len(data)) + data


@dataclass(frozen=True, slots=True)
class Namespace:
    """Everything that must be equal for two equal token prefixes to have equal KV.

    `model_fingerprint`: digest of the weights (config + tensor-file digests or names and sizes).
    `tenant_salt`: a fixed salt of this namespace (usually ""); per-tenant and per-request salts
    are passed to `BlockHasher.root(salt)` instead, so one hasher and one set of tiers serve all.
    """

    model_fingerprint: bytes
    kv_dtype: str
    block_size: int
    layout_version: int = LAYOUT_VERSION
    tenant_salt: str = ""

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")

    def to_bytes(self) -> bytes:
        return b"".join(
            (
                _field(_NAMESPACE_MAGIC),
                struct.pack("<I", self.layout_version),
                _field(self.model_fingerprint),
                _field(self.kv_dtype.encode()),
                struct.pack("<I", self.block_size),
                _field(self.tenant_salt.encode()),
            )
        )

    @property
    def digest(self) -> bytes:
        """16-byte digest stored in every persisted entry; equals `BlockHasher.root("")`."""
        return xxhash.xxh3_128_digest(self.to_bytes())


def _as_int32_le(token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    if isinstance(token_ids, np.ndarray) and token_ids.dtype != np.dtype("<i4"):
        # np.asarray(..., dtype) casts unsafely: 2**32 + 5 would silently become 5.
        if token_ids.dtype.kind not in "iu":
            raise TypeError(f"token ids must be integers, got dtype {token_ids.dtype}")
        if token_ids.size and (token_ids.min() < _INT32_MIN or token_ids.max() > _INT32_MAX):
            raise OverflowError("token id outside int32")
    if isinstance(token_ids, np.ndarray):
        ids = np.asarray(token_ids, dtype="<i4")
    else:
        # fromiter converts a list of Python ints about twice as fast as asarray (the largest
        # cost of hashing a long prompt), and raises OverflowError outside int32 as well.
        ids = np.fromiter(token_ids, dtype="<i4", count=len(token_ids))
    if ids.ndim != 1:
        raise ValueError(f"token ids must be 1-D, got shape {ids.shape}")
    # The C chain reads the array's memory directly, which must then be one contiguous run.
    return np.ascontiguousarray(ids)


def _chain_in_python(data: bytes | np.ndarray, block_size: int, root: bytes, seed: int) -> list[bytes]:
    """The chain over int32-LE ids `data` from `root`: the fallback of, and the oracle for, the C one."""
    data = bytes(data)
    step = 4 * block_size
    end = (len(data) // step) * step
    # The chain is sequential, so this loop is the cost floor in Python: keep its body to one
    # slice, one concatenation and one hash call.
    digest, h = xxhash.xxh3_128_digest, root
    out: list[bytes] = []
    append = out.append
    for off in range(0, end, step):
        h = digest(h + data[off : off + step], seed)
        append(h)
    return out


# Same signature and bytes either way; the C one also takes a list or tuple of ints as `data`.
CHAIN_IN_C = _chain_in_c is not None


class BlockHasher:
    """Hashes token ids into the chain of full-block digests of one namespace.

    Thread-safe (no mutable state besides a memo of roots). `seed` is the deployment's secret
    (`Settings.hash_seed`): without it nobody can predict, and so target, a block's hash.
    """

    def __init__(self, namespace: Namespace, seed: int = 0) -> None:
        if not 0 <= seed < 2**64:
            raise ValueError("seed must fit in an unsigned 64-bit integer")
        self.namespace = namespace
        self.seed = seed
        self.block_size = namespace.block_size
        self._namespace_bytes = namespace.to_bytes()
        self._root = lru_cache(maxsize=4096)(self._compute_root)

    def _compute_root(self, salt: str) -> bytes:
        data = self._namespace_bytes + (_field(salt.encode()) if salt else b"")
        return xxhash.xxh3_128_digest(data)

    def root(self, salt: str = "") -> bytes:
        """h_0 of a chain: the namespace digest, narrowed by `salt` when one is given."""
        return self._root(salt)

    def next_hash(self, parent: bytes, block_token_ids: Sequence[int] | np.ndarray) -> bytes:
        """The hash of one more full block after `parent` (the engine calls it as blocks fill)."""
        ids = _as_int32_le(block_token_ids)
        if len(ids) != self.block_size:
            raise ValueError(f"a block has {self.block_size} tokens, got {len(ids)}")
        if len(parent) != HASH_BYTES:
            raise ValueError(f"parent hash must be {HASH_BYTES} bytes, got {len(parent)}")
        return xxhash.xxh3_128_digest(parent + ids.tobytes(), self.seed)

    def hash_blocks(
        self,
        token_ids: Sequence[int] | np.ndarray,
        salt: str = "",
        parent: bytes | None = None,
    ) -> list[bytes]:
        """Hashes of every full block of `token_ids`; a partial last block is left out.

        The chain starts at `root(salt)`, or continues from `parent` when given (extending a
        chain by several blocks). A numpy int32 array is hashed in place; a list or tuple goes to
        the C chain as it is (it packs the ids faster than numpy can convert them).
        """
        h = self.root(salt) if parent is None else parent
        if len(h) != HASH_BYTES:
            raise ValueError(f"parent hash must be {HASH_BYTES} bytes, got {len(h)}")
        if _chain_in_c is None:
            return _chain_in_python(_as_int32_le(token_ids), self.block_size, h, self.seed)
        ids = token_ids if isinstance(token_ids, list | tuple) else _as_int32_le(token_ids)
        return _chain_in_c(ids, self.block_size, h, self.seed)
