"""Cost-aware reuse: load a cached block only where that is faster than recomputing it.

What a hit costs, and what recomputing it costs. A request whose first ``k`` blocks are
loaded waits for the load, then runs one step with the rest of the prompt:
``TTFT(k) = load(blocks < k) + step(q + (n - k) B new tokens after k B cached)``. The
step's fixed cost (reading the weights, launching kernels, sampling) is paid whatever
``k`` is, and so is the question's own compute: only ``load(blocks < k)`` and the
compute of the declined blocks differ between cuts. So a plan minimizes
``load(blocks < k) + recompute(blocks >= k)``.

The model learns online, from measurements, two things:

- per tier, the time to load ``b`` bytes into GPU slots: ``latency_s + b / bytes_per_s``
  (fed by the mover's measured loads: host -> GPU copies and shared-tier loads). The
  latency (thread dispatch, staging, the first batch's round trip) is fitted once loads
  of sizes at least :data:`MIN_LOAD_SPAN` apart have been seen; before that a load of one
  size cannot separate it from the bandwidth, and the model assumes the tier's floor
  (:data:`LOAD_LATENCY_FLOOR_S`, at most half the fastest load seen) and charges the rest
  per byte, which is exact at the size measured and dearer for smaller loads;
- the engine's prefill: a step computing ``T`` new tokens after ``c`` cached ones takes
  ``per_step_s + per_token_s * T + per_token_context_s * T * (c + (T + 1) / 2)`` (the last
  term is attention, which grows with the context; summed over a step's sequences), fed
  by the engine after every step through :meth:`CostModel.timed`. Recomputing ``m``
  tokens after ``c`` costs the step ``per_token_s * m + per_token_context_s * m * (c +
  (m + 1) / 2)`` (:meth:`PrefillRate.seconds`): the question after them attends to the
  same context either way, and the per-step cost is paid anyway.

Both fits are non-negative least squares of the *relative* error (a 250 ms prefill and a
20 ms question count alike; a step slowed by a compilation or a pause barely pulls the
fit, since its relative residual cannot pass -1), made robust twice (:class:`_Fit`): a
first fit to one point per size class, its median, then a fit to every observation kept,
those more than :data:`REJECT` off the first dropped, with a Huber weight
(:data:`HUBER`). Forgetting is exponential (:data:`DECAY` an observation) *within a size
class* (powers of two of new tokens and of context per token; of bytes for loads), and
every class carries the same total weight: a burst of one size (two dozen short
questions) refreshes what the model knows about that size without erasing what it knows
about long prefills, the sizes a decision needs. A class not seen for :data:`HISTORY`
observations is dropped. Fits are solved lazily, when a rate or a plan is asked for: the
prefill fit at once after a step of a new class, else every :data:`SOLVE_EVERY` steps.

The decision (:meth:`CostModel.plan`): loading block ``i`` pays only if every block before
it is loaded too, so the plan picks the number ``k`` of leading blocks to take that
minimizes the predicted ``load(blocks < k) + recompute(blocks >= k)``; each tier pays its
latency once. Ties go to the longer hit (it frees compute for other requests): a load is
declined only when recomputing is predicted faster. Where the model does not know, it
takes the hit, as a store without a model would, and says so in :attr:`Plan.basis`:

- no prefill estimate, or one whose steps span less than :data:`MIN_PREFILL_SPAN` x in
  new tokens (the per-step cost cannot be told from the per-token one): every block is
  taken;
- a cut that would recompute more than :data:`EXTRAPOLATION` x the largest step seen is
  not considered (the model would extrapolate), so a long hit is at most trimmed at the
  tail, within the sizes measured;
- a tier whose load rate is unknown costs nothing to load (its first loads are the
  measurements). A learned load rate expires :data:`RATE_TTL_S` after its last
  measurement, so a declined tier is measured again now and then.

Rates can be injected (:class:`LoadRate`, :class:`PrefillRate`; an injected prefill rate
is trusted at every size) and learning switched off, so tests assert exact decisions.

No torch import at module level: simulation mode uses this module without torch
(numpy is imported when a fit is solved).
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

DECAY = 0.95
"""Weight kept by an observation at each newer one of its size class (half-life about 14
observations of that class)."""

CLASS_ROWS = 32
"""Observations kept per size class (the oldest weighs 0.95^31, about 20% of the newest)."""

HISTORY = 4096
"""A size class with no observation among the last this many of its fit is dropped."""

HUBER = 0.15
"""Relative residual beyond which an observation's weight falls off as 1 / residual."""

