"""The attention and KV-movement kernels compute what float64 attention over the gathered blocks says.

The Triton kernels run on the CPU under TRITON_INTERPRET=1. Triton reads that variable when a kernel
is decorated, i.e. when `kernels.triton_ops` is first imported, and other test modules may import it
earlier without it; so every Triton case runs in one child process started with the variable set
(this file, run as a script, is the child). The parent draws fresh random inputs, the child runs the
kernels into NaN-poisoned outputs, and the parent checks them (and the torch twins) against float64.
fp16 and fp32 only: the interpreter computes bf16 `tl.dot` wrongly; bf16 is checked on the GPU.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import triton
from triton_interpreter import run_interpreted

from kernels import reference

NUM_LAYERS, LAYER = 2, 1  # the ops read layer 1 of a 2-layer page-first pool: strided views
TOLERANCE = {torch.float16: 1e-3, torch.float32: 2e-6}


@dataclass(frozen=True)
class DecodeCase:
    name: str
    dtype: torch.dtype
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    context_lens: tuple[int, ...]
    num_splits: int | None = None  # None: the op chooses from the context length and batch
    prefetch_pages: bool = True  # False: launch directly with the tiling that loads block ids in-iteration
    # Block-table columns past the longest context: a CUDA graph's table is as wide as the longest context
    # the engine allows, and its split plan is made for that width.
    spare_blocks: int = 1


@dataclass(frozen=True)
class PrefillCase:
    name: str
    dtype: torch.dtype
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    new_lens: tuple[int, ...]
    cached_lens: tuple[int, ...]
    num_splits: int | None = None  # None: the op chooses; a count forces the grouped split-K kernel
    tight_cached_bound: bool = False  # pass max_cached_len = max(cached_lens) instead of the table's capacity
    padding_tokens: int = 0  # packed rows past the last sequence (CUDA-graph padding): never written


DECODE_CASES = [
    DecodeCase("gqa1-d64-bs16-fp16", torch.float16, 2, 2, 64, 16, (37, 1, 80)),
    DecodeCase("gqa4-d128-bs32-fp16", torch.float16, 8, 2, 128, 32, (100, 31, 64)),
    DecodeCase("gqa8-d64-bs16-fp32", torch.float32, 8, 1, 64, 16, (200, 17)),
    DecodeCase("gqa8-d64-bs32-fp16-zero-context", torch.float16, 16, 2, 64, 32, (150, 0, 47)),
    DecodeCase("gqa4-d128-bs16-fp32-three-splits", torch.float32, 4, 1, 128, 16, (96, 5), num_splits=3),
    DecodeCase("gqa4-d64-bs16-fp16-one-split", torch.float16, 8, 2, 64, 16, (70, 9), num_splits=1),
    DecodeCase("gqa4-d64-bs16-fp16-no-prefetch", torch.float16, 8, 2, 64, 16, (70, 19, 33), prefetch_pages=False),
    DecodeCase("gqa4-d64-bs16-fp16-graph-wide-table", torch.float16, 8, 2, 64, 16, (300, 40, 7), spare_blocks=60),
    # Groups that are not powers of two, as real models have them: Qwen2.5 0.5B/7B (14/2, 28/4), Qwen2.5
    # 1.5B (12/2), Llama 3.2 3B (24/8).
    DecodeCase("gqa7-d64-bs16-fp16", torch.float16, 14, 2, 64, 16, (90, 1, 33)),
    DecodeCase("gqa6-d128-bs32-fp32-three-splits", torch.float32, 12, 2, 128, 32, (100, 7), num_splits=3),
    DecodeCase("gqa3-d64-bs16-fp16", torch.float16, 6, 2, 64, 16, (45, 16)),
]
PREFILL_CASES = [
    PrefillCase("gqa4-d64-bs16-fp16-mixed", torch.float16, 8, 2, 64, 16, (20, 5, 37), (0, 33, 50)),
    PrefillCase("gqa1-d128-bs32-fp32-mixed", torch.float32, 2, 2, 128, 32, (17, 40), (64, 0)),
    PrefillCase("gqa8-d128-bs32-fp16-cached", torch.float16, 8, 1, 128, 32, (33,), (95,)),
    PrefillCase("gqa8-d64-bs16-fp32-empty-seq", torch.float32, 8, 1, 64, 16, (3, 0, 18), (10, 7, 0)),
    PrefillCase("gqa7-d64-bs16-fp16-mixed", torch.float16, 14, 2, 64, 16, (21, 6), (0, 40)),
    PrefillCase("gqa3-d128-bs16-fp32-cached", torch.float32, 6, 2, 128, 16, (17,), (35,)),
]
# Nothing cached and the op told so (max_cached_len 0): the causal kernel reading q/k/v through
# tensor-memory descriptors; ragged sequences whose last tiles run into the next sequence's rows.
CAUSAL_PREFILL_CASES = [
    PrefillCase("causal-gqa4-d64-bs16-fp16-ragged", torch.float16, 8, 2, 64, 16, (37, 5, 16, 50), (0, 0, 0, 0),
                tight_cached_bound=True),
    PrefillCase("causal-gqa1-d128-bs32-fp32", torch.float32, 2, 2, 128, 32, (33, 17), (0, 0), tight_cached_bound=True),
    PrefillCase("causal-gqa8-d64-bs16-fp32-empty-seq", torch.float32, 8, 1, 64, 16, (19, 0, 40), (0, 0, 0),
                tight_cached_bound=True, padding_tokens=5),
    PrefillCase("causal-gqa7-d64-bs16-fp16", torch.float16, 14, 2, 64, 16, (29, 40), (0, 0), tight_cached_bound=True),
]
# Few new tokens after a long-ish cached prefix: the grouped split-K kernel (the plan picks it for
# these on the interpreter's stand-in multiprocessor count; a test below holds it to that).
SPLIT_PREFILL_CASES = [
    PrefillCase("split-gqa4-d64-bs16-fp16-few-new", torch.float16, 8, 2, 64, 16, (3, 1, 5), (200, 0, 77)),
    PrefillCase("split-gqa1-d128-bs32-fp32-ragged", torch.float32, 2, 2, 128, 32, (4, 0, 7, 1), (0, 50, 129, 96)),
    PrefillCase("split-gqa8-d64-bs16-fp32-mixed", torch.float32, 8, 1, 64, 16, (2, 6, 1), (161, 0, 33)),
    PrefillCase("split-gqa8-d64-bs16-fp16-tight-bound", torch.float16, 16, 2, 64, 16, (5, 3), (250, 18),
                tight_cached_bound=True),
    PrefillCase("split-gqa4-d64-bs16-fp32-padded", torch.float32, 4, 1, 64, 16, (2, 3), (90, 41), padding_tokens=3),
    # 6 query heads: the merge's last program of 4 heads has 2 past the end, which it must not store.
    PrefillCase("split-gqa3-d64-bs16-fp32-six-heads", torch.float32, 6, 2, 64, 16, (3, 2), (100, 40)),
    PrefillCase("split-gqa7-d64-bs16-fp16-fourteen-heads", torch.float16, 14, 2, 64, 16, (4, 1), (120, 60)),
    # More splits than the shorter prefix has tiles: the surplus splits are empty and must weigh nothing.
    PrefillCase("split-gqa8-d64-bs16-fp32-forced-7", torch.float32, 8, 1, 64, 16, (6, 2), (150, 33), num_splits=7),
    # More splits than the merge takes in one chunk (8), and not a multiple of it.
    PrefillCase("split-gqa4-d64-bs16-fp32-forced-11", torch.float32, 8, 2, 64, 16, (3, 2), (300, 120), num_splits=11),
    PrefillCase("split-gqa4-d64-bs16-fp16-forced-1", torch.float16, 8, 2, 64, 16, (9, 4), (70, 0), num_splits=1),
    PrefillCase("split-gqa4-d64-bs16-fp32-no-cache", torch.float32, 4, 1, 64, 16, (7, 2), (0, 0), num_splits=3),
]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pool(gen: torch.Generator, num_blocks: int, block_size: int, heads: int, dim: int, dtype: torch.dtype):
    return torch.randn(num_blocks, NUM_LAYERS, 2, block_size, heads, dim, generator=gen).to(dtype)


def _block_table(
    gen: torch.Generator, lens: tuple[int, ...], block_size: int, num_blocks: int, spare: int = 1
) -> torch.Tensor:
    """Scattered, distinct blocks per row, `spare` columns more than the longest context needs."""
    width = max(_cdiv(n, block_size) for n in lens) + spare
    order = torch.randperm(num_blocks, generator=gen)
    return order[: len(lens) * width].view(len(lens), width).to(torch.int32)


def decode_inputs(case: DecodeCase, gen: torch.Generator) -> dict[str, Any]:
    batch = len(case.context_lens)
    width = max(_cdiv(n, case.block_size) for n in case.context_lens) + case.spare_blocks
    num_blocks = batch * width + 3
    return {
        "q": torch.randn(batch, case.num_q_heads, case.head_dim, generator=gen).to(case.dtype),
        "pool": _pool(gen, num_blocks, case.block_size, case.num_kv_heads, case.head_dim, case.dtype),
        "block_table": _block_table(gen, case.context_lens, case.block_size, num_blocks, case.spare_blocks),
        "context_lens": torch.tensor(case.context_lens, dtype=torch.int32),
        "scale": case.head_dim**-0.5,
        "num_splits": case.num_splits,
        "prefetch_pages": case.prefetch_pages,
    }


def prefill_inputs(case: PrefillCase, gen: torch.Generator) -> dict[str, Any]:
    batch, tokens = len(case.new_lens), sum(case.new_lens) + case.padding_tokens
    width = max(_cdiv(max(n, 1), case.block_size) for n in case.cached_lens) + 1
    num_blocks = batch * width + 3
    offsets = [0]
    for n in case.new_lens:
        offsets.append(offsets[-1] + n)
    shape_kv = (tokens, case.num_kv_heads, case.head_dim)
    return {
        "q": torch.randn(tokens, case.num_q_heads, case.head_dim, generator=gen).to(case.dtype),
        "k": torch.randn(*shape_kv, generator=gen).to(case.dtype),
        "v": torch.randn(*shape_kv, generator=gen).to(case.dtype),
        "pool": _pool(gen, num_blocks, case.block_size, case.num_kv_heads, case.head_dim, case.dtype),
        "block_table": _block_table(gen, tuple(max(n, 1) for n in case.cached_lens), case.block_size, num_blocks),
        "cu_seqlens_q": torch.tensor(offsets, dtype=torch.int32),
        "cached_lens": torch.tensor(case.cached_lens, dtype=torch.int32),
        "scale": case.head_dim**-0.5,
        "num_splits": case.num_splits,
        "max_cached_len": max(case.cached_lens) if case.tight_cached_bound else None,
    }


def write_kv_inputs(dtype: torch.dtype, block_size: int, head_dim: int, gen: torch.Generator) -> dict[str, Any]:
    num_blocks, heads, tokens = 6, 4, 23
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens].to(torch.int32)
    slots[::5] = -1  # padding tokens: nothing may be written for them
    return {
        "k": torch.randn(tokens, heads, head_dim, generator=gen).to(dtype),
        "v": torch.randn(tokens, heads, head_dim, generator=gen).to(dtype),
        "pool": torch.full((num_blocks, NUM_LAYERS, 2, block_size, heads, head_dim), float("nan"), dtype=dtype),
        "slot_mapping": slots,
    }


def wait_layer_inputs(gen: torch.Generator, landed: bool) -> dict[str, Any]:
    from kernels.triton_kv_movement import WAIT_MAX_POLLS

    flags = torch.randint(1, 1000, (6,), generator=gen, dtype=torch.int32)
    layer = int(torch.randint(0, 6, (1,), generator=gen))
    target = flags[layer : layer + 1].clone() if landed else flags[layer : layer + 1] + 1
    return {"flags": flags, "target": target, "layer": layer, "max_polls": WAIT_MAX_POLLS if landed else 50}


def copy_blocks_inputs(dtype: torch.dtype, id_dtype: torch.dtype, gen: torch.Generator) -> dict[str, Any]:
    pool = _pool(gen, 12, 16, 2, 64, dtype)
    staging = torch.full((5, *pool.shape[1:]), float("nan"), dtype=dtype)
    return {
        "src": pool,
        "dst": staging,
        "src_ids": torch.tensor([7, 0, 11, 3], dtype=id_dtype),
        "dst_ids": torch.tensor([4, 1, 0, 2], dtype=id_dtype),  # staging block 3 stays untouched
    }


def run_op(ops: Any, op: str, inputs: dict[str, Any], poison: bool) -> dict[str, torch.Tensor]:
    """Calls one op of `ops` (triton_ops or reference) on the inputs; returns what it wrote."""
    if op in ("paged_decode", "prefix_prefill"):
        pool = inputs["pool"]
        k_cache, v_cache = pool[:, LAYER, 0], pool[:, LAYER, 1]
        out = torch.full_like(inputs["q"], float("nan")) if poison else None
        if op == "paged_decode" and not inputs["prefetch_pages"] and ops is not reference:
            result = _launch_decode_without_prefetch(inputs, k_cache, v_cache, out)
        elif op == "paged_decode":
            extra = {"num_splits": inputs["num_splits"]} if ops is not reference else {}
            result = ops.paged_decode(
                inputs["q"], k_cache, v_cache, inputs["block_table"], inputs["context_lens"], inputs["scale"],
                out=out, **extra,
            )
        else:
            extra = (
                {"num_splits": inputs["num_splits"], "max_cached_len": inputs["max_cached_len"]}
                if ops is not reference
                else {}
            )
            result = ops.prefix_prefill(
                inputs["q"], inputs["k"], inputs["v"], k_cache, v_cache, inputs["block_table"],
                inputs["cu_seqlens_q"], inputs["cached_lens"], inputs["scale"], out=out, **extra,
            )
        assert out is None or result is out
        return {"out": result}
    if op == "write_kv":
        pool = inputs["pool"].clone()
        ops.write_kv(inputs["k"], inputs["v"], pool[:, LAYER, 0], pool[:, LAYER, 1], inputs["slot_mapping"])
        return {"pool": pool}
    if op == "wait_layer":  # Triton only: the twin has nothing to wait for
        from kernels.triton_kv_movement import launch_wait_layer

        flags, target = inputs["flags"].clone(), inputs["target"].clone()
        launch_wait_layer(flags, target, inputs["layer"], inputs["max_polls"])
        return {"flags": flags, "target": target}
    if op == "copy_blocks":
        dst = inputs["dst"].clone()
        ops.copy_blocks(inputs["src"], dst, inputs["src_ids"], inputs["dst_ids"])
        return {"dst": dst}
    raise ValueError(op)


def _launch_decode_without_prefetch(inputs: dict[str, Any], k_cache, v_cache, out) -> torch.Tensor:  # type: ignore[no-untyped-def]
    from kernels import triton_decode

    tiling = triton_decode.decode_tiling_for(out.device, out.shape[2])._replace(prefetch_pages=False)
    capacity = inputs["block_table"].shape[1] * k_cache.shape[1]
    plan = triton_decode.plan_decode_splits(
        out.shape[0], k_cache.shape[2], capacity, triton_decode.INTERPRETER_SMS, tiling.block_n
    )
    assert plan.num_splits > 1
    return triton_decode.launch_paged_decode(
        inputs["q"], k_cache, v_cache, inputs["block_table"], inputs["context_lens"], inputs["scale"], out, tiling, plan
    )


def _child_main(cases_path: str, results_path: str) -> None:
    from kernels import triton_ops

    cases = torch.load(cases_path)
    results = {name: run_op(triton_ops, op, inputs, poison=True) for name, (op, inputs) in cases.items()}
    torch.save(results, results_path)


# ---- float64 oracles: gather the blocks into a contiguous context, then plain softmax attention ----


def gather_context(cache: torch.Tensor, table_row: torch.Tensor, length: int) -> torch.Tensor:
    block_size = cache.shape[1]
    blocks = [cache[int(b)] for b in table_row[: _cdiv(length, block_size)]]
    if not blocks:
        return cache.new_zeros((0, *cache.shape[2:]))
    return torch.cat(blocks, 0)[:length]


def attention_f64(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, scale: float
) -> torch.Tensor:
    """q[n,Hq,D] over keys/values[t,Hkv,D] where visible[n,t]; a row that sees nothing gives zeros."""
    group = q.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)
    v = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,thd->hnt", q.double(), k) * scale
    scores = scores.masked_fill(~visible[None], float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("hnt,thd->nhd", weights, v)


def decode_oracle(inputs: dict[str, Any]) -> torch.Tensor:
    pool, q = inputs["pool"], inputs["q"]
    rows = []
    for b, length in enumerate(inputs["context_lens"].tolist()):
        keys = gather_context(pool[:, LAYER, 0], inputs["block_table"][b], length)
        values = gather_context(pool[:, LAYER, 1], inputs["block_table"][b], length)
        visible = torch.ones(1, length, dtype=torch.bool)
        rows.append(attention_f64(q[b : b + 1], keys, values, visible, inputs["scale"]))
    return torch.cat(rows, 0)


def prefill_oracle(inputs: dict[str, Any]) -> torch.Tensor:
    """float64 attention for the rows of the sequences; padding rows past the last one are NaN."""
    pool, q = inputs["pool"], inputs["q"]
    cu = inputs["cu_seqlens_q"].tolist()
    out = torch.full(q.shape, float("nan"), dtype=torch.float64)
    for b, cached in enumerate(inputs["cached_lens"].tolist()):
        s, e = cu[b], cu[b + 1]
        keys = torch.cat([gather_context(pool[:, LAYER, 0], inputs["block_table"][b], cached), inputs["k"][s:e]])
        values = torch.cat([gather_context(pool[:, LAYER, 1], inputs["block_table"][b], cached), inputs["v"][s:e]])
        query_pos = cached + torch.arange(e - s)
        visible = torch.arange(cached + e - s)[None, :] <= query_pos[:, None]
        out[s:e] = attention_f64(q[s:e], keys, values, visible, inputs["scale"])
    return out


def write_kv_oracle(inputs: dict[str, Any]) -> torch.Tensor:
    expected = inputs["pool"].clone()
    block_size = expected.shape[3]
    for t, slot in enumerate(inputs["slot_mapping"].tolist()):
        if slot >= 0:
            block, offset = divmod(slot, block_size)
            expected[block, LAYER, 0, offset] = inputs["k"][t]
            expected[block, LAYER, 1, offset] = inputs["v"][t]
    return expected


def copy_blocks_oracle(inputs: dict[str, Any]) -> torch.Tensor:
    expected = inputs["dst"].clone()
    for s, d in zip(inputs["src_ids"].tolist(), inputs["dst_ids"].tolist(), strict=True):
        expected[d] = inputs["src"][s]
    return expected


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30))


def assert_attention_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, seed: int) -> None:
    assert actual.dtype == dtype
    assert not torch.isnan(actual).any(), f"unwritten (NaN) output elements; seed {seed}"
    error = relative_error(actual, expected)
    assert error < TOLERANCE[dtype], f"relative error {error:.2e} >= {TOLERANCE[dtype]:.0e}; seed {seed}"


# ---- the child run: every Triton case of this module in one interpreter process ----

MOVE_CASES = {
    "write_kv-fp16-bs16-d64": ("write_kv", lambda g: write_kv_inputs(torch.float16, 16, 64, g)),
    "write_kv-fp32-bs32-d128": ("write_kv", lambda g: write_kv_inputs(torch.float32, 32, 128, g)),
    "copy_blocks-fp16-int32-ids": ("copy_blocks", lambda g: copy_blocks_inputs(torch.float16, torch.int32, g)),
    "copy_blocks-fp32-int64-ids": ("copy_blocks", lambda g: copy_blocks_inputs(torch.float32, torch.int64, g)),
    # the layer's flag already equals the target: returns at its first poll, with the production cap
    "wait_layer-landed": ("wait_layer", lambda g: wait_layer_inputs(g, landed=True)),
    # it never will (nothing copies on the CPU): returns after its poll cap instead of hanging
    "wait_layer-capped": ("wait_layer", lambda g: wait_layer_inputs(g, landed=False)),
}


@pytest.fixture(scope="module")
def seed() -> int:
    return int.from_bytes(os.urandom(4), "little")  # fresh inputs every run; printed on failure


@pytest.fixture(scope="module")
def cases(seed: int) -> dict[str, tuple[str, dict[str, Any]]]:
    gen = torch.Generator().manual_seed(seed)
    built: dict[str, tuple[str, dict[str, Any]]] = {}
    for c in DECODE_CASES:
        built[c.name] = ("paged_decode", decode_inputs(c, gen))
    for c in PREFILL_CASES + CAUSAL_PREFILL_CASES + SPLIT_PREFILL_CASES:
        built[c.name] = ("prefix_prefill", prefill_inputs(c, gen))
    for name, (op, make) in MOVE_CASES.items():
        built[name] = (op, make(gen))
    return built


@pytest.fixture(scope="module")
def interpreted(cases: dict[str, tuple[str, dict[str, Any]]], tmp_path_factory: pytest.TempPathFactory):
    """Outputs of the Triton kernels under TRITON_INTERPRET=1, one child process for all cases."""
    return run_interpreted(__file__, cases, tmp_path_factory.mktemp("triton_interpreter"))


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: c.name)
def test_triton_paged_decode_matches_float64_attention(case: DecodeCase, cases, interpreted, seed: int) -> None:
    _, inputs = cases[case.name]
    assert_attention_close(interpreted[case.name]["out"], decode_oracle(inputs), case.dtype, seed)


def assert_prefill_close(actual: torch.Tensor, inputs: dict[str, Any], dtype: torch.dtype, seed: int) -> None:
    """The sequences' rows match float64; padding rows past the last sequence keep their NaN poison."""
    real = int(inputs["cu_seqlens_q"][-1])
    assert_attention_close(actual[:real], prefill_oracle(inputs)[:real], dtype, seed)
    assert torch.isnan(actual[real:]).all(), f"padding rows past the last sequence were written; seed {seed}"


