"""`cacheproxy report`: offline, from the records log a real server wrote (the server is stopped first),
checked against the usage of the requests the test sent."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import ALICE_KEY, BOB_KEY, SERVED_MODEL, run_cli, start_server, stop_server

from cacheproxy.cache.records import RequestRecord

SHARED = "Shared context for the report test: " + "the cache keeps every block of this text. " * 6


@dataclass
class Sent:
    data_dir: Path
    usage: dict[str, list[dict[str, Any]]]  # tenant -> usage of each successful request
    keys: dict[str, int]  # prompt_cache_key -> requests sent with it ("(none)": without)
    failed: int


@pytest.fixture(scope="module")
def sent(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Sent:
    """A server that served two tenants, with and without prompt_cache_key, one request refused; stopped."""
    data_dir = tmp_path_factory.mktemp("report-server")
    srv = start_server(["--model", str(tiny_model_dir), "--served-model-name", SERVED_MODEL,
                        "--api-key", f"{ALICE_KEY}=alice", "--api-key", f"{BOB_KEY}=bob",
                        "--num-kv-blocks", "64", "--max-num-batched-tokens", "256",
                        "--cpu-cache-bytes", "0", "--no-disk-cache-enabled"], data_dir,
                       env={"OMP_NUM_THREADS": "1"})
    usage: dict[str, list[dict[str, Any]]] = {"alice": [], "bob": []}

    def post(path: str, body: dict[str, Any], key: str, tenant: str) -> None:
        reply = srv.request("POST", path, {"model": SERVED_MODEL, "max_tokens": 2, "temperature": 0, **body}, key=key)
        assert reply.status == 200, reply.body
        usage[tenant].append(reply.json()["usage"])

    try:
        for i in range(3):
            post("/v1/completions", {"prompt": SHARED + f" Question {i}?", "prompt_cache_key": "docs"},
                 ALICE_KEY, "alice")
        for turn in ("Hello there.", "And a follow-up question."):
            post("/v1/chat/completions", {"messages": [{"role": "system", "content": SHARED},
                                                       {"role": "user", "content": turn}],
                                          "prompt_cache_key": "agent-1"}, ALICE_KEY, "alice")
        post("/v1/completions", {"prompt": SHARED}, BOB_KEY, "bob")
        post("/v1/completions", {"prompt": SHARED + " Bob asks again."}, BOB_KEY, "bob")
        refused = srv.request("POST", "/v1/completions", {"model": SERVED_MODEL, "prompt": [1, 999999]},
                              key=ALICE_KEY)
        assert refused.status == 400
    finally:
        assert stop_server(srv) == 0  # a graceful stop writes every record out
    return Sent(data_dir, usage, {"docs": 3, "agent-1": 2, "(none)": 3}, failed=1)


def report_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    code, out, err = run_cli(capsys, "report", *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def test_report_counts_equal_what_was_sent_split_by_tenant_and_prompt_cache_key(
    sent: Sent, capsys: pytest.CaptureFixture[str]
) -> None:
    r = report_json(capsys, "--data-dir", str(sent.data_dir))
    every = sent.usage["alice"] + sent.usage["bob"]
    assert r["requests"] == {"total": len(every) + sent.failed, "ok": len(every), "failed": sent.failed}
    assert r["tokens"]["prompt"] == sum(u["prompt_tokens"] for u in every)
    assert r["tokens"]["cached"] == sum(u["prompt_tokens_details"]["cached_tokens"] for u in every)
    assert r["tokens"]["cached"] > 0
    assert r["cached_tokens_by_tier"] == {"gpu": r["tokens"]["cached"]}
    assert r["ttft_s"]["all"]["count"] == len(every)
    for tenant, usages in sent.usage.items():
        t = r["tenants"][tenant]
        assert t["ok"] == len(usages)
        assert t["prompt_tokens"] == sum(u["prompt_tokens"] for u in usages)
        assert t["cached_tokens"] == sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    assert r["tenants"]["alice"]["failed"] == 1 and r["tenants"]["bob"]["failed"] == 0
    assert set(r["tenants"]) == {"alice", "bob"}
    assert {k: g["requests"] for k, g in r["prompt_cache_keys"].items()} == sent.keys
    # Bob's first request could not reuse alice's blocks (tenants are salted apart); his second reused his first.
    bob = sent.usage["bob"]
    assert bob[0]["prompt_tokens_details"]["cached_tokens"] == 0 < bob[1]["prompt_tokens_details"]["cached_tokens"]
    assert sum(b["requests"] for b in r["timeline"]) == len(every) + sent.failed

    code, table, _ = run_cli(capsys, "report", "--data-dir", str(sent.data_dir))
    assert code == 0 and "alice" in table and "agent-1" in table and f"{r['tokens']['cached']:,}" in table


def test_since_keeps_only_the_window(sent: Sent, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    log = (sent.data_dir / "records.jsonl").read_text()
    old = RequestRecord(id="old", time=time.time() - 7200, endpoint="chat", tenant="carol", model=SERVED_MODEL,
                        status=200, prompt_tokens=100, cached_tokens=64, cache="partial", ttft_s=0.5)
    (data_dir / "records.jsonl").write_text(old.to_json() + "\n" + log)
    everything = report_json(capsys, "--data-dir", str(data_dir))
    recent = report_json(capsys, "--data-dir", str(data_dir), "--since", "1h")
    assert everything["requests"]["total"] == recent["requests"]["total"] + 1
    assert "carol" in everything["tenants"] and "carol" not in recent["tenants"]
    assert everything["tokens"]["prompt"] - recent["tokens"]["prompt"] == 100
    assert recent["window"]["since_s"] == 3600

    (data_dir / "records.jsonl").write_text(old.to_json() + "\n")
    code, out, err = run_cli(capsys, "report", "--data-dir", str(data_dir), "--since", "1h")
    assert code == 1 and out == "" and "no request records since 3600 s ago" in err


def test_report_png_and_html(sent: Sent, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import matplotlib.image

    png, page = tmp_path / "report.png", tmp_path / "report.html"
    code, _, err = run_cli(capsys, "report", "--data-dir", str(sent.data_dir), "--png", str(png),
                           "--html", str(page))
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(png)
    height, width = image.shape[:2]
    assert 800 <= width <= 2000 and 800 <= height <= 2000
    assert image[..., :3].std() > 0.05  # drawn on, not a blank canvas
    html = page.read_text()
    assert html.startswith("<!doctype html>") and "data:image/png;base64," in html
    assert "alice" in html and "bob" in html and "agent-1" in html


def test_an_empty_or_missing_log_is_one_line_on_stderr(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = run_cli(capsys, "report", "--data-dir", str(tmp_path))
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1 and "no records log" in err
    (tmp_path / "records.jsonl").write_text("")
    code, out, err = run_cli(capsys, "report", "--data-dir", str(tmp_path))
    assert code == 1 and len(err.strip().splitlines()) == 1 and "no request records in" in err