SOLVE_EVERY = 16
"""The prefill fit is solved again after this many new steps of the size classes it
knows (at once after a step of a new class): a refit costs the engine's thread a
millisecond or two. Load fits are solved again after every load."""

REJECT = 0.5
"""Relative residual (against the fit to the class medians) beyond which an observation
no longer counts."""

RATE_TTL_S = 120.0
"""A learned load rate not refreshed for this long (seconds) is forgotten: the tier's next
hit is loaded and measured again. A tier the model declines is never measured, so this
is what lets a tier that got faster (a warm page cache, a recovered server) win back."""

MIN_PREFILL_TOKENS = 2
"""A step teaches the prefill rate only if one of its sequences computes at least this
many new tokens: pure decode steps (one token a sequence) cost differently."""

MIN_PREFILL_SPAN = 4.0
"""The prefill steps seen must span this factor in new tokens (largest / smallest) before
the model's recompute predictions are used; until then every hit is taken."""

EXTRAPOLATION = 2.0
"""A cut recomputing more than this many times the largest step seen (new tokens) is not
considered: the model would be extrapolating."""

MIN_LOAD_SPAN = 2.0
"""Loads of one tier must span this factor in bytes before the latency is fitted from
them; until then it is the tier's floor."""

LOAD_LATENCY_FLOOR_S: Mapping[str, float] = {"host": 50e-6}
"""Per-load latency assumed while a tier's loads have one size only: a host load is one
copy on a side stream; a shared-tier load (any other name:
:data:`DEFAULT_LOAD_LATENCY_FLOOR_S`) dispatches worker threads and stages batches."""

DEFAULT_LOAD_LATENCY_FLOOR_S = 1e-3
"""The floor of a tier :data:`LOAD_LATENCY_FLOOR_S` does not name (disk, redis, remote)."""


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
        """Seconds to prefill ``tokens`` new tokens after ``context`` cached ones, the
        per-step cost left out (what recomputing them adds to a step)."""
        return tokens * (self.per_token_s + self.per_token_context_s * (context + (tokens + 1) / 2))

    def step_seconds(self, tokens: int, context: int) -> float:
        """Seconds of a whole step computing ``tokens`` new tokens after ``context``."""
        return self.per_step_s + self.seconds(tokens, context)


@dataclass(frozen=True)
class Plan:
    """What :meth:`CostModel.plan` decided for one match.

    ``blocks``: leading blocks to take (the rest are recomputed). ``taken`` and
    ``declined``: blocks per tier on each side of the cut. ``load_s``/``recompute_s``:
    the predicted seconds to load the taken blocks and to recompute the declined ones.
    ``all_load_s``/``all_recompute_s``: the two extremes, every block loaded (``None``
    while a tier of the match is unmeasured) or every block recomputed (``None`` without
    a prefill estimate), whatever was decided. ``basis``: why, in words (``"predicted"``
    when the predicted times decided).
    """

    blocks: int
    taken: dict[str, int]
    declined: dict[str, int]
    load_s: float
    recompute_s: float
    all_load_s: float | None = None
    all_recompute_s: float | None = None
    basis: str = "predicted"


