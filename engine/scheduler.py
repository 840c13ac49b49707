"""Continuous batching over the store's GPU pool, with admission control.

Every step the scheduler:

1. admits waiting sequences, first come first served (a preempted sequence keeps its
   place by arrival), up to ``max_num_seqs``. A sequence is matched against the store
   and admitted only when the GPU blocks it still needs for its prompt (after its cache
   hit) fit in the blocks that are free or evictable, less what admitted sequences
   still need to finish their prompts and less a watermark (see
   :meth:`Scheduler.watermark`) kept for running sequences' next decode blocks. The
   head of the queue waits rather than being overtaken. A sequence alone in the engine
   is always admitted (a prompt that cannot fit the pool is refused before it is
   queued, ``Engine.check_request``; one whose reply outgrows the pool ends with
   "length"). An admitted
   sequence acquires a lease whose lower-tier hits are promoted to the GPU in the
   background (``LOADING``);
2. moves sequences whose promotion finished to ``RUNNING``;
3. builds one batch under a token budget: every decoding sequence contributes one token,
   then prefilling sequences contribute chunks of their uncached prompt (chunked
   prefill), oldest first;
4. gives each batched sequence the GPU slots its new tokens need. When the pool is full
   of locked blocks it preempts the newest running sequence that made progress since
   it was last preempted (no livelock). A preempted sequence's computed blocks are
   committed and parked one tier down in one batch (:meth:`KVStore.park`); it goes
   back to the queue in arrival order and resumes by promoting them back (or
   recomputes them where no lower tier exists). A sequence newer than every possible
   victim yields itself; the oldest running sequence never yields, so it always
   progresses.

The last prompt token is always computed (a match never covers it), so every sequence
gets logits to sample its first token from.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter, deque
from dataclasses import dataclass

from engine.sequence import Sequence, Status
from kvstore.store import KVStore, OutOfBlocks, StoreMatch


@dataclass(frozen=True)
class SchedulerConfig:
    """Batching limits. ``max_num_batched_tokens`` is the per-step token budget.

    ``watermark`` caps the admission headroom kept for running sequences' decode blocks,
    as a fraction of the GPU pool (the headroom is one block per live sequence, at most
    this fraction). ``park`` moves a preempted sequence's blocks one tier down at once
    (resumed by promotion); off, they are left cached on the GPU like a finished
    request's.
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_cache: bool = True
    watermark: float = 0.01
    park: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if not 0 <= self.watermark < 0.5:
            raise ValueError(f"watermark must be a fraction of the GPU pool in [0, 0.5), "
                             f"got {self.watermark}")


@dataclass
class ScheduledStep:
    """One forward step: ``query_lens[i]`` new tokens of ``seqs[i]``."""

    seqs: list[Sequence]
    query_lens: list[int]

    def samples(self, i: int) -> bool:
        """Whether ``seqs[i]`` samples a token after this step (its KV is complete)."""
        seq = self.seqs[i]
        return seq.num_computed + self.query_lens[i] == seq.num_tokens


def _order(seq: Sequence) -> tuple[float, int]:
    return (seq.arrival, seq.seq_id)


