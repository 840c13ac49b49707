"""The radix prefix index: one node per full block, children keyed by block key.

A pure data structure. It knows block keys, block tokens (LE int32 bytes, kept to
verify every hit against hash collisions), opaque per-tier locations (a GPU slot, a host
slot, ``True`` for "on disk"), lock counts and access stamps. It never touches tensors
or does I/O; the store (``kvstore``) moves bytes and tells the tree where they went.

Invariants (checked by :meth:`RadixTree.check_integrity`):

- ``node.lock == node.refs + sum(child.lock for child in node.children)``: a lock on a
  node covers the whole path to the root.
- ``node.nchild[t]`` counts the children that have a location in tier ``t``.
- A node is evictable from tier ``t`` iff it has a location in ``t``, is unlocked, and
  no child has a location in ``t`` (leaf-first, per tier).
- Every node evictable from ``t`` has exactly one live entry in tier ``t``'s heap.
- No node other than the root is both without any location and without children.
- A live heap entry's (priority, key) never exceeds the node's current one (keys only
  grow while an entry lives; a lowered priority gets a fresh entry).

Each tier evicts in its own order (:mod:`radix.eviction`: ``lru`` by default, ``lfu``,
``cost``) through a lazy heap: touching a node only updates its stamp (and, for the
aged orders, its per-tier key); a popped entry whose key is stale is pushed again with
the current key. Each evicted block costs O(log n) amortized; there is no scan and no
re-heapify.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from radix.eviction import DEFAULT_KNEE_TOKENS, EvictionOrder, eviction_orders


class TreeObserver(Protocol):
    """Told of every change of a block's location in a tier (insert, promotion,
    demotion, eviction, a dropped corrupt block): the tree's two choke points call it.
    Called under the caller's serialization; must be cheap and must not raise."""

    def placed(self, node: Node, tier: int) -> None:
        """``node`` is now held in tier ``tier`` (an index into the tree's tiers)."""

    def cleared(self, node: Node, tier: int) -> None:
        """``node`` is about to leave tier ``tier``."""


class _NoObserver:
    def placed(self, node: Node, tier: int) -> None:
        return None

    def cleared(self, node: Node, tier: int) -> None:
        return None


NO_OBSERVER: TreeObserver = _NoObserver()
"""Nobody watches the index (the default)."""

_NO_SCORE: list[float] = []
"""Shared by nodes of trees without an aged order (never mutated, only replaced)."""


class IntegrityError(AssertionError):
    """An invariant of the index does not hold (a bug, never a user error)."""


class Node:
    """One full block in the index. Fields are managed by :class:`RadixTree` only."""

    __slots__ = ("key", "tokens", "parent", "parent_key", "children", "locs", "nloc", "nchild",
                 "refs", "lock", "stamp", "priority", "hseq", "evictable", "depth", "uses",
                 "score")

    def __init__(self, key: bytes, tokens: bytes, parent: Node | None, num_tiers: int,
                 stamp: int, parent_key: bytes = b"") -> None:
        self.key = key
        self.tokens = tokens
        self.parent = parent
        self.parent_key = parent_key  # key of the previous block (the chain root for the first)
        self.children: dict[bytes, Node] = {}
        self.locs: list[Any] = [None] * num_tiers  # per tier: location or None
        self.nloc = 0  # tiers holding this block
        self.nchild = [0] * num_tiers  # children holding a location in each tier
        self.refs = 0  # locks taken on this node itself
        self.lock = 0  # refs + locks of all descendants (path-to-root locking)
        self.stamp = stamp
        self.priority = 0  # higher is evicted later (pinned prefixes)
        self.hseq = [0] * num_tiers  # seq of this node's live heap entry per tier; 0 = none
        self.evictable = 0  # bit t set: evictable from tier t
        self.depth: int = 0 if parent is None else parent.depth + 1
        self.uses = 1  # accesses since creation (creation counts)
        self.score = _NO_SCORE  # per tier: key of an aged order (made on first access)

    def location(self, tier: int) -> Any:
        """This block's location in ``tier``, or ``None`` when the tier does not hold it."""
        return self.locs[tier]

    @property
    def attached(self) -> bool:
        """False once the node has been pruned from its tree."""
        return self.parent is not None or self.depth == 0

    def __repr__(self) -> str:
        tiers = [t for t, loc in enumerate(self.locs) if loc is not None]
        return f"Node(depth={self.depth}, key={self.key[:4].hex()}, tiers={tiers}, lock={self.lock})"


