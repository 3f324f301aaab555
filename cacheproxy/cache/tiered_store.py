"""The prefix cache across tiers: the engine's GPU pool first, then CPU, disk and remote tiers.

`match` finds the longest verified prefix, sharing GPU-resident blocks by reference and copying
blocks of lower tiers into fresh pool blocks. Evicted pool blocks are demoted to the first lower
tier; with `write_through` every filled block is also written down at once.
Not thread-safe: only the engine thread calls it (the lower tiers lock themselves).
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch

from cacheproxy.cache.block_entry import BlockEntry
from cacheproxy.cache.cost_model import CostModel
from cacheproxy.cache.cpu_tier import CpuTier
from cacheproxy.cache.cuda_driver import independent_stream
from cacheproxy.cache.disk_tier import DiskTier
from cacheproxy.cache.fastpath import int32_bytes, resident_prefix
from cacheproxy.cache.tier import KVTier
from cacheproxy.config import Settings
from cacheproxy.engine.block_pool import BlockIdentity, BlockPool
from cacheproxy.log import get_logger

if TYPE_CHECKING:
    from cacheproxy.engine.layer_gate import LayerGate

log = get_logger(__name__)

GPU = "gpu"
# Most copies one match queues layer by layer (runs x layers); more go whole-block.
LAYERED_MAX_COPIES = 512
# What a match keeps for its layer-by-layer tail: enough copying to hide a forward pass behind (~10 ms of
# PCIe), in at most so many blocks: the tail's copies start only after the walk has checked all of them
# (~10-25 µs a block), which for a small model's small blocks takes longer than copying them.
LAYERED_TAIL_BYTES = 512 << 20
LAYERED_TAIL_BLOCKS = 256
# Whole-block copies go out in batches of this many blocks while the walk goes on. The walk knows how many
# blocks it will load (the pool blocks it allocated), so the first batch goes as soon as it is full; it used
# to hold back the tail's worth first, which kept an 8k-token load from starting for 320 blocks of the walk.
EARLY_COPY_BLOCKS = 64


@dataclass(eq=False)
class PendingLoad:
    """The lower-tier part [start, end) of a prefix, met from both sides: the engine recomputes it
    from the front while its blocks load from the back, until the two meet."""

    start: int  # chain index of the first block of the part
    items: list[tuple[int, BlockIdentity, str]]  # (pool block, what it will hold, its tier) per index
    planned_recompute: int = 0  # blocks the plan recomputes while the others load
    low: int = 0  # blocks [low, end) are loaded (queued on the copy stream)
    floor: int = 0  # the recompute has claimed blocks below this: loads never go under it
    ready: bool = False  # loading stopped (met the recompute, or a block could not be read)
    event: torch.cuda.Event | None = None
    by_tier: Counter[str] = field(default_factory=Counter)

    @property
    def end(self) -> int:
        return self.start + len(self.items)

    def __post_init__(self) -> None:
        self.low = self.end
        self.floor = self.start


class PrefixMatch(NamedTuple):
    blocks: list[int]  # pool blocks, each acquired once for the caller
    num_tokens: int  # tokens whose K/V are in `blocks` (or on their way, for a load done now)
    tokens_by_tier: dict[str, int]
    # With a split plan: the blocks from num_tokens on are recomputed and loaded at once until the
    # two meet; `blocks` holds them all.
    pending: PendingLoad | None = None


@dataclass
class StoreCounters:
    queries_tokens: int = 0
    hits_tokens: Counter[str] = field(default_factory=Counter)
    transfers: Counter[tuple[str, str]] = field(default_factory=Counter)  # (src, dst) -> bytes
    # Lookups whose chain reached below the GPU, by what the cost model chose: load / recompute / split
    plans: Counter[str] = field(default_factory=Counter)
    # Of split plans: lower-tier blocks recomputed and blocks loaded, once each load has landed
    split_blocks: Counter[str] = field(default_factory=Counter)
    load_copies: int = 0  # copies queued for loads into the pool (a run of neighbouring blocks is one)


class TieredStore:
    def __init__(
        self,
        pool: BlockPool,
        lower_tiers: list[KVTier] | None = None,
        policy: str = "write_back",
        cost_model: CostModel | None = None,
    ) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self.tiers = list(lower_tiers or [])
        self.policy = policy
        # Plans what to load and what to recompute; None: load every block found.
        self.cost_model = cost_model
        self._pending_loads: list[PendingLoad] = []
        # Set by the engine on CUDA: admission loads from pinned memory then go layer by layer.
        self.layer_gate: LayerGate | None = None
        # Splitting a prefix between recompute and loads pays only where the device computes while
        # the host loads; on a CPU the forward pass holds the engine thread.
        self.split_loads = pool.kv.is_cuda
        self.counters = StoreCounters()
        self.pins: dict[bytes, float] = {}  # leaf hash -> pinned until (unix time)
        self._pinned_blocks: dict[bytes, list[int]] = {}
        self.load_stream: torch.cuda.Stream | None = None
        if pool.kv.is_cuda:
            self.load_stream, independent = independent_stream(pool.kv.device)
            if not independent:
                log.warning("copy stream shares a hardware queue with the compute stream; loads will not overlap")
        self._loads_pending = False
        self._pending_copies: list[tuple[int, CopySource]] = []
        self._issued = 0  # batches of whole-block copies queued so far
        self._shared_tiers = [t for t in self.tiers if t.name == "remote"]
        pool.on_evict = self._demote

    # --- lookup -------------------------------------------------------------------------
    def match(
        self,
        root: bytes,
        hashes: list[bytes],
        token_ids: list[int],
        max_blocks: int,
        packed: bytes | None = None,
    ) -> PrefixMatch:
        """Longest verified prefix; its blocks come back acquired once for the caller. `packed`: the
        same ids as int32-LE bytes where the caller has them (else they are packed here).

        Counts first how far the chain reaches in any tier. With a cost model, the part below the
        GPU is planned (`CostModel.plan`): loaded now, recomputed, or split: the first blocks are
        recomputed while the later ones load (`PrefixMatch.pending`), the loads running between
        engine steps (`advance_loads`). Otherwise every block found is loaded now.
        """
        bs = self.block_size
        hashes = hashes[:max_blocks]
        pool = self.pool
        if packed is None:
            packed = int32_bytes(token_ids)
        # The common case, a run of verified pool blocks from the start, is taken (acquired for the
        # caller) in one call (C where built) that compares `packed`, the ids as int32-LE, with each
        # block's identity key; the walks below start after it. Ids that do not pack leave the whole
        # prefix to the block-by-block checks.
        lead: list[int] = []
        if packed is not None:
            lead = resident_prefix(hashes, packed, root, bs, pool.by_hash, pool.identity, pool.ref_counts, pool.free)
        try:
            return self._match_beyond(root, hashes, token_ids, packed, lead)
        except BaseException:
            pool.release_many(lead)  # acquired for a caller that gets no match
            raise

    def _match_beyond(
        self, root: bytes, hashes: list[bytes], token_ids: list[int], packed: bytes | None, lead: list[int]
    ) -> PrefixMatch:
        """`match` past the pool's verified leading run `lead`: how far the lower tiers reach, the plan."""
        bs = self.block_size
        reach = len(lead)
        first_lower = -1
        lower_tiers: list[str] = []
        resident_after_lower = False
        # So is the run the first tier (the CPU tier) holds after it, when none of it is in the pool.
        count_held = getattr(self.tiers[0], "count_held", None) if self.tiers else None
        held = count_held(hashes, reach) if count_held is not None else 0
        if held and not any(map(self.pool.by_hash.__contains__, hashes[reach : reach + held])):
            first_lower = reach
            lower_tiers = [self.tiers[0].name] * held
            reach += held
        for h in hashes[reach:]:
            if h in self.pool.by_hash:
                resident_after_lower |= first_lower >= 0
            else:
                tier = next((t for t in self.tiers if t.contains(h)), None)
                if tier is None:
                    break
                if first_lower < 0:
                    first_lower = reach
                lower_tiers.append(tier.name)
            reach += 1
        self.counters.queries_tokens += len(token_ids)
        if first_lower >= 0 and self.cost_model is not None and not resident_after_lower:
            plan = self.cost_model.plan(lower_tiers, len(token_ids) - reach * bs, split=self.split_loads)
            if plan.load == 0:  # recomputing is faster: only the GPU part is used
                self.counters.plans["recompute"] += 1
                reach = first_lower
            elif plan.recompute > 0 and self.pool.num_free >= reach - first_lower:
                self.counters.plans["split"] += 1
                return self._match_split(
                    root, hashes[:reach], token_ids, first_lower, lower_tiers, plan.recompute, packed, lead
                )
            else:
                self.counters.plans["load"] += 1
        elif first_lower >= 0:
            self.counters.plans["load"] += 1
        return self._match_now(root, hashes[:reach], token_ids, packed, lead)

    def _match_now(
        self,
        root: bytes,
        hashes: list[bytes],
        token_ids: list[int],
        packed: bytes | None,
        lead: list[int],
    ) -> PrefixMatch:
        """Every block of `hashes` from wherever it is, lower tiers copied in now. `lead`: the
        leading run of verified pool blocks, already acquired for the caller (which also protects
        them from the allocations below). Then three passes over the rest, so that no demotion runs
        while CPU-tier slots are being read: protect the pool's blocks of the chain, allocate every
        block the lower-tier part needs, then verify and queue the copies."""
        bs = self.block_size
        pool = self.pool
        by_hash, identity, ref_counts, free = pool.by_hash, pool.identity, pool.ref_counts, pool.free
        blocks = list(lead)
        by_tier: Counter[str] = Counter()
        if blocks:
            by_tier[GPU] = bs * len(blocks)
        lead = len(blocks)
        rest = hashes[lead:]
        resident = [by_hash[h] for h in rest if h in by_hash]
        pool_in_rest = bool(resident)
        to_load = len(rest) - len(resident)
        if to_load:
            for block in resident:
                pool.acquire(block)
        else:
            resident = []  # nothing will be allocated: nothing to protect
        fresh = [pool.allocate() for _ in range(min(to_load, pool.num_free))]
        # Popped from the end: the chain gets them in ascending order, so that blocks loaded from
        # neighbouring CPU-tier slots land in neighbouring pool blocks and move in one copy.
        fresh.sort(reverse=True)
        issued_before = self._issued
        # With a layer gate the last blocks of the chain wait for the end of the walk and then load
        # layer by layer beside the forward pass; the ones before go whole-block as the walk finds them.
        tail = 0
        if self.layer_gate is not None:
            tail = max(64, min(LAYERED_TAIL_BYTES // pool.block_bytes, LAYERED_TAIL_BLOCKS))
        # Blocks to copy whole as the walk finds them, EARLY_COPY_BLOCKS at a time: all but the tail of
        # the blocks it expects to load (it may stop sooner; what is left pending joins the tail).
        early = max(0, len(fresh) - tail)
        pending = self._pending_copies
        parent = hashes[lead - 1] if lead else root
        now = time.time()
        # Where none of the rest is in the pool, the first tier (the CPU tier) reads it a run at a time.
        reader = self.tiers[0] if self.tiers and packed and not pool_in_rest else None
        read_chain = getattr(reader, "read_chain", None)
        i = lead
        while i < len(hashes):
            h = hashes[i]
            if read_chain is not None and fresh:
                run = read_chain(hashes, i, parent, packed, bs, len(fresh))
                if run:
                    assert reader is not None
                    slab = reader.slab  # type: ignore[attr-defined]
                    for slot, toks, key in run:
                        h = hashes[i]
                        block = fresh.pop()
                        self._copy_in(block, SlabSlot(slab, slot), reader.name)
                        if len(pending) >= EARLY_COPY_BLOCKS and early >= EARLY_COPY_BLOCKS:
                            self._issue_copies(EARLY_COPY_BLOCKS)  # the DMA starts while the walk goes on
                            early -= EARLY_COPY_BLOCKS
                        pool.register(block, BlockIdentity.keyed(h, parent, toks, i, key))
                        blocks.append(block)
                        parent = h
                        i += 1
                    by_tier[reader.name] += bs * len(run)
                    continue
            toks = tuple(token_ids[i * bs : (i + 1) * bs])
            block = by_hash.get(h)
            ident = identity[block] if block is not None else None
            if ident is not None and ident.parent == parent and ident.token_ids == toks:
                assert block is not None
                if ref_counts[block] == 0:  # pool.acquire, inlined: this loop runs per block of a prompt
                    del free[block]
                ref_counts[block] += 1
                by_tier[GPU] += bs
            else:
                found = self._find_lower(h, parent, toks, self.tiers) if fresh else None
                if found is None:
                    break
                source, tier_name = found
                block = fresh.pop()
                self._copy_in(block, source, tier_name)
                if len(pending) >= EARLY_COPY_BLOCKS and early >= EARLY_COPY_BLOCKS:
                    self._issue_copies(EARLY_COPY_BLOCKS)  # the DMA starts while the walk goes on
                    early -= EARLY_COPY_BLOCKS
                pool.register(block, BlockIdentity(h, parent, toks, i))
                by_tier[tier_name] += bs
            blocks.append(block)
            parent = h
            i += 1
        if by_tier[GPU]:  # what `entries` reports per chain is the max over its blocks: the leaf's
            leaf = next(b for b in reversed(blocks) if identity[b] is not None)
            pool.hits[leaf] += 1
            pool.last_use[leaf] = now
        for block in fresh + resident:
            self.pool.release(block)
        self._issue_admission_copies(issued_early=self._issued != issued_before)
        self.counters.hits_tokens.update(by_tier)
        return PrefixMatch(blocks, len(blocks) * bs, dict(by_tier))

    def _match_split(
        self,
        root: bytes,
        hashes: list[bytes],
        token_ids: list[int],
        first_lower: int,
        tiers: list[str],
        recompute: int,
        packed: bytes | None,
        lead: list[int],
    ) -> PrefixMatch:
        """Blocks [0, first_lower) from the pool (`lead`, acquired, the first of them); the rest fresh,
        to be recomputed from the front by the caller while `advance_loads` fills them from the back."""
        bs = self.block_size
        gpu = self._match_now(root, hashes[:first_lower], token_ids, packed, lead)
        if len(gpu.blocks) < first_lower:  # a pool block failed its check: the chain ends there
            return gpu
        blocks = list(gpu.blocks)
        blocks += [self.pool.allocate() for _ in range(len(hashes) - first_lower)]
        items = []
        for i in range(first_lower, len(hashes)):
            toks = tuple(token_ids[i * bs : (i + 1) * bs])
            ident = BlockIdentity(hashes[i], hashes[i - 1] if i else root, toks, i)
            items.append((blocks[i], ident, tiers[i - first_lower]))
        pending = PendingLoad(first_lower, items, recompute)
        self._pending_loads.append(pending)
        return PrefixMatch(blocks, gpu.num_tokens, gpu.tokens_by_tier, pending)

    # --- loads that run beside the recompute (meet in the middle) --------------------------
    @property
    def has_pending_loads(self) -> bool:
        return bool(self._pending_loads)

    def advance_loads(self, budget_s: float) -> None:
        """Reads and queues blocks, last first, for about `budget_s` (at least one block): called by
        the engine right after it launched a step, while the device computes. A load stops where
        the recompute's claim (`floor`) begins, or at a block that cannot be read."""
        deadline = time.perf_counter() + budget_s
        while self._pending_loads:
            p = self._pending_loads[0]
            while p.low - 1 >= p.floor:
                t0 = time.perf_counter()
                block, ident, _ = p.items[p.low - 1 - p.start]
                found = self._find_lower(ident.hash, ident.parent, ident.token_ids, self.tiers)
                if found is None:  # gone or failed its check since the plan: recomputed instead
                    break
                source, tier_name = found
                self._copy_in(block, source, tier_name)
                if len(self._pending_copies) >= 64:
                    self._issue_copies()
                p.by_tier[tier_name] += self.block_size
                p.low -= 1
                self._observe_load(tier_name, time.perf_counter() - t0)
                if time.perf_counter() > deadline:
                    self._issue_copies()
                    return
            self._issue_copies()
            if self.load_stream is not None:
                p.event = torch.cuda.Event()
                p.event.record(self.load_stream)
            p.ready = True
            self._pending_loads.pop(0)
            if time.perf_counter() > deadline:
                return

    def _observe_load(self, tier_name: str, seconds: float) -> None:
        """Keeps the cost model's load time of host-bound tiers (disk, remote) to what loads take now
        (page cache, device, network), not what they took at start-up. A pinned CPU tier's host
        time hides its DMA, so it keeps its measured figure."""
        cm = self.cost_model
        tier = next((t for t in self.tiers if t.name == tier_name), None)
        if cm is None or tier is None or getattr(tier, "get_view", None) is not None:
            return
        old = cm.load_s_per_block.get(tier_name, seconds)
        cm.load_s_per_block[tier_name] = 0.8 * old + 0.2 * seconds

    def finish_load(self, p: PendingLoad) -> None:
        """Hands a finished load to its sequence: the compute stream waits for its copies, and the
        loaded blocks [low, end) join the prefix cache."""
        assert p.ready
        if p.event is not None:
            torch.cuda.current_stream(self.pool.kv.device).wait_event(p.event)
        for block, ident, _ in p.items[p.low - p.start :]:
            self.pool.register(block, ident)  # False: an equal block was published meanwhile
        self.counters.hits_tokens.update(p.by_tier)
        self.counters.split_blocks["loaded"] += p.end - p.low
        self.counters.split_blocks["recomputed"] += p.low - p.start

    def cancel_load(self, p: PendingLoad) -> None:
        """The sequence is gone: stop loading; its blocks may be reused once the copies landed."""
        if p in self._pending_loads:
            self._pending_loads.remove(p)
        self._issue_copies()
        if self._loads_pending and self.load_stream is not None:
            torch.cuda.current_stream(self.pool.kv.device).wait_stream(self.load_stream)

    def _find_lower(
        self, h: bytes, parent: bytes, toks: tuple[int, ...], eligible: list[KVTier]
    ) -> tuple[CopySource, str] | None:
        """Where block `h` (child of `parent`, holding `toks`) can be copied from: a CPU-tier slot,
        or the tensor a lower tier read; None when no tier has it under that identity."""
        for tier in eligible:
            get_slot = getattr(tier, "get_slot", None)
            if get_slot is not None:
                found = get_slot(h)
                if found is not None and found[0] == parent and found[1] == toks:
                    return SlabSlot(tier.slab, found[2]), tier.name  # type: ignore[attr-defined]
                continue
            entry = tier.get(h)
            if entry is not None and entry.matches(parent, toks):
                return entry.tensor, tier.name
        return None

    def _copy_in(self, block: int, source: CopySource, tier_name: str) -> None:
        if self.load_stream is None:
            self.pool.kv[block].copy_(source.slab[source.slot] if isinstance(source, SlabSlot) else source)
        else:
            self._pending_copies.append((block, source))
        self.counters.transfers[(tier_name, GPU)] += self.pool.block_bytes

    def settle_loads(self) -> None:
        """Starts planned loads and orders all later compute-stream work after every queued load: for
        blocks no step will wait for (a match given back because its sequence could not be admitted)."""
        if self.layer_gate is not None:
            self.layer_gate.start()
        if self._loads_pending and self.load_stream is not None:
            torch.cuda.current_stream(self.pool.kv.device).wait_stream(self.load_stream)

    def _issue_admission_copies(self, issued_early: bool) -> None:
        """Starts a match's loads. From pinned memory with a layer gate: layer by layer, so that the
        step's attention waits for each layer alone (`LayerGate`). Otherwise whole blocks, and the
        compute stream waits for all of them. The host waits for neither. `issued_early`: some of the
        match's copies were issued already (whole blocks, during the walk)."""
        gate, copies = self.layer_gate, self._pending_copies
        if self.load_stream is None:
            self._issue_copies()
            return
        if not copies:
            if issued_early:
                torch.cuda.current_stream(self.pool.kv.device).wait_stream(self.load_stream)
            return
        # Copies issued during the walk sit before these on the same stream: each layer's flag, written
        # after the layer's copies, also follows every one of them.
        runs = copy_runs(copies) if gate is not None else []
        # Layer by layer, each run is one copy per layer. With too many queued (1,056 did, 65 did not,
        # on an H200) the driver blocks the host until the copy stream drains, and the forward pass
        # would start after the loads instead of beside them.
        sources = [src for _, _, src in runs]
        if (
            gate is not None and runs and len(runs) * self.pool.kv.shape[1] <= LAYERED_MAX_COPIES
            and all(src.is_contiguous() for src in sources) and _all_pinned(sources)
        ):  # fmt: skip
            gate.load(self.pool.kv, runs, self.load_stream)
            self.counters.load_copies += len(runs) * self.pool.kv.shape[1]
            copies.clear()
            self._loads_pending = True
            return
        self._issue_copies()
        torch.cuda.current_stream(self.pool.kv.device).wait_stream(self.load_stream)

    def _issue_copies(self, limit: int | None = None) -> None:
        """Starts the queued loads (the first `limit`) on the side stream in one go. From pinned CPU-tier
        slots they are asynchronous DMAs; the slots stay untouched until the stream is drained
        (_write_down)."""
        if not self._pending_copies:
            return
        kv = self.pool.kv
        issued = self._pending_copies[:limit]
        del self._pending_copies[:limit]
        runs = copy_runs(issued)
        with torch.cuda.stream(self.load_stream):
            for first, count, source in runs:
                kv[first : first + count].copy_(source, non_blocking=True)
        self.counters.load_copies += len(runs)
        self._loads_pending = True
        self._issued += 1

    # --- filling and movement ------------------------------------------------------------
    def register(self, block: int, ident: BlockIdentity) -> int:
        """Publishes a block whose K/V were just computed; returns the block the sequence should
        keep. When a concurrent request already published the same block, that one is shared and
        ours goes back to the pool. The shared (remote) tier gets every block at once whatever the
        policy: other replicas can only hit what was written there."""
        if not self.pool.register(block, ident):
            existing = self.pool.lookup(ident.hash, ident.parent, ident.token_ids)
            if existing is None or existing == block:
                return block
            self.pool.acquire(existing)
            self.pool.release(block)
            return existing
        if self.policy == "write_through":
            self._write_down(block, ident)
        elif self._shared_tiers:
            self._write_down(block, ident, only=self._shared_tiers)
        return block

    def _demote(self, block: int, ident: BlockIdentity) -> None:
        if self.policy == "write_back":
            self._write_down(block, ident)

    def _write_down(
        self, block: int, ident: BlockIdentity, everywhere: bool = False, only: list[KVTier] | None = None
    ) -> None:
        """write_back: into the first lower tier (the CPU tier demotes onwards when it evicts);
        write_through: into every lower tier. Disk and remote writes are queued, never awaited."""
        if not self.tiers:
            return
        self._issue_copies()  # queued loads read CPU-tier slots that this write may reuse
        if self.layer_gate is not None:
            self.layer_gate.start()  # and so do planned ones
        if self._loads_pending and self.load_stream is not None:
            self.load_stream.synchronize()  # a put may reuse a slot a pending load reads from
            self._loads_pending = False
        view = self.pool.kv[block]
        host_copy: torch.Tensor | None = None
        for tier in only or self.tiers:
            put_async = getattr(tier, "put_async", None)
            if put_async is None:
                # the CPU tier copies straight from the device into its pinned slot
                ok = tier.put(BlockEntry(ident.hash, ident.parent, ident.token_ids, view))
            else:
                # queued writers encode later: they get a copy of their own
                if host_copy is None:
                    host_copy = view.to("cpu", copy=True)
                ok = put_async(BlockEntry(ident.hash, ident.parent, ident.token_ids, host_copy))
            if ok:
                self.counters.transfers[(GPU, tier.name)] += self.pool.block_bytes
            if self.policy == "write_back" and not everywhere and only is None:
                break

    def evict_gpu(self) -> int:
        """Moves every unreferenced cached block out of the pool, demoting it as eviction would."""
        n = 0
        for block in list(self.pool.by_hash.values()):
            ident = self.pool.identity[block]
            if ident is not None and self.pool.ref_counts[block] == 0:
                self._demote(block, ident)
                n += self.pool.evict(ident.hash)
        return n

    def flush(self) -> int:
        """Graceful shutdown: every block held in the pool or the CPU tier goes to the persistent
        tiers (disk, remote), so the next start serves them. Returns how many were written."""
        if self.layer_gate is not None:
            self.layer_gate.start()
        if self._loads_pending and self.load_stream is not None:
            self.load_stream.synchronize()  # blocks read below may still be loading
            self._loads_pending = False
        durable = [t for t in self.tiers if hasattr(t, "put_async")]
        volatile = [t for t in self.tiers if not hasattr(t, "put_async")]
        n = 0
        for block_hash, block in list(self.pool.by_hash.items()):
            ident = self.pool.identity[block]
            missing = [t for t in durable if not t.contains(block_hash)]
            if ident is None or not missing:
                continue
            entry = BlockEntry(ident.hash, ident.parent, ident.token_ids, self.pool.kv[block].to("cpu", copy=True))
            for tier in missing:
                n += _put_reliably(tier, entry)
        for src in volatile:
            for block_hash in getattr(src, "hashes", list)():
                missing = [t for t in durable if not t.contains(block_hash)]
                entry = src.get(block_hash) if missing else None
                for tier in missing if entry is not None else []:
                    n += _put_reliably(tier, entry)
        for tier in durable:
            tier.flush()
        return n

    def close(self) -> None:
        for tier in self.tiers:
            close = getattr(tier, "close", None)
            if close is not None:
                close()

    # --- operator controls (admin API) ---------------------------------------------------
    def _chain(self, leaf: bytes) -> list[int]:
        """Pool blocks of the prefix ending at `leaf`, leaf first, as far as they are cached."""
        blocks = []
        h: bytes | None = leaf
        while h is not None and h in self.pool.by_hash:
            block = self.pool.by_hash[h]
            blocks.append(block)
            ident = self.pool.identity[block]
            h = ident.parent if ident is not None else None
        return blocks

    def entries(self, limit: int = 100) -> list[dict[str, object]]:
        """Cached prefixes in the pool (one per chain end), most recently used first."""
        idents = [i for i in self.pool.identity if i is not None]
        parents = {i.parent for i in idents}
        out = []
        for ident in idents:
            if ident.hash in parents:
                continue
            chain = self._chain(ident.hash)
            block = chain[0]
            out.append({
                "hash": ident.hash.hex(),
                "tokens": (ident.index + 1) * self.block_size,
                "cached_blocks": len(chain),
                "tier": GPU,
                "hits": max(self.pool.hits[b] for b in chain),
                "last_use": max(self.pool.last_use[b] for b in chain),
                "pinned_until": self.pins.get(ident.hash),
                "in_use": self.pool.ref_counts[block] > (1 if ident.hash in self.pins else 0),
            })  # fmt: skip
        out.sort(key=lambda e: e["last_use"], reverse=True)  # type: ignore[arg-type, return-value]
        return out[:limit]

    def pin(self, leaf: bytes, ttl_s: float) -> int:
        """Keeps the prefix ending at `leaf` in the pool until the TTL passes (refreshes a pin).
        Pinned blocks are also written to the durable tiers, so they survive a restart."""
        chain = self._chain(leaf)
        if not chain:
            return 0
        if leaf not in self.pins:
            for block in chain:
                self.pool.acquire(block)
            self._pinned_blocks[leaf] = chain
            for block in chain:
                ident = self.pool.identity[block]
                if ident is not None:
                    self._write_down(block, ident, everywhere=True)
        self.pins[leaf] = time.time() + ttl_s
        return len(chain)

    def unpin(self, leaf: bytes) -> int:
        self.pins.pop(leaf, None)
        chain = self._pinned_blocks.pop(leaf, [])
        for block in chain:
            self.pool.release(block)
        return len(chain)

    def expire_pins(self, now: float) -> None:
        for leaf, until in list(self.pins.items()):
            if until <= now:
                self.unpin(leaf)

    def evict(self, leaf: bytes | None = None) -> dict[str, int]:
        """Drops one prefix (its chain's pool blocks not used by a request, and the chain's
        copies in the lower tiers) or, with None, everything unused from every tier."""
        removed: Counter[str] = Counter()
        if leaf is None:
            for pinned in list(self.pins):
                self.unpin(pinned)
            removed[GPU] = self.pool.evict(None)
            for tier in self.tiers:
                for h in list(getattr(tier, "hashes", list)()):
                    removed[tier.name] += bool(tier.remove(h))
            return dict(removed)
        self.unpin(leaf)
        parents: dict[bytes, bytes] = {}
        for block in self._chain(leaf):
            ident = self.pool.identity[block]
            if ident is not None:
                parents[ident.hash] = ident.parent
                removed[GPU] += self.pool.evict(ident.hash)
        # The whole chain goes from the lower tiers too: a prefix whose leaf alone was dropped would
        # still be served, all but its last block, from the CPU or disk copies of its ancestors.
        for tier in self.tiers:
            h: bytes | None = leaf
            while h is not None:
                parent = parents.get(h)
                if parent is None:  # beyond what the pool held: the tier's entry names the parent
                    entry = tier.get(h) if tier.contains(h) else None
                    parent = entry.parent if entry is not None else None
                if tier.remove(h):
                    removed[tier.name] += 1
                elif h not in parents:
                    break
                h = parent
        return dict(removed)

    # --- reporting ----------------------------------------------------------------------
    def stats(self) -> dict[str, object]:
        tiers: dict[str, dict[str, int]] = {
            GPU: {
                # as for the other tiers, the bytes of what is cached; `active_bytes` is what running
                # requests hold now (their cached blocks and the ones they are still filling)
                "used_bytes": self.pool.num_cached * self.pool.block_bytes,
                "active_bytes": (self.pool.num_blocks - self.pool.num_free) * self.pool.block_bytes,
                "capacity_bytes": self.pool.num_blocks * self.pool.block_bytes,
                "evictions": self.pool.evictions,
                "entries": self.pool.num_cached,
            }
        }
        for tier in self.tiers:
            s = tier.stats
            tiers[tier.name] = {
                "used_bytes": tier.used_bytes,
                "capacity_bytes": tier.capacity_bytes,
                "entries": len(tier),  # type: ignore[arg-type]
                # every counter the tier keeps: hits, misses, corrupt drops, skipped writes, and
                # a remote tier's timeouts, errors and breaker openings
                **{k: v for k, v in dataclasses.asdict(s).items() if isinstance(v, int)},
            }
            state = getattr(tier, "breaker_state", None)
            if isinstance(state, str):
                tiers[tier.name]["breaker_state"] = state  # type: ignore[assignment]
        c = self.counters
        return {
            "prefix_cache": {
                "queries_tokens": c.queries_tokens,
                "hits_tokens": {name: c.hits_tokens.get(name, 0) for name in (GPU, "cpu", "disk", "remote")},
                "plans": {name: c.plans.get(name, 0) for name in ("load", "recompute", "split")},
                "split_blocks": {name: c.split_blocks.get(name, 0) for name in ("recomputed", "loaded")},
            },
            "tiers": tiers,
            "transfers": [{"src": s, "dst": d, "bytes": b} for (s, d), b in sorted(c.transfers.items())],
        }


class SlabSlot(NamedTuple):
    """A CPU-tier block as its slab and slot: no tensor is made per block, one view per run."""

    slab: torch.Tensor
    slot: int


CopySource = torch.Tensor | SlabSlot


def copy_runs(copies: list[tuple[int, CopySource]]) -> list[tuple[int, int, torch.Tensor]]:
    """(pool block, source block) copies as runs (first block, count, source of `count` blocks): a
    copy joins the run before it when its pool block and its source both follow on. CPU-tier slots
    filled in chain order sit next to each other in the slab, and so do the pool blocks allocated
    for them: a 32k-token prefix then moves in a few large DMAs instead of 2048 small ones."""
    runs: list[tuple[int, int, torch.Tensor]] = []
    i = 0
    while i < len(copies):
        first, source = copies[i]
        count = 1
        if isinstance(source, SlabSlot):
            while i + count < len(copies):
                block, nxt = copies[i + count]
                if not (block == first + count and isinstance(nxt, SlabSlot) and nxt.slab is source.slab
                        and nxt.slot == source.slot + count):  # fmt: skip
                    break
                count += 1
            runs.append((first, count, source.slab[source.slot : source.slot + count]))
            i += count
            continue
        if source.is_contiguous():
            storage, offset, numel = source.untyped_storage().data_ptr(), source.storage_offset(), source.numel()
            while i + count < len(copies):
                block, nxt = copies[i + count]
                if not (
                    block == first + count
                    and isinstance(nxt, torch.Tensor)
                    and nxt.is_contiguous()
                    and nxt.dtype == source.dtype
                    and nxt.shape == source.shape
                    and nxt.storage_offset() == offset + count * numel
                    and nxt.untyped_storage().data_ptr() == storage
                ):
                    break
                count += 1
        if count > 1:
            span = source.as_strided((count, *source.shape), (source.numel(), *source.stride()), source.storage_offset())
            runs.append((first, count, span))
        else:
            runs.append((first, 1, source.unsqueeze(0)))
        i += count
    return runs


def _all_pinned(sources: list[torch.Tensor]) -> bool:
    """Whether every source is in page-locked memory, asked once per storage (a CPU-tier slab is one)."""
    pinned: dict[int, bool] = {}
    for src in sources:
        key = src.untyped_storage().data_ptr()
        if key not in pinned:
            pinned[key] = src.is_pinned()
        if not pinned[key]:
            return False
    return True


def _put_reliably(tier: KVTier, entry: BlockEntry) -> bool:
    """Queued (batched commits) when the queue has room, else after draining it, else synchronous."""
    put_async = getattr(tier, "put_async", None)
    if put_async is not None:
        if put_async(entry):
            return True
        tier.flush()  # type: ignore[attr-defined]
        if put_async(entry):
            return True
    return tier.put(entry)


def build_lower_tiers(
    settings: Settings, namespace_digest: bytes, block_shape: tuple[int, ...], dtype: torch.dtype
) -> list[KVTier]:
    """The tiers below the pool that the settings ask for, fastest first."""
    tiers: list[KVTier] = []
    disk = DiskTier.from_settings(settings, namespace_digest) if settings.disk_cache_enabled else None
    if settings.cpu_cache_bytes > 0:
        on_evict = None if disk is None or settings.cache_policy == "write_through" else disk.put_async
        tiers.append(CpuTier(block_shape, dtype, settings.cpu_cache_bytes, on_evict=on_evict))
    if disk is not None:
        tiers.append(disk)
    if settings.redis_url:
        from cacheproxy.cache.redis_tier import RedisTier  # redis-py is the optional [redis] extra

        tiers.append(RedisTier.from_settings(settings, namespace_digest))
    return tiers
