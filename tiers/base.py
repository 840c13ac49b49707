"""The interface every hash-addressed tier implements (LMDB, Redis, HTTP).

Batch-first: every call takes or returns a batch, so a network tier pays one round
trip per batch. Keys are 16-byte block keys (``radix.hashing``); values are encoded
blocks (``tiers.codec``). Tiers never raise for a backend failure: a failed read is a
miss, a failed write is dropped, and both are counted in ``stats()``. ``put`` says what
it stored (:class:`PutResult`), so a dropped write is never recorded as stored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class TierStats:
    """Counters of one tier since it was opened (blocks and bytes)."""

    name: str
    blocks: int = 0
    bytes_used: int = 0
    capacity_bytes: int | None = None
    gets: int = 0
    hits: int = 0
    misses: int = 0
    puts: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    evictions: int = 0
    corrupt: int = 0
    errors: int = 0
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PutResult:
    """What one ``put`` stored.

    ``stored``: the keys whose block this call committed to the backend (an LMDB commit,
    a Redis reply, the daemon's acknowledgment) and that a later pair of the same call
    did not evict again, each key once. ``bytes_stored``: the encoded bytes of those
    blocks (the last value put for each key). A key of the batch that is not in
    ``stored`` was dropped (backend failure, too large, no room) and must not be
    recorded as held by the tier. The tier may still evict a stored key later.
    """

    stored: frozenset[bytes] = frozenset()
    bytes_stored: int = 0

    @property
    def count(self) -> int:
        """How many distinct keys were stored (blocks)."""
        return len(self.stored)

    @staticmethod
    def of(items: Sequence[tuple[bytes, bytes]], keys: set[bytes] | frozenset[bytes]
           ) -> PutResult:
        """The result for ``keys`` stored out of ``items`` (last value per key counts)."""
        sizes = {key: len(value) for key, value in items}
        return PutResult(stored=frozenset(keys), bytes_stored=sum(sizes[k] for k in keys))


Take = Callable[[int, memoryview], None]
"""Receives the ``i``-th requested block as a view valid only during the call."""


def take_each(blobs: Sequence[bytes | None], take: Take) -> list[bool]:
    """``get_into`` for a tier whose ``get`` already returns copies."""
    got = []
    for i, blob in enumerate(blobs):
        if blob is not None:
            take(i, memoryview(blob))
        got.append(blob is not None)
    return got


class HashTier(Protocol):
    """A store of encoded blocks addressed by key."""

    name: str

    def contains_prefix(self, keys: Sequence[bytes]) -> int:
        """How many of ``keys``, counted from the first, are present (consecutive)."""
        ...

    def get(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Verified encoded blocks, ``None`` for a miss, a corrupt block or a failure."""
        ...

    def get_into(self, keys: Sequence[bytes], take: Take) -> list[bool]:
        """:meth:`get` handing each verified block to ``take(i, view)`` instead of
        returning it; the view is valid only during the call (copy what you keep). A tier
        that can lend views into its storage (LMDB) avoids a copy; others pass their
        ``get`` results through :func:`take_each`. Returns, per key, whether ``take`` got
        it; an exception from ``take`` propagates."""
        ...

    def put(self, items: Sequence[tuple[bytes, bytes]]) -> PutResult:
        """Store ``(key, encoded block)`` pairs, evicting if the tier is full; returns
        what was stored (an empty result for a closed tier or an empty batch)."""
        ...

    def delete(self, keys: Sequence[bytes]) -> None:
        """Remove keys; absent keys are ignored."""
        ...

    def stats(self) -> TierStats:
        """A snapshot of the counters."""
        ...

    def close(self) -> None:
        """Flush and release resources; later calls are misses / no-ops."""
        ...
