"""The router's approximate global index: block key -> {replica id: tier mask}.

Fed by KV events (:mod:`kvstore.events`); a lost event only makes it stale (a route
that misses, never a failed request). Block keys are chained hashes (a key names its
whole prefix), so a flat dict answers prefix queries: walk the request's keys in
order while a replica holds each one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kvstore.events import LOCAL_TIERS, TIERS, Event
from radix import IntegrityError

_FASTEST = [min((t for t in range(len(TIERS)) if m >> t & 1), default=-1)
            for m in range(1 << len(TIERS))]
"""Mask of tiers -> code of the fastest tier in it (codes are ordered fastest first)."""


@dataclass(frozen=True)
class PrefixHit:
    """What one replica holds of a request's prefix: ``blocks`` leading blocks, counted
    by the fastest tier holding each (``by_tier``: tier name -> blocks)."""

    blocks: int
    by_tier: dict[str, int]


class GlobalIndex:
    """Which replica holds which block, in which tiers. Not thread-safe (the router's
    event loop is its only user)."""

    def __init__(self) -> None:
        self._blocks: dict[bytes, dict[str, int]] = {}
        self._held: Counter[tuple[str, str]] = Counter()  # (replica, tier) -> blocks

    def __len__(self) -> int:
        return len(self._blocks)

    def apply(self, replica: str, events: Iterable[Event]) -> int:
        """Apply one batch of ``replica``'s events; returns how many were applied."""
        n = 0
        blocks = self._blocks
        for ev in events:
            n += 1
            if ev.op == "cleared":
                self.clear(replica)
                continue
            bit = 1 << TIERS.index(ev.tier)
            entry = blocks.get(ev.key)
            if ev.op == "stored":
                if entry is None:
                    entry = blocks[ev.key] = {}
                mask = entry.get(replica, 0)
                if not mask & bit:
                    entry[replica] = mask | bit
                    self._held[(replica, ev.tier)] += 1
            elif entry is not None:  # removed
                mask = entry.get(replica, 0)
                if mask & bit:
                    self._held[(replica, ev.tier)] -= 1
                    if mask == bit:
                        del entry[replica]
                        if not entry:
                            del blocks[ev.key]
                    else:
                        entry[replica] = mask & ~bit
        return n

    def clear(self, replica: str) -> None:
        """Forget everything ``replica`` held (it restarted). O(index)."""
        for key in [k for k, e in self._blocks.items() if replica in e]:
            entry = self._blocks[key]
            del entry[replica]
            if not entry:
                del self._blocks[key]
        for rt in [rt for rt in self._held if rt[0] == replica]:
            del self._held[rt]

    def match(self, keys: Sequence[bytes], replicas: Iterable[str]) -> dict[str, PrefixHit]:
        """For each of ``replicas``: the leading blocks of ``keys`` it holds.

        O(matched blocks x replicas holding them); stops at the first block no
        candidate holds."""
        active = set(replicas)
        counts: dict[str, list[int]] = {r: [0] * len(TIERS) for r in active}
        blocks = self._blocks
        for key in keys:
            entry = blocks.get(key)
            if entry is None:
                break
            active.intersection_update(entry)
            if not active:
                break
            for r in active:
                counts[r][_FASTEST[entry[r]]] += 1
        return {r: PrefixHit(sum(c), {TIERS[t]: n for t, n in enumerate(c) if n})
                for r, c in counts.items()}

    def held(self, replica: str) -> dict[str, int]:
        """Blocks ``replica`` holds per tier, by its events."""
        return {t: self._held[(replica, t)] for t in LOCAL_TIERS if self._held[(replica, t)]}

    def check_integrity(self) -> None:
        """Per-(replica, tier) counts equal the entries; no empty entry or mask."""
        seen: Counter[tuple[str, str]] = Counter()
        for key, entry in self._blocks.items():
            if not entry:
                raise IntegrityError(f"empty entry for block {key.hex()}")
            for replica, mask in entry.items():
                if not mask:
                    raise IntegrityError(f"empty tier mask for {replica} at {key.hex()}")
                for t, name in enumerate(TIERS):
                    if mask >> t & 1:
                        seen[(replica, name)] += 1
        if +seen != +self._held:
            raise IntegrityError(f"held counts {dict(self._held)} != entries {dict(seen)}")
