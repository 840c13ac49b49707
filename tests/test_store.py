"""KVStore: promotion, demotion cascade, write-through, pinning, fork/copy-on-write,
corrupt lower-tier blocks, dead Redis, and two processes sharing one LMDB/Redis.

Real tiers throughout: CPU slot pools, LMDB in temp dirs, real redis-server processes.
Every block's KV is random and unique, so a test can check the exact bytes that come
back after a round trip through the tiers.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import lmdb
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.config import StoreConfig
from kvstore.store import Allocated, KVStore, Lease, OutOfBlocks
from radix import BlockChain, Namespace, hash_blocks
from tiers.layout import KVLayout

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype="float32")
NS = Namespace("store-test-model", dtype="float32", block_size=4)
BS = 4


def make_store(tmp_path: Path | None = None, **kw) -> KVStore:
    args = dict(layout=LAYOUT, block_size=BS, gpu_blocks=8)
    if tmp_path is not None and kw.pop("disk", False):
        args.update(disk_path=str(tmp_path / "disk"), disk_bytes=64 * LAYOUT.block_bytes)
    args.update(kw)
    return KVStore(StoreConfig(**args))


def tokens(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50000, (n,), generator=g).tolist()


def fill(store: KVStore, lease: Lease, start_block: int) -> None:
    """Write deterministic random KV into the lease's blocks from ``start_block``."""
    for i in range(start_block, len(lease.slots)):
        key = lease.chain.keys[i] if i < len(lease.chain.keys) else bytes([i]) * 16
        g = torch.Generator().manual_seed(int.from_bytes(key[:7], "little"))
        store.gpu.block(lease.slots[i]).copy_(torch.randn(LAYOUT.block_shape, generator=g))


def expected(key: bytes) -> torch.Tensor:
    g = torch.Generator().manual_seed(int.from_bytes(key[:7], "little"))
    return torch.randn(LAYOUT.block_shape, generator=g)


def run_request(store: KVStore, toks: list[int], max_blocks: int | None = None) -> Lease:
    """Match, acquire, compute the rest (random KV), commit; the lease stays held."""
    chain = hash_blocks(NS.root(), toks, BS)
    lease = store.acquire(store.match(chain, max_blocks=max_blocks))
    store.wait(lease)
    for i in range(lease.committed):  # every hit block carries exactly its KV
        assert torch.equal(store.gpu.block(lease.slots[i]), expected(chain.keys[i])), i
    res = store.allocate(lease, len(toks))
    assert isinstance(res, Allocated)
    fill(store, lease, lease.committed)
    store.commit(lease, len(toks))
    store.check_integrity()
    return lease


def serve(store: KVStore, toks: list[int]) -> dict[str, int]:
    lease = run_request(store, toks)
    store.release(lease)
    store.check_integrity()
    return lease.cached_tokens


# ----------------------------------------------------------------- GPU tier


def test_gpu_hit_reuses_blocks_and_partial_block_is_private():
    store = make_store()
    toks = tokens(1, 4 * BS + 2)
    assert serve(store, toks) == {}
    s = store.stats()
    assert s.index.blocks["gpu"] == 4 and s.gpu_free == 4  # the partial block was freed
    assert serve(store, toks + tokens(2, 3)) == {"gpu": 4 * BS}
    assert store.stats().hit_tokens == {"gpu": 4 * BS}


def test_out_of_blocks_is_a_typed_result():
    store = make_store()
    held = run_request(store, tokens(1, 6 * BS))  # 6 of 8 slots locked
    chain = hash_blocks(NS.root(), tokens(2, 4 * BS), BS)
    lease = store.acquire(store.match(chain))
    res = store.allocate(lease, 4 * BS)
    assert isinstance(res, OutOfBlocks) and res.needed == 4 and res.available == 2
    assert isinstance(store.allocate(lease, 2 * BS), Allocated)
    store.release(held)
    store.release(lease)
    store.check_integrity()


# ------------------------------------------------------- promotion/demotion