class Match:
    """Result of :meth:`RadixTree.match`: the matched path, root excluded."""

    __slots__ = ("nodes",)

    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = nodes

    @property
    def num_blocks(self) -> int:
        return len(self.nodes)

    @property
    def last(self) -> Node | None:
        """Deepest matched node, ``None`` when nothing matched."""
        return self.nodes[-1] if self.nodes else None


@dataclass(frozen=True)
class Inserted:
    """Result of :meth:`RadixTree.insert`.

    ``nodes[i]`` is the node of block ``i`` of the inserted run (as far as it got);
    ``placed[i]`` says whether the caller's location was stored (False: the tier
    already held that block elsewhere, see ``node.location(tier)``, and the caller
    should free its own copy). ``collision`` is True when insertion stopped at a block
    whose key exists with different tokens (a hash collision: that block is not cached).
    """

    nodes: list[Node]
    placed: list[bool]
    collision: bool


@dataclass(frozen=True)
class Evicted:
    """A block removed from a tier: the node and the location it had there."""

    node: Node
    location: Any


@dataclass(frozen=True)
class Moved:
    """A block demoted from one tier to another: its old and new locations."""

    node: Node
    src: Any
    dst: Any


@dataclass(frozen=True)
class Demotion:
    """Result of :meth:`RadixTree.demote`.

    ``moved`` blocks need their bytes copied from ``src`` to ``dst``; ``dropped`` blocks
    were already held by the lower tier and only left the upper one; ``unused`` are the
    caller's destination locations that were not needed.
    """

    moved: list[Moved]
    dropped: list[Evicted]
    unused: list[Any]


@dataclass(frozen=True)
class TreeStats:
    """Counts of the index (blocks)."""

    nodes: int
    locked: int
    blocks: dict[str, int]
    evictable: dict[str, int]


