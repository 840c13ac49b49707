"""Engine counters: where each prompt token came from and what the engine computed.

Tokens are counted once each: a prompt token is either served from a tier
(``cached_tokens``), brought back after its own sequence was preempted
(``resumed_tokens``) or computed. ``computed_tokens`` is everything fed through the
model (prompt and generated tokens); ``recomputed_tokens`` the part computed a second
time after a preemption, and ``discarded_tokens`` the part an overlapped decode step
computed for a sequence that had just stopped, so ``needed_tokens`` is what had to be
computed at least once.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    """Counters since the engine was created (tokens, steps, sequences, blocks)."""

    steps: int
    requests_finished: int
    prompt_tokens: int  # of finished requests
    generated_tokens: int  # of finished requests
    cached_tokens: dict[str, int]
    resumed_tokens: dict[str, int]
    computed_tokens: int
    recomputed_tokens: int
    preemptions: int
    parked_blocks: int  # blocks preemptions moved one tier down
    deferred_admissions: int  # times the queue's head waited for GPU room
    waiting: int
    loading: int
    running: int
    overlapped_steps: int = 0  # decode steps launched before the host read the last picks
    discarded_tokens: int = 0  # computed by an overlapped step after their sequence stopped

    @property
    def needed_tokens(self) -> int:
        """Tokens that had to be computed: prompt tokens no tier served, and the
        generated tokens fed back."""
        return self.computed_tokens - self.recomputed_tokens - self.discarded_tokens

    @property
    def preemptions_per_request(self) -> float:
        return self.preemptions / max(1, self.requests_finished)