def test_write_back_cascade_gpu_host_disk_and_promotion_back(tmp_path):
    # Publication off: blocks reach the disk only by demotion, which is what this checks.
    store = make_store(tmp_path, gpu_blocks=4, host_blocks=4, disk=True, publish=False)
    a, b, c = tokens(1, 4 * BS), tokens(2, 4 * BS), tokens(3, 4 * BS)
    serve(store, a)
    serve(store, b)  # a -> host
    s = store.stats()
    assert s.index.blocks == {"gpu": 4, "host": 4, "disk": 0}
    serve(store, c)  # b -> host, a -> disk (written in the background)
    assert store.stats().index.blocks == {"gpu": 4, "host": 4, "disk": 4}
    store.flush()
    s = store.stats()
    assert s.index.blocks == {"gpu": 4, "host": 4, "disk": 4}
    assert s.demotions == {"gpu": 8, "host": 4}
    assert s.blocks_moved["gpu->host"] == 8 and s.blocks_moved["host->disk"] == 4
    # Each comes back with exactly its bytes (run_request checks). Promoting a from disk
    # demotes c to host, which pushes b to disk.
    assert serve(store, a) == {"disk": 4 * BS}
    assert serve(store, c) == {"host": 4 * BS}
    assert serve(store, b) == {"disk": 4 * BS}
    store.close()


def test_write_back_moves_blocks_between_gpu_and_host():
    store = make_store(gpu_blocks=4, host_blocks=8)
    a, b = tokens(1, 4 * BS), tokens(2, 4 * BS)
    serve(store, a)
    serve(store, b)  # a -> host: four copies
    assert serve(store, a) == {"host": 4 * BS}  # b -> host; a's host copy stays
    s = store.stats()
    assert s.index.blocks == {"gpu": 4, "host": 8} and s.demotions == {"gpu": 8}
    assert serve(store, b) == {"host": 4 * BS}
    s = store.stats()  # a left the GPU without a copy: the host held it already
    assert s.demotions == {"gpu": 8} and s.evictions["gpu"] == 12
    assert s.blocks_moved["gpu->host"] == 8 and s.host_free == 0


def test_host_reclaims_duplicates_of_gpu_blocks_before_its_own_blocks():
    store = make_store(gpu_blocks=8, host_blocks=8)
    a, b, c, d = (tokens(i, 4 * BS) for i in (1, 2, 3, 4))
    serve(store, a)
    serve(store, b)
    serve(store, c)  # a -> host
    assert serve(store, a) == {"host": 4 * BS}  # b -> host; a's host copy stays
    assert store.stats().index.blocks == {"gpu": 8, "host": 8}
    # c goes down and the full host needs four slots: it frees a's duplicates (a is on
    # the GPU), not b, which it alone holds.
    serve(store, d)
    s = store.stats()
    assert s.host_reclaimed == 4 and "host" not in s.evictions
    assert s.index.blocks == {"gpu": 8, "host": 8}
    assert serve(store, b) == {"host": 4 * BS}  # run_request checks the bytes
    store.check_integrity()
    store.close()


def test_host_reclaims_the_oldest_duplicates_first():
    """Two promoted prefixes keep host duplicates; a full host frees the older one's and
    keeps the newer one's (the reclaim order is the order of promotion)."""
    store = make_store(gpu_blocks=12, host_blocks=16)
    a, b, c, d, e, f = (tokens(i, 4 * BS) for i in range(1, 7))
    for toks in (a, b, c, d, e):  # a and b end on the host; c, d and e on the GPU
        serve(store, toks)
    assert serve(store, a) == {"host": 4 * BS}  # c -> host; a keeps a host duplicate
    assert serve(store, b) == {"host": 4 * BS}  # d -> host (now full); so does b
    serve(store, f)  # e -> host: the host frees a's duplicates, the older
    s = store.stats()
    assert s.host_reclaimed == 4 and "host" not in s.evictions
    host = store.tree.tier("host")

    def on_host(toks: list[int]) -> list[bool]:
        m = store.match(hash_blocks(NS.root(), toks, BS))
        return [node.location(host) is not None for node in m.nodes]

    assert on_host(a) == [False] * 4 and on_host(b) == [True] * 4
    assert on_host(e) == [True] * 4
    store.check_integrity()
    store.close()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(1, 5), st.booleans(),
                          st.sampled_from(["serve", "hold", "drop-gpu", "drop-host"])),
                min_size=1, max_size=24))
