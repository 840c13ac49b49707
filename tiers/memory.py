"""Host DRAM as a hash-addressed tier: an in-process LRU dict of encoded KV blocks.

The cache daemon's fastest tier ("memory"), also usable on its own.

Contracts:

- Capacity: ``capacity_bytes`` bounds the sum of the stored encoded block sizes (bytes;
  Python's per-object and dict overhead, about 150 bytes a block, comes on top). A put
  that would exceed it evicts least-recently-used blocks first; a block larger than the
  whole capacity is not stored and evicts nothing (``stats().extra["rejected"]``).
- Access order: ``get`` hits and ``put`` (including a re-put) make a block the most
  recently used; ``contains_prefix`` does not change the order.
- Verification: ``get`` checks every value with :func:`tiers.codec.verify_block` against
  its key; a value that fails is counted in ``stats().corrupt``, dropped and returned as
  ``None``. ``put`` stores values as given (callers verify, as the daemon does).
- Partitions: :meth:`MemoryTier.partition` returns a tier that shares this tier's
  capacity and LRU order but sees only its own keys, so tenants of the daemon share one
  byte budget while staying isolated. Each partition counts its own ``stats()``
  (``blocks``/``bytes_used``/``evictions`` are the blocks of that partition);
  ``extra["pool_blocks"]``/``extra["pool_bytes"]`` describe the whole shared budget.
- Threads: any number of threads may call one tier (and its partitions) at once. One
  lock guards the dict; verification runs outside it.
- Keys that are not 16-byte ``bytes`` are programming errors (``ValueError``). No
  method raises otherwise; after ``close`` calls are misses and no-ops.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from radix.hashing import KEY_BYTES
from tiers.base import PutResult, Take, TierStats, take_each
from tiers.codec import verify_block


def _check_keys(keys: Iterable[bytes]) -> None:
    for key in keys:
        if type(key) is not bytes or len(key) != KEY_BYTES:
            raise ValueError(f"block keys must be {KEY_BYTES} bytes, got {key!r:.60}")


@dataclass
class _Entry:
    """One stored block: its bytes, the size accounted for it, and its partition."""

    value: bytes
    size: int
    owner: MemoryTier


class _Pool:
    """The storage shared by a tier and its partitions: one LRU dict, one byte budget."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.lock = threading.Lock()
        self.entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self.bytes_used = 0
        self.partitions: dict[str, MemoryTier] = {}

    def remove(self, full_key: bytes) -> _Entry | None:
        """Drop one entry with its accounting (caller holds the lock)."""
        entry = self.entries.pop(full_key, None)
        if entry is not None:
            self.bytes_used -= entry.size
            entry.owner._blocks -= 1
            entry.owner._bytes_used -= entry.size
        return entry


