"""LMDB-specific behaviour of ``tiers.lmdb.LMDBTier`` (the shared contract is tested in
``test_tier_conformance.py``): persistence across reopen, crash safety under SIGKILL,
a full LMDB map, open errors, and the consistency of its four databases."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import lmdb
import pytest
import xxhash

import tiers.lmdb as tiers_lmdb
from radix.hashing import Namespace, hash_blocks
from tiers.codec import encode_block, verify_block
from tiers.layout import KVLayout
from tiers.lmdb import LMDBTier

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype="float16")
BIG = KVLayout(num_layers=8, num_kv_heads=8, head_dim=32, block_size=16, dtype="float16")
"""128 KiB payloads, for tests that need the map or the disk to do real work."""


def blocks(n: int, layout: KVLayout = LAYOUT, seed: int = 0) -> list[tuple[bytes, bytes]]:
    ids = [(seed * 104729 + i) % 50_000 for i in range(n * layout.block_size)]
    chain = hash_blocks(Namespace(model=f"lmdb-{seed}").root(), ids, layout.block_size)
    return [(key, encode_block(key, chain.keys[i - 1] if i else chain.root, chain.blocks[i],
                               layout, os.urandom(layout.block_bytes)))
            for i, key in enumerate(chain.keys)]


def present(tier: LMDBTier, items: list[tuple[bytes, bytes]]) -> list[bool]:
    return [tier.contains_prefix([k]) == 1 for k, _ in items]


def audit(path: Path) -> dict[bytes, bytes]:
    """Open the (closed) environment directly and check that its databases agree:
    the same keys in ``blocks``, ``index`` and ``lru``, matching stamps and sizes, and
    ``bytes_used`` equal to the sum of sizes. Returns the stored ``key -> value``."""
    env = lmdb.open(str(path), max_dbs=4, readonly=True, lock=False)
    try:
        dbs = {name: env.open_db(name, create=False)
               for name in (b"blocks", b"index", b"lru", b"meta")}
        with env.begin() as txn:
            stored = dict(txn.cursor(db=dbs[b"blocks"]))
            index = dict(txn.cursor(db=dbs[b"index"]))
            lru = [k for k, _ in txn.cursor(db=dbs[b"lru"])]
            meta = dict(txn.cursor(db=dbs[b"meta"]))
    finally:
        env.close()
    assert set(stored) == set(index)
    assert sorted(lru) == lru and len(lru) == len(index)
    assert {k[8:]: k[:8] for k in lru} == {k: v[:8] for k, v in index.items()}
    assert all(int.from_bytes(index[k][8:], "big") == len(v) for k, v in stored.items())
    assert int.from_bytes(meta[b"bytes_used"], "little") == sum(map(len, stored.values()))
    return stored


# ---------------------------------------------------------------- persistence


def test_reopen_keeps_blocks_counts_and_lru_order(tmp_path: Path) -> None:
    b = blocks(6)
    size = len(b[0][1])
    tier = LMDBTier(tmp_path, capacity_bytes=4 * size)
    tier.put(b[:4])                     # 0 1 2 3
    tier.get([b[0][0], b[1][0]])        # 2 3 0 1 (stamps still pending at close)
    assert tier.stats().extra["pending_touches"] == 2
    tier.close()
    assert set(audit(tmp_path)) == {k for k, _ in b[:4]}

    tier = LMDBTier(tmp_path, capacity_bytes=4 * size)
    stats = tier.stats()
    assert (stats.blocks, stats.bytes_used) == (4, 4 * size)
    tier.put([b[4]])                    # evicts 2 -> 3 0 1 4
    assert present(tier, b) == [True, True, False, True, True, False]
    tier.get([b[3][0]])                 # 0 1 4 3
    tier.close()

    tier = LMDBTier(tmp_path, capacity_bytes=4 * size)
    tier.put([b[5]])                    # evicts 0 -> 1 4 3 5
    assert present(tier, b) == [False, True, False, True, True, True]
    kept = [b[i] for i in (1, 3, 4, 5)]
    assert tier.get([k for k, _ in kept]) == [v for _, v in kept]
    assert tier.stats().evictions == 1
    tier.close()
    assert set(audit(tmp_path)) == {k for k, _ in kept}


def test_reopen_with_a_smaller_capacity_evicts_on_the_next_put(tmp_path: Path) -> None:
    b = blocks(5)
    size = len(b[0][1])
    with LMDBTier(tmp_path, capacity_bytes=10 * size) as tier:
        tier.put(b[:4])
    with LMDBTier(tmp_path, capacity_bytes=2 * size) as tier:
        tier.put([b[4]])
        assert present(tier, b) == [False, False, False, True, True]
        assert tier.stats().evictions == 3


def test_pending_access_stamps_are_flushed_in_batches(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tiers_lmdb, "TOUCH_FLUSH_BLOCKS", 3)
    b = blocks(4)
    with LMDBTier(tmp_path, capacity_bytes=1 << 20) as tier:
        tier.put(b)
        tier.get([b[0][0], b[1][0]])
        assert tier.stats().extra == {"rejected": 0, "map_full": 0, "disk_full": 0,
                                      "touch_flushes": 0, "pending_touches": 2}
        tier.get([b[2][0]])
        extra = tier.stats().extra
        assert (extra["touch_flushes"], extra["pending_touches"]) == (1, 0)


# ---------------------------------------------------------------- crash safety


CHILD = textwrap.dedent("""
    import os, sys
    import xxhash
    from radix.hashing import Namespace, hash_blocks
    from tiers.codec import encode_block
    from tiers.layout import KVLayout
    from tiers.lmdb import LMDBTier

    path, capacity, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    layout = KVLayout(num_layers=8, num_kv_heads=8, head_dim=32, block_size=16,
                      dtype="float16")
    tier = LMDBTier(path, capacity_bytes=capacity)
    chain = hash_blocks(Namespace(model="crash").root(), [], layout.block_size)
    i = 0
    while True:
        items = []
        for _ in range(batch):
            parent = chain.last_key
            chain.extend([(i * 16 + t) % 50000 for t in range(16)])
            key = chain.keys[-1]
            items.append((key, encode_block(key, parent, chain.blocks[-1], layout,
                                            os.urandom(layout.block_bytes))))
            i += 1
        tier.put(items)
        for key, value in items:
            print(key.hex(), xxhash.xxh3_128_hexdigest(value), flush=True)
