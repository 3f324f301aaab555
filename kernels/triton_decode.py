"""Paged decode attention in Triton: one query token per sequence, split-K with a log-sum-exp merge.

One program owns (sequence, KV head, split): it loads the query heads that share the KV head as
the rows of one tile (GQA), walks its slice of the context through the block table, and keeps an
online softmax. With one split it writes the output directly; with several it writes each split's
normalized output and log2-sum-exp, and a second kernel merges them.

Callers validate arguments first (`kernels.triton_ops`); these launchers trust what they get.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# The split plan's constants come from a sweep on an H200 (BENCHMARKS.md, "## Kernels"): with 4
# programs per SM a batch of 8 ran ~2.2 waves and lost a quarter of its time to the last one; 8 per
# SM fixed that; past 64 splits a batch of 1 at 32k got slower (shorter splits, more merge input).
MAX_SPLITS = 64
# A split below this many tiles spends more on its prologue and merge entry than on the KV it reads.
MIN_TILES_PER_SPLIT = 2
# Programs wanted per multiprocessor so that enough loads are in flight to saturate HBM.
PROGRAMS_PER_SM = 8
# The interpreter has no multiprocessors; a small stand-in keeps the split plan meaningful on CPU.
INTERPRETER_SMS = 4


class DecodeTiling(NamedTuple):
    """Compile-time shape of the split kernel."""

    block_n: int  # context tokens per loop iteration
    num_warps: int
    num_stages: int
    prefetch_pages: bool = True  # load the next tile's block ids one iteration ahead


class DecodeSplitPlan(NamedTuple):
    """How a context of the planned length is cut: split s covers tokens [s * tokens_per_split, (s + 1) *
    tokens_per_split). The kernel takes `num_splits` and cuts each sequence's own context the same way
    (tokens per split: its length over the splits, rounded up to whole tiles)."""

    num_splits: int
    tokens_per_split: int


def decode_tiling_for(device: torch.device, head_dim: int) -> DecodeTiling:
    if device.type != "cuda":  # interpreter: small tiles so that short test contexts span several
        return DecodeTiling(block_n=16, num_warps=4, num_stages=1)
    # Best or within 2% of the best of a sweep on an H200 at batch 1/8/64 and 8k/32k (BENCHMARKS.md).
    return DecodeTiling(block_n=64 if head_dim <= 128 else 32, num_warps=4, num_stages=2)


def multiprocessor_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return _cuda_multiprocessor_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_multiprocessor_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def plan_decode_splits(
    batch: int,
    num_kv_heads: int,
    max_context_len: int,
    num_sms: int,
    block_n: int,
    programs_per_sm: int = PROGRAMS_PER_SM,
) -> DecodeSplitPlan:
    """Choose the splits from the context length and the batch: enough programs to fill the chip.

    A long context with a small batch is cut into many splits; a large batch already fills the chip
    and keeps one split per sequence (no merge launch).
    """
    tiles = max(1, triton.cdiv(max_context_len, block_n))
    wanted = triton.cdiv(programs_per_sm * num_sms, max(1, batch * num_kv_heads))
    splits = max(1, min(wanted, triton.cdiv(tiles, MIN_TILES_PER_SPLIT), MAX_SPLITS))
    tiles_per_split = triton.cdiv(tiles, splits)
    return DecodeSplitPlan(triton.cdiv(tiles, tiles_per_split), tiles_per_split * block_n)


@triton.jit
def _paged_decode_split_kernel(
    q_ptr, k_ptr, v_ptr, block_table_ptr, context_lens_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    scale_log2,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_btb, stride_btn,
    stride_ob, stride_oh,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    PREFETCH_PAGES: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    context_len = tl.load(context_lens_ptr + seq)
    # The grid's splits share out this sequence's own context, in whole tiles: a CUDA graph's plan is
    # made for the longest context the block table holds, and cut by that, a shorter context left
    # most splits empty and the rest of the chip idle (batch 32 at 8k: one split of five at work).
    tokens_per_split = tl.cdiv(tl.cdiv(context_len, tl.num_programs(2)), BLOCK_N) * BLOCK_N
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, context_len)

    rows = tl.arange(0, GROUP_PAD)
    row_ok = rows < GROUP
    heads = kv_head * GROUP + rows
    dims = tl.arange(0, HEAD_DIM)

    row_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    denom = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)

    bt_row = block_table_ptr + seq.to(tl.int64) * stride_btb
    k_head = k_ptr + kv_head * stride_kh
    v_head = v_ptr + kv_head * stride_vh
    offsets = tl.arange(0, BLOCK_N)
    if PREFETCH_PAGES:  # the K/V addresses then depend on a value loaded an iteration earlier
        next_pages = tl.load(bt_row + ((start + offsets) // PAGE_SIZE) * stride_btn, mask=start + offsets < end, other=0)
    if USE_PDL:
        # Launched before the previous kernel (rotary, write_kv) finished: lengths and block ids come
        # from the step's inputs, written long before; q and the new K/V only once it has.
        tl.extra.cuda.gdc_wait()
    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :], mask=row_ok[:, None], other=0.0
    )
    for tile_start in range(start, end, BLOCK_N):
        tokens = tile_start + offsets
        token_ok = tokens < end
        if PREFETCH_PAGES:
            pages = next_pages.to(tl.int64)
            ahead = tokens + BLOCK_N
            next_pages = tl.load(bt_row + (ahead // PAGE_SIZE) * stride_btn, mask=ahead < end, other=0)
        else:
            pages = tl.load(bt_row + (tokens // PAGE_SIZE) * stride_btn, mask=token_ok, other=0).to(tl.int64)
        slots = tokens % PAGE_SIZE
        k = tl.load(
            k_head + (pages * stride_kb + slots * stride_kt)[:, None] + dims[None, :],
            mask=token_ok[:, None],
            other=0.0,
        )
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        scores = tl.where(token_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(row_max, tl.max(scores, 1))
        alpha = tl.exp2(row_max - m_new)
        p = tl.exp2(scores - m_new[:, None])
        denom = denom * alpha + tl.sum(p, 1)
        v = tl.load(
            v_head + (pages * stride_vb + slots * stride_vt)[:, None] + dims[None, :],
            mask=token_ok[:, None],
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        row_max = m_new

    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()  # the merge may launch now; it waits for our stores
    # An empty split (past the context, or a zero-length context) leaves denom == 0: it writes zeros
    # and a log-sum-exp of -inf, which the merge weighs as nothing.
    nonempty = denom > 0.0
    out = acc / tl.where(nonempty, denom, 1.0)[:, None]
    if SINGLE_SPLIT:
        tl.store(
            out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None],
        )
    else:
        tl.store(
            part_out_ptr + seq * stride_pb + heads[:, None] * stride_ph + split * stride_ps + dims[None, :],
            out,
            mask=row_ok[:, None],
        )
        lse = tl.where(nonempty, row_max + tl.log2(tl.where(nonempty, denom, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + seq * stride_lb + heads * stride_lh + split, lse, mask=row_ok)


@triton.jit
def _decode_merge_kernel(
    part_out_ptr, part_lse_ptr, out_ptr,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    num_splits,
    SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()  # launched while the split kernel finishes: wait for its stores
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    split_ok = splits < num_splits
    dims = tl.arange(0, HEAD_DIM)
    lse = tl.load(part_lse_ptr + seq * stride_lb + head * stride_lh + splits, mask=split_ok, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)  # every split empty: weights all zero, output zero
    weights = tl.exp2(lse - top)
    parts = tl.load(
        part_out_ptr + seq * stride_pb + head * stride_ph + splits[:, None] * stride_ps + dims[None, :],
        mask=split_ok[:, None],
        other=0.0,
    )
    total = tl.sum(weights, 0)
    merged = tl.sum(parts * weights[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + dims, merged.to(out_ptr.dtype.element_ty))


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 operands would silently drop to tf32 on tensor cores; the fp32 path exists for exactness.
    return "ieee" if dtype == torch.float32 else "tf32"


def launch_paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    tiling: DecodeTiling,
    plan: DecodeSplitPlan,
) -> torch.Tensor:
    """Runs the split kernel (and the merge when plan has several splits) into `out`."""
    batch, num_q_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    single = plan.num_splits == 1
    if single:
        part_out = out  # unused by the kernel; any tensor of the right device will do
        part_lse = out
        p_strides = (0, 0, 0)
        l_strides = (0, 0)
    else:
        part_out = torch.empty((batch, num_q_heads, plan.num_splits, head_dim), device=q.device, dtype=torch.float32)
        part_lse = torch.empty((batch, num_q_heads, plan.num_splits), device=q.device, dtype=torch.float32)
        p_strides = part_out.stride()[:3]
        l_strides = part_lse.stride()[:2]
    grid = (batch, num_kv_heads, plan.num_splits)
    pdl = use_pdl(q.device)
    launch = {"launch_pdl": True} if pdl else {}
    _paged_decode_split_kernel[grid](
        q, k_cache, v_cache, block_table, context_lens, out, part_out, part_lse,
        scale * 1.4426950408889634,  # log2(e): the kernels use exp2
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_table.stride(0), block_table.stride(1),
        out.stride(0), out.stride(1),
        *p_strides,
        *l_strides,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),  # tl.dot wants at least 16 rows
        HEAD_DIM=head_dim,
        PAGE_SIZE=page_size,
        BLOCK_N=tiling.block_n,
        SINGLE_SPLIT=single,
        PREFETCH_PAGES=tiling.prefetch_pages,
        DOT_PRECISION=dot_precision(q.dtype),
        USE_PDL=pdl,
        num_warps=tiling.num_warps,
        num_stages=tiling.num_stages,
        **launch,
    )
    if not single:
        _decode_merge_kernel[(batch, num_q_heads)](
            part_out, part_lse, out,
            *p_strides,
            *l_strides,
            out.stride(0), out.stride(1),
            plan.num_splits,
            SPLITS_PAD=triton.next_power_of_2(plan.num_splits),
            HEAD_DIM=head_dim,
            USE_PDL=pdl,
            num_warps=4,
            **launch,
        )
    return out


# Programmatic dependent launch (Hopper and later): each decode kernel may be launched while the
# kernel before it finishes, and waits on the device for that kernel's writes. A batch-1 decode is
# mostly fixed latency (two short kernels per layer), which this overlaps. CACHEPROXY_DECODE_PDL=0
# turns it off.
DECODE_PDL = os.environ.get("CACHEPROXY_DECODE_PDL", "1") != "0"


@functools.cache
def _supports_pdl(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def use_pdl(device: torch.device) -> bool:
    if not DECODE_PDL or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return _supports_pdl(device.index if device.index is not None else torch.cuda.current_device())
