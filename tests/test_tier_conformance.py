"""One conformance suite for every hash-addressed tier (``tiers.base.HashTier``).

Each test runs once per entry of :data:`TIER_CASES`. A case says how to open a tier
(on real backends: LMDB in a temp dir, redis-server processes) and what the tier
promises beyond the protocol: exact LRU eviction under a byte capacity, and
``stats().blocks``/``bytes_used`` that track its contents. Tests of a promise a tier
does not make are skipped for it.

Counting contract checked here (per key, not per call): ``get`` adds ``len(keys)`` to
``gets`` and each key to ``hits`` (verified block returned) or ``misses`` (absent,
corrupt or failed; a closed tier answers misses); ``bytes_read`` adds the bytes
returned; ``put`` adds stored pairs to ``puts`` and their bytes to ``bytes_written``,
and returns a :class:`tiers.base.PutResult` naming the keys it stored;
each value that fails verification adds 1 to ``corrupt``. ``contains_prefix`` counts
nothing.

To add a tier: write ``_open_<name>(request, tmp_path, capacity_bytes)`` and a
``raw_put`` that overwrites a stored value behind the tier's back, then register a
:class:`TierCase` in :data:`TIER_CASES` (see the marked place below).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from radix.hashing import Namespace, hash_blocks
from tiers.base import HashTier, PutResult, TierStats
from tiers.codec import encode_block
from tiers.layout import KVLayout
from tiers.lmdb import LMDBTier

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype="float16")
"""A small real layout: 256-byte payloads, every block the same encoded size."""

TierOpener = Callable[[pytest.FixtureRequest, Path, int], HashTier]
RawPut = Callable[[HashTier, bytes, bytes], None]


@dataclass(frozen=True)
class TierCase:
    """How to open one kind of tier, and what it promises.

    ``open(request, tmp_path, capacity_bytes)`` returns a fresh, empty tier holding at
    most ``capacity_bytes`` of encoded blocks (tiers without a byte capacity ignore it).
    ``raw_put(tier, key, value)`` stores ``value`` under ``key`` in the backend without
    going through the tier's checks (to simulate damage). ``exact_lru``: a put that
    would exceed the capacity evicts exactly the least-recently-used blocks (put or
    got). ``tracks_contents``: ``stats().blocks`` and ``bytes_used`` are exact.
    """

    open: TierOpener
    raw_put: RawPut
    exact_lru: bool
    tracks_contents: bool


def _open_lmdb(request: pytest.FixtureRequest, tmp_path: Path, capacity_bytes: int) -> HashTier:
    return LMDBTier(tmp_path / "lmdb", capacity_bytes=capacity_bytes)


def _raw_put_lmdb(tier: HashTier, key: bytes, value: bytes) -> None:
    assert isinstance(tier, LMDBTier)
    tier._raw_put(key, value)


def _open_redis(request: pytest.FixtureRequest, tmp_path: Path, capacity_bytes: int) -> HashTier:
    from tiers.redis import RedisTier
    server = request.getfixturevalue("redis_server")  # a namespace per tier: each is empty
    return RedisTier(server.url, namespace=tmp_path.name, timeout_s=2.0)


def _open_redis_cluster(request: pytest.FixtureRequest, tmp_path: Path,
                        capacity_bytes: int) -> HashTier:
    from tiers.redis import RedisTier
    cluster = request.getfixturevalue("redis_cluster")
    return RedisTier(cluster.url, namespace=tmp_path.name, timeout_s=2.0)


def _raw_put_redis(tier: HashTier, key: bytes, value: bytes) -> None:
    import redis
    from redis.cluster import ClusterNode, RedisCluster

    from tiers.redis import RedisTier
    assert isinstance(tier, RedisTier)
    u = tier.url
    raw = (RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in u.nodes]) if u.cluster
           else redis.Redis(host=u.nodes[0][0], port=u.nodes[0][1], db=u.db))
    with raw:
        raw.set(tier.namespace.encode() + b":" + key, value)


def _open_memory(request: pytest.FixtureRequest, tmp_path: Path, capacity_bytes: int) -> HashTier:
    from tiers.memory import MemoryTier
    return MemoryTier(capacity_bytes)


def _raw_put_memory(tier: HashTier, key: bytes, value: bytes) -> None:
    from tiers.memory import MemoryTier
    assert isinstance(tier, MemoryTier)
    tier._raw_put(key, value)


HTTP_DISK_BYTES = 256 << 20
"""Capacity of each namespace's LMDB environment in the conformance daemon."""
_http_disks: dict[str, Path] = {}
"""Namespace of each opened HTTP tier -> its LMDB environment inside the daemon."""


