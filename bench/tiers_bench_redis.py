"""Redis tier benchmark: RedisTier against raw redis-py pipelines, same bytes, same run.

Run: ``python -m bench.tiers_bench_redis`` (``--help``), or as part of
``bench.tiers_bench`` which calls :func:`bench_redis` for each block size.

Every measurement uses redis-server processes started here (``bench.servers``) on
loopback, so it measures the client software path and the server, not a network:

- ``redis`` put/get: :class:`tiers.redis.RedisTier` on one server against a raw
  ``redis.Redis`` pipeline (``transaction=False``) sending the same SET/GET commands for
  the same namespaced keys and encoded blocks in the same batches (one round trip per
  batch each). Our get also verifies every block (header, chain key, checksum).
- ``redis-cluster`` and ``redis-cluster-thr`` put/get: the tier on a 3-master cluster,
  its node pipelines all sent from the calling thread before any reply is read
  (``parallel=False``) or run in one thread per node (``parallel=True``), against a raw
  ``redis.cluster.RedisCluster`` pipeline of the same commands.
- ``redis`` ``get-down``: a get of 64 blocks just after the server was SIGKILLed (the
  call that finds the outage), and ``get-down-open`` the next one (answered by the open
  circuit breaker). These rows carry latency, not bandwidth: ``n = 64``,
  ``blocks_per_s = 64 / latency``, so latency (ms) = ``1e3 * n / blocks_per_s``; the
  GB/s and ratio fields are 0 and NaN (the table prints ``-`` there and a line with the
  latency after it: ``bench.tiers_bench.latency_lines``).

Ours and raw alternate batch by batch (each on its own copy of the blocks, keys
``kv:`` and ``raw:``), taking turns to go first, so both see the same machine load; the
best total of ``repeats`` rounds counts, the database flushed before each put round. Throughput rows run the tier with a 1 s read timeout (and check it
counted no error), so a loaded benchmark machine cannot trip the default 0.1 s stall
detection and turn a measurement into misses; timeouts cost nothing when not tripped.
GB/s counts encoded block bytes, 1 GB = 1e9 bytes.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis
from redis.cluster import RedisCluster as RawCluster

from bench.servers import RedisCluster, RedisServer
from bench.tiers_bench import (
    BATCH_BLOCKS,
    MODEL_LAYOUTS,
    REPEATS,
    Row,
    format_table,
    latency_lines,
    layout_for_block_bytes,
    make_blocks,
)
from tiers.redis import RedisTier

NAMESPACE = "kv"
DOWN_BLOCKS = 64
STEADY_TIMEOUT_S = 1.0
"""Read timeout of the tier in throughput rows (seconds)."""
Items = Sequence[tuple[bytes, bytes]]


def _batches(seq: Sequence, size: int) -> list[Sequence]:
    return [seq[i:i + size] for i in range(0, len(seq), size)]


RAW_PREFIX = b"raw:"
"""Key prefix of the raw baseline's copy of the blocks (ours use ``NAMESPACE:``)."""


def _raw_put(client: redis.Redis | RawCluster, chunk: Items) -> None:
    pipe = client.pipeline(transaction=False)
    for key, value in chunk:
        pipe.set(RAW_PREFIX + key, value)
    pipe.execute()


def _raw_get(client: redis.Redis | RawCluster, chunk: Sequence[bytes]) -> None:
    pipe = client.pipeline(transaction=False)
    for key in chunk:
        pipe.get(RAW_PREFIX + key)
    if any(v is None for v in pipe.execute()):
        raise RuntimeError("raw redis-py lost a block during the benchmark")


def _tier_get(tier: RedisTier, chunk: Sequence[bytes]) -> None:
    if any(v is None for v in tier.get(chunk)):
        raise RuntimeError(f"RedisTier lost a block during the benchmark: {tier.stats()}")


def _interleaved(chunks: Sequence, raw_op: Callable[[Any], None],
                 our_op: Callable[[Any], None], rep: int) -> tuple[float, float]:
    """Run both ops on every chunk, taking turns to go first; total seconds of each."""
    raw_s = ours_s = 0.0
    for j, chunk in enumerate(chunks):
        for ours in ((False, True) if (j + rep) % 2 == 0 else (True, False)):
            t0 = time.perf_counter()
            (our_op if ours else raw_op)(chunk)
            if ours:
                ours_s += time.perf_counter() - t0
            else:
                raw_s += time.perf_counter() - t0
    return raw_s, ours_s


def _row(tier: str, op: str, block_bytes: int, total: int, n: int, ours_s: float,
         base_s: float) -> Row:
    gbps, base = total / ours_s / 1e9, total / base_s / 1e9
    return Row(tier=tier, op=op, block_bytes=block_bytes, n=n, gbps=gbps,
               blocks_per_s=n / ours_s, baseline_gbps=base, ratio=gbps / base)


