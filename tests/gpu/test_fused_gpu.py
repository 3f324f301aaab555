"""On the GPU, at Llama-3-8B's sizes (hidden 4096, intermediate 14336, 32 query and 8 KV heads of 128;
also heads of 64), the fused elementwise kernels in bf16 and fp16 compute what float64 says, round as
their torch twins do, and replay in a CUDA graph.

Outputs are NaN-poisoned before each run; inputs are fresh random every run (the seed is printed on failure).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from cacheproxy.engine.rotary import inverse_frequencies
from kernels import reference, triton_fused

HIDDEN, INTERMEDIATE, NUM_Q_HEADS, NUM_KV_HEADS = 4096, 14336, 32, 8
MAX_POSITIONS = 131072
LLAMA3_SCALING = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}  # fmt: skip
DTYPES = [torch.bfloat16, torch.float16]
TOKENS = [1, 7, 64, 2049]
# Worst error relative to the largest expected magnitude: a few roundings in the model's dtype.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3}
EPS = 1e-5


@pytest.fixture
def gen() -> tuple[torch.Generator, int]:
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator(device="cuda").manual_seed(seed), seed


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(dtype)


def _assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, seed: int, what: str
) -> None:
    assert not actual.isnan().any(), f"{what}: NaN left in the output (seed {seed})"
    scale = expected.abs().max().item() or 1.0
    err = (actual.double() - expected.double()).abs().max().item() / scale
    assert err <= TOLERANCE[dtype], (
        f"{what}: max error {err:.3g} of the scale > {TOLERANCE[dtype]} (seed {seed})"
    )


def _assert_rotary_close(ours: torch.Tensor, twin: torch.Tensor, before: torch.Tensor, seed: int) -> None:
    """Within two ulps of 2 x the token's largest input (|x1 cos| + |x2 sin| is at most that)."""
    scale = 2 * before.double().abs().amax(dim=-1, keepdim=True)
    ulp = 2 * torch.finfo(twin.dtype).eps * scale
    off = ((ours.double() - twin.double()).abs() > ulp).sum().item()
    assert off == 0, f"rotary: {off} elements more than two ulps of the operands (seed {seed})"


def _assert_within_two_ulps(actual: torch.Tensor, twin: torch.Tensor, seed: int, what: str) -> None:
    """The same roundings in the same order: an intermediate one ulp off (exp, rsqrt) leaves the result
    at most two ulps off."""
    eps = torch.finfo(twin.dtype).eps
    tiny = torch.finfo(twin.dtype).tiny
    ulp = 2 * eps * twin.double().abs().clamp_min(tiny)
    off = ((actual.double() - twin.double()).abs() > ulp).sum().item()
    assert off == 0, f"{what}: {off} elements more than two ulps from the twin (seed {seed})"


def _tables(head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = inverse_frequencies(head_dim, 500000.0, LLAMA3_SCALING)
    freqs = torch.outer(torch.arange(MAX_POSITIONS, dtype=torch.float32), inv).cuda()
    return freqs.cos(), freqs.sin()


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_and_rms_norm_match_float64(dtype: torch.dtype, tokens: int, gen: Any) -> None:
    g, seed = gen
    x, residual = _randn(g, tokens, HIDDEN, dtype=dtype, scale=3), _randn(g, tokens, HIDDEN, dtype=dtype)
    weight = (torch.rand(HIDDEN, device="cuda", generator=g) * 2 + 0.1).to(dtype)

    out = torch.full_like(x, float("nan"))
    triton_fused.rms_norm(x, weight, EPS, out=out)
    xd = x.double()
    expected = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + EPS) * weight.double()
    _assert_close(out, expected, dtype, seed, "rms_norm")
    _assert_within_two_ulps(out, reference.rms_norm(x, weight, EPS), seed, "rms_norm")

    res = residual.clone()
    out = torch.full_like(x, float("nan"))
    triton_fused.rms_norm(x, weight, EPS, res, out=out)
    total = (residual.double() + x.double()).to(dtype)
    assert torch.equal(res, total), f"residual += x not rounded once to {dtype} (seed {seed})"
    td = total.double()
    expected = td * torch.rsqrt(td.pow(2).mean(-1, keepdim=True) + EPS) * weight.double()
    _assert_close(out, expected, dtype, seed, "add + rms_norm")
    twin_res = residual.clone()
    twin_out, _ = reference.rms_norm(x, weight, EPS, twin_res)
    _assert_within_two_ulps(out, twin_out, seed, "add + rms_norm")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_head_rms_norm_of_a_fused_projection_slice(dtype: torch.dtype, gen: Any) -> None:
    """Qwen3's q/k norm reads heads straight out of the qkv output (strided rows)."""
    g, seed = gen
    qkv = _randn(g, 300, (NUM_Q_HEADS + 2 * NUM_KV_HEADS) * 128, dtype=dtype)
    k = qkv[:, NUM_Q_HEADS * 128 : (NUM_Q_HEADS + NUM_KV_HEADS) * 128].view(300, NUM_KV_HEADS, 128)
    weight = (torch.rand(128, device="cuda", generator=g) + 0.5).to(dtype)
    out = torch.full(k.shape, float("nan"), device="cuda", dtype=dtype)
    triton_fused.rms_norm(k, weight, EPS, out=out)
    kd = k.double()
    _assert_close(
        out, kd * torch.rsqrt(kd.pow(2).mean(-1, keepdim=True) + EPS) * weight.double(), dtype, seed, "k_norm"
    )
    _assert_within_two_ulps(out, reference.rms_norm(k, weight, EPS), seed, "k_norm")


