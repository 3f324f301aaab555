"""The prefix-affinity router: the hash ring and the affinity key as units, then real replicas
(the server's app on 127.0.0.1, the tiny model) behind a real router, driven by the openai client."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from conftest import ServerProcess, start_server, stop_server, wait_until_healthy

from cacheproxy.config import Settings
from cacheproxy.server.router import BACKEND_HEADER, ROUTER, HashRing, Router, affinity_key, create_router_app

MODEL = "tiny-test"

# --- the ring ------------------------------------------------------------------------------------


def _keys(n: int) -> list[bytes]:
    return [f"conversation-{i}".encode() for i in range(n)]


def test_ring_places_a_key_on_the_same_node_every_time_and_spreads_keys_evenly() -> None:
    nodes = [f"http://replica-{i}:8000" for i in range(4)]
    ring = HashRing(nodes, virtual_nodes=64)
    again = HashRing(list(reversed(nodes)), virtual_nodes=64)  # order of registration does not matter
    owners = [ring.owner(k) for k in _keys(8000)]
    assert owners == [again.owner(k) for k in _keys(8000)]
    share = Counter(owners)
    assert set(share) == set(nodes)
    assert all(0.15 < n / 8000 < 0.35 for n in share.values()), share


def test_ring_adding_a_node_moves_only_the_keys_it_takes() -> None:
    nodes = [f"http://replica-{i}:8000" for i in range(4)]
    ring = HashRing(nodes)
    before = {k: ring.owner(k) for k in _keys(8000)}
    ring.add("http://replica-4:8000")
    moved = {k for k in before if ring.owner(k) != before[k]}
    assert all(ring.owner(k) == "http://replica-4:8000" for k in moved)
    assert 0.1 < len(moved) / 8000 < 0.3  # about 1/5 of the keys, not a reshuffle
    ring.remove("http://replica-4:8000")
    assert all(ring.owner(k) == before[k] for k in before)


def test_ring_walk_lists_every_node_once_owner_first_and_fallback_is_the_next_owner() -> None:
    nodes = [f"http://replica-{i}:8000" for i in range(3)]
    ring = HashRing(nodes)
    for k in _keys(200):
        walk = ring.walk(k)
        assert sorted(walk) == sorted(nodes) and walk[0] == ring.owner(k)
        # The fallback of a key is where it would live if its owner were removed.
        without = HashRing([n for n in nodes if n != walk[0]])
        assert without.owner(k) == walk[1]
    assert HashRing([]).walk(b"x") == []


# --- the affinity key ----------------------------------------------------------------------------


def _chat(*turns: tuple[str, str], system: str = "You are terse.", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "system", "content": system}]
            + [{"role": r, "content": c} for r, c in turns], **extra}  # fmt: skip


def test_every_turn_of_a_conversation_has_the_key_of_its_first_turn() -> None:
    first = _chat(("user", "plan a trip to Lyon"))
    later = _chat(("user", "plan a trip to Lyon"), ("assistant", "Day 1: ..."), ("user", "and day 2?"))
    other = _chat(("user", "plan a trip to Oslo"))
    k = affinity_key(first, 4096)
    assert k is not None and len(k) == 16
    assert affinity_key(later, 4096) == k
    assert affinity_key(other, 4096) != k
    assert affinity_key(_chat(("user", "plan a trip to Lyon"), system="Be verbose."), 4096) != k
    assert affinity_key(first | {"tools": [{"type": "function", "function": {"name": "f"}}]}, 4096) != k
    # Tenants (API keys) and cache salts keep their prefixes apart on the replicas, so on the ring too.
    assert affinity_key(first, 4096, "Bearer sk-b") != affinity_key(first, 4096, "Bearer sk-a")
    assert affinity_key(first | {"cache_salt": "s"}, 4096) != k


def test_every_turn_of_a_responses_conversation_has_the_key_of_its_first_turn() -> None:
    tools = [{"type": "function", "name": "f", "parameters": {"type": "object"}}]
    first = {"instructions": "Be brief.", "tools": tools, "input": [{"role": "user", "content": "plan Lyon"}]}
    later = first | {"input": [{"role": "user", "content": "plan Lyon"},
                               {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                               {"type": "function_call_output", "call_id": "c", "output": "ok"},
                               {"role": "user", "content": "and day 2?"}]}  # fmt: skip
    k = affinity_key(first, 4096, responses=True)
    assert k is not None and affinity_key(later, 4096, responses=True) == k
    assert affinity_key(first | {"instructions": "Be verbose."}, 4096, responses=True) != k
    assert affinity_key({"input": "plan Lyon"}, 4096, responses=True) != affinity_key({"input": "plan Oslo"}, 4096,
                                                                                     responses=True)  # fmt: skip
    assert affinity_key(first, 4096) is None  # an `input` elsewhere (embeddings) is no conversation


def test_prompt_cache_key_wins_and_only_the_leading_bytes_count() -> None:
    a = _chat(("user", "x"), prompt_cache_key="agent-42")
    b = _chat(("user", "something else entirely"), prompt_cache_key="agent-42")
    assert affinity_key(a, 4096) == affinity_key(b, 4096) != affinity_key(_chat(("user", "x")), 4096)
    head = "word " * 2000
    assert affinity_key({"prompt": head + "tail one"}, 1024) == affinity_key(
        {"prompt": head + "tail two"}, 1024
    )
    assert affinity_key({"prompt": "short one"}, 1024) != affinity_key({"prompt": "short two"}, 1024)
    assert affinity_key({"prompt": [1, 2, 3]}, 64) == affinity_key({"prompt": [1, 2, 3]}, 64)
    assert affinity_key({"prompt": ["batch a", "batch b"]}, 64) == affinity_key({"prompt": "batch a"}, 64)
    assert affinity_key({"input": "embeddings?"}, 64) is None and affinity_key([1, 2], 64) is None


# --- real replicas behind a real router ----------------------------------------------------------
# Replicas are `cacheproxy serve` processes (conftest.start_server): the GPU tier (the engine's pool)
# is their only cache, so a hit means "this replica saw the prefix before". Two tenants: the same
# traffic sent as tenant A and then as tenant B meets no cache of A's (tenants' prefixes are apart).

KEY_A, KEY_B = "sk-router-a", "sk-router-b"


def _replica_flags(model_dir: Path, *extra: str) -> list[str]:
    return [
        "--model", str(model_dir), "--served-model-name", MODEL, "--api-key", f"{KEY_A}=a",
        "--api-key", f"{KEY_B}=b", "--num-kv-blocks", "1024", "--cpu-cache-bytes", "0",
        "--no-disk-cache-enabled", "--max-model-len", "1024", "--no-cost-model", *extra,
    ]  # fmt: skip


def _start_replicas(model_dir: Path, root: Path, flags: list[list[str]]) -> list[ServerProcess]:
    servers = [start_server(_replica_flags(model_dir, *f), root / f"replica{i}", wait_ready=False)
               for i, f in enumerate(flags)]  # fmt: skip
    try:
        for srv in servers:  # they load in parallel
            wait_until_healthy(srv, 120)
    except BaseException:
        for srv in servers:
            stop_server(srv)
        raise
    return servers


@pytest.fixture(scope="module")
def replicas(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServerProcess]]:
    """Two replicas for this module; the last test takes one of them down."""
    servers = _start_replicas(tiny_model_dir, tmp_path_factory.mktemp("replicas"), [[], []])
    yield servers
    for srv in servers:
        stop_server(srv)


@dataclass
class Site:
    runner: web.AppRunner
    url: str


@asynccontextmanager
async def _router(backends: list[str], **overrides: Any) -> AsyncIterator[Site]:
    opts: dict[str, Any] = {"router_health_interval_s": 0.5}
    opts.update(overrides)
    runner = web.AppRunner(
        create_router_app(Settings(_env_file=None, **opts), backends), handler_cancellation=True
    )
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield Site(runner, f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _client(url: str, key: str = KEY_A) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "shi", "pe", "dan", "gor", "lin", "bex", "tu"]


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(words))


@dataclass
class Conversation:
    messages: list[dict[str, str]]


def _traffic(seed: int, conversations: int, turns: int) -> tuple[list[Conversation], list[int]]:
    """Agent-like conversations (a shared system prompt, a long first user message, short follow-ups)
    and the order their turns arrive in: shuffled, each conversation's turns in order."""
    rng = random.Random(seed)
    system = "You are an agent. " + _sentence(rng, 20)
    convs = [Conversation([{"role": "system", "content": system}, {"role": "user", "content": _sentence(rng, 80)}])
             for _ in range(conversations)]  # fmt: skip
    order = [c for c in range(conversations) for _ in range(turns)]
    rng.shuffle(order)
    return convs, order


