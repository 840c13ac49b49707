"""GPU check of the slot pools: conformance tests on CUDA, then the bandwidth table.

Run from the repository root on a CUDA machine (about a minute)::

    python -m bench.gpu_check_pools            # tests + bench
    python -m bench.gpu_check_pools --no-tests # bench only

1. Prints the device, and whether the host pool is page-locked and addressable by the
   GPU (the zero-copy ``"index"`` strategy needs both).
2. Runs ``tests/test_pool_conformance.py`` (every pool kind, CUDA ones included).
3. Prints :func:`bench.tiers_bench_pools.bench_pools` for the SmolLM2-135M (360 KiB)
   and Llama-3-8B (2 MiB) blocks, batches of 64 and 256 scattered blocks, every
   strategy in one call and ``"auto"`` sustained (calls back to back), next to a raw
   pinned copy of the same bytes measured the same way; then, per direction, block size
   and batch, the fastest strategy in one call and whether ``"auto"`` sustained reaches
   :data:`TARGET_RATIO` of the raw copy's bandwidth.

Exit status: 0 when the tests pass (and CUDA is present), 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from bench.tiers_bench import MODEL_LAYOUTS, Row, format_table
from bench.tiers_bench_pools import bench_pools
from tiers.layout import KVLayout
from tiers.pool import GPUPool, HostPool, copy_slots

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 0.85
"""Bandwidth of ``copy_slots`` over a raw pinned copy that batches of 64+ must reach."""
BATCH = 256


def describe_device() -> None:
    """Print the device and the host pool's pinning and zero-copy status."""
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"device {torch.cuda.get_device_name()}")
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64)
    host, gpu = HostPool(layout, 8), GPUPool(layout, 8)
    host.alloc(8)
    gpu.alloc(8)
    alias = host._cuda_alias(gpu.device)
    print(f"host pool pinned: {host.pinned}; GPU can address it directly: "
          f"{alias is not None}")
    host.tensor.normal_()
    copy_slots(host, [7, 0, 3], gpu, [1, 2, 6]).wait()
    ok = torch.equal(gpu.tensor[[1, 2, 6]].cpu(), host.tensor[[7, 0, 3]])
    print(f"smoke copy host->gpu correct: {ok}")


def summarize(rows: Sequence[Row]) -> list[str]:
    """Per (direction, block, batch): the fastest scattered strategy in one call, auto's
    ratio in one call, and auto's sustained ratio (judged against the target)."""
    lines = []
    groups: dict[tuple[str, int, int], list[Row]] = {}
    for row in rows:
        if row.op.startswith("scattered"):
            groups.setdefault((row.tier, row.block_bytes, row.n), []).append(row)
    for (tier, block_bytes, n), group in groups.items():
        single = [r for r in group if not r.op.endswith("sustained")]
        best = max(single, key=lambda r: r.gbps)
        auto = next((r for r in single if r.op.endswith("[auto]")), None)
        sustained = next((r for r in group if r.op.endswith("sustained")), None)
        verdict = "n/a" if sustained is None else (
            f"sustained {sustained.ratio:.2f} of raw: "
            f"{'meets' if sustained.ratio >= TARGET_RATIO else 'MISSES'} {TARGET_RATIO}")
        one = "" if auto is None else f"; auto one call {auto.ratio:.2f}"
        lines.append(f"{tier:9s} {block_bytes / 1024:7.0f} KiB  n={n:<4d} "
                     f"fastest one call {best.op} {best.ratio:.2f}{one}; {verdict}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check_pools",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--no-tests", action="store_true", help="skip the pytest run")
    parser.add_argument("--blocks", type=int, default=BATCH,
                        help="largest batch in blocks (64 is measured too)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if not torch.cuda.is_available():
        print("CUDA is not available: nothing to check here")
        return 1
    describe_device()
    status = 0
    if not args.no_tests:
        t0 = time.perf_counter()
        status = int(pytest.main(["-q", "-p", "no:cacheprovider",
                                  str(ROOT / "tests" / "test_pool_conformance.py")]))
        print(f"conformance tests: exit {status} in {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    rows: list[Row] = []
    for layout in MODEL_LAYOUTS.values():
        rows += bench_pools(layout.block_bytes, args.blocks)
    print(format_table(rows))
    print("\n".join(summarize(rows)))
    print(f"bench: {time.perf_counter() - t0:.0f} s")
    return 1 if status else 0


if __name__ == "__main__":
    sys.exit(main())