@pytest.mark.parametrize("head_dim", [128, 64])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_matches_float64_in_place_on_qkv_views(
    dtype: torch.dtype, tokens: int, head_dim: int, gen: Any
) -> None:
    g, seed = gen
    cos, sin = _tables(head_dim)
    width = (NUM_Q_HEADS + 2 * NUM_KV_HEADS) * head_dim
    qkv = _randn(g, tokens, width, dtype=dtype)
    positions = torch.randint(0, MAX_POSITIONS, (tokens,), device="cuda", generator=g, dtype=torch.int64)
    positions[:1] = MAX_POSITIONS - 1

    def split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = t[:, : NUM_Q_HEADS * head_dim].view(tokens, NUM_Q_HEADS, head_dim)
        k = t[:, NUM_Q_HEADS * head_dim : (NUM_Q_HEADS + NUM_KV_HEADS) * head_dim].view(
            tokens, NUM_KV_HEADS, head_dim
        )
        return q, k

    ours, twin = qkv.clone(), qkv.clone()
    triton_fused.rotary(*split(ours), cos, sin, positions)
    reference.rotary(*split(twin), cos, sin, positions)
    # The same products and sums in the same dtype. Where x1*cos and x2*sin nearly cancel, one ulp of a
    # product is many of the result, so the bound is in ulps of the operands, not of the result.
    _assert_rotary_close(ours, twin, qkv, seed)
    turned = (NUM_Q_HEADS + NUM_KV_HEADS) * head_dim
    assert torch.equal(ours[:, turned:], qkv[:, turned:]), "v was touched"

    half = head_dim // 2
    c, s = cos.double()[positions].unsqueeze(1), sin.double()[positions].unsqueeze(1)
    x = qkv[:, :turned].double().view(tokens, -1, head_dim)
    x1, x2 = x[..., :half], x[..., half:]
    expected = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)
    _assert_close(ours[:, :turned].view(tokens, -1, head_dim), expected, dtype, seed, "rotary")


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_and_mul_matches_float64(dtype: torch.dtype, tokens: int, gen: Any) -> None:
    g, seed = gen
    gate_up = _randn(g, tokens, 2 * INTERMEDIATE, dtype=dtype, scale=4)
    out = torch.full((tokens, INTERMEDIATE), float("nan"), device="cuda", dtype=dtype)
    triton_fused.silu_and_mul(gate_up, out=out)
    gate, up = gate_up.double().chunk(2, dim=-1)
    _assert_close(out, gate * torch.sigmoid(gate) * up, dtype, seed, "silu_and_mul")
    _assert_within_two_ulps(out, reference.silu_and_mul(gate_up), seed, "silu_and_mul")