async def _ask(client: openai.AsyncOpenAI, conv: Conversation, rng: random.Random) -> tuple[Any, str]:
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=conv.messages,
        max_tokens=8,
        temperature=0.0,  # type: ignore[arg-type]
    )
    reply = raw.parse()
    conv.messages.append({"role": "assistant", "content": reply.choices[0].message.content or ""})
    conv.messages.append({"role": "user", "content": _sentence(rng, 8)})
    return reply, raw.headers.get(BACKEND_HEADER, "")


@dataclass
class TrafficResult:
    hit_rate: float  # sum of cached_tokens / sum of prompt_tokens over every response
    first_cached: int  # cached tokens of the very first response
    met: dict[int, set[str]]  # per conversation: the replicas its turns went to


async def _run_traffic(
    url: str, key: str, seed: int, conversations: int = 12, turns: int = 4
) -> TrafficResult:
    """The ring's points come from the replicas' URLs, whose ports change from run to run: with 6
    conversations all of them landed on one of two replicas about once in 32 runs, with 12 once in
    2048."""
    convs, order = _traffic(seed, conversations, turns)
    rng = random.Random(seed + 1)
    cached = prompt = 0
    first_cached = -1
    met: dict[int, set[str]] = {c: set() for c in range(conversations)}
    async with _client(url, key) as client:
        for c in order:
            reply, backend = await _ask(client, convs[c], rng)
            assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
            n = reply.usage.prompt_tokens_details.cached_tokens or 0
            first_cached = n if first_cached < 0 else first_cached
            cached += n
            prompt += reply.usage.prompt_tokens
            met[c].add(backend)
    return TrafficResult(cached / prompt, first_cached, met)