class MemoryTier:
    """A :class:`tiers.base.HashTier` in process memory (see the module docstring).

    ``capacity_bytes``: the most bytes of encoded blocks to keep (positive int).
    ``name``: the tier's name in stats. Raises ``ValueError`` for bad arguments.
    """

    def __init__(self, capacity_bytes: int, name: str = "memory") -> None:
        if type(capacity_bytes) is not int or capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be a positive int, got {capacity_bytes!r}")
        self._init(_Pool(capacity_bytes), b"", name)

    def _init(self, pool: _Pool, prefix: bytes, name: str) -> None:
        self.name = name
        self.capacity_bytes = pool.capacity_bytes
        self._pool = pool
        self._prefix = prefix
        self._closed = False
        self._blocks = 0
        self._bytes_used = 0
        self._stats = TierStats(name=name, capacity_bytes=pool.capacity_bytes)
        self._rejected = 0

    def partition(self, namespace: str) -> MemoryTier:
        """The partition for ``namespace``: a tier sharing this one's capacity and LRU
        order whose keys are invisible to every other partition. The same namespace
        always returns the same object. ``namespace`` must be a non-empty str without
        NUL characters (``ValueError``)."""
        if not isinstance(namespace, str) or not namespace or "\x00" in namespace:
            raise ValueError(f"namespace must be a non-empty str without NUL, got {namespace!r}")
        pool = self._pool
        with pool.lock:
            part = pool.partitions.get(namespace)
            if part is None:
                part = MemoryTier.__new__(MemoryTier)
                # 16-byte root keys never collide with prefixed (longer) partition keys
                part._init(pool, namespace.encode() + b"\x00", self.name)
                pool.partitions[namespace] = part
            return part

    # -- public API --------------------------------------------------------------------

    def contains_prefix(self, keys: Sequence[bytes]) -> int:
        """How many of ``keys``, from the first, are stored. Changes neither the access
        order nor any counter; a closed tier answers 0."""
        _check_keys(keys)
        if self._closed:
            return 0
        prefix, entries = self._prefix, self._pool.entries
        count = 0
        with self._pool.lock:
            for key in keys:
                if prefix + key not in entries:
                    break
                count += 1
        return count

    def get_into(self, keys: Sequence[bytes], take: Take) -> list[bool]:
        """:meth:`get`, each block handed to ``take`` (see :class:`tiers.base.HashTier`)."""
        return take_each(self.get(keys), take)

    def get(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Verified encoded blocks in key order; ``None`` for a miss or a corrupt block
        (counted, dropped). Hits become most recently used. Counts per key."""
        _check_keys(keys)
        n = len(keys)
        found: list[_Entry | None] = [None] * n
        if not self._closed:
            prefix, pool = self._prefix, self._pool
            with pool.lock:
                entries = pool.entries
                for i, key in enumerate(keys):
                    entry = entries.get(prefix + key)
                    if entry is not None:
                        entries.move_to_end(prefix + key)
                        found[i] = entry
        out: list[bytes | None] = [None] * n
        bad: list[tuple[bytes, _Entry]] = []
        for i, entry in enumerate(found):
            if entry is None:
                continue
            if verify_block(entry.value, keys[i]):
                out[i] = entry.value
            else:
                bad.append((keys[i], entry))
        hits = sum(v is not None for v in out)
        with self._pool.lock:
            corrupt = 0
            for key, entry in bad:
                full = self._prefix + key
                if self._pool.entries.get(full) is entry:
                    self._pool.remove(full)
                    corrupt += 1
            s = self._stats
            s.gets += n
            s.hits += hits
            s.misses += n - hits
            s.bytes_read += sum(len(v) for v in out if v is not None)
            s.corrupt += corrupt
        return out

    def put(self, items: Sequence[tuple[bytes, bytes]]) -> PutResult:
        """Store ``(key, encoded block)`` pairs in order, evicting least-recently-used
        blocks (of any partition) to stay within the capacity; returns the keys stored.
        A key already stored is replaced; within a batch the last pair for a key wins."""
        _check_keys(key for key, _ in items)
        if not items or self._closed:
            return PutResult()
        pool, prefix = self._pool, self._prefix
        stored = written = rejected = 0
        held: set[bytes] = set()
        with pool.lock:
            for key, value in items:
                value = bytes(value)
                size = len(value)
                if size > pool.capacity_bytes:
                    rejected += 1
                    continue
                full = prefix + key
                pool.remove(full)
                while pool.bytes_used + size > pool.capacity_bytes:
                    oldest_key, oldest = pool.entries.popitem(last=False)
                    pool.bytes_used -= oldest.size
                    owner = oldest.owner
                    owner._blocks -= 1
                    owner._bytes_used -= oldest.size
                    owner._stats.evictions += 1
                    if owner is self:
                        held.discard(oldest_key[len(prefix):])
                pool.entries[full] = _Entry(value, size, self)
                held.add(key)
                pool.bytes_used += size
                self._blocks += 1
                self._bytes_used += size
                stored += 1
                written += size
            self._stats.puts += stored
            self._stats.bytes_written += written
            self._rejected += rejected
        return PutResult.of(items, held)

    def delete(self, keys: Sequence[bytes]) -> None:
        """Remove keys; absent keys are ignored."""
        _check_keys(keys)
        if not keys or self._closed:
            return
        with self._pool.lock:
            for key in keys:
                self._pool.remove(self._prefix + key)

    def stats(self) -> TierStats:
        """A snapshot of this tier's (or partition's) counters; no I/O.

        ``extra``: ``rejected`` (blocks larger than the capacity, not stored),
        ``pool_blocks`` and ``pool_bytes`` (contents of the whole shared budget).
        """
        with self._pool.lock:
            s = self._stats
            snap = TierStats(name=s.name, blocks=self._blocks, bytes_used=self._bytes_used,
                             capacity_bytes=s.capacity_bytes, gets=s.gets, hits=s.hits,
                             misses=s.misses, puts=s.puts, bytes_read=s.bytes_read,
                             bytes_written=s.bytes_written, evictions=s.evictions,
                             corrupt=s.corrupt, errors=s.errors)
            snap.extra = {"rejected": float(self._rejected),
                          "pool_blocks": float(len(self._pool.entries)),
                          "pool_bytes": float(self._pool.bytes_used)}
        return snap

    def close(self) -> None:
        """Drop this tier's (or partition's) blocks; later calls are misses and no-ops.
        Closing twice is a no-op. Other partitions keep working."""
        pool = self._pool
        with pool.lock:
            if self._closed:
                return
            self._closed = True
            mine = [k for k, e in pool.entries.items() if e.owner is self]
            for full in mine:
                pool.remove(full)

    def __enter__(self) -> MemoryTier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        part = f", partition={self._prefix[:-1].decode()!r}" if self._prefix else ""
        return f"MemoryTier(capacity_bytes={self.capacity_bytes}, name={self.name!r}{part})"

    # -- test hook -----------------------------------------------------------------------

    def _raw_put(self, key: bytes, value: bytes) -> None:
        """Test hook: overwrite the stored bytes of ``key`` without verification or
        accounting (the old size stays accounted). Used to simulate memory damage."""
        with self._pool.lock:
            entry = self._pool.entries.get(self._prefix + key)
            if entry is not None:
                entry.value = value


__all__ = ["MemoryTier"]