class _Fit:
    """Robust, recency-weighted, non-negative least squares of ``y = x . w (+ offset)``
    in relative error.

    Observations are grouped by a size class (``key``), the last :data:`CLASS_ROWS` of a
    class kept; within a class each weighs :data:`DECAY` per newer observation of the
    class, and every class weighs 1 in total. :meth:`solve` fits in two passes over the
    non-negative ``w`` whose non-zero entries are one of ``subsets`` (among equal fits
    the earlier subset wins), each by iteratively reweighted least squares of the
    relative residual with a Huber weight (:data:`HUBER`):

    1. one point per class, its recency-weighted median, so an outlier among repeated
       sizes (a compilation, a pause, a bad timer) is never the point;
    2. every observation kept, those more than :data:`REJECT` off the first fit
       weighted down to nothing (Tukey's biweight), so no information within a class
       is thrown away.
    """

    def __init__(self, key: Callable[[Sequence[float]], Hashable]) -> None:
        self._key = key
        self._classes: dict[Hashable, deque[tuple[int, tuple[float, ...], float]]] = {}
        self.n = 0
        self._unsolved = 0  # observations since the last solve
        self._new_class = False

    def add(self, x: Sequence[float], y: float) -> None:
        self.n += 1
        self._unsolved += 1
        key = self._key(x)
        rows = self._classes.get(key)
        if rows is None:
            rows = self._classes[key] = deque(maxlen=CLASS_ROWS)
            self._new_class = True
        rows.append((self.n, tuple(float(v) for v in x), float(y)))

    def due(self, every: int) -> bool:
        """Whether a refit is due: a new size class, or ``every`` observations since the
        last one."""
        return self._new_class or self._unsolved >= every

    def solved(self) -> None:
        self._unsolved = 0
        self._new_class = False

    def data(self) -> tuple[Any, Any, Any, Any, Any] | None:
        """``(x, y, weight, median_x, median_y)`` as numpy arrays: every kept
        observation with its weight, and one per class, at the class's weighted median of
        ``y``; ``None`` without data. Drops classes not seen for :data:`HISTORY`
        observations."""
        horizon = self.n - HISTORY
        xs: list[tuple[float, ...]] = []
        ys: list[float] = []
        ws: list[float] = []
        mx: list[tuple[float, ...]] = []
        my: list[float] = []
        for key in list(self._classes):
            kept = self._classes[key]
            if kept[-1][0] <= horizon:
                del self._classes[key]
                continue
            m = len(kept)
            weights = _DECAYS[m - 1::-1]
            total = _DECAY_SUMS[m - 1]
            ranked = []
            for (_, x, y), w in zip(kept, weights):
                xs.append(x)
                ys.append(y)
                ws.append(w / total)
                ranked.append((y, w, x))
            ranked.sort()
            acc = 0.0
            for y, w, x in ranked:
                acc += w
                if acc >= total / 2:
                    mx.append(x)
                    my.append(y)
                    break
        if not ys:
            return None
        import numpy as np

        return np.array(xs), np.array(ys), np.array(ws), np.array(mx), np.array(my)

    def solve(self, subsets: Sequence[tuple[int, ...]], offset: float = 0.0,
              data: tuple[Any, Any, Any, Any, Any] | None = None) -> list[float] | None:
        """Coefficients (0 for features left out), or ``None`` without data or when no
        subset fits. ``data``: :meth:`data`'s answer, if the caller has it."""
        data = self.data() if data is None else data
        if data is None:
            return None
        import numpy as np

        x, y, w, mx, my = data
        first = _irls(mx, my, np.ones(len(my)), subsets, offset)
        if first is None:
            return None
        r = np.abs((x @ first + offset - y) / y)
        keep = w * np.where(r < REJECT, (1 - (r / REJECT) ** 2) ** 2, 0.0)
        final = _irls(x, y, keep, subsets, offset) if keep.any() else None
        return [float(v) for v in (first if final is None else final)]


_DECAYS = [DECAY ** i for i in range(CLASS_ROWS)]
_DECAY_SUMS = [sum(_DECAYS[:i + 1]) for i in range(CLASS_ROWS)]


def _irls(x: Any, y: Any, w: Any, subsets: Sequence[tuple[int, ...]], offset: float) -> Any:
    """Non-negative ``c`` minimizing ``sum w * huber((x . c + offset - y) / y)``, by
    iteratively reweighted least squares (numpy arrays in and out; ``None`` when no
    subset fits)."""
    import numpy as np

    a = x / y[:, None]
    b = (y - offset) / y
    scale = np.abs(a).max(axis=0)
    scale[scale == 0] = 1.0
    a = a / scale
    weights = w
    theta = None
    for _ in range(8):
        theta = _nnls(a, b, weights, subsets)
        if theta is None:
            return None
        r = np.abs(a @ theta - b)
        new = w * np.minimum(1.0, HUBER / np.maximum(r, 1e-300))
        if np.allclose(new, weights, rtol=1e-6, atol=0.0):
            break
        weights = new
    return theta / scale


