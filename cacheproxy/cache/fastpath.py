"""The loops of a request's admission and release that run once per token or per block of a prompt.

On a 32k-token prompt whose prefix is all in the pool, these loops in Python cost about as much host
time as the forward pass: copying and packing the ids once, with their range (`pack_token_ids`), the
count of the prompt's leading blocks the pool holds (`count_leading_in`), the walk over those blocks
(`resident_prefix`) and their release when the request ends (`release_all`). All run in C
(`_hashchain`, built with the hash chain) or, without it, in Python; both give the same results and
raise the same exception types. (`token_bounds` is the range check alone, kept for its callers.)

A block's identity is compared by bytes: `identity_key` makes `parent ‖ int32-LE token ids` from a
`BlockIdentity`'s own fields, once, and the walk compares it with the request's hash and packed ids.
"""

from __future__ import annotations

import operator
import struct
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cacheproxy.engine.block_pool import BlockIdentity

try:
    from cacheproxy.cache._hashchain import count_leading_in as _count_leading_in_in_c
    from cacheproxy.cache._hashchain import pack_token_ids as _pack_token_ids_in_c
    from cacheproxy.cache._hashchain import release_all as _release_all_in_c
    from cacheproxy.cache._hashchain import resident_prefix as _resident_prefix_in_c
    from cacheproxy.cache._hashchain import token_bounds as _token_bounds_in_c
except ImportError:  # not built here, or built from an older _hashchain.c
    _token_bounds_in_c = None
    _pack_token_ids_in_c = None
    _count_leading_in_in_c = None
    _resident_prefix_in_c = None
    _release_all_in_c = None

IN_C = None not in (
    _token_bounds_in_c,
    _pack_token_ids_in_c,
    _count_leading_in_in_c,
    _resident_prefix_in_c,
    _release_all_in_c,
)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


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


def _pack_token_ids_in_python(ids: Iterable[int]) -> tuple[list[int], bytes, int, int]:
    copy = list(ids)
    values = [operator.index(v) for v in copy]  # TypeError at the first non-integer
    if not values:
        raise ValueError("pack_token_ids() of an empty sequence")
    lo, hi = min(values), max(values)
    if lo < _INT32_MIN or hi > _INT32_MAX:
        raise OverflowError("token id outside int32")
    return copy, struct.pack(f"<{len(values)}i", *values), lo, hi


def pack_token_ids(ids: Iterable[int]) -> tuple[list[int], bytes, int, int]:
    """`(list(ids), int32-LE bytes of the ids, min, max)` of a non-empty sequence of integers
    (anything with `__index__`), in one pass over the ids. The bytes are made from the copy.

    TypeError when an item is not an integer; failing that, OverflowError when one is outside int32;
    ValueError when `ids` is empty.
    """
    if _pack_token_ids_in_c is None:
        return _pack_token_ids_in_python(ids)
    return _pack_token_ids_in_c(ids)


def int32_bytes(ids: Sequence[int]) -> bytes | None:
    """The int32-LE bytes of `ids` (b"" for none), or None when they are not all int32 integers."""
    if not ids:
        return b""
    try:
        return pack_token_ids(ids)[1]
    except (TypeError, OverflowError):
        return None


_BLOCK_STRUCTS: dict[int, struct.Struct] = {}
_INT_ONLY = {int}


def identity_key(parent: object, token_ids: object) -> bytes | None:
    """`parent ‖ int32-LE token ids`: what `resident_prefix` compares a pool block with. None (never
    equal to a request's) unless `parent` is bytes and `token_ids` a tuple of ints within int32.

    Only exact ints are packed: equal bytes then mean equal values under `==` too, so a key never
    vouches for a block that comparing the fields themselves would refuse."""
    if type(parent) is not bytes or type(token_ids) is not tuple or not {*map(type, token_ids)} <= _INT_ONLY:
        return None
    n = len(token_ids)
    packer = _BLOCK_STRUCTS.get(n)
    if packer is None:
        packer = _BLOCK_STRUCTS.setdefault(n, struct.Struct(f"<{n}i"))
    try:
        return parent + packer.pack(*token_ids)
    except struct.error:  # not integers, or outside int32
        return None