@pytest.mark.parametrize("case", PREFILL_CASES + CAUSAL_PREFILL_CASES + SPLIT_PREFILL_CASES, ids=lambda c: c.name)
def test_triton_prefix_prefill_matches_float64_attention(case: PrefillCase, cases, interpreted, seed: int) -> None:
    _, inputs = cases[case.name]
    assert_prefill_close(interpreted[case.name]["out"], inputs, case.dtype, seed)


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: c.name)
def test_reference_paged_decode_matches_float64_attention(case: DecodeCase, cases, seed: int) -> None:
    _, inputs = cases[case.name]
    out = run_op(reference, "paged_decode", inputs, poison=True)["out"]
    assert_attention_close(out, decode_oracle(inputs), case.dtype, seed)


@pytest.mark.parametrize("case", PREFILL_CASES + CAUSAL_PREFILL_CASES + SPLIT_PREFILL_CASES, ids=lambda c: c.name)
def test_reference_prefix_prefill_matches_float64_attention(case: PrefillCase, cases, seed: int) -> None:
    _, inputs = cases[case.name]
    out = run_op(reference, "prefix_prefill", inputs, poison=True)["out"]
    assert_prefill_close(out, inputs, case.dtype, seed)


def test_zero_context_rows_give_zeros_not_nan(cases, interpreted) -> None:
    name = "gqa8-d64-bs32-fp16-zero-context"
    _, inputs = cases[name]
    assert inputs["context_lens"][1] == 0
    for out in (interpreted[name]["out"], run_op(reference, "paged_decode", inputs, poison=True)["out"]):
        assert torch.equal(out[1], torch.zeros_like(out[1]))