""")


def run_child_until_killed(path: Path, capacity: int, batch: int, commits: int) -> list[str]:
    """Start a writer process, SIGKILL it after ``commits`` reported blocks, and return
    every ``"<key hex> <xxh3-128 of value>"`` line it reported (all before the kill)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(capacity),
                              str(batch)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None
    lines: list[str] = []
    try:
        for line in child.stdout:
            lines.append(line.strip())
            if len(lines) >= commits:
                break
        else:
            raise AssertionError(f"writer exited early: {child.stderr.read()}")  # type: ignore[union-attr]
        os.kill(child.pid, signal.SIGKILL)
        lines.extend(line.strip() for line in child.stdout)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    return [line for line in lines if line]


@pytest.mark.parametrize(("capacity_blocks", "batch"), [(10_000, 1), (10_000, 5), (12, 3)],
                         ids=["one-per-txn", "batched", "evicting"])
def test_sigkill_mid_writes_loses_no_committed_block(tmp_path: Path, capacity_blocks: int,
                                                     batch: int) -> None:
    size = len(blocks(1, BIG)[0][1])
    reported = run_child_until_killed(tmp_path, capacity_blocks * size, batch, commits=60)
    digests = dict(line.split() for line in reported)
    keys = [bytes.fromhex(line.split()[0]) for line in reported]

    stored = audit(tmp_path)
    for key, value in stored.items():
        assert verify_block(value, key)

    tier = LMDBTier(tmp_path, capacity_bytes=capacity_blocks * size)
    got = tier.get(keys)
    for key, value in zip(keys, got, strict=True):
        if capacity_blocks >= len(keys) or key in keys[-capacity_blocks // 2:]:
            assert value is not None, "a committed block was lost"
        if value is not None:
            assert xxhash.xxh3_128_hexdigest(value) == digests[key.hex()]
    stats = tier.stats()
    assert (stats.corrupt, stats.errors) == (0, 0)
    assert stats.bytes_used <= capacity_blocks * size
    tier.close()


# ---------------------------------------------------------------- full map, errors


def test_full_map_evicts_instead_of_failing(tmp_path: Path) -> None:
    b = blocks(60, BIG)
    size = len(b[0][1])
    tier = LMDBTier(tmp_path, capacity_bytes=100 * size, map_size=1 << 20)
    for item in b:
        tier.put([item])
        assert tier.get([item[0]]) == [item[1]]
    stats = tier.stats()
    assert stats.extra["map_full"] > 0
    assert stats.errors == 0
    assert 0 < stats.blocks < 60
    assert present(tier, b[-3:]) == [True] * 3
    tier.put(b[:3])                     # a batch: room is made for all of it
    assert tier.get([k for k, _ in b[:3]]) == [v for _, v in b[:3]]
    tier.put(b[10:20])                  # more than the map holds: the newest are kept
    assert present(tier, b[17:20]) == [True] * 3
    assert tier.stats().errors == 0
    tier.close()
    audit(tmp_path)


def test_a_block_bigger_than_the_map_is_dropped_and_counted(tmp_path: Path) -> None:
    huge = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128)  # 2 MiB payload
    tier = LMDBTier(tmp_path, capacity_bytes=64 << 20, map_size=1 << 20)
    (key, value), = blocks(1, huge)
    tier.put([(key, value)])
    assert tier.get([key]) == [None]
    assert tier.stats().errors == 1
    small = blocks(2)
    tier.put(small)
    assert tier.get([k for k, _ in small]) == [v for _, v in small]
    tier.close()


