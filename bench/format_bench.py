"""KV format benchmark: bytes per block and load throughput of exact vs int8 vs fp8 blocks.

Run: ``kvstore bench format`` or ``python -m bench.format_bench`` (``--help`` for knobs).

For each shared tier (disk: LMDB in a temp dir; Redis: a real ``redis-server`` started
for the run) and each format, one store publishes ``--blocks`` blocks of random bf16 KV
(quantized on the way down for int8/fp8), then fresh stores (empty index, as another
engine or a restart) load them back through the store's own load path:
``KVStore.match``, ``acquire`` and ``wait`` of all the blocks into the device pool
(decode, staging, one host -> device copy a batch, dequantization into the slots). The
time is from ``acquire`` to the end of ``wait``, the median of ``--repeats`` loads.

Figures: bytes of one stored blob (header included) and its ratio to the exact blob;
load GB/s in exact-KV terms (blocks x exact block bytes / seconds, 1 GB = 1e9 bytes, so
a compressed format that moves half the bytes in the same time shows twice the rate);
and each format's rate over the exact format's, measured in the same run. Targets: <=
0.52x the bytes and >= 1.8x the load rate. On a CPU-only machine the "device" pool is
host memory and dequantization is the torch reference on the CPU, so the rate ratio
there is a floor; on CUDA the Triton kernel dequantizes on the device.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bench.device import bench_device
from kvstore.args import add_device_argument, add_hidden_alias, count_arg, dir_arg, make_dir
from kvstore.config import StoreConfig
from kvstore.store import Allocated, KVStore
from radix import Namespace, hash_blocks
from radix.hashing import KV_FORMATS
from tiers.layout import KVLayout

MODEL_LAYOUTS: dict[str, KVLayout] = {
    "smollm2": KVLayout(num_layers=30, num_kv_heads=3, head_dim=64),
    "llama3-8b": KVLayout(num_layers=32, num_kv_heads=8, head_dim=128),
}
"""Block layouts (16 tokens a block, bf16): SmolLM2-135M (360 KiB) and Llama-3-8B (2 MiB)."""

TIERS = ("disk", "redis")


@dataclass(frozen=True)
class Row:
    """One (tier, format): stored bytes of a block and the median load rate."""

    tier: str
    kv_format: str
    blob_bytes: int
    load_s: float
    gbps: float  # exact-KV bytes per second / 1e9


LOAD_WORKERS = 8
"""Threads of the store's load pipeline by default (the store's default)."""


@dataclass(frozen=True)
class Setup:
    """One run's fixed knobs: block layout, blocks a load, device, load threads."""

    layout: KVLayout
    n_blocks: int
    device: str
    load_workers: int


def _store(setup: Setup, kv_format: str, tier_kw: dict[str, object]) -> KVStore:
    layout, n_blocks = setup.layout, setup.n_blocks
    return KVStore(StoreConfig(layout=layout, block_size=layout.block_size,
                               gpu_blocks=n_blocks, device=setup.device, kv_format=kv_format,
                               publish_queue_bytes=n_blocks * layout.block_bytes,
                               load_workers=setup.load_workers, **tier_kw))  # type: ignore[arg-type]


def _namespace(layout: KVLayout, kv_format: str) -> Namespace:
    return Namespace("format-bench", layout.dtype, layout.block_size, kv_format=kv_format)


def _tokens(layout: KVLayout, n_blocks: int) -> list[int]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 50000, (n_blocks * layout.block_size,), generator=g).tolist()


def publish(setup: Setup, kv_format: str, tier: str, tier_kw: dict[str, object]) -> int:
    """Write ``n_blocks`` blocks of random KV to ``tier`` through a store; returns the
    bytes of one stored blob."""
    layout, n_blocks = setup.layout, setup.n_blocks
    store = _store(setup, kv_format, tier_kw)
    try:
        chain = hash_blocks(_namespace(layout, kv_format).root(), _tokens(layout, n_blocks),
                            layout.block_size)
        lease = store.acquire(store.match(chain))
        res = store.allocate(lease, n_blocks * layout.block_size)
        assert isinstance(res, Allocated), res
        g = torch.Generator().manual_seed(1)
        kv = torch.randn((n_blocks, *layout.block_shape), generator=g).to(store.gpu.dtype)
        store.gpu.tensor[torch.tensor(lease.slots)] = kv.to(store.gpu.device)
        store.commit(lease, n_blocks * layout.block_size)
        store.release(lease)
        store.flush()
        stored = store.stats().index.blocks.get(tier, 0)
        if stored != n_blocks:
            raise SystemExit(f"{tier} stored {stored} of {n_blocks} blocks; give it more "
                             f"room (--disk-bytes / Redis memory)")
        blob = store.shared_tiers[tier].get([chain.keys[0]])[0]
        assert blob is not None
        return len(blob)
    finally:
        store.close()


def load_once(setup: Setup, kv_format: str, tier: str, tier_kw: dict[str, object]) -> float:
    """Seconds to load every block from ``tier`` into the device pool of a fresh store."""
    layout, n_blocks = setup.layout, setup.n_blocks
    store = _store(setup, kv_format, tier_kw)
    try:
        chain = hash_blocks(_namespace(layout, kv_format).root(), _tokens(layout, n_blocks),
                            layout.block_size)
        match = store.match(chain)
        t0 = time.perf_counter()
        lease = store.acquire(match)
        store.wait(lease)
        if setup.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        got = lease.cached_tokens.get(tier, 0)
        if got != n_blocks * layout.block_size:
            raise SystemExit(f"{kv_format} load from {tier} hit {got} tokens, expected "
                             f"{n_blocks * layout.block_size}")
        store.release(lease)
        return seconds
    finally:
        store.close()