async def test_router_sends_conversations_to_the_replica_that_holds_them_and_beats_round_robin(
    replicas: list[ServerProcess],
) -> None:
    urls = [r.base_url for r in replicas]
    async with _router(urls) as router:
        affinity = await _run_traffic(router.url, KEY_A, seed=11)
    assert all(len(backends) == 1 for backends in affinity.met.values()), (
        affinity.met
    )  # every turn on one replica
    assert set().union(*affinity.met.values()) == set(urls)  # and both replicas got conversations
    # The same traffic as another tenant (whose prefixes no replica holds yet), round robin.
    async with _router(urls, router_policy="round_robin") as router:
        rr = await _run_traffic(router.url, KEY_B, seed=11)
    assert rr.first_cached == 0 and affinity.first_cached == 0
    assert any(len(backends) == 2 for backends in rr.met.values())
    print(f"hit rate: affinity {affinity.hit_rate:.3f}, round robin {rr.hit_rate:.3f}")
    assert affinity.hit_rate > 0.5
    assert affinity.hit_rate > rr.hit_rate + 0.1


async def test_router_streams_sse_and_lists_models(replicas: list[ServerProcess]) -> None:
    conv = _traffic(3, conversations=1, turns=1)[0][0]
    async with _router([r.base_url for r in replicas]) as router, _client(router.url) as client:
        whole = await client.chat.completions.create(model=MODEL, messages=conv.messages, max_tokens=8,  # type: ignore[arg-type]
                                                     temperature=0.0)  # fmt: skip
        stream = await client.chat.completions.create(
            model=MODEL, messages=conv.messages, max_tokens=8, temperature=0.0, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = [chunk async for chunk in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens_details is not None
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same replica, so a hit
        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL]


async def test_router_keeps_each_responses_conversation_on_one_replica(replicas: list[ServerProcess]) -> None:
    """12 conversations (all on one of two replicas about once in 2048 runs, as in the chat test)."""
    urls = [r.base_url for r in replicas]
    met: dict[int, set[str]] = {}
    async with _router(urls) as router, _client(router.url) as client:
        for c in range(12):
            history: list[Any] = [{"role": "user", "content": f"conversation {c}: " + "tell me more " * 30}]
            met[c] = set()
            for turn in range(2):
                raw = await client.responses.with_raw_response.create(model=MODEL, instructions="Be brief.",
                                                                      input=history, max_output_tokens=4,
                                                                      temperature=0.0)  # fmt: skip
                reply = raw.parse()
                met[c].add(raw.headers.get(BACKEND_HEADER, ""))
                assert reply.usage is not None
                assert turn == 0 or reply.usage.input_tokens_details.cached_tokens > 0
                history += [{"role": "assistant", "content": reply.output_text}, {"role": "user", "content": "go on"}]
    assert all(len(b) == 1 for b in met.values()), met  # every turn on one replica
    assert set().union(*met.values()) == set(urls)  # placed by prefix: both replicas got conversations


async def test_previous_response_id_and_response_ids_go_to_the_replica_that_keeps_them(
    replicas: list[ServerProcess],
) -> None:
    async with _router([r.base_url for r in replicas]) as router, _client(router.url) as client:
        for c in range(8):  # conversations whose later turns, by their own input, would land anywhere
            raw = await client.responses.with_raw_response.create(
                model=MODEL, input=f"conversation {c}: " + "tell me more " * 20, max_output_tokens=3)  # fmt: skip
            first, owner = raw.parse(), raw.headers.get(BACKEND_HEADER)
            for turn in range(3):
                raw = await client.responses.with_raw_response.create(
                    model=MODEL, previous_response_id=first.id, input=f"turn {turn} of {c}", max_output_tokens=3)  # fmt: skip
                assert raw.headers.get(BACKEND_HEADER) == owner
                assert raw.parse().usage.input_tokens_details.cached_tokens > 0  # type: ignore[union-attr]
            fetched = await client.responses.with_raw_response.retrieve(first.id)
            assert fetched.headers.get(BACKEND_HEADER) == owner and fetched.parse().id == first.id
            await client.responses.delete(first.id)


async def test_a_busy_replica_spills_over_to_the_next_on_the_ring(replicas: list[ServerProcess]) -> None:
    conv = _traffic(6, conversations=1, turns=1)[0][0]
    async with (
        _router([r.base_url for r in replicas], router_max_in_flight=1) as router,
        _client(router.url) as client,
    ):
        replies = await asyncio.gather(
            *(client.chat.completions.with_raw_response.create(
                model=MODEL, messages=conv.messages, max_tokens=32, temperature=0.0,  # type: ignore[arg-type]
                extra_body={"ignore_eos": True}) for _ in range(4))
        )  # fmt: skip
    assert {r.headers[BACKEND_HEADER] for r in replies} == {r.base_url for r in replicas}


async def test_a_replica_taken_down_is_routed_around(replicas: list[ServerProcess]) -> None:
    """Runs last in this module: it kills one of the module's replicas."""
    convs, order = _traffic(5, conversations=24, turns=1)
    rng = random.Random(0)
    urls = [r.base_url for r in replicas]
    async with _router(urls) as router, _client(router.url) as client:
        # Conversations until both replicas hold some: where each lands depends on the replicas'
        # ports (the ring's points), which change from run to run.
        first = []
        for c in order:
            first.append(await _ask(client, convs[c], rng))
            if {b for _, b in first} == set(urls):
                break
        assert {b for _, b in first} == set(urls)
        asked = order[: len(first)]
        down, up = replicas[1], replicas[0]
        down.process.kill()  # a crash, not a goodbye
        down.process.wait()
        again = [await _ask(client, convs[c], rng) for c in asked]
        assert {b for _, b in again} == {up.base_url}
        assert all(reply.choices[0].finish_reason in ("stop", "length") for reply, _ in again)
        async with aiohttp.ClientSession() as http, http.get(router.url + "/health") as resp:
            health = await resp.json()
            assert resp.status == 200
        assert {b["url"]: b["healthy"] for b in health["backends"]} == {
            up.base_url: True,
            down.base_url: False,
        }


async def test_a_replica_answering_429_is_skipped_for_the_next_one(
    replicas: list[ServerProcess], tiny_model_dir: Path, tmp_path: Path
) -> None:
    # A replica that runs one sequence at a time with one waiting: a burst gets 429s from it.
    (strict,) = _start_replicas(
        tiny_model_dir, tmp_path, [["--max-num-seqs", "1", "--max-waiting-requests", "1"]]
    )
    try:
        other = next(r for r in replicas if r.process.poll() is None)
        urls = [strict.base_url, other.base_url]
        ring = HashRing(urls, Settings(_env_file=None).router_virtual_nodes)
        conv = _traffic(7, conversations=1, turns=1)[0][0]
        cache_key = next(k for k in (f"burst-{i}" for i in range(1000))
                         if ring.owner(affinity_key({"prompt_cache_key": k}, 4096, f"Bearer {KEY_A}") or b"") == strict.base_url)  # fmt: skip
        body = {"model": MODEL, "messages": conv.messages, "max_tokens": 48, "temperature": 0.0,
                "ignore_eos": True, "prompt_cache_key": cache_key}  # fmt: skip

        async def burst(url: str) -> list[tuple[int, str]]:
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY_A}"}) as http:

                async def one() -> tuple[int, str]:
                    async with http.post(url + "/v1/chat/completions", json=body) as resp:
                        await resp.read()
                        return resp.status, resp.headers.get(BACKEND_HEADER, "")

                return list(await asyncio.gather(*(one() for _ in range(6))))

        alone = await burst(strict.base_url)
        refused_alone = sum(status == 429 for status, _ in alone)
        assert refused_alone >= 2  # the replica on its own really refuses such a burst
        async with _router(urls, router_max_in_flight=100) as router:
            routed = await burst(router.url)
            metrics = await _text(router.url + "/metrics")
        assert all(status == 200 for status, _ in routed), routed
        assert {b for _, b in routed} == set(urls)
        assert 'cacheproxy_router_retries_total{reason="429"}' in metrics
    finally:
        stop_server(strict)


