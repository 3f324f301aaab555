"""One cached KV block and its persisted form.

A `BlockEntry` is one block of the page-first pool, tensor shape
`[num_layers, 2, block_size, num_kv_heads, head_dim]`, with the identity it was stored under:
its hash, its parent's hash and its token ids. A tier looks blocks up by hash alone; the caller
accepts one only after `entry.matches(parent, token_ids)`, so a hash collision cannot serve the
wrong KV.

Persisted form (disk, Redis): msgpack `[header, payload]`. The header is a map
`{v, ns, hash, parent, tokens, dtype, shape, xxh3_64}`; the payload is the tensor's raw bytes in
C order (bfloat16 as its 2-byte patterns: numpy has no bfloat16). `xxh3_64` covers the payload
*and* the identity fields (version, namespace, hashes, token ids, dtype, shape), so a flipped bit
anywhere in the value is refused rather than served with a wrong identity.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack
import numpy as np
import torch
import xxhash

from cacheproxy.cache.hashing import HASH_BYTES

FORMAT_VERSION = 1
# A header holds at most a few KiB (token ids of one block); anything larger is not ours.
MAX_HEADER_BYTES = 64 << 10

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_HEADER_KEYS = frozenset({"v", "ns", "hash", "parent", "tokens", "dtype", "shape", "xxh3_64"})


class CorruptEntry(ValueError):
    """A stored value that must not be served: damaged, foreign, or not the block asked for."""


@dataclass(slots=True, eq=False)
class BlockEntry:
    """One KV block. `tensor` is `[num_layers, 2, block_size, num_kv_heads, head_dim]`."""

    hash: bytes
    parent_hash: bytes
    token_ids: tuple[int, ...]
    tensor: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.hash) != HASH_BYTES or len(self.parent_hash) != HASH_BYTES:
            raise ValueError(f"hashes must be {HASH_BYTES} bytes")
        t = self.tensor
        if t.dim() != 5 or t.shape[1] != 2:
            raise ValueError(f"block tensor must be [L, 2, block_size, H, D], got {tuple(t.shape)}")
        if t.shape[2] != len(self.token_ids):
            raise ValueError(f"{len(self.token_ids)} token ids for a block of {t.shape[2]} tokens")
        if t.dtype not in _DTYPE_NAMES:
            raise ValueError(f"unsupported KV dtype {t.dtype}")

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def matches(self, parent_hash: bytes, token_ids: Sequence[int] | np.ndarray) -> bool:
        """True when this entry really is the block the caller asked for, not a hash collision."""
        if parent_hash != self.parent_hash:
            return False
        ids = token_ids.tolist() if isinstance(token_ids, np.ndarray) else token_ids
        return tuple(ids) == self.token_ids


def _identity_bytes(
    version: int, ns: bytes, h: bytes, parent: bytes, tokens: Sequence[int], dtype: str, shape: Sequence[int]
) -> bytes:
    # Canonical bytes of the header fields (not msgpack's encoding of them), so the checksum does
    # not depend on how a msgpack version chooses to encode.
    return b"".join(
        (
            struct.pack("<II", version, len(ns)),
            ns,
            h,
            parent,
            struct.pack(f"<I{len(tokens)}q", len(tokens), *tokens),
            struct.pack("<I", len(dtype)),
            dtype.encode(),
            struct.pack(f"<I{len(shape)}q", len(shape), *shape),
        )
    )


def _checksum(identity: bytes, payload: bytes | memoryview) -> int:
    hasher = xxhash.xxh3_64(identity)
    hasher.update(payload)
    return hasher.intdigest()


def _payload_view(tensor: torch.Tensor) -> memoryview:
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    # A uint8 view works for every dtype, bfloat16 included, without a copy when contiguous.
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _bin_prefix(n: int) -> bytes:
    return b"\xc6" + struct.pack(">I", n)  # msgpack bin 32


def encode(entry: BlockEntry, namespace_digest: bytes) -> bytes:
    """The persisted bytes of `entry` under `namespace_digest` (see the module docstring)."""
    payload = _payload_view(entry.tensor)
    dtype = _DTYPE_NAMES[entry.tensor.dtype]
    shape = list(entry.tensor.shape)
    tokens = list(entry.token_ids)
    identity = _identity_bytes(
        FORMAT_VERSION, namespace_digest, entry.hash, entry.parent_hash, tokens, dtype, shape
    )
    header = {
        "v": FORMAT_VERSION,
        "ns": namespace_digest,
        "hash": entry.hash,
        "parent": entry.parent_hash,
        "tokens": tokens,
        "dtype": dtype,
        "shape": shape,
        "xxh3_64": _checksum(identity, payload),
    }
    # msgpack fixarray(2), the header, then the payload as bin 32: written by hand so the
    # (megabytes of) payload are copied once, not once per msgpack buffer.
    return b"".join((b"\x92", msgpack.packb(header), _bin_prefix(len(payload)), payload))


def _split(data: bytes | memoryview) -> tuple[dict, memoryview]:
    view = memoryview(data).cast("B")
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_HEADER_BYTES + 16)
    # Feed only a bounded prefix: the payload is sliced from `view`, not copied by msgpack.
    unpacker.feed(view[: MAX_HEADER_BYTES + 16])
    try:
        if unpacker.read_array_header() != 2:
            raise CorruptEntry("value is not a 2-element msgpack array")
        header = unpacker.unpack()
        offset = unpacker.tell()
    except CorruptEntry:
        raise
    except Exception as exc:  # msgpack raises several unrelated types on malformed input
        raise CorruptEntry(f"malformed msgpack: {type(exc).__name__}: {exc}") from exc
    if not isinstance(header, dict) or set(header) != _HEADER_KEYS:
        raise CorruptEntry("header is not the expected map")
    if len(view) < offset + 1:
        raise CorruptEntry("truncated before the payload")
    marker = view[offset]
    width = {0xC4: 1, 0xC5: 2, 0xC6: 4}.get(marker)
    if width is None:
        raise CorruptEntry(f"payload is not msgpack bin (marker 0x{marker:02x})")
    start = offset + 1 + width
    if len(view) < start:
        raise CorruptEntry("truncated payload length")
    size = int.from_bytes(view[offset + 1 : start], "big")
    if start + size != len(view):
        raise CorruptEntry(f"payload length {size} disagrees with the value size")
    return header, view[start:]


def decode(data: bytes | memoryview, expected_namespace: bytes, expected_hash: bytes) -> BlockEntry:
    """Parse and verify persisted bytes; raises `CorruptEntry` on any mismatch.

    The returned tensor owns its memory (one copy out of `data`), so `data` may be a buffer that
    dies right after the call (an LMDB read transaction's memoryview).
    """
    header, payload = _split(data)
    version, ns, h, parent = header["v"], header["ns"], header["hash"], header["parent"]
    tokens, dtype_name, shape = header["tokens"], header["dtype"], header["shape"]
    if type(version) is not int or version != FORMAT_VERSION:
        raise CorruptEntry(f"format version {version!r}, expected {FORMAT_VERSION}")
    if ns != expected_namespace:
        raise CorruptEntry("namespace digest differs: entry of another model, dtype or layout")
    if h != expected_hash:
        raise CorruptEntry("stored hash differs from the key it was read under")
    if not (isinstance(parent, bytes) and len(parent) == HASH_BYTES):
        raise CorruptEntry("malformed parent hash")
    if dtype_name not in DTYPES:
        raise CorruptEntry(f"unknown dtype {dtype_name!r}")
    if not (
        isinstance(shape, list)
        and len(shape) == 5
        and all(isinstance(d, int) and d > 0 for d in shape)
        and shape[1] == 2
    ):
        raise CorruptEntry(f"malformed shape {shape!r}")
    if not (isinstance(tokens, list) and all(isinstance(t, int) for t in tokens)):
        raise CorruptEntry("malformed token ids")
    if len(tokens) != shape[2]:
        raise CorruptEntry(f"{len(tokens)} token ids for a block of {shape[2]} tokens")
    dtype = DTYPES[dtype_name]
    expected_size = math.prod(shape) * dtype.itemsize
    if len(payload) != expected_size:
        raise CorruptEntry(f"payload of {len(payload)} bytes for shape {shape} {dtype_name}")
    try:
        identity = _identity_bytes(version, ns, h, parent, tokens, dtype_name, shape)
    except struct.error as exc:
        raise CorruptEntry(f"token id or dimension out of range: {exc}") from exc
    if _checksum(identity, payload) != header["xxh3_64"]:
        raise CorruptEntry("checksum mismatch")
    flat = torch.empty(expected_size, dtype=torch.uint8)
    flat.numpy()[:] = np.frombuffer(payload, dtype=np.uint8)
    return BlockEntry(h, parent, tuple(tokens), flat.view(dtype).view(shape))
