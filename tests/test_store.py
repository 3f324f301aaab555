"""The tiered prefix store inside the engine: every tier serves the same KV the model computed."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from cacheproxy.cache import cost_model
from cacheproxy.cache.cost_model import CostModel, LoadPlan, fit_prefill
from cacheproxy.config import Settings
from cacheproxy.engine.engine import LLMEngine
from cacheproxy.engine.request import GenerationOutput, GenerationRequest, SamplingParams
from cacheproxy.engine.tiny_model import make_tiny_model

ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("store-models")
    return {a: make_tiny_model(root / a, a, seed=3, init_std=0.15) for a in ARCHS}


def _engine(model: Path, data_dir: Path, **kw: object) -> LLMEngine:
    opts: dict[str, object] = {
        "model": str(model),
        "data_dir": data_dir,
        "num_kv_blocks": 128,
        "cpu_cache_bytes": 4 << 20,
        "disk_cache_bytes": 64 << 20,
        "cost_model": False,  # these tests want every tier used, whatever it costs here
    }
    opts.update(kw)
    return LLMEngine.from_settings(Settings(**opts))


def _run(engine: LLMEngine, rid: str, prompt: list[int], n: int = 16, salt: str = "") -> list[GenerationOutput]:
    engine.add_request(
        GenerationRequest(rid, prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), salt)
    )
    outs: list[GenerationOutput] = []
    while engine.has_work():
        outs.extend(engine.step())
    return [o for o in outs if o.request_id == rid]


def _tokens(outs: list[GenerationOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, 2000) for _ in range(n)]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_output_identical_cold_gpu_cpu_and_disk_after_restart(
    models: dict[str, Path], tmp_path: Path, arch: str
) -> None:
    prompt = _prompt(1, 90)
    full = (len(prompt) - 1) // 16 * 16
    a = _engine(models[arch], tmp_path)
    cold = _run(a, "cold", prompt)
    gpu = _run(a, "gpu", prompt)
    assert cold[0].cached_tokens == 0
    assert gpu[0].cached_tokens_by_tier == {"gpu": full}

    assert a.store.evict_gpu() > 0  # demoted to the CPU tier
    cpu = _run(a, "cpu", prompt)
    assert cpu[0].cached_tokens_by_tier == {"cpu": full}
    a.shutdown()  # graceful: flushes pool and CPU tier to disk

    b = _engine(models[arch], tmp_path)  # a restart: empty pool and CPU tier, same disk
    disk = _run(b, "disk", prompt)
    assert disk[0].cached_tokens_by_tier == {"disk": full}
    b.shutdown()
    for outs in (gpu, cpu, disk):
        assert _tokens(outs) == _tokens(cold)


def test_pool_eviction_demotes_to_cpu_and_cpu_eviction_to_disk(models: dict[str, Path], tmp_path: Path) -> None:
    # A pool of 16 blocks: every new prompt of 6 blocks evicts older ones.
    engine = _engine(models["llama"], tmp_path, num_kv_blocks=16, cpu_cache_bytes=6 * 8192)
    prompts = [_prompt(10 + i, 97) for i in range(8)]
    cold = [_tokens(_run(engine, f"c{i}", p)) for i, p in enumerate(prompts)]
    assert engine.pool.evictions > 0
    engine.store.tiers[1].flush()  # type: ignore[attr-defined]  # disk writes are queued
    # Newest first: the newest prompt is still in the pool, the next ones in the CPU tier, the oldest on disk.
    warm = [_run(engine, f"w{i}", p) for i, p in reversed(list(enumerate(prompts)))]
    tiers = set()
    for w, c in zip(warm, reversed(cold), strict=True):
        assert _tokens(w) == c
        assert w[0].cached_tokens == 96
        tiers |= set(w[0].cached_tokens_by_tier)
    assert {"cpu", "disk"} <= tiers
    stats = engine.stats()["tiers"]
    for name in ("gpu", "cpu", "disk"):
        assert stats[name]["used_bytes"] <= stats[name]["capacity_bytes"], name
    engine.shutdown()


def test_capacity_bounds_hold_under_a_stream_of_distinct_prefixes(models: dict[str, Path], tmp_path: Path) -> None:
    engine = _engine(
        models["qwen2"], tmp_path, num_kv_blocks=24, cpu_cache_bytes=10 * 8192, disk_cache_bytes=1 << 20,
        cache_policy="write_through",
    )  # fmt: skip
    for i in range(40):
        _run(engine, f"s{i}", _prompt(100 + i, 120), n=4)
        stats = engine.stats()["tiers"]
        for name in ("gpu", "cpu", "disk"):
            assert stats[name]["used_bytes"] <= stats[name]["capacity_bytes"], (i, name, stats[name])
    engine.store.tiers[1].flush()  # type: ignore[attr-defined]
    stats = engine.stats()["tiers"]
    assert stats["disk"]["evictions"] > 0 and stats["cpu"]["evictions"] > 0
    assert stats["disk"]["used_bytes"] <= stats["disk"]["capacity_bytes"]
    engine.shutdown()


def test_forged_hash_collision_is_refused_by_verification(models: dict[str, Path], tmp_path: Path) -> None:
    engine = _engine(models["llama"], tmp_path, cpu_cache_bytes=0, disk_cache_enabled=False)
    reference = _engine(models["llama"], tmp_path / "ref", cpu_cache_bytes=0, disk_cache_enabled=False)
    # Every block of every prompt gets the same hash chain: only the parent/token check can tell.
    forged = [bytes([i]) * 16 for i in range(64)]
    engine.hasher.hash_blocks = lambda ids, salt="", parent=None: forged[: len(ids) // 16]  # type: ignore[method-assign]
    engine.hasher.next_hash = lambda parent, toks: forged[forged.index(parent) + 1]  # type: ignore[method-assign]
    first, second = _prompt(20, 70), _prompt(21, 70)
    _run(engine, "first", first)
    victim = _run(engine, "second", second)
    assert victim[0].cached_tokens == 0
    assert _tokens(victim) == _tokens(_run(reference, "second", second))


def test_tenants_share_nothing_unless_scope_is_global(models: dict[str, Path], tmp_path: Path) -> None:
    engine = _engine(models["llama"], tmp_path, cpu_cache_bytes=0, disk_cache_enabled=False)
    prompt = _prompt(30, 80)
    _run(engine, "a", prompt, salt="tenant-a")
    assert _run(engine, "b", prompt, salt="tenant-b")[0].cached_tokens == 0
    assert _run(engine, "a2", prompt, salt="tenant-a")[0].cached_tokens == 64
    assert _run(engine, "g", prompt, salt="")[0].cached_tokens == 0
    assert _run(engine, "g2", prompt, salt="")[0].cached_tokens == 64


def test_cost_model_measures_every_tier(models: dict[str, Path], tmp_path: Path) -> None:
    engine = _engine(models["llama"], tmp_path, cost_model=True)
    cm = engine.cost_model
    assert cm.prefill_tokens_per_s > 0
    assert set(cm.load_s_per_block) == {"cpu", "disk"}
    assert all(0 < t < 1 for t in cm.load_s_per_block.values())
    assert cm.prefill_fixed_s >= 0
    assert engine.store.cost_model is cm
    # The probes leave nothing behind.
    assert engine.stats()["tiers"]["disk"]["entries"] == 0
    engine.shutdown()


def test_operators_list_pin_and_evict_prefixes(models: dict[str, Path], tmp_path: Path) -> None:
    engine = _engine(models["llama"], tmp_path, num_kv_blocks=24, cpu_cache_bytes=0, disk_cache_enabled=False)
    kept, other = _prompt(40, 97), _prompt(41, 97)
    _run(engine, "kept", kept, n=4)
    _run(engine, "kept-again", kept, n=4)
    entries = engine.cache_entries()
    assert len(entries) == 1
    e = entries[0]
    assert e["tokens"] == 96 and e["hits"] == 1 and e["pinned_until"] is None and not e["in_use"]
    assert engine.pin_prefix(str(e["hash"]), ttl_s=60) == 6
    for i in range(6):  # unpinned traffic that needs the whole rest of the pool, again and again
        _run(engine, f"o{i}", _prompt(50 + i, 97), n=4)
    assert _run(engine, "kept-3", kept, n=4)[0].cached_tokens == 96  # the pin held
    assert engine.unpin_prefix(str(e["hash"])) == 6
    _run(engine, "other", other, n=4)
    removed = engine.evict_prefix(None)
    assert removed["gpu"] > 0 and engine.cache_entries() == []
    assert _run(engine, "kept-4", kept, n=4)[0].cached_tokens == 0
    with pytest.raises(Exception, match="32 hex digits"):
        engine.pin_prefix("zz", 10)


def test_pins_expire(models: dict[str, Path], tmp_path: Path) -> None:
    engine = _engine(models["llama"], tmp_path, cpu_cache_bytes=0, disk_cache_enabled=False)
    _run(engine, "a", _prompt(60, 40), n=2)
    h = str(engine.cache_entries()[0]["hash"])
    engine.pin_prefix(h, ttl_s=0.01)
    assert engine.cache_entries()[0]["pinned_until"] is not None
    import time

    time.sleep(0.02)
    _run(engine, "b", _prompt(61, 20), n=2)  # a step expires the pin
    assert all(x["pinned_until"] is None for x in engine.cache_entries())
    assert engine.pool.num_free == engine.pool.num_blocks


def test_identical_blocks_of_concurrent_requests_end_up_shared(models: dict[str, Path], tmp_path: Path) -> None:
    engine = _engine(models["llama"], tmp_path, cpu_cache_bytes=0, disk_cache_enabled=False)
    prompt = _prompt(70, 80)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    for rid in ("a", "b"):  # admitted in the same step: neither can hit the other's blocks yet
        engine.add_request(GenerationRequest(rid, prompt, params))
    engine.step()
    engine._settle()  # the step's blocks are published once its outputs are out (the next step does it)
    a, b = engine.seqs["a"], engine.seqs["b"]
    assert a.cached_tokens == b.cached_tokens == 0
    # once published, the second copy of each full block is dropped for the first one
    assert a.block_table[:5] == b.block_table[:5]
    assert all(engine.pool.ref_counts[blk] == 2 for blk in a.block_table[:5])
    outs: dict[str, list[int]] = {"a": [], "b": []}
    while engine.has_work():
        for o in engine.step():
            outs[o.request_id] += o.token_ids
    assert outs["a"] == outs["b"] and len(outs["a"]) == 23
    assert engine.pool.num_free == engine.pool.num_blocks


# --- meet in the middle: recompute the first blocks while the later ones load ----------------


def _cost(load_us: dict[str, float], fixed_us: float = 0.0, block_us: float = 100.0) -> CostModel:
    return CostModel(16, 1, 16 / (block_us * 1e-6), {k: v * 1e-6 for k, v in load_us.items()}, fixed_us * 1e-6)


def test_plan_picks_load_recompute_or_the_meeting_point() -> None:
    # loading is free: load all; loading is hopeless: recompute all (a split must win by 20%)
    assert _cost({"cpu": 0.0}).plan(["cpu"] * 10, 5) == LoadPlan(0, 10)
    assert _cost({"disk": 1e9}).plan(["disk"] * 10, 5) == LoadPlan(10, 0)
    # equal costs: half recomputed while the other half loads
    assert _cost({"disk": 100.0}).plan(["disk"] * 100, 5) == LoadPlan(50, 50)
    # a load 3x slower than a recompute: a quarter loads
    plan = _cost({"disk": 300.0}).plan(["disk"] * 400, 5)
    assert plan == LoadPlan(300, 100)
    # too short to risk a split: one slow block read would be 7.5% of the recompute
    assert _cost({"disk": 300.0}).plan(["disk"] * 40, 5) == LoadPlan(40, 0)
    # a fixed forward cost makes a short recompute not worth it: the fast tier loads everything
    assert _cost({"cpu": 10.0}, fixed_us=5000.0).plan(["cpu"] * 20, 5) == LoadPlan(0, 20)
    # the plan is never slower than recomputing or loading everything
    cm = _cost({"cpu": 20.0, "disk": 250.0}, fixed_us=800.0)
    tiers = ["cpu"] * 30 + ["disk"] * 50
    p = cm.plan(tiers, 40)
    load = [cm.load_s_per_block[t] for t in tiers]
    if p.load == 0:  # recompute all: one pass with the tail
        t_plan = cm.prefill_s(len(tiers) * 16 + 40)
    else:
        t_plan = max(cm.prefill_s(p.recompute * 16), sum(load[p.recompute :])) + cm.prefill_s(40)
    assert t_plan <= cm.prefill_s(len(tiers) * 16 + 40) + 1e-12
    assert t_plan <= sum(load) + cm.prefill_s(40) + 1e-12
    assert p.recompute + p.load == len(tiers)


def test_short_prefixes_are_not_split_where_slow_loads_would_cost_extra_passes() -> None:
    # the H200 figures: 39 k tokens/s, a 5.7 ms one-block pass, disk probed at 0.7 ms a block
    cm = CostModel(16, 1, 39_000, {"disk": 705e-6}, prefill_fixed_s=52e-6, prefill_min_s=5.67e-3)
    assert cm.plan(["disk"] * 128, 64).load == 0  # 2k tokens: recomputed (a lagging split cost 68.6 vs 52 ms)
    long = cm.plan(["disk"] * 2048, 64)
    assert long.recompute > 0 and long.load > 0  # 32k tokens: worth splitting, the regret is under 5%


def test_a_cpu_engine_never_splits(models: dict[str, Path], tmp_path: Path) -> None:
    engine = _engine(models["llama"], tmp_path)
    assert engine.store.split_loads is False  # the forward pass holds the thread: loads cannot overlap it
    assert _cost({"disk": 100.0}).plan(["disk"] * 100, 5, split=False) in (LoadPlan(0, 100), LoadPlan(100, 0))
    engine.shutdown()


def test_every_pass_costs_at_least_one_block_pass() -> None:
    cm = CostModel(16, 1, 1e5, {}, prefill_fixed_s=0.001, prefill_min_s=0.004)
    assert cm.prefill_s(0) == 0.0
    assert cm.prefill_s(16) == pytest.approx(0.004)  # a short pass still reads all the weights
    assert cm.prefill_s(1000) == pytest.approx(0.011)


def test_fit_prefill_recovers_a_line() -> None:
    fixed, rate = fit_prefill((64, 0.010 + 64e-5), (2048, 0.010 + 2048e-5))
    assert fixed == pytest.approx(0.010)
    assert rate == pytest.approx(1e5)


@pytest.mark.parametrize("tier", ["cpu", "disk"])
@pytest.mark.parametrize("load_us", [100.0, 150.0, 250.0])
def test_prefix_met_in_the_middle_gives_the_same_tokens(
    models: dict[str, Path], tmp_path: Path, tier: str, load_us: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loads from the back, recompute from the front, wherever they meet (the estimate only sizes
    the recompute's steps): the output is the cold one, every block ends up in the pool."""
    monkeypatch.setattr(cost_model, "SPLIT_MAX_REGRET", 1.0)  # a short prompt, split all the same
    prompt = _prompt(7, 16 * 20 + 5)  # 20 full blocks, then 5 tokens
    engine = _engine(models["llama"], tmp_path, max_num_batched_tokens=64)
    cold = _run(engine, "cold", prompt)
    engine.store.evict_gpu()  # the prefix now lives in the CPU tier
    if tier == "disk":
        engine.store.flush()
        for h in engine.store.tiers[0].hashes():  # type: ignore[attr-defined]
            engine.store.tiers[0].remove(h)
    engine.store.cost_model = _cost({tier: load_us})
    engine.store.split_loads = True  # a CPU engine would not split (nothing overlaps there): the mechanics
    plan = engine.store.cost_model.plan([tier] * 20, 5)
    assert plan.recompute > 0 and plan.load > 0
    split = _run(engine, "split", prompt)
    assert _tokens(split) == _tokens(cold)
    loaded = split[0].cached_tokens
    assert 16 <= loaded < 20 * 16 and loaded % 16 == 0  # at least one block loads, one is recomputed
    assert split[0].cached_tokens_by_tier == {tier: loaded}
    again = _run(engine, "again", prompt)
    assert again[0].cached_tokens_by_tier == {"gpu": 20 * 16}
    assert _tokens(again) == _tokens(cold)
    assert not engine.store.has_pending_loads
    counters = engine.stats()["prefix_cache"]
    assert counters["plans"]["split"] == 1
    assert counters["split_blocks"] == {"loaded": loaded // 16, "recomputed": 20 - loaded // 16}
    assert engine.pool.num_free == engine.pool.num_blocks
    engine.shutdown()


def test_a_block_that_fails_its_check_while_loading_is_recomputed(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cost_model, "SPLIT_MAX_REGRET", 1.0)
    prompt = _prompt(8, 16 * 12 + 3)
    engine = _engine(models["llama"], tmp_path)
    cold = _run(engine, "cold", prompt)
    engine.store.evict_gpu()
    cpu = engine.store.tiers[0]
    engine.store.cost_model = _cost({"cpu": 100.0})
    engine.store.split_loads = True
    # the 9th block vanishes from every tier after the plan counted it: loads (from the back) stop there
    hashes = engine.hasher.hash_blocks(prompt, parent=engine.hasher.root(""))
    disk = engine.store.tiers[1]
    original_contains = cpu.contains
    cpu.contains = lambda h: h == hashes[8] or original_contains(h)  # type: ignore[method-assign]
    cpu.remove(hashes[8])
    disk.remove(hashes[8])
    out = _run(engine, "split", prompt)
    assert _tokens(out) == _tokens(cold)
    assert 16 <= out[0].cached_tokens <= 3 * 16  # some of blocks 9-11; 8 and before recomputed
    assert engine.pool.num_free == engine.pool.num_blocks
    engine.shutdown()


def test_aborting_while_blocks_load_frees_everything(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cost_model, "SPLIT_MAX_REGRET", 1.0)
    prompt = _prompt(9, 16 * 20 + 1)
    engine = _engine(models["llama"], tmp_path, max_num_batched_tokens=32)
    _run(engine, "cold", prompt)
    engine.store.evict_gpu()
    engine.store.cost_model = _cost({"cpu": 100.0})
    engine.store.split_loads = True
    engine.add_request(
        GenerationRequest("x", prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), "")
    )
    engine.step()  # the first recompute chunk runs, loads have begun
    seq = engine.seqs["x"]
    assert seq.pending_load is not None
    engine.abort("x")
    assert not engine.store.has_pending_loads
    assert engine.pool.num_free == engine.pool.num_blocks
    assert _tokens(_run(engine, "after", prompt, n=4))  # the engine goes on
    engine.shutdown()


