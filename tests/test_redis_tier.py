"""The remote tier against a real redis-server on 127.0.0.1: the disk tier's keys and checksummed
bytes, a TTL, size limits, corrupt values dropped, a dead or hung Redis that never fails a call, a
Redis Cluster; then two engines (replicas) sharing one Redis."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch
from redis_server import RedisServer, start_redis, start_redis_cluster

from cacheproxy.cache.block_entry import BlockEntry, encode
from cacheproxy.cache.hashing import BlockHasher, Namespace
from cacheproxy.cache.redis_tier import _DELETE_IF_SAME, RedisTier
from cacheproxy.cache.tier import KVTier
from cacheproxy.config import Settings
from cacheproxy.engine.engine import LLMEngine
from cacheproxy.engine.request import GenerationRequest, SamplingParams

BLOCK = 16
SHAPE = (2, 2, BLOCK, 2, 8)  # [layers, K|V, block_size, kv_heads, head_dim]
NAMESPACE = Namespace(b"test-model", "float16", BLOCK)
HASHER = BlockHasher(NAMESPACE, seed=7)


def _chain(n: int, dtype: torch.dtype = torch.float16, first_token: int = 0) -> list[BlockEntry]:
    entries, parent = [], HASHER.root()
    for i in range(n):
        ids = tuple(range(first_token + i * BLOCK, first_token + (i + 1) * BLOCK))
        h = HASHER.next_hash(parent, ids)
        content = torch.randn(SHAPE, generator=torch.Generator().manual_seed(first_token + i)).to(dtype)
        entries.append(BlockEntry(h, parent, ids, content))
        parent = h
    return entries


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def raw(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A plain client on the same Redis, emptied before each test, to look behind the tier's back."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


def _tier(url: str, **kw: object) -> RedisTier:
    opts: dict[str, object] = {"ttl_s": 3600, "max_bytes": 64 << 20, "timeout_s": 0.5}
    opts.update(kw)
    return RedisTier(url, NAMESPACE.digest, **opts)  # type: ignore[arg-type]


@pytest.fixture
def tier(redis_server: RedisServer, raw: redis.Redis) -> Iterator[RedisTier]:
    t = _tier(redis_server.url)
    yield t
    t.close()


def test_redis_tier_is_a_kv_tier_named_remote(tier: RedisTier) -> None:
    assert isinstance(tier, KVTier)
    assert tier.name == "remote"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_round_trip_stores_the_disk_tiers_key_and_bytes(
    tier: RedisTier, raw: redis.Redis, dtype: torch.dtype
) -> None:
    entries = _chain(3, dtype)
    for e in entries:
        assert tier.put(e)
    for e in entries:
        # Same key (prefix + 16-byte hash) and the same checksummed bytes the disk tier writes.
        assert raw.get(b"cacheproxy:kv:" + e.hash) == encode(e, NAMESPACE.digest)
        assert tier.contains(e.hash)
        got = tier.get(e.hash)
        assert got is not None
        assert got.matches(e.parent_hash, e.token_ids) and got.hash == e.hash
        assert got.tensor.dtype == dtype and torch.equal(got.tensor, e.tensor)
    missing = _chain(1, dtype, first_token=1000)[0]
    assert tier.get(missing.hash) is None and not tier.contains(missing.hash)
    s = tier.stats
    assert (s.hits, s.misses, s.puts) == (3, 1, 3)
    assert len(tier) == 3
    assert tier.used_bytes == sum(len(encode(e, NAMESPACE.digest)) for e in entries)


def test_a_second_put_of_a_held_hash_refreshes_it_without_counting_bytes_again(
    tier: RedisTier, raw: redis.Redis
) -> None:
    e = _chain(1)[0]
    assert tier.put(e)
    used = tier.used_bytes
    raw.expire(tier.key(e.hash), 10)
    assert tier.put(e)
    assert raw.ttl(tier.key(e.hash)) > 3000
    assert (tier.stats.puts, tier.used_bytes, len(tier)) == (1, used, 1)


def test_remove_deletes_and_gives_back_the_bytes(tier: RedisTier, raw: redis.Redis) -> None:
    a, b = _chain(2)
    assert tier.put(a) and tier.put(b)
    assert tier.remove(a.hash)
    assert not tier.remove(a.hash)
    assert raw.exists(tier.key(a.hash)) == 0 and tier.contains(b.hash)
    assert tier.used_bytes == len(encode(b, NAMESPACE.digest)) and len(tier) == 1


def test_put_async_writes_off_the_caller_and_flush_waits_for_it(tier: RedisTier, raw: redis.Redis) -> None:
    entries = _chain(40)
    for e in entries:
        assert tier.put_async(e)
    assert tier.flush(timeout=10)
    assert all(raw.exists(tier.key(e.hash)) for e in entries)
    assert tier.stats.puts == 40
    assert all(tier.get(e.hash) is not None for e in entries)


def test_every_key_gets_the_ttl_and_a_hit_refreshes_it(tier: RedisTier, raw: redis.Redis) -> None:
    e = _chain(1)[0]
    assert tier.put(e)
    key = tier.key(e.hash)
    assert 3590_000 <= raw.pttl(key) <= 3600_000
    raw.pexpire(key, 5000)
    assert tier.get(e.hash) is not None
    assert raw.pttl(key) > 3590_000


def test_entries_expire_after_their_ttl(redis_server: RedisServer, raw: redis.Redis) -> None:
    t = _tier(redis_server.url, ttl_s=1)
    try:
        e = _chain(1)[0]
        assert t.put(e)
        assert t.get(e.hash) is not None
        time.sleep(1.15)
        assert t.get(e.hash) is None and raw.exists(t.key(e.hash)) == 0
    finally:
        t.close()


def test_an_entry_over_the_size_limit_is_refused_and_counted(
    redis_server: RedisServer, raw: redis.Redis
) -> None:
    e = _chain(1)[0]  # 2 KiB of float16
    t = _tier(redis_server.url, max_entry_bytes=1024)
    try:
        assert not t.put(e)
        assert t.put_async(e)  # queued, then refused by the writer
        assert t.flush(timeout=5)
        assert raw.dbsize() == 0
        assert t.stats.too_large == 2 and t.used_bytes == 0
    finally:
        t.close()


def test_used_bytes_never_exceeds_the_capacity(redis_server: RedisServer, raw: redis.Redis) -> None:
    entries = _chain(4)
    one = len(encode(entries[0], NAMESPACE.digest))
    t = _tier(redis_server.url, max_bytes=2 * one + 10)
    try:
        assert all(t.put(e) for e in entries)  # Redis's maxmemory, not the tier, bounds the store
        assert t.capacity_bytes == 2 * one + 10
        assert t.used_bytes == t.capacity_bytes
    finally:
        t.close()


@pytest.mark.parametrize(
    "damage", ["flipped_payload_byte", "flipped_header_byte", "garbage", "foreign_namespace"]
)
def test_a_corrupt_value_is_dropped_and_counted_never_served(
    tier: RedisTier, raw: redis.Redis, damage: str
) -> None:
    e = _chain(1)[0]
    key = tier.key(e.hash)
    value = bytearray(encode(e, NAMESPACE.digest))
    if damage == "flipped_payload_byte":
        value[-7] ^= 0x40
    elif damage == "flipped_header_byte":
        value[40] ^= 0x01  # inside the header: a token id, a hash or the checksum
    elif damage == "garbage":
        value = bytearray(b"not a block at all")
    else:
        value = bytearray(encode(e, Namespace(b"other-model", "float16", BLOCK).digest))
    raw.set(key, bytes(value))
    assert tier.get(e.hash) is None
    assert raw.exists(key) == 0
    s = tier.stats
    assert (s.corrupt_dropped, s.hits, s.misses) == (1, 0, 1)
    # A good value written afterwards is served again.
    assert tier.put(e) and tier.get(e.hash) is not None


def test_a_corrupt_value_rewritten_by_another_replica_meanwhile_is_not_deleted(
    tier: RedisTier, raw: redis.Redis
) -> None:
    e = _chain(1)[0]
    good = encode(e, NAMESPACE.digest)
    # The delete only removes the exact bytes that failed verification.
    digest = hashlib.sha1(b"damaged").hexdigest()
    raw.set(tier.key(e.hash), good)
    assert raw.eval(_DELETE_IF_SAME, 1, tier.key(e.hash), digest) == 0
    assert raw.get(tier.key(e.hash)) == good


def test_redis_stopped_mid_run_fails_fast_counts_and_opens_the_breaker(tmp_path: Path) -> None:
    server = start_redis(tmp_path / "redis")
    t = _tier(server.url, timeout_s=0.3, breaker_failures=3, breaker_cooldown_s=0.5)
    try:
        a, b, c = _chain(3)
        assert t.put(a) and t.get(a.hash) is not None
        server.stop()
        for _ in range(3):  # connection refused: each call returns at once, counted
            start = time.monotonic()
            assert t.get(a.hash) is None
            assert time.monotonic() - start < 0.45
        s = t.stats
        assert s.errors + s.timeouts == 3 and s.breaker_opens == 1
        assert t.breaker_state == "open"
        # Open: nothing is sent; every call is a quick miss or an unstored put, counted.
        start = time.monotonic()
        assert t.get(a.hash) is None and not t.put(b) and not t.contains(a.hash) and not t.remove(a.hash)
        assert time.monotonic() - start < 0.05
        assert t.put_async(c)  # queued; the writer drops it while the breaker is open
        assert t.flush(timeout=5)
        assert t.stats.breaker_skips >= 5
        # Redis comes back on the same port: after the cool-down one probe closes the breaker.
        server.start()
        time.sleep(0.55)
        assert t.put(b)
        assert t.breaker_state == "closed"
        assert t.get(b.hash) is not None
    finally:
        t.close()
        server.stop()


def test_a_hung_redis_times_out_within_the_deadline(tmp_path: Path) -> None:
    server = start_redis(tmp_path / "redis")
    t = _tier(server.url, timeout_s=0.2, breaker_failures=2, breaker_cooldown_s=60)
    try:
        a, b = _chain(2)
        assert t.put(a)
        server.pause()  # accepts connections, answers nothing
        start = time.monotonic()
        assert t.get(a.hash) is None
        assert not t.put(b)
        assert time.monotonic() - start < 1.0  # two deadlines of 0.2 s, not the 5 s socket default
        s = t.stats
        assert s.timeouts == 2 and s.breaker_opens == 1
        # A full write queue skips writes instead of blocking the caller.
        small = _tier(server.url, timeout_s=0.2, write_queue=2, breaker_failures=100)
        try:
            start = time.monotonic()
            results = [small.put_async(e) for e in _chain(50, first_token=5000)]
            assert time.monotonic() - start < 0.1
            assert results.count(False) >= 40 and small.stats.writes_skipped == results.count(False)
        finally:
            server.resume()
            small.close()
    finally:
        t.close()
        server.stop()


def test_redis_cluster_round_trip_spreads_keys_over_the_masters(tmp_path: Path) -> None:
    cluster = start_redis_cluster(tmp_path / "cluster")
    t = _tier(cluster.url, timeout_s=1.0)
    try:
        assert t.cluster
        entries = _chain(24)
        for e in entries[:12]:
            assert t.put(e)
        for e in entries[12:]:
            assert t.put_async(e)
        assert t.flush(timeout=10)
        for e in entries:
            got = t.get(e.hash)
            assert got is not None and torch.equal(got.tensor, e.tensor)
        per_node = [redis.Redis(port=n.port).dbsize() for n in cluster.nodes]
        assert sum(per_node) == 24 and sum(1 for n in per_node if n > 0) >= 2
        assert t.remove(entries[0].hash) and not t.contains(entries[0].hash)
    finally:
        t.close()
        cluster.stop()


# --- two replicas (engines) sharing one Redis ---------------------------------------------------


def _replica(model_dir: Path, data_dir: Path, redis_url: str) -> LLMEngine:
    """An engine whose only tier below the GPU pool is the shared Redis, written through.

    cost_model off: the tiny model recomputes a block faster than a Redis round trip, so the cost
    model would rightly skip the tier; a real model's block is the other way round."""
    settings = Settings(
        model=str(model_dir), data_dir=data_dir, device="cpu", num_kv_blocks=96, max_num_batched_tokens=256,
        cost_model=False,
        cpu_cache_bytes=0, disk_cache_enabled=False, cache_policy="write_through",
        redis_url=redis_url, redis_timeout_s=0.3, redis_breaker_failures=2, redis_breaker_cooldown_s=60,
    )  # fmt: skip
    return LLMEngine.from_settings(settings)


