"""The Triton attention and KV-movement ops: argument checks, then one launch (two for split-K).

Shapes follow `kernels/__init__.py`. `k_cache`/`v_cache` are strided views
`[num_blocks, block_size, num_kv_heads, head_dim]` of one layer of the page-first pool; the kernels
read and write them through their strides and never copy them. Every tensor's last dimension must be
contiguous. Attention accumulates in float32 and returns q's dtype.

Contracts the checks cannot see without a device sync: every context fits its block-table row,
block ids are valid rows of the pool, and `max_context_len` / `max_query_len` / `max_cached_len`
(when given) bound the real lengths. The ops are safe to capture in a CUDA graph: nothing here reads device memory.
"""

from __future__ import annotations

import math
import os

import torch
import triton

from kernels.triton_decode import (
    DecodeSplitPlan,
    decode_tiling_for,
    launch_paged_decode,
    multiprocessor_count,
    plan_decode_splits,
)
from kernels.triton_kv_movement import launch_copy_blocks, launch_wait_layer, launch_write_kv
from kernels.triton_prefill import (
    launch_causal_prefill,
    launch_grouped_prefix_prefill,
    launch_prefix_prefill,
    plan_prefix_prefill,
    prefill_tiling_for,
)

__all__ = ["copy_blocks", "paged_decode", "prefix_prefill", "wait_layer", "write_kv"]

_ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)
# The kernels were decorated under the interpreter when this was set at import time: CPU tensors work.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _fail(op: str, message: str) -> None:
    raise ValueError(f"{op}: {message}")


def _check_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        _fail(op, "all tensors must be on one device, got " + ", ".join(f"{n}={d}" for n, d in devices.items()))
    if first.type != "cuda" and not _INTERPRETED:
        _fail(op, f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 at import), got device {first}")


def _check_rank(op: str, name: str, t: torch.Tensor, layout: str) -> None:
    rank = layout.count(",") + 1
    if t.dim() != rank:
        _fail(op, f"{name} must be {layout}, got shape {tuple(t.shape)}")


def _check_last_dim_contiguous(op: str, name: str, t: torch.Tensor) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        _fail(op, f"{name} must have a contiguous last dimension, got strides {t.stride()}")


