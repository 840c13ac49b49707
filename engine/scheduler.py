"""Continuous batching over the store's GPU pool.

Every step the scheduler:

1. admits waiting sequences (first come, first served) up to ``max_num_seqs``: each is
   matched against the store on arrival and acquires a lease, whose lower-tier hits
   are promoted to the GPU in the background while the sequence waits (``LOADING``);
2. moves sequences whose promotion finished to ``RUNNING``;
3. builds one batch under a token budget: every decoding sequence contributes one token,
   then prefilling sequences contribute chunks of their uncached prompt (chunked
   prefill), oldest first;
4. gives each batched sequence the GPU slots its new tokens need. When the pool is full
   of locked blocks it preempts the newest running sequence (recompute: its lease is
   released, its committed blocks stay cached, and it re-enters the queue at the front,
   so on return it hits its own blocks wherever they were demoted to).

The last prompt token is always computed (a match never covers it), so every sequence
gets logits to sample its first token from.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.sequence import Sequence, Status
from kvstore.store import KVStore, OutOfBlocks, StoreMatch


@dataclass(frozen=True)
class SchedulerConfig:
    """Batching limits. ``max_num_batched_tokens`` is the per-step token budget."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_cache: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


@dataclass
class ScheduledStep:
    """One forward step: ``query_lens[i]`` new tokens of ``seqs[i]``."""

    seqs: list[Sequence]
    query_lens: list[int]

    def samples(self, i: int) -> bool:
        """Whether ``seqs[i]`` samples a token after this step (its KV is complete)."""
        seq = self.seqs[i]
        return seq.num_computed + self.query_lens[i] == seq.num_tokens


class Scheduler:
    """Queues and admission; see the module docstring. Called from one thread."""

    def __init__(self, store: KVStore, config: SchedulerConfig) -> None:
        self.store = store
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.loading: list[Sequence] = []
        self.running: list[Sequence] = []
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A forked sequence that already holds a lease."""
        seq.status = Status.RUNNING
        self.running.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.loading or self.running)

    def _match(self, seq: Sequence) -> StoreMatch:
        max_blocks = (seq.num_tokens - 1) // self.store.block_size
        if not self.config.enable_cache:
            max_blocks = 0
        return self.store.match(seq.chain, max_blocks=max_blocks)

    def _admit(self) -> None:
        while self.waiting and len(self.loading) + len(self.running) < self.config.max_num_seqs:
            seq = self.waiting.popleft()
            seq.lease = self.store.acquire(self._match(seq))
            seq.status = Status.LOADING
            self.loading.append(seq)
        still = []
        for seq in self.loading:
            assert seq.lease is not None
            if self.store.poll(seq.lease):
                seq.num_computed = seq.lease.computed
                if not seq.preemptions:
                    seq.cached_tokens = dict(seq.lease.cached_tokens)
                seq.status = Status.RUNNING
                self.running.append(seq)
            else:
                still.append(seq)
        self.loading = still
        self.running.sort(key=lambda s: (s.arrival, s.seq_id))

    def wait_loading(self) -> None:
        """Block until the oldest loading sequence's promotion completes."""
        if self.loading:
            lease = self.loading[0].lease
            assert lease is not None
            self.store.wait(lease)

    def preempt(self, seq: Sequence) -> None:
        """Release ``seq``'s lease and queue it again at the front (recompute)."""
        assert seq.lease is not None
        self.store.release(seq.lease)
        seq.lease = None
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.preemptions += 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        if seq.lease is not None:
            self.store.release(seq.lease)
            seq.lease = None
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

    def _reserve(self, seq: Sequence, n: int, too_large: list[Sequence]) -> bool:
        """Slots for ``n`` more tokens of ``seq``, preempting newer sequences if needed."""
        assert seq.lease is not None
        while True:
            res = self.store.allocate(seq.lease, seq.num_computed + n)
            if not isinstance(res, OutOfBlocks):
                return True
            victims = [s for s in self.running if s is not seq and s.status is Status.RUNNING]
            newer = [s for s in victims if (s.arrival, s.seq_id) > (seq.arrival, seq.seq_id)]
            if newer:
                self.preempt(newer[-1])
                continue
            if victims:  # only older sequences hold blocks: this one waits its turn
                self.preempt(seq)
                return False
            too_large.append(seq)  # alone and still too large for the pool
            return False
