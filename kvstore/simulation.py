"""Simulation mode: the store's policies with capacity accounting and no KV bytes.

``CountingPool`` stands in for a slot pool and ``NullMover`` for the byte mover, so the
store runs exactly the same matching, promotion, demotion and eviction code paths; only
the copies are skipped. Used by the hit-rate benchmark and very large replays.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from radix import Node
from tiers.pool import AllocResult, IntegrityError


class CountingPool:
    """Slot bookkeeping without memory: the same ``alloc``/``free`` contract as a pool."""

    def __init__(self, num_slots: int) -> None:
        self._num_slots = num_slots
        self._free: list[int] = list(range(num_slots - 1, -1, -1))  # pop() yields lowest
        self._used: set[int] = set()

    @property
    def num_slots(self) -> int:
        return self._num_slots

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def alloc(self, n: int) -> AllocResult:
        if n < 0:
            raise ValueError(f"alloc of a negative number of slots: {n}")
        if n > len(self._free):
            return AllocResult((), False)
        slots = tuple(self._free.pop() for _ in range(n))
        self._used.update(slots)
        return AllocResult(slots, True)

    def free(self, slots: Iterable[int]) -> None:
        slots = list(slots)
        bad = [s for s in slots if s not in self._used]
        if bad or len(set(slots)) != len(slots):
            raise ValueError(f"free of slots that are not allocated: {bad or slots}")
        self._used.difference_update(slots)
        self._free.extend(slots)

    def is_allocated(self, slot: int) -> bool:
        return slot in self._used

    def check_integrity(self) -> None:
        if len(self._free) + len(self._used) != self._num_slots:
            raise IntegrityError("free + used != total slots")
        if set(self._free) & self._used:
            raise IntegrityError("a slot is both free and used")


class DoneLoad:
    """A load that finished at once with no failure (simulation: nothing to read)."""

    first_failure: int | None = None

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        return None


class NullMover:
    """Moves no bytes; every transfer is complete at once."""

    def host_barrier(self) -> None:
        return None

    def gpu_to_host(self, gpu_slots: Sequence[int], host_slots: Sequence[int]) -> None:
        return None

    def host_to_gpu(self, host_slots: Sequence[int], gpu_slots: Sequence[int]) -> None:
        return None

    def copy_gpu(self, src: int, dst: int) -> None:
        return None

    def host_to_shared(self, tier: str, nodes: Sequence[Node], host_slots: Sequence[int]) -> None:
        return None

    def gpu_to_shared(self, tier: str, nodes: Sequence[Node], gpu_slots: Sequence[int]) -> None:
        return None

    def shared_to_shared(self, src: str, dst: str, nodes: Sequence[Node]) -> None:
        return None

    def load(self, requests: Sequence[Any]) -> DoneLoad:
        return DoneLoad()

    def contains_prefix(self, keys: Sequence[bytes]) -> list[tuple[str, int]]:
        return []

    def wait_ready(self, transfer: Any) -> bool:
        return True

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None