def format_table(rows: Sequence[Row], layout_name: str, n_blocks: int) -> str:
    exact = {r.tier: r for r in rows if r.kv_format == "exact"}
    lines = [f"{layout_name} blocks ({n_blocks} a load; GB/s in exact-KV bytes, 1 GB = 1e9)",
             f"{'tier':<6} {'format':<6} {'bytes/block':>12} {'x exact':>8} "
             f"{'load ms':>9} {'GB/s':>7} {'x exact':>8}"]
    for r in rows:
        base = exact.get(r.tier)
        size_x = f"{r.blob_bytes / base.blob_bytes:.3f}" if base else "-"
        rate_x = f"{r.gbps / base.gbps:.2f}" if base else "-"
        lines.append(f"{r.tier:<6} {r.kv_format:<6} {r.blob_bytes:>12,} {size_x:>8} "
                     f"{r.load_s * 1e3:>9.1f} {r.gbps:>7.2f} {rate_x:>8}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The ``kvstore bench format`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="kvstore bench format",
        description="Bytes per block and load GB/s (exact-KV terms) of exact, int8 and fp8 "
                    "blocks from the disk (LMDB) and Redis tiers, through the store's "
                    "load path, all in one run. Targets: <= 0.52x bytes, >= 1.8x GB/s.")
    parser.add_argument("--model", choices=sorted(MODEL_LAYOUTS), default="smollm2",
                        help="block layout (bf16, 16 tokens a block) (default: %(default)s)")
    parser.add_argument("--blocks", type=count_arg(1), default=None,
                        help="blocks per load (default: 256; --quick: 32)")
    parser.add_argument("--repeats", type=count_arg(1), default=None,
                        help="loads per (tier, format); the median is reported "
                             "(default: 5; --quick: 2)")
    parser.add_argument("--tiers", default="disk,redis",
                        help="comma-separated shared tiers: disk, redis (default: %(default)s)")
    parser.add_argument("--formats", default=",".join(KV_FORMATS),
                        help="comma-separated KV formats (default: %(default)s)")
    add_device_argument(parser, help="the pool blocks load into: cuda, cuda:N or cpu "
                                     "(default: cuda when present, else cpu)")
    parser.add_argument("--load-workers", type=int, default=LOAD_WORKERS,
                        help="threads of the store's load pipeline; on a small CPU machine "
                             "use its core count, or Redis reads pass the tier's 0.1 s "
                             "timeout (default: %(default)s)")
    parser.add_argument("--disk", dest="dir", type=dir_arg, default=None, metavar="PATH",
                        help="directory for the LMDB environments, created if need be "
                             "(default: a temp dir)")
    add_hidden_alias(parser, "--dir", dest="dir", type=dir_arg, metavar="PATH")
    parser.add_argument("--quick", action="store_true",
                        help="32 blocks, 2 repeats: a smoke run, not a measurement "
                             "(--blocks and --repeats given explicitly are kept)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    tiers = list(dict.fromkeys(t.strip() for t in args.tiers.split(",") if t.strip()))
    formats = list(dict.fromkeys(f.strip() for f in args.formats.split(",") if f.strip()))
    if not tiers:
        parser.error(f"--tiers: no tier given; choose from {', '.join(TIERS)}")
    if not formats:
        parser.error(f"--formats: no format given; choose from {', '.join(KV_FORMATS)}")
    for t in tiers:
        if t not in TIERS:
            parser.error(f"--tiers: unknown tier {t!r}; choose from {', '.join(TIERS)}")
    for f in formats:
        if f not in KV_FORMATS:
            parser.error(f"--formats: unknown format {f!r}; choose from {', '.join(KV_FORMATS)}")
    n_blocks = args.blocks if args.blocks is not None else (32 if args.quick else 256)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    if not 1 <= args.load_workers <= 256:
        parser.error("--load-workers must be in 1..256")
    device = str(bench_device(parser, args.device))
    layout = MODEL_LAYOUTS[args.model]
    setup = Setup(layout, n_blocks, device, args.load_workers)
    rows: list[Row] = []
    if args.dir is not None:
        make_dir(parser, "--disk", args.dir)
    tmp = tempfile.mkdtemp(prefix="format-bench-", dir=args.dir)
    redis = None
    try:
        for tier in tiers:
            for fmt in formats:
                if tier == "disk":
                    tier_kw: dict[str, object] = {
                        "disk_path": f"{tmp}/{fmt}", "disk_bytes": 4 * n_blocks * layout.block_bytes}
                else:
                    if redis is None:
                        from bench.servers import RedisServer
                        redis = RedisServer().start()
                    tier_kw = {"redis_url": redis.url}
                print(f"{tier} {fmt}: publishing {n_blocks} blocks ...", file=sys.stderr,
                      flush=True)
                blob = publish(setup, fmt, tier, tier_kw)
                times = []
                for i in range(repeats):
                    print(f"{tier} {fmt}: load {i + 1}/{repeats}", file=sys.stderr, flush=True)
                    times.append(load_once(setup, fmt, tier, tier_kw))
                t = statistics.median(times)
                rows.append(Row(tier, fmt, blob, t, n_blocks * layout.block_bytes / t / 1e9))
    finally:
        if redis is not None:
            redis.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"device: {device}; load workers: {setup.load_workers}; torch threads: "
          f"{torch.get_num_threads()}")
    print(format_table(rows, args.model, n_blocks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