def test_random_requests_through_gpu_and_host_keep_bytes_and_accounting(ops):
    """Prefixes shared at random through a small GPU pool and host tier (write-back, so
    promoted blocks keep host duplicates the host reclaims): every hit carries exactly
    its block's KV (``run_request`` checks), the index and pools agree after every step,
    and a held lease's blocks stay put."""
    store = make_store(gpu_blocks=8, host_blocks=6)
    held: list[Lease] = []
    try:
        for prefix, blocks, hold, op in ops:
            if op == "drop-gpu":
                store.drop("gpu")
            elif op == "drop-host":
                store.drop("host")
            else:
                toks = tokens(500 + prefix, 5 * BS)[:blocks * BS] + tokens(600 + len(held), 2)
                locked = sum(len(lease.slots) for lease in held)
                if locked + blocks + 1 > 8:  # a request must fit beside the held ones
                    continue
                lease = run_request(store, toks)
                if op == "hold" and hold and len(held) < 2:
                    held.append(lease)
                else:
                    store.release(lease)
            store.check_integrity()
        for lease in held:
            store.release(lease)
        store.check_integrity()
    finally:
        store.close()


def test_write_through_keeps_the_host_copy_on_promotion():
    store = make_store(gpu_blocks=4, host_blocks=8, policy="write-through")
    a, b = tokens(1, 4 * BS), tokens(2, 4 * BS)
    serve(store, a)
    serve(store, b)
    assert serve(store, a) == {"host": 4 * BS}
    assert store.stats().index.blocks == {"gpu": 4, "host": 8}
    assert store.stats().blocks_moved["gpu->host"] == 8  # demotions cost no copies


def test_write_through_copies_down_at_commit(tmp_path):
    store = make_store(tmp_path, gpu_blocks=8, host_blocks=8, disk=True, policy="write-through")
    toks = tokens(5, 3 * BS)
    serve(store, toks)
    store.flush()
    s = store.stats()
    assert s.index.blocks == {"gpu": 3, "host": 3, "disk": 3}
    chain = hash_blocks(NS.root(), toks, BS)
    assert store.shared_tiers["disk"].contains_prefix(chain.keys) == 3


def test_drop_demotes_a_whole_tier(tmp_path):
    store = make_store(tmp_path, gpu_blocks=8, host_blocks=8, disk=True)
    toks = tokens(6, 3 * BS)
    serve(store, toks)
    assert store.drop("gpu") == 3
    assert serve(store, toks) == {"host": 3 * BS}
    assert store.drop("gpu") == 3 and store.drop("host") == 3
    assert serve(store, toks) == {"disk": 3 * BS}
    store.close()


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                         reason="needs CUDA"))])
def test_two_leases_promote_the_same_host_blocks_at_once(device):
    """Both leases start promoting before either finishes (on CUDA the copies wait
    behind a busy compute stream); the second to finish uses the first's GPU copy."""
    store = make_store(gpu_blocks=16, host_blocks=16, device=device)
    toks = tokens(8, 4 * BS)
    serve(store, toks)
    assert store.drop("gpu") == 4
    chain = hash_blocks(NS.root(), toks, BS)
    if device == "cuda":
        torch.cuda._sleep(200_000_000)  # keep the current stream busy: copies stay pending
    leases = [store.acquire(store.match(chain.fork())) for _ in range(2)]
    for lease in leases:
        store.wait(lease)
        assert lease.cached_tokens in ({"host": 4 * BS}, {"gpu": 4 * BS})
        for i, slot in enumerate(lease.slots):
            assert torch.equal(store.gpu.block(slot).cpu(), expected(chain.keys[i])), i
    assert leases[0].slots == leases[1].slots
    store.check_integrity()
    for lease in leases:
        store.release(lease)
    s = store.stats()
    # one GPU copy; the host keeps its copies as duplicates it reclaims first
    assert s.index.blocks == {"gpu": 4, "host": 4} and s.host_free == 12
    store.check_integrity()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_slot_reused_while_its_publication_copy_waits_is_written_after_it(tmp_path):
    """A publication copies its blocks on the side stream while compute goes on; when
    the GPU lets those blocks go and hands their slots to the next request before the
    copy ran, the next request's writes wait for it: the disk gets the published bytes,
    never the next request's. The side stream is kept busy so that without that wait
    the writes land first. (The write kernel is run once beforehand: its first launch
    would load it, which waits for the whole device and hides the race.)"""
    from tiers.codec import Corrupt, decode_block
    from tiers.pool import side_stream

    store = make_store(tmp_path, gpu_blocks=16, device="cuda", disk=True)
    first = tokens(11, 16 * BS)
    chain = hash_blocks(NS.root(), first, BS)
    lease = store.acquire(store.match(chain))
    assert isinstance(store.allocate(lease, len(first)), Allocated)
    store.gpu.block(lease.slots[0]).fill_(-1.0)  # loads the write kernel now
    fill(store, lease, 0)
    torch.cuda.synchronize()
    with torch.cuda.stream(side_stream(store.gpu.device)):
        torch.cuda._sleep(200_000_000)  # the publication copy waits behind this
    store.commit(lease, len(first))  # queues the publication (copy on the side stream)
    published = set(lease.slots)
    store.release(lease)
    second = hash_blocks(NS.root(), tokens(12, 16 * BS), BS)
    lease2 = store.acquire(store.match(second))
    assert isinstance(store.allocate(lease2, 16 * BS), Allocated)  # evicts the first
    assert set(lease2.slots) == published
    for slot in lease2.slots:  # the next request's writes, on the current stream
        store.gpu.block(slot).fill_(-1.0)
    store.commit(lease2, 16 * BS)
    store.release(lease2)
    store.flush()
    blobs = store.shared_tiers["disk"].get(chain.keys)
    for i, blob in enumerate(blobs):
        assert blob is not None, i
        blk = decode_block(blob, expected_key=chain.keys[i], layout=LAYOUT)
        assert not isinstance(blk, Corrupt), i
        got = torch.frombuffer(bytearray(blk.payload), dtype=torch.float32)
        assert torch.equal(got.view(LAYOUT.block_shape), expected(chain.keys[i])), i
    store.check_integrity()
    store.close()


