"""One request's state inside the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from cacheproxy.cache.tiered_store import PendingLoad
from cacheproxy.engine.request import SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from cacheproxy.engine.grammar import TokenMatcher
    from cacheproxy.engine.penalties import PenaltyState


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    root_hash: bytes
    # prompt_ids as int32-LE bytes, made from the same copy (fastpath.pack_token_ids); the admission
    # walk verifies pool blocks against them, so they must never disagree with prompt_ids. b"" when
    # not made: the scheduler then lets the store pack the ids itself.
    prompt_packed: bytes = b""
    arrival_time: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the pool
    block_hashes: list[bytes] = field(default_factory=list)  # of full blocks, in order
    num_registered: int = 0  # full blocks already published to the prefix cache
    cached_tokens: int = 0
    cached_by_tier: dict[str, int] = field(default_factory=dict)
    first_scheduled_time: float | None = None
    generator: torch.Generator | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    penalties: PenaltyState | None = None  # made at its first sampled step when its params adjust logits
    matcher: TokenMatcher | None = None  # where its structured output stands, when it asked for one
    tentative_matcher: TokenMatcher | None = None  # fed but not masking yet (StructuredOutput.tentative)
    held_back: list[int] = field(default_factory=list)  # token ids not drawn before params.min_tokens
    reported_first: bool = False
    # Later prefix blocks loading while the earlier ones are recomputed (TieredStore.match).
    pending_load: PendingLoad | None = None
    # `block_table` as int32 (`block_table_array`): the list mirrored and how many of its entries.
    _table_array: np.ndarray | None = field(default=None, repr=False)
    _table_source: list[int] | None = field(default=None, repr=False)
    _table_mirrored: int = field(default=0, repr=False)

    def block_table_array(self) -> np.ndarray:
        """`block_table` as an int32 array (valid until the next call). Converting a 500-block table
        every step cost a decode step of 32 sequences at 8k context ~1.2 ms of host time (H200 host);
        the mirror copies only the blocks appended since the last call, and starts over for a new
        list or a shorter one. So the list only grows in place: an entry is replaced through
        `set_block`, anything else by assigning a new list."""
        table = self.block_table
        n = len(table)
        arr, done = self._table_array, self._table_mirrored
        if arr is None or table is not self._table_source or n < done:
            arr, done = np.empty(max(16, 2 * n), dtype=np.int32), 0
            self._table_source = table
        elif n > arr.shape[0]:
            grown = np.empty(2 * n, dtype=np.int32)
            grown[:done] = arr[:done]
            arr = grown
        if n > done:
            arr[done:n] = table[done:n]
        self._table_array, self._table_mirrored = arr, n
        return arr[:n]

    def set_block(self, index: int, block: int) -> None:
        """Replaces one entry of `block_table`, and of its int32 mirror."""
        self.block_table[index] = block
        if (
            self._table_array is not None
            and self._table_source is self.block_table
            and index < self._table_mirrored
        ):
            self._table_array[index] = block

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n : end - n]
        return self.prompt_ids[start:] + self.output_ids[: end - n]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
