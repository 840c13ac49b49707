"""Radix index: exact-state unit tests and a property test against a reference model."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from radix import EVICTIONS, EvictionOrder, IntegrityError, Namespace, RadixTree, hash_blocks

ROOT = Namespace("test-model", block_size=2).root()
GPU, HOST, DISK = 0, 1, 2


def chain(*tokens: int):
    return hash_blocks(ROOT, list(tokens), 2)


def make_tree(eviction: str = "lru", knee_blocks: float = 512.0) -> RadixTree:
    return RadixTree(["gpu", "host", "disk"], eviction=eviction, knee_blocks=knee_blocks)


def insert(tree: RadixTree, tokens: list[int], tier: int = GPU, first_loc: int = 0):
    c = chain(*tokens)
    locs = list(range(first_loc, first_loc + len(c.keys)))
    return c, tree.insert(c.keys, c.blocks, tier, locs)


# ------------------------------------------------------------------ exact tests


def test_match_returns_longest_prefix_and_stops_at_divergence():
    tree = make_tree()
    insert(tree, [1, 2, 3, 4, 5, 6])
    q = chain(1, 2, 3, 4, 9, 9, 7)
    m = tree.match(q.keys, q.blocks)
    assert m.num_blocks == 2
    assert [n.location(GPU) for n in m.nodes] == [0, 1]
    assert tree.match(chain(7, 7).keys, chain(7, 7).blocks).num_blocks == 0
    tree.check_integrity()


def test_partial_block_is_never_matched():
    tree = make_tree()
    c, _ = insert(tree, [1, 2, 3])
    assert len(c.keys) == 1 and c.tail
    assert tree.stats().nodes == 1


def test_collision_defence_token_mismatch_is_a_miss():
    tree = make_tree()
    c, _ = insert(tree, [1, 2, 3, 4])
    # Same keys but different stored tokens: as if two contents hashed alike.
    forged_blocks = [c.blocks[0], chain(9, 9).blocks[0]]
    assert tree.match(c.keys, forged_blocks).num_blocks == 1
    res = tree.insert(c.keys, forged_blocks, HOST, [10, 11])
    assert res.collision and len(res.nodes) == 1
    assert res.nodes[0].location(GPU) == 0
    assert tree.match(c.keys, c.blocks).nodes[1].location(HOST) is None
    tree.check_integrity()


def test_insert_existing_block_reports_not_placed():
    tree = make_tree()
    insert(tree, [1, 2, 3, 4])
    _, res = insert(tree, [1, 2, 3, 4, 5, 6], first_loc=100)
    assert res.placed == [False, False, True]
    assert [n.location(GPU) for n in res.nodes] == [0, 1, 102]
    tree.check_integrity()


def test_eviction_is_leaf_first_lru():
    tree = make_tree()
    insert(tree, [1, 1, 2, 2], first_loc=0)  # path a: blocks 0, 1
    insert(tree, [3, 3, 4, 4], first_loc=10)  # path b: blocks 10, 11
    c = chain(1, 1, 2, 2)
    tree.touch(tree.match(c.keys, c.blocks).nodes)  # a is now most recent
    evicted = tree.evict(GPU, 3)
    # b's leaf, then b's root (now a leaf), then a's leaf.
    assert [e.location for e in evicted] == [11, 10, 1]
    assert tree.stats().nodes == 1
    tree.check_integrity()


def test_eviction_never_takes_an_inner_node():
    tree = make_tree()
    insert(tree, [1, 1, 2, 2, 3, 3])
    insert(tree, [1, 1, 5, 5], first_loc=50)  # shares block 0
    evicted = tree.evict(GPU, 2)
    assert 0 not in [e.location for e in evicted]
    # The older branch goes first, leaf then parent; block 0 still has a child.
    assert [e.location for e in evicted] == [2, 1]
    tree.check_integrity()


def test_locks_cover_the_path_to_the_root():
    tree = make_tree()
    _, res = insert(tree, [1, 1, 2, 2, 3, 3])
    tree.lock(res.nodes[1])
    assert [n.lock for n in res.nodes] == [1, 1, 0]
    assert tree.stats().locked == 2
    evicted = tree.evict(GPU, 10)
    assert [e.location for e in evicted] == [2]  # only the unlocked leaf
    tree.unlock(res.nodes[1])
    assert tree.stats().locked == 0
    assert [e.location for e in tree.evict(GPU, 10)] == [1, 0]
    assert len(tree) == 0
    tree.check_integrity()


def test_unlock_of_unlocked_node_is_an_error():
    tree = make_tree()
    _, res = insert(tree, [1, 1])
    with pytest.raises(ValueError, match="not locked"):
        tree.unlock(res.nodes[0])


def test_relock_moves_lock_down_the_path():
    tree = make_tree()
    _, res = insert(tree, [1, 1, 2, 2, 3, 3])
    tree.lock(res.nodes[0])
    tree.relock(res.nodes[0], res.nodes[2])
    assert [n.lock for n in res.nodes] == [1, 1, 1]
    assert [n.refs for n in res.nodes] == [0, 0, 1]
    tree.check_integrity()
    tree.unlock(res.nodes[2])
    assert tree.stats().locked == 0
    tree.check_integrity()


def test_per_tier_leaf_first_and_demotion():
    tree = make_tree()
    _, res = insert(tree, [1, 1, 2, 2])
    # Write-back: demote both GPU blocks to host slots 7 and 8.
    d = tree.demote(GPU, HOST, 2, [7, 8, 9])
    assert [(m.src, m.dst) for m in d.moved] == [(1, 7), (0, 8)]
    assert d.unused == [9]
    assert tree.num_blocks(GPU) == 0 and tree.num_blocks(HOST) == 2
    tree.check_integrity()
    # A block already on host is dropped from GPU without a new host slot.
    tree.set_location(res.nodes[0], GPU, 42)
    tree.set_location(res.nodes[1], GPU, 43)
    d = tree.demote(GPU, HOST, 5, [])
    assert [e.location for e in d.dropped] == [43, 42] and not d.moved
    tree.check_integrity()


def test_hollow_node_ends_match_and_is_pruned_with_its_subtree():
    tree = make_tree()
    _, res = insert(tree, [1, 1, 2, 2])
    tree.set_location(res.nodes[1], HOST, 5)
    tree.clear_location(res.nodes[1], GPU)
    # Parent still on GPU: evict it from GPU while the child lives on host only.
    assert [e.location for e in tree.evict(GPU, 1)] == [0]
    c = chain(1, 1, 2, 2)
    assert tree.match(c.keys, c.blocks).num_blocks == 0  # the prefix is broken
    assert len(tree) == 2
    assert [e.location for e in tree.evict(HOST, 1)] == [5]
    assert len(tree) == 0
    tree.check_integrity()


def test_pinned_prefix_is_evicted_last_and_unpin_restores_order():
    tree = make_tree()
    _, sys_prompt = insert(tree, [1, 1])
    insert(tree, [2, 2], first_loc=10)
    insert(tree, [3, 3], first_loc=20)
    tree.set_priority(sys_prompt.nodes[0], 1)
    assert [e.location for e in tree.evict(GPU, 2)] == [10, 20]
    insert(tree, [4, 4], first_loc=30)
    tree.set_priority(sys_prompt.nodes[0], 0)
    assert [e.location for e in tree.evict(GPU, 1)] == [0]
    tree.check_integrity()


def test_stats_count_evictable_per_tier():
    tree = make_tree()
    _, res = insert(tree, [1, 1, 2, 2])
    tree.set_location(res.nodes[0], DISK, True)
    s = tree.stats()
    assert s.blocks == {"gpu": 2, "host": 0, "disk": 1}
    assert s.evictable == {"gpu": 1, "host": 0, "disk": 1}


def test_check_integrity_detects_corruption():
    tree = make_tree()
    _, res = insert(tree, [1, 1, 2, 2])
    res.nodes[0].nchild[GPU] = 0
    with pytest.raises(IntegrityError):
        tree.check_integrity()


def test_many_evictions_keep_heap_bounded():
    tree = RadixTree(["gpu"])
    for i in range(200):
        c = chain(i, i, i + 1, i + 1)
        tree.insert(c.keys, c.blocks, 0, [2 * i, 2 * i + 1])
        tree.touch(tree.match(c.keys, c.blocks).nodes)
    evicted = tree.evict(0, 400)
    assert len(evicted) == 400 and len(tree) == 0
    tree.check_integrity()


# ------------------------------------------------------------- eviction orders


def test_lfu_evicts_fewest_uses_first_and_ages():
    tree = make_tree("lfu")
    _, a = insert(tree, [1, 1], first_loc=0)
    _, b = insert(tree, [2, 2], first_loc=1)
    insert(tree, [3, 3], first_loc=2)
    tree.touch(a.nodes)
    tree.touch(a.nodes)
    tree.touch(b.nodes)  # uses: a 3, b 2, c 1; keys = age 0 + uses
    assert [n.uses for n in (a.nodes[0], b.nodes[0])] == [3, 2]
    assert [e.location for e in tree.evict(GPU, 1)] == [2]  # c, the newest, goes first
    # Aging: the clock is now c's key 1, so a new block's key is 1 + 1 = 2, equal to b's;
    # the tie goes least recently used first (b), then d (2) before a (3).
    insert(tree, [4, 4], first_loc=3)
    assert [e.location for e in tree.evict(GPU, 3)] == [1, 3, 0]
    tree.check_integrity()


def test_lfu_aging_lets_a_cold_popular_block_go():
    tree = make_tree("lfu")
    _, hot = insert(tree, [1, 1], first_loc=0)
    for _ in range(3):
        tree.touch(hot.nodes)  # key 0 + 4 uses
    gone = []
    for i in range(6):  # a newcomer enters at age + 1; each eviction raises the age
        insert(tree, [10 + i, 10 + i], first_loc=10 + i)
        gone += [e.location for e in tree.evict(GPU, 1)]
        tree.check_integrity()
    # Newcomers go while the age is below 4; at 4 the popular block, unused since,
    # ties with the newcomer and goes first (older); then newcomers again.
    assert gone == [10, 11, 12, 0, 13, 14]


def test_cost_keeps_deep_blocks_longer():
    # knee of 2 blocks: cost = 1 + depth / 2, i.e. 1, 1.5, 2 along a 3-block path.
    tree = make_tree("cost", knee_blocks=2)
    _, p = insert(tree, [1, 1, 2, 2, 3, 3], first_loc=0)
    insert(tree, [5, 5], first_loc=10)  # newer, but one cheap block (cost 1)
    assert [n.score[GPU] for n in p.nodes] == [1.0, 1.5, 2.0]
    assert [e.location for e in tree.evict(GPU, 1)] == [10]
    # The clock is now 1: a new first block enters at 1 + 1 = 2, a tie with the deep
    # leaf (older, so it goes first); the path's middle block (1.5) goes before both.
    insert(tree, [6, 6], first_loc=20)
    assert [e.location for e in tree.evict(GPU, 4)] == [2, 1, 0, 20]
    tree.check_integrity()


def test_cost_with_equal_costs_is_lru():
    tree = make_tree("cost")
    for i in range(4):
        insert(tree, [i, i], first_loc=i)
    c = chain(1, 1)
    tree.touch(tree.match(c.keys, c.blocks).nodes)
    assert [e.location for e in tree.evict(GPU, 4)] == [0, 2, 3, 1]


def test_per_tier_orders_and_bad_names():
    tree = RadixTree(["gpu", "host"], eviction=["lru", "lfu"])
    assert [o.name for o in tree.eviction] == ["lru", "lfu"]
    _, res = insert(tree, [1, 1, 2, 2], tier=HOST)
    tree.touch(res.nodes)
    insert(tree, [3, 3], tier=HOST, first_loc=10)
    insert(tree, [7, 7], tier=GPU, first_loc=20)
    insert(tree, [8, 8], tier=GPU, first_loc=21)
    insert(tree, [7, 7], tier=GPU, first_loc=22)  # a second use of [7, 7]
    # host is LFU: the block used once goes before the older path used twice; the GPU
    # is LRU: the block used last stays
    assert [e.location for e in tree.evict(HOST, 1)] == [10]
    assert [e.location for e in tree.evict(GPU, 1)] == [21]
    tree.check_integrity()
    with pytest.raises(ValueError, match="unknown eviction order"):
        RadixTree(["gpu"], eviction="mru")
    with pytest.raises(ValueError, match="one order per tier"):
        RadixTree(["gpu", "host"], eviction=["lru"])
    with pytest.raises(ValueError, match="knee_blocks"):
        EvictionOrder("cost", 0)


@pytest.mark.parametrize("eviction", EVICTIONS)
def test_demotion_keeps_integrity_under_each_order(eviction):
    tree = make_tree(eviction, knee_blocks=1)
    for i in range(30):
        _, res = insert(tree, [i % 4, i % 4, i, i, i + 1, i + 1], first_loc=100 * i)
        if i % 3 == 0:
            tree.touch(res.nodes[:1])
        d = tree.demote(GPU, HOST, 2, [1000 + 2 * i, 1001 + 2 * i])
        assert len(d.moved) + len(d.dropped) == 2
        tree.demote(HOST, DISK, 1, [True])
        tree.evict(DISK, 1)
        tree.check_integrity()
    for t in (GPU, HOST, DISK):
        tree.evict(t, 10**6)
        tree.check_integrity()
    assert len(tree) == 0


# --------------------------------------------------------------- property test

ALPHABET = st.integers(min_value=0, max_value=2)
SEQS = st.lists(ALPHABET, min_size=2, max_size=8)


class Ref:
    """Reference model: plain dicts keyed by block path, scanned on every query.

    ``order`` is the eviction order of every tier; for the aged orders the model keeps
    each block's uses and key (age + value at its last access) and the age (the largest
    key evicted).
    """

    def __init__(self, order: EvictionOrder) -> None:
        self.order = order
        self.locs: dict[tuple, dict[int, int]] = {}
        self.refs: dict[tuple, int] = {}
        self.stamp: dict[tuple, int] = {}
        self.prio: dict[tuple, int] = {}
        self.uses: dict[tuple, int] = {}
        self.score: dict[tuple, float] = {}
        self.age = 0.0

    def access(self, p: tuple, new: bool) -> None:
        self.uses[p] = 1 if new else self.uses[p] + 1
        self.score[p] = self.age + self.order.value(self.uses[p], len(p) - 1)

    def key(self, p: tuple) -> tuple:
        if self.order.aged:
            return (self.prio[p], self.score[p], self.stamp[p])
        return (self.prio[p], self.stamp[p])

    def lock(self, p: tuple) -> int:
        return sum(r for q, r in self.refs.items() if q[:len(p)] == p)

    def children(self, p: tuple) -> list[tuple]:
        return [q for q in self.locs if len(q) == len(p) + 1 and q[:len(p)] == p]

    def exists(self, p: tuple) -> bool:
        return bool(self.locs.get(p)) or self.lock(p) > 0 or any(
            q[:len(p)] == p and len(q) > len(p) and self.locs[q] for q in self.locs)

    def evictable(self, tier: int) -> list[tuple]:
        return [p for p, locs in self.locs.items() if tier in locs and self.lock(p) == 0
                and not any(tier in self.locs[c] for c in self.children(p))]


class TreeMachine(RuleBasedStateMachine):
    ORDER = EvictionOrder("lru")

    @initialize()
    def setup(self) -> None:
        self.clock = 0
        self.tree = RadixTree(["gpu", "host", "disk"], clock=self._tick,
                              eviction=self.ORDER.name, knee_blocks=self.ORDER.knee_blocks)
        self.ref = Ref(self.ORDER)
        self.next_loc = 0

    def _tick(self) -> int:
        self.clock += 1
        return self.clock

    def _paths(self, seq: list[int]):
        c = chain(*seq)
        paths = [tuple(c.keys[: i + 1]) for i in range(len(c.keys))]
        return c, paths

    def _node(self, path: tuple):
        node = self.tree.root
        for k in path:
            node = node.children.get(k)
            if node is None:
                return None
        return node

    @rule(seq=SEQS, tier=st.integers(0, 2))
    def insert(self, seq, tier):
        c, paths = self._paths(seq)
        locs = list(range(self.next_loc, self.next_loc + len(paths)))
        self.next_loc += len(paths)
        new = [not self.ref.exists(p) for p in paths]
        res = self.tree.insert(c.keys, c.blocks, tier, locs)
        assert not res.collision
        stamp = self.clock
        for p, loc, placed, fresh in zip(paths, locs, res.placed, new):
            self.ref.access(p, fresh)
            entry = self.ref.locs.setdefault(p, {})
            assert placed == (tier not in entry)
            entry.setdefault(tier, loc)
            self.ref.stamp[p] = stamp
            self.ref.prio.setdefault(p, 0)

    @rule(seq=SEQS)
    def match_and_touch(self, seq):
        c, paths = self._paths(seq)
        m = self.tree.match(c.keys, c.blocks)
        expected = 0
        for p in paths:
            if not self.ref.locs.get(p):
                break
            expected += 1
        assert m.num_blocks == expected
        for node, p in zip(m.nodes, paths):
            assert {t: node.location(t) for t in range(3) if node.location(t) is not None} \
                == self.ref.locs[p]
        self.tree.touch(m.nodes)
        for p in paths[:expected]:
            self.ref.stamp[p] = self.clock
            self.ref.access(p, False)

    @rule(seq=SEQS)
    def lock(self, seq):
        c, paths = self._paths(seq)
        m = self.tree.match(c.keys, c.blocks)
        if m.last is not None:
            self.tree.lock(m.last)
            p = paths[m.num_blocks - 1]
            self.ref.refs[p] = self.ref.refs.get(p, 0) + 1

    @rule(data=st.data())
    def unlock(self, data):
        held = sorted(p for p, r in self.ref.refs.items() if r > 0)
        if not held:
            return
        p = data.draw(st.sampled_from(held))
        self.tree.unlock(self._node(p))
        self.ref.refs[p] -= 1

    def _check_victim(self, tier: int, path: tuple, candidates: list[tuple]) -> None:
        assert path in candidates
        best = min(self.ref.key(q) for q in candidates)
        assert self.ref.key(path) == best

    @rule(tier=st.integers(0, 2), n=st.integers(1, 4))
    def evict(self, tier, n):
        for _ in range(n):
            candidates = self.ref.evictable(tier)
            got = self.tree.evict(tier, 1)
            if not candidates:
                assert got == []
                return
            (ev,) = got
            path = next(p for p in candidates if self.ref.locs[p][tier] == ev.location)
            self._check_victim(tier, path, candidates)
            del self.ref.locs[path][tier]
            if self.ORDER.aged:
                self.ref.age = max(self.ref.age, self.ref.score[path])

    @rule(tier=st.integers(0, 1), n=st.integers(1, 3))
    def demote(self, tier, n):
        to = tier + 1
        for _ in range(n):
            candidates = self.ref.evictable(tier)
            loc = self.next_loc
            self.next_loc += 1
            d = self.tree.demote(tier, to, 1, [loc])
            if not candidates:
                assert not d.moved and not d.dropped
                return
            ev = (d.moved or d.dropped)[0]
            src = ev.src if d.moved else ev.location
            path = next(p for p in candidates if self.ref.locs[p][tier] == src)
            self._check_victim(tier, path, candidates)
            del self.ref.locs[path][tier]
            if d.moved:
                assert to not in self.ref.locs[path]
                self.ref.locs[path][to] = loc
            else:
                assert to in self.ref.locs[path] and d.unused == [loc]

    @rule(seq=SEQS, tier=st.integers(0, 2))
    def clear(self, seq, tier):
        c, paths = self._paths(seq)
        node = self._node(paths[0])
        if node is None:
            return
        old = self.tree.clear_location(node, tier)
        assert old == self.ref.locs.get(paths[0], {}).pop(tier, None)

    @rule(seq=SEQS, prio=st.integers(0, 2))
    def priority(self, seq, prio):
        c, paths = self._paths(seq)
        node = self._node(paths[0])
        if node is None:
            return
        self.tree.set_priority(node, prio)
        self.ref.prio[paths[0]] = prio

    @invariant()
    def consistent(self):
        self.tree.check_integrity()
        expected_nodes = [p for p in self.ref.locs if self.ref.exists(p)]
        assert len(self.tree) == len(expected_nodes)
        for tier in range(3):
            assert self.tree.num_blocks(tier) == sum(tier in v for v in self.ref.locs.values())
            assert self.tree.num_evictable(tier) == len(self.ref.evictable(tier))
        assert self.tree.stats().locked == sum(1 for p in expected_nodes if self.ref.lock(p))
        # Forget reference entries for pruned nodes so priorities reset like the tree's.
        for p in [p for p in self.ref.locs if not self.ref.exists(p)]:
            del self.ref.locs[p]
            self.ref.prio.pop(p, None)
            self.ref.uses.pop(p, None)
            self.ref.score.pop(p, None)


TreeMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                         deadline=None)
test_tree_matches_reference_model = TreeMachine.TestCase


class LFUTreeMachine(TreeMachine):
    ORDER = EvictionOrder("lfu")


class CostTreeMachine(TreeMachine):
    ORDER = EvictionOrder("cost", knee_blocks=1.0)  # cost 1, 2, 3, ... by position


for _machine in (LFUTreeMachine, CostTreeMachine):
    _machine.TestCase.settings = settings(max_examples=60, stateful_step_count=40,
                                          deadline=None)
test_lfu_tree_matches_reference_model = LFUTreeMachine.TestCase
test_cost_tree_matches_reference_model = CostTreeMachine.TestCase
