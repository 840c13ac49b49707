"""``kvstore router``'s Prometheus metrics (``GET /metrics``), in their own registry.

- ``kvstore_router_requests_total{replica,code}``: requests answered, by the replica
  that served them (``none`` when no replica could) and status code.
- ``kvstore_router_decisions_total{policy,reason}``: routing decisions (reasons in
  :class:`kvstore.router.policy.Decision`).
- ``kvstore_router_retries_total{replica}``: requests moved off a replica that failed
  before answering.
- ``kvstore_router_prompt_tokens_total`` and
  ``kvstore_router_matched_prefix_tokens_total{tier}``: full-block prompt tokens hashed,
  and those the chosen replica held by the events, by tier.
- ``kvstore_router_route_seconds``: time from a request's arrival to its dispatch
  (parsing, tokenizing, hashing, choosing).
- ``kvstore_router_replica_healthy{replica}``, ``kvstore_router_replica_in_flight{replica}``,
  ``kvstore_router_replica_pending_blocks{replica}`` (uncached prompt blocks sent and not
  yet answered: prefill queued), ``kvstore_router_replica_blocks{replica,tier}`` (by the
  events).
- ``kvstore_router_events_total{op}``, ``kvstore_router_event_batches_total``,
  ``kvstore_router_event_gaps_total`` (batches lost), ``kvstore_router_events_connected``,
  ``kvstore_router_index_blocks``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from kvstore.router.feed import EventFeed
from kvstore.router.index import GlobalIndex
from kvstore.router.replicas import Replica

ROUTE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)


class _StateCollector(Collector):
    def __init__(self, state: Callable[[], tuple[list[Replica], GlobalIndex, EventFeed | None]]
                 ) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        replicas, index, feed = self.state()
        healthy = GaugeMetricFamily("kvstore_router_replica_healthy", "1 while the replica "
                                    "is in rotation", labels=["replica"])
        flight = GaugeMetricFamily("kvstore_router_replica_in_flight", "Requests sent to the "
                                   "replica and not finished", labels=["replica"])
        pending = GaugeMetricFamily("kvstore_router_replica_pending_blocks", "Uncached "
                                    "prompt blocks sent to the replica and not yet answered "
                                    "(prefill queued there)", labels=["replica"])
        blocks = GaugeMetricFamily("kvstore_router_replica_blocks", "Blocks the replica "
                                   "holds by its KV events", labels=["replica", "tier"])
        for r in replicas:
            healthy.add_metric([r.name], float(r.routable))
            flight.add_metric([r.name], r.in_flight)
            pending.add_metric([r.name], r.pending_blocks)
            for tier, n in index.held(r.name).items():
                blocks.add_metric([r.name, tier], n)
        yield from (healthy, flight, pending, blocks)
        yield GaugeMetricFamily("kvstore_router_index_blocks", "Distinct blocks in the "
                                "router's index", value=len(index))
        events = CounterMetricFamily("kvstore_router_events", "KV events applied, by op",
                                     labels=["op"])
        for op, n in sorted((feed.events if feed else {}).items()):
            events.add_metric([op], n)
        yield events
        yield CounterMetricFamily("kvstore_router_event_batches", "KV event batches read",
                                  value=feed.batches if feed else 0)
        yield CounterMetricFamily("kvstore_router_event_gaps", "KV event batches lost "
                                  "(publisher sequence gaps)", value=feed.gaps if feed else 0)
        yield GaugeMetricFamily("kvstore_router_events_connected", "1 while the events "
                                "stream is being read", value=float(bool(feed and
                                                                         feed.connected)))


class RouterMetrics:
    """The router's registry and instruments."""

    def __init__(self, state: Callable[[], tuple[list[Replica], GlobalIndex, EventFeed | None]]
                 ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("kvstore_router_requests", "Requests answered, by replica "
                                "and status code", ["replica", "code"], registry=r)
        self.decisions = Counter("kvstore_router_decisions", "Routing decisions by policy "
                                 "and reason", ["policy", "reason"], registry=r)
        self.retries = Counter("kvstore_router_retries", "Requests moved off a replica that "
                               "failed before answering", ["replica"], registry=r)
        self.prompt_tokens = Counter("kvstore_router_prompt_tokens", "Full-block prompt "
                                     "tokens hashed by the router", registry=r)
        self.matched = Counter("kvstore_router_matched_prefix_tokens", "Prompt tokens the "
                               "chosen replica held by the events, by tier", ["tier"],
                               registry=r)
        self.route_seconds = Histogram("kvstore_router_route_seconds", "Arrival to dispatch "
                                       "(s)", buckets=ROUTE_BUCKETS, registry=r)
        r.register(_StateCollector(state))

    def render(self) -> bytes:
        return generate_latest(self.registry)
