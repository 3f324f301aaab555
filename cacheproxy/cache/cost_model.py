"""Is loading a block from a tier faster than recomputing it? Measured at start-up, not assumed.

Recompute cost: the engine's own prefill speed on this device (tokens/s). Load cost per block: a
tier's measured read time for one block (its latency and bandwidth together) plus the copy into the
pool. A tier whose blocks take longer to load than to recompute is skipped by `TieredStore.match`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cacheproxy.cache.block_entry import BlockEntry
from cacheproxy.cache.tier import KVTier


@dataclass
class CostModel:
    block_size: int
    block_bytes: int
    prefill_tokens_per_s: float
    load_s_per_block: dict[str, float] = field(default_factory=dict)

    @property
    def recompute_s_per_block(self) -> float:
        return self.block_size / self.prefill_tokens_per_s

    def worth_loading(self) -> dict[str, bool]:
        return {name: t < self.recompute_s_per_block for name, t in self.load_s_per_block.items()}

    def as_dict(self) -> dict[str, object]:
        return {
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 1),
            "recompute_us_per_block": round(self.recompute_s_per_block * 1e6, 2),
            "load_us_per_block": {k: round(v * 1e6, 2) for k, v in self.load_s_per_block.items()},
            "worth_loading": self.worth_loading(),
        }


def _best_of(fn: Callable[[], object], repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_load_times(tiers: list[KVTier], pool_block: torch.Tensor, sync: Callable[[], None]) -> dict[str, float]:
    """Seconds to fetch one block from each tier and copy it into `pool_block` (a scratch block)."""
    out: dict[str, float] = {}
    probe_tensor = torch.randn(pool_block.shape, dtype=torch.float32).to(pool_block.dtype)
    for tier in tiers:
        probe = BlockEntry(os.urandom(16), os.urandom(16), tuple(range(pool_block.shape[2])), probe_tensor)
        try:
            if not tier.put(probe):
                continue

            def load(tier: KVTier = tier, probe: BlockEntry = probe) -> None:
                # the same path TieredStore.match takes: a view where the tier offers one
                get_view = getattr(tier, "get_view", None)
                entry = get_view(probe.hash) if get_view is not None else tier.get(probe.hash)
                if entry is None:
                    raise RuntimeError("probe entry vanished")
                pool_block.copy_(entry.tensor, non_blocking=True)
                sync()

            out[tier.name] = _best_of(load)
        except Exception:  # a tier that cannot even serve a probe is never worth loading from
            out[tier.name] = float("inf")
        finally:
            tier.remove(probe.hash)
    return out
