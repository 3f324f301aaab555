"""Attention, block-movement and fused elementwise kernels: Triton on CUDA, the torch twins elsewhere.

One function per op; each picks its implementation from the tensors it is given. Set
`CACHEPROXY_KERNELS=reference` to force the torch twins (debugging, comparisons).
"""

from __future__ import annotations

import os

import torch

from kernels import reference

try:  # Triton is optional off CUDA; the twins cover the CPU path.
    from kernels import triton_ops as _triton
except Exception:  # pragma: no cover - depends on the install
    _triton = None  # type: ignore[assignment]
try:
    from kernels import triton_fused as _fused
except Exception:  # pragma: no cover - depends on the install
    _fused = None  # type: ignore[assignment]


def _use_triton(t: torch.Tensor) -> bool:
    return _triton is not None and t.is_cuda and os.environ.get("CACHEPROXY_KERNELS") != "reference"


def _use_fused(t: torch.Tensor) -> bool:
    return _fused is not None and t.is_cuda and os.environ.get("CACHEPROXY_KERNELS") != "reference"


def paged_decode(q, k_cache, v_cache, block_table, context_lens, scale, *, out=None, max_context_len=None):  # type: ignore[no-untyped-def]
    """`out`: a preallocated [B,Hq,D] result (CUDA graphs). `max_context_len`: a host-side bound on
    context_lens; Triton sizes its split-K from it (default: the block table's capacity)."""
    impl = _triton if _use_triton(q) else reference
    return impl.paged_decode(
        q, k_cache, v_cache, block_table, context_lens, scale, out=out, max_context_len=max_context_len
    )


def prefix_prefill(q, k, v, k_cache, v_cache, block_table, cu_seqlens_q, cached_lens, scale, *, out=None, max_query_len=None, max_cached_len=None):  # type: ignore[no-untyped-def]
    """`max_query_len`: a host-side bound on any sequence's new tokens (default: all T tokens);
    `max_cached_len`: one on any sequence's cached tokens (default: the block table's capacity).
    Triton sizes its grid and split-K from them; a tight `max_cached_len` helps few-token prefills."""
    if _use_triton(q):
        return _triton.prefix_prefill(
            q, k, v, k_cache, v_cache, block_table, cu_seqlens_q, cached_lens, scale,
            out=out, max_query_len=max_query_len, max_cached_len=max_cached_len,
        )
    return reference.prefix_prefill(q, k, v, k_cache, v_cache, block_table, cu_seqlens_q, cached_lens, scale, out=out)


def warm_up(num_q_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype, device: torch.device) -> None:
    """Compiles, on CUDA, the attention variants an eager step may pick, before any request does."""
    if _triton is not None and device.type == "cuda" and os.environ.get("CACHEPROXY_KERNELS") != "reference":
        _triton.warm_up_prefix_prefill(num_q_heads, num_kv_heads, head_dim, block_size, dtype, device)


def write_kv(k, v, k_cache, v_cache, slot_mapping):  # type: ignore[no-untyped-def]
    impl = _triton if _use_triton(k) else reference
    return impl.write_kv(k, v, k_cache, v_cache, slot_mapping)


def copy_blocks(src, dst, src_ids, dst_ids):  # type: ignore[no-untyped-def]
    impl = _triton if (_use_triton(src) and dst.is_cuda) else reference
    return impl.copy_blocks(src, dst, src_ids, dst_ids)


def wait_layer(flags, target, layer):  # type: ignore[no-untyped-def]
    """Holds the stream until `flags[layer] == target[0]`: layer `layer`'s K/V, copied on another
    stream that writes the flag after them, have landed (`LayerGate`). A synchronisation, not a
    computation: on CUDA it is the Triton kernel whatever CACHEPROXY_KERNELS says (the twin would let
    attention read blocks still on their way); elsewhere nothing is in flight."""
    if flags.is_cuda:
        if _triton is None:
            raise RuntimeError("waiting on the device needs Triton")
        return _triton.wait_layer(flags, target, layer)
    return reference.wait_layer(flags, target, layer)


def can_wait_on_device() -> bool:
    """Whether `wait_layer` can hold a CUDA stream (Triton is installed)."""
    return _triton is not None


def rms_norm(x, weight, eps, residual=None, *, out=None):  # type: ignore[no-untyped-def]
    """RMSNorm of x's last dim -> normed; with `residual`: `residual += x` in place, the sum is
    normalised, and (normed, residual) comes back (the add + norm between sublayers)."""
    impl = _fused if _use_fused(x) else reference
    return impl.rms_norm(x, weight, eps, residual, out=out)


def rotary(q, k, cos, sin, positions):  # type: ignore[no-untyped-def]
    """Rotates q [T,Hq,D] and k [T,Hkv,D] in place at positions [T]; cos/sin: float32 [max_pos, R/2]."""
    impl = _fused if _use_fused(q) else reference
    return impl.rotary(q, k, cos, sin, positions)


def rotary_and_write_kv(q, k, v, cos, sin, positions, k_cache, v_cache, slot_mapping, *, wait=None):  # type: ignore[no-untyped-def]
    """`rotary(q, k, ...)`, `write_kv` of the turned k and v, then with `wait` = (flags, target,
    layer) `wait_layer`: one launch on CUDA where every dim turns and the cache holds q's dtype (two
    kernel launches and their gaps fewer a layer), the three ops in turn elsewhere."""
    if _use_fused(q) and _triton is not None and _fused.can_rotate_into_cache(q, cos, k_cache):
        _triton.check_write_kv(k, v, k_cache, v_cache, slot_mapping)
        return _fused.rotary_and_write_kv(q, k, v, cos, sin, positions, k_cache, v_cache, slot_mapping, wait)
    rotary(q, k, cos, sin, positions)
    write_kv(k, v, k_cache, v_cache, slot_mapping)
    if wait is not None:
        wait_layer(*wait)
    return None


def silu_and_mul(gate_up, *, out=None):  # type: ignore[no-untyped-def]
    """[T, 2I] (gate, then up) -> silu(gate) * up [T, I]."""
    impl = _fused if _use_fused(gate_up) else reference
    return impl.silu_and_mul(gate_up, out=out)


__all__ = [
    "copy_blocks", "paged_decode", "prefix_prefill", "reference", "rms_norm", "rotary", "rotary_and_write_kv",
    "silu_and_mul", "wait_layer", "warm_up", "write_kv",
]  # fmt: skip
