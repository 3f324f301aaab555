"""The request records log: written off the event loop, read back whole, summarized."""

from __future__ import annotations

from pathlib import Path

import pytest

from cacheproxy.cache.records import (
    RecordsLog,
    RequestRecord,
    cache_class,
    percentile,
    read_records,
    summarize_records,
)


def record(i: int, **fields: object) -> RequestRecord:
    base: dict[str, object] = {"id": f"r{i}", "time": 1000.0 + i, "endpoint": "chat", "tenant": "t",
                               "model": "m", "status": 200}
    base.update(fields)
    return RequestRecord(**base)  # type: ignore[arg-type]


def test_records_written_by_the_log_read_back_equal_and_in_order(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "records.jsonl"
    log = RecordsLog(path)
    log.start()
    written = [record(i, prompt_tokens=i, cached_tokens_by_tier={"gpu": i}, ttft_s=0.1 * i) for i in range(500)]
    for r in written:
        log.append(r)
    log.close()
    assert list(read_records(path)) == written
    # A second server run appends to the same file.
    log = RecordsLog(path)
    log.start()
    log.append(record(500))
    log.close()
    assert [r.id for r in read_records(path)][-2:] == ["r499", "r500"]


def test_a_torn_or_foreign_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    good = record(1)
    path.write_text(good.to_json() + "\n" + '{"id": "half' + "\n" + "[1, 2]\n" + good.to_json() + "\n")
    assert list(read_records(path)) == [good, good]
    assert list(read_records(tmp_path / "missing.jsonl")) == []


def test_cache_class_counts_the_always_computed_last_block_as_a_hit() -> None:
    assert cache_class(100, 0, 16) == "miss"
    assert cache_class(100, 96, 16) == "hit"
    assert cache_class(96, 80, 16) == "hit"  # the last full block is recomputed to get logits
    assert cache_class(100, 64, 16) == "partial"


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile(list(map(float, range(101))), 99) == pytest.approx(99.0)


def test_summary_splits_ttft_by_cache_outcome_and_ignores_failed_requests_for_rates() -> None:
    records = [
        record(1, prompt_tokens=100, cached_tokens=0, cache="miss", ttft_s=1.0, e2e_s=2.0),
        record(2, prompt_tokens=100, cached_tokens=96, cache="hit", ttft_s=0.1, e2e_s=1.0,
               cached_tokens_by_tier={"gpu": 64, "disk": 32}),
        record(3, prompt_tokens=100, cached_tokens=48, cache="partial", ttft_s=0.5, e2e_s=1.5,
               cached_tokens_by_tier={"cpu": 48}),
        record(4, status=429, error="rate_limit_exceeded"),
    ]
    s = summarize_records(records)
    assert (s["requests"], s["requests_ok"], s["requests_failed"]) == (4, 3, 1)
    assert s["token_hit_rate"] == pytest.approx(144 / 300)
    assert s["request_hit_rate"] == pytest.approx(2 / 3)
    assert s["cached_tokens_by_tier"] == {"gpu": 64, "disk": 32, "cpu": 48}
    assert s["ttft_s"]["hit"]["p50"] == 0.1 and s["ttft_s"]["miss"]["p50"] == 1.0
    assert s["ttft_s"]["partial"]["count"] == 1 and s["ttft_s"]["all"]["count"] == 3
    assert s["e2e_s"]["p50"] == 1.5
