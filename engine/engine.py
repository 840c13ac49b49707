"""The engine loop: schedule a step, run the model over the paged pool, sample, commit.

``Engine`` ties the model, the store and the scheduler together; ``engine.llm.LLM`` is
the public API on top of it. One thread drives it (``step``); the store's mover does
background I/O.

Overlapped decode. In the steady state of greedy decoding (every running sequence
decodes, greedily, one sequence a request, nothing waiting or loading) the host's work
for a step (block tables, staging, the graph launch) runs while the GPU computes the
previous one: a step's greedy picks stay on the GPU and feed the next step's input ids
in stream order, and the host reads them one step later, when it appends them, checks
stops and commits their blocks. A sequence that stopped at step N was also run at step
N + 1; that extra token is dropped (its KV lands in a slot that is freed, never
committed). Anything else (a prefill, a new arrival, sampling with a generator, a
sequence reaching its length, a pool that needs a preemption) first drains the step in
flight and then runs synchronously, so tokens are those of the synchronous engine.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.model import CausalLM
from engine.runner import ModelRunner
from engine.sampling import SamplingParams, make_generator, sample
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import CompletionOutput, RequestOutput, Sequence, Status
from engine.stats import EngineStats
from engine.tokenizer import Tokenizer
from kvstore.store import KVStore, OutOfBlocks
from kvstore.units import format_size
from radix import Namespace, hash_blocks


@dataclass
class _InFlight:
    """A decode step whose greedy picks the host has not read yet."""

    seqs: list[Sequence]  # the step's sequences, in batch order
    tokens: Tensor  # [B] int64 on the model's device: the picks
    host: Tensor  # [>= B] int64 host buffer (pinned on CUDA) receiving them
    ready: torch.cuda.Event | None  # the host copy has landed (None on CPU)


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    arrival: float


class Engine:
    """Runs requests to completion with continuous batching over a :class:`KVStore`.

    ``namespace`` roots every block key (model fingerprint, dtype, block size, tenant).
    ``stop_ids`` are the model's end-of-sequence ids. ``id_source`` makes sequence ids
    (injected for determinism in tests). ``cuda_graphs`` is
    :class:`engine.runner.ModelRunner`'s switch (``None``: on for CUDA with Triton
    attention); ``overlap`` switches overlapped greedy decode (see the module
    docstring; ``None``: on for CUDA). Both change speed only, never the tokens.
    """

    def __init__(self, model: CausalLM, tokenizer: Tokenizer | None, store: KVStore,
                 namespace: Namespace, stop_ids: frozenset[int],
                 config: SchedulerConfig | None = None,
                 id_source: Callable[[], int] | None = None,
                 cuda_graphs: bool | None = None, overlap: bool | None = None) -> None:
        if namespace.block_size != store.block_size:
            raise ValueError("namespace and store disagree on the block size")
        self.model = model
        self.tokenizer = tokenizer
        self.store = store
        self.namespace = namespace
        # CUDA launches (Triton's included) go to the calling thread's current device
        self._device_index = (model.device.index if model.device.type == "cuda" else None)
        self.root = namespace.root()
        self.stop_ids = stop_ids
        self.scheduler = Scheduler(store, config or SchedulerConfig())
        self._next_id = id_source or itertools.count().__next__
        self._requests: dict[str, _Request] = {}
        self.steps = 0
        self._computed = 0
        self._recomputed = 0
        self._finished = 0
        self._prompt_tokens = 0
        self._generated_tokens = 0
        self._cuda_graphs = cuda_graphs
        self._runner: ModelRunner | None = None
        self.overlap = model.device.type == "cuda" if overlap is None else overlap
        self.overlapped_steps = 0
        self._discarded = 0
        self._inflight: _InFlight | None = None
        self._host_ids: list[Tensor] = []  # two host buffers for the picks, used in turn

    # -------------------------------------------------------------- requests

    def check_request(self, prompt_ids: list[int]) -> None:
        """``ValueError`` when a prompt cannot run: empty, ids out of the vocabulary, or
        no room for it and one generated token in the model's context or in the device
        KV pool (:meth:`add_request` checks this too; a caller queuing several requests
        checks them all first)."""
        if not prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token ids out of the vocabulary (0..{vocab - 1}): {bad[:5]}")
        limit = self.model.config.max_context_len
        if len(prompt_ids) >= limit:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; this model's context "
                             f"holds {limit} (prompt and reply together)")
        store = self.store.config
        pool = store.gpu_blocks * store.block_size
        if len(prompt_ids) >= pool:
            block_bytes = store.layout.block_bytes if store.layout is not None else 0
            size = f", {format_size(store.gpu_blocks * block_bytes)}" if block_bytes else ""
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens; the device KV pool holds "
                f"{pool} ({store.gpu_blocks} blocks of {store.block_size} tokens{size}), "
                "prompt and reply together: give a shorter prompt or a larger pool "
                "(gpu_kv_bytes= / gpu_blocks= for LLM, --gpu-kv-bytes for kvstore serve "
                "and chat)")

    def add_request(self, request_id: str, prompt_ids: list[int],
                    params: SamplingParams) -> None:
        """Queue a request. ``ValueError`` for a duplicate id or a prompt that cannot
        run (:meth:`check_request`)."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already running")
        self.check_request(prompt_ids)
        now = time.perf_counter()
        seq = self._new_sequence(request_id, 0, list(prompt_ids), params, now)
        self._requests[request_id] = _Request(request_id, list(prompt_ids), params, [seq], now)
        self.scheduler.add(seq)

    def _new_sequence(self, request_id: str, index: int, prompt_ids: list[int],
                      params: SamplingParams, arrival: float) -> Sequence:
        chain = hash_blocks(self.root, prompt_ids, self.store.block_size)
        seq = Sequence(self._next_id(), request_id, index, prompt_ids, params, chain, arrival,
                       make_generator(params, index, self.model.device))
        if self.tokenizer is not None:
            seq.decoder = self.tokenizer.stream(skip_special_tokens=True)
        return seq

    def abort(self, request_id: str) -> None:
        """Stop a request now; its blocks stay cached."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            self.scheduler.cancel(seq)

    @property
    def has_unfinished(self) -> bool:
        return bool(self._requests)

    # ------------------------------------------------------------------ step

    def bind_device(self) -> None:
        """Make the model's CUDA device current on the calling thread (a no-op on CPU or
        when it already is). Kernels launch on the current device, which is per thread
        and cuda:0 by default, so every thread that runs steps calls this; :meth:`step`
        does."""
        idx = self._device_index
        if idx is not None and torch.cuda.current_device() != idx:
            torch.cuda.set_device(idx)

    def step(self) -> list[RequestOutput]:
        """Run one step; return a snapshot of every request that made progress (with
        overlapped decode, the tokens the host read this call: those of the step
        before). Makes the engine's device current on the calling thread."""
        self.bind_device()
        if self._inflight is not None:
            nxt = self._next_overlapped()
            if nxt is not None:
                return self._overlapped_step(nxt)
            return self._drain()
        sched = self.scheduler
        step, too_large = sched.schedule()
        touched: set[str] = set()
        for seq in too_large:
            self._finish(seq, "length")
            touched.add(seq.request_id)
        if not step.seqs:
            if sched.loading:
                sched.wait_loading()
            return [self._output(self._requests[r]) for r in touched if r in self._requests]
        self.steps += 1
        tables: list[list[int]] = []
        seq_lens: list[int] = []
        ids: list[int] = []
        for seq, n in zip(step.seqs, step.query_lens):
            assert seq.lease is not None
            tables.append(seq.lease.slots)
            seq_lens.append(seq.num_computed + n)
            _extend_tokens(ids, seq, seq.num_computed, n)
        logits = self.store.cost.timed(self.runner.run, ids, tables, step.query_lens, seq_lens)
        defer = self._can_defer(step.seqs, step.query_lens)
        rows = []
        samplers = []
        for i, (seq, n) in enumerate(zip(step.seqs, step.query_lens)):
            samples = step.samples(i)
            before = seq.recomputed_tokens
            seq.advance(n)
            self._computed += n
            self._recomputed += seq.recomputed_tokens - before
            assert seq.lease is not None
            self.store.commit(seq.lease, seq.num_computed)
            if samples:
                rows.append(i)
                samplers.append(seq)
            if not defer:
                touched.add(seq.request_id)
        if defer:
            self._launch_picks(logits, list(step.seqs))
        elif rows:
            self._sample(logits, rows, samplers)
        return [self._output(self._requests[r]) for r in touched if r in self._requests]

    # ------------------------------------------------------- overlapped decode

    def _steady(self, seqs: list[Sequence]) -> bool:
        """Whether ``seqs`` are every running sequence, all greedy single sequences, and
        nothing waits or loads (the steady state overlapped decode covers)."""
        sched = self.scheduler
        if sched.waiting or sched.loading or len(sched.running) != len(seqs):
            return False
        ids = {id(s) for s in seqs}
        return all(id(s) in ids and s.status is Status.RUNNING for s in sched.running) and \
            all(s.params.greedy and s.params.n == 1 for s in seqs)

    def _can_defer(self, seqs: list[Sequence], query_lens: list[int]) -> bool:
        """A synchronous step about to run ``seqs`` may leave its picks on the GPU:
        overlap is on, it is a pure decode step (one query each, every sequence past
        its prompt) of the steady state."""
        return (self.overlap and bool(seqs) and all(n == 1 for n in query_lens)
                and all(not s.in_prefill for s in seqs) and self._steady(seqs))

    def _launch_picks(self, logits: Tensor, seqs: list[Sequence]) -> None:
        """Take the greedy picks of ``logits`` ``[B, vocab]`` on the device and start
        their copy to the host; the step is in flight until :meth:`_read`."""
        tokens = logits.argmax(dim=-1)
        if not self._host_ids or self._host_ids[0].numel() < len(seqs):
            size = max(len(seqs), self.scheduler.config.max_num_seqs)
            pin = tokens.device.type == "cuda"
            self._host_ids = [torch.empty(size, dtype=torch.int64, pin_memory=pin)
                              for _ in range(2)]
        host = self._host_ids[0]
        self._host_ids.reverse()  # the next step's picks go to the other buffer
        ready = None
        if tokens.device.type == "cuda":
            host[:len(seqs)].copy_(tokens, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            host[:len(seqs)].copy_(tokens)
        self._inflight = _InFlight(seqs, tokens, host, ready)

    def _next_overlapped(self) -> list[Sequence] | None:
        """The sequences of the step in flight, if the next step may run them before
        their picks are read: still the steady state, none reaching its length with
        the pick in flight, and a slot for each next token without preempting."""
        flight = self._inflight
        assert flight is not None
        seqs = flight.seqs
        if not self._steady(seqs) or len(seqs) > self.scheduler.config.max_num_batched_tokens:
            return None
        limit = self.model.config.max_context_len
        for s in seqs:
            # after appending the pick in flight: would it stop by length?
            if len(s.output_ids) + 1 >= s.params.max_tokens or s.num_tokens + 1 >= limit:
                return None
        for s in seqs:
            assert s.lease is not None
            if isinstance(self.store.allocate(s.lease, s.num_computed + 1), OutOfBlocks):
                return None  # a synchronous step preempts as the scheduler decides
        return seqs

    def _overlapped_step(self, seqs: list[Sequence]) -> list[RequestOutput]:
        """Run ``seqs`` (the step in flight's) on its picks, then read those picks."""
        flight = self._inflight
        assert flight is not None
        self.steps += 1
        self.overlapped_steps += 1
        tables = []
        seq_lens = []
        for s in seqs:
            assert s.lease is not None
            tables.append(s.lease.slots)
            seq_lens.append(s.num_computed + 1)
        logits = self.runner.run([0] * len(seqs), tables, [1] * len(seqs), seq_lens,
                                 device_ids=flight.tokens)
        for s in seqs:
            s.advance(1)
            self._computed += 1
        self._launch_picks(logits, seqs)
        outs = self._read(flight)
        for s in seqs:  # the tokens just read are the inputs of the step launched above
            if s.status is Status.RUNNING:
                assert s.lease is not None
                self.store.commit(s.lease, s.num_computed)
        if all(s.status is not Status.RUNNING for s in seqs):
            self._drain()  # every sequence stopped: nothing left to read
        return outs

    def _drain(self) -> list[RequestOutput]:
        """Read the step in flight; the next call runs synchronously."""
        flight = self._inflight
        assert flight is not None
        self._inflight = None
        return self._read(flight)

    def _read(self, flight: _InFlight) -> list[RequestOutput]:
        """Wait for ``flight``'s picks on the host and append them (stops, lengths);
        sequences that finished meanwhile (an abort, a stop one step earlier) skip
        theirs."""
        if flight.ready is not None:
            flight.ready.synchronize()
        picks = flight.host[:len(flight.seqs)].tolist()
        touched: set[str] = set()
        for seq, tok in zip(flight.seqs, picks):
            if seq.status is not Status.RUNNING:
                self._discarded += 1  # it stopped (or was aborted) a step earlier
                continue
            self._append(seq, tok)
            touched.add(seq.request_id)
        return [self._output(self._requests[r]) for r in touched if r in self._requests]

    @property
    def runner(self) -> ModelRunner:
        """The model runner (made on first use: it sizes its buffers from the store's
        GPU pool and the scheduler's limits)."""
        if self._runner is None:
            cfg = self.scheduler.config
            self._runner = ModelRunner(self.model, self.store.gpu.tensor, self.store.block_size,
                                       cfg.max_num_seqs, cfg.max_num_batched_tokens,
                                       cuda_graphs=self._cuda_graphs)
        return self._runner

    def _sample(self, logits: Tensor, rows: list[int], seqs: list[Sequence]) -> None:
        """Sample one token for ``seqs[j]`` from ``logits[rows[j]]`` and append it.

        Greedy rows take one argmax over the whole batch (one device sync); other rows
        go through :func:`engine.sampling.sample` with their own generators.
        """
        # n > 1: a request's first sequence forks once its prompt is done; every fork
        # samples its own first token from the same logits row.
        all_rows: list[int] = []
        all_seqs: list[Sequence] = []
        for row, seq in zip(rows, seqs):
            all_rows.append(row)
            all_seqs.append(seq)
            if seq.params.n > 1 and not seq.output_ids and seq.index == 0:
                req = self._requests[seq.request_id]
                if len(req.seqs) == 1:
                    for k in range(1, seq.params.n):
                        child = self._fork(seq, k)
                        req.seqs.append(child)
                        all_rows.append(row)
                        all_seqs.append(child)
        tokens = [0] * len(all_seqs)
        if any(s.params.greedy for s in all_seqs):
            picks = logits.argmax(dim=-1).tolist()
            for j, (row, seq) in enumerate(zip(all_rows, all_seqs)):
                if seq.params.greedy:
                    tokens[j] = picks[row]
        drawn_rows = [j for j, s in enumerate(all_seqs) if not s.params.greedy]
        if drawn_rows:
            idx = torch.tensor([all_rows[j] for j in drawn_rows], device=logits.device)
            drawn = sample(logits.index_select(0, idx), [all_seqs[j].params for j in drawn_rows],
                           [all_seqs[j].generator for j in drawn_rows])
            for j, tok in zip(drawn_rows, drawn):
                tokens[j] = tok
        for seq, tok in zip(all_seqs, tokens):
            self._append(seq, tok)

    def _fork(self, seq: Sequence, index: int) -> Sequence:
        assert seq.lease is not None
        lease = self.store.fork(seq.lease)
        child = Sequence(self._next_id(), seq.request_id, index, seq.prompt_ids, seq.params,
                         lease.chain, seq.arrival,
                         make_generator(seq.params, index, self.model.device))
        child.lease = lease
        child.num_computed = seq.num_computed
        child.cached_tokens = dict(seq.cached_tokens)
        child.max_computed = seq.max_computed
        if self.tokenizer is not None:
            child.decoder = self.tokenizer.stream(skip_special_tokens=True)
        self.scheduler.add_running(child)
        return child

    def _append(self, seq: Sequence, tok: int) -> None:
        seq.mark_first_token()
        seq.output_ids.append(tok)
        seq.chain.extend([tok])
        params = seq.params
        if tok in params.stop_token_ids or (not params.ignore_eos and tok in self.stop_ids):
            self._finish(seq, "stop")
            return
        if seq.decoder is not None:
            seq.text += seq.decoder.push(tok)
            for stop in params.stop:
                cut = seq.text.find(stop)
                if cut >= 0:
                    seq.text = seq.text[:cut]
                    self._finish(seq, "stop")
                    return
        if len(seq.output_ids) >= params.max_tokens or \
                seq.num_tokens >= self.model.config.max_context_len:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        seq.finish_time = time.perf_counter()
        if seq.decoder is not None and reason != "stop":
            seq.text += seq.decoder.flush()
        self.scheduler.finish(seq)

    def _output(self, req: _Request) -> RequestOutput:
        """A snapshot of ``req`` (its own copies of the token lists); a finished request
        leaves the engine."""
        seqs = req.seqs
        if len(seqs) > 1:
            seqs = sorted(seqs, key=lambda s: s.index)
        # A request forks its n sequences when it samples its first token; one that
        # ended before that (too large for the pool) never forks.
        done = all(s.status is Status.FINISHED for s in seqs) and (
            len(seqs) == req.params.n or not seqs[0].output_ids)
        first = [s.first_token_time for s in seqs if s.first_token_time is not None]
        last = [s.finish_time for s in seqs if s.finish_time is not None]
        ttft = min(first) - req.arrival if first else None
        decode = max(last) - min(first) if first and last and done else None
        outs = [CompletionOutput(s.index, s.text, s.output_ids[:], s.finish_reason)
                for s in seqs]
        resumed: dict[str, int] = {}
        for s in seqs:
            for tier, n in s.resumed_tokens.items():
                resumed[tier] = resumed.get(tier, 0) + n
        out = RequestOutput(req.request_id, req.prompt_ids, outs, dict(req.seqs[0].cached_tokens),
                            ttft, decode, done, resumed,
                            sum(s.preemptions for s in seqs),
                            sum(s.computed_tokens for s in seqs),
                            sum(s.recomputed_tokens for s in seqs))
        if done:
            del self._requests[req.request_id]
            self._finished += 1
            self._prompt_tokens += len(req.prompt_ids)
            self._generated_tokens += sum(len(s.output_ids) for s in seqs)
        return out

    def stats(self) -> EngineStats:
        """Counters since the engine was created (see :mod:`engine.stats`)."""
        sched = self.scheduler
        return EngineStats(
            steps=self.steps, requests_finished=self._finished,
            prompt_tokens=self._prompt_tokens, generated_tokens=self._generated_tokens,
            cached_tokens=dict(sched.cached_tokens), resumed_tokens=dict(sched.resumed_tokens),
            computed_tokens=self._computed, recomputed_tokens=self._recomputed,
            preemptions=sched.preemptions, parked_blocks=sched.parked_blocks,
            deferred_admissions=sched.deferred, waiting=len(sched.waiting),
            loading=len(sched.loading), running=len(sched.running),
            overlapped_steps=self.overlapped_steps, discarded_tokens=self._discarded)

    def run(self) -> Iterator[RequestOutput]:
        """Step until every request is finished, yielding snapshots as they progress."""
        while self.has_unfinished:
            yield from self.step()


def _extend_tokens(out: list[int], seq: Sequence, start: int, n: int) -> None:
    """Append ``seq.token_ids[start:start + n]`` to ``out`` without building the whole
    prompt + output list."""
    prompt = seq.prompt_ids
    end = start + n
    if end <= len(prompt):
        out += prompt[start:end]
    elif start >= len(prompt):
        out += seq.output_ids[start - len(prompt):end - len(prompt)]
    else:
        out += prompt[start:]
        out += seq.output_ids[:end - len(prompt)]