def test_copy_runs_join_only_blocks_that_follow_on_in_pool_and_source() -> None:
    import torch

    from cacheproxy.cache.tiered_store import copy_runs

    g = torch.Generator().manual_seed(7)
    slab = torch.randn(10, 2, 3, 4, generator=g)
    other = torch.randn(10, 2, 3, 4, generator=g)  # same offsets, another storage: never joined
    loose = torch.randn(2, 3, 4, generator=g)
    strided = torch.randn(2, 4, 3, generator=g).transpose(1, 2)  # not contiguous: copied alone
    copies = [
        (5, slab[2]), (6, slab[3]), (7, slab[4]),  # one run of three
        (8, other[5]),  # pool block follows on, source in another storage
        (9, slab[6]), (11, slab[7]),  # source follows on, pool block does not
        (12, loose), (13, strided), (14, slab[0]), (15, slab[1]), (16, slab[1]),  # a repeat ends a run
    ]  # fmt: skip
    runs = copy_runs(copies)
    assert [(first, count) for first, count, _ in runs] == [
        (5, 3), (8, 1), (9, 1), (11, 1), (12, 1), (13, 1), (14, 2), (16, 1)
    ]  # fmt: skip
    pool_runs = torch.full((20, 2, 3, 4), float("nan"))
    pool_blocks = torch.full((20, 2, 3, 4), float("nan"))
    for first, count, source in runs:
        pool_runs[first : first + count].copy_(source)
    for block, source in copies:
        pool_blocks[block].copy_(source)
    assert torch.equal(pool_runs.nan_to_num(-1.0), pool_blocks.nan_to_num(-1.0))
    assert runs[0][2].data_ptr() == slab[2].data_ptr()  # a view of the slab: no staging copy


