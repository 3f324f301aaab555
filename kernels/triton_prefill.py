"""Prefix prefill attention in Triton: packed new tokens attend to their cached blocks, then causally
to themselves.

One program owns (tile of BLOCK_M new tokens of one sequence, query head). It first walks the
sequence's cached tokens through the block table (no causal mask: every cached token precedes every
new one), then the new tokens' own K/V up to the tile's diagonal, with an online softmax throughout.
Only the last cached tile and the diagonal tiles pay for masks.

Callers validate arguments first (`kernels.triton_ops`); the launcher trusts what it gets.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.triton_decode import dot_precision


class PrefillTiling(NamedTuple):
    block_m: int  # new tokens (queries) per program
    block_n: int  # keys per loop iteration; block_m must be a multiple of it
    num_warps: int
    num_stages: int


def prefill_tiling_for(device: torch.device, head_dim: int) -> PrefillTiling:
    if device.type != "cuda":  # interpreter: small tiles so that short test sequences span several
        return PrefillTiling(block_m=16, block_n=16, num_warps=4, num_stages=1)
    if head_dim <= 64:
        return PrefillTiling(block_m=128, block_n=64, num_warps=4, num_stages=3)
    # Best of a sweep on an H200 (BENCHMARKS.md): 128x128 tiles beat 128x64 by ~20% at D 128.
    return PrefillTiling(block_m=128, block_n=128, num_warps=8, num_stages=3)


@triton.jit
def _online_softmax_step(
    acc, denom, row_max, q, k, v, keep, scale_log2,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    if MASKED:
        scores = tl.where(keep, scores, float("-inf"))
    m_new = tl.maximum(row_max, tl.max(scores, 1))
    alpha = tl.exp2(row_max - m_new)
    p = tl.exp2(scores - m_new[:, None])
    denom = denom * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, denom, m_new


@triton.jit
def _cached_tile(
    acc, denom, row_max, q, k_head, v_head, bt_row, tile_start, cached_len, dims, scale_log2,
    stride_kb, stride_kt, stride_vb, stride_vt, stride_btn,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tokens = tile_start + tl.arange(0, BLOCK_N)
    if MASKED:
        token_ok = tokens < cached_len
        pages = tl.load(bt_row + (tokens // PAGE_SIZE) * stride_btn, mask=token_ok, other=0).to(tl.int64)
    else:
        token_ok = tokens >= 0
        pages = tl.load(bt_row + (tokens // PAGE_SIZE) * stride_btn).to(tl.int64)
    slots = tokens % PAGE_SIZE
    k_ptrs = k_head + (pages * stride_kb + slots * stride_kt)[:, None] + dims[None, :]
    v_ptrs = v_head + (pages * stride_vb + slots * stride_vt)[:, None] + dims[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=token_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=token_ok[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    keep = tl.broadcast_to(token_ok[None, :], (BLOCK_M, BLOCK_N))
    return _online_softmax_step(acc, denom, row_max, q, k, v, keep, scale_log2, MASKED, DOT_PRECISION)


@triton.jit
def _prefix_prefill_kernel(
    q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, cu_seqlens_q_ptr, cached_lens_ptr, out_ptr,
    scale_log2,
    stride_qt, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_kcb, stride_kct, stride_kch,
    stride_vcb, stride_vct, stride_vch,
    stride_btb, stride_btn,
    stride_ot, stride_oh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    kv_head = head // GROUP

    seq_start = tl.load(cu_seqlens_q_ptr + seq)
    num_new = tl.load(cu_seqlens_q_ptr + seq + 1) - seq_start
    first = tile * BLOCK_M  # index of the tile's first query among the sequence's new tokens
    if first >= num_new:
        return
    cached_len = tl.load(cached_lens_ptr + seq)

    rows = first + tl.arange(0, BLOCK_M)
    row_ok = rows < num_new
    dims = tl.arange(0, HEAD_DIM)
    token_rows = (seq_start + rows).to(tl.int64)
    q = tl.load(
        q_ptr + token_rows[:, None] * stride_qt + head * stride_qh + dims[None, :], mask=row_ok[:, None], other=0.0
    )

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # Cached prefix: every cached token precedes every new one, so only the ragged end is masked.
    bt_row = block_table_ptr + seq.to(tl.int64) * stride_btb
    kc_head = k_cache_ptr + kv_head * stride_kch
    vc_head = v_cache_ptr + kv_head * stride_vch
    full_end = cached_len - cached_len % BLOCK_N
    for tile_start in range(0, full_end, BLOCK_N):
        acc, denom, row_max = _cached_tile(
            acc, denom, row_max, q, kc_head, vc_head, bt_row, tile_start, cached_len, dims, scale_log2,
            stride_kcb, stride_kct, stride_vcb, stride_vct, stride_btn,
            PAGE_SIZE, BLOCK_M, BLOCK_N, False, DOT_PRECISION,
        )
    if full_end < cached_len:
        acc, denom, row_max = _cached_tile(
            acc, denom, row_max, q, kc_head, vc_head, bt_row, full_end, cached_len, dims, scale_log2,
            stride_kcb, stride_kct, stride_vcb, stride_vct, stride_btn,
            PAGE_SIZE, BLOCK_M, BLOCK_N, True, DOT_PRECISION,
        )

    # New tokens: keys before the tile's first query are visible to all its rows; from there on the
    # causal mask (key <= query) and the sequence end apply.
    k_seq = k_ptr + seq_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    v_seq = v_ptr + seq_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    cols = tl.arange(0, BLOCK_N)
    for key_start in range(0, first, BLOCK_N):
        keys = key_start + cols
        k = tl.load(k_seq + keys[:, None].to(tl.int64) * stride_kt + dims[None, :])
        v = tl.load(v_seq + keys[:, None].to(tl.int64) * stride_vt + dims[None, :])
        acc, denom, row_max = _online_softmax_step(acc, denom, row_max, q, k, v, row_ok[:, None], scale_log2, False, DOT_PRECISION)
    diag_end = tl.minimum(first + BLOCK_M, num_new)
    for key_start in range(first, diag_end, BLOCK_N):
        keys = key_start + cols
        key_ok = keys < num_new
        k = tl.load(k_seq + keys[:, None].to(tl.int64) * stride_kt + dims[None, :], mask=key_ok[:, None], other=0.0)
        v = tl.load(v_seq + keys[:, None].to(tl.int64) * stride_vt + dims[None, :], mask=key_ok[:, None], other=0.0)
        keep = (keys[None, :] <= rows[:, None]) & key_ok[None, :]
        acc, denom, row_max = _online_softmax_step(acc, denom, row_max, q, k, v, keep, scale_log2, True, DOT_PRECISION)

    out = acc / denom[:, None]
    tl.store(
        out_ptr + token_rows[:, None] * stride_ot + head * stride_oh + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )


def launch_prefix_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cached_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    max_query_len: int,
    tiling: PrefillTiling,
) -> torch.Tensor:
    """Runs the prefill kernel into `out`; tiles past a sequence's new tokens exit at once."""
    num_tokens, num_q_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    batch = cu_seqlens_q.shape[0] - 1
    if num_tokens == 0 or batch == 0 or max_query_len == 0:
        return out
    grid = (triton.cdiv(max_query_len, tiling.block_m), num_q_heads, batch)
    _prefix_prefill_kernel[grid](
        q, k, v, k_cache, v_cache, block_table, cu_seqlens_q, cached_lens, out,
        scale * 1.4426950408889634,  # log2(e): the kernel uses exp2
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1),
        v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_table.stride(0), block_table.stride(1),
        out.stride(0), out.stride(1),
        GROUP=num_q_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        PAGE_SIZE=page_size,
        BLOCK_M=tiling.block_m,
        BLOCK_N=tiling.block_n,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=tiling.num_warps,
        num_stages=tiling.num_stages,
    )
    return out