def test_pinned_prefix_is_evicted_last():
    store = make_store(gpu_blocks=6)
    system = tokens(9, 2 * BS)
    serve(store, system)
    store.pin(hash_blocks(NS.root(), system, BS))
    for seed in range(3):  # fill and churn the pool
        serve(store, tokens(100 + seed, 4 * BS))
    assert serve(store, system) == {"gpu": 2 * BS}


def test_namespaces_isolate_tenants():
    store = make_store()
    toks = tokens(1, 2 * BS)
    serve(store, toks)
    other = Namespace(NS.model, dtype="float32", block_size=BS, tenant="acme")
    chain = hash_blocks(other.root(), toks, BS)
    assert store.match(chain).num_blocks == 0


# ----------------------------------------------------------- fork and COW


def test_fork_shares_blocks_and_copies_on_write():
    store = make_store()
    toks = tokens(1, 2 * BS + 2)  # two full blocks and a partial one
    parent = run_request(store, toks)
    child = store.fork(parent)
    assert child.slots == parent.slots
    shared_partial = parent.slots[2]
    before = store.gpu.block(shared_partial).clone()
    # The child writes its next token into the shared partial block: it gets a copy.
    assert isinstance(store.allocate(child, len(toks) + 1), Allocated)
    assert child.slots[:2] == parent.slots[:2] and child.slots[2] != shared_partial
    assert torch.equal(store.gpu.block(child.slots[2]), before)
    store.gpu.block(child.slots[2]).fill_(7.0)
    assert torch.equal(store.gpu.block(shared_partial), before)
    # The parent, now sole owner, writes in place.
    assert isinstance(store.allocate(parent, len(toks) + 1), Allocated)
    assert parent.slots[2] == shared_partial
    store.check_integrity()
    store.release(child)
    store.release(parent)
    store.check_integrity()
    assert store.stats().gpu_free == 8 - 2


# ------------------------------------------------------------ corruption


def test_corrupt_disk_block_truncates_hit_and_rest_is_recomputed(tmp_path):
    store = make_store(tmp_path, gpu_blocks=4, host_blocks=0, disk=True,
                       policy="write-through")
    toks = tokens(3, 4 * BS)
    serve(store, toks)
    store.flush()
    store.close()
    chain = hash_blocks(NS.root(), toks, BS)
    env = lmdb.open(str(tmp_path / "disk"), max_dbs=16)
    db = env.open_db(b"blocks")
    with env.begin(write=True, db=db) as txn:
        raw = bytearray(txn.get(chain.keys[2]))
        raw[-5] ^= 0xFF  # a flipped payload byte: the checksum must catch it
        txn.put(chain.keys[2], bytes(raw))
    env.close()
    fresh = make_store(tmp_path, gpu_blocks=8, disk=True)  # new process view: empty index
    assert serve(fresh, toks) == {"disk": 2 * BS}
    assert fresh.stats().corrupt_blocks >= 1
    # The corrupt block was deleted; the recomputed one is committed and found next time.
    assert serve(fresh, toks) == {"gpu": 4 * BS}
    fresh.close()


