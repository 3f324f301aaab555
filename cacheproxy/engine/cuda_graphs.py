"""Steps replayed from CUDA graphs: decode per batch-size bucket, and a single sequence's short
prefill (the suffix after a cached prefix) per token-count bucket.

Such steps are launch-bound: dozens of kernels per layer, each a few microseconds of GPU work. A
captured graph replays them with one launch. Inputs go through static buffers; a step is padded up
to its bucket with tokens that write nowhere (slot -1) and whose outputs are dropped. The attention
kernels read lengths from device tensors, so one graph serves any context length.
"""

from __future__ import annotations

import torch

from cacheproxy.cache.cuda_driver import CudaDriver
from cacheproxy.engine.layer_gate import LayerGate
from cacheproxy.engine.model import CausalLM
from cacheproxy.engine.step_context import StepContext, set_context


def bucket_sizes(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8, *range(16, max_batch + 16, 16)]
    return sorted({min(s, max_batch) for s in sizes})


# Up to 2048 tokens: an eager forward pass costs ~20 ms of Python launches on a 32-layer model, as much
# as the device time of a 1k-token prefill; steps between buckets pad by at most half.
PREFILL_BUCKETS = [16, 32, 64, 128, 256, 512, 768, 1024, 1536, 2048]
# Layers of a prefix's planned loads issued before a prefill graph launches, the rest right after.
LOAD_LAYERS_BEFORE_LAUNCH = 2


class StepGraphs:
    def __init__(
        self,
        model: CausalLM,
        max_batch: int,
        max_blocks_per_seq: int,
        hidden_size: int,
        max_prefill: int,
        layer_gate: LayerGate | None = None,
    ) -> None:
        self.model = model
        # Prefill graphs hold a layer-gate wait before each attention (a no-op while nothing loads).
        self.layer_gate = layer_gate
        dev = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        self.buckets = bucket_sizes(max_batch)
        self.max_batch = self.buckets[-1]
        self.prefill_buckets = [b for b in PREFILL_BUCKETS if b <= max_prefill]
        self.max_blocks = max_blocks_per_seq
        n = max(self.max_batch, *self.prefill_buckets)
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.block_tables = torch.zeros((n, max_blocks_per_seq), dtype=torch.int32, device=dev)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.cu_seqlens = torch.zeros(2, dtype=torch.int32, device=dev)
        self.cached_lens = torch.zeros(1, dtype=torch.int32, device=dev)
        self.hidden = torch.zeros((n, hidden_size), dtype=dtype, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.prefill_graphs: dict[int, torch.cuda.CUDAGraph] = {}
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

    def _prefill_forward(self, t: int) -> None:
        ctx = StepContext(
            is_prefill=True,
            slot_mapping=self.slot_mapping[:t],
            block_tables=self.block_tables[:1],
            cu_seqlens_q=self.cu_seqlens,
            cached_lens=self.cached_lens,
            layer_gate=self.layer_gate,
        )
        set_context(ctx)
        try:
            self.hidden[:t] = self.model(self.input_ids[:t], self.positions[:t])
        finally:
            set_context(None)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        self.cu_seqlens.copy_(torch.tensor([0, 1], dtype=torch.int32))
        captures = [(self.prefill_graphs, t, self._prefill_forward) for t in reversed(self.prefill_buckets)]
        captures += [(self.graphs, b, self._forward) for b in reversed(self.buckets)]
        for graphs, size, forward in captures:  # largest first: the smaller ones reuse its memory
            forward(size)  # warm-up: compiles kernels outside the capture
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                forward(size)
            pool = g.pool()
            graphs[size] = g
        # The first launch of a graph uploads it to the device (~0.75 ms of a 2k-token prefix hit's
        # time on an H200, for its ~450 nodes): done here instead, once per graph.
        driver = CudaDriver.get()
        raw_exec = getattr(torch.cuda.CUDAGraph, "raw_cuda_graph_exec", None)  # torch >= 2.7
        if driver is not None and raw_exec is not None:
            stream = torch.cuda.current_stream()
            driver.bind(stream.device)
            for g in [*self.prefill_graphs.values(), *self.graphs.values()]:
                driver.upload_graph(raw_exec(g), stream.cuda_stream)
        torch.cuda.synchronize()

    def fits(self, batch: int, max_blocks: int) -> bool:
        return batch <= self.max_batch and max_blocks <= self.max_blocks

    def fits_prefill(self, num_seqs: int, num_tokens: int, max_blocks: int) -> bool:
        return (
            num_seqs == 1 and bool(self.prefill_buckets) and num_tokens <= self.prefill_buckets[-1]
            and max_blocks <= self.max_blocks
        )  # fmt: skip

    def _start_loads(self, layers: int | None = None) -> None:
        """Planned prefix loads go out after this step's input copies, which would queue behind them."""
        if self.layer_gate is not None:
            self.layer_gate.start(layers)

    @torch.inference_mode()
    def run_prefill(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        cached_lens: torch.Tensor,
    ) -> torch.Tensor:
        t = input_ids.shape[0]
        bucket = next(s for s in self.prefill_buckets if s >= t)
        self.input_ids[:t].copy_(input_ids, non_blocking=True)
        self.positions[:t].copy_(positions, non_blocking=True)
        self.positions[t:bucket].fill_(0)
        self.slot_mapping[:t].copy_(slot_mapping, non_blocking=True)
        self.slot_mapping[t:bucket].fill_(-1)
        self.block_tables[:1, : block_tables.shape[1]].copy_(block_tables, non_blocking=True)
        self.cu_seqlens[1].fill_(t)
        self.cached_lens.copy_(cached_lens, non_blocking=True)
        # The first layers' loads, the graph, then the other layers': the graph need not wait on the
        # host for all of them to be issued, only for what its first layer reads.
        self._start_loads(LOAD_LAYERS_BEFORE_LAUNCH)
        self.prefill_graphs[bucket].replay()
        self._start_loads()
        return self.hidden[:t]

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
        self._start_loads()
        self.graphs[bucket].replay()
        return self.hidden[:b]
