"""Eviction orders of the radix index: which evictable leaf of a tier goes first.

Every order is a key per (node, tier); the tier's lazy heap evicts the smallest key
first, after the node's pin priority (:meth:`radix.tree.RadixTree.set_priority`). A key
may only grow while its heap entry lives (the heap re-inserts an entry whose key went
up; it never looks for one whose key went down), which each order below respects.

- ``lru``: the node's last access stamp. Least recently used leaf first.
- ``lfu``: LFU with dynamic aging (LFU-DA): at every access the key becomes
  ``age + uses`` (``uses``: accesses since the node was created). Frequently used
  blocks stay; the age lets once-popular blocks that went cold leave eventually.
- ``cost``: GreedyDual over recompute cost: at every access the key becomes
  ``age + cost``. A block's recompute cost per byte grows with its position in the
  sequence (every block has the same bytes; prefilling the block at token position
  ``p`` costs the weights' FLOPs plus attention over ``p`` earlier tokens):
  ``cost = 1 + position * block_size / knee`` (``position``: the block's 0-based index
  in its sequence), where ``knee`` (tokens) is the context length at which a token's
  attention FLOPs equal its weight FLOPs, about ``params / (2 * layers * hidden)``: ~4k
  tokens for SmolLM2-135M, ~30k for an 8B Llama. Blocks that are costly to recompute
  survive proportionally more evictions; with equal costs the order is LRU's.

``age`` is one clock per index: the largest key of a block evicted out of a tier
(:meth:`radix.tree.RadixTree.evict`; a demotion does not move it). Keys are set at
access only, so a demoted block keeps its key, as in one cache spread over the tiers.
Equal keys go least recently used first. All orders cost O(log n) per evicted block
through the tree's lazy heap; ``lfu`` and ``cost`` add O(tiers) per accessed block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Eviction = Literal["lru", "lfu", "cost"]
EVICTIONS: tuple[str, ...] = ("lru", "lfu", "cost")
"""Names of the eviction orders, the default first."""

DEFAULT_KNEE_TOKENS = 8192
"""Default knee of the ``cost`` order (tokens): see the module docstring."""


@dataclass(frozen=True)
class EvictionOrder:
    """The eviction order of one tier: ``name`` in :data:`EVICTIONS`.

    ``knee_blocks`` (blocks, > 0) is the ``cost`` order's knee divided by the block
    size; the other orders ignore it.
    """

    name: str = "lru"
    knee_blocks: float = DEFAULT_KNEE_TOKENS / 16

    def __post_init__(self) -> None:
        if self.name not in EVICTIONS:
            raise ValueError(f"unknown eviction order {self.name!r}; choose one of "
                             f"{', '.join(EVICTIONS)}")
        if not self.knee_blocks > 0:
            raise ValueError(f"knee_blocks must be a positive number of blocks, got "
                             f"{self.knee_blocks!r}")

    @property
    def aged(self) -> bool:
        """True for the orders keyed by ``age + value`` (``lfu``, ``cost``)."""
        return self.name != "lru"

    def value(self, uses: int, position: int) -> float:
        """What an access is worth to an aged order (``lfu``: uses; ``cost``: recompute
        cost of the block at ``position`` in its sequence, 0-based: 1 for the first)."""
        if self.name == "lfu":
            return float(uses)
        return 1.0 + position / self.knee_blocks


def eviction_orders(spec: str | EvictionOrder | tuple[str | EvictionOrder, ...] | list,
                    num_tiers: int, knee_blocks: float = DEFAULT_KNEE_TOKENS / 16
                    ) -> tuple[EvictionOrder, ...]:
    """One :class:`EvictionOrder` per tier from a name/order (all tiers) or a sequence
    of one per tier."""
    items = list(spec) if isinstance(spec, (tuple, list)) else [spec] * num_tiers
    if len(items) != num_tiers:
        raise ValueError(f"eviction needs one order per tier ({num_tiers}), got {len(items)}")
    return tuple(o if isinstance(o, EvictionOrder) else EvictionOrder(o, knee_blocks)
                 for o in items)
