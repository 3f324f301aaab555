"""Torch twins of the Triton kernels: the oracle of the tests and the engine's path off CUDA.

Shapes follow the calls of `kernels/__init__.py`. `k_cache`/`v_cache` are (possibly strided) views
`[num_blocks, block_size, num_kv_heads, head_dim]` of one layer of the page-first pool.
Attention is computed in float32 (float64 when given float64) and returned in q's dtype.
"""

from __future__ import annotations

import torch

# Elements of one tile's score matrix (float32: 256 MiB).
_SCORE_BUDGET = 1 << 26


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


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
) -> torch.Tensor:
    """q[B,Hq,D] attends to the first context_lens[b] tokens of its blocks -> [B,Hq,D].

    A zero context (a padding row) gives zeros. `max_context_len`, when given, bounds the lengths
    and spares a device sync; `out` receives the result when given.
    """
    B, Hq, D = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    acc = _acc_dtype(q)
    if B == 0:
        return q.new_empty((0, Hq, D)) if out is None else out
    max_len = int(context_lens.max().item()) if max_context_len is None else max_context_len
    nblk = (max_len + bs - 1) // bs
    bt = block_table[:, :nblk].long()
    k = k_cache[bt].reshape(B, nblk * bs, Hkv, D)[:, :max_len].to(acc)
    v = v_cache[bt].reshape(B, nblk * bs, Hkv, D)[:, :max_len].to(acc)
    g = Hq // Hkv
    qg = q.to(acc).view(B, Hkv, g, D)
    scores = torch.einsum("bhgd,bthd->bhgt", qg, k) * scale
    pos = torch.arange(max_len, device=q.device)
    mask = pos[None, :] >= context_lens.to(q.device).long()[:, None]
    scores.masked_fill_(mask[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an all-masked row (zero context) -> zeros
    result = torch.einsum("bhgt,bthd->bhgd", p, v).reshape(B, Hq, D).to(q.dtype)
    if out is None:
        return result
    out.copy_(result)
    return out


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
) -> torch.Tensor:
    """Packed new tokens q/k/v[T,H,D]; sequence b's tokens sit at positions cached_lens[b] + i.

    They attend to the b-th sequence's cached tokens (read from the pool through block_table) and,
    causally, to the sequence's own new tokens. `out` receives the result when given.
    """
    _, Hq, D = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    g = Hq // Hkv
    acc = _acc_dtype(q)
    if out is None:
        out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    cl = cached_lens.tolist()
    for b in range(len(cu) - 1):
        s, e = cu[b], cu[b + 1]
        n, c = e - s, cl[b]
        if n == 0:
            continue
        if c > 0:
            nblk = (c + bs - 1) // bs
            bt = block_table[b, :nblk].long()
            kc = k_cache[bt].reshape(nblk * bs, Hkv, D)[:c]
            vc = v_cache[bt].reshape(nblk * bs, Hkv, D)[:c]
            kk = torch.cat([kc, k[s:e]], 0).to(acc)
            vv = torch.cat([vc, v[s:e]], 0).to(acc)
        else:
            kk, vv = k[s:e].to(acc), v[s:e].to(acc)
        # Query rows in tiles: a [heads, rows, context] score matrix of a whole long prompt
        # would not fit in memory (32k x 32k x heads x 4 bytes).
        tile = max(16, _SCORE_BUDGET // max(1, Hq * (c + n)))
        for r0 in range(0, n, tile):
            r1 = min(n, r0 + tile)
            keys = c + r1  # causal: nothing past the tile's last query
            qq = q[s + r0 : s + r1].to(acc).view(r1 - r0, Hkv, g, D)
            scores = torch.einsum("nhgd,thd->hgnt", qq, kk[:keys]) * scale
            qpos = c + torch.arange(r0, r1, device=q.device)
            kpos = torch.arange(keys, device=q.device)
            scores.masked_fill_((kpos[None, :] > qpos[:, None])[None, None], float("-inf"))
            p = torch.softmax(scores, dim=-1)
            o = torch.einsum("hgnt,thd->nhgd", p, vv[:keys])
            out[s + r0 : s + r1] = o.reshape(r1 - r0, Hq, D).to(q.dtype)
    return out


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """k/v[T,Hkv,D] go to slots slot_mapping[T] (slot = block * block_size + offset); -1 skips."""
    bs = k_cache.shape[1]
    slots = slot_mapping.long()
    keep = slots >= 0
    if not bool(keep.all()):
        slots, k, v = slots[keep], k[keep], v[keep]
    blk, off = slots // bs, slots % bs
    k_cache[blk, off] = k.to(k_cache.dtype)
    v_cache[blk, off] = v.to(v_cache.dtype)


def copy_blocks(src: torch.Tensor, dst: torch.Tensor, src_ids: torch.Tensor, dst_ids: torch.Tensor) -> None:
    """dst[dst_ids[i]] = src[src_ids[i]] for whole blocks (dim 0 indexes blocks)."""
    dst[dst_ids.long().to(dst.device)] = src[src_ids.long().to(src.device)].to(dst.device, dst.dtype)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dimension: normalised in float32 (float64 when given float64), cast to
    x's dtype, then scaled by weight in that dtype. With `residual`: `residual += x` in place first
    (in x's dtype, as the reference model adds) and the sum is normalised; returns (normed, residual).
    `out` receives the result when given."""
    if residual is not None:
        residual.add_(x)
        x = residual
    acc = _acc_dtype(x)
    normed = torch.nn.functional.rms_norm(x.to(acc), (x.shape[-1],), eps=eps).to(x.dtype)
    if out is None:
        out = weight * normed
    else:
        torch.mul(weight, normed, out=out)
    return out if residual is None else (out, residual)


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [T,Hq,D] and k [T,Hkv,D] in place, rotate-half form, at `positions` [T].

    cos/sin: float32 tables [max_positions, R/2] of the rotary dims R <= D (the first R dims of each
    head turn). Every product and sum in q's dtype: the rounding of the reference model's
    `x * cos + rotate_half(x) * sin`."""
    half = cos.shape[1]
    c = cos[positions.long()].to(q.dtype).unsqueeze(1)
    s = sin[positions.long()].to(q.dtype).unsqueeze(1)
    for x in (q, k):
        x1, x2 = x[..., :half], x[..., half : 2 * half]
        turned = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)
        x[..., : 2 * half] = turned
    return q, k


def silu_and_mul(gate_up: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up [T, 2I] (gate, then up) -> silu(gate) * up [T, I], each op in gate_up's dtype."""
    gate, up = gate_up.chunk(2, dim=-1)
    if out is None:
        return torch.nn.functional.silu(gate) * up
    return torch.mul(torch.nn.functional.silu(gate), up, out=out)


def wait_layer(flags: torch.Tensor, target: torch.Tensor, layer: int) -> None:
    """Nothing to wait for: off CUDA every load has finished when it returns."""
