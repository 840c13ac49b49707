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

Policies: write-back (default) demotes evicted blocks GPU -> host -> disk -> redis ->
remote over the configured tiers; write-through also copies each committed block down
when it is committed. ``pin`` gives a prefix (a system prompt) eviction priority.

Not thread-safe: one thread (the engine's) calls the store; the mover's worker thread
does background I/O only.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvstore.config import StoreConfig
from kvstore.simulation import CountingPool, NullMover
from radix import BlockChain, IntegrityError, Namespace, Node, RadixTree, TreeStats, hash_blocks

SHARED_TIERS = ("disk", "redis", "remote")


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


@dataclass
class _Promotion:
    match: StoreMatch
    slots: list[int]  # GPU slot per hit block: the index's for GPU hits, new otherwise
    new: list[bool]  # slots[i] was allocated for this promotion
    transfer: Any  # host -> GPU copy in flight (None when none)
    load: Any  # shared tiers -> GPU load in flight


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
class Replayed:
    """Result of :meth:`KVStore.replay`: prompt tokens served from each tier."""

    hit_tokens: dict[str, int]
    prompt_tokens: int

    @property
    def cached_tokens(self) -> int:
        return sum(self.hit_tokens.values())


@dataclass(frozen=True)
class StoreStats:
    """Counters since the store was created (tokens, blocks, bytes)."""

    hit_tokens: dict[str, int]
    miss_tokens: int
    lookups: int
    blocks_moved: dict[str, int]
    bytes_moved: dict[str, int]
    evictions: dict[str, int]
    demotions: dict[str, int]
    corrupt_blocks: int
    tier_errors: dict[str, int]
    gpu_free: int
    gpu_total: int
    host_free: int
    host_total: int
    index: TreeStats


class KVStore:
    """The tiered KV-cache store (see the module docstring for the lifecycle)."""

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self.block_size = config.block_size
        names = config.tier_names()
        self.tiers = names
        self.tree = RadixTree(names, eviction=config.eviction,
                              knee_blocks=config.eviction_knee_tokens / config.block_size)
        self._t = {name: i for i, name in enumerate(names)}
        self._host = "host" in self._t
        # Write-back moves blocks between tiers (the index records one tier per block);
        # write-through keeps the lower copies it made at commit.
        self._exclusive = config.policy == "write-back"
        self._shared = [n for n in names if n in SHARED_TIERS]
        self._refs: dict[int, int] = {}  # private GPU slot -> leases referencing it
        self._hit_tokens: Counter[str] = Counter()
        self._miss_tokens = 0
        self._lookups = 0
        self._evictions: Counter[str] = Counter()
        self._demotions: Counter[str] = Counter()
        self.shared_tiers: dict[str, Any] = {}
        if config.simulated:
            self.gpu: Any = CountingPool(config.gpu_blocks)
            self.host: Any = CountingPool(config.host_blocks) if self._host else None
            self.mover: Any = NullMover()
            self._block_bytes = 0
        else:
            self._open_real(config)

    def _open_real(self, config: StoreConfig) -> None:
        from kvstore.mover import BlockMover
        from tiers.pool import GPUPool, HostPool

        assert config.layout is not None
        self._block_bytes = config.layout.block_bytes
        self.gpu = GPUPool(config.layout, config.gpu_blocks, config.device)
        self.host = HostPool(config.layout, config.host_blocks) if self._host else None
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
        self.mover = BlockMover(config.layout, self.gpu, self.host, self.shared_tiers)

    # ------------------------------------------------------------------ match

    def chain(self, token_ids: Sequence[int], namespace: Namespace) -> BlockChain:
        """The hash chain of ``token_ids`` in ``namespace`` (block size must agree)."""
        if namespace.block_size != self.block_size:
            raise ValueError(f"namespace block_size {namespace.block_size} differs from the "
                             f"store's {self.block_size}")
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
        names = self.tiers
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
        """Lock GPU hits and start promoting the others into fresh GPU slots.

        Blocks that find no GPU slot (the pool is full of locked blocks) are dropped
        from the hit. The lease's hit is final once :meth:`poll` returns True.
        """
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
        host_src: list[int] = []
        host_dst: list[int] = []
        loads = []
        gpu_t = self._t["gpu"]
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
            if src == "host":
                host_src.append(match.nodes[i].locs[self._t["host"]])
                host_dst.append(slot)
            else:
                loads.append(self._load_request(match, i, src, slot))
        transfer = self.mover.host_to_gpu(host_src, host_dst)
        load = self.mover.load(loads) if loads else None
        trimmed = StoreMatch(match.chain, match.nodes[:hit], match.sources[:hit], self.block_size)
        lease.pending = _Promotion(trimmed, slots, new, transfer, load)
        self.poll(lease)
        return lease

    def _load_request(self, match: StoreMatch, i: int, tier: str, slot: int) -> Any:
        from kvstore.mover import LoadRequest

        chain = match.chain
        parent = chain.keys[i - 1] if i else chain.root
        return LoadRequest(i, chain.keys[i], parent, chain.blocks[i], tier, slot)

    def poll(self, lease: Lease) -> bool:
        """True once the lease's hit is final; finishes a completed promotion."""
        p = lease.pending
        if p is None:
            return True
        if not self.mover.wait_ready(p.transfer):
            return False
        if p.load is not None and not p.load.done():
            return False
        self._finish(lease, p)
        return True

    def wait(self, lease: Lease) -> None:
        """Block until the lease's hit is final."""
        p = lease.pending
        if p is None:
            return
        if p.transfer is not None:
            p.transfer.wait()
        if p.load is not None:
            p.load.wait()
        if not self.poll(lease):
            raise RuntimeError("promotion did not complete after waiting for it")

    def _finish(self, lease: Lease, p: _Promotion) -> None:
        lease.pending = None
        m = p.match
        hit = m.num_blocks
        failed = p.load.first_failure if p.load is not None else None
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
                # Write-back moves a block up (one copy, more distinct blocks cached);
                # a shared tier's bytes stay where they are, findable past the index.
                # Another lease promoting the same block may have moved it up first.
                src = m.sources[i]
                loc = self.tree.clear_location(node, self._t[src])
                if src == "host" and loc is not None:
                    self.host.free([loc])
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
                src_t = self._t[m.sources[i]]
                if not self._exclusive and node.locs[src_t] is None:
                    self._make_room_shared(m.sources[i], 1)
                    if self._room(m.sources[i]):
                        self.tree.set_location(node, src_t, True)
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
        if self.config.policy == "write-through" and placed_nodes:
            self._write_through(placed_nodes)
        return len(ins.nodes)

    def _write_through(self, nodes: list[Node]) -> None:
        gpu_t = self._t["gpu"]
        gslots = [n.locs[gpu_t] for n in nodes]
        if self._host:
            host_t = self._t["host"]
            fresh = [(n, s) for n, s in zip(nodes, gslots) if n.locs[host_t] is None]
            self._make_room_host(len(fresh))
            fresh = fresh[:self.host.num_free]
            hslots = list(self.host.alloc(len(fresh)).slots)
            for (node, _), hs in zip(fresh, hslots):
                self.tree.set_location(node, host_t, hs)
            self.mover.gpu_to_host([s for _, s in fresh], hslots)
        for tier in self._shared:
            t = self._t[tier]
            fresh = [(n, s) for n, s in zip(nodes, gslots) if n.locs[t] is None]
            self._make_room_shared(tier, len(fresh))
            fresh = fresh[:self._room(tier)]
            for node, _ in fresh:
                self.tree.set_location(node, t, True)
            self.mover.gpu_to_shared(tier, [n for n, _ in fresh], [s for _, s in fresh])

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
        short = n - self.gpu.num_free
        if short > 0:
            self._make_room_gpu(short)
        k = min(n, self.gpu.num_free)
        return list(self.gpu.alloc(k).slots) if k else []

    def _make_room_gpu(self, need: int) -> None:
        """Free ``need`` GPU slots: demote LRU blocks to host (write-back), else evict."""
        gpu_t = self._t["gpu"]
        if self._host:
            host_t = self._t["host"]
            while need > 0 and self.tree.num_evictable(gpu_t):
                # Room below is made only once a victim needs it, so victims already
                # held there (write-through copies) never push other blocks out.
                hslots = list(self.host.alloc(min(need, self.host.num_free)).slots)
                d = self.tree.demote(gpu_t, host_t, need, hslots)
                self.mover.gpu_to_host([m.src for m in d.moved], [m.dst for m in d.moved])
                if d.unused:
                    self.host.free(d.unused)
                freed = [m.src for m in d.moved] + [e.location for e in d.dropped]
                self.gpu.free(freed)
                self._demotions["gpu"] += len(d.moved)
                self._evictions["gpu"] += len(freed)
                need -= len(freed)
                if not freed:
                    self._demote_host(need)
                    if not self.host.num_free:
                        break
        if need > 0:
            ev = self.tree.evict(gpu_t, need)
            self.gpu.free([e.location for e in ev])
            self._evictions["gpu"] += len(ev)

    def _make_room_host(self, need: int) -> None:
        short = need - self.host.num_free
        if short > 0:
            self._demote_host(short)

    def _demote_host(self, count: int) -> None:
        """Move up to ``count`` LRU host blocks to the next tier (or drop them)."""
        host_t = self._t["host"]
        if self._shared:
            nxt = self._shared[0]
            while count > 0 and self.tree.num_evictable(host_t):
                d = self.tree.demote(host_t, self._t[nxt], count, [True] * self._room(nxt))
                self.mover.host_to_shared(nxt, [m.node for m in d.moved],
                                          [m.src for m in d.moved])
                freed = [m.src for m in d.moved] + [e.location for e in d.dropped]
                self.host.free(freed)
                self._demotions["host"] += len(d.moved)
                self._evictions["host"] += len(freed)
                count -= len(freed)
                if not freed:
                    self._demote_shared(nxt, count)
                    if not self._room(nxt):
                        break
        if count > 0:
            ev = self.tree.evict(host_t, count)
            self.host.free([e.location for e in ev])
            self._evictions["host"] += len(ev)

    def _room(self, tier: str) -> int:
        """Blocks the index may still record in shared tier ``tier``."""
        return max(0, self.config.shared_capacity(tier) - self.tree.num_blocks(self._t[tier]))

    def _make_room_shared(self, tier: str, need: int) -> None:
        """Keep the index's record of ``tier`` within its capacity (blocks)."""
        short = self.tree.num_blocks(self._t[tier]) + need - self.config.shared_capacity(tier)
        if short > 0:
            self._demote_shared(tier, short)

    def _demote_shared(self, tier: str, count: int) -> None:
        """Move up to ``count`` LRU blocks of shared ``tier`` down, or forget them."""
        t = self._t[tier]
        pos = self._shared.index(tier)
        if pos + 1 < len(self._shared):
            nxt = self._shared[pos + 1]
            while count > 0 and self.tree.num_evictable(t):
                d = self.tree.demote(t, self._t[nxt], count, [True] * self._room(nxt))
                self.mover.shared_to_shared(tier, nxt, [m.node for m in d.moved])
                self._demotions[tier] += len(d.moved)
                done = len(d.moved) + len(d.dropped)
                self._evictions[tier] += done
                count -= done
                if not done:
                    self._demote_shared(nxt, count)
                    if not self._room(nxt):
                        break
        if count > 0:
            self._evictions[tier] += len(self.tree.evict(t, count))

    def drop(self, tier: str, count: int | None = None) -> int:
        """Evict up to ``count`` (default: all) unlocked blocks of ``tier`` now, demoting
        them down the cascade as write-back would. Returns the blocks that left ``tier``.

        For benchmarks and operators (``/stats`` shows the effect); locked blocks stay.
        """
        t = self._t[tier]
        before = self.tree.num_blocks(t)
        count = before if count is None else count
        if tier == "gpu":
            self._make_room_gpu(count)
        elif tier == "host":
            self._demote_host(count)
        else:
            self._demote_shared(tier, count)
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
        moved = dict(getattr(self.mover, "moved", {}))
        errors = {}
        for name, tier in self.shared_tiers.items():
            errors[name] = tier.stats().errors
        corrupt = getattr(self.mover, "corrupt", 0) + sum(
            t.stats().corrupt for t in self.shared_tiers.values())
        return StoreStats(
            hit_tokens=dict(self._hit_tokens), miss_tokens=self._miss_tokens,
            lookups=self._lookups, blocks_moved=moved,
            bytes_moved={k: v * self._block_bytes for k, v in moved.items()},
            evictions=dict(self._evictions), demotions=dict(self._demotions),
            corrupt_blocks=corrupt, tier_errors=errors,
            gpu_free=self.gpu.num_free, gpu_total=self.gpu.num_slots,
            host_free=self.host.num_free if self.host else 0,
            host_total=self.host.num_slots if self.host else 0,
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
        if self.host is not None:
            self.host.check_integrity()
            host_t = self._t["host"]
            hcached = [n.locs[host_t] for n in self.tree.iter_nodes()
                       if n.locs[host_t] is not None]
            if len(set(hcached)) != len(hcached) or \
                    self.host.num_free + len(hcached) != self.host.num_slots:
                raise IntegrityError(
                    f"host pool: free {self.host.num_free} + cached {len(hcached)} != total "
                    f"{self.host.num_slots}")

    def flush(self) -> None:
        """Wait until background copies (write-through, demotion) have landed."""
        self.mover.flush()

    def close(self) -> None:
        """Finish background writes and close every tier."""
        self.mover.close()
        for tier in self.shared_tiers.values():
            tier.close()
