"""KVStore: the radix index tied to the tiers, with placement policies.

Lifecycle of one sequence (docs/lifecycle.md walks it with the engine):

1. ``match(chain)``: the longest verified prefix, from the index and then from the
   shared tiers (blocks other processes wrote), with the tier each block comes from.
2. ``acquire(match)`` -> :class:`Lease`: locks GPU hits in place and starts promoting
   host/disk/redis hits into fresh GPU slots in the background. ``poll(lease)`` is
   True once the hit is final (a failed or corrupt load truncates it; the rest is
   recomputed, never served).
3. ``allocate(lease, num_tokens)``: GPU slots for the sequence's next tokens, evicting
   or demoting unlocked blocks as needed; copy-on-write of a shared partial block.
   Returns :class:`OutOfBlocks` (never raises) when locked blocks fill the pool.
4. ``commit(lease, num_computed)``: inserts every block that is now full and computed,
   so the next turn of a chat hits it. Write-through copies it down at once.
5. ``release(lease)``: unlocks; committed blocks stay cached and evictable.

``fork(lease)`` shares a sequence's blocks with a new one (n > 1 sampling).

Tiers are one ordered list of levels (``kvstore.cascade``): GPU, host (a pool of no
slots when absent), then the configured shared tiers (disk, redis, remote). Policies:
write-back (default) demotes evicted blocks one level down, GPU -> host -> disk ->
redis -> remote (a block promoted from the host keeps its host copy as a duplicate the
host frees first when it needs room: evicting it from the GPU again copies nothing);
write-through also copies each committed block to host and the shared tiers when it is
committed. Sharing by default (``StoreConfig.publish``): committed
blocks are also published to every shared tier at once, so other engines hit them; a
block is recorded in a shared tier only once the tier verifiably holds it. ``pin``
gives a prefix (a system prompt) eviction priority.

Cost-aware reuse (``kvstore.cost``): ``acquire`` takes only the leading blocks of a
match whose load is predicted faster than recomputing them; ``stats()`` counts blocks
loaded and declined per tier.

Not thread-safe: one thread (the engine's) calls the store; the mover's threads do
background I/O only and hand results back through ``poll``/``commit``.
"""

from __future__ import annotations

import functools
import math
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvstore.cascade import Level, LoadHandle, LoadRequest, Mover, PoolRoom, SharedRoom
from kvstore.config import SHARED_TIERS, StoreConfig
from kvstore.cost import CostModel, Plan
from kvstore.events import NULL_EVENTS, EventSink
from kvstore.simulation import CountingPool, NullMover, NullPool
from radix import (
    BlockChain,
    IntegrityError,
    Namespace,
    Node,
    RadixTree,
    TreeStats,
    hash_blocks,
)

__all__ = ["SHARED_TIERS", "Allocated", "KVStore", "Lease", "OutOfBlocks", "Parked", "Replayed",
           "StoreMatch", "StoreStats"]


@dataclass(frozen=True)
class StoreMatch:
    """A prefix hit: ``sources[i]`` is the tier block ``i`` would come from.

    ``nodes`` are the index's nodes for the first ``len(nodes)`` blocks; blocks after
    them were found only in the shared tiers.
    """

    chain: BlockChain
    nodes: list[Node]
    sources: list[str]
    block_size: int

    @property
    def num_blocks(self) -> int:
        return len(self.sources)

    @property
    def num_tokens(self) -> int:
        return len(self.sources) * self.block_size

    def tokens_by_tier(self) -> dict[str, int]:
        c = Counter(self.sources)
        return {t: n * self.block_size for t, n in c.items()}


    def prefix(self, num_blocks: int) -> StoreMatch:
        """The first ``num_blocks`` blocks of this match."""
        if num_blocks >= self.num_blocks:
            return self
        return StoreMatch(self.chain, self.nodes[:num_blocks], self.sources[:num_blocks],
                          self.block_size)


@dataclass
class _Promotion:
    match: StoreMatch
    slots: list[int]  # GPU slot per hit block: the index's for GPU hits, new otherwise
    new: list[bool]  # slots[i] was allocated for this promotion
    load: LoadHandle | None  # host and shared tiers -> GPU, in flight


@dataclass
class Lease:
    """One sequence's hold on the store. Fields are managed by :class:`KVStore` only.

    ``slots[i]`` is the GPU slot of block ``i`` (the block table); ``committed`` blocks
    are in the index (immutable, shared); ``computed`` tokens have KV in ``slots``;
    ``node`` is the deepest committed node (it holds this lease's lock);
    ``cached_tokens`` is the prompt hit by tier once ``KVStore.poll`` returned True.
    """

    chain: BlockChain
    slots: list[int] = field(default_factory=list)
    committed: int = 0
    computed: int = 0
    node: Node | None = None
    cached_tokens: dict[str, int] = field(default_factory=dict)
    pending: _Promotion | None = None
    linked: bool = True  # False after a hash collision: no further commits
    released: bool = False

    @property
    def num_cached_tokens(self) -> int:
        return sum(self.cached_tokens.values())


