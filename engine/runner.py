"""Runs the model for one scheduled step: staged metadata, CUDA graphs for decode steps.

:class:`ModelRunner` sits between the engine loop and :class:`engine.model.CausalLM`.
Each step's metadata is built on the host in one buffer and moved with one
non-blocking copy (:class:`engine.batch.BatchStager`). On CUDA with the Triton attention
backend, a step made only of one-query sequences (pure decode, the common case) replays
a CUDA graph captured for the next batch size up (``1, 2, 4, 8, 16, 32, 48, 64``,
then every 32 up to ``max_num_seqs``); the graph reads static input buffers whose block tables are
``graph_width`` columns wide. Padding rows (up to the captured size) compute on token 0
at position 0 over pool block 0 and write no KV (slot mapping ``-1``); every operation
of the model is row-independent, so they cannot change the real rows, and their logits
are dropped. Prefill, mixed steps, steps wider than the graphs and every step on CPU run
the eager forward.

Small steps that are not pure decode (a short question after a cached prefix, a chunked
prefill tail, a few decodes beside a short prefill) are host-bound in eager mode: a
forward launches hundreds of small kernels. They replay a *mixed* graph keyed by
``(rows, tokens)``: the step's ``B`` sequences plus at least one padding row, padded to
the next row count in :data:`MIXED_GRAPH_ROWS` above ``B`` and the next token count in
:data:`MIXED_GRAPH_TOKENS` (the last padding row takes the extra queries, at positions
``0 ..`` over block 0, writing no KV). Steps with more tokens or rows run eagerly: they
are compute-bound, and launches are a small part of them.

A size's graph is captured the first time a step needs it (a fraction of a second each),
or up front for every size by :meth:`ModelRunner.capture`; a capture failure turns graphs
off with a warning and the engine goes on eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from engine.batch import BatchStager
from engine.model import CausalLM

log = logging.getLogger(__name__)

GRAPH_MAX_CONTEXT = 131072
"""Default longest context (tokens) a graph-replayed step may have (also bounded by the
model's context and the KV pool). The graphs' block tables are this wide: a step uploads
``rows x context / block_size`` int32 of them (256 KiB for 8 rows at 128k tokens of 16),
and the kernels' launch shapes do not depend on it (the split-KV count is already at its
cap at 8k). A step past it runs eagerly: at 8k, multi-turn chats of Llama-3-8B past the
fourth turn decoded eagerly, host-bound (the GPU half idle on an H200)."""


MIXED_GRAPH_TOKENS = (32, 64, 128, 256)
"""Token counts (padding included) of the captured mixed-step graphs."""

MIXED_GRAPH_ROWS = (2, 4, 8)
"""Row counts (sequences plus at least one padding row) of the captured mixed-step graphs."""


def mixed_graph_key(num_tokens: int, num_seqs: int,
                    max_rows: int) -> tuple[int, int] | None:
    """The ``(rows, tokens)`` mixed graph that holds a step of ``num_tokens`` tokens from
    ``num_seqs`` sequences (one padding row at least, each padding row one token or
    more), or ``None`` when none does; no key has more than ``max_rows`` rows."""
    rows = next((r for r in MIXED_GRAPH_ROWS if num_seqs < r <= max_rows), None)
    if rows is None:
        return None
    tokens = next((t for t in MIXED_GRAPH_TOKENS if t >= num_tokens + rows - num_seqs), None)
    return None if tokens is None else (rows, tokens)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture: powers of two up to 64, then every 32, then
    ``max_num_seqs`` itself; none larger than ``max_num_seqs``. Ascending."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    sizes = [s for s in (1, 2, 4, 8, 16, 32, 48, 64) if s <= max_num_seqs]
    sizes += range(96, max_num_seqs + 1, 32)
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class ModelRunner:
    """Runs ``model`` over ``kv_pool`` one step at a time (see the module docstring).

    ``max_num_seqs`` and ``max_num_tokens`` size the buffers (larger steps still run,
    eagerly, on buffers grown to fit). ``cuda_graphs`` ``None`` enables graphs exactly
    when the model is on CUDA with the Triton backend; ``True`` requires that and raises
    ``ValueError`` otherwise; ``False`` disables them. ``graph_max_context`` bounds the
    context (tokens) of a graph-replayed step. Called from one thread.
    """

    def __init__(self, model: CausalLM, kv_pool: Tensor, block_size: int, max_num_seqs: int,
                 max_num_tokens: int, *, cuda_graphs: bool | None = None,
                 graph_max_context: int = GRAPH_MAX_CONTEXT) -> None:
        model.check_kv_pool(kv_pool)
        capable = model.device.type == "cuda" and model.backend.name == "triton"
        if cuda_graphs and not capable:
            raise ValueError("CUDA graphs need a CUDA model with the Triton attention backend")
        self.model = model
        self.kv_pool = kv_pool
        self.block_size = block_size
        self.use_graphs = capable if cuda_graphs is None else cuda_graphs
        self.graph_sizes = graph_batch_sizes(max_num_seqs)
        context = min(model.config.max_position_embeddings, graph_max_context,
                      kv_pool.shape[0] * block_size)
        self.graph_width = -(-context // block_size)
        self.graph_steps = 0
        self.eager_steps = 0
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self._mixed: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self._max_rows = max_num_seqs + 1  # mixed graphs: the step's rows + padding
        self._graph_stager: BatchStager | None = None
        # torch's own name for what graph_pool_handle() returns (a NewType of tuple[int, int])
        self._graph_pool: torch.cuda._POOL_HANDLE | None = None
        self._capture_stream: torch.cuda.Stream | None = None
        self._eager = BatchStager(block_size, model.device, max(1, max_num_tokens),
                                  max_num_seqs, max_num_seqs * 64)

    @property
    def captured(self) -> list[int]:
        """Batch sizes whose decode graph exists, ascending."""
        return sorted(self._graphs)

    @property
    def eager_capacity(self) -> tuple[int, int]:
        """``(tokens, sequences)`` the eager steps' stager holds now (it grows to fit)."""
        return self._eager.max_tokens, self._eager.max_seqs

    @property
    def captured_mixed(self) -> list[tuple[int, int]]:
        """``(rows, tokens)`` of the mixed-step graphs that exist, ascending."""
        return sorted(self._mixed)

    def run(self, token_ids: Sequence[int], block_tables: Sequence[Sequence[int]],
            query_lens: Sequence[int], seq_lens: Sequence[int],
            device_ids: Tensor | None = None) -> Tensor:
        """fp32 logits ``[B, vocab]`` of the last query of each of the ``B`` sequences.

        Arguments are those of :meth:`engine.batch.BatchStager.stage` (``token_ids`` the
        step's query tokens in batch order). ``device_ids`` ``[T]`` int64 on the model's
        device, when given, replaces ``token_ids`` (whose values are then ignored) with
        tokens the host has not read yet (the previous step's picks), copied in stream
        order. The step's K/V is written to the pool. The returned tensor may be a
        graph's output buffer: read it before the next call.
        """
        num_seqs = len(seq_lens)
        if (self.use_graphs and num_seqs > 0
                and max(seq_lens) <= self.graph_width * self.block_size):
            if num_seqs == len(token_ids) and num_seqs <= self.graph_sizes[-1]:
                size = next(s for s in self.graph_sizes if s >= num_seqs)
                if size not in self._graphs:
                    self.capture([size])
                if size in self._graphs:
                    assert self._graph_stager is not None
                    ids, _, _ = self._graph_stager.stage(token_ids, block_tables, query_lens,
                                                         seq_lens, pad_seqs=size,
                                                         width=self.graph_width)
                    if device_ids is not None:
                        ids[:num_seqs].copy_(device_ids)
                    graph, logits = self._graphs[size]
                    graph.replay()
                    self.graph_steps += 1
                    return logits[:num_seqs]
            else:
                key = mixed_graph_key(len(token_ids), num_seqs, self._max_rows)
                if key is not None and key not in self._mixed:
                    self.capture_mixed([key])
                if key is not None and key in self._mixed:
                    assert self._graph_stager is not None
                    ids, _, _ = self._graph_stager.stage(
                        token_ids, block_tables, query_lens, seq_lens, pad_seqs=key[0],
                        pad_tokens=key[1], width=self.graph_width)
                    if device_ids is not None:
                        ids[:len(token_ids)].copy_(device_ids)
                    graph, logits = self._mixed[key]
                    graph.replay()
                    self.graph_steps += 1
                    return logits[:num_seqs]
        width = max((-(-length // self.block_size) for length in seq_lens), default=0)
        stager = self._eager
        if not stager.fits(len(token_ids), num_seqs, width):
            stager = self._eager = BatchStager(
                self.block_size, self.model.device, max(stager.max_tokens, len(token_ids)),
                max(stager.max_seqs, num_seqs),
                max(stager.max_cells, num_seqs * width, 2 * stager.max_cells))
        input_ids, positions, batch = stager.stage(token_ids, block_tables, query_lens,
                                                   seq_lens)
        if device_ids is not None:
            input_ids = device_ids
        self.eager_steps += 1
        return self.model(input_ids, positions, batch, self.kv_pool)

    def capture(self, sizes: Sequence[int] | None = None) -> None:
        """Capture the decode graph of each of ``sizes`` (default: every size in
        :attr:`graph_sizes`, then every mixed-step graph) not captured yet, largest
        first, into one shared memory pool (replays never overlap, and each step reads
        its logits before the next). Each
        size first runs once eagerly on padding-only inputs, which compiles its kernels
        and writes no KV. ``ValueError`` for a size not in :attr:`graph_sizes`. On a
        capture failure graphs are turned off (logged) and steps run eagerly."""
        if not self.use_graphs:
            return
        todo = set(self.graph_sizes if sizes is None else sizes)
        if not todo <= set(self.graph_sizes):
            raise ValueError(f"sizes {sorted(todo)} are not all in {self.graph_sizes}")
        width = self._init_graph_stager()
        assert self._graph_stager is not None
        try:
            for size in sorted(todo - set(self._graphs), reverse=True):
                input_ids, positions, batch = self._graph_stager.stage(
                    [], [], [], [], pad_seqs=size, width=width)
                self.model(input_ids, positions, batch, self.kv_pool)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._graph_pool, stream=self._capture_stream,
                                      capture_error_mode="thread_local"):
                    logits = self.model(input_ids, positions, batch, self.kv_pool)
                self._graphs[size] = (graph, logits)
        except RuntimeError as exc:
            log.warning("CUDA graph capture failed (%s); running every step eagerly", exc)
            self.use_graphs = False
            self._graphs.clear()
            self._mixed.clear()
            return
        if sizes is None:
            self.capture_mixed()

    def mixed_keys(self) -> list[tuple[int, int]]:
        """Every ``(rows, tokens)`` mixed graph this runner may replay."""
        rows = [r for r in MIXED_GRAPH_ROWS if r <= self._max_rows]
        return [(r, t) for r in rows for t in MIXED_GRAPH_TOKENS if t >= r]

    def capture_mixed(self, keys: Sequence[tuple[int, int]] | None = None) -> None:
        """Capture the mixed-step graph of each of ``keys`` (default:
        :meth:`mixed_keys`) not captured yet, into the decode graphs' memory pool, after
        one eager run on padding-only inputs (which writes no KV). On a capture failure
        graphs are turned off (logged) and steps run eagerly."""
        if not self.use_graphs:
            return
        todo = [k for k in (self.mixed_keys() if keys is None else keys) if k not in self._mixed]
        if not todo:
            return
        width = self._init_graph_stager()
        assert self._graph_stager is not None
        try:
            for rows, tokens in sorted(todo, reverse=True):
                input_ids, positions, batch = self._graph_stager.stage(
                    [], [], [], [], pad_seqs=rows, pad_tokens=tokens, width=width)
                self.model(input_ids, positions, batch, self.kv_pool)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._graph_pool, stream=self._capture_stream,
                                      capture_error_mode="thread_local"):
                    logits = self.model(input_ids, positions, batch, self.kv_pool)
                self._mixed[(rows, tokens)] = (graph, logits)
        except RuntimeError as exc:
            log.warning("CUDA graph capture failed (%s); running every step eagerly", exc)
            self.use_graphs = False
            self._graphs.clear()
            self._mixed.clear()

    def _init_graph_stager(self) -> int:
        """Make the graphs' stager and memory pool on first use; return the width."""
        width = self.graph_width
        if self._graph_stager is None:
            rows = max(self.graph_sizes[-1], self._max_rows)
            tokens = max(rows, MIXED_GRAPH_TOKENS[-1])
            self._graph_stager = BatchStager(self.block_size, self.model.device, tokens,
                                             rows, rows * width)
            self._graph_pool = torch.cuda.graph_pool_handle()
            # torch's default capture stream is made once per process, on whichever
            # device was current then: a model on another GPU needs its own
            self._capture_stream = torch.cuda.Stream(device=self.model.device)
        return width