def test_copy_runs_join_cpu_tier_slots_that_follow_on_and_copy_what_their_views_would() -> None:
    import torch

    from cacheproxy.cache.tiered_store import SlabSlot, copy_runs

    g = torch.Generator().manual_seed(8)
    slab = torch.randn(10, 2, 3, 4, generator=g)
    other = slab.clone()  # equal values, another slab: never joined
    loose = torch.randn(2, 3, 4, generator=g)
    slots = [
        (0, SlabSlot(slab, 4)), (1, SlabSlot(slab, 5)), (2, SlabSlot(slab, 6)),  # one run of three
        (3, SlabSlot(other, 7)),  # pool block and slot follow on, another slab
        (4, SlabSlot(slab, 9)), (6, SlabSlot(slab, 0)),  # pool block does not follow on
        (7, loose), (8, SlabSlot(slab, 1)), (9, SlabSlot(slab, 1)),  # a tensor and a repeated slot end runs
    ]  # fmt: skip
    runs = copy_runs(slots)
    assert [(first, count) for first, count, _ in runs] == [(0, 3), (3, 1), (4, 1), (6, 1), (7, 1), (8, 1), (9, 1)]
    assert runs[0][2].data_ptr() == slab[4].data_ptr()
    by_run = torch.full((12, 2, 3, 4), float("nan"))
    by_view = torch.full((12, 2, 3, 4), float("nan"))
    for first, count, source in runs:
        by_run[first : first + count].copy_(source)
    for block, source in slots:
        by_view[block].copy_(source.slab[source.slot] if isinstance(source, SlabSlot) else source)
    assert torch.equal(by_run.nan_to_num(-1.0), by_view.nan_to_num(-1.0))