def _check_dtype(op: str, name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        _fail(op, f"{name} must have dtype in {[str(d) for d in allowed]}, got {t.dtype}")


def _check_head_dim(op: str, head_dim: int) -> None:
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        _fail(op, f"head_dim must be a power of two in [16, 256], got {head_dim}")


def _check_kv_cache(op: str, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_rank(op, name, t, "[num_blocks, block_size, num_kv_heads, head_dim]")
        _check_last_dim_contiguous(op, name, t)
        _check_dtype(op, name, t, _ATTENTION_DTYPES)
    if k_cache.shape != v_cache.shape:
        _fail(op, f"k_cache and v_cache shapes differ: {tuple(k_cache.shape)} vs {tuple(v_cache.shape)}")
    if k_cache.dtype != v_cache.dtype:
        _fail(op, f"k_cache and v_cache dtypes differ: {k_cache.dtype} vs {v_cache.dtype}")
    _check_head_dim(op, k_cache.shape[3])


def _check_heads(op: str, q: torch.Tensor, k_cache: torch.Tensor) -> None:
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    if head_dim != k_cache.shape[3]:
        _fail(op, f"q head_dim {head_dim} != cache head_dim {k_cache.shape[3]}")
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        _fail(op, f"num_q_heads {num_q_heads} must be a multiple of num_kv_heads {num_kv_heads}")
    if q.dtype != k_cache.dtype:
        _fail(op, f"q dtype {q.dtype} != cache dtype {k_cache.dtype}")


def _check_scale(op: str, scale: float) -> None:
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        _fail(op, f"scale must be a finite float, got {scale!r}")


def _check_index(op: str, name: str, t: torch.Tensor, shape: tuple[int, ...], layout: str) -> None:
    _check_dtype(op, name, t, (torch.int32,))
    if tuple(t.shape) != shape:
        _fail(op, f"{name} must be {layout} = {shape}, got {tuple(t.shape)}")


def _check_out(op: str, out: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty_like(like, memory_format=torch.contiguous_format)
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device:
        _fail(op, f"out must be {tuple(like.shape)} {like.dtype} on {like.device}, got "
                  f"{tuple(out.shape)} {out.dtype} on {out.device}")
    _check_last_dim_contiguous(op, "out", out)
    return out


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    max_context_len: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """q[B,Hq,D] attends to the first context_lens[b] tokens of its blocks -> [B,Hq,D].

    The context is cut into splits chosen from `max_context_len` (default: what the block table
    can hold) and the batch; `num_splits` forces a count (tests, tuning). A zero context gives zeros.
    """
    op = "paged_decode"
    _check_rank(op, "q", q, "[batch, num_q_heads, head_dim]")
    _check_last_dim_contiguous(op, "q", q)
    _check_dtype(op, "q", q, _ATTENTION_DTYPES)
    _check_kv_cache(op, k_cache, v_cache)
    _check_heads(op, q, k_cache)
    batch = q.shape[0]
    _check_rank(op, "block_table", block_table, "[batch, max_blocks]")
    _check_index(op, "block_table", block_table, (batch, block_table.shape[1]), "[batch, max_blocks]")
    _check_index(op, "context_lens", context_lens, (batch,), "[batch]")
    _check_scale(op, scale)
    _check_device(op, q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table, context_lens=context_lens)
    out = _check_out(op, out, q)
    page_size = k_cache.shape[1]
    capacity = block_table.shape[1] * page_size
    if max_context_len is None:
        max_context_len = capacity
    elif not 0 <= max_context_len <= capacity:
        _fail(op, f"max_context_len {max_context_len} must be in [0, {capacity}] (block_table width x block_size)")
    if batch == 0:
        return out

    tiling = decode_tiling_for(q.device, q.shape[2])
    if num_splits is None:
        plan = plan_decode_splits(
            batch, k_cache.shape[2], max_context_len, multiprocessor_count(q.device), tiling.block_n
        )
    else:
        if num_splits < 1:
            _fail(op, f"num_splits must be >= 1, got {num_splits}")
        tiles = max(1, triton.cdiv(max_context_len, tiling.block_n))
        tiles_per_split = triton.cdiv(tiles, num_splits)
        plan = DecodeSplitPlan(triton.cdiv(tiles, tiles_per_split), tiles_per_split * tiling.block_n)
    return launch_paged_decode(q, k_cache, v_cache, block_table, context_lens, float(scale), out, tiling, plan)


def prefix_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cached_lens: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    max_query_len: int | None = None,
    max_cached_len: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Packed new tokens q[T,Hq,D], k/v[T,Hkv,D]; sequence b's tokens sit at positions cached_lens[b] + i.

    They attend to the sequence's cached tokens (through block_table) and causally to its own new
    tokens. `max_query_len` (default T) bounds the new tokens of any one sequence, `max_cached_len`
    (default: what the block table can hold) its cached tokens; from both the launch shape is chosen
    (few new tokens after a long prefix: split-K over the cached part). `num_splits` forces the
    split-K kernel with that many splits (tests, tuning).
    """
    op = "prefix_prefill"
    _check_rank(op, "q", q, "[num_tokens, num_q_heads, head_dim]")
    _check_last_dim_contiguous(op, "q", q)
    _check_dtype(op, "q", q, _ATTENTION_DTYPES)
    _check_kv_cache(op, k_cache, v_cache)
    _check_heads(op, q, k_cache)
    num_tokens = q.shape[0]
    expected_kv = (num_tokens, k_cache.shape[2], k_cache.shape[3])
    for name, t in (("k", k), ("v", v)):
        _check_rank(op, name, t, "[num_tokens, num_kv_heads, head_dim]")
        if tuple(t.shape) != expected_kv:
            _fail(op, f"{name} must be [num_tokens, num_kv_heads, head_dim] = {expected_kv}, got {tuple(t.shape)}")
        _check_last_dim_contiguous(op, name, t)
        if t.dtype != q.dtype:
            _fail(op, f"{name} dtype {t.dtype} != q dtype {q.dtype}")
    _check_rank(op, "cu_seqlens_q", cu_seqlens_q, "[batch + 1]")
    batch = cu_seqlens_q.shape[0] - 1
    if batch < 0:
        _fail(op, "cu_seqlens_q must hold batch + 1 >= 1 offsets, got none")
    _check_index(op, "cu_seqlens_q", cu_seqlens_q, (batch + 1,), "[batch + 1]")
    _check_index(op, "cached_lens", cached_lens, (batch,), "[batch]")
    _check_rank(op, "block_table", block_table, "[batch, max_blocks]")
    _check_index(op, "block_table", block_table, (batch, block_table.shape[1]), "[batch, max_blocks]")
    _check_scale(op, scale)
    if max_query_len is None:
        max_query_len = num_tokens
    elif not 0 <= max_query_len <= num_tokens:
        _fail(op, f"max_query_len {max_query_len} must be in [0, {num_tokens}]")
    capacity = block_table.shape[1] * k_cache.shape[1]
    if max_cached_len is None:
        max_cached_len = capacity
    elif not 0 <= max_cached_len <= capacity:
        _fail(op, f"max_cached_len {max_cached_len} must be in [0, {capacity}] (block_table width x block_size)")
    if num_splits is not None and num_splits < 1:
        _fail(op, f"num_splits must be >= 1, got {num_splits}")
    _check_device(
        op, q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache, block_table=block_table,
        cu_seqlens_q=cu_seqlens_q, cached_lens=cached_lens,
    )
    out = _check_out(op, out, q)
    plan = plan_prefix_prefill(
        batch, q.shape[1], k_cache.shape[2], q.shape[2], max_query_len, max_cached_len,
        multiprocessor_count(q.device), q.device, num_splits,
    )
    args = (q, k, v, k_cache, v_cache, block_table, cu_seqlens_q, cached_lens, float(scale), out, max_query_len)
    if plan.grouped:
        return launch_grouped_prefix_prefill(*args, plan.tiling, plan.num_splits)
    if plan.contiguous and launch_causal_prefill(q, k, v, cu_seqlens_q, float(scale), out, max_query_len, plan.tiling):
        return out
    return launch_prefix_prefill(*args, prefill_tiling_for(q.device, q.shape[2]) if plan.contiguous else plan.tiling)


def warm_up_prefix_prefill(
    num_q_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> int:
    """Compiles the prefix-prefill variants an eager step can pick: the split-K kernel at each tile
    height (new tokens x group rows) with one split and with several, then the tiled kernel after a
    cached prefix. Otherwise the first step that picks one compiles it inside a request (about a second a
    variant; a ~1.5 s stall of four short hits in the H200 mixed workload looked like one, unconfirmed).
    Returns the launches made."""
    group = num_q_heads // num_kv_heads
    cached = 2 * block_size
    tiled = prefill_tiling_for(device, head_dim)
    most_new = max(tiled.block_m, 128)
    pool = torch.randn(2 + 1, 2, block_size, num_kv_heads, head_dim, device=device).to(dtype)
    k_cache, v_cache = pool[:, 0], pool[:, 1]
    table = torch.tensor([[0, 1]], dtype=torch.int32, device=device)
    cached_lens = torch.tensor([cached], dtype=torch.int32, device=device)
    launches = 0
    for new in sorted({max(1, rows // group) for rows in (16, 32, 64, 128)}):
        q = torch.randn(new, num_q_heads, head_dim, device=device).to(dtype)
        kv = torch.randn(new, num_kv_heads, head_dim, device=device).to(dtype)
        cu = torch.tensor([0, new], dtype=torch.int32, device=device)
        for splits in (1, 2):
            prefix_prefill(q, kv, kv, k_cache, v_cache, table, cu, cached_lens, head_dim**-0.5, num_splits=splits)
            launches += 1
    q = torch.randn(most_new, num_q_heads, head_dim, device=device).to(dtype)
    kv = torch.randn(most_new, num_kv_heads, head_dim, device=device).to(dtype)
    cu = torch.tensor([0, most_new], dtype=torch.int32, device=device)
    launch_prefix_prefill(q, kv, kv, k_cache, v_cache, table, cu, cached_lens, head_dim**-0.5, torch.empty_like(q),
                          most_new, tiled)  # fmt: skip
    return launches + 1


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k/v[T,Hkv,D] go to slots slot_mapping[T] (slot = block * block_size + offset); -1 skips."""
    check_write_kv(k, v, k_cache, v_cache, slot_mapping)
    launch_write_kv(k, v, k_cache, v_cache, slot_mapping)


def check_write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """`write_kv`'s checks (also those of the fused rotary-and-write: `kernels.rotary_and_write_kv`)."""
    op = "write_kv"
    _check_kv_cache(op, k_cache, v_cache)
    expected = (k.shape[0] if k.dim() == 3 else -1, k_cache.shape[2], k_cache.shape[3])
    for name, t in (("k", k), ("v", v)):
        _check_rank(op, name, t, "[num_tokens, num_kv_heads, head_dim]")
        if tuple(t.shape) != expected:
            _fail(op, f"{name} must be [num_tokens, num_kv_heads, head_dim] = {expected}, got {tuple(t.shape)}")
        _check_last_dim_contiguous(op, name, t)
        _check_dtype(op, name, t, _ATTENTION_DTYPES)
    _check_rank(op, "slot_mapping", slot_mapping, "[num_tokens]")
    _check_dtype(op, "slot_mapping", slot_mapping, _INDEX_DTYPES)
    if slot_mapping.shape[0] != k.shape[0]:
        _fail(op, f"slot_mapping must be [num_tokens] = ({k.shape[0]},), got {tuple(slot_mapping.shape)}")
    _check_device(op, k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)


def _is_block_contiguous(t: torch.Tensor) -> bool:
    """Each dim-0 slice is one dense span (the page-first layout); dim 0's own stride is free."""
    expected = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:]), strict=True):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def copy_blocks(src: torch.Tensor, dst: torch.Tensor, src_ids: torch.Tensor, dst_ids: torch.Tensor) -> None:
    """dst[dst_ids[i]] = src[src_ids[i]] for whole blocks (dim 0 indexes blocks), in one launch."""
    op = "copy_blocks"
    if src.dim() < 1 or dst.dim() < 1 or src.shape[1:] != dst.shape[1:]:
        _fail(op, f"src and dst must share their block shape (all dims after 0), got "
                  f"{tuple(src.shape)} and {tuple(dst.shape)}")
    for name, t in (("src", src), ("dst", dst)):
        if not _is_block_contiguous(t):
            _fail(op, f"each block of {name} must be one contiguous span, got shape {tuple(t.shape)} "
                      f"strides {t.stride()}")
    for name, t in (("src_ids", src_ids), ("dst_ids", dst_ids)):
        _check_rank(op, name, t, "[num_pairs]")
        _check_dtype(op, name, t, _INDEX_DTYPES)
    if src_ids.shape != dst_ids.shape:
        _fail(op, f"src_ids and dst_ids lengths differ: {src_ids.shape[0]} vs {dst_ids.shape[0]}")
    _check_device(op, src=src, dst=dst)
    src_ids = src_ids.to(src.device, non_blocking=True)
    dst_ids = dst_ids.to(src.device, non_blocking=True)
    launch_copy_blocks(src, dst, src_ids, dst_ids)


def wait_layer(flags: torch.Tensor, target: torch.Tensor, layer: int) -> None:
    """Holds the current stream until flags[layer] == target[0] (both int32 on the device)."""
    op = "wait_layer"
    _check_dtype(op, "flags", flags, (torch.int32,))
    _check_dtype(op, "target", target, (torch.int32,))
    if not 0 <= layer < flags.numel():
        _fail(op, f"layer {layer} is outside the {flags.numel()} flags")
    launch_wait_layer(flags, target, layer)
