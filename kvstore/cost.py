"""Cost-aware reuse: load a cached block only where that is faster than recomputing it.

The model learns online, from measurements, two things:

- per tier, the time to load ``b`` bytes into GPU slots: ``latency_s + b / bytes_per_s``
  (fed by the mover's measured loads: host -> GPU copies and shared-tier loads);
- the engine's prefill time for ``T`` new tokens after ``c`` cached ones:
  ``per_token_s * T + per_token_context_s * T * (c + (T + 1) / 2)`` (the second term is
  attention, which grows with the context), plus a fixed cost per step that recompute
  does not add to (fed by the engine after every step through :meth:`CostModel.timed`).

A match is a prefix of blocks, each from one tier. Loading block ``i`` only pays if
every block before it is loaded too, so :meth:`CostModel.plan` picks the number ``k`` of
leading blocks to take that minimizes ``load(blocks < k) + recompute(blocks >= k)``; the
prompt after the match is computed whatever ``k`` is, at the same context, so it does
not enter the choice. Ties go to the longer hit (it frees compute for other requests).

Until a rate is measured the model does not guess: a tier whose load rate is unknown
costs nothing to load, and an unknown prefill rate makes recompute infinitely
expensive, so every hit is taken (and the first loads are the measurements). A learned
load rate expires :data:`RATE_TTL_S` after its last measurement, so a declined tier is
measured again now and then.
Rates can be injected (:class:`LoadRate`, :class:`PrefillRate`) and learning switched
off, so tests assert exact decisions.

No torch import at module level: simulation mode uses this module without torch.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

DECAY = 0.95
"""Weight kept by past observations at each new one (half-life about 14 observations)."""

RATE_TTL_S = 120.0
"""A learned load rate not refreshed for this long (seconds) is forgotten: the tier's next
hit is loaded and measured again. A tier the model declines is never measured, so this
is what lets a tier that got faster (a warm page cache, a recovered server) win back."""

MIN_PREFILL_TOKENS = 2
"""A step teaches the prefill rate only if one of its sequences computes at least this
many new tokens: pure decode steps (one token a sequence) cost differently."""


@dataclass(frozen=True)
class LoadRate:
    """Time to load ``b`` bytes from one tier into GPU slots: ``latency_s + b / bytes_per_s``."""

    bytes_per_s: float
    latency_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.bytes_per_s > 0 or not self.latency_s >= 0:
            raise ValueError(f"LoadRate needs bytes_per_s > 0 and latency_s >= 0, got {self}")

    def seconds(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bytes_per_s


@dataclass(frozen=True)
class PrefillRate:
    """Prefill time of ``T`` tokens after ``c`` cached ones:
    ``per_token_s * T + per_token_context_s * T * (c + (T + 1) / 2)`` seconds, plus
    ``per_step_s`` once per engine step (reading the weights, launching kernels, sampling),
    which a step pays whatever it computes, so recomputing blocks does not add it."""

    per_token_s: float
    per_token_context_s: float = 0.0
    per_step_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.per_token_s >= 0 or not self.per_token_context_s >= 0 or \
                not self.per_step_s >= 0 or self.per_token_s + self.per_token_context_s <= 0:
            raise ValueError(f"PrefillRate needs non-negative rates, not both 0, got {self}")

    def seconds(self, tokens: int, context: int) -> float:
        """Seconds to prefill ``tokens`` new tokens after ``context`` cached ones."""
        return tokens * (self.per_token_s + self.per_token_context_s * (context + (tokens + 1) / 2))


@dataclass(frozen=True)
class Plan:
    """What :meth:`CostModel.plan` decided for one match.

    ``blocks``: leading blocks to take (the rest are recomputed). ``taken`` and
    ``declined``: blocks per tier on each side of the cut. ``load_s``/``recompute_s``:
    the predicted seconds to load the taken blocks and to recompute the declined ones.
    """

    blocks: int
    taken: dict[str, int]
    declined: dict[str, int]
    load_s: float
    recompute_s: float


class _Fit:
    """Exponentially weighted, non-negative least squares of ``y = sum w_j x_j``.

    Keeps the weighted normal sums only. :meth:`solve` tries every subset of the
    features (at most 3) and keeps the non-negative solution of least loss; when data
    cannot tell subsets apart (one step size seen so far), the earlier subset in
    ``prefer`` wins.
    """

    def __init__(self, k: int, prefer: Sequence[tuple[int, ...]]) -> None:
        self.k = k
        self.prefer = list(prefer)
        self.xx = [[0.0] * k for _ in range(k)]
        self.xy = [0.0] * k
        self.yy = 0.0
        self.n = 0

    def add(self, x: Sequence[float], y: float) -> None:
        d = DECAY
        for i in range(self.k):
            self.xy[i] = d * self.xy[i] + x[i] * y
            for j in range(self.k):
                self.xx[i][j] = d * self.xx[i][j] + x[i] * x[j]
        self.yy = d * self.yy + y * y
        self.n += 1

    def solve(self) -> list[float] | None:
        """Non-negative weights (0 for features left out), or ``None`` before any data."""
        if self.n == 0:
            return None
        import numpy as np

        xx, xy = np.array(self.xx), np.array(self.xy)
        best: tuple[float, list[float]] | None = None
        for subset in self.prefer:
            idx = list(subset)
            w_sub, *_ = np.linalg.lstsq(xx[np.ix_(idx, idx)], xy[idx], rcond=None)
            if (w_sub < 0).any() or not np.isfinite(w_sub).all():
                continue
            w = np.zeros(self.k)
            w[idx] = w_sub
            loss = float(w @ xx @ w - 2 * w @ xy + self.yy)
            if best is None or loss < best[0] - 1e-9 * max(self.yy, 1e-30):
                best = (loss, [float(v) for v in w])
        return None if best is None else best[1]


_LOAD_SUBSETS = [(1,), (0, 1), (0,)]
"""Load features (latency, bytes): when in doubt, all time is per byte."""
_PREFILL_SUBSETS = [(1,), (1, 2), (2,), (0, 1, 2), (0, 1), (0, 2), (0,)]
"""Prefill features (per step, tokens, attention): when in doubt, no fixed per-step
cost (recompute looks dearer, so hits are taken, as a store without a model does)."""


@dataclass
class _Pending:
    start: Any
    end: Any
    tokens: int
    attention: float


@dataclass
class CostModel:
    """Learned (or injected) load and prefill rates, and the per-request decision.

    ``block_bytes``: bytes of one block; ``block_size``: tokens per block.
    ``load_rates``/``prefill``: injected rates (tiers not named are learned).
    ``learn``: False freezes the model at the injected rates (tests, benchmarks).
    ``decide``: False takes every hit while still learning (benchmarks measuring the
    load path); it may be switched at any time.
    Thread-safe: the mover's threads and the engine's may feed it at once.
    """

    block_bytes: int
    block_size: int
    load_rates: Mapping[str, LoadRate] = field(default_factory=dict)
    prefill: PrefillRate | None = None
    learn: bool = True
    decide: bool = True

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._rates: dict[str, LoadRate] = dict(self.load_rates)
        self._fixed = frozenset(self.load_rates)
        self._prefill = self.prefill
        self._load_fits: dict[str, _Fit] = {}
        self._measured_at: dict[str, float] = {}
        self._prefill_fit = _Fit(3, _PREFILL_SUBSETS)
        self._pending: list[_Pending] = []

    # ------------------------------------------------------------------ rates

    def load_rate(self, tier: str) -> LoadRate | None:
        """The current estimate for ``tier`` (``None`` until measured or injected)."""
        with self._lock:
            return self._rates.get(tier)

    def prefill_rate(self) -> PrefillRate | None:
        """The current prefill estimate (``None`` until measured or injected)."""
        with self._lock:
            return self._prefill

    def observe_load(self, tier: str, nbytes: int, seconds: float) -> None:
        """One measured load of ``nbytes`` bytes from ``tier`` into GPU slots."""
        if not self.learn or tier in self._fixed or nbytes <= 0 or not seconds > 0:
            return
        with self._lock:
            fit = self._load_fits.setdefault(tier, _Fit(2, _LOAD_SUBSETS))
            fit.add((1.0, float(nbytes)), seconds)
            solved = fit.solve()
            if solved is None:
                return
            latency, per_byte = solved
            if per_byte <= 0:  # all the time looked like latency: charge it per byte
                per_byte, latency = seconds / nbytes, 0.0
            self._rates[tier] = LoadRate(1.0 / per_byte, latency)
            self._measured_at[tier] = time.monotonic()

    def observe_prefill(self, query_lens: Sequence[int], seq_lens: Sequence[int],
                        seconds: float) -> None:
        """One engine step that ran ``query_lens[i]`` new tokens of sequence ``i``, whose
        length after the step is ``seq_lens[i]`` tokens, in ``seconds``."""
        if max(query_lens, default=0) < MIN_PREFILL_TOKENS:
            return
        tokens, attention = _features(query_lens, seq_lens)
        self._add_prefill(tokens, attention, seconds)

    def _add_prefill(self, tokens: int, attention: float, seconds: float) -> None:
        if not self.learn or self.prefill is not None or not seconds > 0:
            return
        with self._lock:
            self._prefill_fit.add((1.0, float(tokens), attention), seconds)
            solved = self._prefill_fit.solve()
            if solved is not None and solved[1] + solved[2] > 0:
                self._prefill = PrefillRate(solved[1], solved[2], solved[0])

    def timed(self, run: Callable[..., T], ids: list[int], tables: list[list[int]],
              query_lens: list[int], seq_lens: list[int]) -> T:
        """``run(ids, tables, query_lens, seq_lens)`` (the engine's model step), timed
        and fed to the prefill rate. On CUDA the time comes from events read once they
        complete (no synchronization is added); on CPU from the wall clock."""
        if not self.learn or self.prefill is not None or \
                max(query_lens, default=0) < MIN_PREFILL_TOKENS:
            return run(ids, tables, query_lens, seq_lens)
        tokens, attention = _features(query_lens, seq_lens)
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            t0 = time.perf_counter()
            out = run(ids, tables, query_lens, seq_lens)
            self._add_prefill(tokens, attention, time.perf_counter() - t0)
            return out
        self._reap()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        out = run(ids, tables, query_lens, seq_lens)
        end.record()
        with self._lock:
            self._pending.append(_Pending(start, end, tokens, attention))
        return out

    def _reap(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        keep = []
        for p in pending:
            if p.end.query():
                self._add_prefill(p.tokens, p.attention, p.start.elapsed_time(p.end) / 1e3)
            else:
                keep.append(p)
        with self._lock:
            self._pending = keep + self._pending

    # --------------------------------------------------------------- decision

    def plan(self, sources: Sequence[str], context: int = 0) -> Plan:
        """How many leading blocks of a match to take.

        ``sources[i]``: the tier block ``i`` comes from (``"gpu"`` costs nothing);
        ``context``: cached tokens before block 0 (0 for a match from the root).
        Minimizes predicted load time of blocks ``< k`` plus recompute time of blocks
        ``>= k`` over ``k``, ties to the larger ``k``. Tiers pay their latency once.
        """
        n = len(sources)
        with self._lock:
            now = time.monotonic()
            for tier, at in list(self._measured_at.items()):
                if now - at > RATE_TTL_S:  # stale: forget it, measure again
                    del self._measured_at[tier], self._rates[tier], self._load_fits[tier]
            rates = dict(self._rates)
            prefill = self._prefill
        bs, bb = self.block_size, self.block_bytes
        if prefill is None or not self.decide:
            best_k, best_load, best_re = n, self._load_s(sources, rates), 0.0
        else:
            best_k, best_load, best_re = 0, 0.0, prefill.seconds(n * bs, context)
            best = best_re
            load = 0.0
            seen: set[str] = set()
            for k in range(1, n + 1):
                tier = sources[k - 1]
                rate = rates.get(tier)
                if tier != "gpu" and rate is not None:
                    load += bb / rate.bytes_per_s
                    if tier not in seen:
                        seen.add(tier)
                        load += rate.latency_s
                recompute = prefill.seconds((n - k) * bs, context + k * bs)
                if load + recompute <= best or math.isclose(load + recompute, best,
                                                            rel_tol=1e-12):
                    best, best_k, best_load, best_re = load + recompute, k, load, recompute
        taken: dict[str, int] = {}
        declined: dict[str, int] = {}
        for i, tier in enumerate(sources):
            side = taken if i < best_k else declined
            side[tier] = side.get(tier, 0) + 1
        return Plan(best_k, taken, declined, best_load, best_re)

    def _load_s(self, sources: Sequence[str], rates: Mapping[str, LoadRate]) -> float:
        per_tier: dict[str, int] = {}
        for tier in sources:
            per_tier[tier] = per_tier.get(tier, 0) + 1
        total = 0.0
        for tier, blocks in per_tier.items():
            rate = rates.get(tier)
            if tier != "gpu" and rate is not None:
                total += rate.seconds(blocks * self.block_bytes)
        return total


def _features(query_lens: Sequence[int], seq_lens: Sequence[int]) -> tuple[int, float]:
    """(new tokens, attention term ``sum T * (c + (T + 1) / 2)``) of one step."""
    tokens = 0
    attention = 0.0
    for q, s in zip(query_lens, seq_lens):
        tokens += q
        attention += q * (s - q + (q + 1) / 2)
    return tokens, attention