def _generate(
    engine: LLMEngine, prompts: dict[str, list[int]]
) -> dict[str, tuple[list[int], dict[str, int]]]:
    """Runs the prompts together, greedy; per request its tokens and its cached tokens by tier."""
    for rid, ids in prompts.items():
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        engine.add_request(GenerationRequest(rid, ids, params))
    tokens: dict[str, list[int]] = {rid: [] for rid in prompts}
    by_tier: dict[str, dict[str, int]] = {}
    deadline = time.monotonic() + 120
    while engine.has_work():
        for out in engine.step():
            tokens[out.request_id].extend(out.token_ids)
            by_tier.setdefault(out.request_id, out.cached_tokens_by_tier)
        assert time.monotonic() < deadline, "generation did not finish"
    return {rid: (tokens[rid], by_tier[rid]) for rid in prompts}


def _remote(engine: LLMEngine) -> RedisTier:
    (tier,) = [t for t in engine.store.tiers if isinstance(t, RedisTier)]
    return tier


def test_a_prefix_computed_on_replica_a_is_served_from_redis_on_replica_b(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    server = start_redis(tmp_path / "redis")
    a = _replica(tiny_model_dir, tmp_path / "a", server.url)
    b = _replica(tiny_model_dir, tmp_path / "b", server.url)
    try:
        vocab = a.config.vocab_size
        gen = torch.Generator().manual_seed(3)
        p, r, q = (torch.randint(5, vocab, (n,), generator=gen).tolist() for n in (100, 90, 70))
        on_a = _generate(a, {"p": p, "r": r})
        assert on_a["p"][1] == {} and on_a["r"][1] == {}  # nothing cached anywhere yet
        assert _remote(a).flush(timeout=10)
        assert _remote(a).stats.puts >= 100 // BLOCK + 90 // BLOCK

        on_b = _generate(b, {"p": p})
        assert on_b["p"][1].get("remote", 0) == (len(p) // BLOCK) * BLOCK  # every full block of p
        assert on_b["p"][0] == on_a["p"][0]  # KV from Redis gives the same tokens as computing it
        assert _remote(b).stats.hits >= 100 // BLOCK

        # Redis dies mid-run: every request still succeeds, with the same tokens, recomputed.
        server.stop()
        start = time.monotonic()
        late = _generate(b, {"r": r, "q": q, "p2": p[:50] + q[:30]})
        assert time.monotonic() - start < 60
        assert late["r"][0] == on_a["r"][0]
        assert late["r"][1].get("remote", 0) == 0
        assert all(len(toks) == 8 for toks, _ in late.values())
        s = _remote(b).stats
        assert s.errors + s.timeouts >= 2 and s.breaker_opens == 1 and s.breaker_skips > 0
        assert b.stats()["tiers"]["remote"]["writes_skipped"] == 0  # writes were dropped, not queued forever
        # operators see it in the engine's stats (and so in /admin/stats and /metrics)
        seen = b.stats()["tiers"]["remote"]
        assert seen["errors"] + seen["timeouts"] == s.errors + s.timeouts
        assert seen["breaker_opens"] == 1 and seen["breaker_state"] in ("open", "half_open")
    finally:
        server.stop()
        a.shutdown()
        b.shutdown()


def test_a_prefix_from_redis_is_met_in_the_middle_on_another_replica(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replica B recomputes the head of a prefix replica A left in Redis while its tail loads from
    Redis (as a slow shared tier would be planned): same tokens, the tail counted as a remote hit."""
    from cacheproxy.cache import cost_model
    from cacheproxy.cache.cost_model import CostModel

    monkeypatch.setattr(cost_model, "SPLIT_MAX_REGRET", 1.0)  # a short prompt, split all the same
    server = start_redis(tmp_path / "redis")
    a = _replica(tiny_model_dir, tmp_path / "a", server.url)
    b = _replica(tiny_model_dir, tmp_path / "b", server.url)
    try:
        p = torch.randint(5, a.config.vocab_size, (16 * 12 + 4,), generator=torch.Generator().manual_seed(5)).tolist()
        on_a = _generate(a, {"p": p})
        assert _remote(a).flush(timeout=10)
        b.store.cost_model = CostModel(BLOCK, b.pool.block_bytes, BLOCK / 1e-3, {"remote": 1e-3})
        b.store.split_loads = True  # a CPU engine would not split: the mechanics are what is tested
        assert b.store.cost_model.plan(["remote"] * 12, 4).recompute > 0
        on_b = _generate(b, {"p": p})
        assert on_b["p"][0] == on_a["p"][0]
        remote = on_b["p"][1].get("remote", 0)
        assert set(on_b["p"][1]) == {"remote"} and 0 < remote < 12 * BLOCK
        assert not b.store.has_pending_loads
    finally:
        a.shutdown()
        b.shutdown()
        server.stop()


def test_two_real_servers_share_prefixes_through_redis(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Over HTTP with the openai client: a conversation served by replica A is a cache hit on B."""
    import openai
    from conftest import start_server, stop_server, wait_until_healthy

    server = start_redis(tmp_path / "redis")
    flags = ["--model", str(tiny_model_dir), "--served-model-name", "tiny", "--redis-url", server.url,
             "--cache-policy", "write_through", "--cpu-cache-bytes", "0", "--no-disk-cache-enabled",
             "--no-cost-model", "--num-kv-blocks", "256"]  # fmt: skip
    replicas = [start_server(flags, tmp_path / name, wait_ready=False) for name in ("a", "b")]
    try:
        for r in replicas:
            wait_until_healthy(r, 120)
        messages = [{"role": "system", "content": "You answer in one word. " * 8},
                    {"role": "user", "content": "Name a colour that rhymes with bread, please, and only one."}]  # fmt: skip
        answers = []
        for r in replicas:
            with openai.OpenAI(base_url=r.base_url + "/v1", api_key="sk-any", max_retries=0) as client:
                answers.append(client.chat.completions.create(model="tiny", messages=messages,  # type: ignore[arg-type]
                                                              max_tokens=8, temperature=0.0))  # fmt: skip
            if len(answers) == 1:  # A's writes are queued off the request path: wait until Redis has them
                full_blocks = answers[0].usage.prompt_tokens // BLOCK
                raw = redis.Redis.from_url(server.url)
                deadline = time.monotonic() + 10
                while raw.dbsize() < full_blocks and time.monotonic() < deadline:
                    time.sleep(0.02)
                raw.close()
        on_a, on_b = answers
        assert on_a.usage.prompt_tokens_details.cached_tokens == 0
        details = on_b.usage.prompt_tokens_details
        assert details.cached_tokens >= ((on_b.usage.prompt_tokens - 1) // BLOCK) * BLOCK > 0
        assert (details.model_extra or {}).get("cached_tokens_by_tier", {}).get(
            "remote"
        ) == details.cached_tokens
        assert on_b.choices[0].message.content == on_a.choices[0].message.content
        metrics = replicas[1].request("GET", "/metrics", key=None).body.decode()
        assert 'cacheproxy_prefix_cache_hits_tokens_total{tier="remote"}' in metrics
        assert 'cacheproxy_kv_tier_bytes{kind="used",tier="remote"}' in metrics
    finally:
        for r in replicas:
            stop_server(r)
        server.stop()