@dataclass(frozen=True)
class Allocated:
    """``allocate`` succeeded: the lease's block table covers the requested tokens."""

    new_blocks: int


@dataclass(frozen=True)
class OutOfBlocks:
    """``allocate`` could not find enough GPU slots (locked blocks fill the pool)."""

    needed: int
    available: int


@dataclass(frozen=True)
class Parked:
    """Result of :meth:`KVStore.park`: blocks that left the GPU for ``tier`` (``None``:
    no tier below the GPU, nothing moved). ``moved`` were copied down; ``dropped`` were
    already held there (write-through) and only left the GPU."""

    tier: str | None
    moved: int
    dropped: int

    @property
    def blocks(self) -> int:
        return self.moved + self.dropped


@dataclass(frozen=True)
class Replayed:
    """Result of :meth:`KVStore.replay`: prompt tokens served from each tier."""

    hit_tokens: dict[str, int]
    prompt_tokens: int

    @property
    def cached_tokens(self) -> int:
        return sum(self.hit_tokens.values())


@dataclass(frozen=True)
class StoreStats:
    """Counters since the store was created (tokens, blocks, bytes).

    ``blocks_loaded``: hit blocks promoted into GPU slots, by the tier they came from.
    ``blocks_declined``: hit blocks the cost model left to recompute (loading them was
    predicted slower), by tier. ``bytes_loaded``/``load_seconds``: bytes that landed in
    GPU slots per source tier and the measured seconds those loads took (their ratio is
    the achieved load bandwidth). ``publish_dropped``: blocks not written to the shared
    tiers because the write queue was full (publications, and host write-back
    demotions, which then leave the cache). ``host_reclaimed``: host copies of blocks
    also on the GPU (write-back keeps a promoted block's host copy) that the host freed
    for room; each one spared a GPU -> host copy while it lived.
    """

    hit_tokens: dict[str, int]
    miss_tokens: int
    lookups: int
    blocks_moved: dict[str, int]
    bytes_moved: dict[str, int]
    evictions: dict[str, int]
    demotions: dict[str, int]
    corrupt_blocks: int
    tier_errors: dict[str, int]
    blocks_loaded: dict[str, int]
    blocks_declined: dict[str, int]
    bytes_loaded: dict[str, int]
    load_seconds: dict[str, float]
    publish_dropped: int
    host_reclaimed: int
    gpu_free: int
    gpu_total: int
    host_free: int
    host_total: int
    index: TreeStats


