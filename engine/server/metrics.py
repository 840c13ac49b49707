"""``kvstore serve``'s Prometheus metrics (``GET /metrics``), in their own registry.

Request side (updated as requests run):

- ``kvstore_serve_requests_total{endpoint,code}``, ``kvstore_serve_request_seconds{endpoint}``
  (the daemon's ``kvstore_daemon_requests_total`` / ``_request_seconds`` shape).
- ``kvstore_serve_time_to_first_token_seconds`` and
  ``kvstore_serve_inter_token_latency_seconds`` histograms (one TTFT per prompt, one
  inter-token observation per generated token after the first).
- ``kvstore_serve_prompt_tokens_total``, ``kvstore_serve_generation_tokens_total``.

Engine side (read on the engine thread at scrape time):

- ``kvstore_serve_sequences_running``, ``kvstore_serve_sequences_waiting`` (queued or
  loading their cached prefix), ``kvstore_serve_preemptions_total``.
- ``kvstore_prefix_cache_queries_total`` (prompt tokens looked up) and
  ``kvstore_prefix_cache_hits_total{tier}`` (tokens served from each tier).
- ``kvstore_kv_pool_used_blocks{pool}``, ``kvstore_kv_pool_capacity_blocks{pool}``,
  ``kvstore_kv_pool_usage_ratio{pool}`` for the device pool (``gpu``) and host DRAM.
- ``kvstore_tier_*{tier}`` for the shared tiers (disk, redis, remote): the same series
  the daemon exports for its tiers (:mod:`kvstore.tier_metrics`), errors included.

``docs/grafana-dashboard.json`` charts them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from engine.async_engine import AsyncEngine
from engine.llm import LLM
from engine.sequence import RequestOutput
from kvstore.tier_metrics import TierCollector, TierCounters, tier_counters

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
               0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


@dataclass(frozen=True)
class EngineSnapshot:
    """What the engine thread reports at a scrape (sequences, tokens, blocks)."""

    running: int
    waiting: int
    preemptions: int
    hit_tokens: Mapping[str, int]
    miss_tokens: int
    pools: Mapping[str, tuple[int, int]]  # pool -> (used blocks, capacity blocks)
    tiers: TierCounters


def engine_snapshot(llm: LLM) -> EngineSnapshot:
    """Read the scheduler and the store; call on the engine thread only."""
    scheduler = llm.engine.scheduler
    s = llm.store.stats()
    pools = {"gpu": (s.gpu_total - s.gpu_free, s.gpu_total)}
    if s.host_total:
        pools["host"] = (s.host_total - s.host_free, s.host_total)
    return EngineSnapshot(
        running=len(scheduler.running), waiting=len(scheduler.waiting) + len(scheduler.loading),
        preemptions=scheduler.preemptions, hit_tokens=dict(s.hit_tokens),
        miss_tokens=s.miss_tokens, pools=pools,
        tiers={name: tier_counters(tier.stats()) for name, tier in llm.store.shared_tiers.items()})


class _EngineCollector(Collector):
    def __init__(self, metrics: ServeMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        snap = self.metrics.latest
        if snap is None:
            return
        yield GaugeMetricFamily("kvstore_serve_sequences_running",
                                "Sequences in the running batch", value=snap.running)
        yield GaugeMetricFamily("kvstore_serve_sequences_waiting", "Sequences queued or "
                                "loading their cached prefix", value=snap.waiting)
        yield CounterMetricFamily("kvstore_serve_preemptions", "Sequences preempted for KV "
                                  "blocks (recomputed later)", value=snap.preemptions)
        yield CounterMetricFamily("kvstore_prefix_cache_queries", "Prompt tokens looked up "
                                  "in the prefix cache",
                                  value=sum(snap.hit_tokens.values()) + snap.miss_tokens)
        hits = CounterMetricFamily("kvstore_prefix_cache_hits", "Prompt tokens served from "
                                   "the prefix cache, by tier", labels=["tier"])
        for tier, n in sorted(snap.hit_tokens.items()):
            hits.add_metric([tier], n)
        yield hits
        used = GaugeMetricFamily("kvstore_kv_pool_used_blocks", "KV blocks in use (cached "
                                 "or held by sequences)", labels=["pool"])
        capacity = GaugeMetricFamily("kvstore_kv_pool_capacity_blocks", "KV blocks of the "
                                     "pool", labels=["pool"])
        ratio = GaugeMetricFamily("kvstore_kv_pool_usage_ratio", "Used / capacity",
                                  labels=["pool"])
        for pool, (n_used, n_total) in snap.pools.items():
            used.add_metric([pool], n_used)
            capacity.add_metric([pool], n_total)
            ratio.add_metric([pool], n_used / n_total if n_total else 0.0)
        yield from (used, capacity, ratio)


@dataclass
class RequestTracker:
    """Times one generation request from its arrival: call :meth:`update` with every
    snapshot of prompt ``i`` (as :func:`engine.server.responses.merged` yields them)."""

    metrics: ServeMetrics
    start: float = field(default_factory=time.perf_counter)
    _tokens: dict[tuple[int, int], int] = field(default_factory=dict)
    _last: dict[tuple[int, int], float] = field(default_factory=dict)
    _first: set[int] = field(default_factory=set)

    def update(self, i: int, out: RequestOutput) -> None:
        now = time.perf_counter()
        m = self.metrics
        for c in out.outputs:
            key = (i, c.index)
            n, before = len(c.token_ids), self._tokens.get(key, 0)
            if n <= before:
                continue
            if i not in self._first:
                self._first.add(i)
                m.ttft.observe(now - self.start)
            if before:
                gap = (now - self._last[key]) / (n - before)
                for _ in range(n - before):
                    m.itl.observe(gap)
            self._tokens[key], self._last[key] = n, now
        if out.finished:
            m.prompt_tokens.inc(len(out.prompt_token_ids))
            m.generation_tokens.inc(sum(len(c.token_ids) for c in out.outputs))


class ServeMetrics:
    """The server's registry, its request instruments and the latest engine snapshot."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("kvstore_serve_requests", "HTTP requests by endpoint and "
                                "status code", ["endpoint", "code"], registry=r)
        self.latency = Histogram("kvstore_serve_request_seconds", "Request latency by "
                                 "endpoint, to the end of the response (s)", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("kvstore_serve_time_to_first_token_seconds", "Time from a "
                              "request's arrival to its first generated token (s)",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("kvstore_serve_inter_token_latency_seconds", "Time between "
                             "consecutive generated tokens of a sequence (s)",
                             buckets=ITL_BUCKETS, registry=r)
        self.prompt_tokens = Counter("kvstore_serve_prompt_tokens", "Prompt tokens of "
                                     "finished requests", registry=r)
        self.generation_tokens = Counter("kvstore_serve_generation_tokens", "Generated "
                                         "tokens of finished requests", registry=r)
        self.latest: EngineSnapshot | None = None
        r.register(_EngineCollector(self))
        r.register(TierCollector(lambda: self.latest.tiers if self.latest else {}))

    def track(self) -> RequestTracker:
        """A tracker for one request arriving now."""
        return RequestTracker(self)

    async def render(self, engine: AsyncEngine) -> bytes:
        """The text exposition, with a fresh engine snapshot (the last one when the
        engine has stopped)."""
        with contextlib.suppress(Exception):  # stopped or failed: its last figures stand
            self.latest = await engine.run_on_engine(engine_snapshot)
        return generate_latest(self.registry)
