"""RedisTier against real redis-server processes: URLs, TTL, namespaces, cluster
distribution and redirection, corruption, and faults (crash, restart, stalled server).

Generic HashTier behaviour is covered by the shared conformance suite; these tests are
the Redis-specific ones. Timings are printed (run with ``-s``), never asserted.
"""

from __future__ import annotations

import logging
import random
import threading
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from bench.servers import RedisCluster, RedisServer, free_port
from radix.hashing import Namespace, chain_key, token_bytes
from tiers.codec import encode_block
from tiers.layout import KVLayout
from tiers.redis import RedisTier, parse_redis_url

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=16)
ROOT = Namespace("redis-tier-test").root()
STEADY = {"timeout_s": 2.0}
"""For tests not about stalls: a read timeout no loaded test machine trips by accident."""
FAST_BREAKER = {"backoff_s": 0.05, "backoff_max_s": 0.2}


def make_blocks(n: int, seed: int = 0, layout: KVLayout = LAYOUT) -> list[tuple[bytes, bytes]]:
    """A chain of ``n`` encoded blocks: ``(key, blob)`` pairs with random payloads."""
    rng = random.Random(seed)
    parent, out = ROOT, []
    for _ in range(n):
        tokens = token_bytes(rng.randrange(50_000) for _ in range(layout.block_size))
        key = chain_key(parent, tokens)
        out.append((key, encode_block(key, parent, tokens, layout,
                                      rng.randbytes(layout.block_bytes))))
        parent = key
    return out


