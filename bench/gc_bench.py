"""Garbage-collector pauses on the serving thread: the store's index under a wave of new
sequences, with a server's long-lived heap in or out of the cyclic collector.

Run: ``python -m bench.gc_bench`` (``--help`` for knobs; the defaults are one wave of the
serving bench's H200 run: 7 sequences of 1,200 new 16-token blocks into a full
12,000-block pool, each allocated, committed and released, evicting cached blocks).

Every radix node is a container the cyclic collector tracks, so committing thousands of
blocks triggers collections, and now and then a full one that walks every tracked object
of the process: the imported modules, a model, the pools' bookkeeping, the index. A
server freezes what it built at start-up out of those scans (``kvstore.service``:
``gc.freeze()`` once it listens). Printed for ``--waves`` waves, first with the start-up
heap (``--heap-objects`` stand-ins, plus torch) tracked, then frozen: the wave's time
(median, longest) and the time spent collecting within it. The same run's baseline:
the waves with prefix reuse off (no commit: blocks go back to the free list), which
build no index at all.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Sequence

import numpy as np

from kvstore.config import StoreConfig
from kvstore.store import KVStore
from radix.hashing import Namespace
from tiers.layout import KVLayout

BLOCK_SIZE = 16


class _GCTimer:
    """Seconds the cyclic collector ran since :meth:`reset` (a ``gc.callbacks`` hook)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0
        gc.callbacks.append(self._hook)

    def _hook(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._start

    def reset(self) -> None:
        self.seconds = 0.0

    def close(self) -> None:
        gc.callbacks.remove(self._hook)


def waves(args: argparse.Namespace, *, cache: bool, timer: _GCTimer
          ) -> tuple[list[float], list[float]]:
    """Per wave: seconds, and seconds of garbage collection within them."""
    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=8)
    store = KVStore(StoreConfig(layout=layout, block_size=BLOCK_SIZE,
                                gpu_blocks=args.pool_blocks, device="cpu"))
    ns = Namespace("gc-bench", block_size=BLOCK_SIZE)
    rng = np.random.default_rng(args.seed)
    vocab = 50_000

    def run(tokens: list[int]) -> None:
        lease = store.acquire(store.match(store.chain(tokens, ns)))
        store.allocate(lease, len(tokens))
        if cache:
            store.commit(lease, len(tokens))
        store.release(lease)

    fill = args.pool_blocks * BLOCK_SIZE // args.sequences
    for _ in range(args.sequences):  # a full pool of cached blocks to evict
        run(rng.integers(0, vocab, fill).tolist())
    seconds: list[float] = []
    collecting: list[float] = []
    for _ in range(args.waves):
        wave = [rng.integers(0, vocab, args.blocks * BLOCK_SIZE).tolist()
                for _ in range(args.sequences)]
        timer.reset()
        t = time.perf_counter()
        for tokens in wave:
            run(tokens)
        seconds.append(time.perf_counter() - t)
        collecting.append(timer.seconds)
    store.close()
    return seconds, collecting


def _line(label: str, seconds: Sequence[float], collecting: Sequence[float]) -> str:
    return (f"{label:<34} {1e3 * statistics.median(seconds):8.1f} {1e3 * max(seconds):8.1f} "
            f"{1e3 * statistics.median(collecting):8.1f} {1e3 * max(collecting):8.1f}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gc_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sequences", type=int, default=7, help="sequences a wave (default: 7)")
    p.add_argument("--blocks", type=int, default=1200,
                   help="new blocks a sequence (default: 1200)")
    p.add_argument("--pool-blocks", type=int, default=12_000,
                   help="GPU pool, blocks (default: 12000)")
    p.add_argument("--waves", type=int, default=12, help="waves measured (default: 12)")
    p.add_argument("--heap-objects", type=int, default=300_000,
                   help="long-lived containers standing in for a server's heap "
                        "(default: 300000)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("sequences", "blocks", "pool_blocks", "waves"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.heap_objects < 0:
        p.error("--heap-objects must be >= 0")
    if gc.get_freeze_count():
        p.error("run it in a fresh process (the heap is frozen already)")
    import torch  # noqa: F401  (a server's heap holds torch's modules)

    heap = [{"item": [i]} for i in range(args.heap_objects)]
    timer = _GCTimer()
    print(f"{args.waves} waves of {args.sequences} x {args.blocks} new blocks into a full "
          f"{args.pool_blocks}-block pool; {args.heap_objects:,} long-lived objects + torch")
    print(f"{'':<34} {'wave ms':>8} {'longest':>8} {'in GC ms':>8} {'longest':>8}")
    try:
        print(_line("prefix reuse off (no index)", *waves(args, cache=False, timer=timer)))
        tracked = waves(args, cache=True, timer=timer)
        gc.collect()
        gc.freeze()
        frozen = waves(args, cache=True, timer=timer)
        print(_line("prefix reuse on, heap tracked", *tracked))
        print(_line("prefix reuse on, heap frozen", *frozen))
    finally:
        timer.close()
        gc.unfreeze()
    del heap
    return 0


if __name__ == "__main__":
    sys.exit(main())