class RadixTree:
    """Prefix index over block keys with per-tier leaf-first eviction.

    ``tiers`` names the tiers in order (index 0 is usually "gpu"); methods take the
    tier's index (see :meth:`tier`). ``clock`` returns increasing access stamps; the
    default is a counter, so orders are deterministic. ``eviction`` is the eviction
    order of every tier (a name of :data:`radix.eviction.EVICTIONS`) or one per tier;
    ``knee_blocks`` is the ``cost`` order's knee in blocks. ``observer`` is told of
    every location change (:class:`TreeObserver`; KV events). Not thread-safe: the caller
    serializes access.
    """

    def __init__(self, tiers: Sequence[str], clock: Callable[[], int] | None = None,
                 eviction: str | Sequence[str | EvictionOrder] = "lru",
                 knee_blocks: float = DEFAULT_KNEE_TOKENS / 16,
                 observer: TreeObserver = NO_OBSERVER) -> None:
        if not tiers:
            raise ValueError("RadixTree needs at least one tier name")
        if len(set(tiers)) != len(tiers):
            raise ValueError(f"tier names must be unique, got {list(tiers)}")
        self.tier_names = tuple(tiers)
        self._ntiers = len(tiers)
        self._observer = observer
        self.eviction = eviction_orders(eviction if isinstance(eviction, str)
                                        else tuple(eviction), len(tiers), knee_blocks)
        self._aged = [o.aged for o in self.eviction]
        self._aged_tiers = [t for t in range(len(tiers)) if self._aged[t]]
        self._age = 0.0  # aged orders: the largest key evicted so far (see _rescore)
        self._clock = clock if clock is not None else itertools.count(1).__next__
        self._seq = itertools.count(1)
        self.root = Node(b"", b"", None, self._ntiers, 0)
        # Entries: (priority, key, tie, seq, node). The key is the stamp (lru; the tie
        # is the seq) or the aged order's score with the stamp as tie (equal scores go
        # LRU first).
        self._heaps: list[list[tuple[int, float, int, int, Node]]] = [[] for _ in tiers]
        self._nodes = 0
        self._locked = 0
        self._blocks = [0] * self._ntiers
        self._evictable = [0] * self._ntiers

    # ----------------------------------------------------------------- queries

    def tier(self, name: str) -> int:
        """Index of the tier called ``name``."""
        try:
            return self.tier_names.index(name)
        except ValueError:
            raise ValueError(f"unknown tier {name!r}; tiers are {list(self.tier_names)}") from None

    def __len__(self) -> int:
        return self._nodes

    def match(self, keys: Sequence[bytes], blocks: Sequence[bytes], start: Node | None = None
              ) -> Match:
        """Longest verified run of ``keys`` held in the index, from ``start`` (the root).

        A block counts only if its node exists, its stored tokens equal ``blocks[i]``
        (collision defence) and some tier holds it. Changes nothing (see :meth:`touch`).
        Cost: one dict lookup and one bytes comparison per matched block.
        """
        node = self.root if start is None else start
        out: list[Node] = []
        append = out.append
        for key, toks in zip(keys, blocks):
            child = node.children.get(key)
            if child is None or child.nloc == 0 or child.tokens != toks:
                break
            append(child)
            node = child
        return Match(out)

    def touch(self, nodes: Sequence[Node]) -> None:
        """Mark ``nodes`` as used now (one stamp for all; one more use each).

        O(len(nodes)), times the tiers for the aged orders; no heap work.
        """
        stamp = self._clock()
        if self._aged_tiers:
            for node in nodes:
                node.stamp = stamp
                node.uses += 1
                self._rescore(node)
        else:
            for node in nodes:
                node.stamp = stamp
                node.uses += 1

    def stats(self) -> TreeStats:
        names = self.tier_names
        return TreeStats(
            nodes=self._nodes,
            locked=self._locked,
            blocks={names[t]: self._blocks[t] for t in range(self._ntiers)},
            evictable={names[t]: self._evictable[t] for t in range(self._ntiers)},
        )

    def num_evictable(self, tier: int) -> int:
        """Blocks evictable from ``tier`` right now (unlocked leaves of that tier)."""
        return self._evictable[tier]

    def num_blocks(self, tier: int) -> int:
        """Blocks that ``tier`` holds."""
        return self._blocks[tier]

    def path(self, node: Node) -> list[Node]:
        """Nodes from the first block down to ``node`` (root excluded)."""
        out = []
        while node.parent is not None:
            out.append(node)
            node = node.parent
        out.reverse()
        return out

    def iter_nodes(self) -> Iterator[Node]:
        """Every node but the root, parents before children."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    # ---------------------------------------------------------------- mutation

    def insert(self, keys: Sequence[bytes], blocks: Sequence[bytes], tier: int,
               locations: Sequence[Any], parent: Node | None = None, root_key: bytes = b""
               ) -> Inserted:
        """Record that ``tier`` holds blocks ``keys`` (children of ``parent``, the root).

        ``root_key`` is the chain root of the first block when ``parent`` is the root
        (kept as that node's ``parent_key``, which serialized blocks need).
        ``locations[i]`` is where block ``i`` lives in ``tier`` (not ``None``). Existing
        nodes keep an existing location in ``tier``; new nodes are created with stamp
        "now". Stops at a hash collision. Cost: O(len(keys)).
        """
        if not (len(keys) == len(blocks) == len(locations)):
            raise ValueError("insert needs keys, blocks and locations of equal length")
        node = self.root if parent is None else parent
        if not node.attached:
            raise ValueError("insert under a node that was pruned from the index")
        stamp = self._clock()
        nodes: list[Node] = []
        placed: list[bool] = []
        pending: list[tuple[Node, Any]] = []  # nodes to place in `tier`, top-down
        for key, toks, loc in zip(keys, blocks, locations):
            if loc is None:
                raise ValueError("insert location must not be None")
            child = node.children.get(key)
            if child is None:
                pkey = root_key if node is self.root else node.key
                child = Node(key, toks, node, self._ntiers, stamp, pkey)
                if self._aged_tiers:
                    self._rescore(child)
                node.children[key] = child
                self._nodes += 1
            elif child.tokens != toks:
                self._place_path(pending, tier)
                return Inserted(nodes, placed, True)
            else:
                child.stamp = stamp
                child.uses += 1
                if self._aged_tiers:
                    self._rescore(child)
            if child.locs[tier] is None:
                pending.append((child, loc))
                placed.append(True)
            else:
                placed.append(False)
            nodes.append(child)
            node = child
        self._place_path(pending, tier)
        return Inserted(nodes, placed, False)

    def set_location(self, node: Node, tier: int, location: Any) -> None:
        """Record that ``tier`` now holds ``node`` at ``location`` (replacing any other)."""
        if location is None:
            raise ValueError("location must not be None; use clear_location")
        if not node.attached or node is self.root:
            raise ValueError("set_location on a node that is not in the index")
        if node.locs[tier] is None:
            self._set(node, tier, location)
        else:
            node.locs[tier] = location

    def clear_location(self, node: Node, tier: int) -> Any:
        """Forget that ``tier`` holds ``node``; prune it if no tier holds it any more.

        Returns the old location (``None`` if the tier did not hold it). Used for
        blocks found corrupt or lost; normal eviction goes through :meth:`evict`.
        """
        loc = node.locs[tier]
        if loc is None or not node.attached:
            return None
        self._clear(node, tier)
        return loc

    def lock(self, node: Node) -> None:
        """Protect ``node`` and every ancestor from eviction in all tiers. O(depth)."""
        if node is self.root:
            return
        node.refs += 1
        while node is not self.root:
            node.lock += 1
            if node.lock == 1:
                self._locked += 1
                if node.evictable:
                    self._refresh(node)
            parent = node.parent
            assert parent is not None  # every node below the root has a parent
            node = parent

    def unlock(self, node: Node) -> None:
        """Undo one :meth:`lock` of ``node``. O(depth)."""
        if node is self.root:
            return
        if node.refs <= 0:
            raise ValueError(f"unlock of a node that is not locked: {node!r}")
        node.refs -= 1
        self._unlock_path(node, None)

    def relock(self, old: Node, new: Node) -> None:
        """Move one lock from ``old`` to ``new``; cheap when ``new`` descends from ``old``.

        Costs O(distance) when ``old`` is an ancestor of ``new`` (a sequence growing
        block by block), O(depth) otherwise.
        """
        if old is self.root:
            self.lock(new)
            return
        if old.refs <= 0:
            raise ValueError(f"relock from a node that is not locked: {old!r}")
        walk: Node | None = new
        while walk is not None and walk is not old and walk.depth > old.depth:
            walk = walk.parent
        if walk is not old:
            self.lock(new)
            self.unlock(old)
            return
        new.refs += 1
        old.refs -= 1
        node = new
        while node is not old:
            node.lock += 1
            if node.lock == 1:
                self._locked += 1
                if node.evictable:
                    self._refresh(node)
            parent = node.parent
            assert parent is not None  # old is an ancestor of new (found above)
            node = parent

    def set_priority(self, node: Node, priority: int) -> None:
        """Eviction priority of ``node``: higher is evicted later (pin a system prompt)."""
        if priority == node.priority:
            return
        lowered = priority < node.priority
        node.priority = priority
        if lowered:
            # The live heap entry's key is now too high: replace it with a fresh one.
            for t in range(self._ntiers):
                if node.hseq[t]:
                    node.hseq[t] = 0
                    if node.evictable >> t & 1:
                        self._push(node, t)

    def evict(self, tier: int, n: int) -> list[Evicted]:
        """Remove up to ``n`` blocks from ``tier``, in the tier's eviction order.

        Nodes that no tier holds any more are pruned. O(log n) amortized per block.
        """
        out: list[Evicted] = []
        aged = self._aged[tier]
        while len(out) < n:
            node = self._pop(tier)
            if node is None:
                break
            if aged and node.score[tier] > self._age:
                self._age = node.score[tier]  # leaving the cache: the aging clock moves
            loc = node.locs[tier]
            self._clear(node, tier)
            out.append(Evicted(node, loc))
        return out

    def demote(self, tier: int, to: int, n: int, locations: Sequence[Any]) -> Demotion:
        """Free up to ``n`` blocks of ``tier`` by moving its first leaves in eviction
        order down to tier ``to``.

        A victim already held by ``to`` just leaves ``tier`` (``dropped``); any other
        takes the next of ``locations`` in ``to`` (``moved``: the caller copies the
        bytes). Stops early when ``locations`` run out or nothing is evictable.
        """
        moved: list[Moved] = []
        dropped: list[Evicted] = []
        free = list(locations)
        used = 0
        while len(moved) + len(dropped) < n:
            node = self._peek(tier)
            if node is None:
                break
            if node.locs[to] is None and used == len(free):
                break
            self._pop(tier)
            src = node.locs[tier]
            if node.locs[to] is None:
                dst = free[used]
                used += 1
                self._set(node, to, dst)
                moved.append(Moved(node, src, dst))
            else:
                dropped.append(Evicted(node, src))
            self._clear(node, tier)
        return Demotion(moved, dropped, free[used:])

    # ---------------------------------------------------------------- internals

    def _rescore(self, node: Node) -> None:
        """Key of an accessed node in every aged order: age + value (set at access
        only, so a block keeps its key when it is demoted, as in one big cache)."""
        score, age = node.score, self._age
        if not score:
            score = node.score = [0.0] * self._ntiers
        for t in self._aged_tiers:
            score[t] = age + self.eviction[t].value(node.uses, node.depth - 1)

    def _place_path(self, path: Sequence[tuple[Node, Any]], tier: int) -> None:
        """:meth:`_set` for nodes of one root-to-leaf path (given top-down), deepest
        first: a node whose child is placed in the same call is then never made
        evictable (a heap entry) only to stop being so at the next block. The observer
        still hears them top-down (a parent before its child)."""
        for node, loc in reversed(path):
            self._set(node, tier, loc, notify=False)
        for node, _ in path:
            self._observer.placed(node, tier)

    def _set(self, node: Node, tier: int, loc: Any, notify: bool = True) -> None:
        node.locs[tier] = loc
        node.nloc += 1
        self._blocks[tier] += 1
        parent = node.parent
        assert parent is not None
        parent.nchild[tier] += 1
        self._refresh(node)
        if parent is not self.root and parent.nchild[tier] == 1:
            self._refresh(parent)
        if notify:
            self._observer.placed(node, tier)

    def _clear(self, node: Node, tier: int) -> None:
        self._observer.cleared(node, tier)
        node.locs[tier] = None
        node.nloc -= 1
        self._blocks[tier] -= 1
        parent = node.parent
        assert parent is not None
        parent.nchild[tier] -= 1
        self._refresh(node)
        if parent is not self.root and parent.nchild[tier] == 0:
            self._refresh(parent)
        if node.nloc == 0 and not node.children:
            self._prune(node)

    def _prune(self, node: Node) -> None:
        """Remove a node that no tier holds and that has no children, then hollow parents."""
        while node is not self.root and node.nloc == 0 and not node.children:
            if node.lock:
                return  # a locked hollow node stays until unlocked
            parent = node.parent
            assert parent is not None
            del parent.children[node.key]
            node.parent = None
            self._nodes -= 1
            node = parent

    def _unlock_path(self, node: Node, stop: Node | None) -> None:
        hollow: Node | None = None
        while node is not self.root and node is not stop:
            node.lock -= 1
            if node.lock == 0:
                self._locked -= 1
                self._refresh(node)
                if node.nloc == 0 and not node.children and hollow is None:
                    hollow = node
            parent = node.parent
            assert parent is not None  # every node below the root has a parent
            node = parent
        if hollow is not None:
            self._prune(hollow)

    def _refresh(self, node: Node) -> None:
        """Recompute ``node``'s evictable bits; update counters and heaps."""
        mask = 0
        if node.lock == 0:
            locs, nchild = node.locs, node.nchild
            for t in range(self._ntiers):
                if locs[t] is not None and nchild[t] == 0:
                    mask |= 1 << t
        changed = mask ^ node.evictable
        if not changed:
            return
        node.evictable = mask
        for t in range(self._ntiers):
            bit = 1 << t
            if changed & bit:
                if mask & bit:
                    self._evictable[t] += 1
                    if not node.hseq[t]:
                        self._push(node, t)
                else:
                    self._evictable[t] -= 1

    def _push(self, node: Node, tier: int) -> None:
        seq = next(self._seq)
        node.hseq[tier] = seq
        heap = self._heaps[tier]
        if self._aged[tier]:
            entry = (node.priority, node.score[tier], node.stamp, seq, node)
        else:
            entry = (node.priority, node.stamp, seq, seq, node)  # ties end at seq
        heapq.heappush(heap, entry)
        if len(heap) > 2 * self._blocks[tier] + 1024:
            self._compact(tier)

    def _compact(self, tier: int) -> None:
        """Drop dead entries (amortized O(1) per push: runs when half the heap is dead)."""
        heap = [e for e in self._heaps[tier] if e[4].hseq[tier] == e[3]]
        heapq.heapify(heap)
        self._heaps[tier] = heap

    def _peek(self, tier: int) -> Node | None:
        """The next evictable node of ``tier``, settling stale entries on the way."""
        heap = self._heaps[tier]
        bit = 1 << tier
        aged = self._aged[tier]
        while heap:
            prio, key, tie, seq, node = heap[0]
            if node.hseq[tier] != seq:
                heapq.heappop(heap)  # dead entry
                continue
            if not node.evictable & bit:
                heapq.heappop(heap)
                node.hseq[tier] = 0
                continue
            if prio != node.priority or (
                    (key != node.score[tier] or tie != node.stamp) if aged
                    else key != node.stamp):
                heapq.heappop(heap)  # key went stale (touched): re-insert with current key
                self._push(node, tier)
                heap = self._heaps[tier]  # _push may have compacted into a new list
                continue
            return node
        return None

    def _pop(self, tier: int) -> Node | None:
        node = self._peek(tier)
        if node is not None:
            heapq.heappop(self._heaps[tier])
            node.hseq[tier] = 0
        return node

    # ------------------------------------------------------------- integrity

    def check_integrity(self) -> None:
        """Verify every invariant in the module docstring; raise IntegrityError if not."""
        nodes = 0
        locked = 0
        blocks = [0] * self._ntiers
        evictable = [0] * self._ntiers
        live: list[set[int]] = [set() for _ in range(self._ntiers)]

        def fail(msg: str) -> None:
            raise IntegrityError(msg)

        stack = [self.root]
        while stack:
            node = stack.pop()
            child_lock = 0
            nchild = [0] * self._ntiers
            for key, child in node.children.items():
                if child.key != key or child.parent is not node:
                    fail(f"broken parent/child link at {child!r}")
                if child.depth != node.depth + 1:
                    fail(f"wrong depth at {child!r}")
                child_lock += child.lock
                for t in range(self._ntiers):
                    if child.locs[t] is not None:
                        nchild[t] += 1
                stack.append(child)
            if node is self.root:
                continue
            nodes += 1
            if node.lock != node.refs + child_lock:
                fail(f"lock count {node.lock} != refs {node.refs} + children {child_lock}")
            if node.refs < 0:
                fail(f"negative refs at {node!r}")
            if node.lock:
                locked += 1
            if nchild != node.nchild:
                fail(f"child tier counts {node.nchild} != actual {nchild} at {node!r}")
            nloc = sum(loc is not None for loc in node.locs)
            if nloc != node.nloc:
                fail(f"nloc {node.nloc} != actual {nloc} at {node!r}")
            if nloc == 0 and not node.children and node.lock == 0:
                fail(f"hollow leaf left in the index: {node!r}")
            mask = 0
            for t in range(self._ntiers):
                if node.locs[t] is not None:
                    blocks[t] += 1
                    if node.lock == 0 and nchild[t] == 0:
                        mask |= 1 << t
                        evictable[t] += 1
                        if not node.hseq[t]:
                            fail(f"evictable node without heap entry in tier {t}: {node!r}")
                        live[t].add(node.hseq[t])
            if mask != node.evictable:
                fail(f"evictable mask {node.evictable:b} != actual {mask:b} at {node!r}")
        if nodes != self._nodes:
            fail(f"node count {self._nodes} != actual {nodes}")
        if locked != self._locked:
            fail(f"locked count {self._locked} != actual {locked}")
        if blocks != self._blocks:
            fail(f"tier block counts {self._blocks} != actual {blocks}")
        if evictable != self._evictable:
            fail(f"evictable counts {self._evictable} != actual {evictable}")
        for t in range(self._ntiers):
            for prio, hkey, _, seq, node in self._heaps[t]:
                if seq in live[t] and node.hseq[t] == seq:
                    cur = node.score[t] if self._aged[t] else node.stamp
                    if (prio, hkey) > (node.priority, cur):
                        fail(f"heap entry key {(prio, hkey)} above the node's current "
                             f"{(node.priority, cur)} in tier {t}: {node!r}")
            seqs = [e[3] for e in self._heaps[t]]
            if len(seqs) != len(set(seqs)):
                fail(f"duplicate heap entries in tier {t}")
            missing = live[t] - set(seqs)
            if missing:
                fail(f"{len(missing)} evictable nodes missing from heap of tier {t}")
