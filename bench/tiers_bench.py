"""Tier bandwidth benchmark: put/get throughput of each tier next to its raw library.

Run: ``kvstore bench tiers`` or ``python -m bench.tiers_bench`` (``--help`` for sizes).
Prints one table of :class:`Row`, one row per (tier, op, block size):

- LMDB (this module): :class:`tiers.lmdb.LMDBTier` against raw ``lmdb`` doing the same
  bytes in the same run: the same encoded blocks, the same batches (one transaction per
  batch), the same environment flags (sync on). Our tier adds the LRU index, capacity
  accounting, and on get a copy-out and full verification (checksum, header, chain key)
  of every block; raw lmdb does only the copy. A third row, ``lmdb raw+xxh3``, is raw
  lmdb plus the payload checksum alone: the floor of any reader that verifies. Each get
  reads its own environment (the floor a copy of the raw one), so none reads pages the
  call before it just pulled into the CPU caches.
- Redis (``bench.tiers_bench_redis.bench_redis``) and host/GPU pools
  (``bench.tiers_bench_pools.bench_pools``), when those modules are present; each is
  called as ``f(block_bytes=..., n_blocks=...)`` and returns a list of :class:`Row`.

Block sizes are KV blocks of real models (16 tokens, bf16): SmolLM2-135M (30 layers,
3 KV heads, head_dim 64: 368,640 bytes = 360 KiB) and Llama-3-8B (32 layers, 8 KV heads,
head_dim 128: 2 MiB). Gets read blocks just written, so they measure the software path
from the page cache, not the disk, and are timed in process CPU time (user + system,
page faults included), which equals wall time on an idle machine and stays comparable
on a busy one; puts are timed in wall time (they wait for fsync). GB/s counts encoded
block bytes, 1 GB = 1e9 bytes.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import lmdb
import numpy as np
import xxhash

from kvstore.args import add_hidden_alias, count_arg, dir_arg, make_dir
from radix.hashing import Namespace, hash_blocks
from tiers.codec import encode_block
from tiers.layout import KVLayout
from tiers.lmdb import LMDBTier

MODEL_LAYOUTS: dict[str, KVLayout] = {
    "SmolLM2-135M": KVLayout(num_layers=30, num_kv_heads=3, head_dim=64),
    "Llama-3-8B": KVLayout(num_layers=32, num_kv_heads=8, head_dim=128),
}
"""Block layouts benchmarked by default (16 tokens a block, bf16)."""

DEFAULT_BLOCKS = 256
QUICK_BLOCKS = 32
BATCH_BLOCKS = 16
"""Blocks per tier call (one LMDB transaction), for ours and the baseline alike."""
REPEATS = 3
GET_REPEATS = 7
"""Get runs are cheap (no fsync), so more of them: best of 7."""

T = TypeVar("T")


@dataclass(frozen=True)
class Row:
    """One line of the table: our throughput next to the baseline's, same bytes.

    ``block_bytes`` is the payload of one block (bytes), ``n`` the blocks moved, ``gbps``
    and ``baseline_gbps`` in GB/s (1e9 bytes/s), ``ratio = gbps / baseline_gbps``.
    """

    tier: str
    op: str
    block_bytes: int
    n: int
    gbps: float
    blocks_per_s: float
    baseline_gbps: float
    ratio: float


def layout_for_block_bytes(block_bytes: int) -> KVLayout:
    """A model layout with this payload size, else a 1-layer bf16 layout of that size."""
    for layout in MODEL_LAYOUTS.values():
        if layout.block_bytes == block_bytes:
            return layout
    unit = 2 * 16 * 2  # K and V, 16 tokens, bf16
    if block_bytes <= 0 or block_bytes % unit:
        raise ValueError(f"block_bytes must be a positive multiple of {unit}, got {block_bytes}")
    return KVLayout(num_layers=1, num_kv_heads=1, head_dim=block_bytes // unit)


def make_blocks(layout: KVLayout, n_blocks: int, seed: int = 0) -> list[tuple[bytes, bytes]]:
    """``n_blocks`` distinct encoded blocks ``(key, blob)`` of one chain, random payloads."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 50_000, size=n_blocks * layout.block_size, dtype=np.int32)
    chain = hash_blocks(Namespace(model=f"bench-{seed}").root(), tokens.astype("<i4").tobytes(),
                        layout.block_size)
    payloads = rng.bytes(layout.block_bytes * min(n_blocks, 8))
    out = []
    for i, (key, toks) in enumerate(zip(chain.keys, chain.blocks, strict=True)):
        start = (i % 8) * layout.block_bytes
        parent = chain.keys[i - 1] if i else chain.root
        payload = memoryview(payloads)[start:start + layout.block_bytes]
        out.append((key, encode_block(key, parent, toks, layout, payload)))
    return out