@pytest.fixture(scope="module")
def http_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, Path]]:
    """One real daemon and its disk directory (disk tier only, so a value damaged in its
    LMDB is what it serves)."""
    from bench.servers import DaemonProcess
    disk = tmp_path_factory.mktemp("daemon-disk")
    with DaemonProcess(["--host-bytes", "0", "--disk", str(disk), "--disk-bytes",
                        str(HTTP_DISK_BYTES), "--max-namespaces", "1000"],
                       token="conformance-token-0123456789") as daemon:
        yield daemon, disk


def _open_http(request: pytest.FixtureRequest, tmp_path: Path, capacity_bytes: int) -> HashTier:
    """A fresh, empty tier: a new namespace on the module's daemon."""
    from tiers.http import HTTPTier
    daemon, disk = request.getfixturevalue("http_daemon")
    namespace = f"t{os.urandom(8).hex()}"
    _http_disks[namespace] = disk / namespace
    return HTTPTier(daemon.url, namespace=namespace, token=daemon.token, timeout_s=30.0)


def _raw_put_http(tier: HashTier, key: bytes, value: bytes) -> None:
    """Overwrite the value in the daemon's LMDB from this process (LMDB is multi-process)."""
    from tiers.http import HTTPTier
    assert isinstance(tier, HTTPTier)
    with LMDBTier(_http_disks[tier.namespace], capacity_bytes=HTTP_DISK_BYTES) as disk:
        disk._raw_put(key, value)


TIER_CASES: dict[str, TierCase] = {
    "lmdb": TierCase(open=_open_lmdb, raw_put=_raw_put_lmdb, exact_lru=True,
                     tracks_contents=True),
    # ---- register further tiers here -------------------------------------------------
    "memory": TierCase(open=_open_memory, raw_put=_raw_put_memory, exact_lru=True,
                       tracks_contents=True),
    "http": TierCase(open=_open_http, raw_put=_raw_put_http, exact_lru=False,
                     tracks_contents=False),
    "redis": TierCase(open=_open_redis, raw_put=_raw_put_redis, exact_lru=False,
                      tracks_contents=False),
    "redis-cluster": TierCase(open=_open_redis_cluster, raw_put=_raw_put_redis,
                              exact_lru=False, tracks_contents=False),
    # An opener gets server fixtures with ``request.getfixturevalue("redis_server")``
    # and imports its tier module inside the function.
}

DEFAULT_CAPACITY = 64 << 20


@dataclass
class Opened:
    """A tier under test with its case and a way to open more of the same kind."""

    tier: HashTier
    case: TierCase
    make: Callable[[int], HashTier]


@pytest.fixture(params=sorted(TIER_CASES))
def tier_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[int], Opened]]:
    """``factory(capacity_bytes)``: a fresh empty tier of the parametrized kind.

    Every tier opened through it is closed after the test.
    """
    case = TIER_CASES[request.param]
    opened: list[HashTier] = []

    def make(capacity_bytes: int = DEFAULT_CAPACITY) -> HashTier:
        path = tmp_path / f"tier{len(opened)}"
        path.mkdir()
        tier = case.open(request, path, capacity_bytes)
        opened.append(tier)
        return tier

    def factory(capacity_bytes: int = DEFAULT_CAPACITY) -> Opened:
        return Opened(tier=make(capacity_bytes), case=case, make=make)

    yield factory
    for tier in opened:
        tier.close()


