"""Decides what runs in the next step: decodes first, then prefill chunks, within a token budget.

A step is a list of (sequence, number of new tokens). A decode is a chunk of one token; a prompt
longer than the budget is prefilled over several steps. A sequence that cannot get blocks waits;
when running decodes run out of blocks, the youngest sequence is preempted (its blocks stay in the
prefix cache, so its re-admission mostly hits).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from cacheproxy.cache.fastpath import int32_bytes
from cacheproxy.cache.tiered_store import TieredStore
from cacheproxy.engine.block_pool import BlockPool
from cacheproxy.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledChunk:
    seq: Sequence
    start: int  # first position computed in this step (== seq.num_computed)
    length: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the known tokens: its last logits pick the next one."""
        return self.start + self.length == self.seq.num_tokens


@dataclass(slots=True)
class ScheduledStep:
    chunks: list[ScheduledChunk]

    @property
    def is_decode_only(self) -> bool:
        return all(c.length == 1 and c.start > 0 for c in self.chunks)


class Scheduler:
    def __init__(self, pool: BlockPool, store: TieredStore, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.pool = pool
        self.store = store
        self.block_size = pool.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledStep:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        scheduled: set[int] = set()
        # 1. decodes of running sequences (oldest first; preempt the youngest when blocks run out)
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or seq.num_tokens - seq.num_computed != 1:
                continue
            if budget == 0:
                break
            while not self._ensure_blocks(seq, seq.num_computed + 1):
                victim = self._youngest_running(exclude=scheduled | {id(seq)})
                if victim is None:
                    break
                self._preempt(victim)
            if seq.status is not SequenceStatus.RUNNING or not self._has_blocks(seq, seq.num_computed + 1):
                if seq.status is SequenceStatus.RUNNING:
                    self._preempt(seq)
                continue
            chunks.append(ScheduledChunk(seq, seq.num_computed, 1))
            scheduled.add(id(seq))
            budget -= 1
        # 2. prefill continuations of admitted sequences
        for seq in self.running:
            if budget == 0:
                break
            if seq.pending_load is not None and not self._land_loads(seq):
                continue  # its recomputed part is done, its loaded part is not there yet
            remaining = seq.num_tokens - seq.num_computed
            if id(seq) in scheduled or (remaining <= 1 and seq.num_computed > 0):
                continue
            n = self._next_chunk(seq, remaining, budget)
            if n == 0 or not self._ensure_blocks(seq, seq.num_computed + n):
                continue
            chunks.append(ScheduledChunk(seq, seq.num_computed, n))
            scheduled.add(id(seq))
            budget -= n
        # 3. admissions
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self._admit(seq, budget):
                break
            self.waiting.popleft()
            n = self._next_chunk(seq, seq.num_tokens - seq.num_computed, budget)
            chunks.append(ScheduledChunk(seq, seq.num_computed, n))
            budget -= n
        return ScheduledStep(chunks)

    def _admit(self, seq: Sequence, budget: int) -> bool:
        bs = self.block_size
        # The match reads the ids, never changes them: a prompt alone is passed as it is.
        tokens = seq.prompt_ids + seq.output_ids if seq.output_ids else seq.prompt_ids
        packed: bytes | None = None  # None: the store packs the ids itself
        if len(seq.prompt_packed) == 4 * len(seq.prompt_ids):
            packed = seq.prompt_packed
            if seq.output_ids:  # re-admitted after a preemption
                more = int32_bytes(seq.output_ids)
                packed = None if more is None else packed + more
        # At least the last token is computed: its logits choose the next token.
        max_blocks = (len(tokens) - 1) // bs
        match = self.store.match(seq.root_hash, seq.block_hashes[:max_blocks], tokens, max_blocks, packed)
        n = min(len(tokens) - match.num_tokens, budget)
        need = -(-(match.num_tokens + n) // bs) - len(match.blocks)
        if need > self.pool.num_free:
            # Loads into these blocks may still be planned (layer by layer) and no step of this
            # sequence will wait for them: settle them before the blocks can go to someone else. (Today
            # a registration or a demotion drains the copy stream before any of them is reused; this
            # does not rely on that.)
            self.store.settle_loads()
            self.pool.release_many(match.blocks)
            return False
        seq.block_table = list(match.blocks)
        seq.num_computed = match.num_tokens
        seq.num_registered = match.num_tokens // bs
        seq.pending_load = match.pending
        if not seq.reported_first:
            seq.cached_tokens = match.num_tokens
            seq.cached_by_tier = dict(match.tokens_by_tier)
        self._ensure_blocks(seq, seq.num_computed + n)
        seq.status = SequenceStatus.RUNNING
        if seq.first_scheduled_time is None:
            seq.first_scheduled_time = time.monotonic()
        self.running.append(seq)
        return True

    def _next_chunk(self, seq: Sequence, remaining: int, budget: int) -> int:
        """How many tokens a sequence computes next. One whose later prefix blocks are loading
        recomputes from the front toward them: first the blocks the plan gave the recompute (the
        loads run meanwhile, from the back); then the loads stop wherever they got to and the rest
        of the gap is recomputed (a tier slower than planned costs recompute, never waiting)."""
        p = seq.pending_load
        if p is None:
            return min(remaining, budget)
        bs = self.block_size
        planned_end = min(p.start + max(1, p.planned_recompute), p.low) * bs
        if not p.ready and seq.num_computed >= planned_end:
            p.floor = p.low  # the loader stops at its next turn
        end = p.low * bs if p.ready or p.floor == p.low else planned_end
        n = min(max(end - seq.num_computed, 0), budget)
        p.floor = max(p.floor, -(-(seq.num_computed + n) // bs))
        return n

    def _land_loads(self, seq: Sequence) -> bool:
        """When the recompute has met the loaded blocks, the sequence skips over them. False while it
        must wait for the loads to stop (the recompute has reached them first)."""
        p = seq.pending_load
        assert p is not None
        bs = self.block_size
        if seq.num_computed < p.low * bs:
            return True  # more to recompute; loads may still come
        if not p.ready:
            return False
        self.store.finish_load(p)
        seq.pending_load = None
        loaded = p.end - p.low
        seq.num_computed = p.end * bs
        seq.num_registered = p.end
        if not seq.reported_first:
            seq.cached_tokens += loaded * bs
            for tier, n in p.by_tier.items():
                seq.cached_by_tier[tier] = seq.cached_by_tier.get(tier, 0) + n
        return True

    def _has_blocks(self, seq: Sequence, num_tokens: int) -> bool:
        return len(seq.block_table) * self.block_size >= num_tokens

    def _ensure_blocks(self, seq: Sequence, num_tokens: int) -> bool:
        need = -(-num_tokens // self.block_size) - len(seq.block_table)
        if need <= 0:
            return True
        if need > self.pool.num_free:
            return False
        seq.block_table.extend(self.pool.allocate() for _ in range(need))
        return True

    def _youngest_running(self, exclude: set[int]) -> Sequence | None:
        for seq in reversed(self.running):
            if id(seq) not in exclude:
                return seq
        return None

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        if seq.pending_load is not None:
            self.store.cancel_load(seq.pending_load)
            seq.pending_load = None
        self.pool.release_many(seq.block_table[::-1])
        seq.block_table = []
        seq.num_computed = 0
        seq.num_registered = 0
        if seq in self.running:
            self.running.remove(seq)

    def finish(self, seq: Sequence) -> None:
        """Frees a finished or aborted sequence's blocks (they stay cached if registered)."""
        self.retire(seq)
        self.release(seq)

    def retire(self, seq: Sequence) -> None:
        """Takes a sequence out of the batch and the queue; its blocks stay held until `release`."""
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED

    def release(self, seq: Sequence) -> None:
        self._release(seq)
