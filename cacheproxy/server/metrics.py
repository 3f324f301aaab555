"""Prometheus metrics on the server's own registry.

Latencies are observed by the server as requests run; the engine's counters and gauges (prefix-cache
tokens, tier bytes, transfers, evictions, running/waiting) are read from `engine.stats()` at scrape time
by a custom collector, so they can never drift from the engine's own numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cacheproxy.log import get_logger

log = get_logger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0,
                    3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                      0.2, 0.3, 0.5, 1.0, 2.5)


class EngineStatsCollector(Collector):
    """Turns one `engine.stats()` snapshot into the engine-side metric families."""

    def __init__(self, read_stats: Callable[[], dict[str, Any] | None]) -> None:
        self._read_stats = read_stats

    def describe(self) -> list[Metric]:
        return []  # families appear once the engine is loaded

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self._read_stats()
        except Exception as exc:  # a scrape must never fail the server
            log.warning("engine_stats_failed", error=str(exc))
            return
        if not stats:
            return
        prefix = stats.get("prefix_cache", {})
        queries = CounterMetricFamily("cacheproxy_prefix_cache_queries_tokens",
                                      "Prompt tokens looked up in the prefix cache.")
        queries.add_metric([], prefix.get("queries_tokens", 0))
        yield queries

        hits = CounterMetricFamily("cacheproxy_prefix_cache_hits_tokens",
                                   "Prompt tokens served from the prefix cache, by tier.", labels=["tier"])
        for tier, n in sorted(prefix.get("hits_tokens", {}).items()):
            hits.add_metric([tier], n)
        yield hits

        plans = CounterMetricFamily("cacheproxy_prefix_plans",
                                    "Lookups reaching below the GPU, by the cost model's choice (load, recompute, "
                                    "split: recompute the head while the tail loads).", labels=["plan"])
        for plan, n in sorted(prefix.get("plans", {}).items()):
            plans.add_metric([plan], n)
        yield plans
        split_blocks = CounterMetricFamily("cacheproxy_prefix_split_blocks",
                                           "Lower-tier blocks of split plans, recomputed or loaded.", labels=["kind"])
        for kind, n in sorted(prefix.get("split_blocks", {}).items()):
            split_blocks.add_metric([kind], n)
        yield split_blocks

        tier_bytes = GaugeMetricFamily(
            "cacheproxy_kv_tier_bytes",
            "KV bytes per tier: used (cached) and capacity; the pool's active ones are held by running requests.",
            labels=["tier", "kind"],
        )
        evictions = CounterMetricFamily("cacheproxy_evictions", "Blocks evicted from each tier.",
                                        labels=["tier"])
        events = CounterMetricFamily(
            "cacheproxy_kv_tier_events",
            "Per-tier counters: corrupt entries dropped, writes skipped, remote timeouts/errors/breaker.",
            labels=["tier", "event"],
        )
        for tier, t in sorted(stats.get("tiers", {}).items()):
            tier_bytes.add_metric([tier, "used"], t.get("used_bytes", 0))
            tier_bytes.add_metric([tier, "capacity"], t.get("capacity_bytes", 0))
            if "active_bytes" in t:  # the pool: blocks running requests hold
                tier_bytes.add_metric([tier, "active"], t["active_bytes"])
            evictions.add_metric([tier], t.get("evictions", 0))
            for event in _TIER_EVENTS:
                if isinstance(t.get(event), int):
                    events.add_metric([tier, event], t[event])
        yield tier_bytes
        yield evictions
        yield events

        moved: dict[tuple[str, str], int] = {}
        for tr in stats.get("transfers", []):
            key = (str(tr.get("src")), str(tr.get("dst")))
            moved[key] = moved.get(key, 0) + int(tr.get("bytes", 0))
        transfers = CounterMetricFamily("cacheproxy_kv_transfer_bytes", "KV bytes copied between tiers.",
                                        labels=["src", "dst"])
        for (src, dst), n in sorted(moved.items()):
            transfers.add_metric([src, dst], n)
        yield transfers

        if "prompt_tokens" in stats:
            prompt_tokens = CounterMetricFamily(
                "cacheproxy_chat_prompt_tokens",
                "Chat prompt tokens by how the server got them: tokenized, or reused from a recent prompt "
                "of the same namespace that the new one extends.", labels=["how"])  # fmt: skip
            for how, n in sorted(stats["prompt_tokens"].items()):
                prompt_tokens.add_metric([how], n)
            yield prompt_tokens

        reqs = stats.get("requests", {})
        requests = GaugeMetricFamily("cacheproxy_requests", "Requests in the engine.", labels=["state"])
        requests.add_metric(["running"], reqs.get("running", 0))
        requests.add_metric(["waiting"], reqs.get("waiting", 0))
        yield requests


_TIER_EVENTS = ("hits", "misses", "corrupt_dropped", "writes_skipped", "timeouts", "errors", "breaker_opens",
                "breaker_skips", "too_large")


class ServerMetrics:
    def __init__(self, read_engine_stats: Callable[[], dict[str, Any] | None]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.ttft = Histogram(
            "cacheproxy_time_to_first_token_seconds",
            "Arrival to first generated token, by how much of the prompt came from the cache.",
            ["cache"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.inter_token = Histogram(
            "cacheproxy_inter_token_latency_seconds", "Time between generated tokens.",
            buckets=_TOKEN_GAP_BUCKETS, registry=self.registry)
        self.e2e = Histogram(
            "cacheproxy_e2e_request_latency_seconds", "Arrival to the last token.",
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.queue_time = Histogram(
            "cacheproxy_request_queue_time_seconds", "Time a request waited in the engine before running.",
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(EngineStatsCollector(read_engine_stats))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
