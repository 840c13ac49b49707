"""Per-step metadata of a batch of sequences running over the paged KV pool.

One forward step runs ``T`` query tokens from ``B`` sequences. Sequence ``b`` contributes
its last ``n_b`` positions (``n_b == 1`` for decode, ``n_b > 1`` for a prefill chunk,
``n_b < seq_lens[b]`` when a prefix is already in the cache). The tensors below are the
contract between the scheduler, :mod:`engine.model` and the attention backends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor


@dataclass
class AttentionBatch:
    """Metadata of one forward step; every tensor lives on the model's device.

    - ``slot_mapping`` ``[T]`` int64: KV destination of each query token,
      ``slot * block_size + offset_in_block``; ``-1`` skips the token (padding).
    - ``block_tables`` ``[B, max_blocks]`` int32: pool slot of each block of each
      sequence; entries past a sequence's last block are ignored.
    - ``query_start_loc`` ``[B + 1]`` int32: sequence ``b``'s queries are
      ``q[query_start_loc[b]:query_start_loc[b + 1]]``.
    - ``seq_lens`` ``[B]`` int32: context length of each sequence INCLUDING its queries.
    - ``logits_indices`` ``[N]`` int64: rows of the ``T`` tokens whose logits to return
      (usually the last query of each sequence that samples this step).
    """

    slot_mapping: Tensor
    block_tables: Tensor
    query_start_loc: Tensor
    seq_lens: Tensor
    logits_indices: Tensor

    @property
    def num_seqs(self) -> int:
        """``B``, the number of sequences in the step."""
        return int(self.seq_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        """``T``, the number of query tokens in the step."""
        return int(self.slot_mapping.shape[0])

    def to(self, device: torch.device | str) -> AttentionBatch:
        """A copy with every tensor on ``device`` (non-blocking where possible)."""
        return AttentionBatch(*(t.to(device, non_blocking=True) for t in (
            self.slot_mapping, self.block_tables, self.query_start_loc, self.seq_lens,
            self.logits_indices)))


def build_batch(block_tables: Sequence[Sequence[int]], query_lens: Sequence[int],
                seq_lens: Sequence[int], block_size: int,
                device: torch.device | str = "cpu") -> tuple[AttentionBatch, Tensor]:
    """Metadata and token positions for ``B`` sequences, from host-side lists.

    ``block_tables[b]`` lists the pool slots of sequence ``b``'s blocks (it must cover
    ``seq_lens[b]`` tokens), ``query_lens[b]`` (``n_b >= 1``) is how many of its last
    positions run this step and ``seq_lens[b]`` its context length including them.
    Logits are selected for the last query of every sequence.

    Returns ``(batch, positions)`` with ``positions`` ``[T]`` int64, the absolute position
    of every query token (``seq_lens[b] - n_b .. seq_lens[b] - 1`` for sequence ``b``).
    """
    if not len(block_tables) == len(query_lens) == len(seq_lens):
        raise ValueError("block_tables, query_lens and seq_lens must have one entry per sequence")
    slots: list[int] = []
    positions: list[int] = []
    starts = [0]
    for table, n, length in zip(block_tables, query_lens, seq_lens, strict=True):
        if not 1 <= n <= length:
            raise ValueError(f"need 1 <= query_len <= seq_len, got query_len={n}, seq_len={length}")
        if len(table) * block_size < length:
            raise ValueError(
                f"block table of {len(table)} blocks holds {len(table) * block_size} tokens, "
                f"fewer than seq_len={length}")
        for pos in range(length - n, length):
            positions.append(pos)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
        starts.append(starts[-1] + n)
    max_blocks = max((len(t) for t in block_tables), default=0)
    padded = [list(t) + [0] * (max_blocks - len(t)) for t in block_tables]
    batch = AttentionBatch(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device).reshape(
            len(block_tables), max_blocks),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(list(seq_lens), dtype=torch.int32, device=device),
        logits_indices=torch.tensor(starts[1:], dtype=torch.int64, device=device) - 1,
    )
    return batch, torch.tensor(positions, dtype=torch.int64, device=device)


_I64 = 8
_I32 = 4


class BatchStager:
    """Builds a step's inputs in one host buffer and moves them with one copy.

    Every per-step tensor (token ids, positions, slot mapping, logits indices,
    ``query_start_loc``, ``seq_lens``, block tables) is a fixed section of one byte
    buffer: pinned host memory filled through numpy views, then one non-blocking copy
    into a device buffer of the same layout, whose section views the model reads. On CPU
    the host buffer is the device buffer and nothing is copied.

    Capacities are fixed at construction: ``max_tokens`` query tokens, ``max_seqs``
    sequences and ``max_cells`` block-table entries (rows times width). The device views
    keep their addresses for the stager's life, which is what lets a captured CUDA graph
    read them (see :mod:`engine.runner`). Tensors returned by :meth:`stage` stay valid
    until the next :meth:`stage` call on the same stager.
    """

    def __init__(self, block_size: int, device: torch.device | str, max_tokens: int,
                 max_seqs: int, max_cells: int) -> None:
        if min(block_size, max_tokens, max_seqs, max_cells) < 1:
            raise ValueError("block_size and every capacity must be >= 1")
        self.block_size = block_size
        self.device = torch.device(device)
        self.max_tokens = max_tokens
        self.max_seqs = max_seqs
        self.max_cells = max_cells
        offsets = {}
        at = 0
        for name, count, size in (("ids", max_tokens, _I64), ("pos", max_tokens, _I64),
                                  ("slots", max_tokens, _I64), ("logits", max_seqs, _I64),
                                  ("qsl", max_seqs + 1, _I32), ("lens", max_seqs, _I32),
                                  ("tables", max_cells, _I32)):
            offsets[name] = (at, count, size)
            at += -(-count * size // _I64) * _I64  # keep every section 8-byte aligned
        self._tables_at = offsets["tables"][0]
        cuda = self.device.type == "cuda"
        self._host = torch.zeros(at, dtype=torch.uint8, pin_memory=cuda)
        self._dev = torch.zeros(at, dtype=torch.uint8, device=self.device) if cuda else self._host
        self._copied = torch.cuda.Event() if cuda else None
        host_np = self._host.numpy()
        h: dict[str, npt.NDArray[np.signedinteger]] = {
            name: host_np[o:o + n * s].view(np.int64 if s == _I64 else np.int32)
            for name, (o, n, s) in offsets.items()}
        d = {name: self._dev[o:o + n * s].view(torch.int64 if s == _I64 else torch.int32)
             for name, (o, n, s) in offsets.items()}
        self._h_ids, self._h_pos, self._h_slots = h["ids"], h["pos"], h["slots"]
        self._h_logits, self._h_qsl, self._h_lens, self._h_tables = (
            h["logits"], h["qsl"], h["lens"], h["tables"])
        self._d_ids, self._d_pos, self._d_slots = d["ids"], d["pos"], d["slots"]
        self._d_logits, self._d_qsl, self._d_lens, self._d_tables = (
            d["logits"], d["qsl"], d["lens"], d["tables"])

    def fits(self, num_tokens: int, num_seqs: int, width: int) -> bool:
        """Whether a step of these sizes (block tables ``width`` wide) fits the buffers."""
        return (num_tokens <= self.max_tokens and num_seqs <= self.max_seqs
                and num_seqs * width <= self.max_cells)

    def stage(self, token_ids: Sequence[int], block_tables: Sequence[Sequence[int]],
              query_lens: Sequence[int], seq_lens: Sequence[int], *, pad_seqs: int = 0,
              pad_tokens: int = 0,
              width: int | None = None) -> tuple[Tensor, Tensor, AttentionBatch]:
        """Fill and upload one step; return ``(input_ids, positions, batch)`` views.

        ``token_ids`` are the ``T = sum(query_lens)`` query tokens in batch order; the
        other arguments are as in :func:`build_batch` (which this matches, tensor for
        tensor, except that block-table columns past a sequence's last needed block hold
        stale values). ``pad_seqs`` appends padding sequences up to that many rows: one
        query each with token 0 at position 0, ``seq_len`` 1, block 0 and slot mapping
        ``-1`` (writes no KV); their logits rows are garbage to ignore. ``pad_tokens``
        pads the step to that many tokens: the last padding row takes the extra queries
        (positions ``0 .. n - 1``, ``seq_len`` ``n``, every block 0, slot mapping ``-1``),
        so it needs at least one padding row. ``width`` fixes the block-table width
        (default: the most blocks any sequence needs). Raises ``ValueError`` when the
        step does not fit (:meth:`fits`) or the lists disagree.
        """
        bs = self.block_size
        num_seqs = len(seq_lens)
        if not len(block_tables) == len(query_lens) == num_seqs:
            raise ValueError("block_tables, query_lens and seq_lens must have one entry per "
                             "sequence")
        needed = [-(-length // bs) for length in seq_lens]
        if width is None:
            width = max(needed, default=0)
        rows = max(num_seqs, pad_seqs)
        num_tokens = len(token_ids)
        total = num_tokens + rows - num_seqs
        extra = max(0, pad_tokens - total)  # queries of the last padding row beyond its 1
        if extra and rows == num_seqs:
            raise ValueError("pad_tokens needs a padding row (pad_seqs > number of sequences)")
        if extra and -(-(1 + extra) // bs) > width:
            raise ValueError(f"{1 + extra} padding queries need more than width {width}")
        total += extra
        if not self.fits(total, rows, width):
            raise ValueError(f"step of {total} tokens, {rows} sequences and width {width} "
                             f"exceeds the stager ({self.max_tokens}, {self.max_seqs}, "
                             f"{self.max_cells})")
        if self._copied is not None:
            self._copied.synchronize()  # the previous upload has left the host buffer
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        tables = self._h_tables[:rows * width].reshape(rows, width) if width else None
        for i, (table, n, length, k) in enumerate(zip(block_tables, query_lens, seq_lens,
                                                      needed, strict=True)):
            if not 1 <= n <= length:
                raise ValueError(f"need 1 <= query_len <= seq_len, got query_len={n}, "
                                 f"seq_len={length}")
            if len(table) < k or k > width:
                raise ValueError(f"block table of {len(table)} blocks (width {width}) cannot "
                                 f"hold seq_len={length}")
            if n == 1:
                pos = length - 1
                positions.append(pos)
                slots.append(table[pos // bs] * bs + pos % bs)
            else:
                span = range(length - n, length)
                positions += span
                slots += [table[p // bs] * bs + p % bs for p in span]
            starts.append(starts[-1] + n)
            assert tables is not None
            tables[i, :k] = table if len(table) == k else table[:k]
        if num_tokens != starts[-1]:
            raise ValueError(f"{num_tokens} token ids for {starts[-1]} query positions")
        self._h_ids[:num_tokens] = token_ids
        self._h_pos[:num_tokens] = positions
        self._h_slots[:num_tokens] = slots
        self._h_qsl[:num_seqs + 1] = starts
        self._h_lens[:num_seqs] = seq_lens
        if rows > num_seqs:
            pad = slice(num_tokens, total)
            npad = rows - num_seqs
            last_start = num_tokens + npad - 1  # the last padding row's first query
            self._h_ids[pad] = 0
            self._h_pos[num_tokens:last_start] = 0
            self._h_pos[last_start:total] = np.arange(1 + extra)
            self._h_slots[pad] = -1
            self._h_qsl[num_seqs + 1:rows] = np.arange(num_tokens + 1, last_start + 1)
            self._h_qsl[rows] = total
            self._h_lens[num_seqs:rows - 1] = 1
            self._h_lens[rows - 1] = 1 + extra
            if tables is not None:
                tables[num_seqs:rows, 0] = 0
                tables[rows - 1, :-(-(1 + extra) // bs)] = 0
        self._h_logits[:rows] = self._h_qsl[1:rows + 1]
        self._h_logits[:rows] -= 1
        if self._copied is not None:
            nbytes = self._tables_at + rows * width * _I32
            self._dev[:nbytes].copy_(self._host[:nbytes], non_blocking=True)
            self._copied.record()
        return self.views(total, rows, width)

    def views(self, num_tokens: int, num_seqs: int, width: int) -> tuple[Tensor, Tensor,
                                                                          AttentionBatch]:
        """The device views ``(input_ids, positions, batch)`` of a staged step's sizes."""
        batch = AttentionBatch(
            slot_mapping=self._d_slots[:num_tokens],
            block_tables=self._d_tables[:num_seqs * width].view(num_seqs, width),
            query_start_loc=self._d_qsl[:num_seqs + 1],
            seq_lens=self._d_lens[:num_seqs],
            logits_indices=self._d_logits[:num_seqs],
        )
        return self._d_ids[:num_tokens], self._d_pos[:num_tokens], batch