def _batches(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _raw_put(env: lmdb.Environment, db: lmdb._Database,
             chunk: Sequence[tuple[bytes, bytes]]) -> None:
    with env.begin(write=True, db=db) as txn:
        for key, value in chunk:
            txn.put(key, value)


def _raw_get(env: lmdb.Environment, db: lmdb._Database, chunk: Sequence[bytes]) -> None:
    with env.begin(db=db) as txn:
        if any(v is None for v in [txn.get(key) for key in chunk]):
            raise RuntimeError("raw lmdb lost a block during the benchmark")


def _raw_get_checksummed(env: lmdb.Environment, db: lmdb._Database,
                         chunk: Sequence[bytes]) -> None:
    """Raw get plus one xxh3-64 pass over each value: the floor of any verifying read.
    Like a real read it keeps the whole batch alive until the batch is done."""
    values = []
    with env.begin(db=db) as txn:
        for key in chunk:
            value = txn.get(key)
            if value is None:
                raise RuntimeError("raw lmdb lost a block during the benchmark")
            xxhash.xxh3_64_digest(value)
            values.append(value)


def _tier_put(tier: LMDBTier, chunk: Sequence[tuple[bytes, bytes]]) -> None:
    tier.put(chunk)


def _tier_get(tier: LMDBTier, chunk: Sequence[bytes]) -> None:
    if any(v is None for v in tier.get(chunk)):
        raise RuntimeError("LMDBTier lost a block during the benchmark")


def _interleaved(calls: Sequence[Callable[[T], None]], batches: Sequence[T],
                 clock: Callable[[], float]) -> list[float]:
    """Run every call on every batch, batch by batch, rotating which call goes first;
    return each call's total seconds. Load that comes and goes hits all calls alike."""
    totals = [0.0] * len(calls)
    for i, chunk in enumerate(batches):
        for j in range(len(calls)):
            which = (i + j) % len(calls)
            t0 = clock()
            calls[which](chunk)
            totals[which] += clock() - t0
    return totals


def _row(tier: str, op: str, block_bytes: int, total_bytes: int, n: int, ours_s: float,
         base_s: float) -> Row:
    gbps, base = total_bytes / ours_s / 1e9, total_bytes / base_s / 1e9
    return Row(tier=tier, op=op, block_bytes=block_bytes, n=n, gbps=gbps,
               blocks_per_s=n / ours_s, baseline_gbps=base, ratio=gbps / base)


def bench_lmdb(block_bytes: int, n_blocks: int, tmpdir: str | os.PathLike[str],
               repeats: int = REPEATS, batch: int = BATCH_BLOCKS,
               get_repeats: int = GET_REPEATS) -> list[Row]:
    """Put and get throughput of :class:`LMDBTier` vs raw lmdb on the same blocks.

    ``block_bytes``: payload bytes of one block; ``n_blocks``: blocks written then read,
    ``batch`` blocks per call (one transaction); ``tmpdir``: a directory for the
    environments (fresh ones for each put run). Ours and raw alternate batch by batch.
    Puts: best wall time of ``repeats`` runs (fsync included). Gets: best CPU time of
    ``get_repeats`` runs (the path is CPU-bound; CPU time is robust to other load on a
    shared machine). Returns three rows: put, get, and ``lmdb raw+xxh3`` get (raw get
    plus the payload checksum alone: what any verifying reader pays at least).
    """
    layout = layout_for_block_bytes(block_bytes)
    items = make_blocks(layout, n_blocks)
    total = sum(len(v) for _, v in items)
    capacity = 2 * total
    map_size = 2 * capacity + (64 << 20)
    batches = _batches(items, batch)
    key_batches = _batches([k for k, _ in items], batch)
    raw_dir, ours_dir = Path(tmpdir) / "raw", Path(tmpdir) / "ours"
    floor_dir = Path(tmpdir) / "floor"
    env: lmdb.Environment | None = None
    floor: lmdb.Environment | None = None
    tier: LMDBTier | None = None
    put = [float("inf")] * 2
    get = [float("inf")] * 3
    try:
        for _ in range(repeats):
            for old in (env, tier):
                if old is not None:
                    old.close()
            shutil.rmtree(raw_dir, ignore_errors=True)
            shutil.rmtree(ours_dir, ignore_errors=True)
            env = lmdb.open(str(raw_dir), map_size=map_size, max_dbs=4, sync=True,
                            metasync=True, lock=True, readahead=True, max_readers=256)
            db = env.open_db(b"blocks")
            tier = LMDBTier(ours_dir, capacity_bytes=capacity, map_size=map_size)
            run = _interleaved([partial(_tier_put, tier), partial(_raw_put, env, db)],
                               batches, time.perf_counter)
            put = [min(a, b) for a, b in zip(put, run, strict=True)]
        assert env is not None and tier is not None
        # The floor reads its own copy of the raw environment. Reading the raw one, it
        # would always run right after the raw get of the same batch (calls rotate in a
        # fixed order) and find those pages still in the CPU's L2 cache.
        shutil.rmtree(floor_dir, ignore_errors=True)
        floor_dir.mkdir()
        env.copy(str(floor_dir))
        floor = lmdb.open(str(floor_dir), map_size=map_size, max_dbs=4, sync=True,
                          metasync=True, lock=True, readahead=True, max_readers=256)
        getters = [partial(_tier_get, tier), partial(_raw_get, env, db),
                   partial(_raw_get_checksummed, floor, floor.open_db(b"blocks"))]
        for _ in range(get_repeats):
            run = _interleaved(getters, key_batches, time.process_time)
            get = [min(a, b) for a, b in zip(get, run, strict=True)]
    finally:
        for opened in (env, floor, tier):
            if opened is not None:
                opened.close()
    return [_row("lmdb", "put", block_bytes, total, n_blocks, put[0], put[1]),
            _row("lmdb", "get", block_bytes, total, n_blocks, get[0], get[1]),
            _row("lmdb raw+xxh3", "get", block_bytes, total, n_blocks, get[2], get[1])]


def _optional(module: str, function: str) -> Callable[..., list[Row]] | None:
    """``module.function`` if that benchmark module is present, else ``None``."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            return None
        raise
    return getattr(mod, function, None)


def is_latency(row: Row) -> bool:
    """A row that carries a latency, not a bandwidth (``get-down``: no bytes moved, no
    baseline): its GB/s and ratio are not figures."""
    return row.baseline_gbps == 0 and math.isnan(row.ratio)


def latency_lines(rows: Sequence[Row]) -> list[str]:
    """One line per latency row (:func:`is_latency`): what the call took."""
    return [f"{r.tier} {r.op} ({r.block_bytes:,} byte blocks): a get of {r.n} blocks took "
            f"{1e3 * r.n / r.blocks_per_s:.3f} ms" for r in rows if is_latency(r)]


def format_table(rows: Sequence[Row]) -> str:
    """The rows as an aligned text table; latency rows (:func:`is_latency`) show ``-``
    for GB/s, baseline and ratio (:func:`latency_lines` says what they took)."""
    header = ("tier", "op", "block", "n", "GB/s", "blocks/s", "baseline GB/s", "ratio")
    lines = [header]
    for r in rows:
        size = f"{r.block_bytes / 1024:.0f} KiB" if r.block_bytes < (1 << 20) \
            else f"{r.block_bytes / (1 << 20):.0f} MiB"
        if is_latency(r):
            lines.append((r.tier, f"{r.op} (latency)", size, str(r.n), "-",
                          f"{r.blocks_per_s:,.0f}", "-", "-"))
            continue
        lines.append((r.tier, r.op, size, str(r.n), f"{r.gbps:.2f}", f"{r.blocks_per_s:,.0f}",
                      f"{r.baseline_gbps:.2f}", f"{r.ratio:.2f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(cell.rjust(w) if i >= 3 else cell.ljust(w)
                     for i, (cell, w) in enumerate(zip(line, widths, strict=True)))
           for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    """The ``kvstore bench tiers`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="kvstore bench tiers",
        description="Put/get throughput of each tier next to its raw library, same bytes, "
                    "same run. Block sizes: " + ", ".join(
                        f"{name} ({lay.block_bytes:,} bytes)"
                        for name, lay in MODEL_LAYOUTS.items()) + ".")
    parser.add_argument("--blocks", type=count_arg(1), default=None,
                        help=f"blocks per measurement (default: {DEFAULT_BLOCKS}; "
                             f"--quick: {QUICK_BLOCKS})")
    parser.add_argument("--quick", action="store_true",
                        help="few blocks and one repeat: a smoke run, not a measurement")
    parser.add_argument("--disk", dest="dir", type=dir_arg, default=None, metavar="PATH",
                        help="directory for the LMDB environments, created if need be "
                             "(default: a temp dir)")
    add_hidden_alias(parser, "--dir", "dir", type=dir_arg, metavar="PATH")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run every available tier benchmark and print one table."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    n_blocks = args.blocks if args.blocks is not None else (
        QUICK_BLOCKS if args.quick else DEFAULT_BLOCKS)
    repeats = 1 if args.quick else REPEATS
    sizes = [layout.block_bytes for layout in MODEL_LAYOUTS.values()]
    rows: list[Row] = []
    if args.dir is not None:
        make_dir(parser, "--disk", args.dir)
    tmp = tempfile.mkdtemp(prefix="tiers-bench-", dir=args.dir)
    try:
        for size in sizes:
            rows += bench_lmdb(size, n_blocks, tmp, repeats=repeats,
                               get_repeats=1 if args.quick else GET_REPEATS)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for module, function in (("bench.tiers_bench_redis", "bench_redis"),
                             ("bench.tiers_bench_pools", "bench_pools")):
        bench = _optional(module, function)
        if bench is not None:
            for size in sizes:
                rows += bench(block_bytes=size, n_blocks=n_blocks)
    print(format_table(rows))
    for line in latency_lines(rows):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
