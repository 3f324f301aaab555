"""Two loops of a request's admission that run once per token or per block of a prompt.

On a 32k-token prompt whose prefix is all in the pool, these loops in Python cost about as much host
time as the forward pass: the range check of the ids (`token_bounds`) and the walk over the pool's
blocks of the prefix (`resident_prefix`). Both run in C (`_hashchain`, built with the hash chain)
or, without it, in Python; both give the same results and raise the same exception types.
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cacheproxy.engine.block_pool import BlockIdentity

try:
    from cacheproxy.cache._hashchain import resident_prefix as _resident_prefix_in_c
    from cacheproxy.cache._hashchain import token_bounds as _token_bounds_in_c
except ImportError:  # not built here, or built from an older _hashchain.c
    _token_bounds_in_c = None
    _resident_prefix_in_c = None

IN_C = _token_bounds_in_c is not None and _resident_prefix_in_c is not None
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _token_bounds_in_python(ids: Iterable[int]) -> tuple[int, int]:
    values = list(map(operator.index, ids))  # TypeError at the first non-integer
    if not values:
        raise ValueError("token_bounds() of an empty sequence")
    lo, hi = min(values), max(values)
    if lo < _INT64_MIN or hi > _INT64_MAX:
        raise OverflowError("token id outside int64")
    return lo, hi


def token_bounds(ids: Iterable[int]) -> tuple[int, int]:
    """(min, max) of a non-empty sequence of integers (anything with `__index__`).

    TypeError when an item is not an integer; failing that, OverflowError when one is outside int64;
    ValueError when `ids` is empty.
    """
    if _token_bounds_in_c is None:
        return _token_bounds_in_python(ids)
    return _token_bounds_in_c(ids)


def _resident_prefix_in_python(
    hashes: Sequence[bytes],
    token_ids: Sequence[int],
    root: bytes,
    block_size: int,
    by_hash: dict[bytes, int],
    identity: list[BlockIdentity | None],
    ref_counts: list[int] | None = None,
    free: OrderedDict[int, None] | None = None,
) -> list[int]:
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if (ref_counts is None) != (free is None):
        raise TypeError("ref_counts and free are given together or not at all")
    blocks: list[int] = []
    parent = root
    for i, h in enumerate(hashes):
        block = by_hash.get(h)
        if block is None:
            break
        ident = identity[block]
        toks = tuple(token_ids[i * block_size : (i + 1) * block_size])
        if not (ident is not None and ident.parent == parent and ident.token_ids == toks):
            break
        blocks.append(block)
        parent = h
    if ref_counts is not None and free is not None:
        for block in blocks:
            if ref_counts[block] == 0:
                del free[block]
            ref_counts[block] += 1
    return blocks


def resident_prefix(
    hashes: Sequence[bytes],
    token_ids: Sequence[int],
    root: bytes,
    block_size: int,
    by_hash: dict[bytes, int],
    identity: list[BlockIdentity | None],
    ref_counts: list[int] | None = None,
    free: OrderedDict[int, None] | None = None,
) -> list[int]:
    """The pool blocks of the leading run of `hashes` that the pool holds and that pass
    `BlockPool.lookup`'s check: block i is `by_hash[hashes[i]]`, its identity is not None, its
    parent is `hashes[i - 1]` (`root` for the first) and its token ids are block i of `token_ids`.

    With `ref_counts` and `free` (the pool's), each of those blocks is then acquired once, as
    `BlockPool.acquire` does; a block that fails its check is left untouched.
    """
    if _resident_prefix_in_c is None:
        return _resident_prefix_in_python(
            hashes, token_ids, root, block_size, by_hash, identity, ref_counts, free
        )
    return _resident_prefix_in_c(hashes, token_ids, root, block_size, by_hash, identity, ref_counts, free)