def test_the_fused_ops_replay_in_a_cuda_graph(gen: Any) -> None:
    g, seed = gen
    dtype, tokens, head_dim = torch.bfloat16, 8, 128
    cos, sin = _tables(head_dim)
    x, residual = _randn(g, tokens, HIDDEN, dtype=dtype), _randn(g, tokens, HIDDEN, dtype=dtype)
    weight = torch.ones(HIDDEN, device="cuda", dtype=dtype)
    qkv = _randn(g, tokens, (NUM_Q_HEADS + 2 * NUM_KV_HEADS) * head_dim, dtype=dtype)
    gate_up = _randn(g, tokens, 2 * INTERMEDIATE, dtype=dtype)
    positions = torch.zeros(tokens, device="cuda", dtype=torch.int64)
    normed = torch.empty_like(x)
    act = torch.empty(tokens, INTERMEDIATE, device="cuda", dtype=dtype)
    q = qkv[:, : NUM_Q_HEADS * head_dim].view(tokens, NUM_Q_HEADS, head_dim)
    k = qkv[:, NUM_Q_HEADS * head_dim : (NUM_Q_HEADS + NUM_KV_HEADS) * head_dim].view(
        tokens, NUM_KV_HEADS, head_dim
    )

    def step() -> None:
        triton_fused.rms_norm(x, weight, EPS, residual, out=normed)
        triton_fused.rotary(q, k, cos, sin, positions)
        triton_fused.silu_and_mul(gate_up, out=act)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    # Fresh inputs in the captured buffers, then one replay against the twins.
    for t in (x, residual, qkv, gate_up):
        t.copy_(_randn(g, *t.shape, dtype=dtype))
    positions.copy_(torch.randint(0, MAX_POSITIONS, (tokens,), device="cuda", generator=g))
    normed.fill_(float("nan"))
    act.fill_(float("nan"))
    twin_res, twin_qkv, before_rotary = residual.clone(), qkv.clone(), qkv.clone()
    twin_q = twin_qkv[:, : NUM_Q_HEADS * head_dim].view(tokens, NUM_Q_HEADS, head_dim)
    twin_k = twin_qkv[:, NUM_Q_HEADS * head_dim : (NUM_Q_HEADS + NUM_KV_HEADS) * head_dim].view(
        tokens, NUM_KV_HEADS, head_dim
    )
    twin_normed, _ = reference.rms_norm(x, weight, EPS, twin_res)
    reference.rotary(twin_q, twin_k, cos, sin, positions)
    twin_act = reference.silu_and_mul(gate_up)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(residual, twin_res), f"seed {seed}"
    _assert_rotary_close(qkv, twin_qkv, before_rotary, seed)
    _assert_within_two_ulps(normed, twin_normed, seed, "graph rms_norm")
    _assert_within_two_ulps(act, twin_act, seed, "graph silu_and_mul")


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_and_write_kv_is_rotary_then_write_kv_in_one_launch(dtype: torch.dtype, tokens: int, gen: Any) -> None:
    """q and k turned as `rotary` turns them, the turned k and v in their slots (padding tokens' -1
    skipped), nothing else in the pool touched, the landed wait passed; also from a CUDA graph."""
    from kernels import triton_ops

    g, seed = gen
    head_dim, block_size = 128, 16
    cos, sin = _tables(head_dim)
    qkv = _randn(g, tokens, (NUM_Q_HEADS + 2 * NUM_KV_HEADS) * head_dim, dtype=dtype)
    positions = torch.randint(0, MAX_POSITIONS, (tokens,), device="cuda", generator=g, dtype=torch.int64)
    blocks = tokens // block_size + 5
    pool = _randn(g, blocks, 2, 2, block_size, NUM_KV_HEADS, head_dim, dtype=dtype)  # [blocks, layers, K/V, ...]
    slots = torch.randperm(blocks * block_size, device="cuda", generator=g)[:tokens]
    slots[torch.rand(tokens, device="cuda", generator=g) < 0.2] = -1
    slots = slots.to(torch.int32)
    flags, target = torch.full((4,), 7, device="cuda", dtype=torch.int32), torch.full((1,), 7, device="cuda", dtype=torch.int32)

    def split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = t[:, : NUM_Q_HEADS * head_dim].view(tokens, NUM_Q_HEADS, head_dim)
        rest = t[:, NUM_Q_HEADS * head_dim :].view(tokens, 2 * NUM_KV_HEADS, head_dim)
        return q, rest[:, :NUM_KV_HEADS], rest[:, NUM_KV_HEADS:]

    def ours(t: torch.Tensor, p: torch.Tensor) -> None:
        triton_fused.rotary_and_write_kv(*split(t), cos, sin, positions, p[:, 1, 0], p[:, 1, 1], slots, (flags, target, 3))

    twin_qkv, twin_pool = qkv.clone(), pool.clone()
    q, k, v = split(twin_qkv)
    reference.rotary(q, k, cos, sin, positions)
    triton_ops.write_kv(k, v, twin_pool[:, 1, 0], twin_pool[:, 1, 1], slots)

    eager_qkv, eager_pool = qkv.clone(), pool.clone()
    ours(eager_qkv, eager_pool)
    graph_qkv, graph_pool = qkv.clone(), pool.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ours(graph_qkv, graph_pool)
    graph_qkv.copy_(qkv)
    graph_pool.copy_(pool)
    graph.replay()
    torch.cuda.synchronize()
    for got_qkv, got_pool, how in ((eager_qkv, eager_pool, "eager"), (graph_qkv, graph_pool, "graph")):
        _assert_rotary_close(got_qkv, twin_qkv, qkv, seed)
        assert torch.equal(got_qkv[:, (NUM_Q_HEADS + NUM_KV_HEADS) * head_dim :], qkv[:, (NUM_Q_HEADS + NUM_KV_HEADS) * head_dim :]), how
        # Each mapped slot holds that token's turned k (as left in place) and its v, bit for bit; every
        # other slot, and the other layer, is as it was.
        mapped = slots >= 0
        rows = slots[mapped].long()
        k_slots, v_slots = got_pool[:, 1, 0].flatten(0, 1), got_pool[:, 1, 1].flatten(0, 1)
        assert torch.equal(k_slots[rows], split(got_qkv)[1][mapped]), f"{how}: k slots (seed {seed})"
        assert torch.equal(v_slots[rows], split(qkv)[2][mapped]), f"{how}: v slots (seed {seed})"
        others = torch.ones(blocks * block_size, dtype=torch.bool, device="cuda")
        others[rows] = False
        for kv in (0, 1):
            assert torch.equal(got_pool[:, 1, kv].flatten(0, 1)[others], pool[:, 1, kv].flatten(0, 1)[others]), how
        assert torch.equal(got_pool[:, 0], pool[:, 0]), f"{how}: another layer was written (seed {seed})"
