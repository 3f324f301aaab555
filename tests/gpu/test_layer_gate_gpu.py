"""Layer-by-layer loads on CUDA: the driver's strided copies, and waits that hold the compute stream
until a layer has landed, eager, in a CUDA graph and inside the engine.

The copy stream is held back by a sleeping kernel queued before the loads, and the pool is poisoned
with NaN first: a read that does not wait sees NaN (each test checks that it would), one that waits
sees the source.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cacheproxy.cache.cuda_driver import independent_stream
from cacheproxy.cache.tiered_store import copy_runs
from cacheproxy.config import Settings
from cacheproxy.engine.engine import LLMEngine
from cacheproxy.engine.layer_gate import LayerGate
from cacheproxy.engine.request import GenerationRequest, SamplingParams
from cacheproxy.engine.tiny_model import make_tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

BLOCK = (4, 2, 16, 8, 128)  # layers, k/v, block_size, kv heads, head_dim
HOLD_CYCLES = 200_000_000  # ~0.1 s of a sleeping kernel on the copy stream


def _setup(seed: int) -> tuple[LayerGate, torch.Tensor, torch.Tensor, list[tuple[int, torch.Tensor]]]:
    gate = LayerGate.for_device(BLOCK[0], torch.device("cuda"))
    assert gate is not None
    g = torch.Generator().manual_seed(seed)
    pool = torch.full((48, *BLOCK), float("nan"), dtype=torch.bfloat16, device="cuda")
    slab = torch.randn((32, *BLOCK), generator=g).to(torch.bfloat16).pin_memory()
    # runs of 5 and 3 blocks, singles, out of order on both sides
    copies = [(10 + i, slab[4 + i]) for i in range(5)] + [(30 + i, slab[20 + i]) for i in range(3)]
    copies += [(2, slab[31]), (47, slab[0]), (20, slab[12])]
    return gate, pool, slab, copies


def _compute_and_copy_streams() -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
    """A compute stream, and a copy stream that does not share its hardware queue: held back, the copy
    stream holds back only itself."""
    compute = torch.cuda.Stream()
    with torch.cuda.stream(compute):
        stream, independent = independent_stream(torch.device("cuda"))
    assert independent
    return compute, stream


def test_layered_load_puts_every_layer_of_every_block_in_place() -> None:
    gate, pool, _, copies = _setup(1)
    stream = torch.cuda.Stream()
    gate.load(pool, copy_runs(copies), stream)
    assert gate.has_planned
    gate.start()
    assert not gate.has_planned
    torch.cuda.synchronize()
    copied = {block for block, _ in copies}
    for block, source in copies:
        assert torch.equal(pool[block].cpu(), source), block
    assert all(pool[b].isnan().all() for b in range(pool.shape[0]) if b not in copied)
    assert (gate.flags == gate.target).all() and gate.target.item() > 0


def test_a_partial_start_issues_its_first_layers_and_the_next_call_the_rest() -> None:
    gate, pool, _, copies = _setup(2)
    stream = torch.cuda.Stream()
    gate.load(pool, copy_runs(copies), stream)
    gate.start(1)
    assert gate.has_planned
    torch.cuda.synchronize()
    for block, source in copies:
        assert torch.equal(pool[block, 0].cpu(), source[0]), block
        assert pool[block, 1:].isnan().all(), block
    assert gate.flags[0] == gate.target and (gate.flags[1:] != gate.target).all()
    later = [(40 + i, source) for i, (_, source) in enumerate(copies[:3])]
    gate.load(pool, copy_runs(later), stream)  # planned before the rest went: the rest goes first
    gate.start(2)
    torch.cuda.synchronize()
    for block, source in copies:
        assert torch.equal(pool[block].cpu(), source), block
    for block, source in later:
        assert torch.equal(pool[block, :2].cpu(), source[:2]), block
        assert pool[block, 2:].isnan().all(), block
    gate.start()
    assert not gate.has_planned
    torch.cuda.synchronize()
    for block, source in later:
        assert torch.equal(pool[block].cpu(), source), block
    assert (gate.flags == gate.target).all()


@contextlib.contextmanager
def _held_back_loads(
    gate: LayerGate, pool: torch.Tensor, copies: list[tuple[int, torch.Tensor]]
) -> Iterator[None]:
    """The copies queued on their stream behind a sleeping kernel; the body runs on the compute stream
    after `start`, while they are still held back."""
    compute, stream = _compute_and_copy_streams()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(HOLD_CYCLES)
    with torch.cuda.stream(compute):
        gate.load(pool, copy_runs(copies), stream)
        gate.start()
        yield


def test_wait_holds_the_stream_until_its_layer_has_landed() -> None:
    gate, pool, _, copies = _setup(2)
    blocks = torch.tensor([b for b, _ in copies], device="cuda")
    gate.wait(0)  # compiled before the copies are held back
    # Kernels load lazily, and a first load can wait for the device: the reads below run once first.
    pool[blocks, 0].clone()
    torch.cuda.synchronize()
    with _held_back_loads(gate, pool, copies):
        early = pool[blocks, 0].clone()  # no wait: the copies are still held back
        seen = []
        for layer in range(BLOCK[0]):
            gate.wait(layer)
            seen.append(pool[blocks, layer].clone())
    torch.cuda.synchronize()
    assert early.isnan().all()
    for layer in range(BLOCK[0]):
        expected = torch.stack([source[layer] for _, source in copies])
        assert torch.equal(seen[layer].cpu(), expected), layer


def test_wait_captured_in_a_graph_holds_each_replay() -> None:
    gate, pool, _, copies = _setup(3)
    blocks = torch.tensor([b for b, _ in copies], device="cuda")
    out = torch.empty_like(pool[blocks, BLOCK[0] - 1])
    graph = torch.cuda.CUDAGraph()
    gate.wait(BLOCK[0] - 1)  # compile outside the capture
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        gate.wait(BLOCK[0] - 1)
        out.copy_(pool[blocks, BLOCK[0] - 1])
    graph.replay()  # nothing loading: returns at once with what the pool holds
    torch.cuda.synchronize()
    assert out.isnan().all()
    for round_ in range(2):  # a second epoch on the same flags
        pool.fill_(float("nan"))
        torch.cuda.synchronize()
        with _held_back_loads(gate, pool, copies):
            graph.replay()
        torch.cuda.synchronize()
        expected = torch.stack([source[BLOCK[0] - 1] for _, source in copies])
        assert torch.equal(out.cpu(), expected), round_


SHAPE = {"hidden_size": 512, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
         "intermediate_size": 1024, "num_hidden_layers": 3}  # fmt: skip


@pytest.mark.parametrize("layerwise", [True, False])
@pytest.mark.parametrize("batch", [1, 2])  # 1: the prefill runs from a graph; 2: one eager step of two
def test_cpu_tier_hit_with_its_copies_held_back(
    tmp_path: Path, layerwise: bool, batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cacheproxy.cache import tiered_store

    # a 64-block tail: longer prefixes send their first blocks whole during the walk, the rest layer by layer
    monkeypatch.setattr(tiered_store, "LAYERED_TAIL_BYTES", 0)
    model = make_tiny_model(tmp_path / "peaked", "llama", seed=11, init_std=0.15, **SHAPE)
    engine = LLMEngine.from_settings(
        Settings(model=str(model), data_dir=tmp_path, device="cuda", dtype="bfloat16", num_kv_blocks=512,
                 cpu_cache_bytes=64 << 20, disk_cache_enabled=False, cost_model=False, layerwise_loads=layerwise)
    )  # fmt: skip
    assert (engine.store.layer_gate is not None) == layerwise
    rng = random.Random(7)
    # 1030 tokens: 64 cached blocks, which whole-block loads issue during the walk (a batch of 64);
    # 2100: 131 blocks, some issued during the walk either way
    prompts = [[rng.randrange(5, 2000) for _ in range(n)] for n in ((1030,) if batch == 1 else (2100, 1030))]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    def run(tag: str) -> tuple[dict[str, list[int]], list[dict[str, int]]]:
        for i, p in enumerate(prompts):
            engine.add_request(GenerationRequest(f"{tag}{i}", p, params))
        toks: dict[str, list[int]] = {f"{tag}{i}": [] for i in range(len(prompts))}
        tiers: list[dict[str, int]] = []
        while engine.has_work():
            for o in engine.step():
                if not toks[o.request_id]:
                    tiers.append(o.cached_tokens_by_tier)
                toks[o.request_id] += o.token_ids
        return {k[len(tag) :]: v for k, v in toks.items()}, tiers

    run("cold")
    gpu, tiers = run("gpu")
    assert all(set(t) == {"gpu"} for t in tiers)
    engine.store.evict_gpu()
    free = torch.tensor(list(engine.pool.free), device="cuda")
    engine.pool.kv[free] = float("nan")  # whatever block the loads land in held nothing usable
    assert engine.store.load_stream is not None
    with torch.cuda.stream(engine.store.load_stream):
        torch.cuda._sleep(HOLD_CYCLES)
    cpu, tiers = run("cpu")
    assert all(set(t) == {"cpu"} for t in tiers) and len(tiers) == batch
    assert cpu == gpu
    if layerwise:
        assert engine.store.layer_gate is not None and engine.store.layer_gate._epoch > 0
    engine.shutdown()
