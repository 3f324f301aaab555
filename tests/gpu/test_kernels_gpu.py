"""On the GPU, at a real model's sizes (Llama-3-8B: 32 query heads, 8 KV heads, head_dim 128), the
Triton kernels in bf16 and fp16 compute what float64 attention over the gathered blocks says.

Contexts reach 32k tokens; prefix prefill from 1 to 512 new tokens after 2k-32k cached (split-K
and tiled); block sizes 16/32/64; the caches are strided views of a two-layer
page-first pool; outputs are NaN-poisoned before each run; inputs are fresh random every run.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from kernels import triton_ops

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128
NUM_LAYERS, LAYER = 2, 1
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 3e-3}
DTYPES = [torch.bfloat16, torch.float16]
BLOCK_SIZES = [16, 32, 64]


@pytest.fixture
def gen() -> tuple[torch.Generator, int]:
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator(device="cuda").manual_seed(seed), seed


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pool_and_table(
    lens: list[int], block_size: int, dtype: torch.dtype, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(_cdiv(max(n, 1), block_size) for n in lens) + 1
    num_blocks = len(lens) * width + 7
    pool = torch.randn(
        num_blocks, NUM_LAYERS, 2, block_size, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=dtype, generator=gen
    )
    order = torch.randperm(num_blocks, device="cuda", generator=gen)
    return pool, order[: len(lens) * width].view(len(lens), width).to(torch.int32)


def _gather(cache: torch.Tensor, row: torch.Tensor, length: int) -> torch.Tensor:
    blocks = row[: _cdiv(length, cache.shape[1])].long()
    return cache[blocks].reshape(-1, *cache.shape[2:])[:length]


def _attention_f64(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, first_pos: int) -> torch.Tensor:
    """q[n,Hq,D] at positions first_pos + i over keys/values[t,Hkv,D] at positions 0..t-1, causal."""
    group = q.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)
    v = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,thd->hnt", q.double(), k) * HEAD_DIM**-0.5
    query_pos = first_pos + torch.arange(q.shape[0], device=q.device)
    hidden = torch.arange(k.shape[0], device=q.device)[None, :] > query_pos[:, None]
    scores.masked_fill_(hidden[None], float("-inf"))
    return torch.einsum("hnt,thd->nhd", torch.softmax(scores, dim=-1), v)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, seed: int) -> None:
    assert not torch.isnan(actual).any(), f"unwritten (NaN) output elements; seed {seed}"
    error = float((actual.double() - expected).norm() / expected.norm())
    assert error < TOLERANCE[dtype], f"relative error {error:.2e} >= {TOLERANCE[dtype]:.0e}; seed {seed}"


def _decode_oracle(q, pool, table, lens) -> torch.Tensor:  # type: ignore[no-untyped-def]
    rows = []
    for b, n in enumerate(lens):
        keys, values = _gather(pool[:, LAYER, 0], table[b], n), _gather(pool[:, LAYER, 1], table[b], n)
        rows.append(_attention_f64(q[b : b + 1], keys, values, n - 1))
    return torch.cat(rows)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paged_decode_matches_float64_up_to_32k(dtype: torch.dtype, block_size: int, gen: Any) -> None:
    g, seed = gen
    lens = [32768, 8191, 1000, 17, 4099]  # ragged: most are not multiples of any block size
    pool, table = _pool_and_table(lens, block_size, dtype, g)
    q = torch.randn(len(lens), NUM_Q_HEADS, HEAD_DIM, device="cuda", dtype=dtype, generator=g)
    context_lens = torch.tensor(lens, device="cuda", dtype=torch.int32)
    expected = _decode_oracle(q, pool, table, lens)
    for hint in (None, max(lens)):  # splits sized from the table's capacity, then from the real maximum
        out = torch.full_like(q, float("nan"))
        triton_ops.paged_decode(
            q, pool[:, LAYER, 0], pool[:, LAYER, 1], table, context_lens, HEAD_DIM**-0.5, out=out, max_context_len=hint
        )
        _assert_close(out, expected, dtype, seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paged_decode_single_split_for_a_large_batch(dtype: torch.dtype, gen: Any) -> None:
    g, seed = gen
    lens = [int(x) for x in torch.randint(1, 600, (96,), generator=torch.Generator().manual_seed(seed))]
    pool, table = _pool_and_table(lens, 16, dtype, g)
    q = torch.randn(len(lens), NUM_Q_HEADS, HEAD_DIM, device="cuda", dtype=dtype, generator=g)
    out = torch.full_like(q, float("nan"))
    context_lens = torch.tensor(lens, device="cuda", dtype=torch.int32)
    triton_ops.paged_decode(
        q, pool[:, LAYER, 0], pool[:, LAYER, 1], table, context_lens, HEAD_DIM**-0.5, out=out, num_splits=1
    )
    _assert_close(out, _decode_oracle(q, pool, table, lens), dtype, seed)


def test_paged_decode_replays_in_a_cuda_graph(gen: Any) -> None:
    g, seed = gen
    dtype, lens = torch.bfloat16, [5000, 300, 1]
    pool, table = _pool_and_table([8192] * len(lens), 16, dtype, g)
    q = torch.randn(len(lens), NUM_Q_HEADS, HEAD_DIM, device="cuda", dtype=dtype, generator=g)
    context_lens = torch.tensor(lens, device="cuda", dtype=torch.int32)
    out = torch.full_like(q, float("nan"))
    k_cache, v_cache = pool[:, LAYER, 0], pool[:, LAYER, 1]

    def step() -> None:
        triton_ops.paged_decode(q, k_cache, v_cache, table, context_lens, HEAD_DIM**-0.5, out=out, max_context_len=8192)

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    # New inputs in the same buffers: the replay must read them, not what was there at capture.
    new_lens = [8192, 77, 4097]
    q.copy_(torch.randn(q.shape, device="cuda", dtype=dtype, generator=g))
    context_lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    _assert_close(out, _decode_oracle(q, pool, table, new_lens), dtype, seed)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefix_prefill_matches_float64_with_mixed_cached_prefixes(dtype: torch.dtype, block_size: int, gen: Any) -> None:
    g, seed = gen
    new_lens = [512, 300, 77, 1]
    cached_lens = [32768 - 5, 0, 5000, 129]  # a long cached prefix, none, ragged ones
    pool, table = _pool_and_table(cached_lens, block_size, dtype, g)
    tokens = sum(new_lens)
    q = torch.randn(tokens, NUM_Q_HEADS, HEAD_DIM, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(tokens, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(tokens, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=dtype, generator=g)
    offsets = torch.tensor([0, *torch.tensor(new_lens).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    out = torch.full_like(q, float("nan"))
    triton_ops.prefix_prefill(
        q, k, v, pool[:, LAYER, 0], pool[:, LAYER, 1], table, offsets,
        torch.tensor(cached_lens, device="cuda", dtype=torch.int32), HEAD_DIM**-0.5, out=out, max_query_len=max(new_lens),
    )
    expected = torch.empty(q.shape, device="cuda", dtype=torch.float64)
    for b, (n, c) in enumerate(zip(new_lens, cached_lens, strict=True)):
        s = int(offsets[b])
        keys = torch.cat([_gather(pool[:, LAYER, 0], table[b], c), k[s : s + n]])
        values = torch.cat([_gather(pool[:, LAYER, 1], table[b], c), v[s : s + n]])
        expected[s : s + n] = _attention_f64(q[s : s + n], keys, values, c)
    _assert_close(out, expected, dtype, seed)


def _prefill_inputs(new_lens: list[int], dtype: torch.dtype, g: torch.Generator) -> dict[str, torch.Tensor]:
    tokens = sum(new_lens)
    return {
        "q": torch.randn(tokens, NUM_Q_HEADS, HEAD_DIM, device="cuda", dtype=dtype, generator=g),
        "k": torch.randn(tokens, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=dtype, generator=g),
        "v": torch.randn(tokens, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=dtype, generator=g),
        "cu": torch.tensor([0, *torch.tensor(new_lens).cumsum(0).tolist()], device="cuda", dtype=torch.int32),
    }


def _prefill_oracle(x: dict[str, torch.Tensor], pool, table, new_lens, cached_lens) -> torch.Tensor:  # type: ignore[no-untyped-def]
    expected = torch.empty(x["q"].shape, device="cuda", dtype=torch.float64)
    for b, (n, c) in enumerate(zip(new_lens, cached_lens, strict=True)):
        s = int(x["cu"][b])
        keys = torch.cat([_gather(pool[:, LAYER, 0], table[b], c), x["k"][s : s + n]])
        values = torch.cat([_gather(pool[:, LAYER, 1], table[b], c), x["v"][s : s + n]])
        expected[s : s + n] = _attention_f64(x["q"][s : s + n], keys, values, c)
    return expected


def _run_prefill(x, pool, table, cached_lens, max_query_len, **bounds) -> torch.Tensor:  # type: ignore[no-untyped-def]
    out = torch.full_like(x["q"], float("nan"))
    triton_ops.prefix_prefill(
        x["q"], x["k"], x["v"], pool[:, LAYER, 0], pool[:, LAYER, 1], table, x["cu"],
        torch.tensor(cached_lens, device="cuda", dtype=torch.int32), HEAD_DIM**-0.5,
        out=out, max_query_len=max_query_len, **bounds,
    )
    return out


@pytest.mark.parametrize("new", [1, 7, 64, 200, 512])
@pytest.mark.parametrize("cached", [2048, 8192, 32768])
def test_prefix_prefill_few_new_tokens_after_a_long_prefix_match_float64(cached: int, new: int, gen: Any) -> None:
    """The prefix-cache hit: 1..512 new tokens after 2k/8k/32k cached ones (split-K below 512)."""
    g, seed = gen
    dtype = torch.bfloat16
    # The block table holds twice the cached length: with no bound given, the splits are planned for
    # the table's capacity and must still cover exactly the real cached length.
    pool, table = _pool_and_table([2 * cached], 16, dtype, g)
    x = _prefill_inputs([new], dtype, g)
    expected = _prefill_oracle(x, pool, table, [new], [cached])
    _assert_close(_run_prefill(x, pool, table, [cached], new), expected, dtype, seed)
    _assert_close(_run_prefill(x, pool, table, [cached], new, max_cached_len=cached), expected, dtype, seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefix_prefill_split_k_ragged_batch_mixing_cached_and_uncached(dtype: torch.dtype, gen: Any) -> None:
    g, seed = gen
    new_lens = [64, 1, 17, 0, 100, 33]
    cached_lens = [32768 - 5, 8000, 0, 100, 2047, 0]  # long, ragged, none; an empty sequence between
    pool, table = _pool_and_table(cached_lens, 32, dtype, g)
    x = _prefill_inputs(new_lens, dtype, g)
    expected = _prefill_oracle(x, pool, table, new_lens, cached_lens)
    _assert_close(_run_prefill(x, pool, table, cached_lens, max(new_lens)), expected, dtype, seed)


def test_prefix_prefill_split_k_replays_in_a_cuda_graph(gen: Any) -> None:
    g, seed = gen
    dtype, new_lens = torch.bfloat16, [64, 5]
    pool, table = _pool_and_table([16384, 16384], 16, dtype, g)
    x = _prefill_inputs(new_lens, dtype, g)
    cached = torch.tensor([9000, 40], device="cuda", dtype=torch.int32)
    out = torch.full_like(x["q"], float("nan"))

    def step() -> None:
        triton_ops.prefix_prefill(
            x["q"], x["k"], x["v"], pool[:, LAYER, 0], pool[:, LAYER, 1], table, x["cu"], cached, HEAD_DIM**-0.5,
            out=out, max_query_len=64, max_cached_len=16384,
        )

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    # New inputs in the same buffers (the cached lengths included): the replay must read them.
    new_cached = [16384 - 3, 3000]
    for name in ("q", "k", "v"):
        x[name].copy_(torch.randn(x[name].shape, device="cuda", dtype=dtype, generator=g))
    cached.copy_(torch.tensor(new_cached, dtype=torch.int32))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    _assert_close(out, _prefill_oracle(x, pool, table, new_lens, new_cached), dtype, seed)


def test_write_kv_fills_exactly_the_mapped_slots(gen: Any) -> None:
    g, _ = gen
    pool = torch.full((64, NUM_LAYERS, 2, 16, NUM_KV_HEADS, HEAD_DIM), float("nan"), device="cuda", dtype=torch.bfloat16)
    tokens = 300
    slots = torch.randperm(64 * 16, device="cuda", generator=g)[:tokens].to(torch.int32)
    slots[::7] = -1
    k = torch.randn(tokens, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(tokens, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    expected = pool.clone()
    keep = slots >= 0
    blocks, offsets = (slots[keep] // 16).long(), (slots[keep] % 16).long()
    expected[blocks, LAYER, 0, offsets] = k[keep]
    expected[blocks, LAYER, 1, offsets] = v[keep]
    triton_ops.write_kv(k, v, pool[:, LAYER, 0], pool[:, LAYER, 1], slots)
    torch.testing.assert_close(pool, expected, rtol=0, atol=0, equal_nan=True)


def test_copy_blocks_moves_many_blocks_in_one_launch(gen: Any) -> None:
    g, _ = gen
    pool = torch.randn(300, NUM_LAYERS, 2, 16, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    staging = torch.full((200, *pool.shape[1:]), float("nan"), device="cuda", dtype=torch.bfloat16)
    src_ids = torch.randperm(300, device="cuda", generator=g)[:150]
    dst_ids = torch.randperm(200, device="cuda", generator=g)[:150].to(torch.int32)
    expected = staging.clone()
    expected[dst_ids.long()] = pool[src_ids]
    triton_ops.copy_blocks(pool, staging, src_ids, dst_ids)
    torch.testing.assert_close(staging, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefix_prefill_with_nothing_cached_runs_the_causal_descriptor_kernel(dtype: torch.dtype, gen: Any) -> None:
    """A cold prefill told `max_cached_len=0`: q/k/v are views of one fused qkv row block (as the
    model makes them) read through tensor-memory descriptors; ragged sequences, the longest past the
    kernel's minimum (CAUSAL_MIN_TOKENS)."""
    from kernels.triton_prefill import descriptors_supported, plan_prefix_prefill

    g, seed = gen
    new_lens = [5000, 1, 130, 0, 1024]
    tokens, width = sum(new_lens), (NUM_Q_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM
    qkv = torch.randn(tokens, width, device="cuda", dtype=dtype, generator=g)
    q_end, k_end = NUM_Q_HEADS * HEAD_DIM, (NUM_Q_HEADS + NUM_KV_HEADS) * HEAD_DIM
    x = {
        "q": qkv[:, :q_end].view(tokens, NUM_Q_HEADS, HEAD_DIM),
        "k": qkv[:, q_end:k_end].view(tokens, NUM_KV_HEADS, HEAD_DIM),
        "v": qkv[:, k_end:].view(tokens, NUM_KV_HEADS, HEAD_DIM),
        "cu": torch.tensor([0, *torch.tensor(new_lens).cumsum(0).tolist()], device="cuda", dtype=torch.int32),
    }
    cached_lens = [0] * len(new_lens)
    pool, table = _pool_and_table([16] * len(new_lens), 16, dtype, g)
    plan = plan_prefix_prefill(len(new_lens), NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, max(new_lens), 0,
                               torch.cuda.get_device_properties(0).multi_processor_count, torch.device("cuda"))
    assert plan.contiguous == descriptors_supported(torch.device("cuda"))
    expected = _prefill_oracle(x, pool, table, new_lens, cached_lens)
    _assert_close(_run_prefill(x, pool, table, cached_lens, max(new_lens), max_cached_len=0), expected, dtype, seed)