@pytest.mark.parametrize("name", [n for n in MOVE_CASES if n.startswith("write_kv")])
def test_write_kv_fills_exactly_the_mapped_slots(name: str, cases, interpreted) -> None:
    _, inputs = cases[name]
    expected = write_kv_oracle(inputs)
    assert (inputs["slot_mapping"] == -1).any() and torch.isnan(expected).any()
    # The pool starts NaN: an unwritten slot stays NaN, a stray write replaces a NaN that should stay.
    torch.testing.assert_close(interpreted[name]["pool"], expected, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(run_op(reference, "write_kv", inputs, False)["pool"], expected, rtol=0, atol=0,
                               equal_nan=True)


@pytest.mark.parametrize("name", [n for n in MOVE_CASES if n.startswith("wait_layer")])
def test_wait_layer_returns_and_writes_nothing(name: str, cases, interpreted) -> None:
    _, inputs = cases[name]
    assert torch.equal(interpreted[name]["flags"], inputs["flags"])
    assert torch.equal(interpreted[name]["target"], inputs["target"])


@pytest.mark.parametrize("name", [n for n in MOVE_CASES if n.startswith("copy_blocks")])
def test_copy_blocks_moves_whole_blocks_and_nothing_else(name: str, cases, interpreted) -> None:
    _, inputs = cases[name]
    expected = copy_blocks_oracle(inputs)
    assert torch.isnan(expected[3]).all()  # the block no pair targets
    torch.testing.assert_close(interpreted[name]["dst"], expected, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(run_op(reference, "copy_blocks", inputs, False)["dst"], expected, rtol=0, atol=0,
                               equal_nan=True)


def test_auto_split_engages_split_k_in_the_interpreted_cases(cases) -> None:
    from kernels.triton_decode import INTERPRETER_SMS, decode_tiling_for, plan_decode_splits

    tiling = decode_tiling_for(torch.device("cpu"), 64)
    auto = [c for c in DECODE_CASES if c.num_splits is None]
    plans = []
    for c in auto:
        inputs = cases[c.name][1]
        capacity = inputs["block_table"].shape[1] * c.block_size
        plans.append(plan_decode_splits(len(c.context_lens), c.num_kv_heads, capacity, INTERPRETER_SMS, tiling.block_n))
    assert all(p.num_splits > 1 for p in plans), plans


def test_split_plan_cuts_long_contexts_and_keeps_large_batches_whole() -> None:
    from kernels.triton_decode import plan_decode_splits

    h100_sms = 132
    one_long = plan_decode_splits(1, 8, 32768, h100_sms, 64)
    many_short = plan_decode_splits(256, 8, 1024, h100_sms, 64)
    assert one_long.num_splits >= 32
    assert many_short.num_splits == 1
    gen = torch.Generator().manual_seed(0)
    for _ in range(500):
        batch, heads, length = (int(x) for x in torch.randint(1, 4096, (3,), generator=gen))
        plan = plan_decode_splits(batch, heads % 16 + 1, length * 9, h100_sms, 64)
        # The splits cover the context exactly: none missing, none wholly past it.
        assert plan.num_splits * plan.tokens_per_split >= length * 9
        assert (plan.num_splits - 1) * plan.tokens_per_split < length * 9
        assert plan.tokens_per_split % 64 == 0 and 1 <= plan.num_splits <= 128


def _prefill_plan_of(case: PrefillCase, inputs: dict[str, Any]):  # type: ignore[no-untyped-def]
    """The plan the op makes for an interpreted case (same host ints as the op uses)."""
    from kernels.triton_decode import INTERPRETER_SMS
    from kernels.triton_prefill import plan_prefix_prefill

    bound = inputs["max_cached_len"]
    if bound is None:
        bound = inputs["block_table"].shape[1] * case.block_size
    return plan_prefix_prefill(
        len(case.new_lens), case.num_q_heads, case.num_kv_heads, case.head_dim, inputs["q"].shape[0], bound,
        INTERPRETER_SMS, torch.device("cpu"), case.num_splits,
    )


def test_interpreted_prefill_cases_cover_the_three_kernels_and_several_splits(
    cases, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # as in the child process: descriptors are emulated there
    tiled = [_prefill_plan_of(c, cases[c.name][1]) for c in PREFILL_CASES]
    causal = [_prefill_plan_of(c, cases[c.name][1]) for c in CAUSAL_PREFILL_CASES]
    split = {c.name: _prefill_plan_of(c, cases[c.name][1]) for c in SPLIT_PREFILL_CASES}
    assert not any(p.grouped or p.contiguous for p in tiled), tiled
    assert all(p.contiguous and not p.grouped for p in causal), causal
    assert all(p.grouped for p in split.values()), split
    auto = [split[c.name] for c in SPLIT_PREFILL_CASES if c.num_splits is None]
    assert all(p.num_splits > 1 for p in auto), auto


def test_prefill_plan_splits_few_new_tokens_after_a_long_prefix_and_keeps_long_prefills_tiled() -> None:
    from kernels.triton_prefill import MAX_PREFILL_SPLITS, plan_prefix_prefill

    cuda, sms = torch.device("cuda"), 132  # no kernel runs: the plan is host arithmetic only

    def plan(batch: int, new: int, cached: int):  # type: ignore[no-untyped-def]
        return plan_prefix_prefill(batch, 32, 8, 128, new, cached, sms, cuda)

    hit = plan(1, 64, 32768)  # the prefix-cache hit of issue 8: 64 new tokens after 32k cached
    assert hit.grouped and hit.tiling.block_m == 128
    programs = triton.cdiv(64 * 4, hit.tiling.block_m) * 8 * hit.num_splits
    assert hit.num_splits >= 8 and 0.9 * sms <= programs <= sms, hit  # one wave of programs, not a few more
    assert plan(1, 256, 2048).num_splits == 2  # 64 row tiles x 2 splits: one wave again
    assert plan(1, 1, 32768).grouped and plan(1, 1, 32768).tiling.block_m == 16  # one token: a decode-like tile
    assert plan(8, 64, 8192).grouped  # a batch of small hits still shares K/V across the group
    assert not plan(1, 512, 32768).grouped  # the long prefill keeps the tiled kernel (1.08x SDPA)
    assert not plan(16, 4096, 0).grouped
    assert plan(1, 64, 0).num_splits == 1  # nothing cached: nothing to split
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        batch, new, cached = (int(x) for x in torch.randint(1, 40000, (3,), generator=gen))
        p = plan(batch % 64 + 1, new % 600 + 1, cached)
        assert 1 <= p.num_splits <= MAX_PREFILL_SPLITS
        assert p.grouped or p.num_splits == 1


# ---- argument checks: these run before any launch, so no interpreter is needed ----


def _decode_args(**over: Any) -> dict[str, Any]:
    pool = torch.randn(4, NUM_LAYERS, 2, 16, 2, 64, dtype=torch.float16)
    args: dict[str, Any] = {
        "q": torch.randn(3, 8, 64, dtype=torch.float16),
        "k_cache": pool[:, LAYER, 0],
        "v_cache": pool[:, LAYER, 1],
        "block_table": torch.zeros(3, 2, dtype=torch.int32),
        "context_lens": torch.ones(3, dtype=torch.int32),
        "scale": 0.125,
    }
    args.update(over)
    return args


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"block_table": torch.zeros(3, 2, dtype=torch.int64)}, "block_table must have dtype"),
        ({"context_lens": torch.ones(2, dtype=torch.int32)}, "context_lens must be [batch] = (3,)"),
        ({"q": torch.randn(3, 64, 8, dtype=torch.float16).transpose(1, 2)}, "q must have a contiguous last dimension"),
        ({"q": torch.randn(3, 7, 64, dtype=torch.float16)}, "num_q_heads 7 must be a multiple of num_kv_heads 2"),
        ({"q": torch.randn(3, 8, 64, dtype=torch.bfloat16)}, "q dtype torch.bfloat16 != cache dtype torch.float16"),
        ({"q": torch.randn(3, 8, 48, dtype=torch.float16)}, "q head_dim 48 != cache head_dim 64"),
        ({"k_cache": torch.randn(4, 16, 2, 128, dtype=torch.float16)[..., ::2]}, "k_cache must have a contiguous"),
        ({"scale": float("nan")}, "scale must be a finite float"),
    ],
)
def test_paged_decode_rejects_bad_arguments_naming_the_culprit(override: dict[str, Any], message: str) -> None:
    from kernels import triton_ops

    with pytest.raises(ValueError, match="paged_decode: ") as raised:
        triton_ops.paged_decode(**_decode_args(**override))
    assert message in str(raised.value)


