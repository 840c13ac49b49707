"""Per-step metadata of a batch of sequences running over the paged KV pool.

One forward step runs ``T`` query tokens from ``B`` sequences. Sequence ``b`` contributes
its last ``n_b`` positions (``n_b == 1`` for decode, ``n_b > 1`` for a prefill chunk,
``n_b < seq_lens[b]`` when a prefix is already in the cache). The tensors below are the
contract between the scheduler, :mod:`engine.model` and the attention backends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
