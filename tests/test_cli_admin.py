"""`cacheproxy stats` and `cacheproxy cache ls|pin|unpin|evict|warm` against a real server on 127.0.0.1,
checked against the usage of the requests the tests themselves send."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    ADMIN_KEY,
    ALICE_KEY,
    BOB_KEY,
    REPO,
    SERVED_MODEL,
    SMALL_POOL_BLOCKS,
    ServerProcess,
    free_port,
    run_cli,
)

from cacheproxy.cache.records import cache_class

BLOCK = 16
# The tiny model's KV of one block: 2 layers x (K, V) x 16 tokens x 2 KV heads x 16 dims x 4 bytes.
BLOCK_BYTES = 2 * 2 * BLOCK * 2 * 16 * 4


def ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 2000) for _ in range(n)]


def complete(srv: ServerProcess, prompt: Any, key: str = ALICE_KEY, **extra: Any) -> dict[str, Any]:
    """One completion (max 1 token); its usage."""
    reply = srv.request("POST", "/v1/completions", {"model": SERVED_MODEL, "prompt": prompt, "max_tokens": 1,
                                                    "temperature": 0, **extra}, key=key)
    assert reply.status == 200, reply.body
    return reply.json()["usage"]


def cached(usage: dict[str, Any]) -> int:
    return int(usage["prompt_tokens_details"]["cached_tokens"])


def admin(srv: ServerProcess) -> list[str]:
    return ["--url", srv.base_url, "--admin-key", ADMIN_KEY]


def cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    return json.loads(out)


@pytest.fixture
def srv(small_pool_server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> Iterator[ServerProcess]:
    """The small-pool server with nothing cached: each test starts from an empty prefix cache."""
    small_pool_server.wait_until_idle()
    code, _, err = run_cli(capsys, "cache", "evict", "--all", *admin(small_pool_server))
    assert code == 0, err
    yield small_pool_server


def test_stats_json_hit_tokens_equal_the_cached_tokens_the_responses_reported(
    srv: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    before = cli_json(capsys, "stats", *admin(srv), "--json")
    shared = ids(1, 100)  # 6 full blocks
    sent = [complete(srv, shared), complete(srv, shared), complete(srv, [*shared, *ids(2, 40)]),
            complete(srv, ids(3, 30), key=BOB_KEY), complete(srv, shared, key=BOB_KEY)]
    srv.wait_until_idle()
    after = cli_json(capsys, "stats", *admin(srv), "--json")

    prompt, hit = sum(u["prompt_tokens"] for u in sent), sum(cached(u) for u in sent)
    assert hit == 96 + 96  # the second and third request reuse the shared prompt's 6 blocks; bob shares none
    assert after["requests"]["total"] - before["requests"]["total"] == len(sent)
    assert after["tokens"]["prompt"] - before["tokens"]["prompt"] == prompt
    assert after["tokens"]["cached"] - before["tokens"]["cached"] == hit
    assert after["prefill_saved_tokens"] - before["prefill_saved_tokens"] == hit
    assert after["cached_tokens_by_tier"]["gpu"] - before["cached_tokens_by_tier"]["gpu"] == hit
    engine_hits = sum(after["engine_prefix_cache"]["hit_tokens"].values()) - sum(
        before["engine_prefix_cache"]["hit_tokens"].values())
    assert engine_hits == hit
    assert (after["engine_prefix_cache"]["queried_tokens"] - before["engine_prefix_cache"]["queried_tokens"]
            == prompt)
    classes = [cache_class(u["prompt_tokens"], cached(u), BLOCK) for u in sent]
    for c in ("hit", "partial", "miss"):
        assert after["requests_by_cache"][c] - before["requests_by_cache"][c] == classes.count(c), c
    assert after["token_hit_rate"] == pytest.approx(after["tokens"]["cached"] / after["tokens"]["prompt"])
    gpu = after["tiers"]["gpu"]
    assert gpu["capacity_bytes"] == SMALL_POOL_BLOCKS * BLOCK_BYTES
    # The pool's "used" bytes are its cached blocks, as for the other tiers; "active" ones are held by
    # running requests (none now).
    assert gpu["entries"] >= 6 + 2 + 1 and gpu["used_bytes"] == gpu["entries"] * BLOCK_BYTES
    assert gpu["active_bytes"] == 0
    assert set(after["tiers"]) == {"gpu"}
    assert after["requests"]["running"] == 0 and after["requests"]["waiting"] == 0
    assert after["ttft_s"]["all"]["count"] == after["requests"]["ok"]

    code, table, _ = run_cli(capsys, "stats", *admin(srv))
    assert code == 0
    assert f"{after['tokens']['cached']:,}" in table and "Time to first token" in table and "gpu" in table


def test_stats_show_how_many_chat_prompt_tokens_were_reused(srv: ServerProcess,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    before = cli_json(capsys, "stats", *admin(srv), "--json")["chat_prompt_tokens"]
    history = [{"role": "user", "content": "the first question, at some length " * 20}]
    for turn in range(2):  # the second prompt extends the first
        history.append({"role": "user" if turn else "assistant", "content": f"turn {turn}"})
        reply = srv.request("POST", "/v1/chat/completions", {"model": SERVED_MODEL, "messages": history,
                                                             "max_tokens": 1}, key=ALICE_KEY)  # fmt: skip
        assert reply.status == 200, reply.body
    after = cli_json(capsys, "stats", *admin(srv), "--json")["chat_prompt_tokens"]
    assert after["reused"] - before.get("reused", 0) > 100 and after["tokenized"] > before.get("tokenized", 0)
    code, out, _ = run_cli(capsys, "stats", *admin(srv))
    assert code == 0 and "reused from recent prompts" in out


def test_stats_watch_refreshes_until_the_count(srv: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "stats", *admin(srv), "--json", "--watch", "0.05", "--count", "3")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(lines) == 3
    assert lines[0]["uptime_s"] < lines[-1]["uptime_s"]
    code, out, _ = run_cli(capsys, "stats", *admin(srv), "--watch", "0.05", "--count", "2")
    assert code == 0 and "Prefix cache" in out


def test_cache_ls_shows_the_prompt_prefix_with_its_full_block_tokens(
    srv: ServerProcess, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    complete(srv, ids(10, 70))  # 4 full blocks + 6 tokens, which are not cached
    entries = cli_json(capsys, "cache", "ls", *admin(srv), "--json")["entries"]
    assert len(entries) == 1
    e = entries[0]
    assert (e["tokens"], e["cached_blocks"], e["tier"], e["pinned_until"], e["in_use"]) == (64, 4, "gpu", None, False)
    assert len(e["hash"]) == 32
    complete(srv, ids(10, 70))
    (again,) = cli_json(capsys, "cache", "ls", *admin(srv), "--json")["entries"]
    assert again["hash"] == e["hash"] and again["hits"] == e["hits"] + 1 and again["last_use"] > e["last_use"]

    monkeypatch.setenv("COLUMNS", "120")
    code, table, _ = run_cli(capsys, "cache", "ls", *admin(srv))
    assert code == 0 and e["hash"] in table  # whole, so it can be pasted into pin / evict
    monkeypatch.setenv("COLUMNS", "80")
    code, table, _ = run_cli(capsys, "cache", "ls", *admin(srv))
    assert code == 0 and e["hash"][:12] in table and e["hash"] not in table and "cut to fit" in table
    assert max(len(line) for line in table.splitlines()) <= 80 and len(table.splitlines()) <= 8  # a row a line


def test_a_pinned_prefix_survives_pool_pressure_that_evicts_an_unpinned_one(
    srv: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    kept, control = ids(20, 70), ids(21, 70)
    complete(srv, kept)
    (entry,) = cli_json(capsys, "cache", "ls", *admin(srv), "--json")["entries"]
    code, out, err = run_cli(capsys, "cache", "pin", entry["hash"], "--ttl", "10m", *admin(srv))
    assert code == 0 and "4 blocks" in out, err
    complete(srv, control)
    for i in range(6):  # 6 x 13 blocks: more than the pool's 48, over and over
        complete(srv, ids(100 + i, 200))
    assert cached(complete(srv, kept)) == 64  # the pin held
    assert cached(complete(srv, control)) == 0  # the pressure was real
    listed = {e["hash"]: e for e in cli_json(capsys, "cache", "ls", *admin(srv), "--json")["entries"]}
    assert listed[entry["hash"]]["pinned_until"] is not None

    code, out, _ = run_cli(capsys, "cache", "unpin", entry["hash"][:12], *admin(srv))  # as a narrow `ls` shows it
    assert code == 0 and "4 blocks" in out and entry["hash"] in out
    listed = {e["hash"]: e for e in cli_json(capsys, "cache", "ls", *admin(srv), "--json")["entries"]}
    assert listed[entry["hash"]]["pinned_until"] is None
    for i in range(6):
        complete(srv, ids(200 + i, 200))
    assert cached(complete(srv, kept)) == 0  # unpinned, it goes like any other prefix


def test_evict_makes_the_next_request_a_miss(srv: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    prompt = ids(30, 90)
    complete(srv, prompt)
    assert cached(complete(srv, prompt)) == 80
    (entry,) = cli_json(capsys, "cache", "ls", *admin(srv), "--json")["entries"]
    code, out, _ = run_cli(capsys, "cache", "evict", entry["hash"], *admin(srv))
    assert code == 0 and "5 from gpu" in out
    assert cached(complete(srv, prompt)) == 0
    assert cached(complete(srv, prompt)) == 80
    code, out, _ = run_cli(capsys, "cache", "evict", "--all", *admin(srv))
    assert code == 0
    assert cli_json(capsys, "cache", "ls", *admin(srv), "--json")["entries"] == []
    assert cached(complete(srv, prompt)) == 0


def test_warm_makes_the_next_request_a_hit_for_the_same_tenant_only(
    srv: ServerProcess, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    text = "Warm this prompt about caches, blocks and tokens, long enough to fill a few blocks of the pool."
    chat = [{"role": "system", "content": "You answer in one word. " * 6}, {"role": "user", "content": "Ready?"}]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join([text, "", json.dumps({"prompt": text + " And a second one."}),
                               json.dumps({"messages": chat})]) + "\n")
    code, out, err = run_cli(capsys, "cache", "warm", str(path), *admin(srv), "--api-key", ALICE_KEY, "--json",
                             "--concurrency", "1")  # in order, so the second prompt finds the first one's blocks
    assert code == 0, err
    warm = json.loads(out)

    text_usage = complete(srv, text)
    second_usage = complete(srv, text + " And a second one.")
    chat_reply = srv.request("POST", "/v1/chat/completions",
                             {"model": SERVED_MODEL, "messages": chat, "max_tokens": 1})
    chat_usage = chat_reply.json()["usage"]
    after = [text_usage, second_usage, chat_usage]
    # Every full block of every warmed prompt was there; a repeat reuses all but the block of its last
    # token (the engine computes at least one prompt token), which matters when a prompt ends on a block
    # boundary, as the chat one does.
    assert [cached(u) for u in after] == [(u["prompt_tokens"] - 1) // BLOCK * BLOCK for u in after]
    assert chat_usage["prompt_tokens"] % BLOCK == 0 and all(cached(u) > 0 for u in after)
    assert warm["prompts"] == 3
    assert warm["prompt_tokens"] == sum(u["prompt_tokens"] for u in after)
    assert warm["cached_tokens"] == sum(cached(u) for u in after)
    # The two text prompts share their first blocks: the second found them already cached.
    assert warm["newly_cached_tokens"] + warm["already_cached_tokens"] == warm["cached_tokens"]
    assert warm["already_cached_tokens"] > 0
    assert cached(complete(srv, text, key=BOB_KEY)) == 0  # warmed in alice's namespace, not bob's

    code, out, _ = run_cli(capsys, "cache", "warm", str(path), *admin(srv), "--api-key", ALICE_KEY)
    assert code == 0 and f"{warm['cached_tokens']:,} tokens are cached now" in out and "0 of them new" in out


def test_a_server_that_is_down_is_one_line_on_stderr_and_exit_1() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for argv in (["stats", "--url", url], ["cache", "ls", "--url", url],
                 ["bench", "--url", url, "--requests", "1"]):
        proc = subprocess.run([sys.executable, "-m", "cacheproxy.cli", *argv], cwd=REPO, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert f"cannot reach the server at {url}" in lines[0]


def test_a_wrong_admin_key_is_one_line_on_stderr_and_exit_1(
    small_pool_server: ServerProcess, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    url = ["--url", small_pool_server.base_url]
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    for argv in (["stats", *url, "--admin-key", "wrong"], ["cache", "ls", *url, "--admin-key", "wrong"],
                 ["cache", "evict", "--all", *url], ["cache", "warm", str(prompts), *url, "--admin-key", "x"]):
        code, out, err = run_cli(capsys, *argv)
        assert code == 1 and out == ""
        assert len(err.strip().splitlines()) == 1 and "admin key" in err, err


def test_bad_operator_input_is_one_line_on_stderr(small_pool_server: ServerProcess,
                                                  capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "cache", "pin", "abc", *admin(small_pool_server))
    assert code == 1 and "32 hex digits" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "cache", "pin", "0" * 32, *admin(small_pool_server))
    assert code == 1 and "404" in err
    code, _, err = run_cli(capsys, "cache", "evict", "0" * 12, *admin(small_pool_server))
    assert code == 1 and "no cached prefix" in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"nothing": 1}\n')
    code, _, err = run_cli(capsys, "cache", "warm", str(bad), *admin(small_pool_server), "--api-key", ALICE_KEY)
    assert code == 1 and f"{bad}:2" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "cache", "warm", str(tmp_path / "missing.txt"), *admin(small_pool_server))
    assert code == 1 and "cannot read" in err


def test_evict_drops_the_whole_prefix_from_the_lower_tiers_too(
    server: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a server with CPU and disk tiers: a pinned prefix is written to both; evicting it removes every
    block of it everywhere, so nothing of it is served from below either."""
    prompt = ids(40, 90)  # 5 full blocks
    complete(server, prompt)
    server.wait_until_idle()
    entry = cli_json(capsys, "cache", "ls", *admin(server), "--json")["entries"][0]  # the most recent
    assert entry["tokens"] == 80
    on_disk = server.admin_stats()["engine"]["tiers"]["disk"]["entries"]
    assert run_cli(capsys, "cache", "pin", entry["hash"], *admin(server))[0] == 0  # writes it down everywhere
    deadline = time.monotonic() + 20  # disk writes are queued: wait until they are committed
    while server.admin_stats()["engine"]["tiers"]["disk"]["entries"] < on_disk + 5:
        assert time.monotonic() < deadline, "the pinned blocks never reached the disk tier"
        time.sleep(0.05)
    code, out, _ = run_cli(capsys, "cache", "evict", entry["hash"], *admin(server))
    assert code == 0 and "5 from gpu" in out and "5 from cpu" in out and "5 from disk" in out, out
    assert cached(complete(server, prompt)) == 0