def test_ops_refuse_cpu_tensors_outside_the_interpreter() -> None:
    from kernels import triton_ops

    if triton_ops._INTERPRETED:
        pytest.skip("this process imported the kernels under TRITON_INTERPRET")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        triton_ops.paged_decode(**_decode_args())


def test_prefix_prefill_rejects_mismatched_kv_and_offsets() -> None:
    from kernels import triton_ops

    args = _decode_args()
    q = torch.randn(10, 8, 64, dtype=torch.float16)
    kv = torch.randn(10, 2, 64, dtype=torch.float16)
    common = (args["k_cache"], args["v_cache"], torch.zeros(2, 1, dtype=torch.int32))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    cached = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"prefix_prefill: k must be \[num_tokens, num_kv_heads, head_dim\]"):
        triton_ops.prefix_prefill(q, kv[:9], kv, *common, cu, cached, 0.1)
    with pytest.raises(ValueError, match=r"prefix_prefill: cached_lens must be \[batch\] = \(2,\)"):
        triton_ops.prefix_prefill(q, kv, kv, *common, cu, cached[:1], 0.1)
    with pytest.raises(ValueError, match=r"prefix_prefill: max_cached_len 17 must be in \[0, 16\]"):
        triton_ops.prefix_prefill(q, kv, kv, *common, cu, cached, 0.1, max_cached_len=17)
    with pytest.raises(ValueError, match="prefix_prefill: num_splits must be >= 1, got 0"):
        triton_ops.prefix_prefill(q, kv, kv, *common, cu, cached, 0.1, num_splits=0)