@pytest.fixture
def opened(tier_factory: Callable[[int], Opened]) -> Opened:
    """A fresh tier of each kind with the default (ample) capacity."""
    return tier_factory(DEFAULT_CAPACITY)


def blocks(n: int, seed: int = 0) -> list[tuple[bytes, bytes]]:
    """``n`` real encoded blocks ``(key, blob)`` of one chain, random payloads."""
    ids = [(seed * 7919 + i) % 50_000 for i in range(n * LAYOUT.block_size)]
    chain = hash_blocks(Namespace(model=f"conformance-{seed}").root(), ids, LAYOUT.block_size)
    out = []
    for i, key in enumerate(chain.keys):
        parent = chain.keys[i - 1] if i else chain.root
        payload = os.urandom(LAYOUT.block_bytes)
        out.append((key, encode_block(key, parent, chain.blocks[i], LAYOUT, payload)))
    return out


BLOCK_BYTES = len(blocks(1)[0][1])
"""Encoded size of every test block (bytes)."""


def keys_of(items: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [k for k, _ in items]


def present(tier: HashTier, items: list[tuple[bytes, bytes]]) -> list[bool]:
    """Which of ``items`` the tier holds (without touching access order)."""
    return [tier.contains_prefix([k]) == 1 for k, _ in items]


def delta(after: TierStats, before: TierStats) -> dict[str, int]:
    fields = ("gets", "hits", "misses", "puts", "bytes_read", "bytes_written", "evictions",
              "corrupt", "errors")
    return {f: getattr(after, f) - getattr(before, f) for f in fields
            if getattr(after, f) != getattr(before, f)}


# ---------------------------------------------------------------- round trips and batches


def test_round_trip_of_real_blocks(opened: Opened) -> None:
    tier, items = opened.tier, blocks(20)
    tier.put(items)
    assert tier.get(keys_of(items)) == [v for _, v in items]
    reverse = items[::-1]
    assert tier.get(keys_of(reverse)) == [v for _, v in reverse]
    assert all(type(v) is bytes for v in tier.get(keys_of(items)))


def test_empty_batches_are_no_ops(opened: Opened) -> None:
    tier = opened.tier
    before = tier.stats()
    assert tier.contains_prefix([]) == 0
    assert tier.get([]) == []
    tier.put([])
    tier.delete([])
    assert delta(tier.stats(), before) == {}


def test_duplicate_keys_in_a_put_batch_store_one_block(opened: Opened) -> None:
    tier = opened.tier
    (key, value), (_, other) = blocks(2)
    tier.put([(key, value), (key, value)])
    assert tier.get([key]) == [value]
    if opened.case.tracks_contents:
        assert (tier.stats().blocks, tier.stats().bytes_used) == (1, len(value))


def test_last_value_for_a_key_wins(opened: Opened) -> None:
    tier = opened.tier
    key, value = blocks(1)[0]
    _, same_key_other_bytes = blocks(1)[0]  # same key and tokens, new random payload
    assert same_key_other_bytes != value
    tier.put([(key, value), (key, same_key_other_bytes)])
    assert tier.get([key]) == [same_key_other_bytes]
    tier.put([(key, value)])
    assert tier.get([key]) == [value]


def test_duplicate_and_missing_keys_in_a_get_batch(opened: Opened) -> None:
    tier = opened.tier
    items = blocks(3)
    (k0, v0), (k1, v1), (k2, v2) = items
    missing = keys_of(blocks(2, seed=1))
    tier.put([(k0, v0), (k2, v2)])
    before = tier.stats()
    got = tier.get([k0, missing[0], k0, k1, k2, missing[1], k2, k0])
    assert got == [v0, None, v0, None, v2, None, v2, v0]
    assert delta(tier.stats(), before) == {
        "gets": 8, "hits": 5, "misses": 3, "bytes_read": 5 * BLOCK_BYTES}


def test_get_into_hands_over_what_get_returns(opened: Opened) -> None:
    tier = opened.tier
    items = blocks(4)
    missing = keys_of(blocks(1, seed=2))[0]
    tier.put(items[:3])
    keys = [items[2][0], missing, items[0][0], items[3][0], items[1][0]]
    taken: dict[int, bytes] = {}

    def take(i: int, view: memoryview) -> None:
        taken[i] = bytes(view)  # the view is valid only during the call

    before = tier.stats()
    got = tier.get_into(keys, take)
    assert got == [True, False, True, False, True]
    assert taken == {0: items[2][1], 2: items[0][1], 4: items[1][1]}
    assert delta(tier.stats(), before) == {
        "gets": 5, "hits": 3, "misses": 2, "bytes_read": 3 * BLOCK_BYTES}


def test_very_large_batch(opened: Opened) -> None:
    tier = opened.tier
    items = blocks(3000)
    tier.put(items)
    assert tier.contains_prefix(keys_of(items)) == 3000
    got = tier.get(keys_of(items))
    assert got == [v for _, v in items]
    if opened.case.tracks_contents:
        assert tier.stats().blocks == 3000
        assert tier.stats().bytes_used == 3000 * BLOCK_BYTES


def test_put_reports_the_keys_it_stored(opened: Opened) -> None:
    tier = opened.tier
    items = blocks(5)
    result = tier.put(items)
    assert result == PutResult(stored=frozenset(keys_of(items)), bytes_stored=5 * BLOCK_BYTES)
    assert result.count == 5
    twice = tier.put([items[0], items[0]])
    assert (twice.stored, twice.bytes_stored) == ({items[0][0]}, BLOCK_BYTES)
    assert tier.put([]) == PutResult()
    tier.close()
    assert tier.put(blocks(2, seed=4)) == PutResult()


# ---------------------------------------------------------------- contains_prefix and delete


def test_contains_prefix_counts_consecutive_hits_from_the_start(opened: Opened) -> None:
    tier = opened.tier
    items = blocks(6)
    keys = keys_of(items)
    assert tier.contains_prefix(keys) == 0
    tier.put(items[1:3])
    assert tier.contains_prefix(keys) == 0  # first key missing
    assert tier.contains_prefix(keys[1:]) == 2  # partial
    tier.put(items[:3] + items[4:])
    assert tier.contains_prefix(keys) == 3  # gap at index 3
    assert tier.contains_prefix(keys[4:]) == 2
    tier.put([items[3]])
    assert tier.contains_prefix(keys) == 6  # all
    assert tier.contains_prefix(keys[:1]) == 1
    assert tier.contains_prefix(keys + keys_of(blocks(1, seed=5))) == 6


def test_contains_prefix_does_not_count_gets(opened: Opened) -> None:
    tier = opened.tier
    items = blocks(3)
    tier.put(items)
    before = tier.stats()
    assert tier.contains_prefix(keys_of(items)) == 3
    assert delta(tier.stats(), before) == {}


def test_delete_removes_only_the_named_keys(opened: Opened) -> None:
    tier = opened.tier
    items = blocks(5)
    tier.put(items)
    absent = keys_of(blocks(1, seed=9))
    tier.delete([items[1][0], absent[0], items[3][0], items[1][0]])
    assert present(tier, items) == [True, False, True, False, True]
    assert tier.get(keys_of(items)) == [items[0][1], None, items[2][1], None, items[4][1]]
    if opened.case.tracks_contents:
        assert (tier.stats().blocks, tier.stats().bytes_used) == (3, 3 * BLOCK_BYTES)
    tier.delete(keys_of(items))
    assert present(tier, items) == [False] * 5
    tier.put([items[1]])
    assert tier.get([items[1][0]]) == [items[1][1]]


# ---------------------------------------------------------------- capacity and LRU


def lru_tier(factory: Callable[[int], Opened], capacity_blocks: int) -> HashTier:
    opened = factory(capacity_blocks * BLOCK_BYTES)
    if not opened.case.exact_lru:
        pytest.skip("this tier does not promise exact LRU eviction under a byte capacity")
    return opened.tier


def test_capacity_evicts_least_recently_used_first(tier_factory: Callable[[int], Opened]) -> None:
    tier = lru_tier(tier_factory, 4)
    b = blocks(8)
    tier.put(b[:4])                                # order (old -> new): 0 1 2 3
    assert tier.get([b[0][0]]) == [b[0][1]]        # 1 2 3 0
    tier.put([b[4]])                               # evicts 1 -> 2 3 0 4
    assert present(tier, b[:5]) == [True, False, True, True, True]
    tier.get([b[2][0], b[3][0]])                   # 0 4 2 3
    tier.put(b[5:7])                               # evicts 0, 4 -> 2 3 5 6
    assert present(tier, b[:7]) == [False, False, True, True, False, True, True]
    tier.put([b[3]])                               # re-put refreshes 3 -> 2 5 6 3
    tier.put([b[7]])                               # evicts 2 -> 5 6 3 7
    assert present(tier, b) == [False, False, False, True, False, True, True, True]
    stats = tier.stats()
    assert stats.evictions == 4
    assert (stats.blocks, stats.bytes_used) == (4, 4 * BLOCK_BYTES)
    assert stats.bytes_used <= stats.capacity_bytes


def test_a_batch_larger_than_capacity_keeps_its_newest_blocks(
        tier_factory: Callable[[int], Opened]) -> None:
    tier = lru_tier(tier_factory, 3)
    b = blocks(7)
    tier.put(b[:2])
    tier.put(b[2:7])
    assert present(tier, b) == [False, False, False, False, True, True, True]
    assert tier.get(keys_of(b[4:])) == [v for _, v in b[4:]]
    assert tier.stats().evictions == 4


def test_put_does_not_report_blocks_it_evicted_again(
        tier_factory: Callable[[int], Opened]) -> None:
    tier = lru_tier(tier_factory, 3)
    b = blocks(5)
    assert tier.put(b).stored == set(keys_of(b[2:]))
    assert tier.put(b[:1]).stored == {b[0][0]}


def test_a_block_larger_than_capacity_is_not_stored_and_evicts_nothing(
        tier_factory: Callable[[int], Opened]) -> None:
    opened = tier_factory(BLOCK_BYTES + 10)
    if not opened.case.exact_lru:
        pytest.skip("this tier does not promise exact LRU eviction under a byte capacity")
    tier = opened.tier
    small = blocks(1)
    big_layout = KVLayout(num_layers=4, num_kv_heads=2, head_dim=8, block_size=4,
                          dtype="float16")
    chain = hash_blocks(Namespace(model="big").root(), list(range(4)), 4)
    big = encode_block(chain.keys[0], chain.root, chain.blocks[0], big_layout,
                       os.urandom(big_layout.block_bytes))
    tier.put(small)
    assert tier.put([(chain.keys[0], big)]) == PutResult()
    assert tier.get([chain.keys[0], small[0][0]]) == [None, small[0][1]]
    assert tier.stats().evictions == 0


# ---------------------------------------------------------------- corruption


def damage_cases(value: bytes, other_value: bytes) -> dict[str, bytes]:
    """Ways a stored value can be wrong: every one must be caught on get."""
    mid = len(value) // 2
    return {
        "payload byte flipped": value[:mid] + bytes([value[mid] ^ 0x40]) + value[mid + 1:],
        "header byte flipped": value[:20] + bytes([value[20] ^ 0x01]) + value[21:],
        "last byte flipped": value[:-1] + bytes([value[-1] ^ 0xFF]),
        "truncated": value[:-7],
        "extended": value + b"\x00",
        "another block's value": other_value,
        "garbage": b"not a block at all",
        "empty": b"",
    }


@pytest.mark.parametrize("damage", list(damage_cases(b"x" * 64, b"y")))
def test_corrupt_value_is_counted_deleted_and_a_miss(opened: Opened, damage: str) -> None:
    tier = opened.tier
    items = blocks(3)
    (k0, v0), (k1, v1), (k2, v2) = items
    tier.put(items)
    opened.case.raw_put(tier, k1, damage_cases(v1, v2)[damage])
    before = tier.stats()
    assert tier.get([k0, k1, k2]) == [v0, None, v2]
    assert delta(tier.stats(), before) == {
        "gets": 3, "hits": 2, "misses": 1, "corrupt": 1, "bytes_read": 2 * BLOCK_BYTES}
    assert present(tier, items) == [True, False, True]
    assert tier.get([k1]) == [None]
    assert tier.stats().corrupt == 1
    if opened.case.tracks_contents:
        assert (tier.stats().blocks, tier.stats().bytes_used) == (2, 2 * BLOCK_BYTES)
    tier.put([(k1, v1)])
    assert tier.get([k1]) == [v1]


# ---------------------------------------------------------------- stats and close


def test_stats_count_blocks_and_bytes(opened: Opened) -> None:
    tier = opened.tier
    first = tier.stats()
    assert (first.gets, first.hits, first.misses, first.puts, first.corrupt,
            first.errors) == (0, 0, 0, 0, 0, 0)
    items = blocks(4)
    tier.put(items)
    tier.get(keys_of(items[:2]) + keys_of(blocks(1, seed=3)))
    tier.delete([items[3][0]])
    stats = tier.stats()
    assert delta(stats, first) == {
        "gets": 3, "hits": 2, "misses": 1, "puts": 4, "bytes_read": 2 * BLOCK_BYTES,
        "bytes_written": 4 * BLOCK_BYTES}
    if opened.case.tracks_contents:
        assert (stats.blocks, stats.bytes_used) == (3, 3 * BLOCK_BYTES)
    assert isinstance(stats.name, str) and stats.name
    assert stats.name == tier.name


def test_calls_after_close_are_misses_and_no_ops(opened: Opened) -> None:
    tier = opened.tier
    items = blocks(2)
    tier.put(items)
    tier.close()
    before = tier.stats()
    assert tier.contains_prefix(keys_of(items)) == 0
    assert tier.get(keys_of(items)) == [None, None]
    tier.put(blocks(1, seed=2))
    tier.delete(keys_of(items))
    tier.close()
    assert delta(tier.stats(), before) == {"gets": 2, "misses": 2}


def test_threads_share_one_tier(opened: Opened) -> None:
    tier = opened.tier
    per_thread = [blocks(40, seed=s) for s in range(4)]
    wrong: list[str] = []

    def work(items: list[tuple[bytes, bytes]]) -> None:
        for i in range(0, len(items), 8):
            chunk = items[i:i + 8]
            tier.put(chunk)
            if tier.get(keys_of(chunk)) != [v for _, v in chunk]:
                wrong.append("get after put")
            if tier.contains_prefix(keys_of(items[:i + 8])) != i + 8:
                wrong.append("contains_prefix after put")
        tier.delete(keys_of(items[:8]))

    threads = [threading.Thread(target=work, args=(items,)) for items in per_thread]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
    for items in per_thread:
        assert present(tier, items) == [False] * 8 + [True] * 32
    stats = tier.stats()
    assert (stats.errors, stats.corrupt) == (0, 0)
    if opened.case.tracks_contents:
        assert (stats.blocks, stats.bytes_used) == (128, 128 * BLOCK_BYTES)
