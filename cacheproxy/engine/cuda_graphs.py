"""Steps replayed from CUDA graphs: decode per batch-size bucket, and a single sequence's short
prefill (the suffix after a cached prefix) per token-count bucket.

Such steps are launch-bound: dozens of kernels per layer, each a few microseconds of GPU work. A
captured graph replays them with one launch. Inputs go through static buffers; a step is padded up
to its bucket with tokens that write nowhere (slot -1) and whose outputs are dropped. The attention
kernels read lengths from device tensors, so one graph serves any context length.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cacheproxy.cache.cuda_driver import CudaDriver, CudaDriverError
from cacheproxy.engine.layer_gate import LayerGate
from cacheproxy.engine.model import CausalLM
from cacheproxy.engine.step_context import StepContext, StepInputs, set_context
from cacheproxy.log import get_logger

log = get_logger(__name__)


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
        # The static inputs are views of one device buffer, filled from a pinned twin by one copy per
        # step: one copy instead of a dozen uploads, copies and fills (~0.1-0.2 ms of host time a step
        # on an H200's host). The block tables come last, so a step copies only the rows it uses.
        layout: Layout = [
            ("input_ids", torch.long, (n,)), ("positions", torch.long, (n,)), ("slot_mapping", torch.long, (n,)),
            ("context_lens", torch.int32, (n,)), ("cu_seqlens", torch.int32, (2,)), ("cached_lens", torch.int32, (1,)),
            ("block_tables", torch.int32, (self.max_batch, max_blocks_per_seq)),
        ]  # fmt: skip
        nbytes = _layout_bytes(layout)
        self._inputs = torch.zeros(nbytes, dtype=torch.uint8, device=dev)
        inputs = _carve(self._inputs, layout)
        self.input_ids, self.positions = inputs["input_ids"], inputs["positions"]
        self.slot_mapping, self.context_lens = inputs["slot_mapping"], inputs["context_lens"]
        self.cu_seqlens, self.cached_lens = inputs["cu_seqlens"], inputs["cached_lens"]
        self.block_tables = inputs["block_tables"]
        self._tables_offset = self.block_tables.data_ptr() - self._inputs.data_ptr()
        self._row_bytes = max_blocks_per_seq * 4
        # Two pinned twins, used in turn: a step writes one while the copy of the step before may still
        # be queued behind that step's work (steps that sample nothing do not wait for the device).
        self._staging = [torch.zeros(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self._host = [{k: v.numpy() for k, v in _carve(b, layout).items()} for b in self._staging]
        self._copied = [torch.cuda.Event(), torch.cuda.Event()]
        self._turn = 0
        for host in self._host:
            host["slot_mapping"][:] = -1
            host["context_lens"][:] = 1
            host["cu_seqlens"][:] = (0, 1)
        self._inputs.copy_(self._staging[0])
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
            try:
                driver.bind(stream.device)
                for g in [*self.prefill_graphs.values(), *self.graphs.values()]:
                    driver.upload_graph(raw_exec(g), stream.cuda_stream)
            except CudaDriverError as exc:  # only the first replays get slower: not worth failing the start
                log.warning("cuda_graph_upload_failed", error=str(exc))
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

    def _stage(self) -> dict[str, np.ndarray]:
        """The pinned twin this step writes, once the copy that last read it has run."""
        self._turn ^= 1
        self._copied[self._turn].synchronize()
        return self._host[self._turn]

    def _upload(self, rows: int) -> None:
        """The staged inputs to the device, the block tables' first `rows` rows with them."""
        nbytes = self._tables_offset + rows * self._row_bytes
        self._inputs[:nbytes].copy_(self._staging[self._turn][:nbytes], non_blocking=True)
        self._copied[self._turn].record()

    @torch.inference_mode()
    def run_prefill(self, step: StepInputs) -> torch.Tensor:
        t = len(step.input_ids)
        bucket = next(s for s in self.prefill_buckets if s >= t)
        host = self._stage()
        host["input_ids"][:t] = step.input_ids
        host["positions"][:t] = step.positions
        host["positions"][t:bucket] = 0
        host["slot_mapping"][:t] = step.slot_mapping
        host["slot_mapping"][t:bucket] = -1
        host["block_tables"][0, : step.block_tables.shape[1]] = step.block_tables[0]
        host["cu_seqlens"][1] = t
        host["cached_lens"][0] = step.starts[0]
        self._upload(1)
        # The first layers' loads, the graph, then the other layers': the graph need not wait on the
        # host for all of them to be issued, only for what its first layer reads.
        self._start_loads(LOAD_LAYERS_BEFORE_LAUNCH)
        self.prefill_graphs[bucket].replay()
        self._start_loads()
        return self.hidden[:t]

    @torch.inference_mode()
    def run(self, step: StepInputs) -> torch.Tensor:
        b = len(step.input_ids)
        bucket = next(s for s in self.buckets if s >= b)
        host = self._stage()
        host["input_ids"][:b] = step.input_ids
        host["positions"][:b] = step.positions
        host["slot_mapping"][:b] = step.slot_mapping
        host["slot_mapping"][b:bucket] = -1
        host["block_tables"][:b, : step.block_tables.shape[1]] = step.block_tables
        host["context_lens"][:b] = step.starts + 1
        host["context_lens"][b:bucket] = 1
        self._upload(b)
        self._start_loads()
        self.graphs[bucket].replay()
        return self.hidden[:b]


Layout = list[tuple[str, torch.dtype, tuple[int, ...]]]


def _spans(layout: Layout) -> list[tuple[int, int]]:
    """(offset, bytes) of each entry of `layout`, each starting 16-byte aligned."""
    spans, offset = [], 0
    for _, dtype, shape in layout:
        size = math.prod(shape) * dtype.itemsize
        spans.append((offset, size))
        offset += -(-size // 16) * 16
    return spans


def _layout_bytes(layout: Layout) -> int:
    offset, size = _spans(layout)[-1]
    return offset + size


def _carve(buffer: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """Views of the byte tensor `buffer`, one per (name, dtype, shape) of `layout`."""
    return {
        name: buffer[offset : offset + size].view(dtype).view(shape)
        for (name, dtype, shape), (offset, size) in zip(layout, _spans(layout), strict=True)
    }
