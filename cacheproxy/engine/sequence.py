"""One request's state inside the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from cacheproxy.cache.tiered_store import PendingLoad
from cacheproxy.engine.request import SamplingParams, TokenLogprob


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
    reported_first: bool = False
    # Later prefix blocks loading while the earlier ones are recomputed (TieredStore.match).
    pending_load: PendingLoad | None = None

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
