"""Per-step attention metadata, set by the runner once and read by every attention layer.

One object per forward pass instead of threading a dozen tensors through every module call.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from cacheproxy.engine.layer_gate import LayerGate


@dataclass(slots=True)
class StepContext:
    is_prefill: bool
    slot_mapping: torch.Tensor  # [T] int64: where each new token's K/V goes in the pool
    block_tables: torch.Tensor  # [B, max_blocks] int32
    # prefill only
    cu_seqlens_q: torch.Tensor | None = None  # [B+1] int32
    cached_lens: torch.Tensor | None = None  # [B] int32: tokens already in the pool before this step
    # Host-side bounds for the attention kernels' launch shape (eager steps; None in a CUDA graph,
    # which is replayed for other lengths): most new tokens, most cached tokens of any sequence.
    max_query_len: int | None = None
    max_cached_len: int | None = None
    # Set while a prefix's K/V still load layer by layer: each layer's attention waits for its own.
    layer_gate: LayerGate | None = None
    # decode only
    context_lens: torch.Tensor | None = None  # [B] int32: including the token of this step


@dataclass(slots=True)
class StepInputs:
    """A step's inputs on the host, before they go to the device: through one staging copy for a step
    replayed from a CUDA graph, as tensors of a `StepContext` for an eager one."""

    is_prefill: bool
    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    block_tables: np.ndarray  # [B, max blocks of the step] int32
    starts: np.ndarray  # [B] int32: tokens of each sequence already in the pool
    cu_seqlens: np.ndarray  # [B+1] int32
    sample_idx: list[int]  # rows of the step's output whose logits pick a token


# Per thread: each engine steps on its own thread, and several engines may share a process.
_local = threading.local()


def set_context(ctx: StepContext | None) -> None:
    _local.ctx = ctx


def get_context() -> StepContext:
    ctx = getattr(_local, "ctx", None)
    if ctx is None:
        raise RuntimeError("attention called outside of an engine step")
    return ctx
