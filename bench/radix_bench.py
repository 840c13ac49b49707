"""Radix index benchmark: hashing, match and eviction, each next to its baseline.

Run: ``python -m kvstore bench radix`` (``--help`` for sizes). Prints one table:

- hashing a long prompt (block 16) with our xxh3_128 chain vs the vLLM recipe
  (sha256 over pickled ``(parent, tuple(tokens), extras)``), same tokens, same run;
- ``match`` of that prompt against a tree of ~1M blocks;
- evicting blocks from a tree of ~1M blocks with ~100k leaves, in calls of a few dozen
  blocks as a scheduler does under memory pressure, vs a naive evictor that rebuilds and
  re-heapifies the list of all evictable leaves on every call (SGLang's approach).
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import pickle
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tqdm import tqdm

from radix import Namespace, RadixTree, hash_blocks

GPU = 0


@dataclass(frozen=True)
class Result:
    """One benchmark line: our figure, the baseline's, and the target ratio."""

    name: str
    ours_ms: float
    base_ms: float | None
    baseline: str
    target: str

    @property
    def speedup(self) -> float | None:
        return None if self.base_ms is None else self.base_ms / self.ours_ms


def best_ms(fn: Callable[[], object], repeat: int) -> float:
    """Best of ``repeat`` runs in ms (as timeit does: other load only adds time)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def vllm_hash_blocks(tokens: Sequence[int], block_size: int) -> list[bytes]:
    """The vLLM prefix-caching recipe: sha256 of the pickled (parent, tokens, extras)."""
    parent = b""
    out = []
    for start in range(0, len(tokens) - len(tokens) % block_size, block_size):
        blk = tuple(tokens[start:start + block_size])
        parent = hashlib.sha256(pickle.dumps((parent, blk, None),
                                             protocol=pickle.HIGHEST_PROTOCOL)).digest()
        out.append(parent)
    return out


def bench_hashing(num_tokens: int, repeat: int) -> Result:
    rng = random.Random(0)
    tokens = [rng.randrange(49152) for _ in range(num_tokens)]
    root = Namespace("bench").root()
    ours = best_ms(lambda: hash_blocks(root, tokens, 16), repeat)
    base = best_ms(lambda: vllm_hash_blocks(tokens, 16), max(1, repeat // 3))
    return Result(f"hash {num_tokens // 1024}k-token prompt (block 16)", ours, base,
                  "vLLM sha256(pickle)", ">=3x, <10 ms")


class NaiveEvictor:
    """SGLang-style eviction: every call heapifies the full list of evictable leaves.

    Keeps its own set of evictable leaves up to date between calls (cheap), but pays
    O(leaves) to rebuild and heapify on every call, as the reference approach does.
    """

    def __init__(self, tree: RadixTree) -> None:
        self.tree = tree
        self.leaves = {n for n in tree.iter_nodes() if n.evictable & 1}

    def evict(self, n: int) -> int:
        heap = [(node.stamp, id(node), node) for node in self.leaves]
        heapq.heapify(heap)
        done = 0
        while done < n and heap:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            self.leaves.discard(node)
            self.tree.clear_location(node, GPU)
            done += 1
            if parent is not None and parent.evictable & 1:
                self.leaves.add(parent)
                heapq.heappush(heap, (parent.stamp, id(parent), parent))
        return done


def build_tree(num_blocks: int, num_leaves: int, prompt_keys: list[bytes],
               prompt_blocks: list[bytes], progress: bool) -> RadixTree:
    """A tree of ``num_blocks`` blocks: ``num_leaves`` random paths plus the prompt path."""
    tree = RadixTree(["gpu", "host"])
    tree.insert(prompt_keys, prompt_blocks, GPU, list(range(len(prompt_keys))))
    rest = max(0, num_blocks - len(prompt_keys))
    depth = max(1, -(-rest // num_leaves))
    rng = random.Random(1)
    root = Namespace("bench-tree").root()
    slot = len(prompt_keys)
    order = list(range(num_leaves))
    rng.shuffle(order)
    for i in tqdm(order, desc="building tree", unit="path", disable=not progress,
                  mininterval=0.5):
        c = hash_blocks(root, [i] + [rng.randrange(49152) for _ in range(16 * depth - 1)], 16)
        tree.insert(c.keys, c.blocks, GPU, range(slot, slot + depth))  # type: ignore[arg-type]
        slot += depth
    return tree


def bench_tree(num_tokens: int, num_blocks: int, num_leaves: int, evict_blocks: int,
               evict_batch: int, repeat: int, progress: bool) -> list[Result]:
    rng = random.Random(2)
    tokens = [rng.randrange(49152) for _ in range(num_tokens)]
    prompt = hash_blocks(Namespace("bench").root(), tokens, 16)
    tree = build_tree(num_blocks, num_leaves, prompt.keys, prompt.blocks, progress)
    size = len(tree)
    match_ms = best_ms(lambda: tree.match(prompt.keys, prompt.blocks), repeat)
    root = prompt.root
    full_ms = best_ms(
        lambda: tree.match(hash_blocks(root, tokens, 16).keys, prompt.blocks), repeat)
    results = [
        Result(f"match {num_tokens // 1024}k-token prompt, tree of {size / 1e6:.2f}M blocks",
               match_ms, None, "-", "<5 ms"),
        Result(f"hash + match {num_tokens // 1024}k-token prompt", full_ms, None, "-", "-"),
    ]
    calls = max(1, evict_blocks // evict_batch)
    naive = NaiveEvictor(tree)
    leaves = len(naive.leaves)
    t0 = time.perf_counter()
    for _ in tqdm(range(calls), desc="naive eviction", disable=not progress, mininterval=0.5):
        naive.evict(evict_batch)
    base_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    evicted = 0
    for _ in range(calls):
        evicted += len(tree.evict(GPU, evict_batch))
    ours_ms = (time.perf_counter() - t0) * 1e3
    results.append(Result(
        f"evict {evicted} blocks in {calls} calls ({size / 1e6:.2f}M blocks, {leaves // 1000}k leaves)",
        ours_ms, base_ms, "re-heapify per call", ">=20x"))
    tree.check_integrity()
    return results


def print_table(results: list[Result]) -> None:
    head = f"{'measure':<64} {'ours':>10} {'baseline':>10} {'speedup':>8}  {'target':<12} baseline is"
    print(head)
    print("-" * len(head))
    for r in results:
        base = "-" if r.base_ms is None else f"{r.base_ms:8.2f}ms"
        ratio = "-" if r.speedup is None else f"{r.speedup:7.1f}x"
        print(f"{r.name:<64} {r.ours_ms:8.2f}ms {base:>10} {ratio:>8}  {r.target:<12} {r.baseline}")


def build_parser() -> argparse.ArgumentParser:
    """The ``kvstore bench radix`` argument parser."""
    p = argparse.ArgumentParser(
        prog="kvstore bench radix",
        description="Benchmark block hashing, prefix match and eviction of the radix index, "
                    "each next to its baseline measured in the same run.")
    p.add_argument("--tokens", type=int, default=128 * 1024,
                   help="prompt length in tokens (default: %(default)s; --quick: 16384)")
    p.add_argument("--tree-blocks", type=int, default=1_000_000,
                   help="blocks in the tree (default: %(default)s; --quick: 50000)")
    p.add_argument("--leaves", type=int, default=100_000,
                   help="leaves in the tree (default: %(default)s; --quick: 5000)")
    p.add_argument("--evict", type=int, default=10_000,
                   help="blocks to evict (default: %(default)s; --quick: 1000)")
    p.add_argument("--evict-batch", type=int, default=100,
                   help="blocks evicted per call, as a scheduler frees space "
                        "(default: %(default)s)")
    p.add_argument("--repeat", type=int, default=9,
                   help="repetitions per timing, best of (default: %(default)s; --quick: 3)")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.tree_blocks, args.leaves, args.evict = 16 * 1024, 50_000, 5_000, 1_000
        args.repeat = 3
    for name in ("tokens", "tree_blocks", "leaves", "evict", "evict_batch", "repeat"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.leaves * 2 > args.tree_blocks:
        p.error("--leaves must be at most half of --tree-blocks (paths need depth >= 2)")
    results = [bench_hashing(args.tokens, args.repeat)]
    results += bench_tree(args.tokens, args.tree_blocks, args.leaves, args.evict,
                          args.evict_batch, args.repeat, progress=not args.no_progress)
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
