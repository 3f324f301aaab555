"""What the server tells operators: /metrics, /admin/stats, the records log and the log lines."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import openai
from conftest import SERVED_MODEL, ServerProcess
from prometheus_client.parser import text_string_to_metric_families

from cacheproxy.cache.records import RequestRecord, read_records

LONG_SYSTEM = ("You review pull requests. You read the diff, then the tests, then the docs, and you write "
               "down what each change promises and whether a test holds it to that promise. ") * 3


def scrape(server: ServerProcess) -> dict[str, Any]:
    reply = server.request("GET", "/metrics", key=None)
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(reply.body.decode())}


def sample(families: dict[str, Any], family: str, sample_name: str, **labels: str) -> float:
    for s in families[family].samples:
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    return 0.0


def ask(client: openai.OpenAI, salt: str, **extra: Any) -> Any:
    return client.chat.completions.create(
        model=SERVED_MODEL, messages=[{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": "Go"}],
        max_tokens=4, temperature=0, extra_body={"cache_salt": salt, **extra})


def wait_for_record(server: ServerProcess, predicate: Any) -> RequestRecord:
    for _ in range(200):
        found = [r for r in read_records(server.data_dir / "records.jsonl") if predicate(r)]
        if found:
            return found[-1]
        time.sleep(0.02)
    raise AssertionError("record not written")


def test_metrics_expose_every_family_and_ttft_is_split_by_cache_outcome(
    server: ServerProcess, client: openai.OpenAI
) -> None:
    before = scrape(server)
    ttft = "cacheproxy_time_to_first_token_seconds"
    miss0 = sample(before, ttft, ttft + "_count", cache="miss") if ttft in before else 0.0
    hit0 = sample(before, ttft, ttft + "_count", cache="hit") if ttft in before else 0.0
    salt = uuid.uuid4().hex
    ask(client, salt)  # a miss
    ask(client, salt)  # the same prompt again: a hit
    server.wait_until_idle()
    after = scrape(server)
    assert sample(after, ttft, ttft + "_count", cache="miss") == miss0 + 1
    assert sample(after, ttft, ttft + "_count", cache="hit") == hit0 + 1

    for name in ("cacheproxy_inter_token_latency_seconds", "cacheproxy_e2e_request_latency_seconds",
                 "cacheproxy_request_queue_time_seconds"):
        assert after[name].type == "histogram"
        assert sample(after, name, name + "_count") > 0
    assert after["cacheproxy_prefix_cache_queries_tokens"].type == "counter"
    assert after["cacheproxy_prefix_cache_hits_tokens"].type == "counter"
    assert {s.labels["tier"] for s in after["cacheproxy_prefix_cache_hits_tokens"].samples} >= {"gpu"}
    assert sample(after, "cacheproxy_prefix_cache_hits_tokens", "cacheproxy_prefix_cache_hits_tokens_total",
                  tier="gpu") > 0
    kinds = {(s.labels["tier"], s.labels["kind"]) for s in after["cacheproxy_kv_tier_bytes"].samples}
    assert ("gpu", "used") in kinds and ("gpu", "capacity") in kinds
    assert {s.labels["tier"] for s in after["cacheproxy_evictions"].samples} >= {"gpu"}
    assert after["cacheproxy_kv_transfer_bytes"].type == "counter"
    states = {s.labels["state"]: s.value for s in after["cacheproxy_requests"].samples}
    assert states == {"running": 0.0, "waiting": 0.0}

    # The engine-side counters are the engine's own numbers, read at scrape time.
    engine = server.admin_stats()["engine"]
    assert sample(after, "cacheproxy_prefix_cache_queries_tokens",
                  "cacheproxy_prefix_cache_queries_tokens_total") == engine["prefix_cache"]["queries_tokens"]
    assert sample(after, "cacheproxy_kv_tier_bytes", "cacheproxy_kv_tier_bytes", tier="gpu", kind="capacity") == \
        engine["tiers"]["gpu"]["capacity_bytes"]
    lower = [t for t in engine["tiers"] if t != "gpu"]
    assert lower  # the session server runs with its CPU and disk tiers
    for tier in lower:  # per-tier event counters, e.g. corrupt entries dropped
        assert sample(after, "cacheproxy_kv_tier_events", "cacheproxy_kv_tier_events_total", tier=tier,
                      event="corrupt_dropped") == engine["tiers"][tier]["corrupt_dropped"]
    # chat prompts: the second ask's prompt was the first's, so all but its tail came from memory
    tokenized = {s.labels["how"]: s.value for s in after["cacheproxy_chat_prompt_tokens"].samples}
    assert tokenized["reused"] > 0 and tokenized["tokenized"] > 0
    assert tokenized == engine["prompt_tokens"]  # read at scrape time, as the engine's counters are
    for plan in ("load", "recompute", "split"):  # the cost model's choices for lower-tier prefixes
        assert sample(after, "cacheproxy_prefix_plans", "cacheproxy_prefix_plans_total", plan=plan) == \
            engine["prefix_cache"]["plans"][plan]


def test_admin_stats_report_hit_rates_and_ttft_percentiles_by_cache_outcome(
    server: ServerProcess, client: openai.OpenAI
) -> None:
    salt = uuid.uuid4().hex
    ask(client, salt)
    ask(client, salt)
    stats = server.admin_stats()
    assert stats["model"] == SERVED_MODEL
    assert set(stats["engine"]) >= {"requests", "prefix_cache", "tiers", "transfers"}
    records = stats["records"]
    assert records["requests_ok"] >= 2
    assert 0.0 < records["token_hit_rate"] <= 1.0
    assert 0.0 < records["request_hit_rate"] <= 1.0
    for outcome in ("hit", "miss", "all"):
        t = records["ttft_s"][outcome]
        assert t["count"] >= 1
        assert 0 < t["p50"] <= t["p95"] <= t["p99"]
    assert records["ttft_s"]["all"]["count"] == sum(records["ttft_s"][k]["count"] for k in ("hit", "partial", "miss"))


def test_every_request_leaves_a_record_and_log_lines_carry_its_id(
    server: ServerProcess, client: openai.OpenAI
) -> None:
    key = "pk-" + uuid.uuid4().hex
    raw = client.chat.completions.with_raw_response.create(
        model=SERVED_MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=3, temperature=0,
        prompt_cache_key=key)
    reply = raw.parse()
    request_id = raw.http_response.headers["x-request-id"]
    rec = wait_for_record(server, lambda r: r.prompt_cache_key == key)
    assert rec.id == reply.id == f"chatcmpl-{request_id}"
    assert (rec.status, rec.error, rec.endpoint, rec.tenant, rec.model) == (200, None, "chat", "alice", SERVED_MODEL)
    assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
    assert rec.prompt_tokens == reply.usage.prompt_tokens
    assert rec.cached_tokens == reply.usage.prompt_tokens_details.cached_tokens
    assert rec.completion_tokens == reply.usage.completion_tokens
    assert rec.finish_reason == reply.choices[0].finish_reason
    assert rec.ttft_s is not None and rec.e2e_s is not None and rec.queue_time_s is not None
    assert 0 < rec.ttft_s <= rec.e2e_s
    assert abs(rec.time - time.time()) < 60

    # A refused request is recorded too, with its status and error code.
    bad_key = "pk-" + uuid.uuid4().hex
    reply404 = server.request("POST", "/v1/chat/completions", {"model": "nope", "prompt_cache_key": bad_key,
                                                               "messages": [{"role": "user", "content": "x"}]})
    assert reply404.status == 404
    bad = wait_for_record(server, lambda r: r.prompt_cache_key == bad_key)
    assert (bad.status, bad.error) == (404, "model_not_found")

    lines = [json.loads(line) for line in server.log_text().splitlines() if line.startswith("{")]
    mine = [ln for ln in lines if ln.get("request_id") == request_id]
    assert any(ln["event"] == "request_done" and ln["status"] == 200 for ln in mine)