def big_layout(payload_kib: int) -> KVLayout:
    """A bf16 layout of 16 tokens whose payload is ``payload_kib`` KiB (a multiple of 4)."""
    return KVLayout(num_layers=payload_kib // 4, num_kv_heads=1, head_dim=64)


def keys_of(items: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [k for k, _ in items]


def wait_until(pred, timeout_s: float = 10.0, step_s: float = 0.02) -> bool:
    """Poll ``pred`` until true or ``timeout_s`` passes; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step_s)
    return bool(pred())


# -- URLs and arguments -------------------------------------------------------------------

@pytest.mark.parametrize(("url", "tls", "cluster", "nodes", "db", "user", "password"), [
    ("redis://localhost", False, False, (("localhost", 6379),), 0, None, None),
    ("redis://10.0.0.1:7000/3", False, False, (("10.0.0.1", 7000),), 3, None, None),
    ("rediss://u:p%40ss@h:6380/0", True, False, (("h", 6380),), 0, "u", "p@ss"),
    ("redis://secret@h", False, False, (("h", 6379),), 0, None, "secret"),
    ("redis://[::1]:7001", False, False, (("::1", 7001),), 0, None, None),
    ("redis+cluster://a:1,b:2,[::1]", False, True, (("a", 1), ("b", 2), ("::1", 6379)), 0,
     None, None),
    ("rediss+cluster://:pw@a:1", True, True, (("a", 1),), 0, None, "pw"),
    ("REDIS://h:1", False, False, (("h", 1),), 0, None, None),
])
def test_parse_url(url, tls, cluster, nodes, db, user, password):
    u = parse_redis_url(url)
    assert (u.tls, u.cluster, u.nodes, u.db, u.username, u.password) == \
        (tls, cluster, nodes, db, user, password)


def test_parse_url_tls_options():
    u = parse_redis_url("rediss://h?ssl_ca_certs=/ca.pem&ssl_cert_reqs=none")
    assert u.tls_options == {"ssl_ca_certs": "/ca.pem", "ssl_cert_reqs": "none"}


@pytest.mark.parametrize(("url", "message"), [
    ("http://h:6379", "scheme"),
    ("unix:///tmp/redis.sock", "scheme"),
    ("localhost:6379", "scheme"),
    ("redis://", "missing host"),
    ("redis://:pw@", "missing host"),
    ("redis://h:0", "bad port"),
    ("redis://h:99999", "bad port"),
    ("redis://h:port", "bad port"),
    ("redis://[::1", "IPv6"),
    ("redis://a:1,b:2", "cluster://"),
    ("redis://h/db1", "bad database"),
    ("redis+cluster://h:1/2", "only database 0"),
    ("redis://h?cluster=1", "unknown option"),
    ("redis://h?ssl_ca_certs=/ca.pem", "rediss://"),
    ("rediss://h?ssl_cert_reqs=maybe", "ssl_cert_reqs"),
])
def test_bad_url_is_value_error_at_construction(url, message):
    with pytest.raises(ValueError, match=message):
        RedisTier(url)


@pytest.mark.parametrize("kwargs", [
    {"namespace": ""}, {"namespace": "{tag}"}, {"namespace": "a}b"},
    {"ttl_s": 0}, {"ttl_s": -1.0}, {"timeout_s": 0}, {"connect_timeout_s": -1},
    {"backoff_s": 1.0, "backoff_max_s": 0.5}, {"max_connections": 0},
])
def test_bad_arguments_are_value_errors(kwargs):
    with pytest.raises(ValueError):
        RedisTier("redis://127.0.0.1:6379", **kwargs)


def test_construction_does_not_touch_the_network():
    tier = RedisTier(f"redis://127.0.0.1:{free_port()}")
    s = tier.stats()
    assert (s.errors, s.extra["round_trips"], s.extra["outages"]) == (0, 0, 0)
    tier.close()


# -- single server ------------------------------------------------------------------------

def test_batches_are_one_round_trip(redis_server: RedisServer):
    items = make_blocks(64)
    with RedisTier(redis_server.url, **STEADY) as tier:
        tier.put(items)
        assert tier.stats().extra["round_trips"] == 1
        assert tier.get(keys_of(items)) == [v for _, v in items]
        assert tier.contains_prefix(keys_of(items)) == 64
        assert tier.stats().extra["round_trips"] == 3
        s = tier.stats()
        assert (s.puts, s.gets, s.hits, s.misses) == (64, 64, 64, 0)
        assert s.bytes_read == s.bytes_written == sum(len(v) for _, v in items)


def test_keys_are_namespace_prefixed_raw_bytes(redis_server: RedisServer):
    items = make_blocks(3)
    with RedisTier(redis_server.url, namespace="tenant-a", **STEADY) as tier, \
            redis_server.client() as raw:
        tier.put(items)
        assert sorted(raw.keys("*")) == sorted(b"tenant-a:" + k for k in keys_of(items))
        assert raw.get(b"tenant-a:" + items[0][0]) == items[0][1]
        assert raw.ttl(b"tenant-a:" + items[0][0]) == -1


def test_namespace_isolation(redis_server: RedisServer):
    a_items, b_items = make_blocks(4, seed=1), make_blocks(4, seed=2)
    with RedisTier(redis_server.url, namespace="a", **STEADY) as a, \
            RedisTier(redis_server.url, namespace="b", **STEADY) as b:
        a.put(a_items)
        assert b.get(keys_of(a_items)) == [None] * 4
        assert b.contains_prefix(keys_of(a_items)) == 0
        b.delete(keys_of(a_items))
        assert a.contains_prefix(keys_of(a_items)) == 4
        b.put(b_items)
        a.delete(keys_of(b_items))
        assert b.get(keys_of(b_items)) == [v for _, v in b_items]
        assert a.get(keys_of(a_items)) == [v for _, v in a_items]


def test_ttl_expiry(redis_server: RedisServer):
    items = make_blocks(4)
    with RedisTier(redis_server.url, ttl_s=1.0, **STEADY) as tier, redis_server.client() as raw:
        tier.put(items)
        assert tier.contains_prefix(keys_of(items)) == 4
        pttl = raw.pttl(b"kv:" + items[0][0])
        assert 0 < pttl <= 1000
        time.sleep(1.2)
        assert tier.contains_prefix(keys_of(items)) == 0
        assert tier.get(keys_of(items)) == [None] * 4
        assert raw.dbsize() == 0


def test_corrupt_values_are_misses_counted_and_deleted(redis_server: RedisServer):
    items = make_blocks(4)
    (k0, v0), (k1, v1), (k2, v2), (k3, _) = items
    flipped = bytearray(v2)
    flipped[-1] ^= 0xFF
    with RedisTier(redis_server.url, **STEADY) as tier, redis_server.client() as raw:
        tier.put(items)
        raw.set(b"kv:" + k1, v0)              # a valid block, stored under the wrong key
        raw.set(b"kv:" + k2, bytes(flipped))  # payload no longer matches its checksum
        raw.set(b"kv:" + k3, b"not a block")
        assert tier.get(keys_of(items)) == [v0, None, None, None]
        assert tier.stats().corrupt == 3
        assert [raw.exists(b"kv:" + k) for k in (k0, k1, k2, k3)] == [1, 0, 0, 0]
        assert tier.stats().errors == 0


@pytest.mark.parametrize("policy", ["allkeys-lru", "noeviction"])
def test_a_full_server_evicts_or_refuses_writes_and_reads_go_on(policy: str):
    """Capacity is the server's ``maxmemory``. With an LRU policy old blocks make room;
    with ``noeviction`` writes beyond it are refused (counted as errors) while reads
    and the breaker carry on: a full Redis is never an outage."""
    layout = big_layout(64)
    items = make_blocks(120, layout=layout)  # about 7.6 MB of blocks, 3 MB of memory
    server = RedisServer(extra_args=["--maxmemory", "3mb", "--maxmemory-policy", policy])
    try:
        server.start()
        with RedisTier(server.url, **STEADY) as tier:
            for i in range(0, len(items), 10):
                tier.put(items[i:i + 10])
            # EXISTS, not GET: replies to a large pipelined GET count against maxmemory
            # and would evict blocks while they are being read.
            stored = [tier.contains_prefix([k]) == 1 for k in keys_of(items)]
            s = tier.stats()
            assert 0 < sum(stored) < len(items)
            assert s.extra["short_circuited"] == 0 and s.extra["nodes_down"] == 0
            assert s.corrupt == 0
            if policy == "allkeys-lru":
                assert s.errors == 0 and stored[-1]  # the newest blocks are kept
                assert not stored[0]                 # the oldest made room
            else:
                assert s.errors > 0 and stored[0]    # what fitted stays readable
                assert not stored[-1]                # the rest was refused
            assert tier.get(keys_of(items[:1]))[0] == (items[0][1] if stored[0] else None)
    finally:
        server.close()


def test_contains_prefix_counts_from_the_start(redis_server: RedisServer):
    items = make_blocks(6)
    with RedisTier(redis_server.url, **STEADY) as tier:
        tier.put([items[i] for i in (0, 1, 2, 4, 5)])
        assert tier.contains_prefix(keys_of(items)) == 3
        assert tier.contains_prefix(keys_of(items)[1:]) == 2
        assert tier.contains_prefix(keys_of(items)[3:]) == 0
        assert tier.contains_prefix([]) == 0


def test_large_blocks_mixed_with_small_ones_and_misses(redis_server: RedisServer):
    """Blocks below, at and far above the size read straight from the socket, in one
    batch with misses and a corrupt large block: every reply lands on its own key."""
    items = (make_blocks(2, seed=1, layout=big_layout(4))
             + make_blocks(2, seed=2, layout=big_layout(64))
             + make_blocks(2, seed=3, layout=big_layout(2048))
             + make_blocks(2, seed=4, layout=big_layout(68)))
    rng = random.Random(5)
    rng.shuffle(items)
    stored = items[:-1]
    absent = items[-1]
    (bad_key, bad_blob) = stored[3]
    damaged = bad_blob[:-100] + bytes(b ^ 0x5A for b in bad_blob[-100:])
    keys = keys_of(items)
    with RedisTier(redis_server.url, **STEADY) as tier, redis_server.client() as raw:
        tier.put(stored)
        raw.set(b"kv:" + bad_key, damaged)
        want = [v for _, v in stored] + [None]
        want[3] = None
        for _ in range(3):  # reuse the pooled connection: no leftover bytes between calls
            assert tier.get(keys) == want
        assert tier.get([absent[0], keys[0]]) == [None, stored[0][1]]
        assert tier.stats().corrupt == 1
        assert tier.stats().errors == 0
        clients = raw.client_list()
        ours = [c for c in clients if c["cmd"] in ("get", "unlink")]
        assert ours and all(c["resp"] == "2" for c in ours)  # RESP2: the direct reader


def test_concurrent_threads(redis_server: RedisServer):
    errors: list[BaseException] = []
    with RedisTier(redis_server.url, **STEADY) as tier:
        def work(seed: int) -> None:
            try:
                items = make_blocks(16, seed=seed)
                for _ in range(20):
                    tier.put(items)
                    assert tier.get(keys_of(items)) == [v for _, v in items]
                    tier.delete(keys_of(items)[8:])
                    assert tier.contains_prefix(keys_of(items)) == 8
            except BaseException as exc:  # reported to the main thread
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(seed,)) for seed in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert tier.stats().errors == 0


def test_bad_values_are_type_errors_not_outages(redis_server: RedisServer):
    items = make_blocks(2)
    with RedisTier(redis_server.url, **STEADY) as tier:
        with pytest.raises(TypeError):
            tier.put([(items[0][0], None)])
        with pytest.raises(TypeError):
            tier.get(["not bytes"])
        tier.put(items)
        assert tier.get(keys_of(items)) == [v for _, v in items]
        s = tier.stats()
        assert (s.errors, s.extra["outages"]) == (0, 0)


def test_closed_tier_answers_misses(redis_server: RedisServer):
    items = make_blocks(2)
    tier = RedisTier(redis_server.url, **STEADY)
    tier.put(items)
    tier.close()
    assert tier.get(keys_of(items)) == [None, None]
    assert tier.contains_prefix(keys_of(items)) == 0
    tier.put(items)
    tier.delete(keys_of(items))
    with redis_server.client() as raw:
        assert raw.dbsize() == 2


# -- faults -------------------------------------------------------------------------------

def test_breaker_short_circuits_while_open():
    items = make_blocks(64)
    tier = RedisTier(f"redis://127.0.0.1:{free_port()}", backoff_s=30, backoff_max_s=60)
    t0 = time.perf_counter()
    assert tier.get(keys_of(items)) == [None] * 64
    first = time.perf_counter() - t0
    for _ in range(49):
        assert tier.get(keys_of(items)) == [None] * 64
        assert tier.contains_prefix(keys_of(items)) == 0
        tier.put(items)
        tier.delete(keys_of(items))
    s = tier.stats()
    print(f"\nget(64) from a closed port: first call {first * 1e3:.2f} ms")
    assert s.errors == 1
    assert s.extra["short_circuited"] == 49 * 4
    assert s.extra["outages"] == 1 and s.extra["nodes_down"] == 1
    assert s.misses == 50 * 64
    tier.close()


def test_killed_mid_batch_then_restarted(redis_server: RedisServer, caplog):
    caplog.set_level(logging.INFO, logger="tiers.redis")
    items = make_blocks(64)
    keys = keys_of(items)
    batch = items + make_blocks(4, seed=7, layout=big_layout(1024))  # large blocks too
    tier = RedisTier(redis_server.url, **FAST_BREAKER, **STEADY)
    stop = threading.Event()
    failures: list[BaseException] = []
    loops = [0]

    def hammer() -> None:
        while not stop.is_set():
            try:
                tier.put(batch)
                got = tier.get(keys_of(batch))
                assert all(v is None or v == batch[i][1] for i, v in enumerate(got))
                tier.contains_prefix(keys)
                loops[0] += 1
            except BaseException as exc:  # reported to the main thread
                failures.append(exc)
                return

    worker = threading.Thread(target=hammer)
    worker.start()
    try:
        assert wait_until(lambda: loops[0] >= 5)
        redis_server.kill()
        t0 = time.perf_counter()
        down = tier.get(keys)
        elapsed = time.perf_counter() - t0
        print(f"\nget(64) with redis-server killed: {elapsed * 1e3:.2f} ms")
        assert down == [None] * 64
        assert tier.contains_prefix(keys) == 0
        tier.put(items)
        loops_while_down = loops[0]
        assert wait_until(lambda: loops[0] > loops_while_down + 20)  # misses keep flowing

        redis_server.restart()
        assert wait_until(lambda: tier.get(keys[:1]) == [items[0][1]])
    finally:
        stop.set()
        worker.join()
    assert failures == []
    assert tier.get(keys) == [v for _, v in items]
    tier.put(make_blocks(2, seed=9))
    assert tier.contains_prefix(keys_of(make_blocks(2, seed=9))) == 2
    s = tier.stats()
    assert s.errors >= 1 and s.extra["outages"] == 1 and s.extra["nodes_down"] == 0
    messages = [r.getMessage() for r in caplog.records if r.name == "tiers.redis"]
    assert sum("unavailable" in m for m in messages) == 1, messages
    assert sum("is back" in m for m in messages) == 1, messages
    tier.close()


def start_stall(server: RedisServer, seconds: float, probe_timeout_s: float,
                step_s: float = 0.02) -> threading.Thread:
    """Put ``server`` to sleep for ``seconds`` (``DEBUG SLEEP``, from a thread) and
    return that thread once a ping has gone unanswered for ``probe_timeout_s``."""

    def stall() -> None:
        with server.client() as c:
            c.execute_command("DEBUG", "SLEEP", f"{seconds:.3f}")

    def stalled() -> bool:
        with redis.Redis(port=server.port, socket_timeout=probe_timeout_s,
                         retry=Retry(NoBackoff(), 0)) as c:
            try:
                c.ping()
            except redis.TimeoutError:
                return True
        return False

    sleeper = threading.Thread(target=stall)
    sleeper.start()
    assert wait_until(stalled, step_s=step_s)  # DEBUG SLEEP has reached the server
    return sleeper


def test_stalled_server_answers_misses_without_waiting(redis_server: RedisServer):
    items = make_blocks(64)
    keys = keys_of(items)
    tier = RedisTier(redis_server.url, **FAST_BREAKER)  # default timeouts
    with RedisTier(redis_server.url, **STEADY) as writer:
        writer.put(items)
    assert wait_until(lambda: tier.get(keys[:1]) == [items[0][1]])  # a pooled connection

    with redis_server.client() as probe:
        sleeper = start_stall(redis_server, 1.0, probe_timeout_s=0.2)
        t0 = time.perf_counter()
        got = tier.get(keys)
        elapsed = time.perf_counter() - t0
        still_sleeping = sleeper.is_alive()
        print(f"\nget(64) during DEBUG SLEEP 1: {elapsed * 1e3:.2f} ms")
        assert got == [None] * 64
        assert still_sleeping, "get waited for the stalled server"
        assert tier.contains_prefix(keys) == 0
        sleeper.join()
        assert probe.ping()
    assert wait_until(lambda: tier.get(keys) == [v for _, v in items])
    assert tier.stats().errors >= 1
    tier.close()


def test_large_gets_wait_for_the_values_queued_ahead_of_them(redis_server: RedisServer):
    # Eight 4 MiB blocks; a 50 ms timeout a wait; the server stalls ~0.2 s while the
    # batch waits. A wait that allows only timeout_s gives up (misses); one that allows
    # for the bytes requested from the node (32 MiB at SLOW_SERVER_BYTES_PER_S: 0.34 s
    # more, plus the bytes other threads asked for first) rides it out. An idle tier's
    # small read still gives up at timeout_s (test_stalled_server_answers_misses_...).
    from tiers.redis import SLOW_SERVER_BYTES_PER_S

    big = KVLayout(num_layers=64, num_kv_heads=8, head_dim=128, block_size=16)
    items = make_blocks(8, seed=11, layout=big)
    keys = keys_of(items)
    with RedisTier(redis_server.url, **STEADY) as writer:
        writer.put(items)
    tier = RedisTier(redis_server.url, timeout_s=0.05, **FAST_BREAKER)
    # learns the value size from one value (eight at a 50 ms timeout can miss on a
    # loaded machine: no size learned yet, no allowance)
    assert wait_until(lambda: tier.get(keys[:1]) == [items[0][1]])
    value_bytes = len(items[0][1])
    allowance = 0.05 + 8 * value_bytes / SLOW_SERVER_BYTES_PER_S
    stall_s = min(0.2, allowance / 2)  # half the allowance: room for a loaded machine
    assert stall_s > 0.1  # the stall outlasts timeout_s by far
    sleeper = start_stall(redis_server, stall_s, probe_timeout_s=0.02, step_s=0.001)
    got = tier.get(keys)
    sleeper.join()
    assert got == [v for _, v in items]
    assert tier.stats().errors == 0
    tier.close()


# -- cluster ------------------------------------------------------------------------------

def test_cluster_spreads_keys_over_nodes(redis_cluster: RedisCluster):
    items = make_blocks(300)
    with RedisTier(redis_cluster.url, **STEADY) as tier:
        tier.put(items)
        sizes = redis_cluster.dbsizes()
        print(f"\nkeys per node: {sizes}")
        assert sum(sizes) == 300
        assert all(n > 50 for n in sizes)
        trips = tier.stats().extra["round_trips"]
        assert tier.get(keys_of(items)) == [v for _, v in items]
        assert tier.stats().extra["round_trips"] - trips == 3  # one pipeline per node
        assert tier.contains_prefix(keys_of(items)) == 300
        tier.delete(keys_of(items)[100:])
        assert tier.contains_prefix(keys_of(items)) == 100
        assert sum(redis_cluster.dbsizes()) == 100


@pytest.mark.parametrize("parallel", [True, False])
def test_cluster_from_one_seed(redis_cluster: RedisCluster, parallel: bool):
    items = make_blocks(32)
    seed = redis_cluster.nodes[1]
    with RedisTier(f"redis+cluster://127.0.0.1:{seed.port}", parallel=parallel,
                   **STEADY) as tier:
        tier.put(items)
        assert tier.get(keys_of(items)) == [v for _, v in items]
        assert tier.stats().errors == 0
    assert all(n > 0 for n in redis_cluster.dbsizes())


def test_cluster_with_no_reachable_seed_answers_misses(caplog):
    caplog.set_level(logging.WARNING, logger="tiers.redis")
    items = make_blocks(8)
    url = f"redis+cluster://127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    with RedisTier(url, backoff_s=30, backoff_max_s=60) as tier:
        for _ in range(5):
            assert tier.get(keys_of(items)) == [None] * 8
            assert tier.contains_prefix(keys_of(items)) == 0
            tier.put(items)
            tier.delete(keys_of(items))
        s = tier.stats()
        assert s.errors == 1 and s.extra["outages"] == 1
        assert s.misses == 40
    messages = [r.getMessage() for r in caplog.records if r.name == "tiers.redis"]
    assert len(messages) == 1 and "CLUSTER SLOTS" in messages[0], messages


def _node_id(server: RedisServer) -> bytes:
    with server.client() as c:
        return c.execute_command("CLUSTER", "MYID")


def test_cluster_follows_moved_slot(redis_cluster: RedisCluster):
    items = make_blocks(16)
    key, blob = items[0]
    with RedisTier(redis_cluster.url, topology_refresh_s=3600, **STEADY) as tier:
        tier.put(items)
        assert tier.get([key]) == [blob]  # the slot map is now cached
        slot = redis.crc.key_slot(b"kv:" + key)
        owners = [n for n in redis_cluster.nodes if b"kv:" + key in n.client().keys("*")]
        assert len(owners) == 1
        src = owners[0]
        dst = next(n for n in redis_cluster.nodes if n is not src)
        src_id, dst_id = _node_id(src), _node_id(dst)
        with src.client() as s, dst.client() as d:
            d.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            moving = s.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
            s.execute_command("MIGRATE", "127.0.0.1", dst.port, "", 0, 5000, "KEYS", *moving)
            for node in redis_cluster.nodes:
                with node.client() as c:
                    c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        assert b"kv:" + key in dst.client().keys("*")
        assert tier.get([key]) == [blob]  # MOVED -> redirected -> hit
        assert tier.contains_prefix(keys_of(items)) == 16
        assert tier.stats().errors == 0
        tier.put([(key, blob)])
        assert tier.stats().errors == 0


def test_cluster_node_down_only_its_keys_miss(redis_cluster: RedisCluster):
    items = make_blocks(120)
    keys = keys_of(items)
    victim = redis_cluster.nodes[2]
    with RedisTier(redis_cluster.url, **FAST_BREAKER, **STEADY) as tier, victim.client() as v:
        tier.put(items)
        local = set(v.keys("*"))
        on_victim = {i for i, k in enumerate(keys) if b"kv:" + k in local}
        assert 0 < len(on_victim) < len(keys)
        victim.kill()
        t0 = time.perf_counter()
        got = tier.get(keys)
        print(f"\ncluster get(120) with one of 3 nodes killed: "
              f"{(time.perf_counter() - t0) * 1e3:.2f} ms")
        assert [i for i, g in enumerate(got) if g is None] == sorted(on_victim)
        assert all(got[i] == items[i][1] for i in range(len(keys)) if i not in on_victim)
        assert tier.stats().extra["nodes_down"] == 1
        victim.start()
        redis_cluster.wait_ok()
        # the restarted node is empty, and its breaker may still be open: rewrite
        # until the half-open probe has closed it and every block is back
        assert wait_until(lambda: (tier.put(items), tier.get(keys))[1]
                          == [val for _, val in items])
        assert tier.stats().extra["nodes_down"] == 0
