"""Prefix index: block hashing and the radix tree. Pure data structures, no I/O."""

from radix.eviction import EVICTIONS, Eviction, EvictionOrder
from radix.hashing import KEY_BYTES, BlockChain, Namespace, chain_key, hash_blocks, token_bytes
from radix.tree import (
    NO_OBSERVER,
    Demotion,
    Evicted,
    Inserted,
    IntegrityError,
    Match,
    Moved,
    Node,
    RadixTree,
    TreeObserver,
    TreeStats,
)

__all__ = [
    "EVICTIONS", "KEY_BYTES", "NO_OBSERVER", "BlockChain", "Demotion", "Evicted", "Eviction",
    "EvictionOrder", "Inserted", "IntegrityError", "Match", "Moved", "Namespace", "Node",
    "RadixTree", "TreeObserver", "TreeStats", "chain_key", "hash_blocks", "token_bytes",
]
