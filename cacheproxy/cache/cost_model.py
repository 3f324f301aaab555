"""Load or recompute? Measured at start-up, not assumed, and decided per request.

Recompute cost: the engine's own prefill time on this device, fitted as `fixed + per_token x tokens`
from two measured prefills (the fixed part is the weight read a forward pass pays whatever its
length). Load cost per block: a tier's measured read time for one block (latency and bandwidth
together) plus the copy into the pool.

`plan` splits the part of a prefix that lives below the GPU: the first blocks are recomputed while
the later ones load (meet in the middle), both at once, so a prefix is never slower to serve than to
recompute, and a slow tier still contributes what it can load in the time the recompute takes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from cacheproxy.cache.block_entry import BlockEntry
from cacheproxy.cache.tier import KVTier

# A split plan must beat the better of loading and recomputing everything by this factor.
SPLIT_MARGIN = 0.8
# ... and what it risks if the loads fall behind must stay under this share of the recompute.
SPLIT_MAX_REGRET = 0.05


class LoadPlan(NamedTuple):
    """Of the lower-tier blocks of a prefix: the first `recompute` are computed again while the
    last `load` are fetched from their tiers."""

    recompute: int
    load: int


@dataclass
class CostModel:
    block_size: int
    block_bytes: int
    prefill_tokens_per_s: float  # at the measured long prefill, fixed part included
    load_s_per_block: dict[str, float] = field(default_factory=dict)
    prefill_fixed_s: float = 0.0  # intercept of the line through the two long prefills
    prefill_min_s: float = 0.0  # a pass of one block: every pass reads all the weights at least once

    @property
    def per_token_s(self) -> float:
        return 1.0 / self.prefill_tokens_per_s

    @property
    def recompute_s_per_block(self) -> float:
        return self.block_size / self.prefill_tokens_per_s

    def prefill_s(self, num_tokens: int) -> float:
        """Estimated time of a prefill of `num_tokens` new tokens (0 for none)."""
        if num_tokens <= 0:
            return 0.0
        return max(self.prefill_min_s, self.prefill_fixed_s + num_tokens * self.per_token_s)

    def worth_loading(self) -> dict[str, bool]:
        """Per tier, whether one block loads faster than it recomputes (reported; `plan` decides)."""
        return {name: t < self.recompute_s_per_block for name, t in self.load_s_per_block.items()}

    def plan(self, tiers: Sequence[str], tail_tokens: int, split: bool = True) -> LoadPlan:
        """`tiers`: the tier each lower-tier block of the prefix would load from, in chain order.
        `tail_tokens`: tokens after the prefix, computed in any case. `split`: whether loads can run
        while the device computes (not on a CPU, where a forward pass holds the engine thread).

        Candidates: load everything (then compute the tail), recompute everything (with the tail, in
        one pass), or recompute the first blocks while the rest load, then compute the tail.
        """
        n = len(tiers)
        if n == 0:
            return LoadPlan(0, 0)
        bs = self.block_size
        cost = [self.load_s_per_block.get(t, float("inf")) for t in tiers]
        # suffix[k]: time to load blocks k..n-1 (the host reads them one after another)
        suffix = [0.0] * (n + 1)
        for i in range(n - 1, -1, -1):
            suffix[i] = suffix[i + 1] + cost[i]
        tail = self.prefill_s(tail_tokens)
        best = (suffix[0] + tail, LoadPlan(0, n))
        recompute_all = self.prefill_s(n * bs + tail_tokens)
        if recompute_all < best[0]:
            best = (recompute_all, LoadPlan(n, 0))
        best_split = (float("inf"), LoadPlan(0, n))
        # If the loads turn out slower than measured, a split costs its extra passes (recompute, rest,
        # tail: two more than one) and one block read over recomputing everything; that regret must be
        # small next to the recompute, or the prefix is too short to split.
        regret = 2 * self.prefill_min_s + max(cost)
        if not split or regret > SPLIT_MAX_REGRET * recompute_all:
            return best[1]
        for k in range(1, n):
            t = max(self.prefill_s(k * bs), suffix[k]) + tail
            if t < best_split[0]:
                best_split = (t, LoadPlan(k, n - k))
        # Splitting runs two passes and relies on both estimates; it has to win clearly.
        return best_split[1] if best_split[0] < SPLIT_MARGIN * best[0] else best[1]

    def as_dict(self) -> dict[str, object]:
        return {
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 1),
            "prefill_fixed_us": round(self.prefill_fixed_s * 1e6, 2),
            "prefill_min_us": round(self.prefill_min_s * 1e6, 2),
            "recompute_us_per_block": round(self.recompute_s_per_block * 1e6, 2),
            "load_us_per_block": {k: round(v * 1e6, 2) for k, v in self.load_s_per_block.items()},
            "worth_loading": self.worth_loading(),
        }


def fit_prefill(short: tuple[int, float], long: tuple[int, float]) -> tuple[float, float]:
    """(fixed seconds, tokens per second) of a line through two measured (tokens, seconds) prefills."""
    (n0, t0), (n1, t1) = short, long
    per_token = max((t1 - t0) / max(n1 - n0, 1), 1e-12)
    fixed = max(t0 - n0 * per_token, 0.0)
    return fixed, 1.0 / per_token


def _best_of(fn: Callable[[], object], repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_load_times(
    tiers: list[KVTier], pool_block: torch.Tensor, sync: Callable[[], None], blocks: int = 8
) -> dict[str, float]:
    """Seconds per block to fetch `blocks` blocks from each tier one after another and copy them
    into `pool_block` (a scratch block), waiting once at the end: the way a prefix loads, where a
    pinned tier's copies overlap the host's next reads."""
    out: dict[str, float] = {}
    probe_tensor = torch.randn(pool_block.shape, dtype=torch.float32).to(pool_block.dtype)
    tokens = tuple(range(pool_block.shape[2]))
    for tier in tiers:
        probes: list[BlockEntry] = []
        try:
            for _ in range(blocks):  # as many as the tier takes (a small CPU tier may hold only a few)
                probe = BlockEntry(os.urandom(16), os.urandom(16), tokens, probe_tensor)
                if not tier.put(probe):
                    break
                probes.append(probe)
            if not probes:
                continue
            get_view = getattr(tier, "get_view", None)  # the path TieredStore takes: a view where offered
            # A tier on a file is timed with its pages out of the OS cache: the first prefix after a
            # restart reads from the device, and an optimistic figure would split plans that lose.
            # Loads then keep the figure current (TieredStore._observe_load).
            drop_cache = getattr(tier, "drop_page_cache", None) or (lambda: None)

            def load(tier: KVTier = tier, probes: list[BlockEntry] = probes, get_view=get_view, drop_cache=drop_cache) -> None:  # type: ignore[no-untyped-def]
                drop_cache()
                for probe in probes:
                    entry = get_view(probe.hash) if get_view is not None else tier.get(probe.hash)
                    if entry is None:
                        raise RuntimeError("probe entry vanished")
                    pool_block.copy_(entry.tensor, non_blocking=True)
                sync()

            out[tier.name] = _best_of(load, repeats=3) / len(probes)
        except Exception:  # a tier that cannot even serve a probe is never worth loading from
            out[tier.name] = float("inf")
        finally:
            for p in probes:
                tier.remove(p.hash)
    return out
