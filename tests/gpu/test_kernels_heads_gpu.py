"""The attention kernels on the GPU at the head shapes of the models users serve, not only Llama-3-8B's:
query groups that are not powers of two (Qwen2.5 0.5B 14/2 and 7B 28/4, Qwen2.5 1.5B 12/2, Llama 3.2 3B
24/8), head_dim 64 and 128, and multi-head attention (no grouping). bf16 against float64 over gathered
blocks; outputs NaN-poisoned; inputs fresh random every run."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from kernels import triton_ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# (query heads, KV heads, head_dim)
HEADS = [(14, 2, 64), (28, 4, 128), (12, 2, 128), (24, 8, 128), (16, 16, 64)]
DTYPE = torch.bfloat16
TOLERANCE = 1e-2
LAYERS, LAYER = 2, 1


@pytest.fixture
def gen() -> tuple[torch.Generator, int]:
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator(device="cuda").manual_seed(seed), seed


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pool_and_table(lens: list[int], kv_heads: int, head_dim: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    block = 16
    width = max(_cdiv(max(n, 1), block) for n in lens) + 1
    num_blocks = len(lens) * width + 3
    pool = torch.randn(num_blocks, LAYERS, 2, block, kv_heads, head_dim, device="cuda", dtype=DTYPE, generator=g)
    order = torch.randperm(num_blocks, device="cuda", generator=g)
    return pool, order[: len(lens) * width].view(len(lens), width).to(torch.int32)


def _gather(cache: torch.Tensor, row: torch.Tensor, length: int) -> torch.Tensor:
    blocks = row[: _cdiv(length, cache.shape[1])].long()
    return cache[blocks].reshape(-1, *cache.shape[2:])[:length]


def _attention_f64(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, first_pos: int) -> torch.Tensor:
    group = q.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)
    v = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,thd->hnt", q.double(), k) * q.shape[-1] ** -0.5
    query_pos = first_pos + torch.arange(q.shape[0], device=q.device)
    scores.masked_fill_((torch.arange(k.shape[0], device=q.device)[None, :] > query_pos[:, None])[None], float("-inf"))
    return torch.einsum("hnt,thd->nhd", torch.softmax(scores, dim=-1), v)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, seed: int) -> None:
    assert not torch.isnan(actual).any(), f"unwritten (NaN) output elements; seed {seed}"
    error = float((actual.double() - expected).norm() / expected.norm())
    assert error < TOLERANCE, f"relative error {error:.2e}; seed {seed}"


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"q{h[0]}-kv{h[1]}-d{h[2]}")
def test_paged_decode_at_real_head_shapes(heads: tuple[int, int, int], gen: Any) -> None:
    g, seed = gen
    hq, hkv, d = heads
    lens = [9000, 1, 300, 4097]
    pool, table = _pool_and_table(lens, hkv, d, g)
    q = torch.randn(len(lens), hq, d, device="cuda", dtype=DTYPE, generator=g)
    expected = torch.cat([
        _attention_f64(q[b : b + 1], _gather(pool[:, LAYER, 0], table[b], n), _gather(pool[:, LAYER, 1], table[b], n), n - 1)
        for b, n in enumerate(lens)
    ])  # fmt: skip
    context_lens = torch.tensor(lens, device="cuda", dtype=torch.int32)
    for hint in (None, max(lens)):
        out = torch.full_like(q, float("nan"))
        triton_ops.paged_decode(
            q, pool[:, LAYER, 0], pool[:, LAYER, 1], table, context_lens, d**-0.5, out=out, max_context_len=hint
        )
        _assert_close(out, expected, seed)


# new tokens, cached tokens per sequence: the split-K hit path, the tiled path with long and no prefixes,
# and the causal kernel of a cold prefill (nothing cached, told so)
PREFILLS = {
    "split-k-hit": ([64, 3], [6000, 200], None),
    "tiled-mixed": ([600, 77, 1], [2500, 0, 129], None),
    "cold-causal": ([4500, 130], [0, 0], 0),
}


@pytest.mark.parametrize("kind", list(PREFILLS))
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"q{h[0]}-kv{h[1]}-d{h[2]}")
def test_prefix_prefill_at_real_head_shapes(heads: tuple[int, int, int], kind: str, gen: Any) -> None:
    g, seed = gen
    hq, hkv, d = heads
    new_lens, cached_lens, max_cached = PREFILLS[kind]
    tokens = sum(new_lens)
    # q/k/v as the model makes them: views of one fused qkv row block
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, device="cuda", dtype=DTYPE, generator=g)
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(tokens, hkv, d)
    v = qkv[:, (hq + hkv) * d :].view(tokens, hkv, d)
    cu = torch.tensor([0, *torch.tensor(new_lens).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    pool, table = _pool_and_table([max(c, 1) for c in cached_lens], hkv, d, g)
    expected = torch.empty(q.shape, device="cuda", dtype=torch.float64)
    for b, (n, c) in enumerate(zip(new_lens, cached_lens, strict=True)):
        s = int(cu[b])
        keys = torch.cat([_gather(pool[:, LAYER, 0], table[b], c), k[s : s + n]])
        values = torch.cat([_gather(pool[:, LAYER, 1], table[b], c), v[s : s + n]])
        expected[s : s + n] = _attention_f64(q[s : s + n], keys, values, c)
    out = torch.full_like(q, float("nan"))
    triton_ops.prefix_prefill(
        q, k, v, pool[:, LAYER, 0], pool[:, LAYER, 1], table, cu,
        torch.tensor(cached_lens, device="cuda", dtype=torch.int32), d**-0.5,
        out=out, max_query_len=max(new_lens), max_cached_len=max_cached,
    )  # fmt: skip
    _assert_close(out, expected, seed)
