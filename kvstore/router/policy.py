"""Choosing a replica: by cached prefix weighted by tier against load, round-robin, or
least load.

``prefix`` scores each healthy replica by the prefill work a request would wait for
there, in blocks (fewer is better; the score is its negative)::

    score = sum(weight[tier] * blocks held in that tier)      # prefill it saves there
            - pending_blocks                                  # prefill queued there
            - load_weight * in_flight                         # decoding there

where the blocks are the request's leading blocks the replica holds (by the KV events;
each block counted in its fastest tier; a tier's weight is the share of a block's
prefill that holding it there saves), ``pending_blocks`` the uncached prompt blocks of
requests the router has sent the replica that have not yet answered their first byte
(the prefill queued ahead of this request), and ``in_flight`` the requests sent and not
finished. The request's own prompt length is the same everywhere and drops out. The
highest score wins; ties go to the least loaded, then round-robin: a replica holding the
prefix wins unless the prefill queued on it exceeds what it saves. A long shared prefix
(a system prompt cached on one replica) would outweigh any load; so a replica with more
than ``max_imbalance`` requests in flight beyond the least loaded one is not chosen while
another is in reach.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from kvstore.router.index import PrefixHit

POLICIES = ("prefix", "round-robin", "least-load")
DEFAULT_WEIGHTS = {"gpu": 1.0, "host": 0.8, "disk": 0.5}


@dataclass(frozen=True)
class PolicyConfig:
    """How replicas are chosen. ``weights``: tier -> value of one cached block there
    (tiers not named count 0): the share of a block's prefill that holding it there
    saves; ``load_weight``: blocks one in-flight request costs."""

    policy: str = "prefix"
    weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    load_weight: float = 4.0
    max_imbalance: int = 8

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"--policy must be one of {', '.join(POLICIES)}, got "
                             f"{self.policy!r}")
        for tier, w in self.weights.items():
            if tier not in DEFAULT_WEIGHTS:
                raise ValueError(f"--tier-weights: unknown tier {tier!r} (tiers: "
                                 f"{', '.join(DEFAULT_WEIGHTS)})")
            if not w >= 0:
                raise ValueError(f"--tier-weights: {tier} must be >= 0, got {w}")
        if not self.load_weight >= 0:
            raise ValueError(f"--load-weight must be >= 0, got {self.load_weight}")
        if self.max_imbalance < 0:
            raise ValueError(f"--max-imbalance must be >= 0, got {self.max_imbalance}")


@dataclass(frozen=True)
class Candidate:
    """A healthy replica the request may go to: its name, requests in flight, and
    ``pending_blocks``: uncached prompt blocks of its requests not yet past their first
    byte (prefill queued there)."""

    name: str
    in_flight: int
    pending_blocks: float = 0.0


@dataclass(frozen=True)
class Decision:
    """Where a request goes and why: ``reason`` is ``prefix`` (chosen by score, holding
    part of the prompt), ``load`` (least-load, or by score with nothing cached), or
    ``round-robin``;
    ``hit`` is what the chosen replica holds of the prompt."""

    replica: str
    reason: str
    hit: PrefixHit
    score: float


_NO_HIT = PrefixHit(0, {})


def saved_blocks(weights: Mapping[str, float], hit: PrefixHit) -> float:
    """Blocks of prefill that ``hit`` saves: each held block times its tier's weight."""
    return sum(weights.get(t, 0.0) * b for t, b in hit.by_tier.items())


class Chooser:
    """Applies a :class:`PolicyConfig` (keeps the round-robin position)."""

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self._turn = itertools.count()

    def choose(self, candidates: Sequence[Candidate],
               hits: Mapping[str, PrefixHit] | None = None) -> Decision | None:
        """The replica for one request among ``candidates`` (``None`` if there is none).
        ``hits``: each candidate's cached prefix (``prefix`` policy only)."""
        if not candidates:
            return None
        turn = next(self._turn)
        n = len(candidates)
        ordered = [candidates[(turn + i) % n] for i in range(n)]
        policy = self.config.policy
        if policy == "round-robin":
            c = ordered[0]
            return Decision(c.name, "round-robin", (hits or {}).get(c.name, _NO_HIT), 0.0)
        if policy == "least-load":
            c = min(ordered, key=lambda c: c.in_flight)
            return Decision(c.name, "load", (hits or {}).get(c.name, _NO_HIT),
                            -float(c.in_flight))
        weights = self.config.weights
        lw = self.config.load_weight
        least = min(c.in_flight for c in ordered)
        ordered = [c for c in ordered if c.in_flight - least <= self.config.max_imbalance]
        best: tuple[float, int] | None = None
        chosen = ordered[0]
        for c in ordered:
            hit = (hits or {}).get(c.name, _NO_HIT)
            value = saved_blocks(weights, hit)
            key = (value - c.pending_blocks - lw * c.in_flight, -c.in_flight)
            if best is None or key > best:
                best, chosen = key, c
        assert best is not None
        hit = (hits or {}).get(chosen.name, _NO_HIT)
        reason = "prefix" if hit.blocks else "load"
        return Decision(chosen.name, reason, hit, best[0])