async def _text(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return await resp.text()


async def test_one_slow_health_answer_keeps_a_replica_up_two_in_a_row_take_it_down() -> None:
    # A stand-in replica on loopback whose /health answers after `delay` seconds (or 503).
    state = {"delay": 0.0, "status": 200}

    async def health(request: web.Request) -> web.Response:
        await asyncio.sleep(state["delay"])
        return web.json_response({}, status=int(state["status"]))

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}"
    try:
        async with _router([url], router_health_interval_s=0.5) as site:  # a check gives up after 1 s
            router: Router = site.runner.app[ROUTER]
            assert router._health_task is not None
            router._health_task.cancel()  # the checks below are the only ones
            backend = router.backends[url]
            assert backend.healthy
            state["delay"] = 1.5
            await router.check_health()
            assert backend.healthy  # one late answer: a busy replica, not a dead one
            await router.check_health()
            assert not backend.healthy  # silent twice in a row: down
            state["delay"] = 0.0
            await router.check_health()
            assert backend.healthy and backend.slow_checks == 0
            state["status"] = 503
            await router.check_health()
            assert not backend.healthy  # a refusal counts at once
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("path", ["/health", "/v1/models"])
async def test_without_any_replica_the_router_answers_503(path: str) -> None:
    dead = f"http://127.0.0.1:{_free_port()}"
    async with (
        _router([dead]) as router,
        aiohttp.ClientSession() as http,
        http.get(router.url + path) as resp,
    ):
        assert resp.status == 503
        body = await resp.json()
    assert (
        (body.get("status") == "unavailable") if path == "/health" else body["error"]["code"] == "no_backend"
    )


def test_cacheproxy_route_serves_until_sigterm_and_refuses_to_start_without_backends(tmp_path: Path) -> None:
    env = {**os.environ, "CACHEPROXY_CONFIG": str(tmp_path / "none.toml")}
    base = [sys.executable, "-m", "cacheproxy.cli", "route", "--host", "127.0.0.1", "--log-json"]
    lonely = subprocess.run([*base, "--port", str(_free_port())], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert lonely.returncode == 2 and "at least one backend" in lonely.stdout + lonely.stderr
    port = _free_port()
    dead = f"http://127.0.0.1:{_free_port()}"
    proc = subprocess.Popen([*base, "--port", str(port), "--backend", dead, "--router-health-interval-s", "0.2"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        status = None
        while status is None and time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                status = 200
            except urllib.error.HTTPError as exc:
                status = exc.code
            except OSError:
                time.sleep(0.05)
        assert status == 503  # listening, and honest: its only replica is down
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