def _nnls(a: Any, b: Any, weights: Any, subsets: Sequence[tuple[int, ...]]) -> Any:
    """Weighted least squares over each subset of columns; the non-negative solution of
    least loss (earlier subsets win ties), as a full-length vector, or ``None``."""
    import numpy as np

    aw = a * weights[:, None]
    gram, rhs, total = aw.T @ a, aw.T @ b, float(weights @ (b * b))
    tol = 1e-9 * total + 1e-30
    best: tuple[float, Any] | None = None
    for subset in subsets:
        idx = list(subset)
        sol, *_ = np.linalg.lstsq(gram[np.ix_(idx, idx)], rhs[idx], rcond=None)
        if not np.isfinite(sol).all() or (sol < 0).any():
            continue
        theta = np.zeros(a.shape[1])
        theta[idx] = sol
        loss = float(theta @ gram @ theta - 2 * theta @ rhs) + total
        if best is None or loss < best[0] - tol:
            best = (loss, theta)
    return None if best is None else best[1]


def _octave(v: float) -> int:
    return math.floor(math.log2(v)) if v >= 1 else 0


def _prefill_class(x: Sequence[float]) -> Hashable:
    """Powers of two of the step's new tokens and of its attention per new token."""
    _, tokens, attention = x
    return _octave(tokens), _octave(1 + attention / max(tokens, 1.0))


def _load_class(x: Sequence[float]) -> Hashable:
    return _octave(x[1])