def _compare(label: str, tier: RedisTier, raw: redis.Redis | RawCluster,
             flush: Callable[[], None], items: Items, block_bytes: int, repeats: int,
             batch: int) -> list[Row]:
    """Put and get rows of ``tier`` against ``raw`` on the same server(s).

    Ours and raw alternate batch by batch, each on its own copy of the blocks (keys
    ``NAMESPACE:`` and ``raw:``), so both see the same machine load; best total of
    ``repeats``, the database flushed before each put round.
    """
    batches = _batches(items, batch)
    key_batches = _batches([k for k, _ in items], batch)
    total, n = sum(len(v) for _, v in items), len(items)
    put_raw = put_ours = get_raw = get_ours = math.inf
    for rep in range(repeats):
        flush()
        raw_s, ours_s = _interleaved(batches, lambda c: _raw_put(raw, c), tier.put, rep)
        put_raw, put_ours = min(put_raw, raw_s), min(put_ours, ours_s)
    for rep in range(repeats):
        raw_s, ours_s = _interleaved(key_batches, lambda c: _raw_get(raw, c),
                                     lambda c: _tier_get(tier, c), rep)
        get_raw, get_ours = min(get_raw, raw_s), min(get_ours, ours_s)
    errors = tier.stats().errors
    if errors:
        raise RuntimeError(f"{label}: RedisTier counted {errors} errors during the benchmark")
    return [_row(label, "put", block_bytes, total, n, put_ours, put_raw),
            _row(label, "get", block_bytes, total, n, get_ours, get_raw)]


def _latency_row(op: str, block_bytes: int, seconds: float) -> Row:
    return Row(tier="redis", op=op, block_bytes=block_bytes, n=DOWN_BLOCKS, gbps=0.0,
               blocks_per_s=DOWN_BLOCKS / seconds, baseline_gbps=0.0, ratio=math.nan)


def bench_redis_down(block_bytes: int, repeats: int = 5) -> list[Row]:
    """Latency of a 64-block get right after redis-server was SIGKILLed.

    Each repeat: a tier with a pooled connection to a live server, the server killed,
    then a timed get (it finds the outage) and a second one (short-circuited). Median of
    ``repeats``. Raises ``RuntimeError`` if a get returned anything but misses.
    """
    items = make_blocks(layout_for_block_bytes(block_bytes), DOWN_BLOCKS)
    keys = [k for k, _ in items]
    first: list[float] = []
    after: list[float] = []
    server = RedisServer()
    try:
        for _ in range(repeats):
            server.restart()
            with RedisTier(server.url, namespace=NAMESPACE) as tier:
                tier.put(items)
                if tier.contains_prefix(keys) != DOWN_BLOCKS:
                    raise RuntimeError("RedisTier did not store the blocks")
                server.kill()
                for sink in (first, after):
                    t0 = time.perf_counter()
                    got = tier.get(keys)
                    sink.append(time.perf_counter() - t0)
                    if any(v is not None for v in got):
                        raise RuntimeError("RedisTier returned a block with Redis down")
    finally:
        server.close()
    first.sort()
    after.sort()
    return [_latency_row("get-down", block_bytes, first[len(first) // 2]),
            _latency_row("get-down-open", block_bytes, after[len(after) // 2])]


def bench_redis(block_bytes: int, n_blocks: int, repeats: int = REPEATS,
                batch: int = BATCH_BLOCKS, cluster: bool = True, down: bool = True) -> list[Row]:
    """RedisTier put/get throughput against raw redis-py on the same blocks.

    ``block_bytes``: payload bytes of one block; ``n_blocks``: blocks written then read,
    ``batch`` blocks per call (one pipeline per node per call, for ours and raw alike).
    Rows: ``redis`` put/get, then with ``cluster`` ``redis-cluster`` and
    ``redis-cluster-thr`` put/get, then with ``down`` the ``get-down`` latency rows
    (module docstring). Starts and stops its own redis-server processes.
    """
    items = make_blocks(layout_for_block_bytes(block_bytes), n_blocks)
    rows: list[Row] = []
    with RedisServer() as server, server.client() as raw, \
            RedisTier(server.url, namespace=NAMESPACE, timeout_s=STEADY_TIMEOUT_S) as tier:
        rows += _compare("redis", tier, raw, raw.flushall, items, block_bytes, repeats, batch)
    if cluster:
        with RedisCluster(3) as cl:
            seed = cl.nodes[0]
            raw_cl = RawCluster(host="127.0.0.1", port=seed.port)
            try:
                for label, parallel in (("redis-cluster", False), ("redis-cluster-thr", True)):
                    with RedisTier(cl.url, namespace=NAMESPACE, parallel=parallel,
                                   timeout_s=STEADY_TIMEOUT_S) as tier:
                        rows += _compare(label, tier, raw_cl, cl.flushall, items, block_bytes,
                                         repeats, batch)
            finally:
                raw_cl.close()
    if down:
        rows += bench_redis_down(block_bytes)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Run the Redis rows for the default block sizes and print one table."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.tiers_bench_redis",
        description="RedisTier vs raw redis-py pipelines (same bytes, same run), single "
                    "server and 3-node cluster, and get latency with Redis down.")
    parser.add_argument("--blocks", type=int, default=256, help="blocks per measurement")
    parser.add_argument("--batch", type=int, default=BATCH_BLOCKS, help="blocks per call")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="best of N runs")
    parser.add_argument("--no-cluster", action="store_true", help="skip the cluster rows")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.blocks <= 0 or args.batch <= 0 or args.repeats <= 0:
        parser.error("--blocks, --batch and --repeats must be positive")
    rows: list[Row] = []
    for layout in MODEL_LAYOUTS.values():
        rows += bench_redis(layout.block_bytes, args.blocks, repeats=args.repeats,
                            batch=args.batch, cluster=not args.no_cluster)
    print(format_table(rows))
    for line in latency_lines(rows):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
