"""The KV pool and its block allocator; also the GPU tier of the prefix cache.

Pool layout (DESIGN.md): `[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]`, one
contiguous span per block. A block whose last reference goes keeps its hash and content and waits
in an LRU of evictable blocks; it is reused (and only then evicted) when the free list runs dry.
Blocks referenced by a running sequence are never evicted.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cacheproxy.cache.fastpath import identity_key, release_all


@dataclass(frozen=True, slots=True)
class BlockIdentity:
    """What a cached block claims to be; compared before any reuse.

    Frozen: `key` is `identity_key(parent, token_ids)`, made here (or, by `keyed`, earlier from the
    same values), so it can never disagree with them (the admission walk compares keys, `lookup`
    compares the fields)."""

    hash: bytes
    parent: bytes
    token_ids: tuple[int, ...]
    index: int = -1  # position of the block in its chain: the prefix holds (index + 1) blocks
    key: bytes | None = field(init=False, repr=False, compare=False)  # fastpath.identity_key

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", identity_key(self.parent, self.token_ids))

    @classmethod
    def keyed(
        cls, hash: bytes, parent: bytes, token_ids: tuple[int, ...], index: int, key: bytes
    ) -> BlockIdentity:
        """An identity whose key the caller made with `identity_key(parent, token_ids)` from these same
        (immutable) values: the CPU tier keeps one per block, and packing the ids again cost the
        admission walk ~1 us a block."""
        ident = cls.__new__(cls)
        setattr_ = object.__setattr__
        setattr_(ident, "hash", hash)
        setattr_(ident, "parent", parent)
        setattr_(ident, "token_ids", token_ids)
        setattr_(ident, "index", index)
        setattr_(ident, "key", key)
        return ident


# Called with (block id, identity) just before a cached block's content is overwritten.
EvictHook = Callable[[int, BlockIdentity], None]


class BlockPool:
    def __init__(self, kv: torch.Tensor) -> None:
        self.kv = kv
        self.num_blocks = kv.shape[0]
        self.block_size = kv.shape[3]
        self.block_bytes = kv[0].numel() * kv.element_size()
        self.ref_counts = [0] * self.num_blocks
        self.identity: list[BlockIdentity | None] = [None] * self.num_blocks
        self.by_hash: dict[bytes, int] = {}
        # Evictable blocks, least recently used first; blocks with no identity sit in front.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(self.num_blocks))
        self.on_evict: EvictHook | None = None
        self.evictions = 0
        self.hits = [0] * self.num_blocks
        self.last_use = [0.0] * self.num_blocks

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_cached(self) -> int:
        return len(self.by_hash)

    def allocate(self) -> int:
        """A fresh block with refcount 1. Raises IndexError when every block is in use."""
        block, _ = self.free.popitem(last=False)
        ident = self.identity[block]
        if ident is not None:
            if self.on_evict is not None:
                self.on_evict(block, ident)
            del self.by_hash[ident.hash]
            self.identity[block] = None
            self.evictions += 1
        self.ref_counts[block] = 1
        return block

    def lookup(self, block_hash: bytes, parent: bytes, token_ids: tuple[int, ...]) -> int | None:
        """The cached block with this hash, only if its parent and tokens also match."""
        block = self.by_hash.get(block_hash)
        if block is None:
            return None
        ident = self.identity[block]
        if ident is None or ident.parent != parent or ident.token_ids != token_ids:
            return None
        return block

    def acquire(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1

    def release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free[block] = None
            if self.identity[block] is None:
                self.free.move_to_end(block, last=False)

    def release_many(self, blocks: list[int]) -> None:
        """`release` of each block, in order, in one call (a long sequence frees thousands)."""
        release_all(blocks, self.ref_counts, self.free, self.identity)

    def register(self, block: int, ident: BlockIdentity) -> bool:
        """Marks a filled block as holding `ident`; False when another block holds it already."""
        if ident.hash in self.by_hash or self.identity[block] is not None:
            return False
        self.identity[block] = ident
        self.by_hash[ident.hash] = block
        self.hits[block] = 0
        self.last_use[block] = time.time()
        return True

    def evict(self, block_hash: bytes | None = None) -> int:
        """Drops cached, unreferenced blocks (one hash, or all); returns how many."""
        targets = [self.by_hash[block_hash]] if block_hash in self.by_hash else []
        if block_hash is None:
            targets = list(self.by_hash.values())
        n = 0
        for block in targets:
            if self.ref_counts[block] == 0:
                ident = self.identity[block]
                assert ident is not None
                del self.by_hash[ident.hash]
                self.identity[block] = None
                self.free.move_to_end(block, last=False)
                n += 1
        return n