_LOAD_SUBSETS = [(0, 1), (1,)]
"""Load features (latency, bytes)."""
_PREFILL_SUBSETS = [(0, 1, 2), (0, 1), (1, 2), (0, 2), (1,), (2,)]
"""Prefill features (per step, tokens, attention), the fullest first."""


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
    :attr:`last_plan`: the latest decision (benchmarks print it).
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
        self._prefill_fit = _Fit(_prefill_class)
        # Largest step seen (new tokens) and whether the steps span enough sizes;
        # an injected rate is trusted everywhere.
        self._largest_step = math.inf if self.prefill is not None else 0.0
        self._trusted = self.prefill is not None
        self._pending: list[_Pending] = []
        self.last_plan: Plan | None = None

    # ------------------------------------------------------------------ rates

    def load_rate(self, tier: str) -> LoadRate | None:
        """The current estimate for ``tier`` (``None`` until measured or injected)."""
        with self._lock:
            self._solve_loads()
            return self._rates.get(tier)

    def prefill_rate(self) -> PrefillRate | None:
        """The current prefill estimate (``None`` until measured or injected)."""
        with self._lock:
            self._solve_prefill()
            return self._prefill

    def prefill_trusted(self) -> bool:
        """Whether :meth:`plan` uses the prefill estimate (injected, or learned from steps
        spanning :data:`MIN_PREFILL_SPAN` x in new tokens)."""
        with self._lock:
            self._solve_prefill()
            return self._trusted

    def observe_load(self, tier: str, nbytes: int, seconds: float) -> None:
        """One measured load of ``nbytes`` bytes from ``tier`` into GPU slots."""
        if not self.learn or tier in self._fixed or nbytes <= 0 or not seconds > 0:
            return
        with self._lock:
            self._load_fits.setdefault(tier, _Fit(_load_class)).add(
                (1.0, float(nbytes)), seconds)
            self._measured_at[tier] = time.monotonic()

    def _solve_loads(self) -> None:
        """Refit the tiers loaded from since the last solve (the lock held)."""
        for tier, fit in self._load_fits.items():
            if not fit.due(1):
                continue
            fit.solved()
            data = fit.data()
            if data is None:
                continue
            sizes, times = data[3][:, 1], data[4]
            solved = None
            if sizes.max() >= MIN_LOAD_SPAN * sizes.min():
                solved = fit.solve(_LOAD_SUBSETS, data=data)
            if solved is None or solved[1] <= 0:
                # One size: the latency cannot be told from the bandwidth. Assume the
                # tier's floor (at most half the fastest load) and charge the rest per byte.
                floor = LOAD_LATENCY_FLOOR_S.get(tier, DEFAULT_LOAD_LATENCY_FLOOR_S)
                floor = min(floor, 0.5 * float(times.min()))
                per_byte = fit.solve([(1,)], offset=floor, data=data)
                if per_byte is None or per_byte[1] <= 0:
                    continue
                solved = [floor, per_byte[1]]
            latency, per_byte_s = solved
            self._rates[tier] = LoadRate(1.0 / per_byte_s, latency)

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

    def _solve_prefill(self) -> None:
        """Refit the prefill rate if due (:data:`SOLVE_EVERY`; the lock held)."""
        fit = self._prefill_fit
        if not fit.due(SOLVE_EVERY):  # a refit costs the engine's thread a millisecond or two
            return
        fit.solved()
        data = fit.data()
        if data is None:
            return
        tokens = data[3][:, 1]
        trusted = bool(tokens.max() >= MIN_PREFILL_SPAN * tokens.min())
        # Too narrow a span cannot separate the per-step cost from the per-token one: the
        # estimate (shown, not used) charges all of it per token.
        solved = fit.solve(_PREFILL_SUBSETS if trusted else [(1,)], data=data)
        if solved is None or solved[1] + solved[2] <= 0:
            return
        self._prefill = PrefillRate(solved[1], solved[2], solved[0])
        self._trusted = trusted
        self._largest_step = float(tokens.max())

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
        ``>= k`` over ``k``, ties to the larger ``k``; tiers pay their latency once. What
        it does where the model does not know is in the module docstring; the reason is
        :attr:`Plan.basis`.
        """
        n = len(sources)
        if all(t == "gpu" for t in sources):
            # Nothing to load: every block is taken, and no fit is solved on the
            # engine's thread for it (a GPU hit's TTFT is a few milliseconds).
            plan = Plan(n, {"gpu": n} if n else {}, {}, 0.0, 0.0, 0.0, None,
                        "GPU hit: nothing to load")
            self.last_plan = plan
            return plan
        with self._lock:
            now = time.monotonic()
            for tier, at in list(self._measured_at.items()):
                if now - at > RATE_TTL_S:  # stale: forget it, measure again
                    del self._measured_at[tier]
                    self._rates.pop(tier, None)
                    self._load_fits.pop(tier, None)
            self._solve_loads()
            self._solve_prefill()
            rates = dict(self._rates)
            prefill = self._prefill
            trusted, largest = self._trusted, self._largest_step
        bs, bb = self.block_size, self.block_bytes
        unknown = sorted({t for t in sources if t != "gpu" and t not in rates})
        all_load = None if unknown else self._load_s(sources, rates)
        all_re = None if prefill is None else prefill.seconds(n * bs, context)
        best_k, best_load, best_re = n, self._load_s(sources, rates), 0.0
        if not self.decide:
            basis = "decide off: every block taken"
        elif prefill is None:
            basis = "prefill not measured: every block taken"
        elif not trusted:
            basis = (f"prefill steps span < {MIN_PREFILL_SPAN:g}x in size: "
                     "every block taken")
        else:
            limit = EXTRAPOLATION * largest  # the most tokens a cut may recompute
            load = 0.0
            seen: set[str] = set()
            loads = [0.0]
            for k in range(1, n + 1):
                tier = sources[k - 1]
                rate = rates.get(tier)
                if tier != "gpu" and rate is not None:
                    load += bb / rate.bytes_per_s
                    if tier not in seen:
                        seen.add(tier)
                        load += rate.latency_s
                loads.append(load)
            best = best_load = loads[n]
            for k in range(n - 1, -1, -1):  # from the longest hit down: ties stay longer
                if (n - k) * bs > limit:
                    break
                recompute = prefill.seconds((n - k) * bs, context + k * bs)
                total = loads[k] + recompute
                if total < best and not math.isclose(total, best, rel_tol=1e-12):
                    best, best_k, best_load, best_re = total, k, loads[k], recompute
            basis = "predicted"
            if n * bs > limit:
                basis += (f" (cuts recomputing more than {limit:.0f} tokens, "
                          f"{EXTRAPOLATION:g}x the largest step seen, not considered)")
            if unknown:
                basis += f"; unmeasured, loaded free: {', '.join(unknown)}"
        taken: dict[str, int] = {}
        declined: dict[str, int] = {}
        for i, tier in enumerate(sources):
            side = taken if i < best_k else declined
            side[tier] = side.get(tier, 0) + 1
        plan = Plan(best_k, taken, declined, best_load, best_re, all_load, all_re, basis)
        self.last_plan = plan
        return plan

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
