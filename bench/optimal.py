"""The offline optimal cache for a workload: Belady's MIN on the prefix tree.

A request references the chain of its full blocks; it hits the longest run of leading
prompt blocks the cache holds (the store's rule, see :meth:`kvstore.store.KVStore.replay`)
and then every one of its blocks must be cached at once (a sequence holds its blocks on
the GPU while it runs). :func:`belady` replays a workload through a cache of
``capacity`` blocks that, whenever it needs room, evicts the unlocked cached leaf whose
next use lies farthest in the future (a block no later request uses: infinitely far).
Only the running request's blocks are locked.

Why this is the optimum (docs/eviction.md has the long form):

- A parent is used whenever a child is (a request that uses a block uses its whole
  prefix), so a parent's next use is never later than its child's: the farthest
  unlocked block can always be found among the leaves (a parent ties at best with its
  child, and evicting the child first loses nothing). Leaf-first MIN is therefore MIN
  itself; the cache stays a rooted subtree, and a request's hit equals the number of
  its prompt blocks the cache holds.
- Belady's exchange argument carries over to requests that reference several blocks
  which must be resident together (the victim is chosen outside the running request),
  and to references that are not counted (generated output blocks: inserted, never
  hit). Hence no policy of a cache of ``capacity`` blocks, leaf-first or not, hits more
  prompt blocks than this replay (a policy that keeps a child without its parent only
  loses hits, because a hit stops at the first missing block).
- One exception: a block that comes back past a later request's hittable prefix (in
  the part it computes anyway) is re-inserted there at no cost. Evicting such a parent
  before that request and keeping its child can then hit more than leaf-first MIN
  (``tests/test_optimal.py`` has a four-request example); the replay is then a lower
  bound of the optimum. No workload of the benches does this: a block's later
  references are prompt blocks (multi-turn, ShareGPT, Mooncake, shared prefixes).

A tiered store is bounded the same way, tier by tier: its top ``k`` tiers together
form a demand cache of their summed capacity (blocks enter them only when a request
uses them), so its hits from the GPU are at most ``belady(G)``, from GPU or host at most
``belady(G + H)`` and from any tier at most ``belady(G + H + D)``. MIN is a stack
algorithm (the content at a capacity contains the content at any smaller one), so one
schedule reaches all three bounds at once: each tier evicts its farthest-next-use leaf
into the tier below, top-down. :func:`optimal_split` reports that schedule's hits by tier.

Cost: one pass over the workload to number blocks and compute next uses
(:class:`ReferenceString`), then O(log n) per request and per eviction: a max-heap of
evictable leaves keyed by (next use, id) packed into one int, with lazy invalidation (an
entry is live while it equals the block's live entry; a block's entry is cleared when
it is used, gains a cached child or leaves the cache).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from tqdm import tqdm

from bench.workloads import Workload


@dataclass(frozen=True)
class ReferenceString:
    """A workload as block ids with next uses, shared by every capacity's replay.

    ``ids[j]`` are the block ids of request ``j`` (root first), ``eligible[j]`` how many
    of them may hit (its full prompt blocks), ``next_use[j][i]`` the index of the next
    request that may hit block ``ids[j][i]`` (``never`` if none). ``parent[b]`` is the id
    of block ``b``'s previous block (-1 for a first block), ``depth[b]`` its position.
    """

    block_size: int
    ids: list[list[int]]
    eligible: list[int]
    next_use: list[list[int]]
    parent: list[int]
    depth: list[int]
    never: int

    @property
    def num_blocks(self) -> int:
        """Distinct blocks of the workload."""
        return len(self.parent)

    @property
    def largest_request(self) -> int:
        """Blocks of the largest request (the smallest feasible capacity)."""
        return max((len(ids) for ids in self.ids), default=0)

    @classmethod
    def of(cls, workload: Workload) -> ReferenceString:
        """Number the blocks of ``workload`` and compute every reference's next use.

        Keys chain their prefix, so a key has one parent; a key seen under two parents
        (impossible with :mod:`radix.hashing` keys) is rejected.
        """
        bs = workload.block_size
        number: dict[bytes, int] = {}
        parent: list[int] = []
        depth: list[int] = []
        ids: list[list[int]] = []
        eligible: list[int] = []
        for r in workload.requests:
            row = []
            prev = -1
            for d, key in enumerate(r.keys):
                b = number.get(key)
                if b is None:
                    b = number[key] = len(parent)
                    parent.append(prev)
                    depth.append(d)
                elif parent[b] != prev:
                    raise ValueError(f"block key {key.hex()} follows two different prefixes")
                row.append(b)
                prev = b
            ids.append(row)
            eligible.append(min(len(row), r.prompt_tokens // bs))
        never = len(ids)
        upcoming: dict[int, int] = {}
        next_use: list[list[int]] = [[]] * len(ids)
        for j in range(len(ids) - 1, -1, -1):
            row = ids[j]
            get = upcoming.get
            next_use[j] = [get(b, never) for b in row]
            for b in row[:eligible[j]]:
                upcoming[b] = j
        return cls(bs, ids, eligible, next_use, parent, depth, never)


@dataclass(frozen=True)
class OptimalResult:
    """One replay of :func:`belady`: hit blocks and evictions at ``capacity`` blocks."""

    capacity: int
    hit_blocks: int
    evictions: int


@dataclass(frozen=True)
class OptimalSplit:
    """The optimal tiered schedule's hits by tier (blocks), see :func:`optimal_split`."""

    capacities: dict[str, int]
    hit_blocks: dict[str, int]
    evictions: int

    @property
    def total(self) -> int:
        """Hit blocks from any tier (the optimum of one cache of the summed capacity)."""
        return sum(self.hit_blocks.values())


