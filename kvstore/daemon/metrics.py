"""The daemon's Prometheus metrics, in their own registry (never the global one).

``kvstore_daemon_*``: requests by endpoint and status, latency, keys, body bytes,
requests in flight, open namespaces. ``kvstore_tier_*{tier}``: the tiers' counters
summed over namespaces (:mod:`kvstore.tier_metrics`, the names ``kvstore serve`` uses
for its own tiers).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from kvstore.daemon.backend import Backend
from kvstore.tier_metrics import TierCollector

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)


class _NamespaceCollector(Collector):
    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("kvstore_daemon_namespaces", "Open namespaces",
                                value=len(self.backend.namespaces()))
        yield GaugeMetricFamily("kvstore_daemon_broken_namespaces", "Namespaces whose "
                                "storage failed to open (answered 503)",
                                value=len(self.backend.broken()))


class Metrics:
    """The daemon's registry and the instruments its middleware updates."""

    def __init__(self, backend: Backend) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("kvstore_daemon_requests", "HTTP requests by endpoint and "
                                "status code", ["endpoint", "code"], registry=r)
        self.latency = Histogram("kvstore_daemon_request_seconds", "Request latency by "
                                 "endpoint (s)", ["endpoint"], buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.keys = Counter("kvstore_daemon_keys", "Keys (or put items) in accepted data "
                            "requests", ["endpoint"], registry=r)
        self.body_bytes = Counter("kvstore_daemon_request_body_bytes", "Request body bytes "
                                  "received", registry=r)
        self.reply_bytes = Counter("kvstore_daemon_response_body_bytes", "Response body "
                                   "bytes sent", registry=r)
        self.inflight = Gauge("kvstore_daemon_inflight_requests", "Data requests in flight",
                              registry=r)
        r.register(TierCollector(backend.tier_stats))
        r.register(_NamespaceCollector(backend))

    def render(self) -> bytes:
        """The Prometheus text exposition of the registry."""
        return generate_latest(self.registry)
