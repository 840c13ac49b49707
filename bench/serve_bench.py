"""Serving benchmark: many concurrent requests through ``kvstore serve``, cache tiers on vs off.

Run: ``python -m kvstore bench serve`` (``--help`` explains every knob). A load
generator over HTTP against the server's OpenAI API (``/v1/completions``, streamed, so
time to first token and inter-token latency are measured per request), modeled on
SGLang's ``bench_multiturn.py`` and vLLM's ``benchmark_serving_multi_turn.py``.

Workloads (token ids, sent as OpenAI's list-of-ints prompt; the server's
``return_token_ids`` gives back the generated ids, so a multi-turn history re-sends
exactly what the model produced, as a chat client re-sends the reply):

- ``multiturn``: ``--clients`` conversations x ``--rounds`` rounds; each round appends a
  new user turn of ``--new-tokens`` random tokens to the whole history (earlier turns
  and replies) and asks for ``--output-tokens`` tokens.
- ``sharegpt``: the real ShareGPT chats of the hit-rate bench (SmolLM2 tokens), turn by
  turn, reply lengths from the data (capped by ``--output-tokens``).
- ``mooncake``: the Mooncake conversation trace: arrival times (scaled by
  ``--time-scale``), prompt and output lengths, and token ids synthesized per hash id
  (``bench.workloads.MooncakeTokens``), so requests sharing ids share tokens.
- ``shared-prefix``: SGLang's generated-shared-prefix load: ``--groups`` random system
  prompts of ``--system-tokens``, each with ``--prompts-per-group`` questions of
  ``--new-tokens``.

Arrival: closed loop (``--max-parallel`` requests in flight), Poisson
(``--request-rate`` requests a second) or, for ``mooncake``, the trace's own times.
A conversation's next round is queued when its previous round finishes.

``--configs`` runs the same workload against several server configurations in one
invocation, starting a fresh ``kvstore serve`` for each (cache off, GPU only, GPU +
host, GPU + host + disk, + Redis with ``--redis``), all with the same ``--gpu-kv-bytes``
KV pool, and reports per configuration: TTFT p50/p90/p99, ITL p50/p99, end-to-end
latency, requests/s, output tokens/s, prompt tokens cached by tier (from ``usage``),
errors and TTFT per round, next to the hit rate the store's simulation reaches on the
same request stream with the same capacities. A table, ``summary.csv``,
``requests.csv`` and ``serve_bench.png`` are written to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from bench import router_bench
from engine.config import NAMED_SHAPES
from kvstore.args import (
    add_device_argument,
    add_dtype_argument,
    add_hidden_alias,
    add_out_argument,
    dir_arg,
    make_dir,
    seconds_arg,
    size_arg,
)
from kvstore.units import format_size

CONFIGS = ("off", "gpu", "gpu+host", "gpu+host+disk", "gpu+host+disk+redis")
"""Server configurations ``--configs`` knows, in the order they are reported."""
TIERS = ("gpu", "host", "disk", "redis", "remote")
BLOCK_SIZE = 16
"""KV block size of the server (tokens)."""
LISTENING = re.compile(r"listening on (http://\S+?:[0-9]+)")

STARTED = re.compile(r"started in [^\n]*")
"""The server's start-up line: how long its model, store and warm-up took."""


# ---------------------------------------------------------------------------- workload


@dataclass
class Turn:
    """One request of a conversation: ``delta`` (token ids) is appended to the history
    (earlier prompts and generated replies) to form the prompt; ``at`` is the arrival
    time in seconds for trace replay (``None``: the dispatcher decides)."""

    conv: int
    round: int
    delta: np.ndarray
    max_tokens: int
    at: float | None = None


@dataclass
class Conversation:
    """Turns sent one after the other; the history grows by each prompt and reply."""

    turns: list[Turn]
    history: list[int] = field(default_factory=list)


def build_workload(args: argparse.Namespace, vocab: int, seed: int) -> list[Conversation]:
    """The conversations of ``args.workload`` with token ids in ``[0, vocab)``."""
    rng = np.random.default_rng(seed)
    if args.workload == "multiturn":
        out_len = args.output_tokens or 64
        system = rng.integers(0, vocab, args.system_tokens, dtype=np.int32)
        convs = []
        for c in range(args.clients):
            turns = []
            for r in range(args.rounds):
                delta = rng.integers(0, vocab, args.new_tokens, dtype=np.int32)
                if r == 0:
                    delta = np.concatenate([system, delta])
                turns.append(Turn(c, r, delta, out_len))
            convs.append(Conversation(turns))
        return convs
    if args.workload == "shared-prefix":
        from bench.workloads import generated_shared_prefix_prompts

        out_len = args.output_tokens or 64
        prompts = generated_shared_prefix_prompts(
            args.groups, args.prompts_per_group, args.system_tokens, args.new_tokens, 0,
            vocab_size=vocab, seed=seed)
        seen: Counter[int] = Counter()
        convs = []
        for n, (_, g, _, prompt, _) in enumerate(prompts):
            convs.append(Conversation([Turn(n, seen[g], prompt, out_len)]))
            seen[g] += 1
        return convs
    if args.workload == "mooncake":
        from bench.workloads import MooncakeTokens, load_mooncake_records

        records = load_mooncake_records(args.trace, limit=args.num_requests)
        tokens = MooncakeTokens(vocab, seed)
        t0 = records[0]["timestamp"] if records else 0
        convs = []
        for n, rec in enumerate(records):
            out_len = max(1, int(rec.get("output_length") or 1))
            if args.output_tokens:
                out_len = min(out_len, args.output_tokens)
            at = (rec["timestamp"] - t0) / 1000.0 * args.time_scale
            convs.append(Conversation([Turn(n, 0, tokens.prompt(rec), out_len, at)]))
        return convs
    if args.workload == "sharegpt":
        from bench.workloads import tokenize_sharegpt

        chats = tokenize_sharegpt(args.conversations, max_model_len=args.max_model_len,
                                  progress=True)
        convs = []
        for c, conv in enumerate(chats.convs):
            turns = []
            for r, (delta, reply) in enumerate(conv[:args.rounds]):
                out_len = max(1, len(reply))
                if args.output_tokens:
                    out_len = min(out_len, args.output_tokens)
                turns.append(Turn(c, r, np.asarray(delta, np.int64) % vocab, out_len))
            convs.append(Conversation(turns))
        return convs
    raise ValueError(f"unknown workload {args.workload!r}")


def working_set_tokens(convs: Sequence[Conversation]) -> int:
    """Distinct tokens the workload would cache at most (prompts and replies; shared
    prefixes of single-turn workloads counted once, in full blocks)."""
    if all(len(c.turns) == 1 for c in convs):
        from radix.hashing import Namespace, hash_blocks

        unit = 16 * BLOCK_SIZE  # coarse blocks: few keys even for the whole trace
        root = Namespace("serve-bench-estimate", block_size=unit).root()
        keys: set[bytes] = set()
        tails = 0
        for c in convs:
            t = c.turns[0]
            chain = hash_blocks(root, np.asarray(t.delta, "<i4").tobytes(), unit)
            keys.update(chain.keys)
            tails += len(t.delta) % unit + t.max_tokens
        return len(keys) * unit + tails
    return sum(len(t.delta) + t.max_tokens for c in convs for t in c.turns)


