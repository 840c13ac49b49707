"""Prometheus series of tier counters, named the same in every process that has tiers.

Both services export ``kvstore_tier_*{tier=...}`` from ``tiers.base.TierStats``: the
daemon for its memory/disk/redis tiers (summed over namespaces), ``kvstore serve`` for
the shared tiers of its store (disk, redis, remote). A dashboard reads one set of names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tiers.base import TierStats

TierCounters = Mapping[str, Mapping[str, object]]
"""Per tier name, the fields of ``TierStats`` (``gets``, ``hits``, ... ``capacity_bytes``)."""

COUNTERS = (("gets", "gets", "Blocks looked up"), ("hits", "hits", "Blocks found"),
            ("misses", "misses", "Blocks not found (absent, corrupt or failed)"),
            ("puts", "puts", "Blocks stored"),
            ("bytes_written", "bytes_in", "Encoded block bytes written into the tier"),
            ("bytes_read", "bytes_out", "Encoded block bytes read out of the tier"),
            ("evictions", "evictions", "Blocks evicted for capacity"),
            ("corrupt", "corrupt", "Blocks that failed verification (deleted)"),
            ("errors", "errors", "Failed tier operations"))
GAUGES = (("blocks", "blocks", "Blocks held"),
          ("bytes_used", "used_bytes", "Encoded block bytes held"),
          ("capacity_bytes", "capacity_bytes", "Capacity in bytes"))


FIELDS = ("blocks", "bytes_used", "gets", "hits", "misses", "puts", "bytes_read",
          "bytes_written", "evictions", "corrupt", "errors")


def _numbers(extra: Mapping[str, float]) -> dict[str, float | int]:
    return {k: (int(v) if float(v).is_integer() else v) for k, v in extra.items()}


def tier_counters(s: TierStats) -> dict[str, object]:
    """One tier's counters, JSON-ready (``extra`` as a nested map)."""
    out: dict[str, object] = {f: getattr(s, f) for f in FIELDS}
    out["capacity_bytes"] = s.capacity_bytes
    out["extra"] = _numbers(s.extra)
    return out


def sum_counters(snaps: list[TierStats]) -> dict[str, object]:
    """Counters of several tiers of one kind, summed, JSON-ready."""
    total: dict[str, object] = {f: sum(getattr(s, f) for s in snaps) for f in FIELDS}
    total["capacity_bytes"] = None
    extra: dict[str, float] = {}
    for s in snaps:
        for k, v in s.extra.items():
            extra[k] = extra.get(k, 0.0) + v
    total["extra"] = _numbers(extra)
    return total


class TierCollector(Collector):
    """``kvstore_tier_*`` families from ``read()`` at scrape time (absent fields and
    ``None`` values are left out)."""

    def __init__(self, read: Callable[[], TierCounters]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        stats = self.read()
        for field, metric, text in COUNTERS:
            family = CounterMetricFamily(f"kvstore_tier_{metric}", text, labels=["tier"])
            for tier, s in stats.items():
                value = s.get(field)
                if isinstance(value, int | float):
                    family.add_metric([tier], value)
            yield family
        for field, metric, text in GAUGES:
            gauge = GaugeMetricFamily(f"kvstore_tier_{metric}", text, labels=["tier"])
            for tier, s in stats.items():
                value = s.get(field)
                if isinstance(value, int | float):
                    gauge.add_metric([tier], value)
            yield gauge
