"""Simulation mode: the store's policies with capacity accounting and no KV bytes.

``CountingPool`` (``tiers.slots``) stands in for a slot pool and ``NullMover`` for the
byte mover, so the store runs exactly the same matching, promotion, demotion and
eviction code paths; only the copies are skipped. Used by the hit-rate benchmark and
very large replays. Imports no torch (a test checks it).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from kvstore.cascade import LoadMeasure, LoadRequest, Published
from radix import Moved, Node
from tiers.slots import CountingPool, NullPool

__all__ = ["CountingPool", "DoneLoad", "NullMover", "NullPool"]


class DoneLoad:
    """A load that finished at once with no failure (simulation: nothing to read)."""

    first_failure: int | None = None

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        return None

    def measures(self) -> list[LoadMeasure]:
        return []


class NullMover:
    """Moves no bytes; every copy is complete at once and every write lands.

    ``shared``: the names of the shared tiers, in cascade order (a publication lands
    in each of them).
    """

    def __init__(self, shared: Sequence[str] = ()) -> None:
        self.shared = list(shared)
        self.moved: Counter[str] = Counter()
        self.corrupt = 0
        self.publish_dropped = 0
        self._published: list[Published] = []

    def gpu_to_host(self, gpu_slots: Sequence[int], host_slots: Sequence[int]) -> None:
        return None

    def copy_gpu(self, src: int, dst: int) -> None:
        return None

    def before_gpu_reuse(self, gpu_slots: Sequence[int]) -> None:
        return None

    def demote(self, src: str, dst: str, moved: Sequence[Moved]) -> list[Node]:
        return []

    def contains_prefix(self, keys: Sequence[bytes]) -> list[tuple[str, int]]:
        return []

    def load(self, requests: Sequence[LoadRequest]) -> DoneLoad:
        return DoneLoad()

    def publish(self, nodes: Sequence[Node], gpu_slots: Sequence[int]) -> int:
        for name in self.shared:
            self._published.append(Published(name, list(nodes)))
        return len(nodes)

    def published(self) -> list[Published]:
        out, self._published = self._published, []
        return out

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None