class Scheduler:
    """Queues, admission and preemption; see the module docstring. One thread.

    Counters (since creation): ``preemptions``; ``parked_blocks`` (blocks moved one
    tier down by preemptions); ``cached_tokens`` and ``resumed_tokens`` by tier (the
    split made at each admission, see :class:`engine.sequence.Sequence`);
    ``deferred`` (admission attempts that left the queue's head waiting for room).
    """

    def __init__(self, store: KVStore, config: SchedulerConfig) -> None:
        self.store = store
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.loading: list[Sequence] = []
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.parked_blocks = 0
        self.deferred = 0
        self.cached_tokens: Counter[str] = Counter()
        self.resumed_tokens: Counter[str] = Counter()
        self._gpu_t = store.tree.tier("gpu")
        self._releases = 0  # leases given back: room can only grow when this changes
        self._blocked_at = -1  # _releases when the head last failed to fit

    def add(self, seq: Sequence) -> None:
        """Queue ``seq`` in arrival order (a preempted sequence keeps its place)."""
        if not self.waiting or _order(self.waiting[-1]) < _order(seq):
            self.waiting.append(seq)
        else:
            keys = [_order(s) for s in self.waiting]
            self.waiting.insert(bisect.bisect(keys, _order(seq)), seq)
        if self.waiting[0] is seq:
            self._blocked_at = -1  # a new head: try it

    def add_running(self, seq: Sequence) -> None:
        """A forked sequence that already holds a lease."""
        seq.status = Status.RUNNING
        self.running.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.loading or self.running)

    # ------------------------------------------------------------- admission

    def _match(self, seq: Sequence) -> StoreMatch:
        max_blocks = (seq.num_tokens - 1) // self.store.block_size
        if not self.config.enable_cache:
            max_blocks = 0
        return self.store.match(seq.chain, max_blocks=max_blocks)

    def watermark(self, live: int) -> int:
        """GPU blocks admission leaves free for ``live`` sequences' next decode blocks:
        one each (a sequence needs a new block every ``block_size`` decode steps), at
        most ``config.watermark`` of the pool, at least one."""
        cap = max(1, math.ceil(self.config.watermark * self.store.gpu.num_slots))
        return min(max(1, live), cap)

    def _prompt_blocks(self, seq: Sequence) -> int:
        return -(-seq.num_tokens // self.store.block_size)

    def room(self, held: set[int]) -> int:
        """GPU blocks that admission may still hand out: the pool less the slots that
        running leases hold (``held``), less what admitted sequences still need to
        finish their prompts. Every other block is free or evictable (unlocked)."""
        owed = sum(s.reserved_blocks for s in self.loading)
        for s in self.running:
            if s.in_prefill and s.lease is not None:
                owed += max(0, self._prompt_blocks(s) - len(s.lease.slots))
        return self.store.gpu.num_slots - len(held) - owed

    def _held(self) -> set[int]:
        held: set[int] = set()
        for s in self.running:
            if s.lease is not None:
                held.update(s.lease.slots)
        return held

    def _cost(self, seq: Sequence, match: StoreMatch, held: set[int]) -> int:
        """GPU blocks admitting ``seq`` takes from the room: its prompt's blocks, less
        the GPU hits that running leases already hold (shared, e.g. a system prompt)."""
        shared = sum(1 for node, src in zip(match.nodes, match.sources)
                     if src == "gpu" and node.location(self._gpu_t) in held)
        return self._prompt_blocks(seq) - shared

    def _admit(self) -> None:
        held: set[int] | None = None
        while self.waiting and len(self.loading) + len(self.running) < self.config.max_num_seqs:
            live = len(self.loading) + len(self.running)
            if live and self._blocked_at == self._releases:
                break  # nothing was given back since the head last failed to fit
            seq = self.waiting[0]
            match = self._match(seq)
            if held is None:
                held = self._held()
            cost = self._cost(seq, match, held)
            if live and cost > self.room(held) - self.watermark(live + 1):
                self._blocked_at = self._releases
                self.deferred += 1
                break
            self.waiting.popleft()
            seq.lease = self.store.acquire(match)
            seq.match = match
            seq.reserved_blocks = cost
            seq.status = Status.LOADING
            self.loading.append(seq)
        still = []
        for seq in self.loading:
            assert seq.lease is not None
            if self.store.poll(seq.lease):
                self._start(seq)
            else:
                still.append(seq)
        self.loading = still
        self.running.sort(key=_order)

    def _start(self, seq: Sequence) -> None:
        """A promotion finished: split the hit into cached and resumed tokens, run."""
        assert seq.lease is not None and seq.match is not None
        bs = self.store.block_size
        seq.num_computed = seq.lease.computed
        for i, src in enumerate(seq.match.sources[:seq.lease.computed // bs]):
            if (i + 1) * bs <= seq.max_computed:  # its own block, computed before
                seq.resumed_tokens[src] = seq.resumed_tokens.get(src, 0) + bs
                self.resumed_tokens[src] += bs
            else:
                seq.cached_tokens[src] = seq.cached_tokens.get(src, 0) + bs
                self.cached_tokens[src] += bs
        seq.max_computed = max(seq.max_computed, seq.num_computed)
        seq.match = None
        seq.reserved_blocks = 0
        seq.status = Status.RUNNING
        self.running.append(seq)

    def wait_loading(self) -> None:
        """Block until the oldest loading sequence's promotion completes."""
        if self.loading:
            lease = self.loading[0].lease
            assert lease is not None
            self.store.wait(lease)

    def cancel(self, seq: Sequence) -> None:
        """Take a waiting or loading ``seq`` out of the queues (its lease released)."""
        if seq in self.waiting:
            self.waiting.remove(seq)
            self._blocked_at = -1  # the head may have changed
        if seq in self.loading:
            self.loading.remove(seq)
            seq.match = None
            seq.reserved_blocks = 0
        self.finish(seq)

    # ------------------------------------------------------------ preemption

    def preempt(self, seq: Sequence) -> None:
        """Park ``seq``'s computed blocks one tier down (or leave them cached), free
        the rest, and queue it again in arrival order."""
        assert seq.lease is not None
        if self.config.park:
            self.parked_blocks += self.store.park(seq.lease).blocks
        else:
            self.store.release(seq.lease)
        seq.lease = None
        seq.resume_mark = seq.num_computed
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.preemptions += 1
        self._releases += 1
        self.running.remove(seq)
        self.add(seq)

    def finish(self, seq: Sequence) -> None:
        if seq.lease is not None:
            self.store.release(seq.lease)
            seq.lease = None
            self._releases += 1
        seq.status = Status.FINISHED
        if seq in self.running:
            self.running.remove(seq)

    def schedule(self) -> tuple[ScheduledStep, list[Sequence]]:
        """The next step, and the sequences that cannot fit in the pool even alone."""
        self._admit()
        budget = self.config.max_num_batched_tokens
        step = ScheduledStep([], [])
        too_large: list[Sequence] = []
        decodes = [s for s in self.running if not s.in_prefill]
        prefills = [s for s in self.running if s.in_prefill]
        for seq in decodes + prefills:
            if budget <= 0:
                break
            if seq.status is not Status.RUNNING:
                continue  # preempted while making room for an older sequence
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self._reserve(seq, n, too_large):
                continue
            step.seqs.append(seq)
            step.query_lens.append(n)
            budget -= n
        # A sequence scheduled early may have been preempted to make room for an older one.
        kept = [(s, n) for s, n in zip(step.seqs, step.query_lens) if s.status is Status.RUNNING]
        step = ScheduledStep([s for s, _ in kept], [n for _, n in kept])
        return step, too_large

    def _victim(self, seq: Sequence) -> Sequence | None:
        """The newest running sequence newer than ``seq`` that holds blocks and made
        progress since its last preemption; the oldest sequence may also take one that
        did not (so it always progresses)."""
        newer = [s for s in self.running if s is not seq and s.status is Status.RUNNING
                 and _order(s) > _order(seq) and s.lease is not None and s.lease.slots]
        ready = [s for s in newer if s.made_progress]
        if ready:
            return ready[-1]
        oldest = all(_order(s) >= _order(seq) for s in self.running)
        return newer[-1] if newer and oldest else None

    def _reserve(self, seq: Sequence, n: int, too_large: list[Sequence]) -> bool:
        """Slots for ``n`` more tokens of ``seq``, preempting newer sequences if needed."""
        assert seq.lease is not None
        while True:
            res = self.store.allocate(seq.lease, seq.num_computed + n)
            if not isinstance(res, OutOfBlocks):
                return True
            victim = self._victim(seq)
            if victim is not None:
                self.preempt(victim)
                continue
            others = [s for s in self.running if s is not seq and s.status is Status.RUNNING]
            if not others and not self.loading:
                too_large.append(seq)  # alone and still too large for the pool
            elif seq.made_progress and any(_order(s) < _order(seq) for s in others):
                self.preempt(seq)  # only older sequences hold blocks: wait its turn
            # else it keeps its blocks and waits: it is the oldest (loading sequences
            # become victims once running) or it has just resumed
            return False
