"""Sampling parameters and the sampler (greedy, temperature, top-k, top-p, seeds)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

SEED_RANGE = (-(1 << 63), (1 << 63) - 1 - 64)
"""Seeds ``torch.Generator.manual_seed`` accepts (a signed 64-bit integer), leaving room
for ``seed + i`` of up to 64 sequences."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the tokens of one request. Validated on construction.

    ``temperature`` 0 is greedy. ``top_k`` 0 and ``top_p`` 1.0 disable those filters.
    ``seed`` makes sampling reproducible (sequence ``i`` of ``n`` uses ``seed + i``).
    Generation stops at ``max_tokens`` new tokens, at any of ``stop_token_ids`` (and the
    model's end-of-sequence ids unless ``ignore_eos``), or when the text contains one of
    the ``stop`` strings (which is cut off the returned text).
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    n: int = 1
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"SamplingParams: {msg}")

        def integer(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def number(value: object) -> bool:
            return (isinstance(value, int | float) and not isinstance(value, bool)
                    and math.isfinite(value))

        need(integer(self.max_tokens) and self.max_tokens >= 1,
             f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        need(number(self.temperature) and self.temperature >= 0,
             f"temperature must be a number >= 0 (0 is greedy), got {self.temperature!r}")
        need(integer(self.top_k) and self.top_k >= 0,
             f"top_k must be an int >= 0 (0 disables it), got {self.top_k!r}")
        need(number(self.top_p) and 0 < self.top_p <= 1,
             f"top_p must be a number in (0, 1], got {self.top_p!r}")
        need(integer(self.n) and 1 <= self.n <= 64, f"n must be an int 1..64, got {self.n!r}")
        need(self.seed is None or integer(self.seed),
             f"seed must be an int or None, got {self.seed!r}")
        low, high = SEED_RANGE
        need(self.seed is None or low <= self.seed <= high,
             f"seed must be in {low}..{high} (a 64-bit integer with room for seed + i of "
             f"n sequences), got {self.seed!r}: reduce it, e.g. seed % 2**62")
        need(isinstance(self.ignore_eos, bool),
             f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        ids = self.stop_token_ids
        need(not isinstance(ids, str | bytes) and isinstance(ids, Sequence | set | frozenset)
             and all(integer(t) and t >= 0 for t in ids),
             f"stop_token_ids must be a sequence of token ids (ints >= 0), got {ids!r}")
        object.__setattr__(self, "stop_token_ids", tuple(ids))
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        need(isinstance(stop, Sequence) and all(isinstance(s, str) and s for s in stop),
             f"stop must be a string or a sequence of non-empty strings, got {self.stop!r}")
        stop = tuple(stop)
        object.__setattr__(self, "stop", stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(params: SamplingParams, index: int, device: torch.device) -> torch.Generator | None:
    """A per-sequence RNG: seeded when ``params.seed`` is set, else from the global RNG."""
    if params.greedy:
        return None
    g = torch.Generator(device=device)
    if params.seed is not None:
        g.manual_seed(params.seed + index)
    else:
        g.seed()
    return g


def sample(logits: Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator | None]) -> list[int]:
    """One token per row of ``logits`` ``[N, vocab]`` (fp32), by each row's params."""
    out: list[int] = [0] * logits.shape[0]
    greedy_rows = [i for i, p in enumerate(params) if p.greedy]
    if greedy_rows:
        idx = torch.tensor(greedy_rows, device=logits.device)
        picks = logits.index_select(0, idx).argmax(dim=-1).tolist()
        for i, tok in zip(greedy_rows, picks):
            out[i] = tok
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = logits[i] / p.temperature
        if p.top_k and p.top_k < row.shape[-1]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cum = torch.cumsum(sorted_probs, dim=-1)
            drop = cum - sorted_probs > p.top_p  # keep the smallest prefix reaching top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        out[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
    return out