# ---------------------------------------------------------------------------- results


@dataclass
class Result:
    """One request: times in seconds from the run's start (``start_s``) or from the
    request's start (``ttft_s``, ``e2e_s``); ``itl_s`` one gap per generated token after
    the first (a chunk of k tokens counts k gaps of a k-th of its delay)."""

    conv: int
    round: int
    start_s: float
    prompt: np.ndarray
    max_tokens: int
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cached_by_tier: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    replica: str = ""  # X-Kvstore-Replica: who served it behind a router
    cut: bool = False
    """Still running at ``--max-duration``: cancelled. Counts in TTFT only: its first
    token's time, or (none yet) its wait until the cut, a lower bound."""


@dataclass
class Summary:
    """One configuration's figures (latencies in ms, rates per second)."""

    config: str
    requests: int
    errors: int
    skipped: int
    duration_s: float
    req_per_s: float
    output_tok_per_s: float
    prompt_tok_per_s: float
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_ms: dict[str, float]
    prompt_tokens: int
    cached_tokens: int
    cached_by_tier: dict[str, int]
    ttft_p50_by_round: dict[int, float]
    round_s: dict[int, float] = field(default_factory=dict)
    """Seconds from the first request of round r to the first of round r + 1 (rounds
    whose successor started): in a closed loop, how long the server took for a round,
    comparable between configurations even when one was cut early."""
    sim_hit: float | None = None
    first_error: str | None = None
    cut: int = 0  # requests cancelled at --max-duration plus turns never sent

    @property
    def cached_frac(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def _pct(values: Sequence[float], qs: Sequence[int]) -> dict[str, float]:
    if not values:
        return {f"p{q}": math.nan for q in qs} | {"mean": math.nan}
    arr = np.asarray(values, dtype=np.float64) * 1e3
    return {f"p{q}": float(np.percentile(arr, q)) for q in qs} | {"mean": float(arr.mean())}


def summarize(config: str, results: Sequence[Result], skipped: int,
              duration_s: float, unsent: int = 0) -> Summary:
    """Aggregate a run's results (failed requests count as errors, not in latencies).
    Requests cut at ``--max-duration`` count only in TTFT (their waits are lower bounds:
    leaving them out would keep the slowest first tokens out of a server that fell
    behind); ``unsent``: turns the cut kept from being sent."""
    cut = [r for r in results if r.cut]
    ok = [r for r in results if r.error is None and not r.cut]
    errs = [r for r in results if r.error is not None and not r.cut]
    by_tier: Counter[str] = Counter()
    for r in ok:
        by_tier.update(r.cached_by_tier)
    rounds: dict[int, list[float]] = {}
    first: dict[int, float] = {}
    for r in ok + cut:
        if r.ttft_s is not None:
            rounds.setdefault(r.round, []).append(r.ttft_s)
        first[r.round] = min(first.get(r.round, math.inf), r.start_s)
    dur = max(duration_s, 1e-9)
    return Summary(
        config=config, requests=len(ok), errors=len(errs), skipped=skipped,
        duration_s=duration_s, req_per_s=len(ok) / dur,
        output_tok_per_s=sum(r.completion_tokens for r in ok) / dur,
        prompt_tok_per_s=sum(r.prompt_tokens for r in ok) / dur,
        ttft_ms=_pct([r.ttft_s for r in ok + cut if r.ttft_s is not None], (50, 90, 99)),
        itl_ms=_pct([g for r in ok for g in r.itl_s], (50, 99)),
        e2e_ms=_pct([r.e2e_s for r in ok if r.e2e_s is not None], (50, 90, 99)),
        prompt_tokens=sum(r.prompt_tokens for r in ok),
        cached_tokens=sum(r.cached_tokens for r in ok),
        cached_by_tier=dict(by_tier),
        ttft_p50_by_round={k: float(np.median(v)) * 1e3 for k, v in sorted(rounds.items())},
        round_s={k: first[k + 1] - first[k] for k in sorted(first) if k + 1 in first},
        first_error=errs[0].error if errs else None, cut=len(cut) + unsent)


# ---------------------------------------------------------------------------- client


class RunError(Exception):
    """The benchmark cannot go on (server gone, bad answer); the message says why."""


async def _one(session: Any, url: str, model: str, turn: Turn, prompt: list[int],
               t0: float, headers: dict[str, str], res: Result | None = None) -> Result:
    """Send one streamed completion and time it, into ``res`` when given (what it holds
    so far is there if the request is cancelled)."""
    import aiohttp

    if res is None:
        res = Result(turn.conv, turn.round, time.perf_counter() - t0,
                     np.asarray(prompt, np.int32), turn.max_tokens)
    body = {"model": model, "prompt": prompt, "max_tokens": turn.max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "return_token_ids": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    last = start
    try:
        async with session.post(f"{url}/v1/completions", json=body, headers=headers) as resp:
            if resp.status != 200:
                text = await resp.text()
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    text = json.loads(text)["error"]["message"]
                res.error = f"HTTP {resp.status}: {text[:300]}"
                return res
            res.replica = resp.headers.get("X-Kvstore-Replica", "")
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = f"stream error: {obj['error'].get('message', obj['error'])}"
                    return res
                now = time.perf_counter()
                for choice in obj.get("choices") or []:
                    ids = choice.get("token_ids") or []
                    if not ids:
                        continue
                    if res.ttft_s is None:
                        res.ttft_s = now - start
                    else:
                        res.itl_s.extend([(now - last) / len(ids)] * len(ids))
                    res.output_ids.extend(ids)
                    last = now
                usage = obj.get("usage")
                if usage:
                    details = usage.get("prompt_tokens_details") or {}
                    res.prompt_tokens = int(usage.get("prompt_tokens", 0))
                    res.completion_tokens = int(usage.get("completion_tokens", 0))
                    res.cached_tokens = int(details.get("cached_tokens") or 0)
                    res.cached_by_tier = {k: int(v) for k, v in
                                          (details.get("cached_tokens_by_tier") or {}).items()}
        res.e2e_s = time.perf_counter() - start
        if res.ttft_s is None:
            res.error = "the stream ended without a token"
        elif not res.completion_tokens:
            res.error = "no usage in the stream (is this a kvstore serve?)"
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"[:300]
    return res


class Load(NamedTuple):
    """What :func:`run_load` sent and got: ``results`` (one per request sent),
    ``skipped`` (turns whose history outgrew the server's context), ``unsent`` (turns
    ``--max-duration`` kept from being sent) and ``duration_s`` (first request to last
    answer, or to the cut)."""

    results: list[Result]
    skipped: int
    unsent: int
    duration_s: float


async def run_load(url: str, model: str, convs: list[Conversation], args: argparse.Namespace,
                   max_context: int, headers: dict[str, str], desc: str) -> Load:
    """Send every conversation's turns (see the module docstring for the arrival
    modes) until they are done or ``args.max_duration`` seconds have passed; then the
    requests still running are cancelled (``Result.cut``) and no more are sent."""
    import aiohttp
    from tqdm import tqdm

    total = sum(len(c.turns) for c in convs)
    if not convs:  # nothing would ever end the queue: nothing to send
        return Load([], 0, 0, 0.0)
    queue: asyncio.Queue[Turn | None] = asyncio.Queue()
    results: list[Result] = []
    skipped = 0
    alive = len(convs)
    bar = tqdm(total=total, desc=desc, unit="req", leave=True, disable=args.no_progress)
    t0 = time.perf_counter()
    mode = arrival_mode(args)
    limit: float | None = args.max_duration
    stopped = False

    def finish_conversation(conv: Conversation, from_round: int) -> None:
        nonlocal alive, skipped
        skipped += len(conv.turns) - from_round
        bar.update(len(conv.turns) - from_round)
        alive -= 1
        if alive == 0:
            for _ in range(max(1, args.max_parallel or 1)):
                queue.put_nowait(None)

    def ready(conv: Conversation, r: int) -> None:
        """Queue round ``r`` of ``conv`` or end the conversation."""
        if r >= len(conv.turns):
            finish_conversation(conv, r)
            return
        turn = conv.turns[r]
        if len(conv.history) + len(turn.delta) + turn.max_tokens > max_context:
            finish_conversation(conv, r)
            return
        queue.put_nowait(turn)

    async def run_turn(session: Any, turn: Turn) -> None:
        conv = convs[turn.conv]
        prompt = conv.history + turn.delta.tolist()
        res = Result(turn.conv, turn.round, time.perf_counter() - t0,
                     np.asarray(prompt, np.int32), turn.max_tokens)
        try:
            await _one(session, url, model, turn, prompt, t0, headers, res)
        except asyncio.CancelledError:
            if not stopped:
                raise
            res.cut = True  # cancelled at the limit: its wait so far is a lower bound
            if res.ttft_s is None:
                assert limit is not None
                res.ttft_s = max(0.0, limit - res.start_s)
            results.append(res)
            return
        except Exception as exc:  # never leave a conversation hanging
            res.error = f"{type(exc).__name__}: {exc}"[:300]
        results.append(res)
        bar.update(1)
        if res.error is None:
            conv.history = prompt + res.output_ids
            ready(conv, turn.round + 1)
        else:
            finish_conversation(conv, turn.round + 1)

    timeout = aiohttp.ClientTimeout(total=None, sock_read=args.request_timeout)
    connector = aiohttp.TCPConnector(limit=0)
    tasks: list[asyncio.Task[None]] = []

    async def cut_at_limit() -> None:
        """At the limit: stop sending, cancel what runs (workers or requests)."""
        nonlocal stopped
        assert limit is not None
        await asyncio.sleep(limit)
        stopped = True
        for t in tasks:
            t.cancel()
        for _ in range(max(1, args.max_parallel or 1)):
            queue.put_nowait(None)

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        for conv in convs:
            ready(conv, 0)
        watchdog = asyncio.create_task(cut_at_limit()) if limit is not None else None
        if mode == "closed":
            async def worker() -> None:
                while not stopped and (turn := await queue.get()) is not None:
                    await run_turn(session, turn)

            tasks += [asyncio.create_task(worker()) for _ in range(args.max_parallel)]
        else:
            rng = np.random.default_rng(args.seed + 1)
            clock = 0.0
            while not stopped and (turn := await queue.get()) is not None:
                if mode == "trace":
                    clock = turn.at or 0.0
                else:
                    clock += float(rng.exponential(1.0 / args.request_rate))
                if limit is not None and clock >= limit:
                    break  # arrives after the cut: never sent
                delay = clock - (time.perf_counter() - t0)
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    clock = time.perf_counter() - t0  # behind: the next gap starts now
                if stopped:
                    break
                tasks.append(asyncio.create_task(run_turn(session, turn)))
                tasks[:] = [t for t in tasks if not t.done()]
        # A worker cancelled while it waited for a turn ends cancelled: not an error.
        await asyncio.gather(*tasks, return_exceptions=True)
        if watchdog is not None:
            watchdog.cancel()
    bar.close()
    total = sum(len(c.turns) for c in convs)
    unsent = total - len(results) - skipped  # sent or skipped, unless the limit came
    first = min((r.start_s for r in results), default=0.0)
    last = max((r.start_s + (r.e2e_s or 0.0) for r in results), default=0.0)
    if stopped:
        assert limit is not None
        last = limit
    return Load(results, skipped, unsent, max(0.0, last - first))


KEEP_UP_SLACK = 1.5
"""An open-loop run whose answers took this many times the span of its arrivals fell
behind them: its TTFT is mostly queueing."""


def keep_up_note(args: argparse.Namespace, results: Sequence[Result], duration_s: float
                 ) -> str | None:
    """For an open-loop run (trace replay, Poisson) the server did not keep up with, a
    note with the arrival rate it would have: ``--time-scale`` (mooncake) or
    ``--request-rate`` (Poisson) scaled by how far behind it fell, with 10% room. None
    when it kept up, for closed loops and for runs of fewer than two requests."""
    mode = arrival_mode(args)
    if mode == "closed" or len(results) < 2:
        return None
    starts = [r.start_s for r in results]
    span = max(starts) - min(starts)
    if span <= 0 or duration_s <= KEEP_UP_SLACK * span:
        return None
    behind = duration_s / span
    head = (f"note: the server fell behind the arrivals ({len(results)} requests arrived "
            f"over {span:.1f} s and took {duration_s:.1f} s): TTFT here is mostly queueing; ")
    if mode == "trace":
        return head + f"--time-scale {math.ceil(args.time_scale * behind * 1.1 * 10) / 10:g} " \
                      "would let it keep up"
    return head + f"--request-rate {args.request_rate / behind / 1.1:.3g} would let it keep up"


def arrival_mode(args: argparse.Namespace) -> str:
    """``closed`` (``--max-parallel``), ``poisson`` (``--request-rate``) or ``trace``."""
    if args.request_rate is not None:
        return "poisson"
    if args.max_parallel is not None:
        return "closed"
    return "trace"


async def _warmup(url: str, model: str, vocab: int, args: argparse.Namespace,
                  headers: dict[str, str], max_context: int) -> None:
    """A few requests of fresh random tokens (kernel compilation, graph capture,
    allocator) before the measured run; their results are dropped."""
    import aiohttp

    if args.warmup <= 0:
        return
    rng = np.random.default_rng(10_000 + args.seed)
    n = max(1, min(2048, max_context // 2))  # long enough to compile the prefill shapes
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        turns = [Turn(-1, 0, rng.integers(0, vocab, n, dtype=np.int32), 8)
                 for _ in range(args.warmup)]
        out = await asyncio.gather(*[_one(session, url, model, t, t.delta.tolist(), 0.0,
                                          headers) for t in turns])
    errors = [r.error for r in out if r.error]
    if errors:
        raise RunError(f"warm-up requests failed: {errors[0]}")


async def server_info(url: str, headers: dict[str, str]) -> tuple[str, int]:
    """``(model name, longest sequence in tokens)`` from ``GET /v1/models``."""
    import aiohttp

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s, \
                s.get(f"{url}/v1/models", headers=headers) as resp:
            if resp.status != 200:
                raise RunError(f"GET {url}/v1/models answered {resp.status}: "
                               f"{(await resp.text())[:200]}")
            data = (await resp.json())["data"][0]
    except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, IndexError,
            ValueError) as exc:
        raise RunError(f"cannot read the model list of {url}: {exc}") from None
    return str(data["id"]), int(data.get("max_model_len") or 1 << 30)


# ---------------------------------------------------------------------------- simulation


def simulated_hit_rate(results: Sequence[Result], *, gpu_blocks: int, host_blocks: int,
                       disk_blocks: int, redis_blocks: int) -> float:
    """Prompt hit rate the store reaches in simulation mode (capacities in blocks, same
    policies, no bytes) on the run's own requests in the order they were sent: each
    prompt is matched, then the blocks of its prompt and reply are committed, the
    reply's last token excepted (the engine never computes that token's KV)."""
    from kvstore.config import StoreConfig
    from kvstore.store import KVStore
    from radix.hashing import Namespace, hash_blocks

    store = KVStore(StoreConfig.simulation(block_size=BLOCK_SIZE, gpu_blocks=gpu_blocks,
                                           host_blocks=host_blocks, disk_blocks=disk_blocks,
                                           redis_blocks=redis_blocks))
    root = Namespace("serve-bench-sim", block_size=BLOCK_SIZE).root()
    hits = prompt = 0
    try:
        for r in sorted((r for r in results if r.error is None and not r.cut), key=lambda r: r.start_s):
            tokens = np.concatenate([r.prompt, np.asarray(r.output_ids[:-1], np.int32)])
            chain = hash_blocks(root, tokens.astype("<i4").tobytes(), BLOCK_SIZE)
            rep = store.replay(chain.keys, chain.blocks, len(r.prompt))
            hits += sum(rep.hit_tokens.values())
            prompt += len(r.prompt)
    finally:
        store.close()
    return hits / prompt if prompt else 0.0


# ---------------------------------------------------------------------------- servers


@dataclass(frozen=True)
class ServerSizes:
    """KV capacities of the started servers, in blocks of :data:`BLOCK_SIZE` tokens
    (``gpu`` ``None``: the server's default) and bytes of one block."""

    block_bytes: int
    gpu: int | None
    host: int
    disk: int
    disk_bytes: int


def server_flags(name: str, args: argparse.Namespace, sizes: ServerSizes,
                 disk_dir: Path) -> list[str]:
    """``kvstore serve`` flags of configuration ``name`` (see :data:`CONFIGS`)."""
    flags = ["--model", args.model, "--load-format", args.load_format,
             "--max-num-seqs", str(args.max_num_seqs),
             "--max-num-batched-tokens", str(args.max_num_batched_tokens),
             "--policy", args.policy]
    if args.tokenizer:
        flags += ["--tokenizer", args.tokenizer]
    if args.device:
        flags += ["--device", args.device]
    if args.dtype:
        flags += ["--dtype", args.dtype]
    if args.model_cache_dir:
        flags += ["--model-cache-dir", args.model_cache_dir]
    if sizes.gpu is not None:
        flags += ["--gpu-kv-bytes", str(sizes.gpu * sizes.block_bytes)]
    if name == "off":
        flags.append("--no-prefix-reuse")
    flags += ["--host-bytes", str(sizes.host * sizes.block_bytes if "host" in name else 0)]
    if "disk" in name:
        flags += ["--disk", str(disk_dir), "--disk-bytes", str(sizes.disk_bytes)]
    else:
        flags.append("--no-disk")
    if "redis" in name:
        flags += ["--redis", args.redis]
    return flags + list(args.server_arg or [])


class ServeProcess:
    """A ``python -m kvstore serve`` child on a free port, its output in ``log``;
    stopped (SIGTERM, then SIGKILL) on :meth:`stop`, and killed with this process."""

    def __init__(self, flags: Sequence[str], log: Path) -> None:
        from kvstore.process import die_with_parent

        self.log = log
        env = dict(os.environ)
        repo = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kvstore", "serve", "--port", "0", *flags],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=repo,
                preexec_fn=die_with_parent)

    def wait_url(self, timeout_s: float) -> str:
        """The URL once the server logs that it listens; ``RunError`` with the log's
        tail when it exits or does not come up in ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            match = LISTENING.search(self.log.read_text(errors="replace"))
            if match:
                return match.group(1)
            if self.proc.poll() is not None:
                raise RunError(f"the server exited ({self.proc.returncode}):\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RunError(f"the server did not listen within {timeout_s:.0f} s:\n"
                               f"{self.tail()}")
            time.sleep(0.2)

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 120.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


@contextlib.contextmanager
def started(flags: Sequence[str], log: Path, timeout_s: float) -> Iterator[str]:
    """A running server's URL for the ``with`` body; stopped afterwards, whatever happened."""
    server = ServeProcess(flags, log)
    try:
        yield server.wait_url(timeout_s)
    finally:
        server.stop()


# ---------------------------------------------------------------------------- reports


def format_table(rows: Sequence[Summary]) -> str:
    """Per configuration: latencies (ms), rates, cached share of prompt tokens by tier."""
    head = (f"{'config':<20} {'ok':>5} {'err':>4} {'req/s':>7} {'out tok/s':>10} "
            f"{'TTFT p50':>9} {'p90':>8} {'p99':>8} {'ITL p50':>8} {'p99':>7} "
            f"{'E2E p50':>8} {'p99':>8} {'cached%':>8} {'sim%':>6}  by tier (% of prompt)")
    lines = [head, "-" * len(head)]
    for s in rows:
        tiers = " ".join(f"{t} {100 * n / s.prompt_tokens:.1f}"
                         for t, n in sorted(s.cached_by_tier.items()) if s.prompt_tokens)
        sim = "-" if s.sim_hit is None else f"{100 * s.sim_hit:.1f}"
        lines.append(
            f"{s.config:<20} {s.requests:5d} {s.errors:4d} {s.req_per_s:7.2f} "
            f"{s.output_tok_per_s:10.0f} {s.ttft_ms['p50']:9.1f} {s.ttft_ms['p90']:8.1f} "
            f"{s.ttft_ms['p99']:8.1f} {s.itl_ms['p50']:8.1f} {s.itl_ms['p99']:7.1f} "
            f"{s.e2e_ms['p50']:8.0f} {s.e2e_ms['p99']:8.0f} {100 * s.cached_frac:8.1f} "
            f"{sim:>6}  {tiers or '-'}")
    return "\n".join(lines)


def format_rounds(rows: Sequence[Summary], closed: bool = False) -> str:
    """TTFT p50 (ms) per round (multi-turn) or per position in the group (shared prefix);
    with ``closed`` (a closed loop) also each round's seconds (:attr:`Summary.round_s`)."""
    rounds = sorted({k for s in rows for k in s.ttft_p50_by_round})
    if len(rounds) <= 1:
        return ""
    shown = rounds if len(rounds) <= 16 else rounds[:8] + rounds[-8:]
    blocks = [("TTFT p50 ms / round", "ttft_p50_by_round", "7.0f")]
    if closed and any(s.round_s for s in rows):
        blocks.append(("seconds / round", "round_s", "7.1f"))
    lines: list[str] = []
    for title, attr, fmt in blocks:
        head = f"{title:<20} " + " ".join(f"{k:>7d}" for k in shown)
        lines += ([""] if lines else []) + [head, "-" * len(head)]
        for s in rows:
            values: dict[int, float] = getattr(s, attr)
            lines.append(f"{s.config:<20} " + " ".join(
                format(values[k], fmt) if k in values else f"{'-':>7}" for k in shown))
    return "\n".join(lines)


def round_speed(s: Summary, base: Summary) -> str:
    """``s``'s speed against ``base``'s round by round (base's seconds / s's), over the
    rounds both finished: the first, the last and the range; "" when none."""
    common = sorted(set(s.round_s) & set(base.round_s))
    ratios = {k: base.round_s[k] / max(s.round_s[k], 1e-9) for k in common}
    if not ratios:
        return ""
    first, last = common[0], common[-1]
    return (f"per round {ratios[first]:.2f}x (round {first}) to {ratios[last]:.2f}x "
            f"(round {last}), range {min(ratios.values()):.2f}-{max(ratios.values()):.2f}x")


def compare(rows: Sequence[Summary], closed: bool = False) -> list[str]:
    """Each cached configuration against GPU only and cache off (ratios); with
    ``closed`` (a closed loop) also the speed round by round (:func:`round_speed`)."""
    by = {s.config: s for s in rows}
    out = []
    for base_name in ("gpu", "off"):
        base = by.get(base_name)
        if base is None or not base.requests:
            continue
        for s in rows:
            if s.config in ("off", base_name) or not s.requests:
                continue
            cut = [c.config for c in (s, base) if c.cut]
            per_round = round_speed(s, base) if closed else ""
            out.append(f"{s.config} vs {base_name}: throughput "
                       f"{s.output_tok_per_s / max(base.output_tok_per_s, 1e-9):.2f}x, "
                       f"TTFT p50 {s.ttft_ms['p50'] / max(base.ttft_ms['p50'], 1e-9):.2f}x, "
                       f"p90 {s.ttft_ms['p90'] / max(base.ttft_ms['p90'], 1e-9):.2f}x"
                       + (f" ({' and '.join(cut)} cut at --max-duration: TTFT a lower "
                          "bound there)" if cut else "")
                       + (f"; {per_round}" if per_round else ""))
    return out


def write_csv(rows: Sequence[Summary], results: dict[str, list[Result]], out: Path) -> None:
    """``summary.csv`` (one row per configuration) and ``requests.csv`` (one per request)."""
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["config", "requests", "errors", "skipped", "duration_s", "req_per_s",
                    "output_tok_per_s", "prompt_tok_per_s", "ttft_p50_ms", "ttft_p90_ms",
                    "ttft_p99_ms", "ttft_mean_ms", "itl_p50_ms", "itl_p99_ms", "e2e_p50_ms",
                    "e2e_p90_ms", "e2e_p99_ms", "prompt_tokens", "cached_tokens",
                    *[f"cached_{t}" for t in TIERS], "sim_hit_rate", "cut", "first_error"])
        for s in rows:
            w.writerow([s.config, s.requests, s.errors, s.skipped, f"{s.duration_s:.3f}",
                        f"{s.req_per_s:.4f}", f"{s.output_tok_per_s:.2f}",
                        f"{s.prompt_tok_per_s:.2f}", *(f"{s.ttft_ms[k]:.2f}" for k in
                                                        ("p50", "p90", "p99", "mean")),
                        f"{s.itl_ms['p50']:.3f}", f"{s.itl_ms['p99']:.3f}",
                        *(f"{s.e2e_ms[k]:.1f}" for k in ("p50", "p90", "p99")),
                        s.prompt_tokens, s.cached_tokens,
                        *[s.cached_by_tier.get(t, 0) for t in TIERS],
                        "" if s.sim_hit is None else f"{s.sim_hit:.4f}", s.cut,
                        s.first_error or ""])
    with open(out / "requests.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["config", "conv", "round", "start_s", "ttft_ms", "e2e_ms", "prompt_tokens",
                    "completion_tokens", "cached_tokens",
                    *[f"cached_{t}" for t in TIERS], "cut", "error"])
        for config, rs in results.items():
            for r in sorted(rs, key=lambda r: r.start_s):
                w.writerow([config, r.conv, r.round, f"{r.start_s:.4f}",
                            "" if r.ttft_s is None else f"{r.ttft_s * 1e3:.2f}",
                            "" if r.e2e_s is None else f"{r.e2e_s * 1e3:.2f}",
                            r.prompt_tokens, r.completion_tokens, r.cached_tokens,
                            *[r.cached_by_tier.get(t, 0) for t in TIERS], int(r.cut),
                            r.error or ""])


