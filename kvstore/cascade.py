"""The tier cascade as data: ordered levels, the room each offers, the mover's protocol.

The store keeps its tiers as one list of :class:`Level`, fastest first (GPU, host,
then the shared tiers: disk, Redis, daemon). A level's :class:`Room` hands out the
locations blocks take there: slots of a pool (GPU, host; a pool of no slots when the
host tier is absent) or ``True`` up to the index's capacity for a shared tier. Demotion
moves blocks from a level to the one below it; the :class:`Mover` copies the bytes.
Both the real mover (``kvstore.mover``) and the simulation's (``kvstore.simulation``)
implement :class:`Mover`.

No torch import: simulation mode runs on these types alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from radix import Moved, Node


class SlotPoolLike(Protocol):
    """What the store needs of a slot pool (``tiers.pool`` pools, ``tiers.slots`` ones)."""

    @property
    def num_slots(self) -> int: ...

    @property
    def num_free(self) -> int: ...

    def alloc(self, n: int) -> Any: ...

    def free(self, slots: Sequence[int]) -> None: ...

    def is_allocated(self, slot: int) -> bool: ...

    def check_integrity(self) -> None: ...


class Room(Protocol):
    """Locations of one level: ``take`` up to ``n`` of them, ``give`` them back."""

    @property
    def capacity(self) -> int: ...

    @property
    def num_free(self) -> int: ...

    def take(self, n: int) -> list[Any]: ...

    def give(self, locations: Sequence[Any]) -> None: ...


class PoolRoom:
    """A slot pool's room: locations are slot numbers."""

    def __init__(self, pool: SlotPoolLike) -> None:
        self.pool = pool

    @property
    def capacity(self) -> int:
        return self.pool.num_slots

    @property
    def num_free(self) -> int:
        return self.pool.num_free

    def take(self, n: int) -> list[Any]:
        k = min(n, self.pool.num_free)
        return list(self.pool.alloc(k).slots) if k > 0 else []

    def give(self, locations: Sequence[Any]) -> None:
        if locations:
            self.pool.free(list(locations))


class SharedRoom:
    """A shared tier's room in the index: ``capacity`` blocks (the tier itself may hold
    more, written by other processes); locations are ``True``."""

    def __init__(self, capacity: int, used: Callable[[], int]) -> None:
        self._capacity = capacity
        self._used = used

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def num_free(self) -> int:
        return max(0, self._capacity - self._used())

    def take(self, n: int) -> list[Any]:
        return [True] * min(n, self.num_free)

    def give(self, locations: Sequence[Any]) -> None:
        return None


@dataclass(frozen=True)
class Level:
    """One tier of the cascade: its name, its column in the index, its room."""

    name: str
    index: int
    room: Room
    shared: bool


@dataclass(frozen=True)
class LoadRequest:
    """One block to load into GPU slot ``slot`` from ``tier``.

    ``source``: the host slot for ``tier == "host"``, else ``None`` (found by ``key``).
    """

    index: int  # block index in the sequence
    key: bytes
    parent: bytes
    tokens: bytes
    tier: str
    slot: int
    source: int | None = None


@dataclass(frozen=True)
class LoadMeasure:
    """One tier's part of a load: blocks and bytes landed, seconds from start to done."""

    tier: str
    blocks: int
    nbytes: int
    seconds: float


@dataclass(frozen=True)
class Published:
    """The end of a background write to shared tier ``tier``: ``nodes`` it verifiably
    holds (to record), ``lost`` the blocks an earlier demotion recorded there whose write
    did not land (to forget)."""

    tier: str
    nodes: list[Node]
    lost: list[Node] = field(default_factory=list)


class LoadHandle(Protocol):
    """A load into GPU slots in flight."""

    def done(self) -> bool: ...

    def wait(self) -> None: ...

    @property
    def first_failure(self) -> int | None: ...

    def measures(self) -> list[LoadMeasure]: ...


class Mover(Protocol):
    """Copies block bytes between tiers for the store (see ``kvstore.mover``)."""

    moved: Any  # Counter of "src->dst" -> blocks
    corrupt: int
    publish_dropped: int

    def gpu_to_host(self, gpu_slots: Sequence[int], host_slots: Sequence[int]) -> None: ...

    def copy_gpu(self, src: int, dst: int) -> None: ...

    def before_gpu_reuse(self, gpu_slots: Sequence[int]) -> None: ...

    def demote(self, src: str, dst: str, moved: Sequence[Moved]) -> list[Node]: ...

    def contains_prefix(self, keys: Sequence[bytes]) -> list[tuple[str, int]]: ...

    def load(self, requests: Sequence[LoadRequest]) -> LoadHandle: ...

    def publish(self, nodes: Sequence[Node], gpu_slots: Sequence[int]) -> int: ...

    def published(self) -> list[Published]: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...
