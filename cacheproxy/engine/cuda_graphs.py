"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step of a small model is launch-bound: dozens of kernels per layer, each a few
microseconds of GPU work. A captured graph replays them with one launch. Inputs go through static
buffers; a batch is padded up to its bucket with rows that write nowhere (slot -1) and attend to
one token of block 0, and whose outputs are dropped.
"""

from __future__ import annotations

import torch

from cacheproxy.engine.model import CausalLM
from cacheproxy.engine.step_context import StepContext, set_context


def bucket_sizes(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8, *range(16, max_batch + 16, 16)]
    return sorted({min(s, max_batch) for s in sizes})


class DecodeGraphs:
    def __init__(self, model: CausalLM, max_batch: int, max_blocks_per_seq: int, hidden_size: int) -> None:
        self.model = model
        dev = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        self.buckets = bucket_sizes(max_batch)
        self.max_batch = self.buckets[-1]
        self.max_blocks = max_blocks_per_seq
        n = self.max_batch
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.block_tables = torch.zeros((n, max_blocks_per_seq), dtype=torch.int32, device=dev)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.hidden = torch.zeros((n, hidden_size), dtype=dtype, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._capture()

    def _forward(self, b: int) -> None:
        ctx = StepContext(
            is_prefill=False,
            slot_mapping=self.slot_mapping[:b],
            block_tables=self.block_tables[:b],
            context_lens=self.context_lens[:b],
        )
        set_context(ctx)
        try:
            self.hidden[:b] = self.model(self.input_ids[:b], self.positions[:b])
        finally:
            set_context(None)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for b in reversed(self.buckets):  # largest first: the smaller ones reuse its memory
            self._forward(b)  # warm-up: compiles kernels outside the capture
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self._forward(b)
            pool = g.pool()
            self.graphs[b] = g
        torch.cuda.synchronize()

    def fits(self, batch: int, max_blocks: int) -> bool:
        return batch <= self.max_batch and max_blocks <= self.max_blocks

    @torch.inference_mode()
    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
    ) -> torch.Tensor:
        b = input_ids.shape[0]
        bucket = next(s for s in self.buckets if s >= b)
        self.input_ids[:b].copy_(input_ids, non_blocking=True)
        self.positions[:b].copy_(positions, non_blocking=True)
        self.slot_mapping[:b].copy_(slot_mapping, non_blocking=True)
        self.slot_mapping[b:bucket].fill_(-1)
        self.block_tables[:b, : block_tables.shape[1]].copy_(block_tables, non_blocking=True)
        self.context_lens[:b].copy_(context_lens, non_blocking=True)
        self.context_lens[b:bucket].fill_(1)
        self.graphs[bucket].replay()
        return self.hidden[:b]