def test_a_long_load_starts_copying_whole_blocks_after_the_first_batch_of_the_walk() -> None:
    """With a layer gate, all but the last blocks of a load are copied whole as the walk finds them,
    EARLY_COPY_BLOCKS at a time: the first batch goes once that many are walked, not after the tail's
    worth, and the tail (plus what is left of the last batch) stays for the layer-by-layer copies."""
    import torch

    from cacheproxy.cache import tiered_store
    from cacheproxy.cache.block_entry import BlockEntry
    from cacheproxy.cache.cpu_tier import CpuTier
    from cacheproxy.cache.hashing import BlockHasher, Namespace
    from cacheproxy.engine.block_pool import BlockPool

    bs, n = 4, 600
    pool = BlockPool(torch.zeros(700, 1, 2, bs, 1, 2))
    tier = CpuTier((1, 2, bs, 1, 2), torch.float32, 800 * pool.block_bytes, pin_memory=False)
    store = tiered_store.TieredStore(pool, [tier])
    hasher = BlockHasher(Namespace(b"m", "float32", bs), seed=2)
    rng = random.Random(2)
    ids = [rng.randrange(1000) for _ in range(n * bs)]
    root, hashes = hasher.root(), hasher.hash_blocks(ids)
    parent = root
    for i, h in enumerate(hashes):
        tier.put(BlockEntry(h, parent, tuple(ids[i * bs : (i + 1) * bs]), torch.randn(1, 2, bs, 1, 2)))
        parent = h
    # The CUDA path's bookkeeping without a device: a copy stream and a gate that only need to exist.
    store.load_stream = object()  # type: ignore[assignment]
    store.layer_gate = object()  # type: ignore[assignment]
    batches: list[tuple[int, int]] = []  # (blocks registered so far, blocks issued) per batch

    def issue(limit: int | None = None) -> None:
        batches.append((len(pool.by_hash), len(store._pending_copies[:limit])))
        del store._pending_copies[:limit]

    left: list[int] = []
    store._issue_copies = issue  # type: ignore[method-assign]
    store._issue_admission_copies = lambda issued_early: left.append(len(store._pending_copies))  # type: ignore[method-assign]
    match = store.match(root, hashes, ids, n)
    assert len(match.blocks) == n and match.tokens_by_tier == {"cpu": n * bs}
    step, tail = tiered_store.EARLY_COPY_BLOCKS, tiered_store.LAYERED_TAIL_BLOCKS
    whole = (n - tail) // step
    # a batch goes as its last block is queued, just before that block registers
    assert batches == [(step * (k + 1) - 1, step) for k in range(whole)]
    assert left == [n - whole * step]