class KVStore:
    """The tiered KV-cache store (see the module docstring for the lifecycle).

    ``cost``: the cost model deciding which hits to load (default: one that learns
    online from this store's loads and the engine's steps). ``events``: where the
    index's block changes are published for routers (``kvstore.events``; default:
    nowhere, at no cost); closed with the store.
    """

    def __init__(self, config: StoreConfig, cost: CostModel | None = None,
                 events: EventSink = NULL_EVENTS) -> None:
        self.config = config
        self.block_size = config.block_size
        self.tiers = config.tier_names()  # configured tiers, fastest first
        self._shared = config.shared_tier_names()
        # The index always has a host column: an absent host tier is a pool of no slots.
        index_names = ["gpu", "host", *self._shared]
        self.events = events
        self.tree = RadixTree(index_names, eviction=config.eviction,
                              knee_blocks=config.eviction_knee_tokens / config.block_size,
                              observer=events.observer(index_names))
        self._index_names = index_names
        self._t = {name: i for i, name in enumerate(index_names)}
        # Write-back moves blocks between tiers (one copy per block, but for the host
        # duplicates below); write-through keeps the lower copies it made at commit.
        self._exclusive = config.policy == "write-back"
        # Write-back keeps the host copy of a block promoted to the GPU while the host has
        # room (the bytes are immutable): when the GPU lets the block go again it only
        # drops its copy, with no GPU -> host copy. The host reclaims these duplicates
        # first, oldest first, before it demotes or evicts a block it alone holds.
        # Insertion order = reclaim order. An OrderedDict: taking the oldest entry of a
        # plain dict walks past every entry deleted before it (O(n) each, so reclaiming
        # 130k duplicates took seconds on the engine's thread); popitem(last=False) is O(1).
        self._retained: OrderedDict[Node, None] = OrderedDict()
        self._refs: dict[int, int] = {}  # private GPU slot -> leases referencing it
        self._hit_tokens: Counter[str] = Counter()
        self._miss_tokens = 0
        self._lookups = 0
        self._evictions: Counter[str] = Counter()
        self._demotions: Counter[str] = Counter()
        self._reclaimed = 0  # host duplicates of GPU blocks freed for room
        self._loaded: Counter[str] = Counter()
        self._declined: Counter[str] = Counter()
        self._bytes_loaded: Counter[str] = Counter()
        self._load_seconds: dict[str, float] = defaultdict(float)
        self.shared_tiers: dict[str, Any] = {}
        self.gpu: Any
        self.host: Any
        self.mover: Mover
        if config.simulated:
            self.gpu = CountingPool(config.gpu_blocks)
            self.host = CountingPool(config.host_blocks) if config.host_blocks else NullPool()
            self.mover = NullMover(self._shared)
            self._block_bytes = 0
        else:
            self._open_real(config)
        self._levels = [Level("gpu", 0, PoolRoom(self.gpu), False),
                        Level("host", 1, PoolRoom(self.host), False)]
        for name in self._shared:
            t = self._t[name]
            self._levels.append(Level(name, t, SharedRoom(
                config.shared_capacity(name), functools.partial(self.tree.num_blocks, t)), True))
        self._level = {lv.name: lv for lv in self._levels}
        self._pos = {lv.name: i for i, lv in enumerate(self._levels)}
        self.cost = cost or CostModel(max(1, self._block_bytes), self.block_size)

    def _open_real(self, config: StoreConfig) -> None:
        from kvstore.mover import BlockMover, MoverConfig
        from tiers.pool import GPUPool, HostPool

        assert config.layout is not None
        self._block_bytes = config.layout.block_bytes
        self.gpu = GPUPool(config.layout, config.gpu_blocks, config.device)
        self.host = HostPool(config.layout, config.host_blocks) if config.host_blocks \
            else NullPool()
        try:
            if config.disk_path is not None:
                from tiers.lmdb import LMDBTier
                self.shared_tiers["disk"] = LMDBTier(config.disk_path, config.disk_bytes)
            if config.redis_url is not None:
                from tiers.redis import RedisTier
                self.shared_tiers["redis"] = RedisTier(
                    config.redis_url, ttl_s=config.redis_ttl_s, namespace=config.namespace)
            if config.remote_url is not None:
                from tiers.http import HTTPTier
                self.shared_tiers["remote"] = HTTPTier(
                    config.remote_url, namespace=config.namespace, token=config.auth_token)
        except BaseException:
            for tier in self.shared_tiers.values():
                tier.close()
            raise
        # the write queue serves publication and write-back demotion to the shared tiers
        self.mover = BlockMover(config.layout, self.gpu, self.host, self.shared_tiers,
                                MoverConfig(config.load_workers, config.load_batch_bytes,
                                            config.publish_queue_bytes, config.kv_format))

    # ------------------------------------------------------------------ match

    def chain(self, token_ids: Sequence[int], namespace: Namespace) -> BlockChain:
        """The hash chain of ``token_ids`` in ``namespace`` (block size must agree)."""
        if namespace.block_size != self.block_size:
            raise ValueError(f"namespace block_size {namespace.block_size} differs from the "
                             f"store's {self.block_size}")
        if namespace.kv_format != self.config.kv_format:
            raise ValueError(f"namespace kv_format {namespace.kv_format} differs from the "
                             f"store's {self.config.kv_format}; build the namespace with "
                             f"kv_format=StoreConfig.kv_format")
        return hash_blocks(namespace.root(), token_ids, self.block_size)

    def match(self, chain: BlockChain, max_blocks: int | None = None) -> StoreMatch:
        """Longest verified cached prefix of ``chain`` (at most ``max_blocks`` blocks).

        Walks the index, then asks the shared tiers for the blocks after it. Changes
        only access stamps. Cost: O(blocks) plus one round trip per shared tier.
        """
        limit = len(chain.keys) if max_blocks is None else min(max_blocks, len(chain.keys))
        keys, blocks = chain.keys[:limit], chain.blocks[:limit]
        m = self.tree.match(keys, blocks)
        self.tree.touch(m.nodes)
        names = self._index_names
        sources = []
        for node in m.nodes:
            locs = node.locs
            sources.append(next(names[t] for t in range(len(names)) if locs[t] is not None))
        if len(sources) < limit:
            for tier, n in self.mover.contains_prefix(keys[len(sources):]):
                sources += [tier] * n
        return StoreMatch(chain, m.nodes, sources, self.block_size)

    # ---------------------------------------------------------------- acquire

    def acquire(self, match: StoreMatch) -> Lease:
        """Decide which hits pay, lock GPU hits and start loading the others into fresh
        GPU slots.

        The cost model (:attr:`cost`) keeps the leading blocks whose load is predicted
        faster than recomputing them; the rest of the match is recomputed (counted in
        ``stats().blocks_declined``). Blocks that find no GPU slot (the pool is full of
        locked blocks) are dropped from the hit too. The lease's hit is final once
        :meth:`poll` returns True.
        """
        plan = self.plan(match)
        match = match.prefix(plan.blocks)
        lease = Lease(match.chain)
        if match.nodes:
            lease.node = match.nodes[-1]
            self.tree.lock(lease.node)
        need = [i for i, s in enumerate(match.sources) if s != "gpu"]
        got = self._reserve_gpu(len(need))
        hit = match.num_blocks if len(got) == len(need) else need[len(got)]
        slots: list[int] = []
        new: list[bool] = []
        it = iter(got)
        requests: list[LoadRequest] = []
        gpu_t, host_t = self._t["gpu"], self._t["host"]
        chain = match.chain
        for i in range(hit):
            src = match.sources[i]
            if src == "gpu":
                slots.append(match.nodes[i].locs[gpu_t])
                new.append(False)
                continue
            slot = next(it)
            self._refs[slot] = 1
            slots.append(slot)
            new.append(True)
            parent = chain.keys[i - 1] if i else chain.root
            source = match.nodes[i].locs[host_t] if src == "host" else None
            requests.append(LoadRequest(i, chain.keys[i], parent, chain.blocks[i], src, slot,
                                        source))
        load = self.mover.load(requests) if requests else None
        lease.pending = _Promotion(match.prefix(hit), slots, new, load)
        self.poll(lease)
        return lease

    def plan(self, match: StoreMatch) -> Plan:
        """The cost model's decision for ``match`` (counted as declined blocks)."""
        plan = self.cost.plan(match.sources)
        self._declined.update(plan.declined)
        return plan

    def poll(self, lease: Lease) -> bool:
        """True once the lease's hit is final; finishes a completed promotion."""
        p = lease.pending
        if p is None:
            return True
        if p.load is not None and not p.load.done():
            return False
        self._finish(lease, p)
        return True

    def wait(self, lease: Lease) -> None:
        """Block until the lease's hit is final."""
        p = lease.pending
        if p is None:
            return
        if p.load is not None:
            p.load.wait()
        if not self.poll(lease):
            raise RuntimeError("promotion did not complete after waiting for it")

    def _finish(self, lease: Lease, p: _Promotion) -> None:
        lease.pending = None
        m = p.match
        hit = m.num_blocks
        failed = None
        if p.load is not None:
            failed = p.load.first_failure
            for measure in p.load.measures():
                self.cost.observe_load(measure.tier, measure.nbytes, measure.seconds)
                self._bytes_loaded[measure.tier] += measure.nbytes
                self._load_seconds[measure.tier] += measure.seconds
        if failed is not None and failed < hit:
            hit = failed
            if failed < len(m.nodes):  # the index believed a tier held it: forget that
                self.tree.clear_location(m.nodes[failed], self._t[m.sources[failed]])
        gpu_t = self._t["gpu"]
        tree_n = min(len(m.nodes), hit)
        slots = p.slots
        for i in range(tree_n):
            if not p.new[i]:
                continue
            node = m.nodes[i]
            existing = node.locs[gpu_t]
            if existing is None:
                self.tree.set_location(node, gpu_t, slots[i])
                del self._refs[slots[i]]
            else:  # promoted meanwhile by another sequence: use that copy
                self._drop_private(slots[i])
                slots[i] = existing
            if self._exclusive:
                # Write-back moves a block up: a shared tier's copy leaves the index (its
                # bytes stay, findable past it); a host copy stays as a duplicate the
                # host reclaims first. Another lease may have moved it up first.
                src = m.sources[i]
                if src == "host":
                    if node.locs[self._t["host"]] is not None:
                        self._retain(node)
                else:
                    loc = self.tree.clear_location(node, self._t[src])
                    if loc is not None:
                        self._level[src].room.give([loc])
        last = m.nodes[tree_n - 1] if tree_n else None
        if hit > tree_n:
            chain = m.chain
            ins = self.tree.insert(chain.keys[tree_n:hit], chain.blocks[tree_n:hit], gpu_t,
                                   slots[tree_n:hit], parent=last, root_key=chain.root)
            for j, (node, placed) in enumerate(zip(ins.nodes, ins.placed)):
                i = tree_n + j
                if placed:
                    del self._refs[slots[i]]
                else:
                    self._drop_private(slots[i])
                    slots[i] = node.locs[gpu_t]
                level = self._level[m.sources[i]]
                if not self._exclusive and node.locs[level.index] is None:
                    self._ensure_free(level, 1)
                    if level.room.num_free:
                        self.tree.set_location(node, level.index, True)
            if ins.nodes:
                last = ins.nodes[-1]
            if ins.collision:
                hit = tree_n + len(ins.nodes)
        for i in range(hit, len(slots)):  # loaded after a failure: recomputed instead
            if p.new[i]:
                self._drop_private(slots[i])
        lease.slots = slots[:hit]
        lease.committed = hit
        lease.computed = hit * self.block_size
        if last is not lease.node:
            if lease.node is None:
                if last is not None:
                    self.tree.lock(last)
            elif last is None:
                self.tree.unlock(lease.node)
            else:
                self.tree.relock(lease.node, last)
            lease.node = last
        cached = Counter(m.sources[:hit])
        lease.cached_tokens = {t: n * self.block_size for t, n in cached.items()}
        self._loaded.update({t: n for t, n in cached.items() if t != "gpu"})
        self._lookups += 1
        for t, n in lease.cached_tokens.items():
            self._hit_tokens[t] += n
        self._miss_tokens += max(0, lease.chain.num_tokens - hit * self.block_size)

    # --------------------------------------------------------------- allocate

    def allocate(self, lease: Lease, num_tokens: int) -> Allocated | OutOfBlocks:
        """Make ``lease.slots`` cover ``num_tokens`` tokens before they are written.

        Copies a shared partial block first (copy-on-write). Evicts or demotes unlocked
        blocks when the GPU pool is short. Never raises for lack of space.
        """
        if lease.released or lease.pending is not None:
            raise ValueError("allocate needs a live lease whose promotion has finished")
        bs = self.block_size
        want = math.ceil(num_tokens / bs)
        first = lease.computed // bs  # first block the next write touches
        cow = first < len(lease.slots) and self._refs.get(lease.slots[first], 0) > 1
        extra = max(0, want - len(lease.slots))
        n = extra + int(cow)
        if n == 0:
            return Allocated(0)
        got = self._reserve_gpu(n)
        if len(got) < n:
            self.gpu.free(got)
            return OutOfBlocks(n, len(got))
        if cow:
            old = lease.slots[first]
            dst = got.pop()
            self.mover.copy_gpu(old, dst)
            self._refs[old] -= 1
            self._refs[dst] = 1
            lease.slots[first] = dst
        for s in got:
            self._refs[s] = 1
        lease.slots += got
        return Allocated(len(got))

    # ----------------------------------------------------------------- commit

    def commit(self, lease: Lease, num_computed: int) -> int:
        """Record that ``num_computed`` tokens of the lease have KV; index full blocks.

        Inserts every block that is full, computed and hashed (in ``lease.chain``).
        Returns the number of blocks newly committed.
        """
        self._drain_published()
        lease.computed = max(lease.computed, num_computed)
        full = min(lease.computed // self.block_size, len(lease.chain.keys), len(lease.slots))
        start = lease.committed
        if full <= start or not lease.linked:
            return 0
        chain = lease.chain
        gpu_t = self._t["gpu"]
        ins = self.tree.insert(chain.keys[start:full], chain.blocks[start:full], gpu_t,
                               lease.slots[start:full], parent=lease.node, root_key=chain.root)
        placed_nodes: list[Node] = []
        for j, (node, placed) in enumerate(zip(ins.nodes, ins.placed)):
            slot = lease.slots[start + j]
            if placed:
                refs = self._refs.pop(slot)
                if refs != 1:
                    raise IntegrityError(f"committed slot {slot} shared by {refs} leases")
                placed_nodes.append(node)
        if ins.nodes:
            if lease.node is None:
                self.tree.lock(ins.nodes[-1])
            else:
                self.tree.relock(lease.node, ins.nodes[-1])
            lease.node = ins.nodes[-1]
        lease.committed = start + len(ins.nodes)
        if ins.collision:
            lease.linked = False
        if placed_nodes:
            self._copy_down(placed_nodes)
        return len(ins.nodes)

    def _copy_down(self, nodes: list[Node]) -> None:
        """Write-through: copy newly committed blocks to the host tier now. Write-through
        or publication: queue them for every shared tier (recorded once stored)."""
        gpu_t = self._t["gpu"]
        gslots = [n.locs[gpu_t] for n in nodes]
        write_through = self.config.policy == "write-through"
        if write_through:
            host = self._level["host"]
            fresh = [(n, s) for n, s in zip(nodes, gslots) if n.locs[host.index] is None]
            self._ensure_free(host, len(fresh))
            fresh = fresh[:host.room.num_free]
            hslots = host.room.take(len(fresh))
            for (node, _), hs in zip(fresh, hslots):
                self.tree.set_location(node, host.index, hs)
            self.mover.gpu_to_host([s for _, s in fresh], hslots)
        if self._shared and (write_through or self.config.publish):
            if not self.config.simulated:
                # A block the index records in every shared tier (a declined hit, now
                # recomputed) is not written again. (The simulation writes nothing and
                # keeps its order of events exactly.)
                kept = [(n, s) for n, s in zip(nodes, gslots)
                        if any(n.locs[self._t[t]] is None for t in self._shared)]
                nodes, gslots = [n for n, _ in kept], [s for _, s in kept]
            self.mover.publish(nodes, gslots)
            self._drain_published()

    def _drain_published(self) -> None:
        """Record in the index what the shared tiers verifiably stored since last time,
        within each tier's room in the index; forget what background demotions recorded
        there and did not store."""
        for pub in self.mover.published():
            level = self._level[pub.tier]
            for node in pub.lost:
                if node.attached and node.locs[level.index] is not None:
                    self.tree.clear_location(node, level.index)
            fresh = [n for n in pub.nodes if n.attached and n.locs[level.index] is None]
            self._ensure_free(level, len(fresh))
            for node in fresh[:level.room.num_free]:
                self.tree.set_location(node, level.index, True)

    # ---------------------------------------------------------------- release

    def release(self, lease: Lease) -> None:
        """End the lease: unlock its blocks (they stay cached), free private slots."""
        if lease.released:
            return
        if lease.pending is not None:
            self.wait(lease)
        lease.released = True
        if lease.node is not None:
            self.tree.unlock(lease.node)
            lease.node = None
        for s in lease.slots:
            if s in self._refs:
                self._drop_private(s)
        lease.slots = []

    def fork(self, lease: Lease) -> Lease:
        """A new lease sharing all of ``lease``'s blocks; writes copy shared partial blocks."""
        if lease.released or lease.pending is not None:
            raise ValueError("fork needs a live lease whose promotion has finished")
        child = Lease(lease.chain.fork(), list(lease.slots), lease.committed, lease.computed,
                      lease.node, dict(lease.cached_tokens), None, lease.linked)
        if child.node is not None:
            self.tree.lock(child.node)
        for s in child.slots:
            if s in self._refs:
                self._refs[s] += 1
        return child

    def pin(self, chain: BlockChain, priority: int = 1) -> int:
        """Give the cached prefix of ``chain`` eviction priority (0 unpins). Returns blocks."""
        m = self.tree.match(chain.keys, chain.blocks)
        for node in m.nodes:
            self.tree.set_priority(node, priority)
        return m.num_blocks

    def park(self, lease: Lease) -> Parked:
        """Commit and release ``lease``, then move its now-unlocked GPU blocks one level
        down (the host pool) as one batch: a preempted sequence resumes by promoting
        them back (``match``/``acquire``) instead of recomputing.

        Moves the deepest run of the lease's committed blocks that no other lease locks,
        that is not pinned and whose GPU descendants are all in the run, leaf first (as
        demotion would take them), through :meth:`RadixTree.demote` and one copy. With
        no host tier nothing moves: the blocks stay cached on the GPU.
        """
        if lease.pending is not None:
            self.wait(lease)
        path: list[Node] = []
        if not lease.released:
            self.commit(lease, lease.computed)
            if lease.node is not None:
                path = self.tree.path(lease.node)
        self.release(lease)
        gpu, below = self._levels[0], self._levels[1]
        if below.room.capacity == 0:
            return Parked(None, 0, 0)
        run: list[Node] = []
        for node in reversed(path):
            if node.lock or node.priority or node.locs[gpu.index] is None or \
                    node.nchild[gpu.index] != (1 if run else 0):
                break
            run.append(node)
        if not run:
            return Parked(below.name, 0, 0)
        self._ensure_free(below, sum(1 for n in run if n.locs[below.index] is None))
        for node in run:  # first in the GPU's eviction order, for this one demotion
            self.tree.set_priority(node, -1)
        try:
            d = self.tree.demote(gpu.index, below.index, len(run), below.room.take(len(run)))
        finally:
            for node in run:
                self.tree.set_priority(node, 0)
        below.room.give(d.unused)
        for node in self.mover.demote(gpu.name, below.name, d.moved):
            self.tree.clear_location(node, below.index)
        freed = [m.src for m in d.moved] + [e.location for e in d.dropped]
        gpu.room.give(freed)
        self._demotions[gpu.name] += len(d.moved)
        self._evictions[gpu.name] += len(freed)
        return Parked(below.name, len(d.moved), len(d.dropped))

    # --------------------------------------------------------------- eviction

    def _drop_private(self, slot: int) -> None:
        refs = self._refs[slot] - 1
        if refs:
            self._refs[slot] = refs
        else:
            del self._refs[slot]
            self.gpu.free([slot])

    def _reserve_gpu(self, n: int) -> list[int]:
        """Allocate up to ``n`` GPU slots, evicting or demoting unlocked blocks first."""
        if n <= 0:
            return []
        gpu = self._levels[0]
        self._ensure_free(gpu, n)
        slots: list[int] = gpu.room.take(n)
        self.mover.before_gpu_reuse(slots)  # a publication may still be reading them
        return slots

    def _ensure_free(self, level: Level, need: int) -> None:
        """Make ``need`` locations free in ``level`` (demoting or evicting its blocks)."""
        short = need - level.room.num_free
        if short > 0:
            self._make_room(self._pos[level.name], short)

    def _make_room(self, pos: int, need: int) -> None:
        """Free ``need`` locations of level ``pos``: move its least recently used
        unlocked blocks to the level below (write-back), else evict them.

        Room below is made only once a victim needs it, so victims already held there
        (write-through copies, published blocks) never push other blocks out. The GPU's
        level below is the host pool; with no host tier (a pool of no slots) GPU victims
        are evicted. Bytes are copied by the mover; a block whose bytes did not reach a
        shared tier is not recorded there.
        """
        level = self._levels[pos]
        if level.room.capacity == 0:
            return
        if level.name == "host" and self._retained:
            need -= self._reclaim_retained(need)
            if need <= 0:
                return
        below = self._levels[pos + 1] if pos + 1 < len(self._levels) else None
        if below is not None and below.room.capacity > 0:
            while need > 0 and self.tree.num_evictable(level.index):
                locations = below.room.take(need)
                d = self.tree.demote(level.index, below.index, need, locations)
                below.room.give(d.unused)
                for node in self.mover.demote(level.name, below.name, d.moved):
                    self.tree.clear_location(node, below.index)
                freed = [m.src for m in d.moved] + [e.location for e in d.dropped]
                level.room.give(freed)
                self._demotions[level.name] += len(d.moved)
                self._evictions[level.name] += len(freed)
                need -= len(freed)
                if not freed:
                    self._make_room(pos + 1, need)
                    if not below.room.num_free:
                        break
        if need > 0:
            ev = self.tree.evict(level.index, need)
            level.room.give([e.location for e in ev])
            self._evictions[level.name] += len(ev)

    def _retain(self, node: Node) -> None:
        """Record ``node``'s host copy as a duplicate (newest last). Entries whose block
        left either tier are dropped when they outnumber the host's slots twice over
        (live duplicates never do), so the list stays bounded (amortized O(1))."""
        self._retained[node] = None
        self._retained.move_to_end(node)
        if len(self._retained) > 2 * self.host.num_slots + 64:
            self._retained = OrderedDict((n, None) for n in self._retained
                                         if self._duplicated(n))

    def _duplicated(self, node: Node) -> bool:
        """Whether ``node`` is in the index with both a GPU and a host copy."""
        return (node.attached and node.locs[self._t["gpu"]] is not None
                and node.locs[self._t["host"]] is not None)

    def _reclaim_retained(self, need: int) -> int:
        """Free up to ``need`` host locations held by duplicates of GPU blocks (write-back
        keeps a promoted block's host copy), oldest first; returns how many were freed.
        Entries whose block is no longer on both tiers just leave the list. A duplicate
        of a locked block may go: the lease reads the GPU copy. (A load still reading the
        freed host slot runs before any later copy into it: one side stream, in order.)"""
        host = self._level["host"]
        freed: list[Any] = []
        while len(freed) < need and self._retained:
            node, _ = self._retained.popitem(last=False)
            if self._duplicated(node):
                freed.append(self.tree.clear_location(node, host.index))
        host.room.give(freed)
        self._reclaimed += len(freed)
        return len(freed)

    def drop(self, tier: str, count: int | None = None) -> int:
        """Evict up to ``count`` (default: all) unlocked blocks of ``tier`` now, demoting
        them down the cascade as write-back would. Returns the blocks that left ``tier``.

        For benchmarks and operators (``/stats`` shows the effect); locked blocks stay.
        ``ValueError`` for a tier this store does not have.
        """
        level = self._level.get(tier)
        if level is None:
            raise ValueError(f"unknown tier {tier!r}; this store's tiers are {self.tiers}")
        t = level.index
        before = self.tree.num_blocks(t)
        self._make_room(self._pos[level.name], before if count is None else count)
        return before - self.tree.num_blocks(t)

    # ------------------------------------------------------------ simulation

    def replay(self, keys: Sequence[bytes], blocks: Sequence[bytes], prompt_tokens: int,
               root: bytes = b"") -> Replayed:
        """Run one request through match, acquire, allocate, commit and release.

        ``keys``/``blocks`` are the request's full blocks (prompt, then any generated
        blocks committed after it); hits count only within ``prompt_tokens``. For the
        hit-rate benchmark (simulation mode); a request larger than the GPU pool
        commits what fits.
        """
        chain = BlockChain(root, self.block_size, list(keys), list(blocks))
        prompt_blocks = min(len(keys), prompt_tokens // self.block_size)
        lease = self.acquire(self.match(chain, max_blocks=prompt_blocks))
        self.wait(lease)
        hits = dict(lease.cached_tokens)
        total = len(keys) * self.block_size
        res = self.allocate(lease, total)
        if isinstance(res, OutOfBlocks):  # larger than the pool can hold: commit what fits
            self.allocate(lease, (len(lease.slots) + res.available) * self.block_size)
        self.commit(lease, min(total, len(lease.slots) * self.block_size))
        self.release(lease)
        return Replayed(hits, prompt_tokens)

    # ------------------------------------------------------------------ stats

    def stats(self) -> StoreStats:
        moved = dict(self.mover.moved)
        errors = {}
        for name, tier in self.shared_tiers.items():
            errors[name] = tier.stats().errors
        corrupt = self.mover.corrupt + sum(t.stats().corrupt for t in self.shared_tiers.values())
        return StoreStats(
            hit_tokens=dict(self._hit_tokens), miss_tokens=self._miss_tokens,
            lookups=self._lookups, blocks_moved=moved,
            bytes_moved={k: v * self._block_bytes for k, v in moved.items()},
            evictions=dict(self._evictions), demotions=dict(self._demotions),
            corrupt_blocks=corrupt, tier_errors=errors, blocks_loaded=dict(self._loaded),
            blocks_declined=dict(self._declined), bytes_loaded=dict(self._bytes_loaded),
            load_seconds=dict(self._load_seconds), publish_dropped=self.mover.publish_dropped,
            host_reclaimed=self._reclaimed,
            gpu_free=self.gpu.num_free, gpu_total=self.gpu.num_slots,
            host_free=self.host.num_free, host_total=self.host.num_slots,
            index=self.tree.stats())

    def check_integrity(self) -> None:
        """Cross-check the index with the pools: free + cached + private == total."""
        self.tree.check_integrity()
        self.gpu.check_integrity()
        gpu_t = self._t["gpu"]
        cached = [n.locs[gpu_t] for n in self.tree.iter_nodes() if n.locs[gpu_t] is not None]
        if len(set(cached)) != len(cached):
            raise IntegrityError("two index nodes share a GPU slot")
        private = set(self._refs)
        if private & set(cached):
            raise IntegrityError("a GPU slot is both cached in the index and private")
        if any(r <= 0 for r in self._refs.values()):
            raise IntegrityError("a private GPU slot has a non-positive reference count")
        if self.gpu.num_free + len(cached) + len(private) != self.gpu.num_slots:
            raise IntegrityError(
                f"GPU pool: free {self.gpu.num_free} + cached {len(cached)} + private "
                f"{len(private)} != total {self.gpu.num_slots}")
        for s in cached + list(private):
            if not self.gpu.is_allocated(s):
                raise IntegrityError(f"GPU slot {s} in use but not allocated in the pool")
        self.host.check_integrity()
        host_t = self._t["host"]
        hcached = [n.locs[host_t] for n in self.tree.iter_nodes() if n.locs[host_t] is not None]
        if len(set(hcached)) != len(hcached) or \
                self.host.num_free + len(hcached) != self.host.num_slots:
            raise IntegrityError(
                f"host pool: free {self.host.num_free} + cached {len(hcached)} != total "
                f"{self.host.num_slots}")
        for level in self._levels:
            if level.shared and self.tree.num_blocks(level.index) > level.room.capacity:
                raise IntegrityError(f"the index records more {level.name} blocks than its "
                                     f"capacity {level.room.capacity}")

    def flush(self) -> None:
        """Wait until background copies (write-through, publication, demotion) have
        landed, and record what the shared tiers stored."""
        self.mover.flush()
        self._drain_published()

    def close(self) -> None:
        """Finish background writes and close every tier."""
        self.mover.close()
        for tier in self.shared_tiers.values():
            tier.close()
        self.events.close()
