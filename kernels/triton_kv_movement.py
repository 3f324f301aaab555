"""KV movement in Triton: new K/V into their slots, and whole blocks between tensors in one launch.

Callers validate arguments first (`kernels.triton_ops`); these launchers trust what they get.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements one copy_blocks program moves: large enough for wide vector loads, small enough that one
# block of a many-layer pool is spread over many programs.
COPY_CHUNK = 4096


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_kcb, stride_kct, stride_kch,
    stride_vcb, stride_vct, stride_vch,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    # slot -1: a padding token, nothing to write. (Broadcast first: the interpreter rejects a mask
    # built from a scalar comparison.)
    keep = (heads[:, None] < NUM_KV_HEADS) & ((slot + tl.zeros([1, HEAD_DIM], tl.int64)) >= 0)
    page = slot // PAGE_SIZE
    offset = slot % PAGE_SIZE
    k = tl.load(k_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=keep)
    v = tl.load(v_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=keep)
    k_dst = k_cache_ptr + page * stride_kcb + offset * stride_kct + heads[:, None] * stride_kch + dims[None, :]
    v_dst = v_cache_ptr + page * stride_vcb + offset * stride_vct + heads[:, None] * stride_vch + dims[None, :]
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=keep)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _copy_blocks_kernel(
    src_ptr, dst_ptr, src_ids_ptr, dst_ids_ptr,
    stride_src, stride_dst,
    block_numel,
    CHUNK: tl.constexpr,
):
    pair = tl.program_id(0)
    chunk = tl.program_id(1)
    src_block = tl.load(src_ids_ptr + pair).to(tl.int64)
    dst_block = tl.load(dst_ids_ptr + pair).to(tl.int64)
    offsets = chunk.to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    inside = offsets < block_numel
    values = tl.load(src_ptr + src_block * stride_src + offsets, mask=inside)
    tl.store(dst_ptr + dst_block * stride_dst + offsets, values.to(dst_ptr.dtype.element_ty), mask=inside)


def launch_write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1),
        v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim,
        PAGE_SIZE=k_cache.shape[1],
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1,
    )


def launch_copy_blocks(src: torch.Tensor, dst: torch.Tensor, src_ids: torch.Tensor, dst_ids: torch.Tensor) -> None:
    """dst[dst_ids[i]] = src[src_ids[i]]; every block (dim 0 slice) of both is one contiguous span."""
    pairs = src_ids.shape[0]
    block_numel = src[0].numel() if src.shape[0] else dst[0].numel()
    if pairs == 0 or block_numel == 0:
        return
    grid = (pairs, triton.cdiv(block_numel, COPY_CHUNK))
    _copy_blocks_kernel[grid](
        src, dst, src_ids, dst_ids, src.stride(0), dst.stride(0), block_numel, CHUNK=COPY_CHUNK, num_warps=4
    )


# Polls before a wait gives up: ~0.5 µs each (an L2 round trip), so minutes, far beyond any load.
# A wait that never ends would hang the stream; one that gives up after this long means a load was
# never queued, a bug the wrong logits then show.
WAIT_MAX_POLLS = 1 << 28


@triton.jit(do_not_specialize=["layer"])
def _wait_layer_kernel(flags_ptr, target_ptr, layer, MAX_POLLS: tl.constexpr):
    # Volatile: every poll reads memory, where the copy engine writes the flag after the layer's copies.
    target = tl.load(target_ptr, volatile=True)
    polls = 0
    while (tl.load(flags_ptr + layer, volatile=True) != target) & (polls < MAX_POLLS):
        polls += 1


def launch_wait_layer(
    flags: torch.Tensor, target: torch.Tensor, layer: int, max_polls: int = WAIT_MAX_POLLS
) -> None:
    _wait_layer_kernel[(1,)](flags, target, layer, MAX_POLLS=max_polls, num_warps=1)
