"""`cacheproxy bench`: seeded workloads, replayed against a real server through the openai client; its
figures checked against what the server itself recorded for the same requests."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from conftest import ADMIN_KEY, ALICE_KEY, ServerProcess, run_cli

from cacheproxy.cache.records import cache_class
from cacheproxy.workload import WorkloadSizes, build_workload

# Prompts of 100-400 tokens with the tiny model: enough blocks to hit, quick on a CPU.
SMALL = WorkloadSizes(system_words=40, tools=2, task_words=10, tool_result_words=12, agent_turns=4,
                      chat_system_words=12, chat_message_words=10, chat_turns=3, documents=6, document_words=30,
                      documents_per_question=2, question_words=8)
SMALL_FLAGS = ["--system-words", "40", "--tools", "2", "--task-words", "10", "--tool-result-words", "12",
               "--agent-turns", "4", "--chat-system-words", "12", "--chat-message-words", "10", "--chat-turns", "3",
               "--documents", "6", "--document-words", "30", "--documents-per-question", "2",
               "--question-words", "8"]


def test_a_workload_is_a_pure_function_of_its_arguments() -> None:
    a, b = build_workload("mixed", 40, seed=7, sizes=SMALL), build_workload("mixed", 40, seed=7, sizes=SMALL)
    assert a == b and a.requests == 40
    assert build_workload("mixed", 40, seed=8, sizes=SMALL) != a
    assert {r.kind for s in a.sessions for r in s} == {"agent", "chat", "rag"}
    for name in ("agent", "chat", "rag"):
        assert {r.kind for s in build_workload(name, 9, 1, SMALL).sessions for r in s} == {name}


def test_agent_conversations_grow_by_tool_calls_and_results_behind_a_shared_system_prompt() -> None:
    w = build_workload("agent", 30, seed=3, sizes=SMALL)
    systems = {s[0].messages[0]["content"] for s in w.sessions}
    assert len(systems) == 1 and all(s[0].tools == w.sessions[0][0].tools for s in w.sessions)
    grown = 0
    for session in w.sessions:
        for prev, cur in itertools.pairwise(session):
            assert cur.messages[: len(prev.messages)] == prev.messages  # the previous prompt is a prefix
            call, result = cur.messages[len(prev.messages):]
            assert call["role"] == "assistant" and call["tool_calls"][0]["function"]["name"] in {
                t["function"]["name"] for t in cur.tools or []}
            assert result["role"] == "tool" and result["tool_call_id"] == call["tool_calls"][0]["id"]
            grown += 1
    assert grown > 0


def test_rag_questions_draw_their_context_from_one_shared_document_set() -> None:
    w = build_workload("rag", 20, seed=4, sizes=SMALL)
    docs = [r.messages[0]["content"].split("\n\n")[1:] for s in w.sessions for r in s]
    assert all(len(d) == SMALL.documents_per_question for d in docs)
    assert len({doc for d in docs for doc in d}) <= SMALL.documents


def test_bench_json_figures_equal_the_usage_the_server_recorded(
    server: ServerProcess, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    srv = server  # a pool roomy enough that no session's blocks are evicted between its turns
    srv.wait_until_idle()
    before = srv.admin_stats()["records"]
    png = tmp_path / "bench.png"
    code, out, err = run_cli(capsys, "bench", "--url", srv.base_url, "--api-key", ALICE_KEY, "--workload", "mixed",
                             "--requests", "16", "--concurrency", "3", "--seed", "5", "--max-tokens", "4",
                             *SMALL_FLAGS, "--png", str(png), "--json")
    assert code == 0, err
    bench = json.loads(out)
    srv.wait_until_idle()
    after = srv.admin_stats()["records"]

    assert bench["requests"] == 16 and bench["ok"] == 16 and bench["failed"] == 0 and len(bench["results"]) == 16
    assert after["requests"] - before["requests"] == 16
    assert after["prompt_tokens"] - before["prompt_tokens"] == bench["prompt_tokens"]
    assert after["cached_tokens"] - before["cached_tokens"] == bench["cached_tokens"]
    assert bench["token_hit_rate"] == pytest.approx(bench["cached_tokens"] / bench["prompt_tokens"])
    assert bench["cached_tokens"] > 0
    results = bench["results"]
    assert sum(r["prompt_tokens"] for r in results) == bench["prompt_tokens"]
    for r in results:
        assert r["cache"] == cache_class(r["prompt_tokens"], r["cached_tokens"], 16)
        assert 0 < r["ttft_s"] <= r["e2e_s"]
    for c in ("hit", "partial", "miss"):
        assert bench["ttft_s"][c]["count"] == sum(r["cache"] == c for r in results)
        # The server classed the same requests the same way.
        assert after["ttft_s"][c]["count"] - before["ttft_s"][c]["count"] == bench["ttft_s"][c]["count"]
    # A later agent turn starts with the whole previous prompt: it reuses at least that prompt's blocks.
    by_turn = {(r["session"], r["turn"]): r for r in results if r["kind"] == "agent"}
    later = [(by_turn[(s, t - 1)], r) for (s, t), r in by_turn.items() if t > 0]
    assert later and all(r["cached_tokens"] >= (prev["prompt_tokens"] - 1) // 16 * 16 for prev, r in later)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    code, out, _ = run_cli(capsys, "bench", "--url", srv.base_url, "--api-key", ALICE_KEY, "--workload", "rag",
                           "--requests", "2", *SMALL_FLAGS)
    assert code == 0 and "Client TTFT by cache state" in out and "2 requests" in out


def test_bench_with_a_wrong_api_key_is_one_line_on_stderr(small_pool_server: ServerProcess,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "bench", "--url", small_pool_server.base_url, "--api-key", ADMIN_KEY,
                             "--requests", "1")
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1 and "API key" in err
