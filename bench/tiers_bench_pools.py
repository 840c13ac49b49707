"""Bandwidth of bulk slot copies between a host pool and a GPU pool, next to a raw copy.

``bench_pools(block_bytes, n_blocks)`` returns :class:`bench.tiers_bench.Row` rows. For
each direction (host->GPU, GPU->host) and each batch size it times one
:func:`tiers.pool.copy_slots` call of the batch, per strategy, with the batch's slots
scattered at random over pools twice its size on both sides (the worst case), plus one
``"auto"`` call whose slots are consecutive on both sides. The baseline, measured in the
same run, is one raw ``copy_`` of the same total bytes between one contiguous pinned host
tensor and one device tensor: what the PCIe link gives at best.

Two measures with CUDA, each with its own baseline from the same run:

- one call (op ``scattered [<strategy>]``): CUDA events around one call, including its
  host-side work (validation, index upload, launch) and the wait for its completion,
  next to one raw copy; median of repeats after warm-up. This is a promotion's latency.
- sustained (op ``scattered [auto] sustained``): :data:`IN_FLIGHT` calls issued back to
  back and one wait for the last, next to as many raw copies back to back. This is the
  bandwidth the store gets when promotions and demotions overlap, as they do in the
  engine (``acquire`` starts a copy and returns; ``poll`` finds it done later).

Without CUDA the "GPU" pool is on the CPU, the baseline is a contiguous CPU ``copy_``
and times are wall clock. GB/s are 1e9 bytes/s of block payload.

Beside compute (CUDA, :func:`bench_beside_compute`): a serving engine copies while it
computes. For ``"runs"`` (one DMA a run: copy engines only) and ``"index"`` (the
zero-copy block-copy kernel: SMs waiting on PCIe), one scattered copy is started on the
side stream and a burst of bf16 matmuls on the compute stream at once: the burst's time
next to the same burst alone (the compute's slowdown), and the copy's GB/s next to its
own alone. Which strategy ``"auto"`` should pick for large blocks
(:data:`tiers.pool.AUTO_MIN_RUN_BYTES`) is decided by this, not by the copy alone.

Run alone: ``python -m bench.tiers_bench_pools [--blocks N]``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

from bench.tiers_bench import MODEL_LAYOUTS, Row, format_table, layout_for_block_bytes
from tiers.pool import GPUPool, HostPool, SlotPool, copy_slots

SMALL_BATCH = 64
"""Batch size (blocks) measured besides ``n_blocks`` when ``n_blocks`` is larger."""
WARMUP = 3
REPEATS = 15
IN_FLIGHT = 8
"""Calls in flight for the sustained measure."""


def _time_cuda(fn: Callable[[], None], repeats: int, warmup: int) -> float:
    """Median seconds of ``fn`` between two events on the current stream.

    ``fn`` must return only once its work is complete or enqueued on the current stream.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _time_wall(fn: Callable[[], None], repeats: int, warmup: int) -> float:
    """Median wall-clock seconds of a synchronous ``fn``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fill(pool: SlotPool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    chunk = torch.randint(1, 255, (pool.block_bytes,), dtype=torch.uint8, generator=gen)
    pool.tensor.view(pool.num_slots, -1).view(torch.uint8).copy_(
        chunk.expand(pool.num_slots, -1).to(pool.device))


def _row(tier: str, op: str, block_bytes: int, n: int, seconds: float,
         base_seconds: float) -> Row:
    total = n * block_bytes
    gbps, base = total / seconds / 1e9, total / base_seconds / 1e9
    return Row(tier=tier, op=op, block_bytes=block_bytes, n=n, gbps=gbps,
               blocks_per_s=n / seconds, baseline_gbps=base, ratio=gbps / base)


def bench_pools(block_bytes: int, n_blocks: int, *, repeats: int = REPEATS,
                warmup: int = WARMUP,
                strategies: Sequence[str] = ("auto", "runs", "index", "staged"),
                seed: int = 0) -> list[Row]:
    """Host<->GPU ``copy_slots`` bandwidth vs a raw contiguous copy of the same bytes.

    ``block_bytes``: payload of one block (bytes; a model layout of that size if one is
    known); ``n_blocks``: the largest batch (blocks per call); batches of
    ``min(64, n_blocks)`` and ``n_blocks`` blocks are measured. Without CUDA only
    ``"auto"`` is timed (the CPU-only reference path). Rows: tier
    ``"pool h2d"`` / ``"pool d2h"`` (``"pool host->cpu"`` / ``"pool cpu->host"`` without
    CUDA), op ``"<pattern> [<strategy>]"``, ``n`` the batch size.
    """
    if n_blocks <= 0:
        raise ValueError(f"n_blocks must be positive, got {n_blocks}")
    layout = layout_for_block_bytes(block_bytes)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    num_slots = 2 * n_blocks
    host = HostPool(layout, num_slots)
    gpu = GPUPool(layout, num_slots, device=device)
    for pool in (host, gpu):
        if not pool.alloc(num_slots).ok:
            raise RuntimeError("a fresh pool refused to allocate all its slots")
    _fill(host, seed)
    _fill(gpu, seed + 1)
    raw_host = torch.empty(n_blocks * block_bytes, dtype=torch.uint8, pin_memory=cuda)
    raw_dev = torch.empty(n_blocks * block_bytes, dtype=torch.uint8, device=device)
    # Written once so that every page is backed (untouched pages all read the zero page).
    raw_host.fill_(7)
    raw_dev.fill_(1)
    timer = _time_cuda if cuda else _time_wall
    if not cuda:
        strategies = [s for s in strategies if s == "auto"]
    names = ("pool h2d", "pool d2h") if cuda else ("pool host->cpu", "pool cpu->host")
    rng = random.Random(seed)
    rows: list[Row] = []
    for n in sorted({min(SMALL_BATCH, n_blocks), n_blocks}):
        raw_in, raw_out = raw_host[:n * block_bytes], raw_dev[:n * block_bytes]
        base_h2d = timer(lambda a=raw_out, b=raw_in: a.copy_(b, non_blocking=cuda),
                         repeats, warmup)
        base_d2h = timer(lambda a=raw_in, b=raw_out: a.copy_(b, non_blocking=cuda),
                         repeats, warmup)
        host_slots = rng.sample(range(num_slots), n)
        gpu_slots = rng.sample(range(num_slots), n)
        consecutive = list(range(n))
        cases: list[tuple[str, str, list[int], list[int]]] = [
            ("scattered", s, host_slots, gpu_slots) for s in strategies]
        cases.append(("consecutive", "auto", consecutive, consecutive))
        for pattern, strategy, h_slots, g_slots in cases:
            for name, base, src, s_slots, dst, d_slots in (
                    (names[0], base_h2d, host, h_slots, gpu, g_slots),
                    (names[1], base_d2h, gpu, g_slots, host, h_slots)):
                def run(src: SlotPool = src, s_slots: list[int] = s_slots,
                        dst: SlotPool = dst, d_slots: list[int] = d_slots,
                        strategy: str = strategy) -> None:
                    copy_slots(src, s_slots, dst, d_slots, strategy=strategy).wait()  # type: ignore[arg-type]

                try:
                    seconds = timer(run, repeats, warmup)
                except ValueError:  # strategy not applicable to these pools
                    continue
                rows.append(_row(name, f"{pattern} [{strategy}]", block_bytes, n, seconds,
                                 base))
        if not cuda:
            continue
        for name, raw_src, raw_dst, src, s_slots, dst, d_slots in (
                (names[0], raw_in, raw_out, host, host_slots, gpu, gpu_slots),
                (names[1], raw_out, raw_in, gpu, gpu_slots, host, host_slots)):
            def raw_burst(a: torch.Tensor = raw_dst, b: torch.Tensor = raw_src) -> None:
                for _ in range(IN_FLIGHT):
                    a.copy_(b, non_blocking=True)

            def burst(src: SlotPool = src, s_slots: list[int] = s_slots,
                      dst: SlotPool = dst, d_slots: list[int] = d_slots) -> None:
                transfers = [copy_slots(src, s_slots, dst, d_slots)
                             for _ in range(IN_FLIGHT)]
                transfers[-1].wait()  # one side stream: the last completes last

            base = timer(raw_burst, repeats, warmup)
            seconds = timer(burst, repeats, warmup)
            rows.append(_row(name, "scattered [auto] sustained", block_bytes,
                             n, seconds / IN_FLIGHT, base / IN_FLIGHT))
    return rows


COMPUTE_MATMULS = 40
"""bf16 matmuls (4,096 x 4,096 by 4,096 x 4,096) of the compute burst."""


def bench_beside_compute(block_bytes: int, n_blocks: int, *, repeats: int = 5
                         ) -> list[str]:
    """Lines of the beside-compute measure (module docstring); CUDA only."""
    layout = layout_for_block_bytes(block_bytes)
    device = torch.device("cuda")
    host, gpu = HostPool(layout, 2 * n_blocks), GPUPool(layout, 2 * n_blocks, device=device)
    for pool in (host, gpu):
        if not pool.alloc(2 * n_blocks).ok:
            raise RuntimeError("a fresh pool refused to allocate all its slots")
    _fill(host, 0)
    _fill(gpu, 1)
    rng = random.Random(0)
    h_slots = rng.sample(range(2 * n_blocks), n_blocks)
    g_slots = rng.sample(range(2 * n_blocks), n_blocks)
    a = torch.randn((4096, 4096), device=device, dtype=torch.bfloat16)
    b = torch.randn((4096, 4096), device=device, dtype=torch.bfloat16)

    def compute() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(COMPUTE_MATMULS):
            torch.mm(a, b)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def copy(src: SlotPool, s: list[int], dst: SlotPool, d: list[int], strategy: str,
             beside: bool) -> tuple[float, float]:
        torch.cuda.synchronize()
        t = copy_slots(src, s, dst, d, strategy=strategy)  # type: ignore[arg-type]
        busy = compute() if beside else 0.0
        t.wait()
        seconds = t.seconds
        assert seconds is not None
        return busy, seconds

    for _ in range(3):
        compute()
    alone = statistics.median(compute() for _ in range(repeats))
    lines = [f"{block_bytes:,}-byte blocks, {n_blocks} scattered; compute burst alone "
             f"{alone * 1e3:.2f} ms ({COMPUTE_MATMULS} bf16 4096^3 matmuls)",
             f"{'direction':<9} {'strategy':<8} {'compute ms':>10} {'x alone':>8} "
             f"{'copy GB/s':>10} {'x alone':>8}"]
    nbytes = n_blocks * block_bytes
    for name, src, s, dst, d in (("h2d", host, h_slots, gpu, g_slots),
                                 ("d2h", gpu, g_slots, host, h_slots)):
        for strategy in ("runs", "index"):
            copy(src, s, dst, d, strategy, False)  # warm-up
            solo = statistics.median(copy(src, s, dst, d, strategy, False)[1]
                                     for _ in range(repeats))
            runs = [copy(src, s, dst, d, strategy, True) for _ in range(repeats)]
            busy = statistics.median(r[0] for r in runs)
            both = statistics.median(r[1] for r in runs)
            lines.append(f"{name:<9} {strategy:<8} {busy * 1e3:>10.2f} {busy / alone:>8.2f} "
                         f"{nbytes / both / 1e9:>10.1f} {solo / both:>8.2f}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Print the pool bandwidth table for the model block sizes (and, with CUDA, the
    beside-compute measure)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.tiers_bench_pools",
        description="Host<->GPU bulk slot-copy bandwidth vs a raw pinned copy.")
    parser.add_argument("--blocks", type=int, default=256,
                        help="largest batch in blocks (a batch of 64 is measured too)")
    parser.add_argument("--repeats", type=int, default=REPEATS)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    rows: list[Row] = []
    for layout in MODEL_LAYOUTS.values():
        rows += bench_pools(layout.block_bytes, args.blocks, repeats=args.repeats)
    print(format_table(rows))
    if torch.cuda.is_available():
        for layout in MODEL_LAYOUTS.values():
            print()
            print("\n".join(bench_beside_compute(layout.block_bytes, args.blocks)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
