"""TTFT cold vs cached from each tier, the load bandwidth next to its floors, and the
cost model's decision: the TTFT part of ``kvstore bench engine``.

A model of a named shape with random weights (``llama3-8b`` on CUDA, ``smollm2``
anywhere; TTFT does not depend on weight values) answers a fresh 32-token question
after a shared prefix of each requested length (tokens). Per prefix:

- **cold**: prefix reuse off (an engine over a GPU-only store), median of ``--repeat``;
- **cached from each tier**: the prefix's blocks are put in exactly one tier (the GPU
  pool; host DRAM; the LMDB disk tier, page cache warm; Redis with ``--redis``) by
  dropping the tiers above it, then a new question is asked. Two rows per tier:
  *forced* (every hit loaded, to measure the load path: its GB/s is bytes landed in GPU
  slots over the measured load seconds) and *cost-aware* (the store's cost model decides
  how many blocks to load; its decision is printed as blocks loaded / declined per
  tier, next to the model's predicted seconds to load every block and to recompute
  every block). One cost model learns online from every run, cold ones included.

Order: first, for every prefix, the cold runs, the prefix computed once in each tiered
engine and one question after it (a GPU hit); then, prefix by prefix, the rows. So the
model has seen prefill steps of every size (and the question's) before it decides any
cost-aware row, as a serving engine has after its first requests; the forced rows of a
tier come before its cost-aware rows, so its load rate is measured too. The summary
sets the final model's predictions next to what was measured.

Floors measured in the same run: a raw pinned host -> device copy of the longest
prefix's KV bytes (on CPU: a memory copy), the tier's own ``get`` of the same blocks
(one thread and the load pipeline's thread count), and the xxh3 checksum rate of one
core. Targets (issue 10): disk -> GPU >= 10 GB/s for Llama-3-8B blocks, host -> GPU
>= 85% of the pinned copy, every cached TTFT <= 1.05x cold, disk at 8k <= 0.5x cold.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from bench.device import bench_device
from kvstore.args import count_arg, dir_arg, make_dir, size_arg
from kvstore.cost import Plan

QUESTION_TOKENS = 32


@dataclass
class Cell:
    """One (prefix, source, mode) measurement.

    ``load_s``: measured load seconds of the source tier, mean over the runs that loaded.
    ``plan``: the cost model's plan for the run reported (the median one): its predicted
    ``all_load_s``/``all_recompute_s`` and ``basis``.
    """

    ttft_s: float
    cached: dict[str, int]
    loaded: dict[str, int] = field(default_factory=dict)
    declined: dict[str, int] = field(default_factory=dict)
    gbps: float | None = None
    load_s: float | None = None
    plan: Plan | None = None


@dataclass
class Floors:
    pinned_gbps: float
    tier_get_gbps: dict[str, tuple[float, float]]  # tier -> (1 thread, N threads)
    checksum_gbps: float
    raw_lmdb_gbps: tuple[float, float] | None = None  # (1 thread, N threads)
    get_into_gbps: float | None = None  # disk get_into + numpy copy, N threads


def _delta(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ttft(engine, prompt: list[int], tag: str) -> tuple[float, dict[str, int]]:
    from engine.sampling import SamplingParams

    _sync(engine.model.device)
    engine.add_request(tag, prompt, SamplingParams(max_tokens=1, ignore_eos=True))
    out = None
    while engine.has_unfinished:
        for o in engine.step():
            if o.request_id == tag:
                out = o
    assert out is not None and out.ttft_s is not None
    return out.ttft_s, dict(out.cached_tokens)


class Sweep:
    """The engines and stores of one run (see the module docstring)."""

    def __init__(self, args: argparse.Namespace, model, device: torch.device,
                 dtype: str, prefixes: list[int], tmp: str) -> None:
        from engine.engine import Engine
        from engine.scheduler import SchedulerConfig
        from kvstore.config import StoreConfig
        from kvstore.cost import CostModel
        from kvstore.store import KVStore
        from radix import Namespace
        from tiers.layout import KVLayout

        c = model.config
        self.model = model
        self.device = device
        self.args = args
        self.layout = KVLayout(c.num_layers, c.num_kv_heads, c.head_dim, 16, dtype)
        bb = self.layout.block_bytes
        longest = max(prefixes) + QUESTION_TOKENS + 16
        blocks = -(-longest // 16)
        self.ns = Namespace(f"bench-ttft-{args.shape}", dtype, 16)
        # One model for every store, learning from every run; "forced" rows switch its
        # decisions off (every hit is loaded) and it keeps learning.
        self.learned = CostModel(bb, 16)
        sched = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=args.max_num_batched_tokens)
        cold_sched = SchedulerConfig(max_num_seqs=4,
                                     max_num_batched_tokens=args.max_num_batched_tokens,
                                     enable_cache=False)
        dev = device.type
        common = dict(layout=self.layout, block_size=16, device=dev, policy="write-back",
                      publish_queue_bytes=(blocks + 64) * bb,
                      load_workers=args.load_workers, load_batch_bytes=args.load_batch_bytes)
        cold_store = KVStore(StoreConfig(layout=self.layout, block_size=16,
                                         gpu_blocks=2 * blocks + 64, device=dev),
                             cost=self.learned)
        self.cold = Engine(model, None, cold_store, self.ns, frozenset(), cold_sched)
        # Room for every prefix in the GPU and host pools: moving one prefix between tiers
        # never has to push another one down (which would write it to disk).
        total = sum(-(-(p + QUESTION_TOKENS) // 16) for p in prefixes) + 64 * len(prefixes)
        pool = max(2 * blocks, total) + 64 * (args.repeat + 2)
        disk_store = KVStore(StoreConfig(gpu_blocks=pool, host_blocks=pool,
                                         disk_path=f"{tmp}/disk",
                                         disk_bytes=2 * (total + 64 * args.repeat) * (bb + 4096),
                                         **common), cost=self.learned)
        self.engines = {"disk": Engine(model, None, disk_store, self.ns, frozenset(), sched)}
        if args.redis:
            redis_store = KVStore(StoreConfig(gpu_blocks=pool, redis_url=args.redis,
                                              namespace=f"bench-ttft-{time.time_ns()}",
                                              **common), cost=self.learned)
            self.engines["redis"] = Engine(model, None, redis_store, self.ns, frozenset(), sched)
        self.rng = random.Random(args.seed)
        self.tmp = tmp
        self.vocab = c.vocab_size
        self.prefixes: dict[int, list[int]] = {}
        self.colds: dict[int, Cell] = {}

    def tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(100, self.vocab) for _ in range(n)]

    def close(self) -> None:
        for engine in [self.cold, *self.engines.values()]:
            engine.store.close()

    def teach(self, n: int) -> Cell:
        """Before any row: the cold runs of prefix ``n`` (its cold cell), the prefix
        computed in each tiered engine, and one question after it (a GPU hit). The cost
        model learns from all of them (prefill steps of this size and the question's)."""
        args = self.args
        prefix = self.prefixes[n] = self.tokens(n)
        times = []
        for r in range(args.repeat + 1):
            t, _ = _ttft(self.cold, prefix + self.tokens(QUESTION_TOKENS), f"cold-{n}-{r}")
            times.append(t)
        self.colds[n] = Cell(statistics.median(times[1:]), {})
        self.learned.decide = False
        for name, engine in self.engines.items():
            _ttft(engine, prefix + self.tokens(QUESTION_TOKENS), f"teach-{n}-{name}")
            engine.store.flush()  # publication reached the shared tier
            _ttft(engine, prefix + self.tokens(QUESTION_TOKENS), f"teach-q-{n}-{name}")
        return self.colds[n]

    def run_prefix(self, n: int) -> dict[tuple[str, str], Cell]:
        """Every row of one prefix length (after :meth:`teach`): ``{(source, mode): Cell}``."""
        prefix = self.prefixes[n]
        cells: dict[tuple[str, str], Cell] = {("cold", ""): self.colds[n]}
        sources = [("gpu", "disk"), ("host", "disk"), ("disk", "disk")]
        if "redis" in self.engines:
            sources.append(("redis", "redis"))
        for eng_name in dict.fromkeys(name for _, name in sources):
            engine = self.engines[eng_name]
            self.learned.decide = False
            # Back to the GPU (other prefixes' rows pushed it down the tiers).
            _ttft(engine, prefix + self.tokens(QUESTION_TOKENS), f"warm-{n}-{eng_name}")
            engine.store.flush()
        for source, eng_name in sources:
            engine = self.engines[eng_name]
            for mode in ("forced", "cost-aware"):
                self.learned.decide = mode == "cost-aware"
                cells[(source, mode)] = self._cell(engine, prefix, source, n, mode)
        return cells

    def _place(self, engine, source: str) -> None:
        """Drop the tiers above ``source`` so the prefix is served from it."""
        store = engine.store
        order = [t for t in ("gpu", "host", "disk") if t in store.tiers]
        for upper in order[:order.index(source)] if source in order else order:
            store.drop(upper)
        store.flush()

    def _cell(self, engine, prefix: list[int], source: str, n: int, mode: str) -> Cell:
        store = engine.store
        runs = []
        for r in range(self.args.repeat + 1):  # the first run warms the path
            self._place(engine, source)
            before = store.stats()
            self.learned.last_plan = None
            t, cached = _ttft(engine, prefix + self.tokens(QUESTION_TOKENS),
                              f"{source}-{mode}-{n}-{r}")
            after = store.stats()
            runs.append((t, cached, before, after, self.learned.last_plan))
        measured = runs[1:]
        t_med = statistics.median(t for t, *_ in measured)
        _, cached, before, after, plan = min(measured, key=lambda x: abs(x[0] - t_med))
        loaded = _delta(after.blocks_loaded, before.blocks_loaded)
        declined = _delta(after.blocks_declined, before.blocks_declined)
        nbytes = sum(_delta(a.bytes_loaded, b.bytes_loaded).get(source, 0)
                     for _, _, b, a, _ in measured)
        per_run = [_delta(a.load_seconds, b.load_seconds).get(source, 0.0)
                   for _, _, b, a, _ in measured]
        secs = sum(per_run)
        gbps = nbytes / secs / 1e9 if source != "gpu" and secs > 0 else None
        loads = [x for x in per_run if x > 0]
        load_s = statistics.mean(loads) if source != "gpu" and loads else None
        return Cell(t_med, cached, loaded, declined, gbps, load_s, plan)

    def floors(self, n_bytes: int, prefix_len: int) -> Floors:
        """Raw pinned copy, the shared tiers' own get, and the checksum, measured now."""
        import xxhash

        dev = self.device
        n_bytes = max(self.layout.block_bytes, min(n_bytes, 1 << 30))
        if dev.type == "cuda":
            src = torch.empty(n_bytes, dtype=torch.uint8, pin_memory=True)
            dst = torch.empty(n_bytes, dtype=torch.uint8, device=dev)
        else:
            src = torch.empty(n_bytes, dtype=torch.uint8)
            dst = torch.empty(n_bytes, dtype=torch.uint8)
        src.fill_(1)

        def copy() -> None:
            dst.copy_(src, non_blocking=True)
            _sync(dev)

        pinned = n_bytes / _best(copy, 5) / 1e9
        gets: dict[str, tuple[float, float]] = {}
        get_into: float | None = None
        from radix import hash_blocks

        for name, engine in self.engines.items():
            tier = engine.store.shared_tiers[name]
            prefix = self.tokens(prefix_len)
            _ttft(engine, prefix + self.tokens(QUESTION_TOKENS), f"floor-{name}")
            engine.store.flush()
            keys = hash_blocks(self.ns.root(), prefix, 16).keys
            stored = tier.contains_prefix(keys)
            keys = keys[:stored]
            if not keys:
                continue
            lane = max(1, self.args.load_batch_bytes // self.layout.block_bytes)
            batches = [keys[i:i + lane] for i in range(0, len(keys), lane)]
            size = len(keys) * self.layout.block_bytes

            def one(batches=batches, tier=tier) -> None:
                for b in batches:
                    tier.get(b)

            def many(batches=batches, tier=tier) -> None:
                with ThreadPoolExecutor(self.args.load_workers) as pool:
                    list(pool.map(tier.get, batches))

            one()  # warm the page cache and connections
            gets[name] = (size / _best(one, 3) / 1e9, size / _best(many, 3) / 1e9)
            if hasattr(tier, "get_into"):
                get_into = self._get_into_gbps(tier, batches, size)
        raw = self._raw_lmdb_gbps(prefix_len)
        buf = bytes(self.layout.block_bytes)
        reps = max(1, (256 << 20) // len(buf))

        def checksum() -> None:
            for _ in range(reps):
                xxhash.xxh3_64_digest(buf)

        return Floors(pinned, gets, reps * len(buf) / _best(checksum, 3) / 1e9, raw, get_into)

    def _get_into_gbps(self, tier, batches: list[list[bytes]], size: int) -> float:
        """The disk tier's zero-copy read with the payload copied out by numpy (what a
        load worker does before the host -> device copy), on the workers' threads."""
        import numpy as np

        bb = self.layout.block_bytes
        lane = max(len(b) for b in batches)
        outs = [np.empty((lane, bb + 4096), dtype=np.uint8) for _ in batches]

        def read(i: int) -> None:
            out = outs[i]

            def take(j: int, view: memoryview) -> None:
                n = len(view)
                out[j, :n] = np.frombuffer(view, dtype=np.uint8)

            tier.get_into(batches[i], take)

        def many() -> None:
            with ThreadPoolExecutor(self.args.load_workers) as pool:
                list(pool.map(read, range(len(batches))))

        return size / _best(many, 3) / 1e9

    def _raw_lmdb_gbps(self, prefix_len: int) -> tuple[float, float]:
        """Raw py-lmdb reads (``get`` and a ``bytes`` copy, no verification) of as many
        block-sized values as the prefix has blocks, from an environment of their own."""
        import os

        import lmdb

        bb = self.layout.block_bytes
        n = max(1, prefix_len // 16)
        path = os.path.join(self.tmp, "raw-lmdb")
        env = lmdb.open(path, map_size=2 * n * (bb + 4096) + (64 << 20), max_dbs=1)
        value = os.urandom(bb)
        keys = [i.to_bytes(16, "big") for i in range(n)]
        with env.begin(write=True) as txn:
            for k in keys:
                txn.put(k, value)
        lane = max(1, self.args.load_batch_bytes // bb)
        batches = [keys[i:i + lane] for i in range(0, n, lane)]

        def read(batch: list[bytes]) -> None:
            with env.begin(buffers=True) as txn:
                for k in batch:
                    bytes(txn.get(k))

        def one() -> None:
            for b in batches:
                read(b)

        def many() -> None:
            with ThreadPoolExecutor(self.args.load_workers) as pool:
                list(pool.map(read, batches))

        out = (n * bb / _best(one, 3) / 1e9, n * bb / _best(many, 3) / 1e9)
        env.close()
        return out


def _best(fn: Callable[[], None], repeat: int) -> float:
    """Fastest of ``repeat`` timed calls (seconds), after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _fmt_counts(d: dict[str, int]) -> str:
    return " ".join(f"{k} {v}" for k, v in sorted(d.items())) or "-"


def run(args: argparse.Namespace, random_model: Callable) -> int:
    """The TTFT sweep; prints its tables. Returns 0."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    model, _ = random_model(args.shape, device, dtype)
    limit = model.config.max_context_len - QUESTION_TOKENS - 2
    prefixes = sorted({limit if p == "max" else min(int(p), limit) for p in args.prefixes})
    print(f"model {args.shape} (random {dtype} weights) on {device}; prefixes {prefixes} "
          f"tokens + a {QUESTION_TOKENS}-token question; median of {args.repeat}")
    rows: list[tuple[int, dict[tuple[str, str], Cell]]] = []
    with tempfile.TemporaryDirectory(dir=args.disk) as tmp:
        sweep = Sweep(args, model, device, dtype, prefixes, tmp)
        try:
            for n in prefixes:
                cold = sweep.teach(n)
                print(f"prefix {n} tokens: cold {cold.ttft_s * 1e3:.1f} ms (the cost model "
                      f"learns from it)")
            for n in prefixes:
                rows.append((n, sweep.run_prefix(n)))
                _print_prefix(rows[-1])
            longest = max(prefixes)
            floors = sweep.floors(-(-longest // 16) * sweep.layout.block_bytes, longest)
        finally:
            sweep.close()
    _print_summary(rows, floors, sweep)
    return 0


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _print_prefix(row: tuple[int, dict[tuple[str, str], Cell]]) -> None:
    n, cells = row
    cold = cells[("cold", "")].ttft_s
    print(f"\nprefix {n} tokens: cold {cold * 1e3:.1f} ms")
    print(f"  {'source':<7} {'mode':<11} {'TTFT ms':>8} {'/cold':>6} {'load GB/s':>9} "
          f"{'load ms':>8}  {'predicted: load':>15} {'recompute':>9}  {'cached tokens':<20} "
          f"decision (blocks loaded | declined)")
    for (source, mode), c in cells.items():
        if source == "cold":
            continue
        gb = "-" if c.gbps is None else f"{c.gbps:.1f}"
        plan = c.plan
        pred_load = _ms(plan.all_load_s) if plan is not None else "-"
        pred_re = _ms(plan.all_recompute_s) if plan is not None else "-"
        why = ""
        if plan is not None and mode == "cost-aware" and plan.basis != "predicted":
            why = f"  [{plan.basis}]"
        print(f"  {source:<7} {mode:<11} {c.ttft_s * 1e3:8.1f} {c.ttft_s / cold:6.2f} {gb:>9} "
              f"{_ms(c.load_s):>8}  {pred_load:>15} {pred_re:>9}  {_fmt_counts(c.cached):<20} "
              f"{_fmt_counts(c.loaded)} | {_fmt_counts(c.declined)}{why}")


def _print_model(rows: Sequence[tuple[int, dict[tuple[str, str], Cell]]], sweep: Sweep) -> None:
    """The final model and its predictions next to what the sweep measured."""
    cm = sweep.learned
    rates = {t: cm.load_rate(t) for t in ("host", "disk", "redis")}
    prefill = cm.prefill_rate()
    print("cost model (learned): " + "; ".join(
        f"{t} {r.bytes_per_s / 1e9:.1f} GB/s + {r.latency_s * 1e3:.2f} ms"
        for t, r in rates.items() if r is not None)
        + (f"; prefill {prefill.per_step_s * 1e3:.2f} ms/step + "
           f"{prefill.per_token_s * 1e6:.2f} us/token + "
           f"{prefill.per_token_context_s * 1e9:.3f} ns/token/context-token "
           f"({'trusted' if cm.prefill_trusted() else 'not trusted: steps of too few sizes'})"
           if prefill else "; prefill not measured"))
    if prefill is None:
        return
    tiers = [t for t in ("host", "disk", "redis") if rates.get(t) is not None]
    print("  predicted by the final model / measured, ms. cold: a step of prefix + question "
          "(measured: cold TTFT);\n  question: its step after a GPU hit (measured: GPU "
          "forced TTFT); recompute: the prefix's blocks (measured: cold - question);\n"
          "  load: every block of the prefix (measured: the forced rows' load seconds)")
    print(f"  {'prefix':>6} " + " ".join(f"{name:>17}" for name in (
        "cold", "question", "recompute", *(f"{t} load" for t in tiers))))

    def pair(pred: float | None, measured: float | None) -> str:
        return f"{_ms(pred):>8} / {_ms(measured):<6}"

    for n, cells in rows:
        blocks = n // 16
        cold_m = cells[("cold", "")].ttft_s
        gpu = cells.get(("gpu", "forced"))
        q_m = gpu.ttft_s if gpu is not None else None
        line = [pair(prefill.step_seconds(n + QUESTION_TOKENS, 0), cold_m),
                pair(prefill.step_seconds(QUESTION_TOKENS + n - blocks * 16, blocks * 16), q_m),
                pair(prefill.seconds(blocks * 16, 0), None if q_m is None else cold_m - q_m)]
        for t in tiers:
            rate = rates[t]
            forced = cells.get((t, "forced"))
            line.append(pair(None if rate is None else
                             rate.seconds(blocks * sweep.layout.block_bytes),
                             None if forced is None else forced.load_s))
        print(f"  {n:>6} " + " ".join(line))


def _print_summary(rows: Sequence[tuple[int, dict[tuple[str, str], Cell]]], floors: Floors,
                   sweep: Sweep) -> None:
    print(f"\nfloors (same run): pinned host->device copy {floors.pinned_gbps:.1f} GB/s; "
          f"xxh3 checksum {floors.checksum_gbps:.1f} GB/s (one core)")
    w = sweep.args.load_workers
    if floors.raw_lmdb_gbps is not None:
        one, many = floors.raw_lmdb_gbps
        print(f"  raw lmdb read (get + bytes copy): {one:.2f} GB/s one thread, {many:.2f} GB/s "
              f"{w} threads")
    for name, (one, many) in floors.tier_get_gbps.items():
        print(f"  {name} tier get (verified bytes): {one:.2f} GB/s one thread, {many:.2f} GB/s "
              f"{w} threads")
    if floors.get_into_gbps is not None:
        print(f"  disk tier get_into + numpy copy (the workers' read): "
              f"{floors.get_into_gbps:.2f} GB/s {w} threads")
    _print_model(rows, sweep)
    print("\ntargets:")
    worst = max(c.ttft_s / cells[("cold", "")].ttft_s for _, cells in rows
                for (s, m), c in cells.items() if m == "cost-aware")
    print(f"  cost-aware cached TTFT <= 1.05x cold everywhere: worst {worst:.2f}x "
          f"{'ok' if worst <= 1.05 else 'MISSED'}")
    for n, cells in rows:
        host, disk = cells.get(("host", "forced")), cells.get(("disk", "forced"))
        if host is not None and host.gbps:
            ratio = host.gbps / floors.pinned_gbps
            print(f"  {n:>5} tokens: host->GPU {host.gbps:.1f} GB/s = {ratio:.0%} of the "
                  f"pinned copy (target >= 85%) {'ok' if ratio >= 0.85 else 'MISSED'}")
        if disk is not None and disk.gbps:
            print(f"  {n:>5} tokens: disk->GPU {disk.gbps:.1f} GB/s (target >= 10) "
                  f"{'ok' if disk.gbps >= 10 else 'MISSED'}")
        aware = cells.get(("disk", "cost-aware"))
        if aware is not None and 7900 <= n <= 8200:
            r = aware.ttft_s / cells[("cold", "")].ttft_s
            print(f"  {n:>5} tokens: disk TTFT {r:.2f}x cold (target <= 0.5x) "
                  f"{'ok' if r <= 0.5 else 'MISSED'}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The TTFT sweep's options on ``kvstore bench engine``."""
    p.add_argument("--shape", choices=["smollm2", "llama3-8b"], default=None,
                   help="model shape (random weights) for the TTFT part (default: llama3-8b "
                        "on CUDA, smollm2 on CPU)")
    p.add_argument("--prefixes", default=None,
                   help="comma-separated prefix lengths in tokens; 'max' is the longest the "
                        "model takes (default: 1000,4000,8000,max on CUDA; 256,1024 on CPU)")
    p.add_argument("--redis", default=None, metavar="URL",
                   help="also measure hits from this Redis, redis://host:port "
                        "(default: none)")
    p.add_argument("--disk", type=dir_arg, default=None, metavar="PATH",
                   help="parent directory of the LMDB disk tier, created if need be "
                        "(default: the system temp directory)")
    p.add_argument("--load-workers", type=int, default=8,
                   help="threads of the shared-tier load pipeline (default: %(default)s)")
    p.add_argument("--load-batch-bytes", type=size_arg, default=16 << 20, metavar="SIZE",
                   help="bytes one load worker reads and copies at a time (default: 16MiB)")
    p.add_argument("--max-num-batched-tokens", type=count_arg(1), default=16384,
                   help="engine token budget per step (default: %(default)s, one prefill "
                        "step)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random tokens (default: %(default)s)")


def finish_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill defaults that depend on the device; ``p.error`` on bad values (the device,
    the Redis URL, the disk directory: before any model is loaded)."""
    cuda = bench_device(p, args.device).type == "cuda"
    if args.redis is not None:
        from tiers.redis import parse_redis_url

        try:
            parse_redis_url(args.redis)
        except ValueError as exc:
            p.error(f"--redis: {exc}")
    if args.disk is not None:
        make_dir(p, "--disk", args.disk)
    if args.shape is None:
        args.shape = "llama3-8b" if cuda else "smollm2"
    text = args.prefixes or ("1000,4000,8000,max" if cuda else "256,1024")
    try:
        args.prefixes = [p if p == "max" else int(p) for p in text.split(",") if p]
    except ValueError:
        p.error(f"--prefixes takes comma-separated token counts or 'max', got {text!r}")
    if not args.prefixes or any(p != "max" and p < 16 for p in args.prefixes):
        p.error("--prefixes: each prefix needs at least 16 tokens (one block)")
    if not 1 <= args.load_workers <= 64:
        p.error("--load-workers must be 1..64")
    if args.load_batch_bytes < 1:
        p.error("--load-batch-bytes must be > 0")