def belady(refs: ReferenceString, capacity: int, progress: str | None = None) -> OptimalResult:
    """Replay ``refs`` through a cache of ``capacity`` blocks under MIN (module doc).

    Raises ``ValueError`` when a request has more blocks than ``capacity`` (it could
    never be resident at once). ``progress`` names a progress bar (none when ``None``).
    """
    if capacity < refs.largest_request:
        raise ValueError(f"capacity {capacity} blocks cannot hold the largest request "
                         f"({refs.largest_request} blocks)")
    n = refs.num_blocks
    parent = refs.parent
    # Packed heap key: -(next_use << shift | id): the smallest entry is the farthest
    # next use, then the highest id (a fixed total order; ties do not change the hits).
    shift = max(1, n.bit_length())
    mask = (1 << shift) - 1
    present = bytearray(n)
    nchild = [0] * n
    nu = [0] * n  # next use of the block as of its last reference
    entry = [0] * n  # the block's live heap entry (0: none)
    mark = [-1] * n  # request that last referenced the block (locked while it runs)
    heap: list[int] = []
    push, pop = heapq.heappush, heapq.heappop
    size = hits = evictions = 0
    requests = zip(refs.ids, refs.next_use, refs.eligible)
    if progress is not None:
        requests = tqdm(requests, total=len(refs.ids), desc=progress, unit="req", leave=False,
                        mininterval=0.5)
    for j, (ids, nxt, elig) in enumerate(requests):
        k = len(ids)
        h = 0
        while h < k and present[ids[h]]:
            h += 1
        hits += h if h < elig else elig
        for i in range(k):
            b = ids[i]
            mark[b] = j
            nu[b] = nxt[i]
            entry[b] = 0  # locked now; the path's tip gets a fresh entry at the end
        for i in range(h, k):
            if size >= capacity:
                while True:
                    e = pop(heap)
                    v = (-e) & mask
                    if entry[v] == e:
                        break
                entry[v] = 0
                present[v] = 0
                size -= 1
                evictions += 1
                p = parent[v]
                if p >= 0:
                    nchild[p] -= 1
                    if not nchild[p] and mark[p] != j:
                        e = entry[p] = -(nu[p] << shift | p)
                        push(heap, e)
            present[ids[i]] = 1
            size += 1
            if i:
                nchild[ids[i - 1]] += 1
        # Only the path's tip can be a leaf: the others have a cached child on the path.
        if k:
            b = ids[-1]
            if not nchild[b]:
                e = entry[b] = -(nu[b] << shift | b)
                push(heap, e)
        if len(heap) > 4 * capacity + 1024:
            heap = [e for e in heap if entry[(-e) & mask] == e]
            heapq.heapify(heap)
    return OptimalResult(capacity, hits, evictions)



def optimal_split(refs: ReferenceString, capacities: dict[str, int],
                  progress: str | None = None) -> OptimalSplit:
    """Hits by tier of the optimal tiered schedule (blocks).

    ``capacities`` maps tier names, fastest first, to blocks (a tier of 0 blocks is
    skipped). Tier ``k``'s hits are ``belady(C_1 + .. + C_k) - belady(C_1 + .. +
    C_{k-1})``: the stack property of MIN makes one top-down schedule reach every
    cumulative bound at once (module doc). The first tier must hold the largest request.
    """
    out: dict[str, int] = {}
    total = prev = evictions = 0
    for name, cap in capacities.items():
        if cap <= 0:
            continue
        total += cap
        res = belady(refs, total, None if progress is None else f"{progress} <= {name}")
        out[name] = res.hit_blocks - prev
        prev = res.hit_blocks
        evictions = res.evictions
    return OptimalSplit(dict(capacities), out, evictions)