def test_open_errors_are_clear(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"x")
    with pytest.raises(OSError, match="cannot open LMDB tier 'disk' at .*file"):
        LMDBTier(not_a_dir, capacity_bytes=1 << 20)
    with pytest.raises(ValueError, match="capacity_bytes"):
        LMDBTier(tmp_path / "a", capacity_bytes=0)
    with pytest.raises(ValueError, match="map_size"):
        LMDBTier(tmp_path / "b", capacity_bytes=1 << 20, map_size=-1)


def test_another_store_format_is_refused(tmp_path: Path) -> None:
    LMDBTier(tmp_path, capacity_bytes=1 << 20).close()
    env = lmdb.open(str(tmp_path), max_dbs=4)
    with env.begin(write=True) as txn:
        txn.put(b"format", (99).to_bytes(8, "little"), db=env.open_db(b"meta", txn=txn))
    env.close()
    with pytest.raises(OSError, match="store format 99, expected 1"):
        LMDBTier(tmp_path, capacity_bytes=1 << 20)


def test_keys_must_be_16_bytes(tmp_path: Path) -> None:
    with LMDBTier(tmp_path, capacity_bytes=1 << 20) as tier:
        (key, value), = blocks(1)
        for bad in (b"", key[:15], key + b"\x00", key.hex()):
            with pytest.raises(ValueError, match="16 bytes"):
                tier.put([(bad, value)])  # type: ignore[list-item]
            with pytest.raises(ValueError, match="16 bytes"):
                tier.get([key, bad])  # type: ignore[list-item]
            with pytest.raises(ValueError, match="16 bytes"):
                tier.contains_prefix([bad])  # type: ignore[list-item]
            with pytest.raises(ValueError, match="16 bytes"):
                tier.delete([bad])  # type: ignore[list-item]
        assert tier.stats().blocks == 0


def test_close_while_other_threads_call_is_safe(tmp_path: Path) -> None:
    """Calls racing with close either complete normally or answer misses; none raises."""
    items = blocks(64)
    tier = LMDBTier(tmp_path, capacity_bytes=1 << 20)
    tier.put(items)
    keys = [k for k, _ in items]
    values = {k: v for k, v in items}
    failures: list[BaseException] = []
    wrong: list[bytes] = []
    started = threading.Barrier(5)

    def hammer() -> None:
        started.wait()
        try:
            for _ in range(200):
                for key, value in zip(keys, tier.get(keys), strict=True):
                    if value is not None and value != values[key]:
                        wrong.append(key)
                tier.contains_prefix(keys)
                tier.put(items[:4])
        except BaseException as exc:  # any exception at all fails the test
            failures.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    started.wait()
    tier.close()
    for t in threads:
        t.join()
    assert failures == [] and wrong == []
    assert tier.get(keys[:1]) == [None]
    audit(tmp_path)