def plot(rows: Sequence[Summary], path: Path, title: str) -> None:
    """TTFT and throughput per configuration, cached prompt tokens by tier, TTFT per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = [s.config for s in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(2, 2, figsize=(13, 8.5))
    a = ax[0, 0]
    for q, off in (("p50", -0.27), ("p90", 0.0), ("p99", 0.27)):
        a.bar(x + off, [s.ttft_ms[q] for s in rows], 0.27, label=f"TTFT {q}")
    a.set_xticks(x, names, rotation=15)
    a.set_ylabel("ms")
    a.set_title("time to first token")
    a.legend()
    a = ax[0, 1]
    a.bar(x, [s.output_tok_per_s for s in rows], 0.5, color="tab:green")
    a.set_xticks(x, names, rotation=15)
    a.set_ylabel("output tokens / s")
    a.set_title("throughput")
    for i, s in enumerate(rows):
        a.annotate(f"{s.req_per_s:.2f} req/s", (i, s.output_tok_per_s), ha="center",
                   va="bottom", fontsize=8)
    a = ax[1, 0]
    bottom = np.zeros(len(rows))
    for tier in TIERS:
        vals = np.array([100 * s.cached_by_tier.get(tier, 0) / max(s.prompt_tokens, 1)
                         for s in rows])
        if vals.any():
            a.bar(x, vals, 0.5, bottom=bottom, label=tier)
            bottom += vals
    sims = [(i, 100 * s.sim_hit) for i, s in enumerate(rows) if s.sim_hit is not None]
    if sims:
        a.scatter([i for i, _ in sims], [v for _, v in sims], marker="_", s=400, c="k",
                  label="simulation", zorder=3)
    a.set_xticks(x, names, rotation=15)
    a.set_ylabel("% of prompt tokens")
    a.set_title("prompt tokens served from cache, by tier")
    a.legend(fontsize=8)
    a = ax[1, 1]
    for s in rows:
        ks = sorted(s.ttft_p50_by_round)
        a.plot(ks, [s.ttft_p50_by_round[k] for k in ks], marker="o", label=s.config)
    a.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    a.set_xlabel("round")
    a.set_ylabel("TTFT p50 (ms)")
    a.set_title("TTFT per round")
    a.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- main


_EPILOG = """\
configurations (--configs, comma-separated; each starts its own kvstore serve):
  off                  prefix reuse off (every prompt computed)
  gpu                  the GPU KV pool only (--gpu-kv-bytes)
  gpu+host             + pinned host DRAM (--host-bytes)
  gpu+host+disk        + LMDB on disk (--disk-bytes, in --disk)
  gpu+host+disk+redis  + Redis (--redis URL; use an empty Redis)

