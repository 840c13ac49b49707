"""The daemon's tiers for every namespace, and the four batch operations on them.

Tiers, fastest first (each optional, at least one):

- ``memory``: host DRAM, an in-process LRU dict (``tiers.memory.MemoryTier``) of
  ``memory_bytes``, one budget shared by every namespace.
- ``disk``: LMDB (``tiers.lmdb.LMDBTier``), one environment per namespace in
  ``disk_path/<namespace>``, each holding at most ``disk_bytes``.
- ``redis``: Redis or Redis Cluster (``tiers.redis.RedisTier``), keys prefixed
  ``<namespace>:`` (the same keys a ``RedisTier`` with that namespace uses).

Lookups go through the tiers in that order; a block found in a lower tier is copied into
the memory tier. Puts write through to every tier and report how many blocks the
durable tiers (:attr:`DaemonConfig.durable_tiers`) now hold; deletes remove from every
tier.

A namespace whose storage cannot be opened (a damaged or unwritable LMDB environment)
is that namespace's problem only: its requests are answered 503 and the daemon tries to
open it again after ``reopen_interval_s``; every other namespace is served.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kvstore.daemon.config import DaemonConfig
from kvstore.service import HTTPError
from kvstore.tier_metrics import sum_counters, tier_counters
from tiers.base import HashTier, TierStats
from tiers.memory import MemoryTier

logger = logging.getLogger("kvstore.daemon")

StatsDict = dict[str, object]


@dataclass
class NamespaceTiers:
    """The tiers of one namespace, fastest first; ``memory`` is also in ``tiers``;
    ``durable`` are the tiers whose contents a put's ``stored`` counts."""

    namespace: str
    tiers: list[HashTier]
    memory: HashTier | None
    durable: list[HashTier]


@dataclass(frozen=True)
class _Broken:
    """A namespace whose storage failed to open: why, and when it may be tried again."""

    reason: str
    retry_at: float


def _corrupt_delta(tier: HashTier, before: int, misses: int) -> int:
    """Blocks this tier found corrupt since ``before`` was read, at most ``misses``."""
    return max(0, min(misses, tier.stats().corrupt - before))


def held(tier: HashTier, keys: Sequence[bytes]) -> list[bool]:
    """Which of ``keys`` ``tier`` holds, one ``contains_prefix`` call per run of held
    keys (a put's keys are usually one chain: one call)."""
    out = [False] * len(keys)
    pos = 0
    while pos < len(keys):
        count = tier.contains_prefix(keys[pos:])
        for i in range(pos, pos + count):
            out[i] = True
        pos += count + 1  # keys[pos + count] is absent
    return out