def test_copy_blocks_rejects_blocks_that_are_not_one_span() -> None:
    from kernels import triton_ops

    pool = torch.randn(6, 2, 2, 16, 2, 64)
    one_layer = pool[:, 1]
    split_blocks = pool.transpose(1, 2)  # a block now interleaves the layers: not one span
    ids = torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="copy_blocks: each block of src must be one contiguous span"):
        triton_ops.copy_blocks(split_blocks, torch.empty_like(split_blocks), ids, ids)
    with pytest.raises(ValueError, match="copy_blocks: src and dst must share their block shape"):
        triton_ops.copy_blocks(pool, one_layer, ids, ids)


if __name__ == "__main__":
    _child_main(sys.argv[1], sys.argv[2])


def test_reference_prefix_prefill_in_query_tiles_equals_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU path tiles long prompts (a whole 32k x 32k score matrix would not fit in memory);
    the tiles must give exactly what one pass gives."""
    from kernels import reference

    gen = torch.Generator().manual_seed(5)
    hq, hkv, d, bs = 4, 2, 16, 16
    k_cache = torch.randn(20, bs, hkv, d, dtype=torch.float64, generator=gen)
    v_cache = torch.randn(20, bs, hkv, d, dtype=torch.float64, generator=gen)
    table = torch.arange(20, dtype=torch.int32).view(2, 10)
    q = torch.randn(70, hq, d, dtype=torch.float64, generator=gen)
    k = torch.randn(70, hkv, d, dtype=torch.float64, generator=gen)
    v = torch.randn(70, hkv, d, dtype=torch.float64, generator=gen)
    cu = torch.tensor([0, 30, 70], dtype=torch.int32)
    cached = torch.tensor([50, 0], dtype=torch.int32)
    whole = reference.prefix_prefill(q, k, v, k_cache, v_cache, table, cu, cached, 0.25)
    monkeypatch.setattr(reference, "_SCORE_BUDGET", hq * 40 * 50)  # tiles of 16 query rows
    tiled = reference.prefix_prefill(q, k, v, k_cache, v_cache, table, cu, cached, 0.25)
    torch.testing.assert_close(tiled, whole, atol=1e-12, rtol=0)


def test_causal_descriptor_variant_that_does_not_compile_falls_back_once_and_for_all(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Triton version or card on which the descriptor kernel fails to build keeps the pointer kernel
    (False: nothing launched), warns once, and does not try that variant again; a variant that ran
    before re-raises (a real error, not the toolchain)."""
    from kernels import triton_prefill

    calls: list[int] = []

    class Failing:
        def __getitem__(self, grid):  # type: ignore[no-untyped-def]
            def launch(*args, **kwargs):  # type: ignore[no-untyped-def]
                calls.append(1)
                raise RuntimeError("PassManager::run failed")

            return launch

    monkeypatch.setattr(triton_prefill, "_causal_prefill_kernel", Failing())
    monkeypatch.setattr(triton_prefill, "_causal_variants_that_failed", set())
    monkeypatch.setattr(triton_prefill, "_causal_variants_that_ran", set())
    q, k = torch.randn(40, 8, 64), torch.randn(40, 2, 64)
    cu, out = torch.tensor([0, 40], dtype=torch.int32), torch.full((40, 8, 64), float("nan"))
    tiling = triton_prefill.causal_tiling_for(torch.device("cpu"), 64)
    with pytest.warns(RuntimeWarning, match="pointer kernel"):
        assert triton_prefill.launch_causal_prefill(q, k, k, cu, 0.125, out, 40, tiling) is False
    assert triton_prefill.launch_causal_prefill(q, k, k, cu, 0.125, out, 40, tiling) is False
    assert len(calls) == 1 and torch.isnan(out).all()
    variant = (q.device, q.dtype, 64, 4, tiling)
    triton_prefill._causal_variants_that_failed.clear()
    triton_prefill._causal_variants_that_ran.add(variant)
    with pytest.raises(RuntimeError, match="PassManager"):
        triton_prefill.launch_causal_prefill(q, k, k, cu, 0.125, out, 40, tiling)
