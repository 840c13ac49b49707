"""Slot bookkeeping shared by every pool, with no memory behind it (no torch import).

A pool hands out slot numbers; :class:`AllocResult` is what ``alloc`` returns and
:class:`IntegrityError` what ``check_integrity`` raises. :class:`CountingPool` is the
bookkeeping alone (simulation mode), and :class:`NullPool` a pool of no slots: an absent
tier (no host memory configured) that every caller treats like any other pool.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple


class AllocResult(NamedTuple):
    """Outcome of a pool's ``alloc``.

    ``ok`` is False when the pool had fewer free slots than asked for; then ``slots`` is
    empty and nothing was allocated. Truthiness follows ``ok``.
    """

    slots: tuple[int, ...]
    ok: bool

    def __bool__(self) -> bool:
        return self.ok


class IntegrityError(AssertionError):
    """A pool's slot bookkeeping is inconsistent (a bug, never a user error)."""


class CountingPool:
    """Slot bookkeeping without memory: the ``alloc``/``free`` contract of a pool.

    ``alloc`` hands out the lowest free slots first, like the real pools.
    """

    def __init__(self, num_slots: int) -> None:
        if not isinstance(num_slots, int) or num_slots < 0:
            raise ValueError(f"num_slots must be an int >= 0, got {num_slots!r}")
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


class NullPool(CountingPool):
    """A pool of no slots: the stand-in for a tier that is not configured."""

    def __init__(self) -> None:
        super().__init__(0)
