"""Runs one scheduled step on the model: packs the chunks, sets the step context, samples."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

import kernels
from cacheproxy.engine.cuda_graphs import StepGraphs
from cacheproxy.engine.grammar import apply_masks
from cacheproxy.engine.layer_gate import LayerGate
from cacheproxy.engine.model import CausalLM
from cacheproxy.engine.penalties import adjust_logits
from cacheproxy.engine.sampler import sample
from cacheproxy.engine.scheduler import ScheduledStep
from cacheproxy.engine.step_context import StepContext, StepInputs, set_context


@dataclass(slots=True)
class StepResult:
    # One entry per chunk of the step: the sampled token, or None when the chunk did not sample.
    tokens: list[int | None]
    # Per sampled chunk: (chosen logprob, top-k [(id, logprob)]) when the request asked for logprobs.
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


@dataclass(slots=True)
class LaunchedStep:
    step: ScheduledStep
    logits: torch.Tensor | None  # [sampling chunks, vocab] float32, possibly still being computed


class ModelRunner:
    def __init__(self, model: CausalLM, kv: torch.Tensor, layer_gate: LayerGate | None = None) -> None:
        self.model = model
        self.layer_gate = layer_gate
        self.kv = kv
        self.device = kv.device
        self.block_size = kv.shape[3]
        model.bind_kv_pool(kv)
        self.graphs: StepGraphs | None = None

    def compile_kernels(self) -> None:
        """The attention variants an eager step may pick, compiled now rather than inside a request."""
        cfg = self.model.config
        kernels.warm_up(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, self.block_size,
                        self.kv.dtype, self.device)  # fmt: skip

    def capture_graphs(self, max_batch: int, max_model_len: int, max_prefill_tokens: int) -> None:
        max_blocks = -(-max_model_len // self.block_size)
        self.graphs = StepGraphs(
            self.model, max_batch, max_blocks, self.model.config.hidden_size, max_prefill_tokens, self.layer_gate
        )

    def _host_inputs(self, step: ScheduledStep) -> StepInputs:
        bs = self.block_size
        ids: list[int] = []
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        sample_idx: list[int] = []
        cu = [0]
        max_blocks = max(len(c.seq.block_table) for c in step.chunks)
        tables = np.zeros((len(step.chunks), max_blocks), dtype=np.int32)
        for i, c in enumerate(step.chunks):
            seq = c.seq
            ids.extend(seq.token_ids(c.start, c.start + c.length))
            pos = np.arange(c.start, c.start + c.length, dtype=np.int64)
            table = seq.block_table_array()
            tables[i, : len(table)] = table
            positions.append(pos)
            slots.append(table[pos // bs].astype(np.int64) * bs + pos % bs)
            cu.append(cu[-1] + c.length)
            if c.samples:
                sample_idx.append(cu[-1] - 1)
        return StepInputs(
            is_prefill=not step.is_decode_only,
            input_ids=np.asarray(ids, dtype=np.int64),
            positions=np.concatenate(positions),
            slot_mapping=np.concatenate(slots),
            block_tables=tables,
            starts=np.asarray([c.start for c in step.chunks], dtype=np.int32),
            cu_seqlens=np.asarray(cu, dtype=np.int32),
            sample_idx=sample_idx,
        )

    def _to_device(self, host: StepInputs) -> tuple[torch.Tensor, torch.Tensor, StepContext]:
        """The inputs of an eager step, as tensors on the device."""
        dev = self.device

        def up(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(array).to(dev, non_blocking=True)

        ctx = StepContext(
            is_prefill=host.is_prefill, slot_mapping=up(host.slot_mapping), block_tables=up(host.block_tables)
        )
        if host.is_prefill:
            ctx.cu_seqlens_q = up(host.cu_seqlens)
            ctx.cached_lens = up(host.starts)
            ctx.max_query_len = int(np.diff(host.cu_seqlens).max())
            ctx.max_cached_len = int(host.starts.max())
        else:
            ctx.context_lens = up(host.starts + 1)
        return up(host.input_ids), up(host.positions), ctx

    def _forward(self, step: ScheduledStep) -> tuple[torch.Tensor, list[int]]:
        host = self._host_inputs(step)
        gate = self.layer_gate
        # Loads queued at admission: this step's attention waits for them layer by layer (the prefill
        # graphs always hold the waits; an eager step only when armed). The streams keep the order.
        waits = host.is_prefill and gate is not None and gate.armed
        if waits:
            assert gate is not None
            gate.armed = False
        graphs = self.graphs
        seqs, width = host.block_tables.shape
        if graphs is not None and not host.is_prefill and graphs.fits(seqs, width):
            return graphs.run(host), host.sample_idx
        if graphs is not None and host.is_prefill and graphs.fits_prefill(seqs, len(host.input_ids), width):
            return graphs.run_prefill(host), host.sample_idx
        input_ids, positions, ctx = self._to_device(host)
        if waits:
            ctx.layer_gate = gate
        if gate is not None:
            gate.start()  # after the step's input copies, which would queue behind the loads
        set_context(ctx)
        try:
            return self.model(input_ids, positions), host.sample_idx
        finally:
            set_context(None)

    @torch.inference_mode()
    def logits(self, step: ScheduledStep) -> torch.Tensor:
        """Logits of every token of the step, [T, vocab] float32 (prompt scoring, tests)."""
        hidden, _ = self._forward(step)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def launch(self, step: ScheduledStep) -> LaunchedStep:
        """Queues the step's forward pass and logits on the device; returns without waiting."""
        hidden, sample_idx = self._forward(step)
        if not sample_idx:
            return LaunchedStep(step, None)
        first, n = sample_idx[0], len(sample_idx)
        if sample_idx == list(range(first, first + n)):  # one sequence, or a decode batch: a view, no upload
            picked = hidden[first : first + n]
        else:
            picked = hidden[torch.tensor(sample_idx, dtype=torch.long).to(hidden.device, non_blocking=True)]
        return LaunchedStep(step, self.model.compute_logits(picked))

    @torch.inference_mode()
    def collect(self, launched: LaunchedStep) -> StepResult:
        """Samples from a launched step's logits (waits for the device)."""
        step, logits = launched.step, launched.logits
        if logits is None:
            return StepResult([None] * len(step.chunks), [])
        sampling = [c for c in step.chunks if c.samples]
        params = [c.seq.params for c in sampling]
        adjust_logits(logits, [c.seq for c in sampling])
        structured = [(i, c.seq.matcher) for i, c in enumerate(sampling) if c.seq.matcher is not None]
        if structured:
            apply_masks(logits, [i for i, _ in structured], [m for _, m in structured])
        tokens, logprobs = sample(logits, params, [c.seq.generator for c in sampling])
        lp_out: list[tuple[float, list[tuple[int, float]]] | None] = []
        for i, c in enumerate(sampling):
            k = c.seq.params.logprobs
            if k is None or logprobs is None:
                lp_out.append(None)
                continue
            row = logprobs[i]
            top = torch.topk(row, k) if k > 0 else None
            top_list = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else []
            lp_out.append((float(row[tokens[i]].item()), top_list))
        it = iter(tokens)
        return StepResult([next(it) if c.samples else None for c in step.chunks], lp_out)

    def run(self, step: ScheduledStep) -> StepResult:
        return self.collect(self.launch(step))