# ---------------------------------------------------------------- redis


def test_redis_tier_promotion_and_dead_redis_misses(redis_server):
    store = make_store(gpu_blocks=4, redis_url=redis_server.url, policy="write-through")
    toks = tokens(4, 4 * BS)
    serve(store, toks)
    store.flush()
    other = make_store(gpu_blocks=4, redis_url=redis_server.url)  # another engine
    assert serve(other, toks) == {"redis": 4 * BS}
    redis_server.kill()
    third = make_store(gpu_blocks=4, redis_url=redis_server.url)
    t0 = time.perf_counter()
    assert serve(third, tokens(5, 4 * BS)) == {}
    assert serve(third, toks) == {}  # nothing cached locally, Redis is down: a miss
    print(f"two requests with Redis down took {(time.perf_counter() - t0) * 1e3:.1f} ms")
    assert third.stats().tier_errors["redis"] >= 1
    for s in (store, other, third):
        s.close()


# ------------------------------------------------------ two processes


CHILD = """
import sys, torch
sys.path.insert(0, {root!r})
from tests.test_store import make_store, serve, tokens
from pathlib import Path
kw = dict(gpu_blocks=8, policy="write-through")
if {disk!r}:
    kw.update(disk_path={disk!r}, disk_bytes=64 * __import__("tests.test_store").test_store.LAYOUT.block_bytes)
if {redis!r}:
    kw.update(redis_url={redis!r})
store = make_store(**kw)
assert serve(store, tokens(42, 5 * 4 + 1)) == {{}}
store.close()
print("ok")
"""


@pytest.mark.parametrize("shared", ["disk", "redis"])
def test_second_process_finds_first_process_blocks(shared, tmp_path, redis_server):
    disk = str(tmp_path / "disk") if shared == "disk" else ""
    url = redis_server.url if shared == "redis" else ""
    code = CHILD.format(root=str(ROOT), disk=disk, redis=url)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
    kw = dict(gpu_blocks=8)
    if disk:
        kw.update(disk_path=disk, disk_bytes=64 * LAYOUT.block_bytes)
    else:
        kw.update(redis_url=url)
    store = make_store(**kw)
    assert serve(store, tokens(42, 5 * BS + 1)) == {shared: 5 * BS}
    store.close()


# ------------------------------------------------------------- simulation


def test_simulation_mode_runs_the_same_policies():
    cfg = StoreConfig.simulation(block_size=BS, gpu_blocks=4, host_blocks=4, disk_blocks=4)
    store = KVStore(cfg)
    chains = [hash_blocks(NS.root(), tokens(i, 4 * BS), BS) for i in range(3)]
    for c in chains:
        assert store.replay(c.keys, c.blocks, 4 * BS).cached_tokens == 0
    assert store.replay(chains[0].keys, chains[0].blocks, 4 * BS).hit_tokens == {"disk": 4 * BS}
    # Promoting chain 0 demoted chain 2 to host; chain 1 found no room on disk (chain 0,
    # locked while it was promoted, filled it) and left the cache.
    assert store.replay(chains[2].keys, chains[2].blocks, 4 * BS).hit_tokens == {"host": 4 * BS}
    assert store.replay(chains[1].keys, chains[1].blocks, 4 * BS).cached_tokens == 0
    store.check_integrity()
    s = store.stats()
    for tier, cap in (("gpu", 4), ("host", 4), ("disk", 4)):
        assert s.index.blocks[tier] <= cap