sizes: 4096, 512MiB, 8GiB, 1.5G (powers of 1024) or 10GB (powers of 1000).

examples (see docs/bench_serve.md):
  # quick CPU run with SmolLM2
  kvstore bench serve --device cpu --clients 4 --rounds 3 --new-tokens 64 \\
      --output-tokens 8 --gpu-kv-bytes 64MiB --host-bytes 256MiB --disk-bytes 1GiB
  # H200, Llama-3.1-8B shape with random weights
  kvstore bench serve --model llama3.1-8b --load-format dummy --clients 32 --rounds 10 \\
      --new-tokens 2000 --output-tokens 64 --gpu-kv-bytes 16GiB --host-bytes 48GiB \\
      --disk-bytes 48GiB --configs gpu,gpu+host,gpu+host+disk,off
  # an already running server
  kvstore bench serve --url http://127.0.0.1:8000 --workload shared-prefix
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``kvstore bench serve`` argument parser."""
    p = argparse.ArgumentParser(
        prog="kvstore bench serve",
        description="Serving benchmark over HTTP (OpenAI /v1/completions, streamed): many\n"
                    "concurrent requests against kvstore serve, one fresh server per cache\n"
                    "configuration, TTFT / ITL / throughput / cached tokens by tier.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    srv = p.add_argument_group("server (started once per configuration)")
    srv.add_argument("--url", default=None,
                     help="benchmark this running server instead of starting any "
                          "(--configs and the size/model flags are then ignored; default: "
                          "none)")
    srv.add_argument("--configs", default="gpu,gpu+host,gpu+host+disk,off",
                     help="comma-separated configurations to compare, run in this order "
                          "(default: %(default)s, plus gpu+host+disk+redis when --redis is "
                          "given); 'all' = every one")
    srv.add_argument("--model", default="smollm2",
                     help="kvstore serve --model: 'smollm2', a checkpoint directory, or with "
                          f"--load-format dummy a shape ({', '.join(NAMED_SHAPES)}) or a "
                          "config.json (default: %(default)s)")
    srv.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                     help="dummy: random weights of the model's shape (default: %(default)s)")
    srv.add_argument("--tokenizer", default=None,
                     help="dummy weights only: 'none' (default) or 'smollm2' (the bench "
                          "sends token ids either way)")
    add_device_argument(srv)
    add_dtype_argument(srv, "weights and KV dtype (default: bfloat16 on GPU, float32 on CPU)")
    srv.add_argument("--gpu-kv-bytes", type=size_arg, default=None, metavar="SIZE",
                     help="cap of the GPU KV pool, the same for every configuration "
                          "(default: the server's, half the free GPU memory); set it so the "
                          "workload's working set (printed first) is several times larger")
    srv.add_argument("--host-bytes", type=size_arg, default=16 << 30, metavar="SIZE",
                     help="host DRAM tier (pinned) of the +host configurations "
                          "(default: 16GiB)")
    srv.add_argument("--disk-bytes", type=size_arg, default=32 << 30, metavar="SIZE",
                     help="LMDB disk tier of the +disk configurations (default: 32GiB)")
    srv.add_argument("--disk", type=dir_arg, default=None, metavar="PATH",
                     help="where the disk tier's fresh, per-configuration directories go "
                          "(default: the system temp dir); removed afterwards")
    add_hidden_alias(srv, "--host-kv-bytes", "host_bytes", type=size_arg, metavar="SIZE")
    add_hidden_alias(srv, "--disk-kv-bytes", "disk_bytes", type=size_arg, metavar="SIZE")
    add_hidden_alias(srv, "--disk-dir", "disk", type=dir_arg, metavar="PATH")
    srv.add_argument("--redis", default=None, metavar="URL",
                     help="Redis URL for the gpu+host+disk+redis configuration (default: none)")
    srv.add_argument("--policy", default="write-back", choices=["write-back", "write-through"],
                     help="the servers' tier policy (default: %(default)s)")
    srv.add_argument("--max-num-seqs", type=int, default=64,
                     help="kvstore serve --max-num-seqs (default: %(default)s)")
    srv.add_argument("--max-num-batched-tokens", type=int, default=8192,
                     help="kvstore serve --max-num-batched-tokens (default: %(default)s)")
    srv.add_argument("--server-arg", action="append", default=None, metavar="ARG",
                     help="extra argument for every kvstore serve (repeatable; use "
                          "--server-arg=--flag; default: none)")
    srv.add_argument("--startup-timeout", type=seconds_arg(allow_zero=False), default=900.0,
                     metavar="SECONDS",
                     help="how long a server may take to come up (default: %(default)s)")
    srv.add_argument("--model-cache-dir", default=None, help=argparse.SUPPRESS)
    router_bench.add_serve_arguments(p)
    wl = p.add_argument_group("workload")
    wl.add_argument("--workload", default="multiturn",
                    choices=["multiturn", "sharegpt", "mooncake", "shared-prefix"],
                    help="what the clients send (module docstring; default: %(default)s)")
    wl.add_argument("--clients", type=int, default=64,
                    help="multiturn: concurrent conversations (default: %(default)s)")
    wl.add_argument("--rounds", type=int, default=10,
                    help="multiturn: rounds per conversation; sharegpt: most turns kept "
                         "(default: %(default)s)")
    wl.add_argument("--new-tokens", type=int, default=2000,
                    help="multiturn: tokens of each new user turn; shared-prefix: question "
                         "tokens (default: %(default)s)")
    wl.add_argument("--output-tokens", type=int, default=None,
                    help="tokens generated per request (EOS ignored; default: 64; sharegpt "
                         "and mooncake: the data's reply length, capped by this when given)")
    wl.add_argument("--system-tokens", type=int, default=0,
                    help="multiturn: a system prompt shared by every conversation (default: "
                         "0); shared-prefix: each group's system prompt (default: 2048 there)")
    wl.add_argument("--conversations", type=int, default=200,
                    help="sharegpt: conversations (default: %(default)s)")
    wl.add_argument("--groups", type=int, default=16,
                    help="shared-prefix: system prompts (default: %(default)s)")
    wl.add_argument("--prompts-per-group", type=int, default=16,
                    help="shared-prefix: questions per system prompt (default: %(default)s)")
    wl.add_argument("--trace", default=None, metavar="FILE",
                    help="mooncake: the trace (default: mooncake_conversation_trace.jsonl "
                         "in $KVSTORE_DATA or bench/data/ in the repository)")
    wl.add_argument("--num-requests", type=int, default=None,
                    help="mooncake: the first N requests of the trace (default: all 12,031)")
    wl.add_argument("--time-scale", type=float, default=1.0,
                    help="mooncake: multiply the trace's arrival times by this (0.5 = twice "
                         "as fast, 2 = half the rate; default: %(default)s)")
    wl.add_argument("--seed", type=int, default=0,
                    help="seed of the random tokens and arrivals (default: %(default)s)")
    arr = p.add_argument_group("arrival")
    arr.add_argument("--max-parallel", type=int, default=None,
                     help="closed loop: this many requests in flight (default: --clients for "
                          "multiturn, 64 for sharegpt and shared-prefix; mooncake: trace "
                          "times unless given)")
    arr.add_argument("--request-rate", type=float, default=None,
                     help="open loop: Poisson arrivals at this many requests a second "
                          "(a conversation's next round still waits for its previous one; "
                          "default: none, closed loop)")
    arr.add_argument("--max-duration", type=float, default=None, metavar="SECONDS",
                     help="stop each configuration this many seconds after its first "
                          "request: requests still running are cancelled and their TTFT "
                          "counted as their wait so far (a lower bound), turns not yet sent "
                          "are dropped (reported as cut). For a comparison that must fit a "
                          "time budget, where a configuration that falls behind would "
                          "otherwise run on (default: none, every turn is run)")
    arr.add_argument("--request-timeout", type=seconds_arg(allow_zero=False), default=1800.0,
                     metavar="SECONDS",
                     help="give up on a request silent this long (default: %(default)s)")
    arr.add_argument("--warmup", type=int, default=4,
                     help="unmeasured warm-up requests per server (default: %(default)s)")
    out = p.add_argument_group("output")
    add_out_argument(out, "serve", "summary.csv, requests.csv, serve_bench.png and the "
                                   "server logs")
    out.add_argument("--no-plot", action="store_true", help="skip the PNG")
    out.add_argument("--no-sim", action="store_true",
                     help="skip the simulated hit rate next to each configuration")
    out.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """Validate the arguments (``p.error`` names the flag); returns the configurations."""
    for name in ("clients", "rounds", "new_tokens", "conversations", "groups",
                 "prompts_per_group", "max_num_seqs", "max_num_batched_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("output_tokens", "num_requests", "max_parallel"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.system_tokens < 0 or args.warmup < 0:
        p.error("--system-tokens and --warmup must be >= 0")
    if args.max_duration is not None and not args.max_duration > 0:
        p.error(f"--max-duration must be > 0 seconds, got {args.max_duration:g}")
    if args.request_rate is not None and not args.request_rate > 0:
        p.error("--request-rate must be > 0 requests a second")
    if args.request_rate is not None and args.max_parallel is not None:
        p.error("give --request-rate (open loop) or --max-parallel (closed loop), not both")
    if not (math.isfinite(args.time_scale) and args.time_scale > 0):
        p.error("--time-scale must be a finite number > 0")
    if args.gpu_kv_bytes == 0:
        p.error("--gpu-kv-bytes must be > 0: it caps the GPU KV pool (leave it out for the "
                "server's default)")
    if args.workload == "shared-prefix" and args.system_tokens == 0:
        args.system_tokens = 2048
    if args.max_parallel is None and args.request_rate is None and args.workload != "mooncake":
        args.max_parallel = args.clients if args.workload == "multiturn" else 64
    if args.url:
        return ["external"]
    names = list(CONFIGS) if args.configs == "all" else [
        c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown or not names:
        p.error(f"--configs: unknown {unknown or 'empty list'}; choose from {', '.join(CONFIGS)}")
    if args.redis and "gpu+host+disk+redis" not in names and args.configs != "all":
        names.append("gpu+host+disk+redis")
    if "gpu+host+disk+redis" in names and not args.redis:
        p.error("the gpu+host+disk+redis configuration needs --redis URL")
    return list(dict.fromkeys(names))


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    names = _check(p, args)
    if args.replicas:
        names = router_bench.policy_runs(p, args, names)
    if args.device and not args.url:
        from bench.device import bench_device

        bench_device(p, args.device)  # the servers' device: a bad one is a bad --device
    if args.workload == "mooncake":  # a bad trace is a bad --trace: say so before any work
        from bench.workloads import load_mooncake_records

        try:
            load_mooncake_records(args.trace, limit=args.num_requests)
        except (FileNotFoundError, ValueError) as exc:
            p.error(f"--trace: {exc}")
    out = make_dir(p, "--out", args.out)
    headers = {"Authorization": f"Bearer {k}"} if (k := os.environ.get("KVSTORE_API_KEY")) \
        else {}
    try:
        with _sigterm_interrupts():
            return _run(args, names, out, headers)
    except (RunError, FileNotFoundError, ValueError) as exc:
        print(f"kvstore bench serve: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kvstore bench serve: interrupted", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (a job's time limit, ``timeout``) interrupts like Ctrl-C for the ``with``
    body, so the servers are stopped and the finished configurations reported."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _run(args: argparse.Namespace, names: list[str], out: Path,
         headers: dict[str, str]) -> int:
    sizes = None
    if args.url:
        model, max_context = asyncio.run(server_info(args.url, headers))
        vocab = 32000  # unknown: ids below every supported model's vocabulary
        args.max_model_len = max_context
    else:
        sizes, vocab, context = _sizes(args)
        args.max_model_len = context
    convs_proto = build_workload(args, vocab, args.seed)
    if not any(c.turns for c in convs_proto):
        raise RunError(f"the {args.workload} workload has no requests: nothing to measure")
    ws = working_set_tokens(convs_proto)
    n_turns = sum(len(c.turns) for c in convs_proto)
    print(f"workload {args.workload}: {len(convs_proto)} conversations, {n_turns} requests, "
          f"arrival {arrival_mode(args)}"
          + (f" ({args.max_parallel} in flight)" if arrival_mode(args) == "closed" else "")
          + (f" ({args.request_rate}/s)" if arrival_mode(args) == "poisson" else ""))
    if sizes is not None:
        bb = sizes.block_bytes
        gpu = "server default" if sizes.gpu is None else (
            f"{format_size(sizes.gpu * bb)} ({sizes.gpu} blocks)")
        ratio = "" if sizes.gpu is None else f" = {ws / (sizes.gpu * BLOCK_SIZE):.1f}x the GPU pool"
        print(f"working set <= {ws:,} tokens = {format_size(ws // BLOCK_SIZE * bb)}{ratio}; "
              f"GPU pool {gpu}, host {format_size(sizes.host * bb)}, disk "
              f"{format_size(sizes.disk_bytes)}")
        longest = max((sum(len(t.delta) + t.max_tokens for t in c.turns) for c in convs_proto),
                      default=0)
        in_flight = min(args.max_parallel or len(convs_proto), len(convs_proto))
        running = in_flight * longest
        if sizes.gpu is not None and arrival_mode(args) == "closed" \
                and running > sizes.gpu * BLOCK_SIZE:
            fits = sizes.gpu * BLOCK_SIZE // max(1, longest)
            fix = (f"--max-parallel {fits} (or a larger --gpu-kv-bytes) keeps them within "
                   "the pool" if fits else "the pool does not hold one conversation's last "
                   "request: raise --gpu-kv-bytes")
            print(f"note: {in_flight} requests in flight may hold up to {running:,} tokens "
                  f"of KV, more than the GPU pool's {sizes.gpu * BLOCK_SIZE:,}: they queue "
                  f"or are preempted, blocks still needed are evicted and reloaded, and the "
                  f"scheduler is measured rather than the tiers; {fix}")
    rows: list[Summary] = []
    results: dict[str, list[Result]] = {}
    interrupted: list[str] = []  # configurations not measured: Ctrl-C or SIGTERM
    for i, name in enumerate(names):
        try:
            _measure_config(name, args, sizes, vocab, out, headers, rows, results)
        except KeyboardInterrupt:
            interrupted = names[i:]
            print(f"\n[{name}] interrupted; not measured: {', '.join(interrupted)}",
                  file=sys.stderr)
            break
    if not rows:  # interrupted in the first configuration
        return 130
    print()
    print(format_table(rows))
    closed = arrival_mode(args) == "closed"
    rounds = format_rounds(rows, closed)
    if rounds:
        print()
        print(rounds)
    for line in (compare(rows, closed)
                 + (router_bench.report(rows, results) if args.replicas else [])):
        print(line)
    write_csv(rows, results, out)
    if not args.no_plot:
        title = (f"kvstore bench serve: {args.workload}, model {args.model} "
                 f"({args.load_format}), {n_turns} requests")
        plot(rows, out / "serve_bench.png", title)
    print(f"\nwrote {out / 'summary.csv'}, {out / 'requests.csv'}"
          + ("" if args.no_plot else f", {out / 'serve_bench.png'}"))
    if interrupted:
        return 130
    return 1 if any(s.requests == 0 for s in rows) else 0


def _measure_config(name: str, args: argparse.Namespace, sizes: ServerSizes | None,
                    vocab: int, out: Path, headers: dict[str, str], rows: list[Summary],
                    results: dict[str, list[Result]]) -> None:
    """Run configuration ``name`` (its own server, or ``--url``), append its summary to
    ``rows`` and its requests to ``results`` (a failed start appends an empty summary
    naming the error) and rewrite the CSVs."""
    convs = build_workload(args, vocab, args.seed)  # fresh histories
    try:
        if args.url:
            load = asyncio.run(_measure(args.url, args, convs, vocab, headers, name))
        else:
            assert sizes is not None
            load = _run_config(name, args, sizes, convs, vocab, out, headers)
        res, skipped, dur = load.results, load.skipped, load.duration_s
    except RunError as exc:
        print(f"[{name}] failed: {exc}", file=sys.stderr)
        rows.append(summarize(name, [], 0, 0.0))
        rows[-1].first_error = str(exc).splitlines()[0][:200]
        return
    summary = summarize(name, res, skipped, dur, load.unsent)
    if not args.no_sim and sizes is not None and name != "off":
        summary.sim_hit = simulated_hit_rate(
            res, gpu_blocks=sizes.gpu or _server_gpu_blocks(out, name),
            host_blocks=sizes.host if "host" in name else 0,
            disk_blocks=sizes.disk if "disk" in name else 0,
            redis_blocks=(1 << 20) if "redis" in name else 0)
    rows.append(summary)
    results[name] = res
    write_csv(rows, results, out)  # after each configuration: a cut-short run keeps them
    print(f"[{name}] {summary.requests} ok, {summary.errors} errors, {skipped} skipped "
          f"(context), {summary.duration_s:.1f} s"
          + (f"; first error: {summary.first_error}" if summary.first_error else ""))
    if summary.cut:
        print(f"[{name}] cut at --max-duration {args.max_duration:g} s: "
              f"{summary.cut - load.unsent} requests cancelled in flight, {load.unsent} "
              f"never sent; its TTFT counts the cancelled ones' waits so far (lower "
              f"bounds), its other figures only the {summary.requests} that finished")
    behind = keep_up_note(args, res, dur)
    if behind:
        print(f"[{name}] {behind}")


def _sizes(args: argparse.Namespace) -> tuple[ServerSizes, int, int]:
    """KV capacities in blocks, the model's vocabulary and longest sequence (tokens)."""
    import torch

    from engine.loader import model_config

    mc = model_config(args.model, load_format=args.load_format,
                      cache_dir=args.model_cache_dir)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    bb = mc.kv_layout(BLOCK_SIZE, dtype).block_bytes
    if args.gpu_kv_bytes is not None and args.gpu_kv_bytes < bb:
        raise RunError(f"--gpu-kv-bytes {args.gpu_kv_bytes} holds no KV block of {args.model} "
                       f"({BLOCK_SIZE} tokens = {bb} bytes in {dtype}): give at least "
                       f"{format_size(bb)}")
    gpu = None if args.gpu_kv_bytes is None else args.gpu_kv_bytes // bb
    context = mc.max_context_len if gpu is None else min(mc.max_context_len, gpu * BLOCK_SIZE)
    return (ServerSizes(bb, gpu, max(0, args.host_bytes // bb),
                        max(1, args.disk_bytes // bb), args.disk_bytes),
            mc.vocab_size, context)


def _server_gpu_blocks(out: Path, name: str) -> int:
    """The GPU pool a server sized itself (from its log), for the simulation."""
    log = (out / f"server-{_file_name(name)}.log").read_text(errors="replace")
    m = re.search(r"pool: (\d+) blocks", log)
    return int(m.group(1)) if m else 1


def _run_config(name: str, args: argparse.Namespace, sizes: ServerSizes,
                convs: list[Conversation], vocab: int, out: Path,
                headers: dict[str, str]) -> Load:
    """Start the server of configuration ``name``, measure, stop it."""
    base = Path(args.disk) if args.disk else None
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    disk_dir = Path(tempfile.mkdtemp(prefix=f"serve-bench-{name.replace('+', '-')}-", dir=base))
    try:
        flags = server_flags(args.replica_config if args.replicas else name, args, sizes,
                             disk_dir / "lmdb")
        t = time.perf_counter()
        print(f"[{name}] starting kvstore serve {' '.join(flags)}")
        log = out / f"server-{_file_name(name)}.log"
        with (router_bench.routed(name, args, flags, out) if args.replicas else
              started(flags, log, args.startup_timeout)) as url:
            print(f"[{name}] up in {time.perf_counter() - t:.1f} s at {url}")
            load = asyncio.run(_measure(url, args, convs, vocab, headers, name))
        start_line = STARTED.search(log.read_text(errors="replace")) if log.is_file() else None
        if start_line:
            print(f"[{name}] the server {start_line.group(0)}")
        return load
    finally:
        shutil.rmtree(disk_dir, ignore_errors=True)


async def _measure(url: str, args: argparse.Namespace, convs: list[Conversation], vocab: int,
                   headers: dict[str, str], name: str) -> Load:
    model, max_context = await server_info(url, headers)
    await _warmup(url, model, vocab, args, headers, max_context)
    out = await run_load(url, model, convs, args, max_context, headers, name)
    await _save_stats(url, headers, Path(args.out) / f"stats-{_file_name(name)}.json")
    return out


async def _save_stats(url: str, headers: dict[str, str], path: Path) -> None:
    """The server's ``/v1/stats`` (request and store counters) after the run, as JSON;
    nothing when the server does not answer it."""
    import aiohttp

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s, \
                s.get(f"{url}/v1/stats", headers=headers) as resp:
            if resp.status == 200:
                path.write_text(json.dumps(await resp.json(), indent=1))
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        pass


def _file_name(config: str) -> str:
    """A configuration name as a file name part (``gpu+host`` -> ``gpu-host``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", config)


if __name__ == "__main__":
    sys.exit(main())
