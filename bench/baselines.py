"""Baseline caches for the hit-rate benchmark, replayed with the store's semantics.

Every cache here has the store's ``replay(keys, blocks, prompt_tokens)`` shape and
counts hits the same way as :meth:`kvstore.store.KVStore.replay`: the longest run of
the request's leading keys that the cache holds, looked up among the prompt's full
blocks only (at most ``prompt_tokens // block_size`` blocks), counted as
``blocks * block_size`` prompt tokens; then every block the request carries (prompt and
committed output) is inserted. Keys are 16-byte chained hashes, so a key names its
whole prefix; these baselines compare keys only (the store also verifies tokens).

- :class:`InfiniteCache`: never evicts (the upper bound of any cache).
- :class:`FlatFIFOCache`: a flat map of block hashes with capacity in blocks that
  evicts in insertion order, with no prefix structure: a hit on a key does not refresh
  it, and eviction may remove a prefix's early blocks while keeping later ones, which
  then can never hit (a prefix hit stops at the first missing key).
- :func:`gpu_only_store`: the store itself with all capacity in the GPU tier and no
  lower tiers, i.e. leaf-first LRU in a single tier.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from kvstore.config import StoreConfig
from kvstore.store import KVStore


class InfiniteCache:
    """A cache that keeps every block it is given (capacity unbounded)."""

    name = "infinite"

    def __init__(self, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be a positive number of tokens, got {block_size}")
        self.block_size = block_size
        self._keys: set[bytes] = set()

    def __len__(self) -> int:
        """Blocks held."""
        return len(self._keys)

    def replay(self, keys: Sequence[bytes], blocks: Sequence[bytes], prompt_tokens: int
               ) -> dict[str, int]:
        """Hit prompt tokens of one request (``{"cache": tokens}``), then insert its blocks."""
        held = self._keys
        limit = min(len(keys), prompt_tokens // self.block_size)
        n = 0
        while n < limit and keys[n] in held:
            n += 1
        held.update(keys)
        return {"cache": n * self.block_size}


class FlatFIFOCache:
    """Flat block-hash cache of ``capacity`` blocks evicting in insertion order (FIFO).

    Inserting a key already held changes nothing (no refresh); inserting a new key when
    full evicts the oldest inserted key first. A request with more blocks than the
    capacity keeps only its last ``capacity`` blocks.
    """

    name = "flat FIFO"

    def __init__(self, block_size: int, capacity: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be a positive number of tokens, got {block_size}")
        if capacity < 0:
            raise ValueError(f"capacity must be a non-negative number of blocks, got {capacity}")
        self.block_size = block_size
        self.capacity = capacity
        self.evictions = 0
        self._keys: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        """Blocks held."""
        return len(self._keys)

    def __contains__(self, key: bytes) -> bool:
        return key in self._keys

    def order(self) -> list[bytes]:
        """Held keys, oldest inserted first (the eviction order)."""
        return list(self._keys)

    def replay(self, keys: Sequence[bytes], blocks: Sequence[bytes], prompt_tokens: int
               ) -> dict[str, int]:
        """Hit prompt tokens of one request (``{"cache": tokens}``), then insert its blocks."""
        held = self._keys
        limit = min(len(keys), prompt_tokens // self.block_size)
        n = 0
        while n < limit and keys[n] in held:
            n += 1
        if self.capacity:
            for key in keys:
                if key in held:
                    continue
                if len(held) >= self.capacity:
                    held.popitem(last=False)
                    self.evictions += 1
                held[key] = None
        return {"cache": n * self.block_size}


def gpu_only_store(block_size: int, capacity: int) -> KVStore:
    """The store in simulation mode with ``capacity`` GPU blocks and no other tier."""
    return KVStore(StoreConfig.simulation(block_size=block_size, gpu_blocks=capacity))
