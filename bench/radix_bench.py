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
from functools import partial

from tqdm import tqdm

from kvstore.args import count_arg
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
    return Result(f"hash {_tokens_label(num_tokens)}-token prompt (block 16)", ours, base,
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


def _count(n: int) -> str:
    """``n`` in a table label: 1.05M, 100k or 5,000."""
    if n >= 1_000_000:
        return f"{n / 1e6:.2f}M"
    return f"{n // 1000}k" if n >= 10_000 else f"{n:,}"


def _tokens_label(num_tokens: int) -> str:
    return f"{num_tokens // 1024}k" if num_tokens % 1024 == 0 else f"{num_tokens:,}"


def eviction_batches(evict_blocks: int, evict_batch: int) -> list[int]:
    """Blocks asked of each eviction call: ``evict_batch`` each, the last one capped so
    the calls ask for ``evict_blocks`` in all."""
    full, rest = divmod(evict_blocks, evict_batch)
    return [evict_batch] * full + ([rest] if rest else [])


def _hash_and_match(tree: RadixTree, root: bytes, tokens: list[int], blocks: list[bytes]
                    ) -> object:
    return tree.match(hash_blocks(root, tokens, 16).keys, blocks)


def bench_tree(num_tokens: int, num_blocks: int, num_leaves: int, evict_blocks: int,
               evict_batch: int, repeat: int, progress: bool) -> list[Result]:
    """Match timings on a built tree, then eviction: ours on that tree, the naive
    evictor on a second, identical tree (built again from the same seeds), so each
    starts from the same blocks. Raises ``RuntimeError`` when the two do not evict the
    same number of blocks (no speedup of unequal work is printed)."""
    rng = random.Random(2)
    tokens = [rng.randrange(49152) for _ in range(num_tokens)]
    prompt = hash_blocks(Namespace("bench").root(), tokens, 16)
    tree = build_tree(num_blocks, num_leaves, prompt.keys, prompt.blocks, progress)
    size = len(tree)
    label = _tokens_label(num_tokens)
    match_ms = best_ms(partial(tree.match, prompt.keys, prompt.blocks), repeat)
    full_ms = best_ms(partial(_hash_and_match, tree, prompt.root, tokens, prompt.blocks),
                      repeat)
    results = [
        Result(f"match {label}-token prompt, tree of {_count(size)} blocks",
               match_ms, None, "-", "<5 ms"),
        Result(f"hash + match {label}-token prompt", full_ms, None, "-", "-"),
    ]
    batches = eviction_batches(min(evict_blocks, size), evict_batch)
    leaves = len(NaiveEvictor(tree).leaves)
    t0 = time.perf_counter()
    evicted = 0
    for n in batches:
        evicted += len(tree.evict(GPU, n))
    ours_ms = (time.perf_counter() - t0) * 1e3
    tree.check_integrity()
    del tree
    twin = build_tree(num_blocks, num_leaves, prompt.keys, prompt.blocks, progress)
    if len(twin) != size:
        raise RuntimeError(f"the second tree has {len(twin)} blocks, the first {size}")
    naive = NaiveEvictor(twin)
    t0 = time.perf_counter()
    base_evicted = 0
    for n in tqdm(batches, desc="naive eviction", disable=not progress, mininterval=0.5):
        base_evicted += naive.evict(n)
    base_ms = (time.perf_counter() - t0) * 1e3
    if evicted != base_evicted:
        raise RuntimeError(f"the evictors freed different amounts ({evicted} blocks vs the "
                           f"naive {base_evicted}): no comparison")
    results.append(Result(
        f"evict {evicted} blocks in {len(batches)} call{'s' * (len(batches) != 1)} "
        f"({_count(size)} blocks, {_count(leaves)} leaves)", ours_ms, base_ms,
        "re-heapify per call", ">=20x"))
    return results


def print_table(results: list[Result]) -> None:
    head = f"{'measure':<64} {'ours':>10} {'baseline':>10} {'speedup':>8}  {'target':<12} baseline is"
    print(head)
    print("-" * len(head))
    for r in results:
        base = "-" if r.base_ms is None else f"{r.base_ms:8.2f}ms"
        ratio = "-" if r.speedup is None else f"{r.speedup:7.1f}x"
        print(f"{r.name:<64} {r.ours_ms:8.2f}ms {base:>10} {ratio:>8}  {r.target:<12} {r.baseline}")


SIZES = {  # flag: (default, --quick)
    "tokens": (128 * 1024, 16 * 1024),
    "tree_blocks": (1_000_000, 50_000),
    "leaves": (100_000, 5_000),
    "evict": (10_000, 1_000),
    "evict_batch": (100, 100),
    "repeat": (9, 3),
}
"""Sizes of the run: the default and ``--quick``'s; a value given explicitly wins."""


def build_parser() -> argparse.ArgumentParser:
    """The ``kvstore bench radix`` argument parser."""
    p = argparse.ArgumentParser(
        prog="kvstore bench radix",
        description="Benchmark block hashing, prefix match and eviction of the radix index, "
                    "each next to its baseline measured in the same run.")

    def size(flag: str, minimum: int, help: str) -> None:
        default, quick = SIZES[flag.lstrip("-").replace("-", "_")]
        p.add_argument(flag, type=count_arg(minimum), default=None,
                       help=f"{help} (default: {default}"
                            + ("" if quick == default else f"; --quick: {quick}") + ")")

    size("--tokens", 16, "prompt length in tokens, at least one block of 16; a partial "
                         "last block is not hashed")
    size("--tree-blocks", 2, "blocks in the tree")
    size("--leaves", 1, "leaves in the tree")
    size("--evict", 1, "blocks to evict, at most the tree's blocks")
    size("--evict-batch", 1, "blocks evicted per call, as a scheduler frees space; the last "
                             "call asks for what is left")
    size("--repeat", 1, "repetitions per timing, best of")
    p.add_argument("--quick", action="store_true",
                   help="small sizes, for a smoke test (sizes given explicitly are kept)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    for name, (default, quick) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else default)
    if args.leaves * 2 > args.tree_blocks:
        p.error("--leaves must be at most half of --tree-blocks (paths need depth >= 2)")
    if args.evict > args.tree_blocks:
        p.error(f"--evict {args.evict} is more than the tree's --tree-blocks "
                f"{args.tree_blocks}: give at most {args.tree_blocks}")
    if args.tokens % 16:
        print(f"note: --tokens {args.tokens} is not a multiple of the block size 16: the "
              f"last {args.tokens % 16} tokens are not hashed", flush=True)
    results = [bench_hashing(args.tokens, args.repeat)]
    try:
        results += bench_tree(args.tokens, args.tree_blocks, args.leaves, args.evict,
                              args.evict_batch, args.repeat, progress=not args.no_progress)
    except RuntimeError as exc:
        print(f"kvstore bench radix: {exc}", file=sys.stderr)
        return 1
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
