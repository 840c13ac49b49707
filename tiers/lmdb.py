"""LMDB as the local, persistent, hash-addressed tier of encoded KV blocks ("disk").

One LMDB environment (a directory) with four named databases:

    ``blocks``  key (16 bytes) -> encoded block (``tiers.codec``)
    ``index``   key -> access stamp (u64 big-endian) + value size in bytes (u64 BE)
    ``lru``     access stamp (u64 big-endian) + key -> b""    (ordered oldest first)
    ``meta``    ``b"format"`` -> layout version of this file, ``b"bytes_used"`` -> u64 LE

All four change in the same write transaction, so the access order, the byte count and
the blocks always agree, after a crash too, and the least-recently-used order survives
a reopen.

Contracts:

- Capacity: ``capacity_bytes`` bounds the sum of stored encoded block sizes (bytes; LMDB's
  own page overhead comes on top, bounded by ``map_size``). A put that would exceed it
  evicts least-recently-used blocks first, in the same transaction; a block larger than
  the capacity is not stored (``stats().extra["rejected"]``).
- No room: when LMDB's map is full (``MDB_MAP_FULL``: fragmentation, old readers pinning
  pages) or the filesystem is (``ENOSPC``, which LMDB may report as an I/O error; told
  apart from a real I/O error by the free space ``statvfs`` reports), the tier commits a
  transaction that evicts the oldest blocks, retries, and keeps serving within the room
  it has; when space returns, the file grows again without any action. Each kind of
  episode is logged once when it starts (and a full filesystem once when it ends);
  every occurrence is counted in ``stats().extra`` (``map_full``, ``disk_full``).
- Put results: ``put`` returns a :class:`tiers.base.PutResult` naming exactly the keys
  committed (and not evicted again by the same call); a pair dropped for lack of room,
  size or an LMDB error is not in it.
- Access order: ``get`` stamps every hit. Stamps are kept in memory and written in the
  next write transaction (before any eviction, so eviction order is exact), when
  :data:`TOUCH_FLUSH_BLOCKS` are pending, and at ``close``. A crash loses only pending
  stamps, never blocks. (Measured: a synced write transaction per ``get`` batch of 16
  SmolLM2 blocks cut get throughput 4.7x, 6.1 -> 1.3 GB/s.)
- Verification: ``get`` checks every value with :func:`tiers.codec.verify_block` against
  its key; a value that fails is counted in ``stats().corrupt``, deleted and returned as
  ``None``.
- Damaged records: an ``index`` record, ``lru`` key or ``bytes_used`` record that does not
  parse is a miss for its key (``get``, ``contains_prefix``), removed with its block in
  the next write transaction, counted in ``stats().corrupt`` and logged once per tier
  (later ones at debug level); a damaged ``bytes_used`` is recomputed from the index.
  No method raises for one.
- Damaged environment: before LMDB maps ``data.mdb`` the tier runs
  :func:`tiers.lmdb_check.check_environment` (metadata always; a walk in a child process
  after an unclean close). A damaged environment, or one LMDB or the ``format`` record
  reports damaged at open, is moved aside (``data.mdb.damaged-<UTC time>`` in the same
  directory) with one warning, and the tier starts empty. ``close`` leaves the
  clean-close marker that lets the next open skip the walk, unless this tier saw LMDB
  report damage while it ran.
- Durability: every write transaction is committed with LMDB's default sync (fsync), so
  a block whose ``put`` returned is intact after a crash or SIGKILL.
- Failures: after a successful open, no method raises for an LMDB error: reads become
  misses, writes are dropped, and each failed operation counts in ``stats().errors``.
  Keys that are not 16-byte ``bytes`` are programming errors (``ValueError``).
- Threads: any number of threads may call one tier at once. Reads run in parallel
  read transactions; writers are serialized by a lock. ``close`` waits for calls in
  flight. Within one process only one ``LMDBTier`` may open a given directory (an LMDB
  rule); several processes may share it, with accounting exact and access order
  approximate across processes.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import lmdb

from radix.hashing import KEY_BYTES
from tiers.base import PutResult, Take, TierStats
from tiers.codec import verify_block
from tiers.lmdb_check import CHECK_TIMEOUT_S, Damaged, check_environment, mark_clean, quarantine

logger = logging.getLogger(__name__)

STORE_FORMAT = 1
"""Version of the database layout above; a directory with another version is refused."""

TOUCH_FLUSH_BLOCKS = 4096
"""Pending access stamps that trigger a write transaction from ``get``."""

MAP_FULL_RETRIES = 8
"""Attempts to make room (full map or full filesystem) before a put is split or dropped."""

ROOM_SLACK_BYTES = 1 << 20
"""Free filesystem bytes, beyond a transaction's own values, below which a failed commit
is read as "filesystem full" rather than an I/O error."""

_STAMP = struct.Struct(">Q")
_INDEX = struct.Struct(">QQ")
_U64 = struct.Struct("<Q")
_LRU_KEY_BYTES = _STAMP.size + KEY_BYTES
_BYTES_USED = b"bytes_used"
_FORMAT = b"format"

_DAMAGE_ERRORS = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError,
                  lmdb.VersionMismatchError, lmdb.IncompatibleError, lmdb.PanicError,
                  lmdb.BadValsizeError)
"""LMDB errors that mean the file is damaged (not full, locked or unreadable)."""

T = TypeVar("T")


def _check_keys(keys: Iterable[bytes]) -> None:
    for key in keys:
        if type(key) is not bytes or len(key) != KEY_BYTES:
            raise ValueError(f"block keys must be {KEY_BYTES} bytes, got {key!r:.60}")


def _index_record(raw: bytes | memoryview) -> tuple[int, int] | None:
    """``(stamp, size in bytes)`` of an ``index`` value, ``None`` if it is damaged."""
    if len(raw) != _INDEX.size:
        return None
    return _INDEX.unpack(raw)


class _EnvironmentDamaged(Exception):
    """Raised inside ``LMDBTier`` open when LMDB or the ``format`` record says the file is
    damaged: the caller moves it aside and opens an empty one."""


class _NoRoom(Exception):
    """A write transaction failed for lack of room: ``kind`` is ``"map"`` (LMDB's map is
    full) or ``"disk"`` (the filesystem is); ``needed``: bytes of values it wrote."""

    def __init__(self, kind: str, needed: int = 0) -> None:
        super().__init__(kind)
        self.kind = kind
        self.needed = needed


class _Txn:
    """The state one write transaction works on: handles, the running byte count, the
    keys it placed and evicted, and the damaged records it removed."""

    def __init__(self, txn: lmdb.Transaction[bytes], tier: LMDBTier) -> None:
        self.txn = txn
        self.blocks, self.index, self.lru = tier._blocks, tier._index, tier._lru
        self.placed: set[bytes] = set()
        self.evicted: set[bytes] = set()
        self.damaged: list[str] = []
        self.orphans: set[bytes] = set()
        raw = txn.get(_BYTES_USED, db=tier._meta)
        if raw is None:
            self.bytes_used = 0
        elif len(raw) == _U64.size:
            self.bytes_used = _U64.unpack(raw)[0]
        else:
            self.damaged.append(f"bytes_used record of {len(raw)} bytes (recounted)")
            self.bytes_used = self.recount()
        cursor = txn.cursor(db=self.lru)
        self.lru_cursor = cursor
        last = 0
        while cursor.last():  # the newest stamp; damaged keys on the way are removed
            key = cursor.key()
            if len(key) == _LRU_KEY_BYTES:
                last = _STAMP.unpack(key[:8])[0]
                break
            cursor.delete()
            self.damaged.append(f"lru key of {len(key)} bytes")
        with tier._state:
            tier._next_stamp = max(tier._next_stamp, last + 1)

    @property
    def evictions(self) -> int:
        return len(self.evicted)

    def recount(self) -> int:
        """Sum of the sizes in the ``index``; damaged index records are removed with
        their blocks on the way."""
        total = 0
        bad = []
        for key, raw in self.txn.cursor(db=self.index):
            record = _index_record(raw)
            if record is None:
                bad.append((key, len(raw)))
            else:
                total += record[1]
        for key, length in bad:
            self.txn.delete(key, db=self.index)
            self.txn.delete(key, db=self.blocks)
            self.damaged.append(f"index record of {length} bytes for key {key.hex()}")
            self.orphans.add(key)
        return total

    def _forget(self, key: bytes, size: int) -> None:
        self.bytes_used = max(0, self.bytes_used - size)
        self.placed.discard(key)

    def _remove_damaged(self, key: bytes, raw: bytes) -> None:
        """Drop ``key`` whose index record ``raw`` does not parse, with its block; its
        ``lru`` entry (whose stamp is lost) goes in :meth:`finish`."""
        self.txn.delete(key, db=self.index)
        value = self.txn.pop(key, db=self.blocks)
        self._forget(key, len(value) if value is not None else 0)
        self.damaged.append(f"index record of {len(raw)} bytes for key {key.hex()}")
        self.orphans.add(key)

    def finish(self) -> None:
        """Before commit: remove the ``lru`` entries of keys dropped for a damaged index
        record (one scan of the ``lru`` keys; only after damage), unless the key was
        stored again in this transaction under a new stamp."""
        orphans = self.orphans - self.placed
        if not orphans:
            return
        cursor = self.txn.cursor(db=self.lru)
        found = [lru_key for lru_key in cursor.iternext(values=False)
                 if lru_key[8:] in orphans]
        for lru_key in found:
            self.txn.delete(lru_key, db=self.lru)

    def remove(self, key: bytes) -> bool:
        """Delete ``key`` from all databases with its accounting; False if absent."""
        raw = self.txn.get(key, db=self.index)
        if raw is None:
            return self.txn.delete(key, db=self.blocks)
        record = _index_record(raw)
        if record is None:
            self._remove_damaged(key, raw)
            return True
        stamp, size = record
        self.txn.delete(key, db=self.index)
        self.txn.delete(_STAMP.pack(stamp) + key, db=self.lru)
        self.txn.delete(key, db=self.blocks)
        self._forget(key, size)
        return True

    def evict_oldest(self) -> bool:
        """Evict the least-recently-used block; False when the tier is empty. An ``lru``
        entry that is damaged or no longer matches the index is discarded on the way."""
        cursor = self.lru_cursor
        while cursor.first():
            lru_key = cursor.key()
            cursor.delete()
            if len(lru_key) != _LRU_KEY_BYTES:
                self.damaged.append(f"lru key of {len(lru_key)} bytes")
                continue
            key = lru_key[8:]
            raw = self.txn.get(key, db=self.index)
            if raw is None:
                continue  # left by a removed damaged record
            record = _index_record(raw)
            if record is None:
                self._remove_damaged(key, raw)
                continue
            if _STAMP.pack(record[0]) != lru_key[:8]:
                continue  # stale entry: the key lives on under its current stamp
            self.txn.delete(key, db=self.index)
            self.txn.delete(key, db=self.blocks)
            self._forget(key, record[1])
            self.evicted.add(key)
            return True
        return False

    def touch(self, key: bytes, stamp: int) -> None:
        """Move ``key`` to access stamp ``stamp`` if it is present and older."""
        raw = self.txn.get(key, db=self.index)
        if raw is None:
            return
        record = _index_record(raw)
        if record is None:
            self._remove_damaged(key, raw)
            return
        old, size = record
        if old >= stamp:
            return
        self.txn.delete(_STAMP.pack(old) + key, db=self.lru)
        self.txn.put(_STAMP.pack(stamp) + key, b"", db=self.lru)
        self.txn.put(key, _INDEX.pack(stamp, size), db=self.index)

    def insert(self, key: bytes, value: bytes, stamp: int) -> None:
        """Store a block that is absent from all databases (caller made room)."""
        size = len(value)
        self.txn.put(key, value, db=self.blocks)
        self.txn.put(key, _INDEX.pack(stamp, size), db=self.index)
        self.txn.put(_STAMP.pack(stamp) + key, b"", db=self.lru)
        self.bytes_used += size
        self.placed.add(key)
        self.evicted.discard(key)


class LMDBTier:
    """A :class:`tiers.base.HashTier` on one LMDB environment (see the module docstring).

    ``path``: directory of the environment (created if missing). ``capacity_bytes``: the
    most bytes of encoded blocks to keep. ``name``: the tier's name in stats.
    ``map_size``: LMDB map size in bytes (default ``2 * capacity_bytes + 64 MiB``, room for
    page overhead and free pages that readers still pin). ``check_timeout_s``: bound on
    the open-time verification walk (seconds; see :mod:`tiers.lmdb_check`). Raises
    ``ValueError`` for bad arguments and ``OSError`` when the environment cannot be opened
    (not a directory, no permission, another store format); a damaged environment is not
    an error: it is moved aside and the tier starts empty.
    """

    def __init__(self, path: str | os.PathLike[str], capacity_bytes: int, name: str = "disk",
                 map_size: int | None = None,
                 check_timeout_s: float = CHECK_TIMEOUT_S) -> None:
        if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be a positive int, got {capacity_bytes!r}")
        if map_size is None:
            map_size = 2 * capacity_bytes + (64 << 20)
        if not isinstance(map_size, int) or map_size <= 0:
            raise ValueError(f"map_size must be a positive int of bytes, got {map_size!r}")
        if not isinstance(check_timeout_s, int | float) or not check_timeout_s > 0:
            raise ValueError(f"check_timeout_s must be a positive number of seconds, got "
                             f"{check_timeout_s!r}")
        self.name = name
        self.path = Path(path)
        self.capacity_bytes = capacity_bytes
        self._suspect = False
        """LMDB reported damage while this tier ran: no clean-close marker at close."""
        self._state = threading.Condition(threading.Lock())
        self._next_stamp = 1
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            verdict = check_environment(self.path, check_timeout_s)
            if isinstance(verdict, Damaged):
                self._quarantine(verdict.reason)
            try:
                opened = self._open_env(map_size)
            except _EnvironmentDamaged as exc:
                self._quarantine(str(exc))
                opened = self._open_env(map_size)
        except (lmdb.Error, OSError, _EnvironmentDamaged) as exc:
            raise OSError(f"cannot open LMDB tier {name!r} at {self.path}: {exc}") from exc
        blocks, bytes_used, damaged = opened
        self._write_lock = threading.Lock()
        self._closed = False
        self._active = 0
        self._touches: dict[bytes, int] = {}
        self._stats = TierStats(name=name, blocks=blocks, bytes_used=bytes_used,
                                capacity_bytes=capacity_bytes, corrupt=len(damaged))
        self._extra = {"rejected": 0, "map_full": 0, "disk_full": 0, "touch_flushes": 0}
        self._logged: set[str] = set()
        """Kinds of events already logged once (``damaged``, ``map``, ``disk``)."""
        self._disk_full_need: int | None = None
        """While the filesystem is full: free bytes that mean it has room again."""
        if damaged:
            self._note_damaged(damaged)

    def _open_env(self, map_size: int) -> tuple[int, int, list[str]]:
        """Open the environment and its databases; returns ``(blocks, bytes_used, damaged
        records repaired)`` and sets the next access stamp. Raises :class:`_EnvironmentDamaged` when LMDB
        or the ``format`` record says the file is damaged."""
        env = lmdb.open(str(self.path), map_size=map_size, max_dbs=4, sync=True,
                        metasync=True, lock=True, readahead=True, max_readers=256)
        try:
            env.reader_check()  # free reader slots of dead processes: they pin pages
            self._env = env
            self._blocks = env.open_db(b"blocks")
            self._index = env.open_db(b"index")
            self._lru = env.open_db(b"lru")
            self._meta = env.open_db(b"meta")
            with env.begin(write=True) as raw:
                stored = raw.get(_FORMAT, db=self._meta)
                if stored is None:
                    raw.put(_FORMAT, _U64.pack(STORE_FORMAT), db=self._meta)
                elif len(stored) != _U64.size:
                    raise _EnvironmentDamaged(f"format record of {len(stored)} bytes")
                elif _U64.unpack(stored)[0] != STORE_FORMAT:
                    raise OSError(f"store format {_U64.unpack(stored)[0]}, expected "
                                  f"{STORE_FORMAT}")
                txn = _Txn(raw, self)
                if txn.damaged:
                    txn.finish()
                    raw.put(_BYTES_USED, _U64.pack(txn.bytes_used), db=self._meta)
                blocks = raw.stat(self._index)["entries"]
            return blocks, txn.bytes_used, txn.damaged
        except _DAMAGE_ERRORS as exc:
            env.close()
            raise _EnvironmentDamaged(f"LMDB reports {type(exc).__name__}: {exc}") from exc
        except BaseException:
            env.close()
            raise

    def _quarantine(self, reason: str) -> None:
        """Move the damaged environment aside (one warning) so an empty one opens."""
        moved = quarantine(self.path)
        logger.warning("disk tier %r: LMDB environment %s is damaged (%s); moved aside to "
                       "%s, starting empty", self.name, self.path, reason,
                       moved.name if moved is not None else "nothing")

    # -- public API --------------------------------------------------------------------

    def contains_prefix(self, keys: Sequence[bytes]) -> int:
        """How many of ``keys``, from the first, are stored (one read transaction).

        Looks at the index only, never at block bytes. Does not change access order or
        counters; a closed tier or an LMDB failure answers 0. A damaged index record
        ends the prefix and is removed (see the module docstring).
        """
        _check_keys(keys)
        if not keys or not self._enter():
            return 0
        try:
            count = 0
            damaged: list[bytes] = []
            with self._env.begin(db=self._index, buffers=True) as txn:
                for key in keys:
                    raw = txn.get(key)
                    if raw is None:
                        break
                    if len(raw) != _INDEX.size:
                        damaged.append(key)
                        break
                    count += 1
            if damaged:
                self._write_or_count(lambda t: self._remove_all(t, damaged))
            return count
        except lmdb.Error as exc:
            self._count_error(exc)
            return 0
        finally:
            self._exit()

    def get(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Verified encoded blocks in key order; ``None`` for a miss, a corrupt block, a
        damaged index record or a failure. Counts ``gets``/``hits``/``misses`` per key and
        ``bytes_read``; stamps hits as most recently used; deletes corrupt blocks and
        damaged records. Never raises for LMDB errors or damaged records."""
        out: list[bytes | None] = [None] * len(keys)

        def take(i: int, view: memoryview) -> None:
            out[i] = bytes(view)

        self.get_into(keys, take)
        return out

    def put(self, items: Sequence[tuple[bytes, bytes]]) -> PutResult:
        """Store ``(key, encoded block)`` pairs in one write transaction (split only when
        there is no room even after evicting), evicting least-recently-used blocks to stay
        within ``capacity_bytes``; returns the keys committed. A key already stored is
        replaced; within a batch the last pair for a key wins. Values are stored as given
        (``get`` verifies them). Never raises for LMDB errors or a full disk."""
        _check_keys(key for key, _ in items)
        if not items or not self._enter():
            return PutResult()
        try:
            held: set[bytes] = set()
            self._put_with_room(list(items), held)
            return PutResult.of(items, held)
        finally:
            self._exit()

    def delete(self, keys: Sequence[bytes]) -> None:
        """Remove keys in one write transaction; absent keys are ignored."""
        _check_keys(keys)
        if not keys or not self._enter():
            return
        try:
            self._write_or_count(lambda t: self._remove_all(t, keys))
        finally:
            self._exit()

    def stats(self) -> TierStats:
        """A snapshot of the counters (blocks and bytes; no I/O).

        ``blocks``/``bytes_used`` describe the environment as of this tier's last write
        (exact when one process writes). ``corrupt`` counts values that failed
        verification and damaged records removed. ``extra``: ``rejected`` (blocks larger
        than the capacity, not stored), ``map_full`` and ``disk_full`` (write transactions
        that found LMDB's map or the filesystem full, each followed by an eviction),
        ``touch_flushes`` (write transactions made by ``get`` to save access stamps),
        ``pending_touches``.
        """
        with self._state:
            s = self._stats
            snap = TierStats(name=s.name, blocks=s.blocks, bytes_used=s.bytes_used,
                             capacity_bytes=s.capacity_bytes, gets=s.gets, hits=s.hits,
                             misses=s.misses, puts=s.puts, bytes_read=s.bytes_read,
                             bytes_written=s.bytes_written, evictions=s.evictions,
                             corrupt=s.corrupt, errors=s.errors)
            snap.extra = {k: float(v) for k, v in self._extra.items()}
            snap.extra["pending_touches"] = float(len(self._touches))
        return snap

    def close(self) -> None:
        """Wait for calls in flight, save pending access stamps, close the environment and
        leave the clean-close marker. Later calls are misses and no-ops; closing twice is a
        no-op."""
        with self._state:
            if self._closed:
                return
            self._closed = True
            while self._active:
                self._state.wait()
        try:
            if self._touches:
                self._write_or_count(lambda t: None)
        finally:
            self._env.close()
            if not self._suspect:
                mark_clean(self.path)

    def __enter__(self) -> LMDBTier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LMDBTier({str(self.path)!r}, capacity_bytes={self.capacity_bytes}, name={self.name!r})"

    # -- zero-copy reads for loaders ------------------------------------------------------

    def get_into(self, keys: Sequence[bytes], take: Take) -> list[bool]:
        """:meth:`get` without copying values out: ``take(i, view)`` receives the
        verified value of ``keys[i]`` as a read-only view into the map, valid only during
        the call (copy what you keep). Returns, per key, whether ``take`` got it.

        Counts, stamps hits and deletes corrupt blocks like :meth:`get`; never raises for
        LMDB errors (all misses). For the load path: the copy ``take`` makes (numpy)
        releases the GIL, where ``bytes(view)`` in ``get`` cannot, so loader threads scale.
        An exception from ``take`` propagates (the read transaction is closed first).
        """
        _check_keys(keys)
        n = len(keys)
        if not n or not self._enter():
            with self._state:
                self._stats.gets += n
                self._stats.misses += n
            return [False] * n
        try:
            got, corrupt, damaged, nbytes = self._read(keys, take)
            hits = [key for key, ok in zip(keys, got, strict=True) if ok]
            with self._state:
                stats = self._stats
                stats.gets += n
                stats.hits += len(hits)
                stats.misses += n - len(hits)
                stats.bytes_read += nbytes
                stats.corrupt += len(corrupt)
                touches = self._touches
                for key in hits:
                    touches[key] = self._next_stamp
                    self._next_stamp += 1
                flush = len(touches) >= TOUCH_FLUSH_BLOCKS
            if corrupt or damaged:
                self._write_or_count(lambda t: self._remove_bad(t, corrupt, damaged))
            elif flush:
                self._write_or_count(lambda t: None)
                with self._state:
                    self._extra["touch_flushes"] += 1
            return got
        finally:
            self._exit()

    # -- test hook -----------------------------------------------------------------------

    def _raw_put(self, key: bytes, value: bytes) -> None:
        """Test hook: overwrite the stored bytes of ``key`` without verification or
        accounting (the index keeps the old size). Used to simulate on-disk damage."""
        with self._write_lock, self._env.begin(write=True) as txn:
            txn.put(key, value, db=self._blocks)

    # -- internals -----------------------------------------------------------------------

    def _enter(self) -> bool:
        with self._state:
            if self._closed:
                return False
            self._active += 1
            return True

    def _exit(self) -> None:
        with self._state:
            self._active -= 1
            if not self._active:
                self._state.notify_all()

    def _count_error(self, exc: BaseException | None = None) -> None:
        with self._state:
            self._stats.errors += 1
            if isinstance(exc, _DAMAGE_ERRORS):
                self._suspect = True

    def _read(self, keys: Sequence[bytes], take: Take) -> tuple[list[bool], list[bytes], list[bytes], int]:
        """Hand each verified stored value to ``take(i, view)`` (one read transaction);
        return per key whether it was taken, the keys whose values failed verification,
        the keys whose index record is damaged, and the bytes taken. All misses, counted,
        on an LMDB failure.

        A key is read only when its index record parses (a lookup in a small tree: under
        1 % of a block's read). Each value is verified in place, as a zero-copy view into
        the map, and handed over only if it passed, before the transaction ends. Measured
        on the 2-core CI machine (``kvstore bench tiers``) against letting LMDB copy the
        value out and verifying the copy: 2 MiB blocks 0.99 vs 0.90 of the raw-read-plus-
        checksum floor, 360 KiB blocks alike within noise; and a corrupt value is never
        copied.
        """
        got = [False] * len(keys)
        corrupt: list[bytes] = []
        damaged: list[bytes] = []
        nbytes = 0
        index = self._index
        try:
            with self._env.begin(db=self._blocks, buffers=True) as txn:
                get = txn.get
                for i, key in enumerate(keys):
                    record = get(key, db=index)
                    if record is None:
                        continue
                    if len(record) != _INDEX.size:
                        damaged.append(key)
                        continue
                    view = get(key)
                    if view is None:
                        continue
                    if verify_block(view, key):
                        take(i, view)
                        got[i] = True
                        nbytes += len(view)
                    else:
                        corrupt.append(key)
        except lmdb.Error as exc:
            self._count_error(exc)
            return [False] * len(keys), [], [], 0
        return got, corrupt, damaged, nbytes

    def _disk_is_full(self, exc: lmdb.Error, needed: int) -> bool:
        """Whether a failed write transaction failed for lack of filesystem space: LMDB
        says ``ENOSPC``, or (a short write is reported as ``EIO``) the filesystem has less
        free space than the transaction's values plus :data:`ROOM_SLACK_BYTES`."""
        if isinstance(exc, lmdb.DiskError):
            return True
        try:
            st = os.statvfs(self.path)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < needed + ROOM_SLACK_BYTES

    def _write(self, body: Callable[[_Txn], T], needed: int = 0) -> T | None:
        """Run ``body`` in one write transaction after applying pending access stamps.

        Commits, then publishes the new byte and block counts and the damaged records it
        removed. On an LMDB error the transaction is aborted, the stamps are put back,
        the error is counted and ``None`` returned; a full map or filesystem raises
        :class:`_NoRoom` instead (``needed``: bytes of values the body writes).
        """
        with self._write_lock:
            with self._state:
                touches, self._touches = self._touches, {}
            try:
                with self._env.begin(write=True) as raw:
                    txn = _Txn(raw, self)
                    for key, stamp in touches.items():
                        txn.touch(key, stamp)
                    result = body(txn)
                    txn.finish()
                    raw.put(_BYTES_USED, _U64.pack(txn.bytes_used), db=self._meta)
                    blocks = raw.stat(self._index)["entries"]
            except lmdb.Error as exc:
                full = None
                if isinstance(exc, lmdb.MapFullError):
                    full = "map"
                elif self._disk_is_full(exc, needed):
                    full = "disk"
                with self._state:
                    for key, stamp in touches.items():
                        self._touches.setdefault(key, stamp)
                    if full is not None:
                        self._extra[f"{full}_full"] += 1
                    else:
                        self._stats.errors += 1
                        if isinstance(exc, _DAMAGE_ERRORS):
                            self._suspect = True
                if full is not None:
                    raise _NoRoom(full, needed) from exc
                return None
            with self._state:
                self._stats.bytes_used = txn.bytes_used
                self._stats.blocks = blocks
                self._stats.evictions += txn.evictions
                self._stats.corrupt += len(txn.damaged)
                recovering = self._disk_full_need is not None
            if txn.damaged:
                self._note_damaged(txn.damaged)
            if recovering:
                self._check_space_returned()
            return result

    def _write_or_count(self, body: Callable[[_Txn], object]) -> None:
        """:meth:`_write` for transactions that only touch or delete: no room there is an
        error to count, not a reason to evict."""
        try:
            self._write(body)
        except _NoRoom:
            self._count_error()

    def _note_damaged(self, what: list[str]) -> None:
        """Log the first damaged record of this tier (the rest at debug level)."""
        with self._state:
            first = "damaged" not in self._logged
            self._logged.add("damaged")
        log = logger.warning if first else logger.debug
        log("disk tier %r: removed %d damaged record(s) at %s (%s)%s", self.name, len(what),
            self.path, "; ".join(what[:3]),
            "; further damaged records are counted in stats().corrupt" if first else "")

    def _note_room(self, full: _NoRoom) -> None:
        """Log the start of a "no room" episode once (``map`` or ``disk``)."""
        with self._state:
            first = full.kind not in self._logged
            self._logged.add(full.kind)
            if full.kind == "disk":
                # room again: the free space whose absence made this write fail
                need = full.needed + ROOM_SLACK_BYTES
                self._disk_full_need = max(self._disk_full_need or 0, need)
        if not first:
            return
        if full.kind == "disk":
            logger.warning("disk tier %r: the filesystem of %s is full; evicting the oldest "
                           "blocks to make room and serving within the space the file has "
                           "(counted in stats().extra['disk_full'])", self.name, self.path)
        else:
            logger.warning("disk tier %r: the LMDB map of %s is full; evicting the oldest "
                           "blocks to make room (counted in stats().extra['map_full']; "
                           "a larger map_size avoids it)", self.name, self.path)

    def _check_space_returned(self) -> None:
        """After a full filesystem: once ``statvfs`` shows the free space the failed writes
        lacked (their values plus :data:`ROOM_SLACK_BYTES`), log that space has returned;
        the next full filesystem is logged again. The tier's own writes only shrink free
        space, so only space freed by someone else ends an episode (no flapping)."""
        try:
            st = os.statvfs(self.path)
        except OSError:
            return
        with self._state:
            need = self._disk_full_need
            if need is None or st.f_bavail * st.f_frsize < need:
                return
            self._disk_full_need = None
            self._logged.discard("disk")
        logger.warning("disk tier %r: the filesystem of %s has room again; the tier grows "
                       "again", self.name, self.path)

    def _remove_bad(self, txn: _Txn, corrupt: Iterable[bytes], damaged: Iterable[bytes]
                    ) -> None:
        """Delete keys whose stored value (re-read in this transaction) still fails
        verification, so a good block put since the read is kept, and keys whose index
        record is still damaged."""
        for key in corrupt:
            value = txn.txn.get(key, db=txn.blocks)
            if value is not None and not verify_block(value, key):
                txn.remove(key)
        for key in damaged:
            raw = txn.txn.get(key, db=txn.index)
            if raw is not None and _index_record(raw) is None:
                txn.remove(key)

    @staticmethod
    def _remove_all(txn: _Txn, keys: Iterable[bytes]) -> None:
        for key in keys:
            txn.remove(key)

    def _put_in(self, txn: _Txn, items: list[tuple[bytes, bytes]]) -> tuple[int, int]:
        """Insert ``items`` evicting LRU blocks as needed; returns (stored, bytes)."""
        capacity = self.capacity_bytes
        stored = nbytes = rejected = 0
        with self._state:
            stamp = self._next_stamp
            self._next_stamp += len(items)
        for key, value in items:
            size = len(value)
            txn.remove(key)
            if size > capacity:
                rejected += 1
                continue
            while txn.bytes_used + size > capacity and txn.evict_oldest():
                pass
            txn.insert(key, value, stamp)
            stamp += 1
            stored += 1
            nbytes += size
        if rejected:
            with self._state:
                self._extra["rejected"] += rejected
        return stored, nbytes

    def _evict_bytes(self, target: int, held: set[bytes]) -> bool:
        """Evict LRU blocks totalling at least ``target`` bytes (or all) in their own
        transaction, which commits even when it evicts nothing; when even that finds no
        room, evict a single block. Evicted keys leave ``held``. Returns whether an
        eviction transaction committed."""
        for goal in (target, 1):
            def body(txn: _Txn, goal: int = goal) -> set[bytes]:
                before = txn.bytes_used
                while before - txn.bytes_used < goal and txn.evict_oldest():
                    pass
                return set(txn.evicted)

            try:
                gone = self._write(body)
            except _NoRoom as exc:
                self._note_room(exc)
                continue
            if gone is None:
                return False
            held -= gone
            return True
        return False

    def _put_with_room(self, items: list[tuple[bytes, bytes]], held: set[bytes]) -> None:
        """Put ``items``, adding the keys committed to ``held`` (and removing keys this
        call evicted); with no room, evict and retry, then split the batch, then drop.

        Pages freed by a commit become reusable only two commits later (LMDB keeps the
        previous snapshot intact), so every retry first commits an eviction transaction,
        evicting twice as much as the last one (it may evict nothing and still commit).
        When not even an eviction can commit, the batch is dropped (counted in
        ``errors``) rather than split into more transactions that cannot commit either.
        """
        def body(txn: _Txn) -> tuple[int, int, set[bytes], set[bytes]]:
            stored, nbytes = self._put_in(txn, items)
            return stored, nbytes, set(txn.placed), set(txn.evicted)

        target = sum(len(value) for _, value in items)
        for _ in range(MAP_FULL_RETRIES):
            try:
                done = self._write(body, needed=target)
            except _NoRoom as exc:
                self._note_room(exc)
                if not self._evict_bytes(target, held):
                    self._count_error()
                    return
                target *= 2
                continue
            if done is not None:
                stored, nbytes, placed, evicted = done
                held -= evicted
                held |= placed
                with self._state:
                    self._stats.puts += stored
                    self._stats.bytes_written += nbytes
            return
        if len(items) > 1:
            half = len(items) // 2
            self._put_with_room(items[:half], held)
            self._put_with_room(items[half:], held)
            return
        self._count_error()