def test_a_match_that_fails_past_the_pool_gives_its_pool_blocks_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """`match` acquires the pool's leading run before it asks the lower tiers how far they reach; a tier
    that raises there (a disk error, say) must not leave those blocks held by nobody."""
    import torch

    from cacheproxy.cache import tiered_store
    from cacheproxy.cache.cpu_tier import CpuTier
    from cacheproxy.cache.hashing import BlockHasher, Namespace
    from cacheproxy.engine.block_pool import BlockIdentity, BlockPool

    bs, n = 4, 10
    pool = BlockPool(torch.zeros(32, 1, 2, bs, 1, 2))
    tier = CpuTier((1, 2, bs, 1, 2), torch.float32, 16 * pool.block_bytes, pin_memory=False)
    store = tiered_store.TieredStore(pool, [tier])
    hasher = BlockHasher(Namespace(b"m", "float32", bs), seed=5)
    rng = random.Random(5)
    ids = [rng.randrange(1000) for _ in range(n * bs + 1)]
    root, hashes = hasher.root(), hasher.hash_blocks(ids)
    parent = root
    for i, h in enumerate(hashes[:6]):  # the first six blocks cached in the pool, unreferenced
        block = pool.allocate()
        pool.register(block, BlockIdentity(h, parent, tuple(ids[i * bs : (i + 1) * bs]), i))
        pool.release(block)
        parent = h
    counts, free = list(pool.ref_counts), list(pool.free)

    def broken(block_hash: bytes) -> bool:
        raise OSError("the tier's storage failed")

    monkeypatch.setattr(tier, "contains", broken)
    with pytest.raises(OSError, match="storage failed"):
        store.match(root, hashes, ids, n)
    assert pool.ref_counts == counts and list(pool.free) == free
    monkeypatch.undo()
    match = store.match(root, hashes, ids, n)  # and the store works on
    assert len(match.blocks) == 6 and match.tokens_by_tier == {"gpu": 6 * bs}