def _count_leading_in_python(keys: Sequence[object], mapping: dict[object, object]) -> int:
    if not isinstance(mapping, dict):
        raise TypeError("mapping must be a dict")
    n = 0
    for key in keys:
        if key not in mapping:
            break
        n += 1
    return n


def count_leading_in(keys: Sequence[object], mapping: dict[object, object]) -> int:
    """How many leading items of `keys` are keys of the dict `mapping`."""
    if _count_leading_in_in_c is None:
        return _count_leading_in_python(keys, mapping)
    return _count_leading_in_in_c(keys, mapping)


def _resident_prefix_in_python(
    hashes: Sequence[bytes],
    packed: bytes,
    root: bytes,
    block_size: int,
    by_hash: dict[bytes, int],
    identity: list[BlockIdentity | None],
    ref_counts: list[int] | None = None,
    free: OrderedDict[int, None] | None = None,
) -> list[int]:
    packed = memoryview(packed).tobytes()  # TypeError for what is not bytes-like, as the C one
    if not isinstance(by_hash, dict) or not isinstance(identity, list):
        raise TypeError("by_hash must be a dict and identity a list")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if len(packed) % 4:
        raise ValueError(f"packed must be whole int32 ids, got {len(packed)} bytes")
    if (ref_counts is None) != (free is None):
        raise TypeError("ref_counts and free are given together or not at all")
    if ref_counts is not None and not isinstance(ref_counts, list):
        raise TypeError("ref_counts must be a list")
    step = 4 * block_size
    blocks: list[int] = []
    parent = root
    for i, h in enumerate(hashes):
        block = by_hash.get(h)
        if block is None:
            break
        ident = identity[block]
        if ident is None:
            break
        key = ident.key
        if type(parent) is not bytes:
            raise TypeError("root and hashes must be bytes")
        if not (type(key) is bytes and key == parent + packed[i * step : (i + 1) * step]):
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
    packed: bytes,
    root: bytes,
    block_size: int,
    by_hash: dict[bytes, int],
    identity: list[BlockIdentity | None],
    ref_counts: list[int] | None = None,
    free: OrderedDict[int, None] | None = None,
) -> list[int]:
    """The pool blocks of the leading run of `hashes` that the pool holds and that are the request's:
    block i is `by_hash[hashes[i]]`, its identity is not None, and its `key` is the parent's hash
    (`hashes[i - 1]`, `root` for the first) followed by block i of `packed`, the request's token ids as
    int32-LE bytes. Since a key is made only from its identity's `parent` and `token_ids`, this
    accepts no block that `BlockPool.lookup`'s check refuses.

    With `ref_counts` and `free` (the pool's), each of those blocks is then acquired once, as
    `BlockPool.acquire` does; a block that fails its check is left untouched.
    """
    if _resident_prefix_in_c is None:
        return _resident_prefix_in_python(
            hashes, packed, root, block_size, by_hash, identity, ref_counts, free
        )
    return _resident_prefix_in_c(hashes, packed, root, block_size, by_hash, identity, ref_counts, free)


def _release_all_in_python(
    blocks: Sequence[int],
    ref_counts: list[int],
    free: OrderedDict[int, None],
    identity: list[BlockIdentity | None],
) -> None:
    if not isinstance(ref_counts, list) or not isinstance(identity, list):
        raise TypeError("ref_counts and identity must be lists")
    for block in blocks:
        ref_counts[block] -= 1
        if ref_counts[block] == 0:
            free[block] = None
            if identity[block] is None:
                free.move_to_end(block, last=False)


def release_all(
    blocks: Sequence[int],
    ref_counts: list[int],
    free: OrderedDict[int, None],
    identity: list[BlockIdentity | None],
) -> None:
    """`BlockPool.release` of every block, in order, on the pool's lists."""
    if _release_all_in_c is None:
        _release_all_in_python(blocks, ref_counts, free, identity)
    else:
        _release_all_in_c(blocks, ref_counts, free, identity)
