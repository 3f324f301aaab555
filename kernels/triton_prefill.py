"""Prefix prefill attention in Triton: packed new tokens attend to their cached blocks, then causally
to themselves.

Three launch shapes, chosen by `plan_prefix_prefill` from host-known sizes only (CUDA-graph safe):

- Tiled (long cold prefills, many new tokens): one program owns (tile of BLOCK_M new tokens of one
  sequence, query head). It walks the sequence's cached tokens through the block table (no causal
  mask: every cached token precedes every new one), then the new tokens' own K/V up to the tile's
  diagonal, with an online softmax throughout. Only the last cached tile and the diagonal tiles pay
  for masks.
- Grouped split-K (few new tokens after a long cached prefix, where the tiled grid would leave most
  multiprocessors idle): one program owns (BLOCK_M rows of one KV head, split of the cached part).
  A row is one (new token, query head of the KV head's group), so the heads that share a KV head
  share its loads. The cached part is cut into `num_splits` equal slices, sized inside the kernel
  from the sequence's real cached length (the host only fixes the count); the last split also does
  the causal part over the new tokens. Each split writes its normalized output and log2-sum-exp in
  float32 and a second kernel merges them; with one split the program writes the output directly.
- Causal (the caller says nothing is cached, `max_cached_len` 0, and the tiled shape would run):
  the tiled work without the block table, q/k/v read through tensor-memory descriptors over the
  packed rows (Hopper and later, from CAUSAL_MIN_TOKENS new tokens; the interpreter emulates them).

Callers validate arguments first (`kernels.triton_ops`); the launchers trust what they get.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import NamedTuple

import torch
import triton
import triton.language as tl

try:  # host-side tensor-memory descriptors (Triton 3.3 and later)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the install
    TensorDescriptor = None  # type: ignore[assignment,misc]

from kernels.triton_decode import dot_precision


class PrefillTiling(NamedTuple):
    block_m: int  # new tokens (queries) per program
    block_n: int  # keys per loop iteration; block_m must be a multiple of it
    num_warps: int
    num_stages: int
    # Load the next tile's block ids while a tile computes, so that the cached K/V loads do not wait
    # on them. Measured on an H200 (BENCHMARKS.md): the grouped kernel 13% faster at 64 new tokens
    # after 32k cached; the tiled kernel's 128x128, 3-stage tiles 2-8% slower with it, so it is off there.
    prefetch_pages: bool = False


def prefill_tiling_for(device: torch.device, head_dim: int) -> PrefillTiling:
    if device.type != "cuda":  # interpreter: small tiles so that short test sequences span several
        return PrefillTiling(block_m=16, block_n=16, num_warps=4, num_stages=1)
    if head_dim <= 64:
        return PrefillTiling(block_m=128, block_n=64, num_warps=4, num_stages=3)
    # Best of a sweep on an H200 (BENCHMARKS.md): 128x128 tiles beat 128x64 by ~20% at D 128.
    return PrefillTiling(block_m=128, block_n=128, num_warps=8, num_stages=3)


def causal_tiling_for(device: torch.device, head_dim: int) -> PrefillTiling:
    """Tiles of the causal kernel (no cached part, q/k/v through descriptors)."""
    if device.type != "cuda":
        return PrefillTiling(block_m=16, block_n=16, num_warps=4, num_stages=1)
    if head_dim <= 64:
        return PrefillTiling(block_m=128, block_n=64, num_warps=4, num_stages=3)
    # H200, one 16k causal sequence, 32/8 heads, bf16: 522 TFLOP/s against 439 for the tiled kernel
    # with pointer loads (BENCHMARKS.md, "Batch-1 decode: variants tried" notes).
    return PrefillTiling(block_m=128, block_n=128, num_warps=8, num_stages=3)


# The causal kernel's descriptors are encoded on the host at every launch (~15 us each): below this
# many new tokens that outweighs what they save on the device (H200: 2k tokens 0.183 ms against
# 0.139 ms for the pointer kernel; 8k 0.96 against 1.42 ms).
CAUSAL_MIN_TOKENS = 4096


# Split-K plan constants. The tiled grid is kept when it fills at least this share of one wave of
# programs (512 new tokens of one sequence: 4 x 32 = 128 programs on 132 SMs, measured at 1.08x SDPA).
TILED_MIN_WAVE_FILL = 0.6
# Most splits of the cached part; more would cost more in partial outputs than they add in programs.
MAX_PREFILL_SPLITS = 64
# Block-table tiles (upper bound of the cached length) a split should at least cover.
MIN_TILES_PER_PREFILL_SPLIT = 2


# Integer arguments that change from step to step (block-table width, split count). Triton would
# compile a variant per value class (== 1, multiple of 16); eager steps of a server then paid a compile
# (seconds) the first time a width came up that start-up had not seen. None of them sets a memory layout.
_VARIES_BY_STEP = ["stride_btb", "num_splits"]


class PrefillPlan(NamedTuple):
    """Launch shape: `grouped` False runs the tiled kernel with `tiling`; True the split-K kernel.
    `contiguous`: nothing is cached, so the tiled work runs as the causal kernel that reads q/k/v
    through tensor-memory descriptors (Hopper and later, and the interpreter)."""

    grouped: bool
    tiling: PrefillTiling
    num_splits: int = 1
    contiguous: bool = False


def descriptors_supported(device: torch.device) -> bool:
    """Tensor-memory (TMA) descriptors: Hopper and later; the interpreter emulates them."""
    if TensorDescriptor is None:
        return False
    if device.type != "cuda":
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if not torch.cuda.is_available():  # a plan made for a CUDA device on a machine without one (tests)
        return False
    return _cuda_capability(device.index if device.index is not None else torch.cuda.current_device()) >= 9


@functools.cache
def _cuda_capability(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def split_prefill_tiling_for(device: torch.device, head_dim: int, rows: int) -> PrefillTiling:
    """Tiles of the grouped kernel; `rows` = max new tokens x group: a tile is no taller than needed."""
    if device.type != "cuda":  # interpreter: small tiles so that short test sequences span several
        return PrefillTiling(block_m=16, block_n=16, num_warps=4, num_stages=1, prefetch_pages=True)
    block_m = min(128, max(16, triton.next_power_of_2(rows)))  # tl.dot wants at least 16 rows
    if block_m == 128:
        # H200 sweep (BENCHMARKS.md): 64-key tiles beat 128 at 64 and 256 new tokens after 2k-32k cached.
        return PrefillTiling(block_m=128, block_n=64, num_warps=8, num_stages=3, prefetch_pages=True)
    stages = 3 if block_m == 64 else 2
    return PrefillTiling(block_m=block_m, block_n=64, num_warps=4, num_stages=stages, prefetch_pages=True)


def split_programs_per_sm(block_m: int) -> int:
    """Programs wanted per multiprocessor: a 128-row tile keeps an SM busy alone, short tiles need company.
    A second wave of 128-row programs costs a whole program's time: 17 splits of 64 new tokens (2.06
    waves) ran 36.7 us a layer after 2k cached, 8 splits (0.97 of a wave) 23.2 us (H200 sweep)."""
    return {128: 1, 64: 2}.get(block_m, 8)


def plan_prefix_prefill(
    batch: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    max_query_len: int,
    max_cached_len: int,
    num_sms: int,
    device: torch.device,
    num_splits: int | None = None,
) -> PrefillPlan:
    """Tiled when the new tokens alone fill the chip; else grouped, with splits to fill it.

    Host ints only: `max_cached_len` is an upper bound (the block table's capacity unless the caller
    knows better) and only sets how many splits there are; each split's size follows the real cached
    length inside the kernel. `num_splits` forces the grouped kernel with that count (tests, tuning).
    """
    tiled = prefill_tiling_for(device, head_dim)
    tiled_programs = triton.cdiv(max_query_len, tiled.block_m) * num_q_heads * batch
    group = num_q_heads // num_kv_heads
    if num_splits is None and max_query_len >= tiled.block_m and tiled_programs >= TILED_MIN_WAVE_FILL * num_sms:
        long_enough = device.type != "cuda" or max_query_len >= CAUSAL_MIN_TOKENS
        if max_cached_len == 0 and long_enough and descriptors_supported(device):
            return PrefillPlan(False, causal_tiling_for(device, head_dim), contiguous=True)
        return PrefillPlan(False, tiled)
    tiling = split_prefill_tiling_for(device, head_dim, max_query_len * group)
    if num_splits is not None:
        return PrefillPlan(True, tiling, num_splits)
    row_tiles = triton.cdiv(max(1, max_query_len) * group, tiling.block_m)
    slots, programs = split_programs_per_sm(tiling.block_m) * num_sms, row_tiles * num_kv_heads * max(1, batch)
    # On the GPU rounded down: the grid fills waves without spilling a few programs into one more. The
    # interpreter's small test shapes round up, so that they still cut and merge splits.
    wanted = slots // programs if device.type == "cuda" else triton.cdiv(slots, programs)
    most = triton.cdiv(max(1, triton.cdiv(max_cached_len, tiling.block_n)), MIN_TILES_PER_PREFILL_SPLIT)
    return PrefillPlan(True, tiling, max(1, min(wanted, most, MAX_PREFILL_SPLITS)))


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
def _positive_scale_softmax_step(acc, denom, row_max, q, k, v, keep, scale_log2, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """`_online_softmax_step` for a positive scale: the row max is taken before scaling (scaling
    keeps the order), so each score costs one fused multiply-add on its way into exp2 instead of a
    multiply and a subtract; at 32k causal the kernel is bound by this arithmetic and exp2 as much
    as by the tensor cores."""
    raw = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASKED:
        raw = tl.where(keep, raw, float("-inf"))
    m_new = tl.maximum(row_max, tl.max(raw, 1) * scale_log2)
    alpha = tl.exp2(row_max - m_new)
    p = tl.exp2(raw * scale_log2 - m_new[:, None])
    denom = denom * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, denom, m_new


@triton.jit
def _tile_pages(bt_row, tile_start, cached_len, stride_btn, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Block ids of a tile's tokens (0 past the cached part)."""
    tokens = tile_start + tl.arange(0, BLOCK_N)
    return tl.load(bt_row + (tokens // PAGE_SIZE) * stride_btn, mask=tokens < cached_len, other=0)


@triton.jit
def _cached_tile(
    acc, denom, row_max, q, k_head, v_head, bt_row, tile_start, cached_len, dims, scale_log2,
    stride_kb, stride_kt, stride_vb, stride_vt, stride_btn,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    pages=None,
):
    """One tile of cached keys; `pages` (the tile's block ids) when the caller loaded them ahead."""
    tokens = tile_start + tl.arange(0, BLOCK_N)
    if MASKED:
        token_ok = tokens < cached_len
    else:
        token_ok = tokens >= 0
    if pages is None:
        pages = _tile_pages(bt_row, tile_start, cached_len, stride_btn, PAGE_SIZE, BLOCK_N)
    pages = pages.to(tl.int64)
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
def _cached_span(
    acc, denom, row_max, q, k_head, v_head, bt_row, start, end, dims, scale_log2,
    stride_kb, stride_kt, stride_vb, stride_vt, stride_btn,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PREFETCH_PAGES: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Cached tokens [start, end): whole tiles unmasked, the ragged end masked. With PREFETCH_PAGES
    the next tile's block ids load while this tile computes, so the K/V loads do not wait on them."""
    full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N
    if PREFETCH_PAGES:
        pages = _tile_pages(bt_row, start, end, stride_btn, PAGE_SIZE, BLOCK_N)
        for tile_start in range(start, full_end, BLOCK_N):
            next_pages = _tile_pages(bt_row, tile_start + BLOCK_N, end, stride_btn, PAGE_SIZE, BLOCK_N)
            acc, denom, row_max = _cached_tile(
                acc, denom, row_max, q, k_head, v_head, bt_row, tile_start, end, dims, scale_log2,
                stride_kb, stride_kt, stride_vb, stride_vt, stride_btn,
                PAGE_SIZE, BLOCK_M, BLOCK_N, False, DOT_PRECISION, pages,
            )
            pages = next_pages
        if full_end < end:
            acc, denom, row_max = _cached_tile(
                acc, denom, row_max, q, k_head, v_head, bt_row, full_end, end, dims, scale_log2,
                stride_kb, stride_kt, stride_vb, stride_vt, stride_btn,
                PAGE_SIZE, BLOCK_M, BLOCK_N, True, DOT_PRECISION, pages,
            )
    else:
        for tile_start in range(start, full_end, BLOCK_N):
            acc, denom, row_max = _cached_tile(
                acc, denom, row_max, q, k_head, v_head, bt_row, tile_start, end, dims, scale_log2,
                stride_kb, stride_kt, stride_vb, stride_vt, stride_btn,
                PAGE_SIZE, BLOCK_M, BLOCK_N, False, DOT_PRECISION,
            )
        if full_end < end:
            acc, denom, row_max = _cached_tile(
                acc, denom, row_max, q, k_head, v_head, bt_row, full_end, end, dims, scale_log2,
                stride_kb, stride_kt, stride_vb, stride_vt, stride_btn,
                PAGE_SIZE, BLOCK_M, BLOCK_N, True, DOT_PRECISION,
            )
    return acc, denom, row_max


@triton.jit(do_not_specialize=_VARIES_BY_STEP)
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
    PREFETCH_PAGES: tl.constexpr,
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
    acc, denom, row_max = _cached_span(
        acc, denom, row_max, q, kc_head, vc_head, bt_row, 0, cached_len, dims, scale_log2,
        stride_kcb, stride_kct, stride_vcb, stride_vct, stride_btn,
        PAGE_SIZE, BLOCK_M, BLOCK_N, PREFETCH_PAGES, DOT_PRECISION,
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
        PREFETCH_PAGES=tiling.prefetch_pages,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=tiling.num_warps,
        num_stages=tiling.num_stages,
    )
    return out


@triton.jit(do_not_specialize=_VARIES_BY_STEP)
def _grouped_split_prefill_kernel(
    q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, cu_seqlens_q_ptr, cached_lens_ptr, out_ptr,
    part_out_ptr, part_lse_ptr,
    scale_log2,
    stride_qt, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_kcb, stride_kct, stride_kch,
    stride_vcb, stride_vct, stride_vch,
    stride_btb, stride_btn,
    stride_ot, stride_oh,
    stride_pt, stride_ph, stride_ps,
    stride_lt, stride_lh,
    num_kv_heads,
    num_splits,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    PREFETCH_PAGES: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1) % num_kv_heads
    split = tl.program_id(1) // num_kv_heads
    seq = tl.program_id(2)

    seq_start = tl.load(cu_seqlens_q_ptr + seq)
    num_new = tl.load(cu_seqlens_q_ptr + seq + 1) - seq_start
    first_row = tile * BLOCK_M  # rows enumerate (new token, head of the group), token-major
    if first_row >= num_new * GROUP:
        return
    cached_len = tl.load(cached_lens_ptr + seq)

    rows = first_row + tl.arange(0, BLOCK_M)
    tokens = rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    row_ok = tokens < num_new
    dims = tl.arange(0, HEAD_DIM)
    token_rows = (seq_start + tokens).to(tl.int64)
    q = tl.load(
        q_ptr + token_rows[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # This split's slice of the cached part, sized from the real length: equal whole tiles per split,
    # so only the slice that holds the ragged end pays for a mask.
    tiles_per_split = tl.cdiv(tl.cdiv(cached_len, BLOCK_N), num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, cached_len)
    bt_row = block_table_ptr + seq.to(tl.int64) * stride_btb
    kc_head = k_cache_ptr + kv_head * stride_kch
    vc_head = v_cache_ptr + kv_head * stride_vch
    acc, denom, row_max = _cached_span(
        acc, denom, row_max, q, kc_head, vc_head, bt_row, start, end, dims, scale_log2,
        stride_kcb, stride_kct, stride_vcb, stride_vct, stride_btn,
        PAGE_SIZE, BLOCK_M, BLOCK_N, PREFETCH_PAGES, DOT_PRECISION,
    )

    if split == num_splits - 1:
        # New tokens, causally: keys before the tile's first token are visible to every row; from the
        # tile of that token on, key <= the row's token and the sequence end apply.
        first_token = first_row // GROUP
        last_token = tl.minimum((first_row + BLOCK_M - 1) // GROUP, num_new - 1)
        k_seq = k_ptr + seq_start.to(tl.int64) * stride_kt + kv_head * stride_kh
        v_seq = v_ptr + seq_start.to(tl.int64) * stride_vt + kv_head * stride_vh
        cols = tl.arange(0, BLOCK_N)
        shared_end = first_token // BLOCK_N * BLOCK_N
        for key_start in range(0, shared_end, BLOCK_N):
            keys = key_start + cols
            k = tl.load(k_seq + keys[:, None].to(tl.int64) * stride_kt + dims[None, :])
            v = tl.load(v_seq + keys[:, None].to(tl.int64) * stride_vt + dims[None, :])
            acc, denom, row_max = _online_softmax_step(
                acc, denom, row_max, q, k, v, row_ok[:, None], scale_log2, False, DOT_PRECISION
            )
        for key_start in range(shared_end, last_token + 1, BLOCK_N):
            keys = key_start + cols
            key_ok = keys < num_new
            k = tl.load(k_seq + keys[:, None].to(tl.int64) * stride_kt + dims[None, :], mask=key_ok[:, None], other=0.0)
            v = tl.load(v_seq + keys[:, None].to(tl.int64) * stride_vt + dims[None, :], mask=key_ok[:, None], other=0.0)
            keep = (keys[None, :] <= tokens[:, None]) & key_ok[None, :]
            acc, denom, row_max = _online_softmax_step(
                acc, denom, row_max, q, k, v, keep, scale_log2, True, DOT_PRECISION
            )

    # A split with nothing to read (past the cached part, or cut from a short one) leaves denom == 0:
    # it writes zeros and a log-sum-exp of -inf, which the merge weighs as nothing.
    nonempty = denom > 0.0
    out = acc / tl.where(nonempty, denom, 1.0)[:, None]
    if SINGLE_SPLIT:
        tl.store(
            out_ptr + token_rows[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None],
        )
    else:
        tl.store(
            part_out_ptr + token_rows[:, None] * stride_pt + heads[:, None] * stride_ph + split * stride_ps
            + dims[None, :],
            out,
            mask=row_ok[:, None],
        )
        lse = tl.where(nonempty, row_max + tl.log2(tl.where(nonempty, denom, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + token_rows * stride_lt + heads * stride_lh + split, lse, mask=row_ok)


@triton.jit(do_not_specialize=_VARIES_BY_STEP)
def _prefill_merge_kernel(
    cu_seqlens_q_ptr, part_out_ptr, part_lse_ptr, out_ptr,
    stride_pt, stride_ph, stride_ps,
    stride_lt, stride_lh,
    stride_ot, stride_oh,
    num_q_heads,
    num_splits,
    HEADS: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """One new token and HEADS of its query heads per program: a program per (token, head) made the
    merge of 64 tokens x 32 heads 2,048 programs of a few kilobytes each, launch-bound (H200: 7.5 us).
    Splits go by in chunks of a fixed size, so that no step compiles a variant for its split count."""
    index = tl.program_id(0)  # the token's index among its sequence's new tokens
    seq = tl.program_id(2)
    seq_start = tl.load(cu_seqlens_q_ptr + seq)
    if index >= tl.load(cu_seqlens_q_ptr + seq + 1) - seq_start:
        return  # only tokens of a sequence were written by the splits; others stay untouched
    token = (seq_start + index).to(tl.int64)
    heads = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
    head_ok = heads < num_q_heads
    chunk = tl.arange(0, SPLIT_CHUNK)
    dims = tl.arange(0, HEAD_DIM)
    lse_rows = part_lse_ptr + token * stride_lt + heads[:, None] * stride_lh
    # The last split always sees at least the token itself, so each head's top log-sum-exp is finite
    # (heads past num_q_heads stay -inf: their results are NaN and never stored).
    top = tl.full([HEADS], float("-inf"), tl.float32)
    for first in range(0, num_splits, SPLIT_CHUNK):
        ok = head_ok[:, None] & (first + chunk < num_splits)[None, :]
        top = tl.maximum(top, tl.max(tl.load(lse_rows + first + chunk[None, :], mask=ok, other=float("-inf")), 1))
    merged = tl.zeros([HEADS, HEAD_DIM], tl.float32)
    total = tl.zeros([HEADS], tl.float32)
    for first in range(0, num_splits, SPLIT_CHUNK):
        ok = head_ok[:, None] & (first + chunk < num_splits)[None, :]
        weights = tl.exp2(tl.load(lse_rows + first + chunk[None, :], mask=ok, other=float("-inf")) - top[:, None])
        parts = tl.load(
            part_out_ptr + token * stride_pt + heads[:, None, None] * stride_ph
            + (first + chunk)[None, :, None] * stride_ps + dims[None, None, :],
            mask=ok[:, :, None],
            other=0.0,
        )
        merged += tl.sum(parts * weights[:, :, None], 1)
        total += tl.sum(weights, 1)
    tl.store(out_ptr + token * stride_ot + heads[:, None] * stride_oh + dims[None, :],
             (merged / total[:, None]).to(out_ptr.dtype.element_ty), mask=head_ok[:, None])  # fmt: skip


MERGE_HEADS_PER_PROGRAM = 4
MERGE_SPLIT_CHUNK = 8


def launch_grouped_prefix_prefill(
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
    num_splits: int,
) -> torch.Tensor:
    """Runs the grouped split-K kernel (and the merge when there are several splits) into `out`."""
    num_tokens, num_q_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    batch = cu_seqlens_q.shape[0] - 1
    if num_tokens == 0 or batch == 0 or max_query_len == 0:
        return out
    group = num_q_heads // num_kv_heads
    single = num_splits == 1
    if single:
        part_out = part_lse = out  # unused by the kernel; any tensor of the right device will do
        p_strides: tuple[int, ...] = (0, 0, 0)
        l_strides: tuple[int, ...] = (0, 0)
    else:
        part_out = torch.empty((num_tokens, num_q_heads, num_splits, head_dim), device=q.device, dtype=torch.float32)
        part_lse = torch.empty((num_tokens, num_q_heads, num_splits), device=q.device, dtype=torch.float32)
        p_strides, l_strides = part_out.stride()[:3], part_lse.stride()[:2]
    grid = (triton.cdiv(max_query_len * group, tiling.block_m), num_kv_heads * num_splits, batch)
    _grouped_split_prefill_kernel[grid](
        q, k, v, k_cache, v_cache, block_table, cu_seqlens_q, cached_lens, out, part_out, part_lse,
        scale * 1.4426950408889634,  # log2(e): the kernels use exp2
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1),
        v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_table.stride(0), block_table.stride(1),
        out.stride(0), out.stride(1),
        *p_strides,
        *l_strides,
        num_kv_heads,
        num_splits,
        GROUP=group,
        HEAD_DIM=head_dim,
        PAGE_SIZE=page_size,
        BLOCK_M=tiling.block_m,
        BLOCK_N=tiling.block_n,
        SINGLE_SPLIT=single,
        PREFETCH_PAGES=tiling.prefetch_pages,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=tiling.num_warps,
        num_stages=tiling.num_stages,
    )
    if not single:
        heads = min(MERGE_HEADS_PER_PROGRAM, triton.next_power_of_2(num_q_heads))
        _prefill_merge_kernel[(max_query_len, triton.cdiv(num_q_heads, heads), batch)](
            cu_seqlens_q, part_out, part_lse, out,
            *p_strides,
            *l_strides,
            out.stride(0), out.stride(1),
            num_q_heads,
            num_splits,
            HEADS=heads,
            SPLIT_CHUNK=MERGE_SPLIT_CHUNK,
            HEAD_DIM=head_dim,
            num_warps=4,
        )
    return out


@triton.jit
def _causal_prefill_kernel(
    q_desc, k_desc, v_desc, cu_seqlens_q_ptr, out_ptr,
    scale_log2,
    stride_ot, stride_oh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """New tokens with nothing cached: tile (BLOCK_M tokens of one sequence, one query head) attends
    causally to the sequence's own keys. q/k/v come in through descriptors over the packed [T, heads * D]
    rows; a tile that runs past its sequence reads the next one's rows, which the causal mask and the
    store mask keep out."""
    head = tl.program_id(0)
    seq = tl.program_id(2)
    seq_start = tl.load(cu_seqlens_q_ptr + seq)
    num_new = tl.load(cu_seqlens_q_ptr + seq + 1) - seq_start
    tiles = tl.cdiv(num_new, BLOCK_M)
    if tl.program_id(1) >= tiles:
        return
    first = (tiles - 1 - tl.program_id(1)) * BLOCK_M  # the longest rows launch first
    kv_col = (head // GROUP) * HEAD_DIM
    q = q_desc.load([seq_start + first, head * HEAD_DIM])

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    rows = first + tl.arange(0, BLOCK_M)
    for key_start in range(0, first, BLOCK_N):  # keys before the tile: visible to every row
        k = k_desc.load([seq_start + key_start, kv_col])
        v = v_desc.load([seq_start + key_start, kv_col])
        acc, denom, row_max = _positive_scale_softmax_step(
            acc, denom, row_max, q, k, v, None, scale_log2, False, DOT_PRECISION
        )
    for key_start in range(first, tl.minimum(first + BLOCK_M, num_new), BLOCK_N):
        keys = key_start + tl.arange(0, BLOCK_N)
        k = k_desc.load([seq_start + key_start, kv_col])
        v = v_desc.load([seq_start + key_start, kv_col])
        keep = (keys[None, :] <= rows[:, None]) & (keys[None, :] < num_new)
        acc, denom, row_max = _positive_scale_softmax_step(
            acc, denom, row_max, q, k, v, keep, scale_log2, True, DOT_PRECISION
        )

    out = acc / denom[:, None]
    token_rows = (seq_start + rows).to(tl.int64)
    dims = tl.arange(0, HEAD_DIM)
    tl.store(
        out_ptr + token_rows[:, None] * stride_ot + head * stride_oh + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=(rows < num_new)[:, None],
    )


def _rows_descriptor(t: torch.Tensor, block_rows: int) -> object | None:
    """A descriptor over t [T, H, D] as [T, H * D] rows, or None where TMA cannot address it
    (heads not packed, or a base or row stride off 16 bytes)."""
    num_tokens, heads, dim = t.shape
    if t.stride(2) != 1 or t.stride(1) != dim or num_tokens == 0:
        return None
    if t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16:
        return None
    flat = t.as_strided((num_tokens, heads * dim), (t.stride(0), 1))
    return TensorDescriptor(flat, [num_tokens, heads * dim], [t.stride(0), 1], [block_rows, dim])


def launch_causal_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    max_query_len: int,
    tiling: PrefillTiling,
) -> bool:
    """Runs the causal kernel into `out`; False (nothing launched) when q/k/v cannot be described."""
    num_tokens, num_q_heads, head_dim = q.shape
    batch = cu_seqlens_q.shape[0] - 1
    if num_tokens == 0 or batch == 0 or max_query_len == 0:
        return True
    if q.is_cuda and q.dtype not in (torch.float16, torch.bfloat16):
        return False  # measured and tuned for 16-bit tiles only; fp32 keeps the pointer kernel
    if not scale > 0:
        return False  # the kernel takes row maxima before scaling
    descs = (_rows_descriptor(q, tiling.block_m), _rows_descriptor(k, tiling.block_n), _rows_descriptor(v, tiling.block_n))
    if any(d is None for d in descs):
        return False
    variant = (q.device, q.dtype, head_dim, num_q_heads // k.shape[1], tiling)
    if variant in _causal_variants_that_failed:
        return False
    grid = (num_q_heads, triton.cdiv(max_query_len, tiling.block_m), batch)
    try:
        _causal_prefill_kernel[grid](
            *descs, cu_seqlens_q, out,
            scale * 1.4426950408889634,  # log2(e): the kernel uses exp2
            out.stride(0), out.stride(1),
            GROUP=num_q_heads // k.shape[1],
            HEAD_DIM=head_dim,
            BLOCK_M=tiling.block_m,
            BLOCK_N=tiling.block_n,
            DOT_PRECISION=dot_precision(q.dtype),
            num_warps=tiling.num_warps,
            num_stages=tiling.num_stages,
        )
    except Exception as exc:
        if variant in _causal_variants_that_ran:
            raise  # it compiled and ran before: this is not the toolchain, let it surface
        # Descriptors and their lowering are the newest part of Triton: a version or card where this
        # variant does not compile keeps the pointer kernel instead of failing every cold prefill.
        _causal_variants_that_failed.add(variant)
        warnings.warn(f"causal descriptor prefill unavailable here ({type(exc).__name__}: {exc}); "
                      "using the pointer kernel", RuntimeWarning, stacklevel=2)  # fmt: skip
        return False
    _causal_variants_that_ran.add(variant)
    return True


_causal_variants_that_ran: set[tuple[object, ...]] = set()
_causal_variants_that_failed: set[tuple[object, ...]] = set()