def test_config_errors_say_what_to_change():
    with pytest.raises(ValueError, match="gpu_blocks"):
        StoreConfig(layout=LAYOUT, gpu_blocks=0, block_size=BS)
    with pytest.raises(ValueError, match="policy"):
        StoreConfig(layout=LAYOUT, gpu_blocks=1, block_size=BS, policy="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="block_size"):
        StoreConfig(layout=LAYOUT, gpu_blocks=1, block_size=8)
    with pytest.raises(ValueError, match="disk_bytes"):
        StoreConfig(layout=LAYOUT, gpu_blocks=1, block_size=BS, disk_path="/tmp/x")
    with pytest.raises(ValueError, match="holds no block of this model"):
        StoreConfig(layout=LAYOUT, gpu_blocks=1, block_size=BS, disk_path="/tmp/x",
                    disk_bytes=LAYOUT.block_bytes - 1)
    with pytest.raises(ValueError, match="simulation"):
        StoreConfig(layout=None, gpu_blocks=1, redis_url="redis://x")


def test_chain_rejects_mismatched_namespace():
    store = make_store()
    with pytest.raises(ValueError, match="block_size"):
        store.chain([1, 2, 3], Namespace("m", block_size=16))
    assert isinstance(store.chain(list(range(9)), NS), BlockChain)


# ------------------------------------------------- sharing by default


@pytest.mark.parametrize("shared", ["disk", "redis"])
def test_committed_blocks_reach_shared_tiers_without_eviction(shared, tmp_path, redis_server):
    kw = dict(gpu_blocks=16)
    if shared == "disk":
        kw.update(disk_path=str(tmp_path / "disk"), disk_bytes=64 * LAYOUT.block_bytes)
    else:
        kw.update(redis_url=redis_server.url)
    first = make_store(**kw)  # write-back, the default policy: nothing is evicted here
    toks = tokens(31, 5 * BS + 3)
    lease = run_request(first, toks)  # still held: its blocks stay on the GPU
    first.flush()
    s = first.stats()
    assert s.evictions == {} and s.index.blocks[shared] == 5  # recorded once stored
    assert s.blocks_moved[f"gpu->{shared}"] == 5
    first.release(lease)
    first.check_integrity()
    first.close()  # one LMDB environment per process: the next store is another engine
    second = make_store(**kw)
    assert serve(second, toks) == {shared: 5 * BS}
    second.close()


def test_failed_publication_is_not_recorded(redis_server):
    store = make_store(gpu_blocks=16, redis_url=redis_server.url)
    redis_server.kill()
    serve(store, tokens(32, 4 * BS))
    store.flush()
    s = store.stats()
    assert s.index.blocks["redis"] == 0  # the put failed: the index does not claim it
    assert store.mover.puts_failed["redis"] == 4 and s.tier_errors["redis"] >= 1
    store.check_integrity()
    store.close()


def test_failed_write_through_and_demotion_are_not_recorded(redis_server):
    store = make_store(gpu_blocks=4, host_blocks=4, redis_url=redis_server.url,
                       policy="write-through")
    a, b, c = tokens(33, 4 * BS), tokens(34, 4 * BS), tokens(35, 4 * BS)
    serve(store, a)
    store.flush()
    assert store.stats().index.blocks["redis"] == 4
    redis_server.kill()
    serve(store, b)  # a -> dropped from GPU (its host copy stays)
    serve(store, c)  # b demoted; host full: a's host copy leaves, Redis holds it still
    store.flush()
    s = store.stats()
    assert s.index.blocks["redis"] == 4  # a only: b and c never reached Redis
    store.check_integrity()
    store.close()


def test_write_back_to_disk_drops_what_the_write_queue_cannot_take(tmp_path):
    # A one-block write queue: of the four blocks the host demotes at once, one is
    # written (in the background), three are dropped and counted; a later request finds
    # exactly the written one on disk and recomputes the rest.
    store = make_store(tmp_path, gpu_blocks=4, host_blocks=4, disk=True, publish=False,
                       publish_queue_bytes=LAYOUT.block_bytes)
    a, b, c = tokens(41, 4 * BS), tokens(42, 4 * BS), tokens(43, 4 * BS)
    serve(store, a)
    serve(store, b)  # a -> host
    serve(store, c)  # b -> host; a's four blocks leave the host, one reaches the disk
    store.flush()
    s = store.stats()
    assert s.publish_dropped == 3 and s.blocks_moved["host->disk"] == 1
    assert s.index.blocks["disk"] == 1
    assert serve(store, a) == {"disk": BS}  # run_request checks the bytes
    store.check_integrity()
    store.close()


def test_write_back_keeps_half_the_write_queue_from_publications(tmp_path):
    # A four-block write queue whose writer is held busy: publications may take only
    # two slots, so when the host must let a chain go, two of its blocks (the only
    # copies) still find room, where the queue full of publications of blocks still
    # cached above would have dropped them all. Write-backs run first once it frees.
    from kvstore.writer import WRITE_BACK

    store = make_store(tmp_path, gpu_blocks=8, host_blocks=4, disk=True,
                       publish_queue_bytes=4 * LAYOUT.block_bytes)
    gate = threading.Event()
    store.mover._publisher.submit(gate.wait, WRITE_BACK)
    x, a, b, c = (tokens(s, 4 * BS) for s in (61, 62, 63, 64))
    held = run_request(store, x)  # stays on the GPU; two of its four publications fit
    assert store.stats().publish_dropped == 2
    serve(store, a)  # no room beside the reserve: four publications dropped
    serve(store, b)  # a -> host
    serve(store, c)  # b -> host; a leaves the host: two blocks queued for write-back
    assert store.stats().publish_dropped == 2 + 4 + 4 + 4 + 2
    gate.set()
    store.flush()
    s = store.stats()
    assert s.blocks_moved["host->disk"] == 2 and s.blocks_moved["gpu->disk"] == 2
    store.release(held)
    assert serve(store, a) == {"disk": 2 * BS}  # run_request checks the bytes
    store.check_integrity()
    store.close()


def test_full_publication_queue_drops_and_counts(tmp_path):
    store = make_store(tmp_path, gpu_blocks=16, disk=True,
                       publish_queue_bytes=2 * LAYOUT.block_bytes)
    serve(store, tokens(36, 6 * BS))  # one commit of six blocks: two fit the queue
    store.flush()
    s = store.stats()
    assert s.publish_dropped == 4 and s.index.blocks["disk"] == 2
    store.close()


def test_load_batches_spread_evenly_over_the_workers():
    from kvstore.mover import load_batch_blocks
    assert load_batch_blocks(256, 15, 8) == 11  # 24 batches: three even rounds
    assert load_batch_blocks(256, 16, 8) == 16  # 16 batches: two full rounds
    assert load_batch_blocks(14, 2, 3) == 2
    assert load_batch_blocks(3, 16, 8) == 1  # a short load reads in parallel
    for n in range(1, 300, 7):
        for lane in (1, 5, 15, 64):
            per = load_batch_blocks(n, lane, 8)
            assert 1 <= per <= lane and -(-n // per) >= min(n, 8) or per == 1


def test_pipelined_load_over_many_batches_truncates_at_first_corrupt_block(tmp_path):
    kw = dict(gpu_blocks=32, load_batch_bytes=2 * LAYOUT.block_bytes, load_workers=3)
    store = make_store(tmp_path, disk=True, **kw)
    toks = tokens(37, 14 * BS)
    serve(store, toks)
    store.close()
    chain = hash_blocks(NS.root(), toks, BS)
    fresh = make_store(tmp_path, disk=True, **kw)  # 7 batches on 3 workers
    assert serve(fresh, toks) == {"disk": 14 * BS}  # run_request checked every byte
    assert fresh.stats().blocks_moved["disk->gpu"] == 14
    fresh.close()
    env = lmdb.open(str(tmp_path / "disk"), max_dbs=16)
    db = env.open_db(b"blocks")
    with env.begin(write=True, db=db) as txn:
        raw = bytearray(txn.get(chain.keys[9]))
        raw[-3] ^= 0x55
        txn.put(chain.keys[9], bytes(raw))
    env.close()
    third = make_store(tmp_path, disk=True, **kw)
    assert serve(third, toks) == {"disk": 9 * BS}
    assert third.stats().corrupt_blocks >= 1
    third.close()


def test_simulation_imports_no_torch():
    code = ("import sys\n"
            "from kvstore.config import StoreConfig\n"
            "from kvstore.store import KVStore\n"
            "import bench.hit_rate\n"
            "store = KVStore(StoreConfig.simulation(block_size=4, gpu_blocks=4, host_blocks=4,"
            " disk_blocks=8))\n"
            "for i in range(6):\n"
            "    keys = [bytes([i, j]) * 8 for j in range(3)]\n"
            "    store.replay(keys, [bytes(16)] * 3, 12)\n"
            "store.check_integrity()\n"
            "assert 'torch' not in sys.modules, 'simulation imported torch'\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
