"""One generated sequence and the outputs the engine reports."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from engine.sampling import SamplingParams
from engine.tokenizer import StreamDecoder
from kvstore.store import Lease, StoreMatch
from radix import BlockChain


class Status(enum.Enum):
    WAITING = "waiting"  # queued; no lease yet
    LOADING = "loading"  # lease acquired; cached blocks are being promoted to the GPU
    RUNNING = "running"  # has a lease; prefilling or decoding
    FINISHED = "finished"


@dataclass
class Sequence:
    """A prompt and the tokens generated after it.

    ``num_computed`` counts tokens (prompt then output) whose KV is in the lease's
    blocks; the next forward step feeds ``token_ids[num_computed:]``. ``chain`` hashes
    every token seen (prompt + output) and is the lease's chain while one is held.

    Accounting (tokens; each token counted once): ``cached_tokens`` were served by a
    tier and never computed by this sequence; ``resumed_tokens`` are this sequence's own
    blocks brought back after a preemption; ``computed_tokens`` were fed through the
    model, ``recomputed_tokens`` of them for a second time (positions below
    ``max_computed``, the furthest ``num_computed`` ever reached).
    """

    seq_id: int
    request_id: str
    index: int  # position among the request's n sequences
    prompt_ids: list[int]
    params: SamplingParams
    chain: BlockChain
    arrival: float
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    lease: Lease | None = None
    num_computed: int = 0
    cached_tokens: dict[str, int] = field(default_factory=dict)
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: str | None = None
    text: str = ""
    decoder: StreamDecoder | None = None
    preemptions: int = 0
    resumed_tokens: dict[str, int] = field(default_factory=dict)
    computed_tokens: int = 0
    recomputed_tokens: int = 0
    max_computed: int = 0
    resume_mark: int = -1  # num_computed when last preempted: protected until past it
    match: StoreMatch | None = None  # the hit being promoted while LOADING
    reserved_blocks: int = 0  # GPU blocks admission counted for it while LOADING

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def in_prefill(self) -> bool:
        """True while tokens other than the last sampled one lack KV."""
        return self.num_computed < self.num_tokens - 1 or not self.output_ids

    @property
    def made_progress(self) -> bool:
        """False from a preemption until the sequence computes past where it stopped:
        until then it is not preempted again (no livelock)."""
        return self.num_computed > self.resume_mark

    def advance(self, n: int) -> None:
        """``n`` more tokens have KV: count them (recomputed below ``max_computed``)."""
        start = self.num_computed
        self.num_computed = start + n
        self.computed_tokens += n
        self.recomputed_tokens += max(0, min(self.num_computed, self.max_computed) - start)
        self.max_computed = max(self.max_computed, self.num_computed)

    def mark_first_token(self) -> None:
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()


@dataclass(frozen=True)
class CompletionOutput:
    """One of a request's ``n`` generated sequences."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length", or None while running


@dataclass(frozen=True)
class RequestOutput:
    """A request's result (or a streaming snapshot of it).

    ``cached_tokens`` are the prompt tokens served from each cache tier, counted once
    (tokens); ``resumed_tokens`` the request's own blocks brought back from each tier
    after its ``preemptions`` (not cache hits); ``computed_tokens`` the tokens fed
    through the model for it, ``recomputed_tokens`` of them a second time;
    ``ttft_s`` is the time from arrival to the first token; ``decode_s`` the time from
    the first token to the last (seconds).
    """

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    cached_tokens: dict[str, int]
    ttft_s: float | None
    decode_s: float | None
    finished: bool
    resumed_tokens: dict[str, int] = field(default_factory=dict)
    preemptions: int = 0
    computed_tokens: int = 0
    recomputed_tokens: int = 0

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_cached_tokens(self) -> int:
        return sum(self.cached_tokens.values())

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids
