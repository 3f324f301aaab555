"""Triton kernels of the model's elementwise work: (add +) RMSNorm, rotary in place, SiLU-and-multiply.

Each op is one launch and does what its torch twin in `kernels/reference.py` does with the same
roundings: the math runs in float32 and every intermediate the reference keeps in the model's dtype
is rounded to it here too, so half-precision results match the reference to the last bit or so.
The ops read no device memory on the host: safe to capture in a CUDA graph.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.triton_kv_movement import WAIT_MAX_POLLS, launch_wait_layer

__all__ = ["can_rotate_into_cache", "rms_norm", "rotary", "rotary_and_write_kv", "silu_and_mul"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# Elements one program of the row-wise kernels holds: rows are packed until a tile has about this many.
_TILE_ELEMENTS = 4096
_SILU_BLOCK = 1024


def _fail(op: str, message: str) -> None:
    raise ValueError(f"{op}: {message}")


def _check_tensor(op: str, name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    if t.dtype not in _DTYPES:
        _fail(op, f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        _fail(op, f"{name} dtype {t.dtype} differs from {dtype}")
    if t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        _fail(op, f"{name} must have a contiguous last dimension, got strides {t.stride()}")


def _check_device(op: str, *tensors: torch.Tensor) -> None:
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        _fail(op, "all tensors must be on one device, got " + ", ".join(str(t.device) for t in tensors))
    if device.type != "cuda" and not _INTERPRETED:
        _fail(op, f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 at import), got device {device}")


def _check_out(op: str, out: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(out.shape) != tuple(shape) or out.dtype != like.dtype or out.device != like.device:
        _fail(op, f"out must be {like.dtype} {tuple(shape)} on {like.device}, got {out.dtype} "
                  f"{tuple(out.shape)} on {out.device}")  # fmt: skip
    if not out.is_contiguous():
        _fail(op, f"out must be contiguous, got strides {out.stride()}")
    return out


def _rows_view(op: str, name: str, t: torch.Tensor) -> tuple[int, int, int, int]:
    """[N], [R, N] or [R0, R1, N] as (R0, R1, stride0, stride1): rows are indexed (r // R1, r % R1),
    which covers a head-split slice of a fused projection without a copy."""
    if t.dim() == 1:
        return 1, 1, 0, 0
    if t.dim() == 2:
        return t.shape[0], 1, t.stride(0), 0
    if t.dim() == 3:
        return t.shape[0], t.shape[1], t.stride(0), t.stride(1)
    _fail(op, f"{name} must have 1 to 3 dimensions, got shape {tuple(t.shape)}")
    raise AssertionError  # unreachable


# num_rows is the step's token count: specialising on it (== 1, multiple of 16) compiled a new variant
# the first time an eager step of an unseen size came up, a stall of seconds on a serving engine.
@triton.jit(do_not_specialize=["num_rows"])
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr,
    num_rows, n1, n, eps,
    sx0, sx1, sr0, sr1,
    HAS_RESIDUAL: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < num_rows
    mask = row_ok[:, None] & (cols < n)[None, :]
    r0, r1 = rows // n1, rows % n1
    x_off = (r0.to(tl.int64) * sx0 + r1.to(tl.int64) * sx1)[:, None] + cols[None, :]
    x = tl.load(x_ptr + x_off, mask=mask, other=0.0)
    dtype = x.dtype
    if HAS_RESIDUAL:
        # The sum is what the reference keeps in the residual stream: rounded to the model's dtype.
        r_off = (r0.to(tl.int64) * sr0 + r1.to(tl.int64) * sr1)[:, None] + cols[None, :]
        res = tl.load(res_ptr + r_off, mask=mask, other=0.0)
        total = (res.to(tl.float32) + x.to(tl.float32)).to(dtype)
        tl.store(res_ptr + r_off, total, mask=mask)
        x = total
    xf = x.to(tl.float32)
    inv_rms = tl.math.rsqrt(tl.sum(xf * xf, axis=1) / n + eps)
    normed = (xf * inv_rms[:, None]).to(dtype)
    w = tl.load(w_ptr + cols, mask=cols < n, other=0.0)
    out = (w[None, :].to(tl.float32) * normed.to(tl.float32)).to(dtype)
    out_off = rows.to(tl.int64)[:, None] * n + cols[None, :]
    tl.store(out_ptr + out_off, out, mask=mask)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dimension of x [..., N] (up to 3 dims, any leading strides) -> a
    contiguous tensor of x's shape (`out` when given). With `residual` (x's shape and dtype):
    `residual += x` in place first and the sum is normalised; returns (normed, residual)."""
    op = "rms_norm"
    _check_tensor(op, "x", x)
    _check_tensor(op, "weight", weight, x.dtype)
    n = x.shape[-1]
    if weight.shape != (n,):
        _fail(op, f"weight must be [{n}], got shape {tuple(weight.shape)}")
    n0, n1, sx0, sx1 = _rows_view(op, "x", x)
    sr0 = sr1 = 0
    if residual is not None:
        _check_tensor(op, "residual", residual, x.dtype)
        if residual.shape != x.shape:
            _fail(op, f"residual shape {tuple(residual.shape)} differs from x's {tuple(x.shape)}")
        _, _, sr0, sr1 = _rows_view(op, "residual", residual)
    out = _check_out(op, out, x.shape, x)
    _check_device(op, x, weight, out, *([residual] if residual is not None else []))
    num_rows = n0 * n1
    if num_rows and n:
        block_n = triton.next_power_of_2(n)
        block_rows = max(1, min(_TILE_ELEMENTS // block_n, triton.next_power_of_2(num_rows)))
        num_warps = 8 if block_rows * block_n >= 4096 else 4
        _rms_norm_kernel[(triton.cdiv(num_rows, block_rows),)](
            x, residual if residual is not None else x, weight, out,
            num_rows, n1, n, float(eps), sx0, sx1, sr0, sr1,
            HAS_RESIDUAL=residual is not None, BLOCK_ROWS=block_rows, BLOCK_N=block_n, num_warps=num_warps,
        )  # fmt: skip
    return out if residual is None else (out, residual)


# `layer` changes from call to call: specialising on it (== 1, multiple of 16) would compile variants.
@triton.jit(do_not_specialize=["layer"])
def _rotary_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr,
    k_cache_ptr, v_cache_ptr, slot_ptr, flags_ptr, target_ptr, layer,
    num_q_heads, num_kv_heads, num_heads, half,
    sq0, sq1, sk0, sk1, sv0, sv1, s_table,
    skcb, skct, skch, svcb, svct, svch,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, PAGE_SIZE: tl.constexpr,
    STORE_KV: tl.constexpr, WAIT: tl.constexpr, MAX_POLLS: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    dim_ok = dims < half
    pos = tl.load(pos_ptr + token).to(tl.int64)
    cos = tl.load(cos_ptr + pos * s_table + dims, mask=dim_ok, other=0.0)
    sin = tl.load(sin_ptr + pos * s_table + dims, mask=dim_ok, other=0.0)
    # One tile spans q's heads, then k's, then (STORE_KV) v's, which only move to the cache.
    is_q = heads < num_q_heads
    is_k = (heads >= num_q_heads) & (heads < num_q_heads + num_kv_heads)
    q_off = token * sq0 + heads.to(tl.int64) * sq1
    k_off = token * sk0 + (heads - num_q_heads).to(tl.int64) * sk1
    v_off = token * sv0 + (heads - num_q_heads - num_kv_heads).to(tl.int64) * sv1
    base = tl.where(is_q, q_ptr + q_off, tl.where(is_k, k_ptr + k_off, v_ptr + v_off))
    mask = (heads < num_heads)[:, None] & dim_ok[None, :]
    ptr1 = base[:, None] + dims[None, :]
    ptr2 = ptr1 + half
    x1 = tl.load(ptr1, mask=mask, other=0.0)
    x2 = tl.load(ptr2, mask=mask, other=0.0)
    dtype = x1.dtype
    # The tables in the model's dtype, each product and the sum rounded to it: the reference's
    # x * cos + rotate_half(x) * sin, one op at a time.
    c = cos.to(dtype).to(tl.float32)[None, :]
    s = sin.to(dtype).to(tl.float32)[None, :]
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    ac, bs = (a * c).to(dtype).to(tl.float32), (b * s).to(dtype).to(tl.float32)
    bc, as_ = (b * c).to(dtype).to(tl.float32), (a * s).to(dtype).to(tl.float32)
    turned1, turned2 = (ac - bs).to(dtype), (bc + as_).to(dtype)
    turns = (is_q | is_k)[:, None]
    tl.store(ptr1, turned1, mask=mask & turns)
    tl.store(ptr2, turned2, mask=mask & turns)
    if STORE_KV:
        # The turned k and the untouched v into the token's slot; slot -1 (a padding token) skips.
        # (Broadcast first: the interpreter rejects a mask built from a scalar comparison.)
        slot = tl.load(slot_ptr + token).to(tl.int64) + tl.zeros([BLOCK_H], tl.int64)
        page, offset = slot // PAGE_SIZE, slot % PAGE_SIZE
        k_dst = k_cache_ptr + page * skcb + offset * skct + (heads - num_q_heads).to(tl.int64) * skch
        v_dst = v_cache_ptr + page * svcb + offset * svct + (heads - num_q_heads - num_kv_heads).to(tl.int64) * svch
        dst = tl.where(is_k, k_dst, v_dst)[:, None] + dims[None, :]
        cached = mask & ((~is_q) & (slot >= 0))[:, None]
        tl.store(dst, tl.where(turns, turned1, x1), mask=cached)
        tl.store(dst + half, tl.where(turns, turned2, x2), mask=cached)
    if WAIT:  # noqa: SIM102 - a compile-time branch around a run-time one
        # One program holds the launch until layer `layer`'s loads have landed (`LayerGate`), so the
        # attention launched after it reads them: the separate wait kernel, folded in.
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            target = tl.load(target_ptr, volatile=True)
            polls = 0
            while (tl.load(flags_ptr + layer, volatile=True) != target) & (polls < MAX_POLLS):
                polls += 1


def _check_rotary(
    op: str, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor
) -> int:
    """Validates rotary's arguments; returns half the rotary dims."""
    _check_tensor(op, "q", q)
    _check_tensor(op, "k", k, q.dtype)
    if q.dim() != 3 or k.dim() != 3 or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        _fail(op, f"q must be [T, Hq, D] and k [T, Hkv, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype != torch.float32 or t.dim() != 2 or t.stride(1) != 1:
            _fail(op, f"{name} must be a float32 [max_positions, R/2] table, got {t.dtype} {tuple(t.shape)}")
    if cos.shape != sin.shape or cos.stride() != sin.stride():
        _fail(op, f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ")
    half = cos.shape[1]
    if 2 * half > q.shape[2]:
        _fail(op, f"the tables rotate {2 * half} dims, more than head_dim {q.shape[2]}")
    if (
        positions.dim() != 1
        or positions.shape[0] != q.shape[0]
        or positions.dtype not in (torch.int32, torch.int64)
    ):
        _fail(
            op,
            f"positions must be int32/int64 [{q.shape[0]}], got {positions.dtype} {tuple(positions.shape)}",
        )
    return half


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [T, Hq, D] and k [T, Hkv, D] in place (rotate-half form) at `positions` [T].

    cos/sin: float32 tables [max_positions, R/2] of the rotary dimensions R <= D; the first R of
    each head's D dims turn, the rest stay. Returns (q, k)."""
    op = "rotary"
    half = _check_rotary(op, q, k, cos, sin, positions)
    _check_device(op, q, k, cos, sin, positions)
    _launch_rotary(q, k, cos, sin, positions, half)
    return q, k


def can_rotate_into_cache(q: torch.Tensor, cos: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether `rotary_and_write_kv` can run as one launch: every dim turns (a tile then covers whole
    heads) and the cache holds q's dtype. Else the caller runs the ops apart."""
    return q.dim() == 3 and 2 * cos.shape[-1] == q.shape[-1] and k_cache.dtype == q.dtype


def rotary_and_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    wait: tuple[torch.Tensor, torch.Tensor, int] | None = None,
) -> None:
    """`rotary(q, k)`, then the turned k and v into their slots (as `write_kv`), then with `wait`
    (flags, target, layer) the stream held until `flags[layer] == target[0]` (as `wait_layer`): one
    launch. The caller has run `write_kv`'s checks of the cache side and `can_rotate_into_cache`."""
    op = "rotary_and_write_kv"
    half = _check_rotary(op, q, k, cos, sin, positions)
    _check_tensor(op, "v", v, q.dtype)
    if tuple(v.shape) != tuple(k.shape):
        _fail(op, f"v must be shaped like k {tuple(k.shape)}, got {tuple(v.shape)}")
    if not can_rotate_into_cache(q, cos, k_cache):
        _fail(op, "one launch needs every dim rotated and a cache of q's dtype")
    _check_device(op, q, k, v, cos, sin, positions, k_cache, v_cache, slot_mapping)
    _launch_rotary(q, k, cos, sin, positions, half, (v, k_cache, v_cache, slot_mapping), wait)


def _launch_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    half: int,
    kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    wait: tuple[torch.Tensor, torch.Tensor, int] | None = None,
    max_polls: int = WAIT_MAX_POLLS,
) -> None:
    T, num_q_heads, num_kv_heads = q.shape[0], q.shape[1], k.shape[1]
    num_heads = num_q_heads + num_kv_heads * (2 if kv is not None else 1)
    if T == 0 or half == 0:
        # Nothing to turn or store (a full-rotary store has half > 0), but a wait still holds the stream.
        if wait is not None:
            launch_wait_layer(*wait, max_polls)
        return
    v, k_cache, v_cache, slots = kv if kv is not None else (k, k, k, positions)
    flags, target, layer = wait if wait is not None else (positions, positions, 0)
    block_half = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(num_heads), max(1, 1024 // block_half))
    _rotary_kernel[(T, triton.cdiv(num_heads, block_h))](
        q, k, v, cos, sin, positions,
        k_cache, v_cache, slots, flags, target, layer,
        num_q_heads, num_kv_heads, num_heads, half,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        *(k_cache.stride()[:3] if kv is not None else (0, 0, 0)),
        *(v_cache.stride()[:3] if kv is not None else (0, 0, 0)),
        BLOCK_H=block_h, BLOCK_HALF=block_half, PAGE_SIZE=k_cache.shape[1] if kv is not None else 1,
        STORE_KV=kv is not None, WAIT=wait is not None, MAX_POLLS=max_polls,
        num_warps=4,
        enable_fp_fusion=False,  # no fused multiply-add: each product is rounded, as in the reference
    )  # fmt: skip


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, inter, sx0, so0, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * sx0 + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * sx0 + inter + cols, mask=mask, other=0.0)
    dtype = gate.dtype
    g = gate.to(tl.float32)
    # F.silu on half precision: computed in float32, rounded once; then the product, rounded.
    act = (g / (1.0 + tl.exp(-g))).to(dtype)
    tl.store(out_ptr + row * so0 + cols, (act.to(tl.float32) * up.to(tl.float32)).to(dtype), mask=mask)


def silu_and_mul(gate_up: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up [T, 2I] (gate, then up) -> silu(gate) * up [T, I] (`out` when given)."""
    op = "silu_and_mul"
    _check_tensor(op, "gate_up", gate_up)
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        _fail(op, f"gate_up must be [T, 2 * intermediate], got shape {tuple(gate_up.shape)}")
    T, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = _check_out(op, out, (T, inter), gate_up)
    _check_device(op, gate_up, out)
    if T and inter:
        block = min(_SILU_BLOCK, triton.next_power_of_2(inter))
        _silu_and_mul_kernel[(T, triton.cdiv(inter, block))](
            gate_up, out, inter, gate_up.stride(0), out.stride(0), BLOCK=block, num_warps=4
        )
    return out