class Backend:
    """The daemon's tiers for every namespace (module docstring). Blocking (LMDB,
    Redis): the daemon calls it from worker threads. Thread-safe.

    Namespaces are opened on first use (or at construction when ``config.namespaces``
    is set); opening more than ``config.namespace_limit`` is a 403 :class:`HTTPError`,
    a namespace whose storage failed to open a 503. Raises ``OSError`` at
    construction only when the disk root itself is not a writable directory.
    """

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._open_ns: dict[str, NamespaceTiers] = {}
        self._broken: dict[str, _Broken] = {}
        self._closed = False
        self.memory = MemoryTier(config.memory_bytes) if config.memory_bytes else None
        if config.disk_path is not None:
            Path(config.disk_path).mkdir(parents=True, exist_ok=True)
            if not os.access(config.disk_path, os.W_OK | os.X_OK):
                raise OSError(f"disk path {config.disk_path} is not writable")
        for ns in config.namespaces or ():
            with contextlib.suppress(HTTPError):  # logged; answered 503 until it opens
                self.namespace(ns)

    def namespace(self, name: str) -> NamespaceTiers:
        """The tiers of namespace ``name`` (a valid, allowed name), opening them if
        needed. :class:`HTTPError` 403 at the namespace limit, 503 while its storage
        cannot be opened or the daemon is closing."""
        tiers = self._open_ns.get(name)
        if tiers is not None:
            return tiers
        with self._lock:
            tiers = self._open_ns.get(name)
            if tiers is not None:
                return tiers
            if self._closed:
                raise HTTPError(503, "daemon is shutting down", {"Retry-After": "1"})
            broken = self._broken.get(name)
            now = time.monotonic()
            if broken is not None and now < broken.retry_at:
                raise self._unavailable(name, broken)
            if broken is None and len(self._open_ns) >= self.config.namespace_limit:
                raise HTTPError(403, f"namespace limit reached: {len(self._open_ns)} "
                                "namespaces are open (raise --max-namespaces or list "
                                "them with --namespaces)")
            try:
                tiers = self._open(name)
            except Exception as exc:  # OSError, lmdb.Error: this namespace only
                broken = _Broken(f"{type(exc).__name__}: {exc}",
                                 now + self.config.reopen_interval_s)
                self._broken[name] = broken
                logger.error("cannot open the storage of namespace %r: %s; answering 503 "
                             "for it, retrying in %.0f s", name, broken.reason,
                             self.config.reopen_interval_s)
                raise self._unavailable(name, broken) from None
            if self._broken.pop(name, None) is not None:
                logger.warning("namespace %r: storage opened after earlier failures", name)
            self._open_ns[name] = tiers
            logger.info("opened namespace %r", name)
            return tiers

    def _unavailable(self, name: str, broken: _Broken) -> HTTPError:
        wait = max(1, round(broken.retry_at - time.monotonic()))
        return HTTPError(503, f"cannot open the storage of namespace {name!r} (logged by "
                         "the daemon); other namespaces are served", {"Retry-After": str(wait)})

    def _open(self, namespace: str) -> NamespaceTiers:
        config = self.config
        tiers: list[HashTier] = []
        memory = self.memory.partition(namespace) if self.memory is not None else None
        if memory is not None:
            tiers.append(memory)
        try:
            if config.disk_path is not None:
                from tiers.lmdb import LMDBTier
                tiers.append(LMDBTier(Path(config.disk_path) / namespace, config.disk_bytes))
            if config.redis_url is not None:
                from tiers.redis import RedisTier
                tiers.append(RedisTier(config.redis_url, ttl_s=config.redis_ttl_s,
                                       namespace=namespace))
        except BaseException:
            for tier in tiers:
                if tier is not memory:
                    tier.close()
            raise
        durable = [t for t in tiers if t.name in config.durable_tiers]
        return NamespaceTiers(namespace, tiers, memory, durable)

    def namespaces(self) -> dict[str, NamespaceTiers]:
        """A snapshot of the open namespaces."""
        with self._lock:
            return dict(self._open_ns)

    def broken(self) -> dict[str, str]:
        """Namespaces whose storage failed to open, and why."""
        with self._lock:
            return {name: b.reason for name, b in self._broken.items()}

    # -- the four operations (blocking) -------------------------------------------------

    def exists(self, ns: NamespaceTiers, keys: list[bytes]) -> int:
        """How many of ``keys``, from the first, some tier holds (each key in any tier)."""
        pos, n = 0, len(keys)
        progress = True
        while progress and pos < n:
            progress = False
            for tier in ns.tiers:
                count = tier.contains_prefix(keys[pos:])
                if count:
                    pos += count
                    progress = True
                    if pos == n:
                        break
        return pos

    def get(self, ns: NamespaceTiers, keys: list[bytes]) -> tuple[list[bytes | None], int]:
        """Blocks in key order (``None`` = miss) and how many were found corrupt.
        Blocks found below the memory tier are copied into it."""
        values: list[bytes | None] = [None] * len(keys)
        pending = list(range(len(keys)))
        corrupt = 0
        fill: list[tuple[bytes, bytes]] = []
        for tier in ns.tiers:
            if not pending:
                break
            before = tier.stats().corrupt
            got = tier.get([keys[i] for i in pending])
            missing = []
            for i, value in zip(pending, got):
                if value is None:
                    missing.append(i)
                else:
                    values[i] = value
                    if tier is not ns.memory:
                        fill.append((keys[i], value))
            corrupt += _corrupt_delta(tier, before, len(missing))
            pending = missing
        if fill and ns.memory is not None:
            ns.memory.put(fill)
        return values, corrupt

    def put(self, ns: NamespaceTiers, items: list[tuple[bytes, bytes]]) -> int:
        """Write verified pairs to the durable tiers, then to the memory tier in front
        of them only the pairs a durable tier now holds (so a put that stored nothing
        changes nothing); returns how many of them the durable tiers hold (a block
        counts once, held by any durable tier). A tier that refused or failed a write
        (full, down) holds nothing it was not given before."""
        for tier in ns.durable:
            tier.put(items)
        keys = [key for key, _ in items]
        stored = [False] * len(keys)
        for tier in ns.durable:
            stored = [a or b for a, b in zip(stored, held(tier, keys))]
        kept = [item for item, ok in zip(items, stored, strict=True) if ok]
        for tier in ns.tiers:
            if kept and tier not in ns.durable:
                tier.put(kept)
        return len(kept)

    def delete(self, ns: NamespaceTiers, keys: list[bytes]) -> int:
        """Remove keys from every tier; returns how many distinct keys were named."""
        for tier in ns.tiers:
            tier.delete(keys)
        return len(set(keys))

    # -- stats ---------------------------------------------------------------------------

    def tier_stats(self) -> dict[str, StatsDict]:
        """Per tier kind, counters summed over the open namespaces (JSON-ready)."""
        per_kind: dict[str, list[TierStats]] = {name: [] for name in self.config.tier_names}
        for ns in self.namespaces().values():
            for tier in ns.tiers:
                per_kind[tier.name].append(tier.stats())
        out: dict[str, StatsDict] = {}
        for name, snaps in per_kind.items():
            total = sum_counters(snaps)
            if name == "memory" and self.memory is not None:
                pool = self.memory.stats().extra
                total["blocks"] = int(pool["pool_blocks"])
                total["bytes_used"] = int(pool["pool_bytes"])
                total["capacity_bytes"] = self.memory.capacity_bytes
                extra = total["extra"]
                assert isinstance(extra, dict)
                extra.pop("pool_blocks", None)
                extra.pop("pool_bytes", None)
            elif name == "disk":
                total["capacity_bytes"] = self.config.disk_bytes * len(snaps)
            out[name] = total
        return out

    def namespace_stats(self) -> dict[str, dict[str, StatsDict]]:
        """Per open namespace, each tier's own counters (JSON-ready)."""
        return {name: {tier.name: tier_counters(tier.stats()) for tier in ns.tiers}
                for name, ns in sorted(self.namespaces().items())}

    def close(self) -> None:
        """Close every tier (LMDB saves pending access stamps). Idempotent."""
        with self._lock:
            self._closed = True
            opened, self._open_ns = list(self._open_ns.values()), {}
        for ns in opened:
            for tier in ns.tiers:
                try:
                    tier.close()
                except Exception:  # keep closing the others; report the failure
                    logger.exception("closing tier %r of namespace %r failed", tier.name,
                                     ns.namespace)
        if self.memory is not None:
            self.memory.close()
