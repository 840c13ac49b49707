"""GPU -> host copies of write-back on a multi-turn workload, in the store's simulation.

Run: ``python -m bench.writeback_bench`` (``--help`` for knobs; the defaults are the
serving bench's H200 run: 21 conversations x 10 rounds of 2,000 new tokens and 64
output tokens, GPU 6,656 blocks, host 20,480, disk 16,384, 16 tokens a block).

Each round of every conversation is replayed through ``KVStore`` in simulation mode
(the store's own matching, promotion, demotion and eviction; no bytes), round by round.
Printed: the prompt hit rate by tier, the GPU's evictions (each one a GPU -> host copy
when a promoted block leaves the host), the GPU -> host copies write-back made
(``demotions``: a block whose host copy was kept needs none) and the host duplicates it
freed for room (``host_reclaimed``). The evictions are the same run's baseline: what
the copies were when promotion dropped the host copy. Also printed: the store's own time a
request (matching, promotion, demotion, eviction: the index work a server does on its
engine thread), e.g. at the shape of a 64-conversation H200 run (``--clients 64
--gpu-blocks 19456 --host-blocks 66560``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from kvstore.config import StoreConfig
from kvstore.store import KVStore
from radix.hashing import Namespace, hash_blocks

BLOCK_SIZE = 16


class Replayed(NamedTuple):
    """What one replay of the workload counted."""

    hit_rate: float  # prompt tokens hit / prompt tokens
    by_tier: dict[str, int]  # hit tokens by tier
    evictions: dict[str, int]  # blocks that left each tier
    demotions: dict[str, int]  # blocks copied one tier down (GPU -> host copies)
    reclaimed: int  # host duplicates freed for room
    store_s: float  # seconds inside the store's calls


def replay(clients: int, rounds: int, new_tokens: int, output_tokens: int, *,
           gpu_blocks: int, host_blocks: int, disk_blocks: int, seed: int = 0) -> Replayed:
    """Replay the workload (module docstring) through the store's simulation."""
    rng = np.random.default_rng(seed)
    store = KVStore(StoreConfig.simulation(block_size=BLOCK_SIZE, gpu_blocks=gpu_blocks,
                                           host_blocks=host_blocks, disk_blocks=disk_blocks))
    root = Namespace("writeback-bench", block_size=BLOCK_SIZE).root()
    history = [np.zeros(0, np.int32) for _ in range(clients)]
    by_tier: Counter[str] = Counter()
    prompt_tokens = 0
    store_s = 0.0
    try:
        for _ in range(rounds):
            for c in range(clients):
                prompt = np.concatenate([history[c],
                                         rng.integers(0, 50000, new_tokens, dtype=np.int32)])
                reply = rng.integers(0, 50000, output_tokens, dtype=np.int32)
                # the reply's last token has no KV (the engine never computes it)
                tokens = np.concatenate([prompt, reply[:-1]]).astype("<i4").tobytes()
                chain = hash_blocks(root, tokens, BLOCK_SIZE)
                t0 = time.perf_counter()
                replayed = store.replay(chain.keys, chain.blocks, len(prompt))
                store_s += time.perf_counter() - t0
                by_tier.update(replayed.hit_tokens)
                prompt_tokens += len(prompt)
                history[c] = np.concatenate([prompt, reply])
        s = store.stats()
    finally:
        store.close()
    hits = sum(by_tier.values())
    return Replayed(hits / prompt_tokens if prompt_tokens else 0.0, dict(by_tier),
                    dict(s.evictions), dict(s.demotions), s.host_reclaimed, store_s)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.writeback_bench",
        description="GPU -> host copies of write-back on a multi-turn workload, in the "
                    "store's simulation, next to the GPU's evictions (the copies when a "
                    "promoted block left the host).")
    p.add_argument("--clients", type=int, default=21, help="conversations (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=10, help="rounds each (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=2000,
                   help="tokens of each new user turn (default: %(default)s)")
    p.add_argument("--output-tokens", type=int, default=64,
                   help="tokens of each reply (default: %(default)s)")
    p.add_argument("--gpu-blocks", type=int, default=6656,
                   help="GPU pool, blocks of 16 tokens (default: %(default)s: 13 GiB of "
                        "Llama-3-8B KV)")
    p.add_argument("--host-blocks", type=int, default=20480,
                   help="host tier, blocks (default: %(default)s: 40 GiB of Llama-3-8B KV)")
    p.add_argument("--disk-blocks", type=int, default=16384,
                   help="disk tier, blocks (default: %(default)s: 32 GiB of Llama-3-8B KV)")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    for name in ("clients", "rounds", "new_tokens", "output_tokens", "gpu_blocks"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.host_blocks < 0 or args.disk_blocks < 0:
        p.error("--host-blocks and --disk-blocks must be >= 0")
    rate, by_tier, evictions, demotions, reclaimed, store_s = replay(
        args.clients, args.rounds, args.new_tokens, args.output_tokens,
        gpu_blocks=args.gpu_blocks, host_blocks=args.host_blocks, disk_blocks=args.disk_blocks)
    evicted, copied = evictions.get("gpu", 0), demotions.get("gpu", 0)
    print(f"prompt hit rate {rate:.1%} (tokens by tier: {by_tier})")
    print(f"GPU evictions {evicted:,} (GPU -> host copies when promotion dropped the host "
          f"copy); GPU -> host copies now {copied:,} ({copied / max(1, evicted):.2f}x); "
          f"host duplicates reclaimed {reclaimed:,}")
    requests = args.clients * args.rounds
    print(f"the store's own time: {store_s * 1e3 / requests:.1f} ms a request "
          f"({store_s:.1f} s for {requests:,} requests)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
